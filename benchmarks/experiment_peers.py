"""Against what users pick instead (issue 29): lora-ranks' default against PEFT's LoRA variants and data-driven
inits, a learning rate chosen per row, on the experiment's model, through `lora-ranks compare`.

Inputs are those of ``experiment_allocations.py`` (cached under ``--out``): the 6.5M-parameter Qwen3 pretrained here
on the Python standard library, the shifted task mix (1,600 training, 200 held-out records), and the analysis pair
(a 60-step full fine-tune on a 20% stratified subset). Two regimes, each one `lora-ranks compare` run:

* ``short``: 30 LoRA steps (0.17 epoch), 5 seeds: the equal-steps view of earlier results.
* ``long``: ``--long-steps`` steps under the training's cosine schedule, which decays the rate to 0 by the last step,
  3 seeds, with held-out loss at ``--curve-points`` steps against FLOPs. The curves flatten because the rate
  reaches 0, not because training converged: no run here is shown to be at a plateau (no early stopping).

Rows at each budget (the parameters of uniform rank r): lora-ranks' default (Fisher water-filling, warm start from
the pair, its loss-aware truncation), warm uniform ranks, PEFT's ``LoraConfig()`` (the peer ``default``: alpha 8
since issue 37; the committed results of issues 24 and 29 ran it as the cold uniform row, alpha 2r), and the peers.
Every row's learning rate is chosen from ``--learning-rates`` (two or three rates, on the first seed only: several
choices sat at an edge of their grid) on a validation split of the training records; all rows train on the same
records (training less the validation split). The analysis pair is fixed: the seeds vary only the LoRA's init and
data order, not the subset, the fine-tune, the calibration, the ranks or the warm start. Accuracy: exact match of
greedy-decoded answers on up to 100 held-out records with a checkable answer. Per-seed results go to
``benchmarks/results/experiment_peers_<regime>.json``.

The committed results of this script were measured on data whose held-out records overlapped training (the licence
folder's symlinks, fixed since in ``pretrain.shifted_task_mix``) and carry no verdict: issue 37's
``benchmarks/wordnet_benchmark.py`` is the benchmark that does (early stopping, rates inside their grids, seeds that
vary every random step, Holm-corrected p-values).

``--base smollm2-135m`` runs the same on SmolLM2-135M-Instruct (issue 24; ``lora-ranks base``, a real model
dequantized from 4 bits), with the same data and its own analysis pair, under ``outputs/smollm2-135m``; results go
to ``benchmarks/results/smollm2-135m_peers_<regime>.json``. ``--regime matched`` without ``--matched-steps``
trains the cold LoRA for the FLOPs of lora-ranks' long-regime run, preparation included.

    .venv/bin/python benchmarks/experiment_peers.py --regime short [--record]
    .venv/bin/python benchmarks/experiment_peers.py --base smollm2-135m --regime long --budgets 8 ... [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import emit  # noqa: E402
from benchmarks.experiment_allocations import (  # noqa: E402
    _json,
    _setup,
    run_compare,
    step_analysis_pair,
    step_base,
    step_data,
)
from lora_ranks.bases import KNOWN_BASES, make_base  # noqa: E402

RESUMED = " (this invocation; finished rows resumed)"
PEERS = ("default", "rslora", "pissa", "olora", "eva", "corda", "lora-ga", "adalora")


def compare_command(out: Path, pair: tuple[str, str], train: Path, eval_path: Path, args) -> list[str]:
    """The ``lora-ranks compare`` command line of one regime (what a user would type). ``matched``: PEFT's default
    LoRA alone (cold uniform ranks), trained ``--matched-steps`` steps: the compute of lora-ranks' long-regime run,
    its preparation included."""
    long = args.regime in ("long", "matched")
    steps = {"short": 30, "long": args.long_steps, "matched": args.matched_steps}[args.regime]
    rows = (["--lora-init", "cold", "--allocations", "uniform"] if args.regime == "matched"
            else ["--allocations", "budget-fisher", "--peers", *args.peers])
    return [str(Path(sys.executable).with_name("lora-ranks")), "compare", "--model", pair[0], "--finetuned", pair[1],
            "--data", str(train), "--eval-data", str(eval_path), "--out", str(out / f"peers-{args.regime}"),
            "--spectrum", "fisher", "--min-rank", "1", "--max-rank", "64", "--smoothing", "none",
            "--finetune-subset-ratio", str(args.subset), "--finetune-max-length", "96", "--no-finetune-gradient-checkpointing",
            "--lora-max-steps", str(steps), "--lora-epochs", "1000000",
            "--lora-batch-size", str(args.lora_batch_size), "--lora-max-length", "96", "--no-lora-gradient-checkpointing",
            "--lora-dropout", "0", "--seeds", *map(str, args.seeds or ([0, 1, 2] if long else [0, 1, 2, 3, 4])),
            "--budget-ranks", *map(str, args.budgets), *rows, "--learning-rates", *map(str, args.learning_rates),
            "--curve-points", str(args.curve_points if long else 0), "--accuracy-samples", "100",
            "--max-new-tokens", "16",
            *(["--calibration-records", str(args.calibration_records)] if args.calibration_records else [])]


def _prefix(args) -> str:
    """The raw results' file prefix: experiment_peers (the 6.5M model) or <base>_peers (smollm2-135m_peers)."""
    return "experiment_peers" if args.base == "experiment" else f"{args.base}_peers"


