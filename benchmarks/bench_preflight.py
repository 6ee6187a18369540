"""Benchmark: what the command line's preflight now costs before an analysis, side by side with the analysis.

The preflight (``AnalysisPlan.check_pair``) reads every analyzed weight of both checkpoints once, to refuse NaN or
Inf and an identical pair before any layer file is written. This measures that read against the headers-only
preflight and against the weight-spectrum analysis it guards (``analyze_checkpoints``), interleaved over rounds in
one process, on a synthetic bf16 Qwen3-shaped pair (bench_analysis.py's shapes). Raw per-round seconds go to
``benchmarks/results/preflight.json``.

    .venv/bin/python benchmarks/bench_preflight.py [--record]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import emit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()

    from lora_ranks.analysis import AnalysisPlan, analyze_checkpoints
    from lora_ranks.settings import AllocationSettings
    from lora_ranks.synthetic import write_planted_pair

    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        base, ft = Path(tmp) / "base", Path(tmp) / "ft"
        write_planted_pair(base, ft, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_layers=args.layers, num_heads=16, num_kv_heads=4, planted_rank=(16, 48, 96), decay=0.97,
                           noise=0.3, dtype="bfloat16")
        for i in range(args.rounds):
            times = {}
            for what in ("headers", "weights", "analysis"):
                start = time.perf_counter()
                if what == "analysis":
                    analyze_checkpoints(base, ft, Path(tmp) / f"out{i}", settings=AllocationSettings())
                else:
                    AnalysisPlan(str(base), str(ft)).check_pair(read_weights=what == "weights")
                times[what] = time.perf_counter() - start
            rounds.append(times)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    read = med["weights"] - med["headers"]
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}"
    table = (f"\n### Preflight weight read vs the analysis ({date.today()}, {machine}; bench_preflight.py)\n\n"
             f"{args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, bf16; median of "
             f"{args.rounds} interleaved rounds.\n\n"
             "| step | seconds | vs analysis |\n|---|---|---|\n"
             f"| preflight, headers only | {med['headers']:.2f} | {med['headers'] / med['analysis']:.3f} |\n"
             f"| preflight with the weight read (NaN, identical pair) | {med['weights']:.2f} | "
             f"{med['weights'] / med['analysis']:.3f} |\n"
             f"| the read alone | {read:.2f} | {read / med['analysis']:.3f} |\n"
             f"| analysis (weight spectra, analyze_checkpoints) | {med['analysis']:.2f} | 1 |\n")
    out = REPO / "benchmarks" / "results" / "preflight.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "machine": machine, "args": vars(args), "rounds": rounds},
                              indent=2) + "\n")
    emit(table, args.record)


if __name__ == "__main__":
    main()
