"""Benchmark: the analysis engine vs the naive approach, side by side in one run.

Naive = what most extraction scripts do: load both models whole with transformers, then a full float32
``torch.linalg.svd(delta)`` per module (default ``full_matrices=True``), energy ranks from the full spectrum.
svdvals = the same load, then float32 ``torch.linalg.svdvals`` (no singular vectors; the careful baseline).
Engine = ``lora_ranks.analyze_checkpoints``: lazy per-tensor reads, exact energy, float64 spectra.

Each measurement runs in a fresh subprocess so peak memory (ru_maxrss) is its own. Pairs are synthetic
Qwen3-shaped checkpoints (bf16) with planted spectra: low-rank signal with geometric decay plus a noise floor.

    .venv/bin/python benchmarks/bench_analysis.py            # hidden 1024, intermediate 2816, 8 and 16 layers
    .venv/bin/python benchmarks/bench_analysis.py --record   # also append the table to BENCHMARKS.md
    .venv/bin/python benchmarks/bench_analysis.py --hidden 1536 --intermediate 8960 --heads 12 --kv-heads 2 \
        --layers 4 8                                           # Qwen2.5-1.5B layer shapes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import emit  # noqa: E402


def _peak_mb() -> float:
    """Peak resident memory of this process in MiB. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    fork + exec, so a child would report its parent's peak."""
    from lora_ranks.check.measuring import peak_resident_bytes

    return peak_resident_bytes() / 2**20


def run_naive(base: str, ft: str, tau: float, values_only: bool = False) -> dict:
    """Load both models, then per delta ``torch.linalg.svd`` (full matrices, the default), or with
    ``values_only`` the careful variant ``torch.linalg.svdvals`` (float32 LAPACK, no singular vectors)."""
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    a = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32)
    loaded = time.perf_counter() - start
    wb = dict(b.named_parameters())
    ranks = {}
    svd_seconds = 0.0
    for name, p in a.named_parameters():
        if not name.endswith("proj.weight"):
            continue
        delta = (wb[name] - p).detach()
        t = time.perf_counter()
        s = torch.linalg.svdvals(delta) if values_only else torch.linalg.svd(delta)[1]
        svd_seconds += time.perf_counter() - t
        cum = torch.cumsum(s.double() ** 2, 0) / torch.sum(s.double() ** 2)
        ranks[name[: -len(".weight")]] = int(torch.nonzero(cum >= tau * (1 - 1e-12))[0]) + 1
    return {"seconds": time.perf_counter() - start, "load_seconds": loaded, "svd_seconds": svd_seconds,
            "peak_mb": _peak_mb(), "ranks": ranks}


def run_engine(base: str, ft: str, tau: float) -> dict:
    import transformers  # noqa: F401  (imported before the clock starts, as in run_naive)

    from lora_ranks import AllocationSettings, AnalysisSettings, analyze_checkpoints

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        settings = AllocationSettings(energy_threshold=tau, min_rank=1, max_rank=128, smoothing="none")
        config = analyze_checkpoints(base, ft, out, settings=settings, analysis=AnalysisSettings(device="cpu"))
    modules = config.modules
    timings = config.analysis_metadata.timings
    return {"seconds": time.perf_counter() - start, "svd_seconds": timings.spectra_wall_seconds,
            "discovery_seconds": timings.discovery_seconds,
            "peak_mb": _peak_mb(), "methods": config.analysis_metadata.svd.methods,
            "ranks": {n: m.raw_rank for n, m in modules.items()}}


def run_svdvals(base: str, ft: str, tau: float) -> dict:
    return run_naive(base, ft, tau, values_only=True)


def _child(kind: str, base: str, ft: str, tau: float) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.bench_analysis import run_{kind};"
            f"print('RESULT' + json.dumps(run_{kind}({base!r}, {ft!r}, {tau})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    line = next(text for text in done.stdout.splitlines() if text.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()

    from lora_ranks.synthetic import write_planted_pair

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_layers in args.layers:
            base, ft = Path(tmp) / f"base{n_layers}", Path(tmp) / f"ft{n_layers}"
            write_planted_pair(base, ft, hidden_size=args.hidden, intermediate_size=args.intermediate,
                               num_layers=n_layers, num_heads=args.heads, num_kv_heads=args.kv_heads, planted_rank=(16, 48, 96),
                               decay=0.97, noise=0.3, dtype="bfloat16")
            naive = _child("naive", str(base), str(ft), args.tau)
            svdvals = _child("svdvals", str(base), str(ft), args.tau)
            engine = _child("engine", str(base), str(ft), args.tau)
            same = naive["ranks"] == engine["ranks"] == svdvals["ranks"]
            rows.append((n_layers, naive, svdvals, engine, same))
            print(f"layers={n_layers}: naive {naive['seconds']:.1f}s ({naive['peak_mb']:.0f} MB), svdvals "
                  f"{svdvals['seconds']:.1f}s, engine "
                  f"{engine['seconds']:.1f}s ({engine['peak_mb']:.0f} MB), ranks identical: {same}", flush=True)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    command = " ".join(["`.venv/bin/python benchmarks/bench_analysis.py", *sys.argv[1:]]).replace(" --record", "") + "`"
    lines = [f"### Analysis engine vs naive ({date.today().isoformat()}, CPU: {machine})", "",
             f"Qwen3-shaped bf16 pair, hidden {args.hidden}, intermediate {args.intermediate}, heads {args.heads}/"
             f"{args.kv_heads} (q/kv), 7 projections per layer, tau = {args.tau}. Command: {command}", "",
             "| layers | naive total s | naive SVD s | naive peak MB | svdvals total s | engine total s "
             "| engine discovery s | engine spectra s | engine peak MB | speed-up vs naive | vs svdvals "
             "| raw ranks identical | engine methods |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n_layers, naive, svdvals, engine, same in rows:
        lines.append(f"| {n_layers} | {naive['seconds']:.1f} | {naive['svd_seconds']:.1f} | {naive['peak_mb']:.0f} | "
                     f"{svdvals['seconds']:.1f} | {engine['seconds']:.1f} | {engine['discovery_seconds']:.1f} | "
                     f"{engine['svd_seconds']:.1f} | {engine['peak_mb']:.0f} | "
                     f"{naive['seconds'] / engine['seconds']:.1f}x | {svdvals['seconds'] / engine['seconds']:.1f}x | "
                     f"{same} | {', '.join(engine['methods'])} |")
    lines += ["", "Naive = load both models, full float32 `torch.linalg.svd(delta)` (default `full_matrices=True`, as "
              "in kohya's extraction script); svdvals = the same load, then float32 `torch.linalg.svdvals` (no "
              "singular vectors: what a careful script would do). Engine discovery = reading headers and building "
              "the model on the meta device for the loaded names (mostly importing transformers' model code, "
              "which the naive load pays too); engine spectra = wall time of the per-layer loop (reads, deltas, "
              "spectra, layer files)."]
    emit("\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
