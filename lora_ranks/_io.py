"""Atomic file writes and small I/O helpers.

Every output of the tool goes through these functions so that an interrupted run leaves either the
previous file or the complete new one, never a truncated file that looks valid: the bytes go to a
temporary file in the same folder, are flushed to disk, then renamed over the target (`os.replace`
is atomic on POSIX and Windows when source and target share a file system).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json"]


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
