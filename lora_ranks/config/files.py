"""The rank config as a file: written and read (validated both ways), schema-1 files migrated, and a config checked
against the model it will be applied to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_json, strict_json_loads
from ..adapter_files import RANK_CONFIG
from ..analysis.layout import OutputLayout
from ..checkpoints import build_meta_model
from ..errors import list_problems, summarize_problems
from .rank_config import RankConfig, parse_rank_config
from .records import RankConfigError

__all__ = ["save_rank_config", "load_rank_config", "check_config_matches_model", "mismatch_message"]


def save_rank_config(path: str | Path, config: RankConfig) -> Path:
    """Write ``config`` atomically to ``path`` (a failed write leaves the previous file as it was)."""
    if not isinstance(config, RankConfig):
        raise TypeError(f"save_rank_config takes a RankConfig, got {type(config).__name__}")
    return atomic_write_json(path, config.to_dict())


def load_rank_config(path: str | Path) -> RankConfig:
    """Read, migrate (schema 1) and validate a rank config file.

    Raises:
        RankConfigError: naming the file and the first problem found.
    """
    path = Path(path)
    if path.is_dir():
        inside = next((p for p in (path / RANK_CONFIG, OutputLayout(path).config_path) if p.is_file()), None)
        raise RankConfigError(f"rank config {path} is a folder; give the rank config file"
                              + (f": {inside}" if inside else " (lora_rank_config.json)"))
    if path.exists() and not path.is_file():
        raise RankConfigError(f"rank config {path} is not a regular file (a pipe, device or socket); give the rank "
                              "config file (lora_rank_config.json)")
    if not path.is_file():
        raise RankConfigError(f"rank config {path} does not exist")
    try:
        data = strict_json_loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise RankConfigError(f"rank config {path} is not valid JSON: {exc}") from None
    return parse_rank_config(data, source=str(path))


def check_config_matches_model(config: RankConfig, model: Any) -> None:
    """Check that every module the config names exists in ``model`` as a linear layer of the recorded shape.

    Args:
        config: a rank config.
        model: a ``torch.nn.Module`` (e.g. the loaded base model), or a model folder, which is built on the
            meta device for the check (no weights read).

    Raises:
        RankConfigError: listing every module that is missing, not linear, or of another shape.
    """
    if not isinstance(model, torch.nn.Module):
        model = build_meta_model(model)
    modules = dict(model.named_modules())
    problems: list[tuple[str, str]] = []
    for name, record in config.modules.items():
        module = modules.get(name)
        if module is None:
            problems.append(("missing", f"{name}: no such module in the model"))
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) and not (weight is not None and weight.ndim == 2):
            problems.append(("not linear", f"{name}: is a {type(module).__name__}, not a linear layer"))
            continue
        # Quantized layers store packed weights: their logical shape is (out_features, in_features).
        actual = (module.out_features, module.in_features) if hasattr(module, "out_features") else tuple(weight.shape)
        if tuple(actual) != tuple(record.shape):
            problems.append(("of another shape",
                             f"{name}: weight shape {tuple(actual)} but the config was made for {tuple(record.shape)}"))
    if problems:
        raise RankConfigError(mismatch_message(config, "model", problems))


def mismatch_message(config: RankConfig, against: str, problems: list[tuple[str, str]]) -> str:
    """The one line for a rank config that does not fit a model or checkpoints: every problem when a few modules do
    not fit; a summary by kind, and the likely cause, when none does (a config made for another model)."""
    total = len(config.target_modules)
    if len(problems) < total:
        return list_problems(f"rank config does not fit the {against}", [text for _, text in problems])
    made_from = config.checkpoints.pretrained.path if config.checkpoints else None
    return summarize_problems(f"rank config does not fit the {against}: none of its {total} modules does", problems) \
        + "; was it made for another model" + (f" (it was analyzed from {made_from})?" if made_from else "?")
