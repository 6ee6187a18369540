"""Shared by the benchmark scripts: print a result table and, when asked, append it to BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def emit(table: str, record: bool) -> None:
    print(table)
    if record:
        with open(REPO / "BENCHMARKS.md", "a") as handle:
            handle.write("\n" + table)
