"""Check: does this checkout give bit-identical results to an earlier revision? (For restructurings, issue 28.)

Runs the same small ``lora-ranks compare`` command from a git revision (default: the last commit before issue 28's
restructuring) and from this checkout, on the same inputs, and compares what it wrote: every held-out loss of every
row and seed, the fidelity table, the comparability check and each compared config's ranks. The inputs are the
demo's pair and data (``lora-ranks demo``), and the command exercises every row kind: budget ranks (uniform,
energy, water-filling on the weight / input / Fisher spectra, signal ranks), warm and cold inits, the full
fine-tune reference, the comparability check and the configs' fidelity. Two seeds, three LoRA steps: about two
minutes a revision on 2 cores.

    .venv/bin/python benchmarks/same_results.py [--rev 993b52b] [--record] [--extended]

``--extended`` also exercises what the comparison's rows do while they train: two learning rates chosen on seed 0,
early stopping (validation every step, patience 2), held-out curves, exact-match accuracy and PEFT's default peer;
it compares those rows' validation losses, curves, accuracies and rate choices too (about twice as long).

Exit status 1 when anything differs. Raw results: ``benchmarks/results/same_results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import emit  # noqa: E402

BEFORE_RESTRUCTURING = "993b52b"


EXTENDED = ["--learning-rates", "0.01", "0.03", "--tuning-seeds", "1", "--max-rate-extensions", "0",
            "--eval-interval", "1", "--patience", "2", "--curve-points", "2", "--accuracy-samples", "5",
            "--peers", "default"]


def compare_args(tree: Path, inputs: Path, out: Path, extended: bool = False) -> list[str]:
    """The command, with the LoRA dropout flag as that revision spells it (``--lora-lora-dropout`` before 0.3)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    help_text = subprocess.run([sys.executable, "-m", "flows.cli", "compare", "--help"], capture_output=True, text=True,
                               env=env, cwd=tree).stdout
    dropout = "--lora-dropout" if "--lora-dropout " in help_text or "--lora-dropout\n" in help_text else "--lora-lora-dropout"
    demo = inputs / "demo"
    return ["compare", "--model", str(REPO / "lora_ranks" / "assets" / "demo-base"),
            "--finetuned", str(demo / "saved_models" / "preliminary_finetune" / "finetuned"),
            "--data", str(inputs / "data.jsonl"), "--out", str(out), "--spectrum", "fisher", "--min-rank", "1",
            "--max-rank", "16", "--smoothing", "none", "--finetune-subset-ratio", "0.3", "--finetune-max-length", "64",
            "--no-finetune-gradient-checkpointing", "--lora-max-steps", "3", "--lora-epochs", "1000",
            "--lora-batch-size", "4", "--lora-learning-rate", "0.01", "--lora-max-length", "64",
            "--no-lora-gradient-checkpointing", dropout, "0", "--seeds", "0", "1", "--budget-ranks", "2",
            "--cold-baseline", "--full-finetune", "--comparability", "--eval-samples", "20",
            *(EXTENDED if extended else [])]


def run(tree: Path, inputs: Path, out: Path, extended: bool = False) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "PREFECT_HOME": str(out.parent / f"prefect-{out.name}"),
           "LORA_RANKS_TASK_RUNNER": "processes"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", *compare_args(tree, inputs, out, extended)], capture_output=True,
                          text=True, env=env, cwd=tree)
    if done.returncode != 0:
        sys.exit(f"lora-ranks compare failed from {tree}:\n{done.stderr[-3000:]}")


