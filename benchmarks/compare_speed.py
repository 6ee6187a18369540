"""Benchmark: the experiment's ``lora-ranks compare`` matrix from an earlier revision and from this checkout, side by
side: wall time of each and whether the results are bit-identical (issue 25, item 5).

The matrix is ``experiment_allocations.py``'s (5 seeds x budget ranks 2, 4, 8: every allocation warm and cold,
the full fine-tune reference, the comparability check and each config's fidelity), on the experiment's cached
base, analysis pair and data (run ``experiment_allocations.py`` once first). Both runs use this checkout's
environment, two trainings at a time in worker processes (``LORA_RANKS_TASK_RUNNER=processes``), one after the
other on the same machine. The default earlier revision is the last one whose ``compare`` evaluated every trained
adapter in a task of its own (reloading base and adapter), after the Cholesky roots of item 1.

    .venv/bin/python benchmarks/compare_speed.py [--rev 9645cff] [--record] [--experiment outputs/experiment]

Raw results: ``benchmarks/results/compare_speed.json``. Exit status 1 when the results differ.
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
from benchmarks.same_results import max_difference, outcome  # noqa: E402

BEFORE = "9645cff"


def command(tree: Path, experiment: Path, out: Path) -> list[str]:
    """The experiment's compare arguments (``experiment_allocations.compare_command``, its defaults), with the LoRA
    dropout flag as ``tree`` spells it."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    help_text = subprocess.run([sys.executable, "-m", "flows.cli", "compare", "--help"], capture_output=True,
                               text=True, env=env, cwd=tree).stdout
    dropout = "--lora-dropout" if "--lora-dropout " in help_text or "--lora-dropout\n" in help_text else "--lora-lora-dropout"
    metrics = json.loads((experiment / "analysis-pair" / "training_metrics.json").read_text())
    return ["compare", "--model", metrics["pretrained_dir"], "--finetuned", metrics["finetuned_dir"],
            "--data", str(experiment / "data" / "train.jsonl"), "--eval-data", str(experiment / "data" / "eval.jsonl"),
            "--out", str(out), "--spectrum", "fisher", "--min-rank", "1", "--max-rank", "64", "--smoothing", "none",
            "--finetune-subset-ratio", "0.2", "--finetune-max-length", "96", "--finetune-learning-rate", "0.001",
            "--no-finetune-gradient-checkpointing", "--lora-max-steps", "30", "--lora-epochs", "1000000",
            "--lora-batch-size", "8", "--lora-learning-rate", "0.01", "--lora-max-length", "96",
            "--no-lora-gradient-checkpointing", dropout, "0", "--seeds", "0", "1", "2", "3", "4",
            "--budget-ranks", "2", "4", "8", "--cold-baseline", "--full-finetune", "--comparability"]


def run(tree: Path, experiment: Path, out: Path) -> float:
    """Wall seconds of the compare run from ``tree`` (its log beside ``out``)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PREFECT_HOME": str(out.parent / f"prefect-{out.name}"),
           "LORA_RANKS_TASK_RUNNER": "processes", "LORA_RANKS_MAX_WORKERS": "2"}
    args = command(tree, experiment, out)
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "flows.cli", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=tree)
    if done.returncode != 0:
        sys.exit(f"lora-ranks compare failed from {tree}; see {out.parent / f'{out.name}.log'}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default=BEFORE, help="the earlier revision")
    parser.add_argument("--experiment", default="outputs/experiment", help="experiment_allocations.py's output")
    parser.add_argument("--work", default=None, help="where both runs write (default: a temporary folder)")
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    experiment = (REPO / args.experiment).resolve()
    if not (experiment / "analysis-pair" / "training_metrics.json").is_file():
        sys.exit(f"no experiment at {experiment}: run benchmarks/experiment_allocations.py first")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work).resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        old = work / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old), args.rev], cwd=REPO, check=True)
        try:
            seconds = {"before": run(old, experiment, work / "before")}
            print(f"{args.rev}: {seconds['before'] / 60:.1f} min", flush=True)
            seconds["after"] = run(REPO, experiment, work / "after")
            print(f"this checkout: {seconds['after'] / 60:.1f} min", flush=True)
            before, after = outcome(work / "before"), outcome(work / "after")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=False)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    identical = {part: before[part] == after[part] for part in before}
    largest = {part: max_difference(before[part], after[part]) for part in before}
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / "compare_speed.json").write_text(json.dumps(
        {"date": date.today().isoformat(), "before": args.rev, "after": rev, "seconds": seconds,
         "identical": identical, "largest_difference": largest}, indent=1) + "\n")
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    n_losses = sum(len(v) for v in before["losses"].values())
    saved = 1 - seconds["after"] / seconds["before"]

    def verdict(part: str) -> str:
        return "yes" if identical[part] else f"no, largest difference {largest[part]:.1e}"

    lines = [f"### The experiment's compare matrix, {args.rev} vs {rev} ({date.today().isoformat()}, CPU: {machine})",
             "", "`benchmarks/compare_speed.py`: the same `lora-ranks compare` command (5 seeds x budget ranks 2, 4, "
             "8, warm and cold, full fine-tune, comparability, fidelity) from both revisions, one after the other, "
             "two trainings at a time. Raw: `benchmarks/results/compare_speed.json`.", "",
             "| | before | after | |", "|---|---:|---:|---:|",
             f"| wall time (min) | {seconds['before'] / 60:.1f} | {seconds['after'] / 60:.1f} | "
             f"{saved:.0%} faster |",
             f"| held-out losses bit-identical ({n_losses}) | | | {verdict('losses')} |",
             f"| fidelity bit-identical | | | {verdict('fidelity')} |",
             f"| comparability bit-identical | | | {verdict('sensitivity')} |",
             f"| configs identical | | | {'yes' if identical['configs'] else 'no'} |", ""]
    emit("\n".join(lines), args.record)
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
