"""From every layer's spectra to one rank config.

``assemble_rank_config`` reads the layer files back, allocates ranks and writes the validated config (the last step
of an ``AnalysisPlan``; ``serial.analyze_checkpoints`` and the ``svd-analysis`` flow both end with it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..checkpoints import CheckpointPair, ModuleRef
from ..config import RankConfig, build_rank_config, save_rank_config
from ..ranks import allocate_ranks
from ..settings import AllocationSettings, AlphaPolicy
from ..spectra import Spectrum
from .layer import LayerResult
from .layout import load_module_records, load_spectra
from .split_half import SplitHalfModule

__all__ = ["assemble_rank_config", "zero_delta_message"]


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
    split_half: dict[str, SplitHalfModule] | None = None,
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
                                 kinds={n: r.spectrum for n, r in records.items()},
                                 fallbacks={n: r.fallback for n, r in records.items() if r.fallback},
                                 split_half={n: r.rank for n, r in split_half.items()} if split_half else None)
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
        metadata["split_half"] = {n: r.record for n, r in split_half.items()}
    if extra_metadata:
        metadata.update(extra_metadata)
    config = build_rank_config(allocations, settings, base_parameters=pair.base_parameters,
                               alpha_policy=alpha_policy, spectra_info=spectra_info, extra_metadata=metadata)
    save_rank_config(config_path, config)
    return config, spectra


def zero_delta_message(names: Sequence[str], min_rank: int) -> str:
    """The one-line warning for modules whose weights did not change."""
    return (f"{len(names)} module(s) did not change during fine-tuning (zero delta), e.g. {names[0]!r}; "
            f"they get min_rank={min_rank}")