def outcome(out: Path) -> dict:
    """What a compare run wrote, reduced to the numbers that must not change (no timings, no paths)."""
    results = json.loads((out / "results.json").read_text())
    fidelity = json.loads((out / "allocation_fidelity.json").read_text())
    sensitivity = json.loads((out / "sensitivity.json").read_text())
    configs = {}
    for path in sorted((out / "configs").glob("*.json")):
        config = json.loads(path.read_text())
        configs[path.stem] = {"rank_pattern": config["rank_pattern"], "alpha_pattern": config["alpha_pattern"],
                              "trainable_parameters": config["trainable_parameters"]}
    trained = {f"{r['allocation']}/{r['init']}": [{k: run.get(k) for k in ("validation_loss", "accuracy", "steps",
                                                                        "best_step", "stopped", "validation_curve")}
                                                 for run in r.get("runs", [])] for r in results["rows"]}
    for runs in trained.values():  # wall times are not results
        for run in runs:
            run["validation_curve"] = [{k: v for k, v in p.items() if k != "seconds"} for p in run["validation_curve"] or []]
    return {"losses": {f"{r['allocation']}/{r['init']}": r["losses"] for r in results["rows"]},
            "training": {"runs": trained, "learning_rate_choices": results.get("learning_rate_choices"),
                         "curves": {f"{r['allocation']}/{r['init']}": [{k: v for k, v in p.items() if k != "seconds"}
                                                                       for p in r.get("curve") or []]
                                    for r in results["rows"]}},
            "fidelity": {"ceiling_kl": fidelity["ceiling_kl"],
                         "rows": [{k: r[k] for k in ("allocation", "truncation", "kl")} for r in fidelity["rows"]]},
            "sensitivity": sensitivity["spectra"], "configs": configs}


def max_difference(a, b) -> float:
    """The largest absolute difference between the numbers of two outcomes of the same shape (0.0: identical)."""
    if isinstance(a, dict):
        return max((max_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list):
        return max((max_difference(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b))
    return 0.0 if a == b else float("inf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default=BEFORE_RESTRUCTURING, help="the earlier revision to compare with")
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    parser.add_argument("--extended", action="store_true", help="also learning rates, early stopping, curves, "
                        "accuracy and a PEFT peer (module docstring)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "old"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old), args.rev], cwd=REPO, check=True)
        try:
            inputs = tmp / "inputs"
            subprocess.run([str(Path(sys.executable).with_name("lora-ranks")), "demo", "--out", str(inputs / "demo")],
                           check=True, capture_output=True, env={**os.environ, "PREFECT_HOME": str(tmp / "prefect-demo")})
            records = (inputs / "demo" / "demo_inputs" / "synthetic.jsonl").read_text().splitlines(keepends=True)
            (inputs / "data.jsonl").write_text("".join(records[:300]))
            run(old, inputs, tmp / "before", args.extended)
            run(REPO, inputs, tmp / "after", args.extended)
            before, after = outcome(tmp / "before"), outcome(tmp / "after")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=False)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    rows = [(part, before[part] == after[part]) for part in before]
    largest = {part: max_difference(before[part], after[part]) for part in before}

    def verdict(part: str) -> str:
        return "yes" if dict(rows)[part] else f"**no** (largest difference {largest[part]:.1e})"

    n_losses = sum(len(v) for v in before["losses"].values())
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / "same_results.json").write_text(json.dumps(
        {"date": date.today().isoformat(), "before": args.rev, "after": rev, "identical": dict(rows),
         "largest_difference": largest,
         "before_outcome": before, "after_outcome": after}, indent=1) + "\n")
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    lines = [f"### Same results before and after a restructuring ({date.today().isoformat()}, CPU: {machine})", "",
             f"`benchmarks/same_results.py`: one small `lora-ranks compare` (budget rank 2: uniform, energy, "
             f"water-filling on three spectra, signal ranks; warm and cold; full fine-tune; comparability; fidelity; "
             f"2 seeds) run from revision {args.rev} and from {rev} on the same demo pair and data. Raw: "
             "`benchmarks/results/same_results.json`.", "",
             "| what | compared | bit-identical |", "|---|---|---|",
             f"| held-out losses | {n_losses} (row x init x seed) | {verdict('losses')} |",
             f"| fidelity (KL per config and truncation) | {len(before['fidelity']['rows'])} + ceiling | "
             f"{verdict('fidelity')} |",
             f"| comparability (predicted and measured KL per module) | {len(before['sensitivity'])} spectra | "
             f"{verdict('sensitivity')} |",
             f"| compared configs (rank and alpha patterns, parameters) | {len(before['configs'])} | "
             f"{verdict('configs')} |",
             f"| training (validation losses and curves, accuracy, stopping, rate choices, held-out curves) | "
             f"{sum(len(v) for v in before['training']['runs'].values())} runs | {verdict('training')} |", ""]
    emit("\n".join(lines), args.record)
    return 0 if all(same for _, same in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
