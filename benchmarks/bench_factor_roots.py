"""Benchmark: the curvature-weighted spectrum with Cholesky roots against the eigendecomposition path (issue 25,
item 1), side by side in one process, rounds interleaved.

For a damped SPD factor pair (G: d_out x d_out, A: d_in x d_in, float64, built from random low-rank-plus-ridge
samples like calibration factors) and a delta (d_out, d_in): the time to build both roots (``factor_root``:
Cholesky; ``symmetric_root``: ``eigh``) and then the weighted spectrum (top 129, float64 Gram), and the largest
relative difference of the two spectra. Raw per-round seconds: ``benchmarks/results/factor_roots.json``.

    .venv/bin/python benchmarks/bench_factor_roots.py [--dims 1024 2048] [--rounds 3] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks._common import emit  # noqa: E402


def _factor(d: int, seed: int) -> torch.Tensor:
    """A calibration-like second moment (d, d), float64: 2d/3 samples, so singular until damped."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(d, 2 * d // 3, generator=gen, dtype=torch.float64)
    return x @ x.T / x.shape[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    from lora_ranks.spectra.weighted import factor_root, symmetric_root, weighted_spectrum

    raw, rows = {}, []
    for d in args.dims:
        g, a = _factor(d, 1), _factor(d, 2)
        delta = torch.randn(d, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        rounds = []
        for _ in range(args.rounds):
            times, values = {}, {}
            for name, make in (("cholesky", factor_root), ("eigh", symmetric_root)):
                start = time.perf_counter()
                roots = make(g, d, 0.01), make(a, d, 0.01)
                built = time.perf_counter()
                spectrum = weighted_spectrum(delta, 129, output_root=roots[0], input_root=roots[1], device="cpu")
                times[name] = {"roots": built - start, "spectrum": time.perf_counter() - built}
                values[name] = spectrum.singular_values
            rounds.append(times)
        difference = float(abs(values["cholesky"] - values["eigh"]).max() / values["eigh"][0])
        raw[str(d)] = {"rounds": rounds, "max_rel_difference": difference}
        med = {k: {p: statistics.median(r[k][p] for r in rounds) for p in ("roots", "spectrum")} for k in rounds[0]}
        rows.append((d, med, difference))
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / "factor_roots.json").write_text(json.dumps(raw, indent=1) + "\n")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lines = [f"### Cholesky roots vs eigendecompositions for the weighted spectrum ({date.today().isoformat()}, {machine})",
             "", f"Both factors d x d, damped 0.01; delta d x d; top 129 singular values (float64 Gram); median of "
             f"{args.rounds} interleaved rounds. Command: `.venv/bin/python benchmarks/bench_factor_roots.py`.", "",
             "| d | roots: eigh | roots: Cholesky | speed-up | spectrum after eigh roots | after Cholesky roots | "
             "max relative difference of the spectra |", "|---|---|---|---|---|---|---|"]
    for d, med, difference in rows:
        lines.append(f"| {d} | {med['eigh']['roots']:.2f} s | {med['cholesky']['roots']:.2f} s | "
                     f"{med['eigh']['roots'] / med['cholesky']['roots']:.1f}x | {med['eigh']['spectrum']:.2f} s | "
                     f"{med['cholesky']['spectrum']:.2f} s | {difference:.1e} |")
    emit("\n".join(lines) + "\n", args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