def _on(args) -> str:
    """`` on <base>`` in a table's heading, for a base other than the experiment's model."""
    return "" if args.base == "experiment" else f" on {args.base} (dequantized from 4 bits)"


def matched_steps(out: Path) -> int:
    """Steps of a cold uniform LoRA whose FLOPs equal lora-ranks' default run of the long regime with its preparation
    (the smallest budget's rows)."""
    long = _json(out / "peers-long" / "results.json")
    if long is None:
        sys.exit("run --regime long first: the compute-matched steps come from its FLOPs")
    budget = min(r["budget_rank"] for r in long["rows"])
    ours = next(r for r in long["rows"] if r["budget_rank"] == budget and r["method"] == "budget-fisher"
                and r["init"] == "warm")
    cold = next(r for r in long["rows"] if r["budget_rank"] == budget and r["init"] in ("default", "cold"))
    per_step = cold["train_flops"] / long["training"]["max_steps"]
    return round((ours["train_flops"] + ours["preparation_flops"]) / per_step)


def run(out: Path, pair, train: Path, eval_path: Path, args) -> dict:
    """Run the regime's ``lora-ranks compare`` (log in ``<out>/peers-<regime>.log``); its rows resume from their
    ``row.json`` when interrupted. Returns its wall time and command."""
    return run_compare(compare_command(out, pair, train, eval_path, args), out / f"peers-{args.regime}.log",
                       out / f"peers-{args.regime}" / "seconds.json", args.workers, args.rerun)


