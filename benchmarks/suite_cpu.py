"""Where the test suite's CPU goes: a pytest plugin that records each test's wall time and CPU seconds (its worker's
own, and the children it waited for: command-line runs, servers, measuring processes), and a summary of them.

    PYTHONPATH=$PWD/benchmarks SUITE_CPU_DIR=/tmp/cpu .venv/bin/python -m pytest -q -p suite_cpu -n 2 --dist worksteal
    .venv/bin/python benchmarks/suite_cpu.py /tmp/cpu [--top 40] [--json benchmarks/results/suite_cpu.json]

On a CPU-bound 2-core machine the suite's wall time is about its CPU seconds over 2, so this is the list to cut
from. Not counted: each worker's start. The Prefect test server, which serves every in-process flow run, is a row of
its own: under xdist the one the controller started for all workers (tests/conftest.py); without xdist the session's
own (counted again in the test that stops it).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import resource
import time
from pathlib import Path

import psutil
import pytest

_ROWS: list[tuple[str, float, float, float]] = []
_LAST_SEEN_CPU: dict[int, float] = {}  # pid -> its CPU seconds at the end of the last test it was alive for
_TESTS_SEEN_ALIVE: collections.Counter = collections.Counter()  # pid -> tests it was alive at the end of


def _cpu() -> tuple[float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Each test's wall time and CPU seconds, setup and teardown included (a wrapper around pytest's own hook)."""
    began, (own, children) = time.monotonic(), _cpu()
    yield
    own_after, children_after = _cpu()
    _ROWS.append((item.nodeid, time.monotonic() - began, own_after - own, children_after - children))
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            _LAST_SEEN_CPU[child.pid] = sum(child.cpu_times()[:2])
            _TESTS_SEEN_ALIVE[child.pid] += 1



def pytest_sessionfinish(session):
    folder = os.environ.get("SUITE_CPU_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        # Processes alive at the end of 3 tests or more (the session's Prefect test server, which serves every in-process
        # flow run): their CPU as last seen, as one row, so that the flows' share of the server shows. It is counted
        # a second time in the row of the test that reaped them (the last one, usually).
        lasting = sum(cpu for pid, cpu in _LAST_SEEN_CPU.items() if _TESTS_SEEN_ALIVE[pid] >= 3)
        rows = [*_ROWS, (f"<{worker}: processes that lasted 3 tests or more>", 0.0, 0.0, lasting)]
        if worker == "main" and os.environ.get("PYTEST_XDIST_WORKER") is None and not _ROWS:
            # the xdist controller runs no test: its own children are the workers and the Prefect test server it
            # started for them (tests/conftest.py), still running here
            rows = [(f"<controller: {' '.join(p.cmdline()[1:4])}>", 0.0, 0.0, cpu)
                    for p, cpu in _child_cpu(psutil.Process()) if "uvicorn" in " ".join(p.cmdline())]
        (Path(folder) / f"{worker}.json").write_text(json.dumps(rows))


def _child_cpu(process: psutil.Process) -> list[tuple[psutil.Process, float]]:
    out = []
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            out.append((child, sum(child.cpu_times()[:2])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--json", type=Path, help="also write the top rows here")
    args = parser.parse_args()
    rows = sorted((row for f in args.folder.glob("*.json") for row in json.loads(f.read_text())),
                  key=lambda r: -(r[2] + r[3]))
    total = sum(r[2] + r[3] for r in rows)
    print(f"{len(rows)} tests, {total:.0f} CPU-s in all, {sum(r[1] for r in rows):.0f} s of wall summed\n")
    print("| test | CPU-s (own + children) | wall s |\n|---|---|---|")
    for name, wall, own, children in rows[:args.top]:
        print(f"| {name} | {own + children:.1f} ({own:.1f} + {children:.1f}) | {wall:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"tests": len(rows), "cpu_seconds": round(total, 1), "top": [
            {"test": n, "wall_s": round(w, 1), "own_cpu_s": round(o, 1), "children_cpu_s": round(c, 1)}
            for n, w, o, c in rows[:args.top]]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
