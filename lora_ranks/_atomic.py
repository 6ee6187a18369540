"""Atomic file writes, and the registry of what is in flight: the layer under ``_io`` with no knowledge of output
folders (``outputs`` writes its markers with it; ``_io.atomic_write`` adds the output folder's bookkeeping).

The bytes go to a temporary file in the target's folder (``.NAME.lora-ranks-<pid>-<random>.tmp``), are flushed to
disk, then renamed over the target (``os.replace`` is atomic on POSIX and Windows when source and target share a
file system). Temporary files and staging folders in flight are registered (``abandon_pending``): an interrupted
command removes them before it exits.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from .errors import as_disk_full

__all__ = ["replace_file", "abandon_pending", "register_pending", "UMASK"]

UMASK = os.umask(0)  # read once (setting it is process-wide): new files get the usual 0o666 & ~umask
os.umask(UMASK)

_PENDING: set[Path] = set()  # temporary files and staging folders being written (removed on an interrupt)
_PENDING_LOCK = threading.Lock()


def register_pending(path: Path, add: bool) -> None:
    with _PENDING_LOCK:
        (_PENDING.add if add else _PENDING.discard)(path)


def abandon_pending() -> list[Path]:
    """Remove every temporary file and staging folder still being written (an interrupted command calls this just
    before it exits, so nothing half-written is left behind); returns what was removed. Targets are untouched."""
    with _PENDING_LOCK:
        pending = sorted(_PENDING)
        _PENDING.clear()
    for path in pending:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)
    return pending


def replace_file(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then atomically move it to ``path``.

    ``write`` receives the path of a fresh temporary file in the target's folder (so the final rename
    never crosses file systems). On any exception the temporary file is removed and the target is
    left untouched.

    Raises:
        DiskFullError: the file system ran out of space (or quota) while writing, naming the file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.lora-ranks-{os.getpid()}-", suffix=".tmp", dir=target.parent)
    os.close(fd)
    register_pending(Path(tmp), True)
    try:
        write(tmp)
        # mkstemp creates 0o600, and a writer that replaces the file (safetensors' save_file) may keep that: outputs
        # are shared like any other file.
        os.chmod(tmp, 0o666 & ~UMASK)
        with open(tmp, "rb+") as handle:  # flush the data before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = as_disk_full(exc, target)
        if full is not None:
            raise full from None
        raise
    finally:
        register_pending(Path(tmp), False)
    return target


def _remove_stale_temporaries(target: Path) -> None:
    """The temporary files of earlier writes of ``target`` whose process is gone (killed outright: SIGKILL, the OOM
    killer; ``.NAME.lora-ranks-<pid>-<random>.tmp``, no other name): a write leaves nothing half-written behind,
    eventually."""
    pattern = re.compile(re.escape(f".{target.name}.lora-ranks-") + r"(\d+)-[A-Za-z0-9_]+\.tmp")
    try:
        siblings = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in siblings:
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False) or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True