def summarize_matched(out: Path, args, timing: dict) -> str:
    """The compute-matched plain LoRA against the long regime's lora-ranks default (same seeds: paired)."""
    from lora_ranks.evidence.experiment import paired_comparison

    matched = _json(out / "peers-matched" / "results.json")
    long = _json(out / "peers-long" / "results.json")
    lines = [f"### Compute-matched{_on(args)}: PEFT's default LoRA given lora-ranks' compute ({date.today().isoformat()})",
             "", f"`.venv/bin/python benchmarks/experiment_peers.py {' '.join(sys.argv[1:])}`"
             f" ({timing['seconds'] / 60:.1f} min): cold uniform ranks trained {args.matched_steps} steps, the FLOPs of "
             "lora-ranks' long-regime run with its preparation; learning rate chosen as in the long regime. Held-out "
             "loss, mean ± sd; paired difference to lora-ranks' default of the long regime (mean ± SE; negative: the "
             "plain LoRA is better).", "",
             "| budget | row | steps | lr | total FLOPs | held-out loss | minus lora-ranks default | accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for row in matched["rows"]:
        ours = next(r for r in long["rows"] if r["budget_rank"] == row["budget_rank"]
                    and r["method"] == "budget-fisher" and r["init"] == "warm")
        v = paired_comparison(row["losses"], ours["losses"])
        star = "*" if abs(v["mean"]) > 2 * v["se"] else ""
        lines.append(f"| {row['budget_rank']} | PEFT default, {args.matched_steps} steps | {args.matched_steps} | "
                     f"{row['learning_rate']:g} | {row['train_flops']:.2e} | {row['loss_mean']:.4f} ± "
                     f"{row['loss_std']:.4f} | {v['mean']:+.4f} ± {v['se']:.4f}{star} | "
                     f"{100 * row['accuracy_mean']:.1f}% ± {100 * row['accuracy_se']:.1f} |")
        lines.append(f"| {ours['budget_rank']} | lora-ranks default, {long['training']['max_steps']} steps | "
                     f"{long['training']['max_steps']} | {ours['learning_rate']:g} | "
                     f"{ours['train_flops'] + ours['preparation_flops']:.2e} | {ours['loss_mean']:.4f} ± "
                     f"{ours['loss_std']:.4f} | — | {100 * ours['accuracy_mean']:.1f}% ± "
                     f"{100 * ours['accuracy_se']:.1f} |")
    (REPO / "benchmarks" / "results" / f"{_prefix(args)}_matched.json").write_text(json.dumps(
        {"command": timing["command"], "seconds": timing["seconds"], "rows": matched["rows"],
         "learning_rate_choices": matched["learning_rate_choices"]}, indent=1) + "\n")
    return "\n".join(lines) + "\n"


def summarize(out: Path, args, timing: dict) -> str:
    from lora_ranks.evidence.experiment import paired_comparison

    results = _json(out / f"peers-{args.regime}" / "results.json")
    rows = results["rows"]
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    steps = results["training"]["max_steps"]
    seeds = rows[0]["seeds"]
    prep = results["preparation"]
    lines = [f"### Against PEFT's variants and inits{_on(args)}, {args.regime} regime: {steps} LoRA steps "
             f"({date.today().isoformat()}, CPU: {machine})", "",
             f"`.venv/bin/python benchmarks/experiment_peers.py {' '.join(sys.argv[1:])}`: `lora-ranks compare` in "
             f"{timing['seconds'] / 60:.1f} min{RESUMED if args.rerun else ''} ({len(rows)} rows x {len(seeds)} seeds, "
             f"learning rates {' / '.join(map(str, args.learning_rates))} tried per row on seed {seeds[0]}). Held-out loss on "
             "200 records (nats/token), mean ± sd over seeds; paired differences mean ± SE (negative: lower loss than the "
             "reference; * beyond 2 SE); accuracy: exact match on 100 held-out records with checkable answers, mean ± "
             f"SE over seeds. lora-ranks' preparation: {prep['total']:.3g} FLOPs (brief fine-tune "
             f"{prep['finetune']:.3g}, Fisher passes {prep['curvature']:.3g}), {prep['seconds']:.0f} s.", "",
             "| budget | row | parameters | lr | held-out loss | vs PEFT default | vs lora-ranks default | accuracy | "
             "FLOPs (train + prep) |", "|---|---|---|---|---|---|---|---|---|"]

    def name(row: dict) -> str:
        if row["init"] == "default":
            return "PEFT LoraConfig() (alpha 8)"
        if row["init"] == "cold":
            return "cold uniform (lora-ranks' alpha 2r)"
        if row["init"] == "warm":
            return "**lora-ranks default** (Fisher budget, warm)" if row["method"] == "budget-fisher" else "uniform, warm"
        return row["init"] + (" (served rank 2r)" if row.get("served_rank_factor") == 2 else "")

    def paired(v: dict | None) -> str:
        if not v:
            return "—"
        star = "*" if v["se"] and abs(v["mean"]) > 2 * v["se"] else ""
        return f"{v['mean']:+.4f} ± {v['se']:.4f}{star}"

    for budget in sorted({r["budget_rank"] for r in rows}):
        group = [r for r in rows if r["budget_rank"] == budget]
        default = next(r for r in group if r["method"] == "budget-fisher" and r["init"] == "warm")
        for row in sorted(group, key=lambda r: r["loss_mean"]):
            ours = None if row is default else paired_comparison(row["losses"], default["losses"])
            accuracy = (f"{100 * row['accuracy_mean']:.1f}% ± {100 * row['accuracy_se']:.1f}"
                        if row.get("accuracy_mean") is not None else "—")
            lines.append(f"| {budget} | {name(row)} | {row['trainable_parameters']:,} | {row['learning_rate']:g} | "
                         f"{row['loss_mean']:.4f} ± {row['loss_std']:.4f} | {paired(row.get('vs_default'))} | "
                         f"{paired(ours)} | {accuracy} | {row['train_flops']:.2e} + {row['preparation_flops']:.2e} |")
    if any(r.get("curve") for r in rows):
        lines += ["", "Held-out loss (64 records) at evaluation points, against total FLOPs (preparation + training), "
                  "mean over seeds:", "", "| budget | row | " + " | ".join(
                      f"step {p['step']}" for p in next(r for r in rows if r.get("curve"))["curve"]) + " |",
                  "|---|---|" + "---|" * len(next(r for r in rows if r.get("curve"))["curve"])]
        for row in (r for r in rows if r.get("curve")):
            lines.append(f"| {row['budget_rank']} | {name(row)} | " + " | ".join(
                f"{p['loss']:.3f} @ {p['total_flops']:.2e}" for p in row["curve"]) + " |")
    raw = REPO / "benchmarks" / "results" / f"{_prefix(args)}_{args.regime}{'-' + args.tag if args.tag else ''}.json"
    raw.write_text(json.dumps({"command": timing["command"], "seconds": timing["seconds"],
                               "learning_rate_choices": results["learning_rate_choices"],
                               "preparation": prep, "rows": rows}, indent=1) + "\n")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=("experiment", *KNOWN_BASES), default="experiment",
                        help="experiment: the 6.5M Qwen3 pretrained here; smollm2-135m: SmolLM2-135M-Instruct "
                        "(lora-ranks base), a real model dequantized from 4 bits")
    parser.add_argument("--out", default=None, help="default: outputs/experiment, or outputs/<base>")
    parser.add_argument("--calibration-records", type=int, default=None, help="records of the Fisher factors "
                        "(default: the whole fine-tuning subset)")
    parser.add_argument("--regime", choices=("short", "long", "matched"), default="short")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0-4 short, 0-2 long")
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 8], help="uniform-rank equivalents")
    parser.add_argument("--peers", nargs="+", default=list(PEERS))
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    parser.add_argument("--long-steps", type=int, default=900, help="LoRA steps of the long regime")
    parser.add_argument("--matched-steps", type=int, default=None, help="steps of the compute-matched plain LoRA "
                        "(default: lora-ranks' long-regime FLOPs, preparation included, over a cold LoRA step's)")
    parser.add_argument("--lora-batch-size", type=int, default=8)
    parser.add_argument("--curve-points", type=int, default=6, help="held-out evaluations during a long run")
    parser.add_argument("--subset", type=float, default=0.2, help="share of the training records the analysis pair sees")
    parser.add_argument("--ft-steps", type=int, default=60)
    parser.add_argument("--ft-lr", type=float, default=3e-4)
    parser.add_argument("--workers", type=int, default=2, help="trainings at a time, one process and thread each")
    parser.add_argument("--rerun", action="store_true", help="run lora-ranks compare again (finished rows resume)")
    parser.add_argument("--tag", default="", help="suffix of the raw results file (a second run of a regime with other "
                        "budgets or peers; finished rows are shared)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    out = Path(args.out or ("outputs/experiment" if args.base == "experiment" else f"outputs/{args.base}")).resolve()
    _setup()
    base = step_base(out) if args.base == "experiment" else make_base(args.base).path
    if args.regime == "matched" and args.matched_steps is None:
        args.matched_steps = matched_steps(out)
    train, eval_path = step_data(out)
    pair = step_analysis_pair(out, base, train, args)
    timing = run(out, pair, train, eval_path, args)
    emit((summarize_matched if args.regime == "matched" else summarize)(out, args, timing), args.record)


if __name__ == "__main__":
    main()
