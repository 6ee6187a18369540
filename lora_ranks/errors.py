"""Error types, and which failures are worth retrying.

Every problem a user can fix (a bad option, checkpoint, dataset, rank config or adapter) raises a subclass of
``LoraRanksError``. These are deterministic: running the same thing again fails the same way, so orchestration
never retries them, and the command line reports them as one line without a traceback. Anything else is
either transient (``is_transient``: worth a retry) or a bug (kept with its traceback).
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LoraRanksError", "CalibrationError", "DiskFullError", "as_disk_full", "is_user_error", "is_transient",
           "list_problems", "summarize_problems"]


class LoraRanksError(ValueError):
    """A problem with the user's input; the message names what is wrong and where."""


class CalibrationError(LoraRanksError):
    """The calibration records cannot give curvature factors (missing, empty, too few tokens)."""


class DiskFullError(LoraRanksError):
    """The file system of an output ran out of space (or quota) while it was written; what was half-written is gone."""


def as_disk_full(exc: BaseException, where: object) -> DiskFullError | None:
    """``exc`` as a one-line ``DiskFullError`` naming ``where`` when it says the disk or quota is full (an
    ``OSError`` with ENOSPC/EDQUOT, or a writer's own error quoting the system's message); None otherwise."""
    full = {errno.ENOSPC, *((errno.EDQUOT,) if hasattr(errno, "EDQUOT") else ())}
    if not ((isinstance(exc, OSError) and exc.errno in full) or "No space left on device" in str(exc)
            or "Disk quota exceeded" in str(exc)):
        return None

    folder = Path(str(where))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f" ({shutil.disk_usage(folder).free / 2**20:,.0f} MiB free there now)"
    except OSError:
        free = ""
    return DiskFullError(f"no space left on the device of {where}{free}: nothing half-written was kept; free some "
                         "space or choose an output folder on another file system")


def list_problems(what: str, problems: Sequence[str], limit: int = 20) -> str:
    """One line listing the problems found (the first ``limit``, then a count, so that the line stays readable):
    ``what: N problem(s): a; b; and 3 more``."""
    shown = "; ".join(problems[:limit])
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{what}: {len(problems)} problem(s): {shown}{more}"


def summarize_problems(what: str, problems: Sequence[tuple[str, str]]) -> str:
    """One short line for many problems of a few kinds (``(kind, text)`` pairs): each kind's count and its first
    example, ``what: 7 missing (e.g. a); 7 of another shape (e.g. b)``; for a rank config made for another model,
    where every module fails, a full list would run to kilobytes."""
    kinds: dict[str, list[str]] = {}
    for kind, text in problems:
        kinds.setdefault(kind, []).append(text)
    return f"{what}: " + "; ".join(f"{len(texts)} {kind} (e.g. {texts[0]})" for kind, texts in kinds.items())


def is_user_error(exc: BaseException) -> bool:
    """True for the project's own error types and for settings that failed validation (pydantic)."""
    if isinstance(exc, LoraRanksError):
        return True
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover - pydantic comes with the package
        return False
    return isinstance(exc, ValidationError)


# OSErrors that describe the request, not the storage: retrying cannot make a missing file appear.
_PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT} if hasattr(errno, "EDQUOT") else {errno.ENOSPC, errno.EROFS}
# Failures of the machinery around a task, by class name so that no optional package has to be imported.
_TRANSIENT_NAMES = {"OutOfMemoryError", "KilledWorker", "BrokenProcessPool", "CommClosedError", "StreamClosedError"}


def is_transient(exc: BaseException) -> bool:
    """True when the same call may succeed on a retry.

    Transient: I/O errors of the storage (``EIO``, ``ESTALE`` on network file systems, timeouts, dropped
    connections), CUDA out of memory (another process may free the device), and a lost worker process.
    Not transient: the project's own errors, validation errors, a missing file or permission, a full disk,
    and every other exception (bugs are fixed, not retried).
    """
    if is_user_error(exc):
        return False
    if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return not isinstance(exc, _PERMANENT_OS_ERRORS) and exc.errno not in _PERMANENT_ERRNOS
    return False
