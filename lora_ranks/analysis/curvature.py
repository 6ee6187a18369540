"""Curvature factors for the analysis: collected once from the fine-tuned model, stored one file per layer.

``collect_layer_curvature`` loads the fine-tuned model and the calibration records (the fine-tuning subset:
the same stratified sample the fine-tune trained on, by the same settings), runs ``lora_ranks.kfac`` and
writes ``<svd_dir>/curvature/<layer>.safetensors``: float64 ``input:<key>`` tensors (A, once per distinct input)
and ``output:<module>`` tensors (G), with per-module facts in the metadata. ``analyze_layer`` reads its layer's
file back with ``load_curvature_file``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from ..checkpoints import CheckpointPair, ModuleRef
from ..data import DataError
from ..errors import LoraRanksError
from ..finetune import prepare_examples
from ..kfac import CalibrationError, CurvatureFactors, automatic_factor_memory, calibration_tokens, collect_curvature
from ..loading import load_image_processor, load_model
from ..settings import CurvatureSettings, FinetuneSettings
from ..spectra import Spectrum, SpectrumKind
from ..spectra.projected import ModuleCurvature, ProjectedCurvature, module_weighted_spectrum
from ..spectra.weighted import FactorRoot, factor_root
from .layout import layer_file, write_digested_layer_file

if TYPE_CHECKING:
    from ..config import RankConfig

__all__ = ["CurvatureResult", "collect_layer_curvature", "load_curvature_file", "calibration_examples",
           "curvature_roots", "config_curvature_roots", "dense_roots", "input_weighted_spectra", "CURVATURE_FOLDER"]

CURVATURE_FOLDER = "curvature"


@dataclass
class CurvatureResult:
    """Where each layer's factors are, and a digest of each file's content (small, picklable)."""

    kind: str
    paths: dict[str, str] = field(default_factory=dict)  # layer -> path
    digests: dict[str, str] = field(default_factory=dict)  # layer -> sha256 of the file
    tokens: int = 0
    response_tokens: int = 0
    records: int = 0
    silent_modules: list[str] = field(default_factory=list)  # modules the calibration never ran through
    seconds: float = 0.0  # the whole collection: model load, records, passes, files
    passes: int = 0  # passes over the calibration records
    accumulation_seconds: float = 0.0  # in the hooks: the factors' products and sums (the rest is the model)
    load_seconds: float = 0.0  # loading the model and tokenizing the calibration records
    factor_memory_gb: float = 0.0  # the factor memory the passes were planned for (the setting or its automatic value)


def calibration_examples(data_path: str | Path, tokenizer, subset: FinetuneSettings, curvature: CurvatureSettings,
                         image_processor=None) -> list[dict]:
    """The calibration records: the fine-tune's stratified subset of ``data_path`` (at most
    ``curvature.calibration_records`` of it, still stratified), tokenized.

    Raises:
        CalibrationError: the file is missing or empty, or the subset has fewer than ``min_tokens`` tokens (the
            message names the file and the counts).
    """

    min_tokens = curvature.min_calibration_tokens
    cap = min(subset.max_samples, curvature.calibration_records or subset.max_samples)
    try:
        examples, _, n_records = prepare_examples(
            data_path, tokenizer, max_length=subset.max_length, seed=subset.seed, subset_ratio=subset.subset_ratio,
            max_samples=cap, task_key=subset.task_key, image_processor=image_processor)
    except DataError as exc:
        raise CalibrationError(f"calibration data: {exc}") from None
    tokens, response = calibration_tokens(examples)
    if tokens < min_tokens:
        raise CalibrationError(
            f"calibration data {data_path}: the subset of {len(examples)} of {n_records} records has {tokens} tokens "
            f"({response} trained on), fewer than the {min_tokens} needed (min_calibration_tokens); give more "
            "records, a larger subset_ratio or more calibration_records")
    return examples


def collect_layer_curvature(
    finetuned: str | Path,
    data_path: str | Path,
    modules: Sequence[ModuleRef],
    svd_dir: str | Path,
    settings: CurvatureSettings,
    subset: FinetuneSettings = FinetuneSettings(),
    *,
    base: str | Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device: str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> CurvatureResult:
    """Collect the factors of every module (``settings.spectrum`` "input" or "fisher") and write one file per layer.

    Memory is bounded by ``settings.factor_memory_gb``, or when it is empty by half the memory available once the
    model is loaded (``kfac.automatic_factor_memory``; see ``lora_ranks.kfac``); each layer's file is written as
    soon as its pass ends. Factors wider than ``settings.dense_factor_limit`` are kept projected through the weight
    delta, which is read from ``base`` (the pretrained checkpoint) and ``finetuned``; without ``base`` every
    factor is formed.
    """

    if settings.spectrum is SpectrumKind.WEIGHT:
        raise ValueError("the weight spectrum needs no curvature factors")
    started = time.perf_counter()
    model, tokenizer = load_model(finetuned, dtype=torch.float32, trust_remote_code=trust_remote_code)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    examples = calibration_examples(data_path, tokenizer, subset, settings, load_image_processor(finetuned))
    loaded = time.perf_counter() - started
    tokens, response = calibration_tokens(examples)
    result = CurvatureResult(settings.spectrum, tokens=tokens, response_tokens=response, records=len(examples))
    pair = CheckpointPair(base, finetuned, allow_pickle=allow_pickle) if base is not None else None
    stats: dict = {}
    memory_bytes = (int(settings.factor_memory_gb * 2**30) if settings.factor_memory_gb is not None
                    else automatic_factor_memory(dev))  # measured with the model loaded
    result.factor_memory_gb = memory_bytes / 2**30

    def delta_of(module: ModuleRef) -> torch.Tensor:
        try:
            return pair.delta(module, dtype=torch.float32)
        finally:
            pair.close()

    try:
        for layer, factors in collect_curvature(
                model, examples, tokenizer.pad_token_id, modules, kind=settings.spectrum,
                samples=settings.fisher_samples, seed=subset.seed, batch_size=settings.calibration_batch_size,
                memory_bytes=memory_bytes, on_batch=on_batch,
                dense_limit=settings.dense_factor_limit if pair is not None else None,
                delta_of=delta_of if pair is not None else None, stats=stats):
            path = layer_file(svd_dir, layer, CURVATURE_FOLDER)
            result.digests[layer] = _write(path, layer, factors, settings.spectrum)
            result.paths[layer] = str(path)
            result.silent_modules += [name for name, f in factors.items() if not f.fired]
    finally:
        if pair is not None:
            pair.close()
    result.passes, result.accumulation_seconds = stats["passes"], stats["accumulation_seconds"]
    result.seconds, result.load_seconds = time.perf_counter() - started, loaded
    return result


def _write(path: Path, layer: str, factors: dict[str, CurvatureFactors], kind: str) -> str:
    """Write one layer's factor file; returns the sha256 of its bytes."""
    tensors: dict[str, torch.Tensor] = {}
    info = {}
    for name, f in factors.items():
        if f.fired:
            if f.input_factor is not None:
                tensors.setdefault(f"input:{f.input_key}", f.input_factor.contiguous())
            if f.output_factor is not None:
                tensors[f"output:{name}"] = f.output_factor.contiguous()
            if f.projected is not None:
                tensors[f"projected:{name}"] = f.projected.contiguous()
        info[name] = {"input": f.input_key, "tokens": f.tokens, "response_tokens": f.response_tokens, "fired": f.fired}
        if f.projected_side is not None:
            info[name].update(projected=f.projected_side, far_trace=f.far_trace)
    if not tensors:  # safetensors needs one tensor; a layer whose modules all stayed silent
        tensors["empty"] = torch.zeros(1)
    return write_digested_layer_file(path, tensors, {"layer": layer, "kind": kind, "modules": json.dumps(info)})


