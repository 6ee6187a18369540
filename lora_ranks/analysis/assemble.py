"""From every layer's spectra to one rank config, and the whole analysis in one process.

``assemble_rank_config`` reads the layer files back, allocates ranks and writes the validated config;
``analyze_checkpoints`` runs discovery, every layer and the assembly serially, for users who do not need
Prefect (the ``svd-analysis`` flow fans the same steps out, one task per layer).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..checkpoints import CheckpointPair, ModuleRef
from ..config import RankConfig, build_rank_config, save_rank_config
from ..devices import resolve_device
from ..finetune import run_split_half_finetunes
from ..kfac import CalibrationError
from ..ranks import allocate_ranks, check_budget
from ..settings import AllocationSettings, AlphaPolicy, AnalysisSettings, CurvatureSettings, FinetuneSettings
from ..spectra import Spectrum
from .curvature import CurvatureResult, collect_layer_curvature
from .layer import LayerResult, analyze_layer
from .layout import OutputLayout, load_module_records, load_spectra
from .split_half import split_half_ranks

__all__ = ["assemble_rank_config", "analyze_checkpoints", "curvature_record", "zero_delta_message"]


def _combine(digests: Iterable[str]) -> str:
    return hashlib.sha256("|".join(digests).encode()).hexdigest()


def assemble_rank_config(
    pair: CheckpointPair,
    modules: Sequence[ModuleRef],
    layer_results: Sequence[LayerResult],
    settings: AllocationSettings,
    config_path: str | Path,
    *,
    alpha_policy: AlphaPolicy = AlphaPolicy(),
    extra_metadata: dict | None = None,
    split_half: dict[str, dict] | None = None,
) -> tuple[RankConfig, dict[str, Spectrum]]:
    """Read every layer's spectra, allocate ranks, write the validated config atomically.

    ``split_half``: ``analysis.split_half_ranks``' result, when the split-half noise estimate ran (its ranks go to
    the module metadata, its per-rank agreement to ``analysis_metadata.split_half``).

    Modules that did not change (zero deltas) get ``min_rank`` and are listed in the metadata's
    ``zero_delta_modules``; callers decide how to tell the user.

    Returns:
        (the config, spectra by module name) -- the spectra feed the plots and raw-data export.
    """
    paths = [r.path for r in layer_results]
    spectra = load_spectra(paths)
    records = load_module_records(paths)
    allocations = allocate_ranks(modules, spectra, settings, base_parameters=pair.base_parameters,
                                 weight_spectra=load_spectra(paths, weight=True),
                                 kinds={n: r["spectrum"] for n, r in records.items()},
                                 fallbacks={n: r["fallback"] for n, r in records.items() if r.get("fallback")},
                                 split_half={n: r["split_half_rank"] for n, r in split_half.items()} if split_half else None)
    spectra_info = {
        name: {"svd_method": s.method, "rel_error_bound": s.rel_error_bound, "svd_seconds": round(s.seconds, 6),
               "device": s.device, "total_energy": s.total_energy}
        for name, s in spectra.items()
    }
    metadata = {
        "checkpoints": pair.identity(content=(_combine(r.base_digest for r in layer_results),
                                              _combine(r.finetuned_digest for r in layer_results))),
        "layer_fingerprints": {r.layer: r.fingerprint for r in layer_results},
        "svd": {
            "methods": sorted({s.method for s in spectra.values()}),
            "max_rel_error_bound": max(s.rel_error_bound for s in spectra.values()),
            # per-matrix compute seconds, summed (matrices of a layer run side by side: can exceed wall time)
            "total_seconds": sum(s.seconds for s in spectra.values()),
            "top_k": settings.required_top_k,
        },
    }
    if split_half:
        metadata["split_half"] = {n: {"agreement": r["agreement"], "min_agreement": r["min_agreement"]}
                                  for n, r in split_half.items()}
    if extra_metadata:
        metadata.update(extra_metadata)
    config = build_rank_config(allocations, settings, base_parameters=pair.base_parameters,
                               alpha_policy=alpha_policy, spectra_info=spectra_info, extra_metadata=metadata)
    save_rank_config(config_path, config)
    return config, spectra


def analyze_checkpoints(
    base: str | Path,
    finetuned: str | Path,
    out_dir: str | Path,
    *,
    settings: AllocationSettings = AllocationSettings(),
    analysis: AnalysisSettings = AnalysisSettings(),
    alpha_policy: AlphaPolicy = AlphaPolicy(),
    allow_pickle: bool = False,
    curvature: CurvatureSettings = CurvatureSettings(),
    calibration_data: str | Path | None = None,
    subset: FinetuneSettings = FinetuneSettings(),
) -> RankConfig:
    """Whole analysis in one process, layer after layer (what the ``svd-analysis`` flow fans out).

    Writes the config and per-layer spectra into ``OutputLayout(out_dir)``; returns the config. Warns
    (``UserWarning``) when some modules did not change at all.

    Args:
        curvature: which spectrum ranks the directions; "input" and "fisher" first collect curvature factors from
            the fine-tuned model on ``calibration_data`` (the ``subset`` of it the fine-tune trains on).

    Raises:
        CheckpointError: listing every problem the headers show (before any tensor is read), or naming a
            tensor with NaN or Inf.
        CalibrationError: a curvature spectrum, or the split-half noise estimate, without usable calibration data.
        DeviceError, BudgetError: a device that is not there, a budget that cannot be spent (before any work).
    """
    start = time.perf_counter()
    layout = OutputLayout(out_dir)
    if settings.noise_estimate == "split-half" and calibration_data is None:
        raise CalibrationError("noise_estimate='split-half' needs the fine-tuning data (two fine-tunes on its halves)")
    resolve_device(analysis.device)
    pair = CheckpointPair(base, finetuned, allow_pickle=allow_pickle)
    layers = pair.preflight(analysis.targets)  # headers only; builds the model on the meta device for names
    modules = [m for mods in layers.values() for m in mods]
    check_budget(settings, {m.name: m.shape for m in modules}, pair.base_parameters if settings.budget_mode else None)
    curvature = curvature.resolved(calibration_data is not None)
    factors = None
    if curvature.spectrum != "weight":
        if calibration_data is None:
            raise CalibrationError(f"spectrum={curvature.spectrum!r} needs calibration records (the fine-tuning data)")
        factors = collect_layer_curvature(pair.finetuned.root, calibration_data, modules, layout.svd_dir, curvature,
                                          subset, device=analysis.device)
    discovered = time.perf_counter()
    results = [analyze_layer(pair, mods, layout.svd_dir, top_k=settings.required_top_k, method=analysis.svd_method,
                             device=analysis.device, save_deltas=analysis.save_deltas,
                             save_vectors=analysis.save_vectors,
                             curvature_path=factors.paths.get(layer) if factors else None, damping=curvature.curvature_damping)
               for layer, mods in layers.items()]
    spectra_done = time.perf_counter()
    timings = {"discovery_seconds": discovered - start, "spectra_wall_seconds": spectra_done - discovered,
               "analysis_seconds": spectra_done - start}
    extra = {"timings": timings, "analysis": analysis.to_dict(),
             "curvature": curvature_record(curvature, factors, calibration_data)}
    split_half = None
    if settings.noise_estimate == "split-half":
        halves = run_split_half_finetunes(base, calibration_data, layout.split_half_dir, subset, progress=False,
                                          device=analysis.device)
        split_half = split_half_ranks(pair.base.root, halves[0].finetuned_dir, halves[1].finetuned_dir, modules,
                                      settings.max_rank, allow_pickle=allow_pickle)
    config, _ = assemble_rank_config(pair, modules, results, settings, layout.config_path, alpha_policy=alpha_policy,
                                     extra_metadata=extra, split_half=split_half)
    unchanged = config.analysis_metadata.zero_delta_modules
    if unchanged:
        warnings.warn(zero_delta_message(unchanged, settings.min_rank), stacklevel=2)
    return config


def curvature_record(settings: CurvatureSettings, result: CurvatureResult | None, data: str | Path | None) -> dict:
    """What the config records about the curvature behind its spectra."""
    record = {"settings": settings.to_dict()}
    if result is not None:
        record.update({"calibration_data": str(data), "records": result.records, "tokens": result.tokens,
                       "response_tokens": result.response_tokens, "folder": str(Path(next(iter(result.paths.values()))).parent),
                       "silent_modules": result.silent_modules})
    return record


def zero_delta_message(names: Sequence[str], min_rank: int) -> str:
    """The one-line warning for modules whose weights did not change."""
    return (f"{len(names)} module(s) did not change during fine-tuning (zero delta), e.g. {names[0]!r}; "
            f"they get min_rank={min_rank}")
