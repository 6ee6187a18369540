"""Model folders and hub ids: where a model's files are on this machine."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download

from .._io import interrupted_copy
from ..errors import LoraRanksError

__all__ = ["CheckpointError", "resolve_model_path"]


class CheckpointError(LoraRanksError):
    """A checkpoint is missing, unreadable, unsafe, or does not pair with the other one."""


_HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")
# Files a model needs (config, weights, tokenizer, chat template); pickle weights are never fetched.
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def resolve_model_path(name_or_path: str | Path, *, revision: str | None = None) -> Path:
    """The local folder of a model given a folder path or a Hugging Face hub id.

    Hub ids are resolved with ``huggingface_hub.snapshot_download`` (only ``*.json``, ``*.safetensors``,
    tokenizer and template files are fetched); an existing cache is used first, so this works offline for models
    already downloaded.

    Raises:
        CheckpointError: the path is a file, does not exist and is no hub id, or the hub id cannot be resolved.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise CheckpointError(f"{str(name_or_path)!r} is a file; expected a model folder with config.json")
    if path.is_symlink():
        raise CheckpointError(f"model folder {str(name_or_path)!r} is a symbolic link to {os.readlink(path)}, which "
                              "does not exist (or is a loop of links)")
    copy = interrupted_copy(path)  # named, never moved: a missing input does not make the tool touch its neighbours
    if copy is not None:
        raise CheckpointError(f"model folder {str(name_or_path)!r} does not exist: a write of it was interrupted, and "
                              f"its complete new copy is {copy}; rerun the command that wrote it (it moves the copy "
                              "in), or rename that folder yourself")
    if not _HUB_ID.fullmatch(str(name_or_path)):
        raise CheckpointError(f"model folder {str(name_or_path)!r} does not exist (and is not a hub id like 'Qwen/Qwen3-8B')")

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=_ALLOW_PATTERNS,
                                      local_files_only=True))
    except Exception:  # not in the local cache yet: fall through to a download
        pass
    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=_ALLOW_PATTERNS))
    except Exception as exc:  # no hub here, or no such repo
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{str(name_or_path)!r} is no local folder (from {Path.cwd()}), and as a hub id it could "
                              f"not be resolved to a snapshot: {first}") from None