def load_curvature_file(path: str | Path) -> dict[str, CurvatureFactors]:
    """Module name -> CurvatureFactors of one layer file (modules sharing an input share one A tensor)."""
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        info = json.loads(meta["modules"])
        keys = set(handle.keys())
        inputs = {key: handle.get_tensor(key) for key in keys if key.startswith("input:")}
        out = {}
        for name, m in info.items():
            if not m["fired"]:
                out[name] = CurvatureFactors(torch.zeros(0), None, m["tokens"], m["response_tokens"], "", fired=False)
                continue
            g = handle.get_tensor(f"output:{name}") if f"output:{name}" in keys else None
            projected = handle.get_tensor(f"projected:{name}") if f"projected:{name}" in keys else None
            out[name] = CurvatureFactors(inputs.get(f"input:{m['input']}"), g, m["tokens"], m["response_tokens"],
                                         m["input"], projected_side=m.get("projected"), projected=projected,
                                         far_trace=m.get("far_trace", 0.0))
    return out


def curvature_roots(modules: Sequence[ModuleRef], curvature_path: str | Path | None, damping: float, *,
                    input_only: bool = False, device: str | None = None
                    ) -> tuple[dict[str, ModuleCurvature], SpectrumKind]:
    """Each module's damped curvature from the layer's curvature file, and the spectrum kind: the roots (G^1/2 side,
    A^1/2 side), or a ``ProjectedCurvature`` where a wide factor was kept projected.

    One Cholesky factorization per distinct input factor (q/k/v share one; ``spectra.weighted.factor_root``).
    Memory: the roots of one layer, d x d float64 each. ``input_only``: the G side is the identity whatever the file
    holds (the input-weighted spectrum σ(ΔW A^1/2) from a Fisher analysis' factors); the kind is then input.
    ``device``: a CUDA device factors them and keeps the roots there (``factor_root``); else the CPU.
    """
    if curvature_path is None:
        return {}, SpectrumKind.WEIGHT
    factors = load_curvature_file(curvature_path)
    has_output = any(f.output_factor is not None or f.projected_side == "input" for f in factors.values())
    kind = SpectrumKind.FISHER if has_output and not input_only else SpectrumKind.INPUT
    on = device if device is not None and torch.device(device).type == "cuda" else None
    input_roots: dict[str, FactorRoot] = {}
    roots: dict[str, ModuleCurvature] = {}
    for m in modules:
        f = factors.get(m.name)
        if f is None or not f.fired:
            continue
        d_out, d_in = m.shape
        if f.projected_side == "output":  # A is wide: near G (identity for the input-only spectrum), far ΔW A ΔWᵀ
            near = factor_root(None if input_only else f.output_factor, d_out, damping, on)
            roots[m.name] = ProjectedCurvature("output", near, f.projected, damping * f.far_trace / d_in)
            continue
        if f.input_key not in input_roots:
            input_roots[f.input_key] = factor_root(f.input_factor, d_in, damping, on)
        if f.projected_side == "input" and not input_only:  # G is wide: near A, far ΔWᵀ G ΔW
            roots[m.name] = ProjectedCurvature("input", input_roots[f.input_key], f.projected,
                                               damping * f.far_trace / d_out)
            continue
        output_factor = None if input_only else f.output_factor
        roots[m.name] = (factor_root(output_factor, d_out, damping, on), input_roots[f.input_key])
    return roots, kind


