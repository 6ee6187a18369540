"""Reproducible CPU experiment: do data-driven ranks beat uniform ranks at equal parameters? (issue 18)

0. Base: a Qwen3 (6 layers, hidden 256) pretrained here on the Python standard library's source
   (``python -m lora_ranks.pretrain --preset experiment``; ~20 minutes on 2 cores, cached in ``<out>/base``).
1. Data: a distribution-shifted task mix from offline text (license prose, naming stdlib test functions from
   their docstrings, templated sort/count/reverse; ``lora_ranks.pretrain.shifted_task_mix``): 1,600 training and
   200 held-out records.
2. The analysis pair: a brief full fine-tune of the base on a stratified subset of the training records (cached).
3. Everything else is the command a user runs, ``lora-ranks compare`` (flow ``compare-allocations``), on that
   pair: the Fisher spectrum (and, from the same factors, the input-weighted one) and every module's noise floor;
   at three budgets (the parameters of uniform ranks 2, 4 and 8) uniform ranks, energy-tau tuned to the budget and
   water-filling on the weight / input / Fisher spectra, and the signal ranks at their own budget; the fidelity of
   each config's extracted adapter (KL to the fine-tuned model, plain and loss-aware truncation; the ceiling of
   full-rank deltas); the comparability check (one module truncated at a time); a LoRA per config, seed and init
   (warm: extracted from the pair; cold: PEFT's), and a full fine-tune trained as long, per seed; paired
   differences against warm uniform ranks and the share of the gap to the full fine-tune each row closes.
4. This script prints the tables and checks the targets of issue 18.

Steps 0-2 are cached under ``<out>``, step 3 in ``<out>/compare`` (reused when the same command ran to the end,
unless ``--rerun``).
Trainings run two at a time in worker processes of one thread each (``LORA_RANKS_TASK_RUNNER=processes``).

    .venv/bin/python benchmarks/experiment_allocations.py [--record] [--out outputs/experiment]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import emit  # noqa: E402

METHODS = ("uniform", "energy", "budget-weight", "budget-input", "budget-fisher", "signal")


def _setup() -> None:
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _save(path: Path, obj) -> None:
    from lora_ranks._io import atomic_write_json

    atomic_write_json(path, obj)


def step_base(out: Path) -> Path:
    from lora_ranks.pretrain import PRESETS, pretrain_base

    base = out / "base"
    if not (base / "pretraining.json").is_file():
        pretrain_base(base, PRESETS["experiment"], progress=False)
    return base


def step_data(out: Path, n_eval: int = 200) -> tuple[Path, Path]:
    import random

    from lora_ranks.pretrain import shifted_task_mix

    train, evaluation = out / "data" / "train.jsonl", out / "data" / "eval.jsonl"
    if not train.is_file():
        from lora_ranks._io import atomic_write_text

        records = shifted_task_mix(600, seed=0)
        random.Random(1).shuffle(records)
        atomic_write_text(evaluation, "".join(json.dumps(r) + "\n" for r in records[:n_eval]))
        atomic_write_text(train, "".join(json.dumps(r) + "\n" for r in records[n_eval:]))
    return train, evaluation


def step_analysis_pair(out: Path, base: Path, train: Path, args) -> tuple[str, str]:
    from lora_ranks.finetune import run_preliminary_finetune
    from lora_ranks.settings import FinetuneSettings

    folder = out / "analysis-pair"
    if not (folder / "training_metrics.json").is_file():
        run_preliminary_finetune(base, train, folder, FinetuneSettings(
            subset_ratio=args.subset, max_steps=args.ft_steps, epochs=10**6, batch_size=8, learning_rate=args.ft_lr,
            max_length=96, gradient_checkpointing=False, seed=0), progress=False)
    metrics = _json(folder / "training_metrics.json")
    return metrics["pretrained_dir"], metrics["finetuned_dir"]


def compare_command(out: Path, pair: tuple[str, str], train: Path, eval_path: Path, args) -> list[str]:
    """The ``lora-ranks compare`` command line of the experiment (what a user would type)."""
    return [str(Path(sys.executable).with_name("lora-ranks")), "compare", "--model", pair[0], "--finetuned", pair[1],
            "--data", str(train), "--eval-data", str(eval_path), "--out", str(out / "compare"),
            "--spectrum", "fisher", "--min-rank", "1", "--max-rank", "64", "--smoothing", "none",
            "--finetune-subset-ratio", str(args.subset), "--finetune-max-length", "96",
            "--finetune-learning-rate", str(args.full_lr), "--no-finetune-gradient-checkpointing",
            "--lora-max-steps", str(args.lora_steps), "--lora-epochs", "1000000", "--lora-batch-size", "8",
            "--lora-learning-rate", str(args.lora_lr), "--lora-max-length", "96", "--no-lora-gradient-checkpointing",
            "--lora-dropout", "0", "--seeds", *map(str, args.seeds), "--budget-ranks", *map(str, args.budgets),
            "--cold-baseline", "--full-finetune", "--comparability"]


def run_compare(command: list[str], log_path: Path, timing_path: Path, workers: int, rerun: bool) -> dict:
    """Run a ``lora-ranks compare`` command (log appended to ``log_path``) unless ``timing_path`` records the same
    command finished before; its wall time and command (written to ``timing_path``)."""
    import subprocess

    if timing_path.is_file() and _json(timing_path)["command"] == command and not rerun:
        return _json(timing_path)  # the same command ran to the end before
    env = {**os.environ, "LORA_RANKS_TASK_RUNNER": "processes", "LORA_RANKS_MAX_WORKERS": str(workers)}
    start = time.perf_counter()
    with open(log_path, "a") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"lora-ranks compare failed (exit {done.returncode}); see {log_path}")
    record = {"seconds": time.perf_counter() - start, "command": command}
    _save(timing_path, record)
    return record


def step_compare(out: Path, pair, train: Path, eval_path: Path, args) -> dict:
    """Run ``lora-ranks compare`` (log in ``<out>/compare.log``) unless the same command's results are there; its
    wall time and command."""
    return run_compare(compare_command(out, pair, train, eval_path, args), out / "compare.log",
                       out / "compare" / "seconds.json", args.workers, args.rerun)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/experiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8], help="uniform-rank equivalents")
    parser.add_argument("--subset", type=float, default=0.2, help="share of the training records the analysis pair sees")
    parser.add_argument("--ft-steps", type=int, default=60)
    parser.add_argument("--ft-lr", type=float, default=3e-4)
    parser.add_argument("--lora-steps", type=int, default=30)
    parser.add_argument("--lora-lr", type=float, default=1e-2, help="best of 1e-3..3e-2 for cold and warm LoRAs (seed 0, r=2)")
    parser.add_argument("--full-lr", type=float, default=1e-3, help="best of 2e-4..3e-3 for the full fine-tune (seed 0)")
    parser.add_argument("--workers", type=int, default=2, help="trainings at a time, one process and thread each")
    parser.add_argument("--rerun", action="store_true", help="run lora-ranks compare again even if its results exist")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    _setup()
    started = time.perf_counter()
    base = step_base(out)
    base_seconds = time.perf_counter() - started
    train, eval_path = step_data(out)
    pair = step_analysis_pair(out, base, train, args)
    compare = step_compare(out, pair, train, eval_path, args)
    emit(summarize(out, args, compare, base_seconds), args.record)


def summarize(out: Path, args, compare: dict, base_seconds: float) -> str:
    """The experiment's tables from the files ``lora-ranks compare`` wrote, and the targets of issue 18."""
    from lora_ranks.config import load_rank_config

    root = out / "compare"
    results = _json(root / "results.json")
    fidelity = _json(root / "allocation_fidelity.json")
    sensitivity = _json(root / "sensitivity.json")
    pretraining = _json(out / "base" / "pretraining.json")
    analysis = load_rank_config(results["config"])
    curvature = analysis.analysis_metadata.curvature
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    ceiling = fidelity["ceiling_kl"]
    lines = [f"### Allocations at equal parameters, through `lora-ranks compare` ({date.today().isoformat()}, CPU: "
             f"{machine})", "",
             f"Base: Qwen3 6 layers, hidden 256, {pretraining['parameters']:,} parameters, pretrained here on the Python "
             f"standard library ({pretraining['tokens_seen']:,} tokens, held-out loss {pretraining['held_out_loss']:.3f}). "
             "Fine-tuning mix: license prose / naming stdlib tests from docstrings / sort-count-reverse; "
             f"{args.subset:.0%} subset for the analysis pair ({args.ft_steps} steps, lr {args.ft_lr:g}); Fisher "
             f"factors from {curvature.tokens:,} calibration tokens. Command: "
             "`.venv/bin/python benchmarks/experiment_allocations.py`, which runs:", "",
             "```", " ".join(Path(a).name if i == 0 else a.replace(f"{REPO}/", "") for i, a in enumerate(compare["command"])),
             "```", "",
             f"Wall time of `lora-ranks compare`: {compare['seconds'] / 60:.1f} min "
             f"({len(results['rows']) - 1} rows x {len(args.seeds)} seeds + full fine-tunes; the base "
             + ("was cached)." if base_seconds < 60 else f"took {base_seconds / 60:.0f} min more)."), "",
             f"**Fidelity** (mean KL(fine-tuned || base + extracted adapter), nats/token, {fidelity['eval_samples']} "
             f"held-out records; ceiling = full-rank deltas on the projections: {ceiling:.4f}; excess = KL − ceiling, "
             "relative to uniform ranks' with the plain truncation):", "",
             "| budget (uniform r) | parameters | allocation | truncation | KL | excess / uniform's |",
             "|---|---|---|---|---|---|"]
    for row in sorted(fidelity["rows"], key=lambda x: (x["budget_rank"] or 10**6, x["method"], x["truncation"])):
        ratio = f"{row['excess_ratio']:.2f}" if row["excess_ratio"] is not None else "—"
        lines.append(f"| {row['budget_rank'] or 'own'} | {row['trainable_parameters']:,} | {row['method']} | "
                     f"{row['truncation']} | {row['kl']:.4f} | {ratio} |")
    spectra = sensitivity["spectra"]
    lines += ["", f"**Comparability** (each module truncated alone to rank {sensitivity['rank']}, KL on "
              f"{sensitivity['eval_samples']} held-out records; Spearman of predicted vs measured KL over "
              f"{len(next(iter(spectra.values()))['rows'])} modules; plot `compare/sensitivity.png`): "
              + ", ".join(f"{kind} {v['spearman']:.2f}" for kind, v in spectra.items()), "",
              f"**Training** (LoRA, {args.lora_steps} steps, lr {args.lora_lr:g}, batch 8, on all training records; "
              f"held-out loss, seeds {args.seeds}; warm: from the adapter extracted from the analysis pair at the "
              "config's ranks with the analysis' loss-aware truncation, whatever the allocation; cold: PEFT's init; "
              "paired difference vs warm uniform ranks at the same budget "
              "(signal: the closest budget), mean ± std, t, p; gap closed: share of the gap between cold uniform "
              "ranks and the full fine-tune):", "",
              "| budget | allocation | init | parameters | held-out loss | vs warm uniform | t | p | gap closed |",
              "|---|---|---|---|---|---|---|---|---|"]
    rows = [r for r in results["rows"] if r["init"] != "full"]
    order = {m: i for i, m in enumerate(METHODS)}
    for row in sorted(rows, key=lambda r: (r["budget_rank"] or 10**6, order.get(r["method"], 99), r["init"] != "warm")):
        v = row["vs_uniform"]
        paired = (f"{v['mean']:+.4f} ± {v['std']:.4f} | {v['t']:.2f} | {v['p']:.3f}" if v and v["t"] is not None
                  else "— | — | —")
        gap = f"{100 * row['gap_closed']:.0f}%" if row["gap_closed"] is not None else "—"
        lines.append(f"| {row['budget_rank'] or 'own'} | {row['method']} | {row['init']} | "
                     f"{row['trainable_parameters']:,} | {row['loss_mean']:.4f} ± {row['loss_std']:.4f} | {paired} | {gap} |")
    full = next(r for r in results["rows"] if r["init"] == "full")
    lines += ["", f"Full fine-tune trained as long (all parameters, lr {args.full_lr:g}): held-out loss "
              f"{full['loss_mean']:.4f} ± {full['loss_std']:.4f}.", ""]
    lines += targets(rows, fidelity, args.budgets)
    return "\n".join(lines) + "\n"


