"""Output folders that never take anything of the user's.

Every command writes under one output folder (``--out``). Before anything is written, ``check_output_dir``
refuses, in one line, an output that:

* is a file, or lies under a file, or under a folder that cannot be written;
* is, contains, or lies inside one of the command's inputs (a model, a rank config, a dataset, an adapter);
* is a non-empty folder that this tool did not write, unless ``overwrite`` is given.

A folder "this tool wrote" carries the marker file ``.lora-ranks`` (``claim_output_dir`` leaves it; so does every
folder ``_io.atomic_folder`` writes), or lies inside a folder that does, or has a layout that releases before the
marker wrote (``_SIGNATURES``). With ``overwrite`` a foreign folder is written into (a run folder) or replaced
whole (an adapter or model folder), but an input of the same command is never touched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import LoraRanksError

__all__ = ["OutputFolderError", "MARKER", "check_output_dir", "claim_output_dir", "is_tool_output", "check_replaceable",
           "local_path"]

#: The marker file every output folder of this tool carries (JSON: which command wrote it).
MARKER = ".lora-ranks"
#: Paths, relative to a folder, by which outputs of releases before the marker (<= 0.2.0) are recognized.
_SIGNATURES = ("configs/lora_rank_config.json", "saved_models/preliminary_finetune", "analysis_outputs/svd",
               "analysis/configs/lora_rank_config.json", "lora_ranks_adapter.json", "adapter/lora_ranks_adapter.json",
               "extraction_report.json", "export_report.json", "check_report.json")


class OutputFolderError(LoraRanksError):
    """An output path that would overwrite or take something of the user's (named in the message)."""


def local_path(value: str | os.PathLike | None) -> Path | None:
    """``value`` as an absolute path when it names something on this machine; None for hub ids and the demo's
    built-in names (nothing local to protect)."""
    if value is None or str(value) == "" or str(value).startswith("demo:"):
        return None
    path = Path(value).expanduser()
    return path.resolve() if path.exists() else None


def is_tool_output(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder this tool wrote: it or a folder above it carries the marker, or it has the
    layout of an earlier release's output."""
    folder = Path(path).resolve()
    if any((p / MARKER).is_file() for p in (folder, *folder.parents)):
        return True
    return any((folder / s).exists() for s in _SIGNATURES)


def _overlap(out: Path, inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> str | None:
    """How ``out`` collides with an input, as a sentence; None when it does not."""
    for name, value in inputs:
        given = local_path(value)
        if given is None:
            continue
        if out == given:
            return f"is {name} ({given}), an input of this command"
        if given.is_relative_to(out):
            return f"contains {name} ({given}), an input of this command"
        if out.is_relative_to(given):
            return f"lies inside {name} ({given}), an input of this command"
    return None


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor)


def check_output_dir(path: str | os.PathLike, *, inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
                     overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse an output folder that would take anything of the user's (module docstring); returns it resolved.

    Args:
        path: the output folder.
        inputs: ``(flag, path)`` of each input of the command (hub ids and unset ones are skipped).
        overwrite: write into (or replace) a non-empty folder this tool did not write.
        flag: how the output is named in messages.

    Raises:
        OutputFolderError: naming the output, what is wrong, and the way to proceed.
    """
    out = Path(path).expanduser().resolve()
    collision = _overlap(out, inputs)
    if collision:
        raise OutputFolderError(f"{flag} {out} {collision}: choose another output folder")
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{flag} {out} is a file, not a folder: choose a folder (new or empty) for the outputs")
    existing = _nearest_existing(out)
    if not existing.is_dir():
        raise OutputFolderError(f"{flag} {out} lies under {existing}, which is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(f"{flag} {out} cannot be written: no write permission on {existing}")
    if out.is_dir() and not overwrite and not is_tool_output(out):
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise OutputFolderError(f"{flag} {out} is a folder this tool did not write, holding {len(entries)} "
                                    f"entr{'y' if len(entries) == 1 else 'ies'} ({shown}): choose a new or empty "
                                    "folder, or pass --overwrite to write there anyway")
    return out


def claim_output_dir(path: str | os.PathLike, made_by: str, *,
                     inputs: Iterable[tuple[str, str | os.PathLike | None]] = (), overwrite: bool = False) -> Path:
    """``check_output_dir``, then create the folder and leave the marker that makes it this tool's (later runs,
    resumes and reruns into it need no ``overwrite``). Returns the folder."""
    from ._io import atomic_write_text

    out = check_output_dir(path, inputs=inputs, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        atomic_write_text(out / MARKER, json.dumps({"made_by": made_by}) + "\n")
    return out


def check_replaceable(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse to replace ``path`` whole unless it is absent, an empty folder, or a folder this tool wrote (or
    ``overwrite``); a file is never replaced by a folder. What ``_io.atomic_folder`` checks before it swaps."""
    target = Path(path)
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise OutputFolderError(f"{target.resolve()} is a file, not a folder: it is not replaced by an output folder")
    if overwrite or is_tool_output(target) or not any(target.iterdir()):
        return
    raise OutputFolderError(f"{target.resolve()} is a folder this tool did not write: choose a new or empty folder, "
                            "or pass --overwrite to replace it")
