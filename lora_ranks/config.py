"""Stage 4: the rank config, ``lora_rank_config.json``: the contract between analysis and model building.

Shape (schema version 1)::

    {
      "schema_version": 1,
      "layer_ranks": {"q_proj": 32, ...},          # per module type: median final rank (design overview)
      "target_modules": ["model.layers.0.self_attn.q_proj", ...],   # full names on the loaded model
      "rank_pattern": {"^model\\.layers\\.0\\.self_attn\\.q_proj": 8, ...},
      "alpha_pattern": {"^model\\.layers\\.0\\.self_attn\\.q_proj": 16, ...},
      "lora_alpha": 16, "use_rslora": false, "alpha_policy": {"policy": "constant", "scale": 2.0},
      "compression_ratio": 0.0123,                  # LoRA trainable parameters / base parameters
      "trainable_parameters": 123456, "base_parameters": 10000000,
      "analysis_metadata": {...}                    # per-module decisions, settings, accuracy, identities
    }

PEFT matches a ``rank_pattern`` key ``K`` against a module name with ``re.match(rf"(.*\\.)?({K})$", name)``
and takes the first key that matches. Our keys are ``^`` + the escaped full module name, so each matches
exactly one module and the order cannot matter.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write_json, strict_json_loads
from ._version import __version__
from .errors import LoraRanksError, list_problems, summarize_problems
from .ranks import ModuleAllocation, lora_parameters
from .settings import AllocationSettings, AlphaPolicy

__all__ = [
    "SCHEMA_VERSION",
    "AlphaPolicy",
    "RankConfigError",
    "anchored_key",
    "build_rank_config",
    "save_rank_config",
    "load_rank_config",
    "validate_rank_config",
    "check_config_matches_model",
    "modules_from_config",
    "allocation_settings_of",
]

SCHEMA_VERSION = 1


class RankConfigError(LoraRanksError):
    """A rank config file is missing, unreadable, or does not follow the schema."""


def anchored_key(module_name: str) -> str:
    """The ``rank_pattern`` key that PEFT matches to ``module_name`` and nothing else."""
    return "^" + re.escape(module_name)


def build_rank_config(
    allocations: Sequence[ModuleAllocation],
    settings: AllocationSettings,
    *,
    base_parameters: int,
    alpha_policy: AlphaPolicy = AlphaPolicy(),
    spectra_info: Mapping[str, Mapping[str, Any]] | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> dict:
    """Assemble the config dict (validated) from rank decisions.

    Args:
        allocations: one per module (from ``allocate_ranks``).
        settings: the allocation settings used (recorded).
        base_parameters: parameter count of the base model, the denominator of ``compression_ratio``.
        alpha_policy: scaling policy (recorded; sets ``alpha_pattern``/``lora_alpha``/``use_rslora``).
        spectra_info: per module name, method/accuracy/timing facts to record next to its decision.
        extra_metadata: merged into ``analysis_metadata`` (checkpoint identities, timings, versions).
    """
    if not allocations:
        raise RankConfigError("no modules to write: the allocation is empty")
    if base_parameters <= 0:
        raise RankConfigError(f"base_parameters must be positive, got {base_parameters}")
    by_type: dict[str, list[int]] = {}
    for a in allocations:
        by_type.setdefault(a.module_type, []).append(a.final_rank)
    layer_ranks = {t: int(np.median(r)) for t, r in by_type.items()}
    trainable = sum(lora_parameters(a.shape, a.final_rank) for a in allocations)
    rank_pattern = {anchored_key(a.name): a.final_rank for a in allocations}
    alpha_pattern = {anchored_key(a.name): alpha_policy.alpha(a.final_rank) for a in allocations}
    modules_meta = {}
    for a in allocations:
        entry = a.to_dict()
        entry.pop("name")
        if spectra_info and a.name in spectra_info:
            entry.update(spectra_info[a.name])
        modules_meta[a.name] = entry
    metadata: dict[str, Any] = {
        "tool_version": __version__,
        "settings": settings.to_dict(),
        "mode": {"energy": "energy_threshold", "signal": "signal", "budget": "budget"}[settings.rank_rule],
        "n_modules": len(allocations),
        "n_saturated": sum(a.saturated for a in allocations),
        "saturated_modules": [a.name for a in allocations if a.saturated],
        "zero_delta_modules": [a.name for a in allocations if a.zero_delta],
        "fallback_modules": {a.name: a.fallback for a in allocations if a.fallback},
        "modules": modules_meta,
    }
    if extra_metadata:
        metadata.update(extra_metadata)
    config = {
        "schema_version": SCHEMA_VERSION,
        "layer_ranks": layer_ranks,
        "target_modules": [a.name for a in allocations],
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_alpha": alpha_policy.alpha(layer_ranks[allocations[0].module_type]),
        "use_rslora": alpha_policy.policy == "rslora",
        "alpha_policy": alpha_policy.to_dict(),
        "compression_ratio": trainable / base_parameters,
        "trainable_parameters": trainable,
        "base_parameters": base_parameters,
        "analysis_metadata": metadata,
    }
    validate_rank_config(config)
    return config


def save_rank_config(path: str | Path, config: Mapping[str, Any]) -> Path:
    """Validate ``config`` and write it atomically to ``path``."""
    validate_rank_config(config, source=str(path))
    return atomic_write_json(path, config)


def load_rank_config(path: str | Path) -> dict:
    """Read and validate a rank config file.

    Raises:
        RankConfigError: naming the file and the first problem found.
    """
    path = Path(path)
    if path.is_dir():
        inside = next((p for p in (path / "lora_rank_config.json", path / "configs" / "lora_rank_config.json")
                       if p.is_file()), None)
        raise RankConfigError(f"rank config {path} is a folder; give the rank config file"
                              + (f": {inside}" if inside else " (lora_rank_config.json)"))
    if not path.is_file():
        raise RankConfigError(f"rank config {path} does not exist")
    try:
        config = strict_json_loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise RankConfigError(f"rank config {path} is not valid JSON: {exc}") from None
    validate_rank_config(config, source=str(path))
    return config


def validate_rank_config(config: Any, source: str = "rank config") -> None:
    """Check ``config`` against schema version 1; raise RankConfigError naming the first problem."""

    def fail(msg: str) -> None:
        raise RankConfigError(f"{source}: {msg}")

    if not isinstance(config, dict):
        fail(f"top level must be a JSON object, got {type(config).__name__}")
    version = config.get("schema_version")
    if version is None and ("peft_type" in config or "made_by" in config):
        fail("is a PEFT adapter's file, not a rank config: give the lora_rank_config.json an analysis wrote (an "
             "adapter folder holds a copy of it)")
    if version != SCHEMA_VERSION:
        fail(f"schema_version must be {SCHEMA_VERSION}, got {version!r}")
    for key, kind in (("layer_ranks", dict), ("target_modules", list), ("rank_pattern", dict),
                      ("alpha_pattern", dict), ("analysis_metadata", dict), ("compression_ratio", (int, float))):
        if key not in config:
            fail(f"missing required key {key!r}")
        if not isinstance(config[key], kind):
            fail(f"{key!r} must be a {kind.__name__ if isinstance(kind, type) else 'number'}, got {type(config[key]).__name__}")
    targets = config["target_modules"]
    if not targets or not all(isinstance(t, str) and t for t in targets):
        fail("'target_modules' must be a non-empty list of module names")
    if len(set(targets)) != len(targets):
        fail("'target_modules' lists a module twice")
    for section in ("rank_pattern", "alpha_pattern", "layer_ranks"):
        for key, value in config[section].items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or not math.isfinite(value):
                fail(f"{section}[{key!r}] must be a positive number, got {value!r}")
            if section == "rank_pattern" and not isinstance(value, int):
                fail(f"rank_pattern[{key!r}] must be an integer rank, got {value!r}")
    expected = {anchored_key(t) for t in targets}
    for section in ("rank_pattern", "alpha_pattern"):
        keys = set(config[section])
        extra, missing = keys - expected, expected - keys
        if extra:
            fail(f"{section} has key {sorted(extra)[0]!r} that is not an anchored target module name")
        if section == "rank_pattern" and missing:
            fail(f"rank_pattern has no rank for target module {sorted(missing)[0]!r}")
    if not (0 < config["compression_ratio"] < math.inf):
        fail(f"compression_ratio must be positive, got {config['compression_ratio']!r}")
    modules = config["analysis_metadata"].get("modules")
    if isinstance(modules, dict):
        for name, entry in modules.items():
            key = anchored_key(name)
            if key not in config["rank_pattern"]:
                fail(f"analysis_metadata.modules names {name!r}, which has no rank_pattern entry")
            if entry.get("final_rank") != config["rank_pattern"][key]:
                fail(f"module {name!r}: final_rank {entry.get('final_rank')!r} disagrees with rank_pattern "
                     f"{config['rank_pattern'][key]!r}")


def check_config_matches_model(config: Mapping[str, Any], model: Any) -> None:
    """Check that every module the config names exists in ``model`` as a linear layer of the recorded shape.

    Args:
        config: a validated rank config.
        model: a ``torch.nn.Module`` (e.g. the loaded base model), or a model folder, which is built on the
            meta device for the check (no weights read).

    Raises:
        RankConfigError: listing every module that is missing, not linear, or of another shape.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        from .checkpoints import build_meta_model

        model = build_meta_model(model)
    modules = dict(model.named_modules())
    recorded = config.get("analysis_metadata", {}).get("modules", {})
    problems: list[tuple[str, str]] = []
    for name in config["target_modules"]:
        module = modules.get(name)
        if module is None:
            problems.append(("missing", f"{name}: no such module in the model"))
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) and not (weight is not None and weight.ndim == 2):
            problems.append(("not linear", f"{name}: is a {type(module).__name__}, not a linear layer"))
            continue
        shape = recorded.get(name, {}).get("shape")
        # Quantized layers store packed weights: their logical shape is (out_features, in_features).
        actual = (module.out_features, module.in_features) if hasattr(module, "out_features") else tuple(weight.shape)
        if shape is not None and list(actual) != list(shape):
            problems.append(("of another shape",
                             f"{name}: weight shape {tuple(actual)} but the config was made for {tuple(shape)}"))
    if problems:
        raise RankConfigError(mismatch_message(config, "model", problems))