def targets(rows: list[dict], fidelity: dict, budgets: list[int]) -> list[str]:
    """Issue 18's targets, checked on this run's numbers."""
    def row(method: str, init: str, r: int) -> dict | None:
        return next((x for x in rows if (x["method"], x["init"], x["budget_rank"]) == (method, init, r)), None)

    warm_gain = {r: row("uniform", "cold", r)["loss_mean"] - row("uniform", "warm", r)["loss_mean"]
                 for r in budgets if row("uniform", "cold", r)}
    fisher = {r: row("budget-fisher", "warm", r)["vs_uniform"] for r in budgets}
    wins = [r for r, v in fisher.items() if v and v["se"] and v["mean"] < -2 * v["se"]]
    best = {r: max((x for x in rows if x["budget_rank"] == r and x["gap_closed"] is not None),
                   key=lambda x: x["gap_closed"]) for r in budgets}
    ratios = {r["budget_rank"]: r["excess_ratio"] for r in fidelity["rows"]
              if r["method"] == "budget-fisher" and r["truncation"] == "fisher"}
    good = [r for r, x in ratios.items() if x is not None and x <= 0.6]
    return ["**Targets:**", "",
            "- warm start vs cold, uniform ranks: " + ", ".join(f"r = {r}: -{g:.3f}" for r, g in warm_gain.items()),
            f"- Fisher allocation (warm, its truncation) beats warm uniform by > 2 SE at >= 2 of {len(budgets)} budgets: "
            f"{'met' if len(wins) >= 2 else 'missed'} ({len(wins)}: "
            + ", ".join(f"r = {r}: {v['mean']:+.4f} (se {v['se']:.4f}, p {v['p']:.3f})" for r, v in fisher.items() if v)
            + ")",
            "- best configuration closes >= 50% of the gap: " + ("met" if any(b["gap_closed"] >= 0.5 for b in best.values())
                                                                  else "missed")
            + " (" + ", ".join(f"r = {r}: {100 * b['gap_closed']:.0f}% by {b['method']} {b['init']}"
                               for r, b in best.items()) + ")",
            f"- Fisher fidelity <= 0.6 x uniform's excess at >= 2 budgets: {'met' if len(good) >= 2 else 'missed'} ("
            + ", ".join(f"r = {r}: {x:.2f}" for r, x in sorted(ratios.items())) + ")", ""]


if __name__ == "__main__":
    main()