def dense_roots(roots: dict[str, ModuleCurvature], what: str) -> dict[str, tuple[FactorRoot, FactorRoot]]:
    """``roots`` when every module has formed factors; else one clear error naming a projected module and ``what``
    needed formed ones."""
    projected = [name for name, c in roots.items() if isinstance(c, ProjectedCurvature)]
    if projected:
        raise LoraRanksError(f"{what} needs formed curvature factors, but {projected[0]} (and {len(projected) - 1} "
                             "more) has a factor wider than dense_factor_limit, kept projected; raise "
                             "dense_factor_limit above its width to form it")
    return roots


def config_curvature_roots(rank_config: RankConfig, modules: Sequence[ModuleRef], *, input_only: bool = False
                           ) -> dict[str, ModuleCurvature] | None:
    """Module name -> damped curvature (``curvature_roots``) from the curvature factors a rank config's analysis recorded (its
    ``analysis_metadata.curvature``: folder and damping), or None when the config was made from the weight
    spectrum or its factor folder is gone. Modules whose layer has no factor file are left out (they fall back to
    the weight spectrum). Memory: the roots of every module at once (for small models and extraction, which
    holds one module's delta at a time beside them)."""
    record = rank_config.analysis_metadata.curvature
    if record is None or not record.has_factors or not Path(record.folder).is_dir():
        return None
    folder, damping = record.folder, record.settings.curvature_damping
    roots = {}
    for layer in dict.fromkeys(m.layer for m in modules):
        path = layer_file(Path(folder).parent, layer, Path(folder).name)
        if path.is_file():
            roots.update(curvature_roots([m for m in modules if m.layer == layer], path, damping,
                                         input_only=input_only)[0])
    return roots


def input_weighted_spectra(config: RankConfig, modules: Sequence[ModuleRef], fallback: dict[str, Spectrum]
                           ) -> dict[str, Spectrum]:
    """σ(ΔW A^1/2) of every module, from the input factors A a Fisher analysis recorded (its G factors unused);
    modules without factors keep their ``fallback`` spectrum. One module's delta in memory at a time."""
    top_k = config.allocation_settings.required_top_k
    roots = config_curvature_roots(config, modules, input_only=True) or {}
    pair = CheckpointPair(config.checkpoints.pretrained.path, config.checkpoints.finetuned.path)
    out = {}
    for m in modules:
        if m.name not in roots:
            out[m.name] = fallback[m.name]
            continue
        out[m.name] = module_weighted_spectrum(pair.delta(m, torch.float64), top_k, roots[m.name])
        pair.close()
    return out