def mismatch_message(config: Mapping[str, Any], against: str, problems: list[tuple[str, str]]) -> str:
    """The one line for a rank config that does not fit a model or checkpoints: every problem when a few modules do
    not fit; a summary by kind, and the likely cause, when none does (a config made for another model)."""
    total = len(config["target_modules"])
    if len(problems) < total:
        return list_problems(f"rank config does not fit the {against}", [text for _, text in problems])
    made_from = config.get("analysis_metadata", {}).get("checkpoints", {}).get("pretrained", {}).get("path")
    return summarize_problems(f"rank config does not fit the {against}: none of its {total} modules does", problems) \
        + "; was it made for another model" + (f" (it was analyzed from {made_from})?" if made_from else "?")


def modules_from_config(config: Mapping[str, Any]):
    """The config's target modules as ``ModuleRef``s (names, on-disk tensor names, shapes, layers) from its
    metadata, so later stages read weights without building a model. Returns None for configs whose
    metadata lacks ``weight_key`` (written before it was recorded)."""
    from .checkpoints import ModuleRef

    meta = config.get("analysis_metadata", {}).get("modules", {})
    if not all(meta.get(n, {}).get("weight_key") for n in config["target_modules"]):
        return None
    return [ModuleRef(n, meta[n]["weight_key"], tuple(meta[n]["shape"]), meta[n].get("layer", ""),
                      meta[n].get("depth", 0), meta[n].get("module_type", "")) for n in config["target_modules"]]


def allocation_settings_of(config: Mapping[str, Any]) -> AllocationSettings:
    """The allocation settings a config was made with, from its metadata (older configs' separate
    ``budget_parameters`` / ``budget_fraction`` map onto ``budget``)."""
    recorded = dict(config.get("analysis_metadata", {}).get("settings", {}))
    for old in ("budget_parameters", "budget_fraction"):
        value = recorded.pop(old, None)
        if value is not None:
            recorded["budget"] = float(value)
    return AllocationSettings(**{k: v for k, v in recorded.items() if k in AllocationSettings.model_fields})
