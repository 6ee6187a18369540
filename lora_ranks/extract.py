"""LoRA extraction: the best rank-r adapter for each fine-tuning delta (truncated SVD), as a PEFT adapter.

For each module with rank r and LoRA scale s (alpha / r, or alpha / sqrt(r) with rsLoRA), the delta's truncated
SVD is split evenly between ``lora_B`` and ``lora_A`` so that s * B @ A = dW_r (``spectra.truncated_svd_factors``,
Eckart-Young: the best rank-r approximation). The relative reconstruction error ||dW - s B A||_F / ||dW||_F of
every module is written to ``extraction_report.json`` in the adapter folder. PEFT is not imported: the adapter
is plain safetensors + JSON, loaded by ``peft.PeftModel.from_pretrained`` like any other, and the folder is
replaced only once complete.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ._io import atomic_folder, atomic_write_json
from .adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXTRACTION_REPORT, PEFT_KEY_PREFIX, RANK_CONFIG
from .analysis.curvature import config_curvature_roots
from .checkpoints import CheckpointPair, ModuleRef, TargetSpec
from .config import RankConfig, RankConfigError, check_config_matches_model, load_rank_config, mismatch_message
from .model import DynamicLoRAConfig
from .outputs import check_output_dir
from .reports import ExtractionReport, ModuleExtraction
from .serving import note_serving
from .settings import ExtractionSettings
from .spectra import truncated_svd_factors
from .spectra.projected import module_truncation_factors

__all__ = ["extract_lora", "extract_inputs"]


def extract_inputs(base, finetuned, rank_config_path) -> list[tuple[str, Any]]:
    """The inputs of an extraction, as ``outputs.check_output_dir`` takes them (none may hold the output)."""
    return [("--base", base), ("--finetuned", finetuned), ("--config", rank_config_path)]


def _modules_to_extract(pair: CheckpointPair, rank_config: RankConfig) -> dict[str, ModuleRef]:
    """The config's modules with their on-disk tensor names, checked against both checkpoints' headers.

    Configs record each module's ``weight_key``, so no model needs to be built (no transformers import);
    older configs without it fall back to the name mapping of ``CheckpointPair.modules``.
    """
    refs = rank_config.module_refs()
    if refs is None:
        check_config_matches_model(rank_config, pair.base.root)
        targets = TargetSpec(target_regex="|".join(map(re.escape, rank_config.target_modules)), include_vision=True)
        return {m.name: m for m in pair.modules(targets)}
    problems: dict[str, tuple[str, str]] = {}  # one problem per module (the base's, else the fine-tuned one's)
    for ref in refs:
        for ckpt in (pair.base, pair.finetuned):
            if ref.name in problems:
                break
            if ref.weight_key not in ckpt:
                problems[ref.name] = ("missing", f"{ref.name}: tensor {ref.weight_key!r} is missing from {ckpt.root}")
            elif tuple(ckpt.shape(ref.weight_key)) != ref.shape:
                problems[ref.name] = ("of another shape", f"{ref.name}: tensor {ref.weight_key!r} has shape "
                                      f"{tuple(ckpt.shape(ref.weight_key))} in {ckpt.root}, the config was made for "
                                      f"{ref.shape}")
    if problems:
        raise RankConfigError(mismatch_message(rank_config, "checkpoints", list(problems.values())))
    return {ref.name: ref for ref in refs}


def _curvature_roots_of(rank_config: RankConfig, modules: list[ModuleRef], settings: ExtractionSettings):
    """Module name -> damped (G, A) roots for a curvature truncation, or None for the plain truncated SVD."""
    spectrum = rank_config.spectrum_kind
    curvature = rank_config.analysis_metadata.curvature
    folder = curvature.folder if curvature is not None else None
    if settings.truncation == "weight" or (settings.truncation == "auto" and not spectrum.weighted):
        return None
    roots = config_curvature_roots(rank_config, modules)
    if roots is None:
        raise RankConfigError(f"truncation={settings.truncation!r} needs the curvature factors of the analysis, but the "
                              f"rank config was made from the {spectrum} spectrum"
                              + (f" and its factor folder {folder} is gone" if folder else ""))
    return roots


def extract_lora(base: str | Path, finetuned: str | Path, rank_config_path: str | Path, out_dir: str | Path,
                 *, allow_pickle: bool = False, settings: ExtractionSettings = ExtractionSettings(),
                 overwrite: bool = False) -> ExtractionReport:
    """Write a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) whose every module is
    the best rank-r approximation of its delta at the configured rank; returns the extraction report.

    With ``settings.truncation`` "curvature" (or "auto" on a config made from an input or fisher spectrum), "best"
    is in the curvature-weighted norm the ranks were chosen by (``spectra.projected.module_truncation_factors``,
    with the analysis' factors and damping); modules without factors fall back to the plain truncated SVD and the
    report says so. ``relative_error`` is then the weighted one.

    ``out_dir`` is refused when it is, contains or lies inside an input, or is a folder of the user's (a non-empty
    folder this tool did not write) unless ``overwrite`` (``outputs.check_output_dir``).

    Raises:
        RankConfigError: listing every configured module whose tensor is missing from, or shaped differently
            in, either checkpoint; or "curvature" asked of a config that has no curvature factors.
        OutputFolderError: ``out_dir`` would take something of the user's.
    """

    start = time.perf_counter()
    check_output_dir(out_dir, inputs=extract_inputs(base, finetuned, rank_config_path), overwrite=overwrite,
                     folder_output=True)
    config = DynamicLoRAConfig(load_rank_config(rank_config_path), lora_dropout=0.0, source=str(rank_config_path))
    pair = CheckpointPair(base, finetuned, allow_pickle=allow_pickle)
    wanted = config.ranks
    modules = _modules_to_extract(pair, config.rank_config)
    use_rslora = config.rank_config.use_rslora
    roots = _curvature_roots_of(config.rank_config, list(modules.values()), settings)
    tensors: dict[str, torch.Tensor] = {}
    extracted: dict[str, ModuleExtraction] = {}
    for name, rank in wanted.items():
        alpha = config.rank_config.alpha_of(name)
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        delta = pair.delta(modules[name], dtype=torch.float64 if roots is not None else torch.float32)
        if roots is not None and name in roots:
            lora_a, lora_b, rel_error = module_truncation_factors(delta, rank, scale, roots[name])
            how = "curvature"
        else:
            lora_a, lora_b, rel_error = truncated_svd_factors(delta, rank, scale)
            how = "weight"
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = lora_a
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = lora_b
        extracted[name] = ModuleExtraction(rank=rank, scale=scale, relative_error=rel_error, truncation=how)
        pair.close()
    errors = [m.relative_error for m in extracted.values()]
    report = ExtractionReport(modules=extracted, truncation="curvature" if roots is not None else "weight",
                              base=str(pair.base.root), finetuned=str(pair.finetuned.root),
                              seconds=time.perf_counter() - start, mean_relative_error=sum(errors) / len(errors),
                              max_relative_error=max(errors))
    with atomic_folder(out_dir, overwrite=overwrite, content="adapter") as tmp:
        atomic_write_json(tmp / ADAPTER_CONFIG, config.adapter_config(str(pair.base.root)))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        atomic_write_json(tmp / RANK_CONFIG, config.rank_config.to_dict())
        problems = note_serving(tmp, {"made_by": "extract", "base": str(pair.base.root),
                                      "finetuned": str(pair.finetuned.root)}, out_dir)
        report = report.model_copy(update={"serving_problems": problems})
        atomic_write_json(tmp / EXTRACTION_REPORT, report.to_json())
    return report


