"""Atomic file and folder writes.

Every output of the tool goes through these functions so that an interrupted run leaves either the previous
file or the complete new one, never a truncated file that looks valid: the bytes go to a temporary file in the
same folder, are flushed to disk, then renamed over the target (``os.replace`` is atomic on POSIX and Windows
when source and target share a file system).

Folders (checkpoints, adapters) cannot be renamed over a non-empty folder, so ``atomic_folder`` writes the new
folder beside the target, moves the old one aside, moves the new one in, then deletes the old one. A crash
between the two moves leaves both complete folders beside the target name; ``recover_folder`` (run before the
next write, and when a missing model folder is opened) finishes the swap.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)  # read once (setting it is process-wide): new files get the usual 0o666 & ~umask
os.umask(_UMASK)

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_folder",
           "recover_folder", "strict_json_loads"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then atomically move it to ``path``.

    ``write`` receives the path of a fresh temporary file in the target's folder (so the final rename
    never crosses file systems). On any exception the temporary file is removed and the target is
    left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0o600, and a writer that replaces the file (safetensors' save_file) may keep that: outputs
        # are shared like any other file.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as handle:  # flush the data before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    return atomic_write(path, _write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-order-preserving JSON to ``path`` atomically.

    NaN and infinity are refused (``allow_nan=False``): they are not JSON and other tools choke on them.
    """
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def strict_json_loads(text: str) -> Any:
    """``json.loads`` that refuses NaN and Infinity (Python's json accepts them; JSON, and other tools, do not).

    Raises:
        ValueError (``json.JSONDecodeError`` for malformed text): naming the problem.
    """
    return json.loads(text, parse_constant=_no_constant)


def _staging(target: Path) -> Path:
    return target.with_name(f".{target.name}.new")


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_folder(path: str | os.PathLike) -> None:
    """Finish or clean up an ``atomic_folder`` swap that a crash interrupted; a no-op when there is none.

    * old folder aside and no target: the crash came between the two moves, after the new folder was complete,
      so the new folder is moved in (or, if it is gone, the old one back);
    * old folder aside and the target in place: the crash came before the old folder was deleted: delete it;
    * a new folder that never moved in: its write did not finish (or was superseded): delete it.
    """
    target = Path(path)
    staging, aside = _staging(target), _aside(target)
    if aside.exists():
        if not target.exists():
            os.rename(staging if staging.exists() else aside, target)
        shutil.rmtree(aside, ignore_errors=True)
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False, content: str = "folder") -> Iterator[Path]:
    """Write a folder that replaces ``path`` only once complete.

    Yields a fresh staging folder beside ``path`` to write into. When the block ends without an exception, the old
    folder (if any) is renamed aside, the staging folder renamed to ``path``, and the old one deleted; at every
    instant the complete old or the complete new folder exists (see ``recover_folder``). If the block raises,
    the staging folder is deleted and ``path`` is untouched.

    Only what this tool wrote is replaced (``outputs.check_replaceable``, checked before the block runs): a file or a
    link at ``path`` is refused, and so is a non-empty folder without the tool's marker, or holding files the
    marker does not list, unless ``overwrite``. The new folder carries the marker (``outputs.MARKER``, listing its
    files and ``content``, what it holds: "adapter", "model"), so a later write of the same content may replace it.

    Raises:
        OutputFolderError: ``path`` is a file, or a folder of the user's (without ``overwrite``).
    """
    from .outputs import MARKER, check_replaceable, folder_marker

    target = Path(os.path.abspath(path))
    check_replaceable(target, overwrite, content)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target)
    staging, aside = _staging(target), _aside(target)
    staging.mkdir()
    try:
        yield staging
        atomic_write_text(staging / MARKER, folder_marker(staging, content))  # what it holds: a later swap checks for additions
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        os.rename(target, aside)  # step 1: the old folder aside
    os.rename(staging, target)  # step 2: the new folder in
    shutil.rmtree(aside, ignore_errors=True)  # step 3: the old folder gone
