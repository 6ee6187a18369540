"""A command that ends cleanly when interrupted: SIGINT (^C) or SIGTERM, sent to the process or to its group.

What the user sees is one line, ``lora-ranks: interrupted``, and exit status 130 (SIGINT), 143 (SIGTERM) or 129
(SIGHUP, the terminal closed), within a few seconds. Before it exits, the command

* stops every process it started (Prefect's temporary API server, measurement workers, multiprocessing's resource
  tracker), by PID: SIGTERM, then SIGKILL after a grace period;
* removes the temporary files and staging folders it was writing (``lora_ranks._io.abandon_pending``), so nothing
  half-written is left; what had finished stays, and a rerun resumes from it;
* runs the cleanups registered with ``on_interrupt`` (the output folder it created and left empty, its lock).

Two things make this hold however busy the command is:

* Prefect's temporary server runs in a session of its own (``isolate_prefect_server``), so a ^C to the terminal's
  process group does not kill it under a flow that still needs it (which used to hang for minutes in retries and
  print hundreds of lines of tracebacks); the command stops it itself. Its stderr passes through the command, which
  drops what it prints once the command stops it (``silence_children``): what a server logs about the requests
  its shutdown cancels never lands after the one line, nor after a finished command's last line.
* The signal is noticed by a watcher thread (``signal.set_wakeup_fd``), not only by the main thread, which may be
  inside a long torch call and run Python handlers only after it.

Installed by the command line only (``flows.cli.main`` as the process's command), never in a library or test process.
"""

from __future__ import annotations

# Prefect is imported only when a command isolates its temporary server: the handlers are installed before any
# heavy import, so that a ^C during imports ends in one line too.
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

import psutil

from lora_ranks._io import abandon_pending

__all__ = ["install", "on_interrupt", "stop_children", "isolate_prefect_server", "silence_children"]

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}  # SIGHUP: the terminal closed
#: Seconds a child has to end after SIGTERM before it is killed.
GRACE_SECONDS = 3.0

_cleanups: list[Callable[[], None]] = []
_stopping = threading.Lock()
_this_thread = threading.local()  # .stopping: this thread has begun to stop the command
_silenced = threading.Event()  # set: what isolated children print is dropped (``silence_children``)


def on_interrupt(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` (quick, never raising for long) when the command is interrupted, before it exits."""
    _cleanups.append(cleanup)


def install() -> None:
    """Handle SIGINT and SIGTERM as the module docstring says. Call from the main thread, before any work."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    for sig in EXIT_STATUS:
        signal.signal(sig, _handler)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_end,), name="lora-ranks-interrupts", daemon=True).start()


def _handler(signum, frame) -> None:  # the main thread, when it next runs Python
    _stop(signum)


def _watch(read_end: int) -> None:  # a thread of its own: runs even while the main thread is in a long C call
    while True:
        try:
            data = os.read(read_end, 64)
        except InterruptedError:
            continue
        for signum in data:
            if signum in EXIT_STATUS:
                _stop(signum)


def _stop(signum: int) -> None:
    if getattr(_this_thread, "stopping", False):  # a second signal, handled inside this thread's own stop (the main
        return  # thread runs a handler between any two lines, even of a handler): the first stop finishes and exits
    _this_thread.stopping = True
    if not _stopping.acquire(blocking=False):  # the other path is already stopping: let it finish and exit
        if threading.current_thread() is threading.main_thread():
            threading.Event().wait()
        return
    try:
        # Nothing Prefect or a library logs from here on reaches the terminal (other threads may be logging the
        # crash this very moment): the terminal is swapped for /dev/null first, then the one line goes to it.
        terminal = None
        with contextlib.suppress(OSError):
            terminal = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        if terminal is not None:  # a progress bar may hold the line: start a new one
            os.write(terminal, b"\nlora-ranks: interrupted\n")
        else:
            print("\nlora-ranks: interrupted", file=sys.stderr, flush=True)
        silence_children()
        stop_children()

        abandon_pending()
        for cleanup in reversed(_cleanups):
            with contextlib.suppress(Exception):
                cleanup()
    finally:
        os._exit(EXIT_STATUS[signum])


def stop_children(grace: float = GRACE_SECONDS) -> list[int]:
    """Stop every process this one started (recursively), by PID: SIGTERM, then SIGKILL for those still running
    after ``grace`` seconds. Returns their PIDs."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:  # e.g. multiprocessing's resource tracker, which ignores SIGTERM
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=2)
    return [c.pid for c in children]


def isolate_prefect_server() -> None:
    """Start Prefect's temporary API server (when a flow starts it) in a session of its own, out of reach of a ^C
    to the terminal's process group: the command stops it, by PID, when it ends or is interrupted. Prefect keeps
    one server instance per port; the ephemeral API uses the one of port None, which this patches."""
    from prefect.server.api import server

    instance = server.SubprocessASGIServer()
    start = instance._run_uvicorn_command  # Prefect's own command line and environment, unchanged

    def start_in_own_session():
        popen = subprocess.Popen
        subprocess.Popen = _own_session(popen)
        try:
            return start()
        finally:
            subprocess.Popen = popen

    instance._run_uvicorn_command = start_in_own_session
    # Prefect's flow engine swaps in its own SIGTERM handler while a flow runs (for a runner's cancellations, which a
    # command run has none of); with it, a SIGTERM first logs a crash from the main thread, racing the one line.
    import prefect.flow_engine

    prefect.flow_engine.capture_sigterm = contextlib.nullcontext


def _own_session(popen):
    def in_own_session(*args, **kwargs):
        # Out of the group's reach, it must still end with this process however that ends (SIGKILL included): the
        # kernel sends it SIGTERM when the thread that started it ends, so only the main thread (the process's life)
        # arms that.
        armed = threading.current_thread() is threading.main_thread()
        if kwargs.get("stderr") is not None:
            return popen(*args, start_new_session=True, preexec_fn=_parent_death_signal() if armed else None, **kwargs)
        # Its stderr reaches the terminal through this process (``_forward``), not straight: once the command stops
        # it (interrupted, or done), what it prints while being stopped (a server logs the requests it cancels, with
        # tracebacks) is dropped, and never lands after the command's last line.
        read_end, write_end = os.pipe()
        try:
            child = popen(*args, start_new_session=True, preexec_fn=_parent_death_signal() if armed else None,
                          stderr=write_end, **kwargs)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        threading.Thread(target=_forward, args=(read_end,), name="lora-ranks-child-stderr", daemon=True).start()
        return child

    return in_own_session


def _forward(read_end: int) -> None:
    """Copy a child's stderr to this process's fd 2 (the terminal, or /dev/null once interrupted) until it ends, or
    read and drop it once the command has begun to stop it (``silence_children``)."""
    with contextlib.suppress(OSError):
        while data := memoryview(os.read(read_end, 65536)):
            while data and not _silenced.is_set():
                data = data[os.write(2, data):]
    os.close(read_end)


def silence_children() -> None:
    """From now on, drop what the isolated children print: called when the command stops them, so that what a
    server logs about the requests its shutdown cancels never lands beside or after the command's last line."""
    _silenced.set()


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies (``prctl(PR_SET_PDEATHSIG)``); None
    elsewhere. The C function is looked up here, in the parent: the child, between fork and exec, only calls it."""
    if not sys.platform.startswith("linux"):
        return None

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def arm() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return arm

