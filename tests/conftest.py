"""Shared fixtures: seeded RNGs, tiny checkpoint pairs with planted spectra, a Prefect test harness."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from pathlib import Path

from flows._runtime import apply_defaults

apply_defaults()  # Prefect's defaults, from their one place, before Prefect is first imported
# Training's precision "auto" trains in bf16 on CPUs with bf16 units: the suite runs as on a CPU without them
# (float32), so that its numbers are the same on every CI machine, in this process and in every one it starts. The
# bf16 tests (test_precision.py) pretend units are there where they need them.
os.environ["LORA_RANKS_CPU_BF16"] = "0"
# Under pytest-xdist (``make test`` runs two workers), each worker's ephemeral Prefect API keeps its own SQLite
# database (a folder of PREFECT_HOME per worker): two servers writing one database file would wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("LORA_RANKS_TEST_HOME_SPLIT"):
    home = Path(os.environ["PREFECT_HOME"]) / os.environ["PYTEST_XDIST_WORKER"]
    home.mkdir(parents=True, exist_ok=True)  # Prefect creates its home without parents: a fresh clone has no .prefect/
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["LORA_RANKS_TEST_HOME_SPLIT"] = "1"  # once per process (conftest may be imported again)
# Each xdist worker, and every process it starts (they inherit the environment), gets its share of the cores, set
# before torch is imported. Left to itself each worker's torch runs a thread per core: 4 threads on 2 cores then wait
# for each other at every OpenMP barrier (a training step of an 8-layer, 1.7M-parameter model took 10.3 s instead
# of 0.79 s on this 2-core machine with its other core busy). A value set by the caller is kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# Importing prefect.main configures Prefect's logging, whose console handler keeps the sys.stderr of that moment:
# here, the process's own. Done first inside a test that captures output (capsys, as the in-process command-line
# tests do), it would be that test's capture, closed when the test ends, and every later Prefect log line of this
# worker would fail on it.
import numpy as np  # noqa: E402
import prefect.main  # noqa: E402, F401
import pytest  # noqa: E402
import torch  # noqa: E402

from lora_ranks.synthetic import write_planted_pair  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def planted_pair(tmp_path_factory):
    """A float32 Qwen3 pair (2 layers, hidden 64) with planted ranks 3/8/20 cycling over modules."""
    root = tmp_path_factory.mktemp("planted")
    return write_planted_pair(root / "base", root / "ft", planted_rank=(3, 8, 20), noise=1e-3)


#: Environment variable the xdist controller sets for its workers: "<API URL> <database file> <folder>" of the one
#: Prefect test server it started for all of them (``pytest_configure``).
SHARED_SERVER = "LORA_RANKS_TEST_PREFECT_SERVER"


def pytest_configure(config):
    """Under pytest-xdist, the controller starts one Prefect test server for every worker, without waiting for it:
    it starts (~13 CPU-seconds, its database migrated) while the workers start and collect, and a second server's
    start is saved. A worker waits for it when its first flow test asks (``prefect_harness``)."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):
        return
    import socket
    import subprocess
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="lora-ranks-test-prefect-"))
    with socket.socket() as probe:  # a free port, chosen now so that the workers know the URL before it answers
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    database = folder / "prefect.db"
    import prefect

    with open(folder / "server.log", "wb") as log:  # the server keeps its own handle
        config._lora_ranks_prefect_server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parents[1]), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level",
             "error", "--lifespan", "on"],
            # as Prefect's own test harness starts it (SubprocessASGIServer), on a database of its own
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1", "PREFECT_SERVER_DATABASE_CONNECTION_URL":
                 f"sqlite+aiosqlite:///{database}"},
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    config._lora_ranks_prefect_folder = folder
    os.environ[SHARED_SERVER] = f"http://127.0.0.1:{port}/api {database} {folder}"


