"""Benchmark: the default (Fisher) analysis at Qwen2.5-7B shapes against the weight analysis, side by side (issue 25).

The model: 2 layers of Qwen2.5-7B's shapes (hidden 3584, intermediate 18944, 28 query and 4 key-value heads of 128),
random bf16 weights with planted low-rank deltas plus a noise floor (``synthetic.write_planted_pair``, as
``bench_analysis.py``), the demo's tokenizer with the vocabulary resized to it, and synthetic demo records (enough
that the default 1% subset holds the 80 calibration records).

The two commands, each in a fresh process, one after the other on an otherwise idle machine:

    lora-ranks analyze --base B --finetuned F --out O1 --spectrum weight --device cpu
    lora-ranks analyze --base B --finetuned F --out O2 --data D --spectrum fisher --calibration-records 80 --device cpu

Per run: wall time, peak resident memory (of the command's process tree) and the time split the rank config
records: the curvature collection (loading, passes over the records; of it, the hooks forming the factors), the
layers' spectra (weight and weighted matrix seconds). Also measured once, in its own process: the two steps the
formed-factor path would take at each of the three 18944-wide factors of a layer (a Cholesky factorization of the
damped factor, the product of its root with the delta), for the "before" projection.

    .venv/bin/python benchmarks/bench_fisher_7b.py [--record] [--out outputs/bench-fisher-7b]
    .venv/bin/python benchmarks/bench_fisher_7b.py --hidden 1024 --intermediate 5632 --heads 16 --kv-heads 4  # mid
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import emit  # noqa: E402

LAYERS_7B = 28  # Qwen2.5-7B's depth, for the projection
RESULTS = REPO / "benchmarks" / "results" / "fisher_7b.json"

#: Runs a command and prints its wall time and the peak RSS of its process tree (this wrapper imports nothing big,
#: so RUSAGE_CHILDREN's maximum is the command's).
_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
print(json.dumps({"rc": rc, "wall_seconds": time.perf_counter() - start,
                  "peak_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}))
"""


def build(out: Path, hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int) -> tuple[Path, Path, Path]:
    """The planted pair and the records (reused when present)."""
    base, finetuned, data = out / "base", out / "finetuned", out / "data.jsonl"
    if (finetuned / "config.json").is_file() and data.is_file():
        return base, finetuned, data
    from lora_ranks.synthetic import synthetic_records, train_tokenizer, write_planted_pair, write_synthetic_dataset

    tokenizer = train_tokenizer([json.dumps(r) for r in synthetic_records(100, fmt="mixed", seed=0)])
    write_planted_pair(base, finetuned, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, vocab_size=len(tokenizer), planted_rank=(16, 48, 96),
                       dtype="bfloat16")
    for folder in (base, finetuned):
        tokenizer.save_pretrained(folder)
    write_synthetic_dataset(data, 1700, fmt="mixed")  # ~8.5k records: the 1% subset has > 80
    return base, finetuned, data


