"""Progress of long steps as log lines: never minutes of silence.

Every loop that can run for minutes (a training run, a curvature pass, an evaluation, a KL measurement) reports
through a :class:`Heartbeat`: a line on the standard logger ``lora_ranks.progress`` whenever ``PROGRESS_SECONDS``
have passed since the thread's last progress line (so a run of short loops reports too, and a loop shorter than
that says nothing), and a last line when a loop that reported ends, e.g.::

    LoRA training seed 0: step 120/1125 (10.7%), 3.41 s/step, ~57m left; loss 1.9932 lr 2.70e-03

The Prefect tasks forward these lines into the run's log (``tasks/_common.py``); a script using the library directly
sees them after ``logging.basicConfig(level=logging.INFO)``. Progress bars (``progress=True`` in the functions that
have one) are separate and unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

LOGGER = logging.getLogger("lora_ranks.progress")
PROGRESS_SECONDS = 10.0
"""Most seconds without a progress line while a thread runs reporting loops."""


def _duration(seconds: float) -> str:
    """``seconds`` as "42s", "17m" or "3.2h"."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


class Pace:
    """When the last progress line was written: lines at most ``every`` seconds apart across all the loops that
    share it (by default the loops of one thread: ``thread_pace``).

    Args:
        every: most seconds between two lines (``PROGRESS_SECONDS``).
        clock: seconds, monotonic (a test passes a fake one).
    """

    def __init__(self, every: float = PROGRESS_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.every, self.clock = every, clock
        self.last = clock()

    def due(self) -> bool:
        return self.clock() - self.last >= self.every


_threads = threading.local()


def thread_pace() -> Pace:
    """The calling thread's ``Pace`` (made at its first use)."""
    if not hasattr(_threads, "pace"):
        _threads.pace = Pace()
    return _threads.pace


class Heartbeat:
    """Progress lines of one loop over ``total`` items (``None``: unknown), paced by ``pace``.

    Args:
        what: names the loop, first on each line ("LoRA training seed 0", "held-out loss").
        total: items the loop will process (steps, batches, records), or None when unknown.
        unit: the items' name, singular ("step", "batch", "record").
        pace: shared with the other loops of the thread (``thread_pace()``) unless given.
        emit: where a line goes (``LOGGER.info`` by default).
        initial: items already done before this loop began (a resumed run): the pace counts only the rest.
    """

    def __init__(self, what: str, total: int | None, unit: str, *, pace: Pace | None = None,
                 emit: Callable[[str], None] | None = None, initial: int = 0):
        self.what, self.total, self.unit, self.initial = what, total, unit, initial
        self.pace = pace or thread_pace()
        self._emit = emit or LOGGER.info
        self._start = self.pace.clock()
        self.lines = 0

    def update(self, done: int, detail: str = "", *, force: bool = False) -> None:
        """``done`` items processed so far: a line when the pace is due, at the last item of a loop that already
        reported, or when ``force``d."""
        last_item = self.total is not None and done >= self.total
        if force or self.pace.due() or (last_item and self.lines):
            now = self.pace.clock()
            self.pace.last = now
            self.lines += 1
            self._emit(self.line(done, now - self._start, detail))

    def line(self, done: int, elapsed: float, detail: str = "") -> str:
        """The progress line after ``done`` items in ``elapsed`` seconds."""
        if self.total:
            text = f"{self.what}: {self.unit} {done}/{self.total} ({100 * done / self.total:.1f}%)"
        else:
            text = f"{self.what}: {done} {self.unit}{'s' if done != 1 else ''}"
        if done > self.initial and elapsed > 0:
            per = elapsed / (done - self.initial)
            text += f", {per:.2f} s/{self.unit}" if per >= 0.1 else f", {1 / per:.1f} {self.unit}s/s"
            if self.total and done < self.total:
                text += f", ~{_duration(per * (self.total - done))} left"
            elif self.total:
                text += f", {_duration(elapsed)} in all"
        return f"{text}; {detail}" if detail else text