def pytest_unconfigure(config):
    """The controller stops the server it started (by its process, 10 s at most, then killed) and removes its
    folder."""
    import shutil
    import subprocess

    server = getattr(config, "_lora_ranks_prefect_server", None)
    if server is None:
        return
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=10)
    shutil.rmtree(config._lora_ranks_prefect_folder, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect API (SQLite) for every flow test of the session, and for the commands a test runs in
    the test's process (``flows.cli.main(argv)``): a test that runs a flow that way requests it, else its worker
    would start a second server and keep it to the end of the session. Under pytest-xdist it is the server the
    controller started for all workers (``pytest_configure``); else one started here (~20 s).

    Yields a copy of its database as it started, freshly migrated. The copy also seeds this worker's Prefect home,
    which commands run in processes of their own use: a fresh clone has none, and their first temporary server would
    spend ~7 CPU-seconds migrating it again."""
    shared = os.environ.get(SHARED_SERVER)
    with _shared_harness(shared) if shared else _own_harness():
        migrated = _migrated_copy(_harness_database(), tmp_path_factory)
        home_database = Path(os.environ["PREFECT_HOME"]) / "prefect.db"
        if not home_database.exists():
            _copy_sqlite(migrated, home_database)
        yield migrated


_LOGS_TO_API = False
"""In-process flow runs keep their logs on the terminal and send none to the test server: the server's share of the
flow tests fell by ~15% (49.8 -> 42.1 CPU-seconds on test_flows and test_orchestration). That logs of a run reach
the API (and no secret with them) is checked on a command run in its own process, with its own temporary server
(test_reliability)."""


@contextlib.contextmanager
def _own_harness():
    from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180), \
            temporary_settings({PREFECT_LOGGING_TO_API_ENABLED: _LOGS_TO_API}):
        yield


@contextlib.contextmanager
def _shared_harness(shared: str):
    """Settings that point this process at the controller's server, once it answers (180 s at most), as Prefect's
    ``prefect_test_harness`` does for its own; on leaving, the logs and events this process still holds are sent."""
    import time

    import httpx
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_LOGGING_TO_API_ENABLED,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
        temporary_settings,
    )

    url, database, folder = shared.split(" ")
    deadline = time.monotonic() + 180
    while True:
        with contextlib.suppress(httpx.HTTPError):  # not listening yet
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        if time.monotonic() > deadline:
            log = Path(folder, "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the shared Prefect test server at {url} did not answer within 180 s; its log:\n{log}")
        time.sleep(0.2)
    with temporary_settings({PREFECT_API_URL: url, PREFECT_LOGGING_TO_API_ENABLED: _LOGS_TO_API,
                             PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{database}"}), \
            _temporary_global_settings_context(get_settings_context()):
        yield
        with contextlib.suppress(RuntimeError):  # never started
            APILogWorker.drain_all()
        EventsWorker.drain_all()


def _migrated_copy(database: Path, tmp_path_factory) -> Path:
    """A copy of the test server's database as it was before any test used it (freshly migrated, no runs). Under
    pytest-xdist the first worker to get here copies it, under a lock, before any worker has used the server; the
    others reuse that copy."""
    import fcntl

    shared = os.environ.get(SHARED_SERVER)
    if not shared:
        return _copy_sqlite(database, tmp_path_factory.mktemp("prefect-db") / "prefect.db")
    folder = Path(shared.split(" ")[2])
    with open(folder / "copy.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        copy = folder / "migrated.db"
        return copy if copy.exists() else _copy_sqlite(database, copy)


@pytest.fixture(scope="session")
def migrated_prefect_database(prefect_harness) -> Path:
    """A freshly migrated Prefect database, with no runs: copied into a new Prefect home, a server starts on it
    without migrating (~7 CPU-seconds sooner)."""
    return prefect_harness


def _harness_database() -> Path:
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    return Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])


def _copy_sqlite(source: Path, target: Path) -> Path:
    """A consistent copy of a SQLite database another process may be writing (SQLite's online backup), put in place
    whole (renamed from a temporary file)."""
    import sqlite3

    partial = target.with_name(target.name + ".partial")
    with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(partial)) as dst:
        src.backup(dst)
    partial.replace(target)
    return target



@pytest.fixture
def task_states(prefect_harness):
    """``task_states(flow_state) -> {task run name: sorted [(state name, run count), ...]}`` from the API."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.events.worker import EventsWorker

    def read(flow_state):
        # Task run states reach the API as events, recorded by the server after the flow has returned: a flow that
        # fails on its first failed task can return before that task's final state is stored. Wait for the client
        # to send what it has, then until no run of this flow is still pending or running (10 s at most).
        EventsWorker.drain_all(timeout=10)
        deadline = time.monotonic() + 10
        while True:
            with get_client(sync_client=True) as client:
                run_id = flow_state.state_details.flow_run_id
                runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            if all(r.state.is_final() for r in runs) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        out: dict[str, list] = {}
        for r in runs:
            out.setdefault(r.name, []).append((r.state.name, r.run_count))
        return {name: sorted(v) for name, v in out.items()}

    return read


def pytest_sessionfinish(session):
    """Stop the temporary Prefect servers that in-process commands (``flows.cli.main(argv)``) left running for the
    next one, while this worker's output is still open: left to interpreter exit, Prefect's goodbye line met a closed
    stream and printed a logging error after the worker's results."""
    server = sys.modules.get("prefect.server.api.server")
    if server is None:
        return
    logging.getLogger("prefect").setLevel(logging.WARNING)  # the session is over: no goodbye lines
    for instance in list(server.SubprocessASGIServer._instances.values()):
        with contextlib.suppress(Exception):  # already stopped
            instance.stop()