def run_cli(args: list[str]) -> dict:
    cmd = [sys.executable, "-c", _WRAPPER, str(REPO / ".venv" / "bin" / "lora-ranks"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0 or not result.stdout.strip():
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{result.stderr[-3000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    if out["rc"] != 0:
        raise SystemExit(f"lora-ranks {' '.join(args)} exited {out['rc']}:\n{result.stderr[-3000:]}")
    return out


def split(out_dir: Path) -> dict:
    """The time split the rank config and layer files record."""
    from safetensors import safe_open

    from lora_ranks.analysis import OutputLayout, spectra_files
    from lora_ranks.config import load_rank_config

    layout = OutputLayout(out_dir)
    config = load_rank_config(layout.config_path)
    meta = config.analysis_metadata
    weight_seconds = weighted_seconds = 0.0
    methods = set()
    for path in spectra_files(layout.svd_dir):
        with safe_open(str(path), framework="pt") as handle:
            info = json.loads(handle.metadata()["modules"])
        for facts in info.values():
            if facts["spectrum"] == "weight":
                weight_seconds += facts["seconds"]
            else:
                weighted_seconds += facts["seconds"]
                methods.add(facts["method"])
    curvature = meta.curvature
    timings = meta.timings
    return {"analysis_seconds": timings.analysis_seconds, "discovery_seconds": timings.discovery_seconds,
            "spectra_wall_seconds": timings.spectra_wall_seconds, "layer_task_seconds": timings.layer_task_seconds,
            "weight_matrix_seconds": weight_seconds, "weighted_matrix_seconds": weighted_seconds,
            "weighted_methods": sorted(methods),
            "curvature_seconds": curvature.seconds if curvature else None,
            "accumulation_seconds": curvature.accumulation_seconds if curvature else None,
            "load_seconds": curvature.load_seconds if curvature else None,
            "passes": curvature.passes if curvature else None,
            "calibration_tokens": curvature.tokens if curvature else None,
            "ranks": config.ranks}


_FORMED_STEPS = """
import json, time, torch
d, short = {wide}, {short}
gen = torch.Generator().manual_seed(0)
rows = torch.randn(d, 4000, generator=gen)  # (d, n): a factor of 4000 tokens
start = time.perf_counter()
factor = (rows @ rows.T).double() / 4000  # the wide factor, float64 (2.9 GB at 18944)
accumulate = time.perf_counter() - start
del rows
factor.diagonal().add_(0.01 * float(factor.diagonal().mean()))
start = time.perf_counter()
lower = torch.linalg.cholesky(factor)
cholesky = time.perf_counter() - start
del factor
delta = torch.randn(d, short, generator=gen, dtype=torch.float64)
start = time.perf_counter()
product = lower.T @ delta
product_seconds = time.perf_counter() - start
print(json.dumps({{"accumulate_4000_tokens": accumulate, "cholesky": cholesky, "root_times_delta": product_seconds}}))
"""


def formed_steps(wide: int, short: int) -> dict:
    """Seconds of the formed path's steps at one wide factor, in a fresh process."""
    result = subprocess.run([sys.executable, "-c", _FORMED_STEPS.format(wide=wide, short=short)], capture_output=True,
                            text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"formed-factor steps failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench-fisher-7b")
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--intermediate", type=int, default=18944)
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--calibration-records", type=int, default=80)
    parser.add_argument("--no-formed-steps", action="store_true", help="skip the formed-factor step timings")
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base, finetuned, data = build(out, args.hidden, args.intermediate, args.heads, args.kv_heads, args.layers)
    print(f"pair and records ready in {time.perf_counter() - start:.0f} s: {out}", flush=True)

    runs = {}
    common = ["analyze", "--base", str(base), "--finetuned", str(finetuned), "--device", "cpu", "--overwrite"]
    for label, extra in (("weight", ["--spectrum", "weight"]),
                         ("fisher", ["--data", str(data), "--spectrum", "fisher",
                                     "--calibration-records", str(args.calibration_records)])):
        folder = out / f"analysis-{label}"
        shutil.rmtree(folder, ignore_errors=True)  # no cache: each run computes everything
        measured = run_cli([*common, "--out", str(folder), *extra])
        runs[label] = {**measured, **split(folder)}
        print(f"{label}: {measured['wall_seconds']:.1f} s, peak {measured['peak_gb']:.2f} GB", flush=True)
    formed = None if args.no_formed_steps else formed_steps(args.intermediate, args.hidden)

    w, f = runs["weight"], runs["fisher"]
    per_layer = {k: r["spectra_wall_seconds"] / args.layers for k, r in runs.items()}  # layers run side by side
    fixed = {k: r["wall_seconds"] - r["spectra_wall_seconds"] - (r["curvature_seconds"] or 0) for k, r in runs.items()}
    # Whole-7B projection on this CPU: fixed costs and the model load once, the layers' spectra 14x; each pass over
    # the calibration records runs the whole model (28 layers: 14x the forward and backward of 2; the real model's
    # 152k-token head is left out), at the number of passes the automatic factor memory gives on a 128 GB machine
    # (``plan_passes``), and at the 4 GiB that was the default before; the factors' forming scales with the layers.
    passes_7b, passes_4gb = _passes_7b(args), _passes_7b(args, 4.0)
    model_pass_seconds = (f["curvature_seconds"] - f["accumulation_seconds"] - f["load_seconds"]) / max(1, f["passes"])
    project = {
        "weight": fixed["weight"] + LAYERS_7B * per_layer["weight"],
        "fisher": fixed["fisher"] + f["load_seconds"] + LAYERS_7B * per_layer["fisher"]
        + passes_7b * model_pass_seconds * LAYERS_7B / args.layers
        + f["accumulation_seconds"] * LAYERS_7B / args.layers,
    }
    one_pass_gb = _one_pass_gb(args)
    project["fisher_one_pass"] = project["fisher"] - (passes_7b - 1) * model_pass_seconds * LAYERS_7B / args.layers
    project["fisher_4gb"] = project["fisher"] + (passes_4gb - passes_7b) * model_pass_seconds * LAYERS_7B / args.layers
    rows = [
        ("wall time (s)", f"{w['wall_seconds']:.1f}", f"{f['wall_seconds']:.1f}",
         f"{f['wall_seconds'] / w['wall_seconds']:.2f}x"),
        ("peak memory (GB)", f"{w['peak_gb']:.2f}", f"{f['peak_gb']:.2f}", f"{f['peak_gb'] / w['peak_gb']:.2f}x"),
        ("curvature collection (s)", "-", f"{f['curvature_seconds']:.1f}", ""),
        ("  of it loading the model and records (s)", "-", f"{f['load_seconds']:.1f}", ""),
        ("  of it forming the factors (s)", "-", f"{f['accumulation_seconds']:.1f}", ""),
        ("  of it the model's forward and backward (s)", "-",
         f"{f['curvature_seconds'] - f['load_seconds'] - f['accumulation_seconds']:.1f}", ""),
        ("layer spectra, wall per layer (s)", f"{per_layer['weight']:.1f}", f"{per_layer['fisher']:.1f}",
         f"{per_layer['fisher'] / per_layer['weight']:.2f}x"),
        ("  weight matrices, summed (s)", f"{w['weight_matrix_seconds']:.1f}", f"{f['weight_matrix_seconds']:.1f}", ""),
        ("  weighted matrices, summed (s)", "-", f"{f['weighted_matrix_seconds']:.1f}", ""),
        ("start, preflight, assembly, report (s)", f"{fixed['weight']:.1f}", f"{fixed['fisher']:.1f}", ""),
        (f"projected {LAYERS_7B}-layer 7B, this CPU's speed, the automatic factor memory on a "
         f"{PROJECTION_MACHINE_GB} GB machine (min; {passes_7b} pass(es))", f"{project['weight'] / 60:.0f}",
         f"{project['fisher'] / 60:.0f}", f"{project['fisher'] / project['weight']:.2f}x"),
        (f"  the same in one pass (`--factor-memory-gb {one_pass_gb:.0f}`) (min)", "",
         f"{project['fisher_one_pass'] / 60:.0f}", f"{project['fisher_one_pass'] / project['weight']:.2f}x"),
        (f"  the same at `--factor-memory-gb 4`, the default before (min; {passes_4gb} passes)", "",
         f"{project['fisher_4gb'] / 60:.0f}", f"{project['fisher_4gb'] / project['weight']:.2f}x"),
    ]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    table = [f"### Fisher vs weight analysis at {args.layers} layers of hidden {args.hidden}, intermediate "
             f"{args.intermediate}, heads {args.heads}/{args.kv_heads} ({date.today()}, {machine})", "",
             f"`lora-ranks analyze --spectrum weight` vs `--spectrum fisher --calibration-records "
             f"{args.calibration_records}` ({f['calibration_tokens']} calibration tokens, {f['passes']} pass(es); "
             f"weighted spectra by {', '.join(f['weighted_methods'])}), each in a fresh process, no cache.", "",
             "| | weight | fisher | ratio |", "|---|---:|---:|---:|"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    if formed is not None:
        formed_layer = 3 * (formed["cholesky"] + formed["root_times_delta"])
        table += ["", f"The formed-factor path at one {args.intermediate}-wide factor (own process): forming it from "
                  f"4000 tokens {formed['accumulate_4000_tokens']:.1f} s, its Cholesky factorization "
                  f"{formed['cholesky']:.1f} s, the root times the delta {formed['root_times_delta']:.1f} s: "
                  f"{formed_layer:.0f} s per layer for the three wide factors, before any spectrum, and 2.9 GB each."]
    emit("\n".join(table), args.record)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {"date": str(date.today()), "machine": machine, "shapes": vars(args), "runs": runs,
               "formed_steps": formed, "projection_seconds": project, "passes_7b": passes_7b,
               "passes_7b_at_4gb": passes_4gb}
    key = f"{args.hidden}x{args.intermediate}"
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    RESULTS.write_text(json.dumps({**previous, key: payload}, indent=1, sort_keys=True) + "\n")


def _modules_7b(args):
    from lora_ranks.checkpoints import ModuleRef

    head = args.hidden // args.heads
    shapes = {"q_proj": (args.hidden, args.hidden), "k_proj": (args.kv_heads * head, args.hidden),
              "v_proj": (args.kv_heads * head, args.hidden), "o_proj": (args.hidden, args.hidden),
              "gate_proj": (args.intermediate, args.hidden), "up_proj": (args.intermediate, args.hidden),
              "down_proj": (args.hidden, args.intermediate)}
    return [ModuleRef(f"model.layers.{i}.{n}", "", s, f"model.layers.{i}", i, n)
            for i in range(LAYERS_7B) for n, s in shapes.items()]


def _one_pass_gb(args) -> float:
    """GiB of factors (and float32 deltas of the projected modules) of all 28 layers: the budget for one pass."""
    from lora_ranks.kfac import factor_bytes
    from lora_ranks.settings import CurvatureSettings

    limit = CurvatureSettings().dense_factor_limit
    return sum(factor_bytes(m, "fisher", limit) for m in _modules_7b(args)) / 2**30 + 1


#: The projection's machine for the automatic factor memory: 128 GB (the GPU machine's host), the 28-layer model loaded
#: in float32 (Qwen2.5-7B: 7.6 B parameters, 30.5 GB) and ~4 GB of everything else.
PROJECTION_MACHINE_GB, MODEL_7B_GB, OTHER_GB = 128, 30.5, 4


def _passes_7b(args, memory_gb: float | None = None) -> int:
    """Passes over the calibration records a 28-layer model of these shapes needs with ``memory_gb`` GiB of factors per
    pass; None: the automatic default (half the memory available once the model is loaded) on the projection's
    machine (``PROJECTION_MACHINE_GB``)."""
    from lora_ranks.kfac import plan_passes
    from lora_ranks.settings import CurvatureSettings

    if memory_gb is None:
        memory_gb = (PROJECTION_MACHINE_GB - MODEL_7B_GB - OTHER_GB) / 2
    return len(plan_passes(_modules_7b(args), "fisher", int(memory_gb * 2**30),
                           CurvatureSettings().dense_factor_limit))


if __name__ == "__main__":
    main()
