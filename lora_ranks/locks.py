"""One command per output at a time: an advisory lock on each output path while a command writes it.

The lock is a file under the tool's cache (``$LORA_RANKS_CACHE/locks``, default ``~/.cache/lora-ranks/locks``),
named by a hash of the output's resolved path, never a file in the user's folders. ``fcntl.flock`` holds it: the
kernel releases it when the process ends however it ends, so a crash leaves no stale lock. The file records the
holder (PID, command, start time) for the message a second command gets. Locks are per machine: two machines writing
one network folder are not serialized.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LoraRanksError

__all__ = ["OutputBusyError", "output_lock", "lock_file", "lock_folder"]


class OutputBusyError(LoraRanksError):
    """Another command of this tool is writing the same output (named in the message, with its PID)."""


def lock_folder() -> Path:
    """Where the lock files are: ``$LORA_RANKS_CACHE/locks`` (default ``~/.cache/lora-ranks/locks``)."""
    root = os.environ.get("LORA_RANKS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora-ranks")
    return Path(root) / "locks"


def lock_file(path: str | os.PathLike) -> Path:
    """The lock file of output ``path`` (by its resolved path)."""
    real = os.path.realpath(path)
    return lock_folder() / f"{hashlib.sha256(real.encode()).hexdigest()[:24]}.lock"


@contextmanager
def output_lock(path: str | os.PathLike, command: str, flag: str = "--out") -> Iterator[None]:
    """Hold the lock of output ``path`` for the block.

    Raises:
        OutputBusyError: another process holds it: one line naming the output and that process.
    """
    real = os.path.realpath(path)
    lock = lock_file(path)
    made = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]  # what a failure must take back
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(lock, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as exc:  # LORA_RANKS_CACHE (or HOME) is a file, read-only, /proc, ...
        _take_back(lock, made)
        raise LoraRanksError(f"the lock folder {lock.parent} cannot be written ({exc.strerror or exc}): set "
                             "LORA_RANKS_CACHE to a folder of yours") from None
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputBusyError(f"{flag} {real} is being written by another lora-ranks command ({holder}): wait for "
                                  "it to end, or choose another folder") from None
        try:  # the holder before us may have unlinked the file between our open and our lock: take the new one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": command, "output": real,
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    except OSError as exc:  # a full disk or quota under LORA_RANKS_CACHE
        os.close(fd)
        _take_back(lock, made)
        raise LoraRanksError(f"the lock folder {lock.parent} cannot be written ({exc.strerror or exc}): free some "
                             "space there, or set LORA_RANKS_CACHE to a folder on another file system") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # before the unlock: a waiter that opened it sees the inode change and retries
        os.close(fd)


def _take_back(lock: Path, made: list[Path]) -> None:
    """A lock that could not be taken leaves nothing behind: its file, and the folders made for it (innermost first,
    each only while empty)."""
    with contextlib.suppress(OSError):  # under a file, say: there is none
        lock.unlink(missing_ok=True)
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            break


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"lora-ranks {info['command']}, PID {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its PID unknown"
