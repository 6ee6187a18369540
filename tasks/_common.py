"""What every task shares: which failures are retried, how user errors are logged, how progress is logged.

* ``retry_if_transient`` is the tasks' ``retry_condition_fn``: only failures that may go away (I/O errors of the
  storage, CUDA out of memory, a lost worker; ``lora_ranks.errors.is_transient``) are retried. A bad checkpoint,
  NaN weights, an invalid config or setting fails at once: retrying cannot help.
* User errors (``lora_ranks.errors.is_user_error``) are logged by Prefect's engines as one line, without the
  Python traceback, on the console and in the UI; the run's state message carries the same text. Set
  ``LORA_RANKS_DEBUG=1`` (``lora-ranks --debug``) or ``PREFECT_LOGGING_LEVEL=DEBUG`` to keep the tracebacks.
  Unexpected exceptions (bugs) always keep theirs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from lora_ranks.errors import is_transient, is_user_error
from lora_ranks.progress import LOGGER

__all__ = ["retry_if_transient", "install_traceback_filter", "debug_enabled", "install_progress_forwarding", "TRANSIENT_RETRIES"]

#: Retries of a task whose failure may be transient: two, after 2 s and 10 s.
TRANSIENT_RETRIES = dict(retries=2, retry_delay_seconds=[2, 10])


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure is transient (see the module docstring)."""
    try:
        state.result()
    except Exception as exc:  # the failure the state carries
        return is_transient(exc)
    return False


def debug_enabled() -> bool:
    """True when tracebacks of user errors should be shown too."""
    return os.environ.get("LORA_RANKS_DEBUG") == "1" or logging.getLogger("prefect").isEnabledFor(logging.DEBUG)


class _HideUserErrorTracebacks(logging.Filter):
    """Drops the traceback from engine log records about a user error (the message line stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_user_error(exc) and not debug_enabled():
            record.exc_info = None
            record.exc_text = None
        return True


def install_traceback_filter() -> None:
    """Attach the filter to Prefect's run loggers (idempotent). Logger filters survive Prefect's logging setup,
    which replaces handlers but keeps filters."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HideUserErrorTracebacks) for f in logger.filters):
            logger.addFilter(_HideUserErrorTracebacks())


class _ToRunLog(logging.Handler):
    """The library's progress lines (logger ``lora_ranks.progress``: a line every few seconds of every training run,
    curvature pass and evaluation) into the log of the Prefect run they happen in (console and UI); lines outside
    a run are dropped. The run is found from the calling thread's context, so concurrent tasks keep their own."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = get_run_logger()
        except MissingContextError:
            return
        logger.log(record.levelno, record.getMessage())


def install_progress_forwarding() -> None:
    """Attach ``_ToRunLog`` to ``lora_ranks.progress`` (idempotent)."""
    if not any(isinstance(h, _ToRunLog) for h in LOGGER.handlers):
        LOGGER.addHandler(_ToRunLog())
        LOGGER.setLevel(logging.INFO)
        LOGGER.propagate = False  # the run's log is where they belong (no second copy through the root logger)
