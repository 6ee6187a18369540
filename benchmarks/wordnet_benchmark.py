"""A benchmark a researcher would trust (issue 37): WordNet 3.0 tasks on SmolLM2-135M-Instruct, every row at its own
plateau, a learning rate per row inside its grid, seeds that vary every random step, paired tests with
Holm-corrected p-values, compute with the preparation counted; resumable from committed per-row results.

1. Data (``lora_ranks.wordnet``, Debian's ``wordnet-base``): the lexicographer category of a single-sense noun
   (exact match, 24 categories), its definition (loss only) and the noun for a definition (exact match); train,
   validation and held-out records split by synset and lemma (nothing held out occurs in training; the split is
   tested). Baselines on the held-out category records: chance, the majority class, and the base model's
   zero-shot accuracy and loss, measured once (``baselines.json`` in the results folder).
2. ``lora-ranks compare`` (what a user types) with the core rows at the main budget (the parameters of uniform rank
   8): lora-ranks' default (Fisher water-filling, warm start), the same at rsLoRA's scaling, warm uniform ranks,
   PEFT's ``LoraConfig()`` as users get it (alpha 8) and rsLoRA (PEFT, alpha 16 / sqrt(8): the scale of lora-ranks
   at rsLoRA's scaling at uniform rank 8). Every seed prepares on its own (the brief fine-tune's stratified subset of
   the fit records, its data order, the calibration sample, the ranks, the warm start), then every row trains with
   early stopping on the validation split (evaluated every ``--eval-interval`` steps, stopped after ``--patience``
   evaluations without improvement, capped at ``--epochs``; the best checkpoint reported). Learning rates: a grid
   spaced 3x, each row trained at every rate on the first ``--tuning-seeds`` seeds (the choice: lowest mean
   validation loss), the grid extended on the chosen side until the choice is interior; the other seeds train at
   the chosen rate. Every finished row is committed to ``--results-dir`` (one JSON per row, seed and rate): a
   rerun, on a fresh clone too, trains only what is not there.
3. The summary: per row the held-out loss and accuracy (mean ± sd over seeds), the best step, the compute in FLOPs
   and wall time with the preparation; paired differences for the comparisons the README's decision table uses,
   with t-test p-values Holm-corrected over that family; for each row the compute it needs to reach the best
   validation loss of PEFT's ``LoraConfig()``, and its best validation loss within the compute lora-ranks' default
   spends in all; lora-ranks' default against a plain LoRA given its total compute (paired, in the Holm family).
4. Beyond the core (``--rows``, 3 seeds each): ``further`` trains LoRA-GA, PiSSA, EVA (ranks redistributed) and the
   full fine-tune to its own plateau (the ceiling; its own grid ``FULL_GRID``) beside lora-ranks' default, reusing
   the core's committed rows; ``budget2`` the core rows at uniform rank 2's parameters; ``default`` with
   ``--subset 0.03`` / ``0.1`` lora-ranks' default and warm uniform ranks at a larger brief fine-tune (the subset
   sweep: what the preparation buys), each design in a results folder of its own.

    .venv/bin/python benchmarks/wordnet_benchmark.py [--rows core|further|budget2|default] [--device cpu|cuda]
    .venv/bin/python benchmarks/wordnet_benchmark.py --summarize [--rows ...]   # tables from the committed results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import emit  # noqa: E402

SIZES = {"train": {"category": 2400, "definition": 300, "word": 300},
         "validation": {"category": 150, "definition": 40, "word": 60},
         "eval": {"category": 300, "definition": 100, "word": 200}}
"""Records per split and task. The pilot (PEFT's LoraConfig(), lr 2.7e-3, seed 0, on 2000 / 500 / 500 training
records) reached its best validation loss at step 300 of 8 records and stopped at 450 (3.4 s a step on one thread
of the shared CPU): the training set is as large as the core matrix's hours allow, weighted to the category task
(the accuracy target) and away from the definitions (the longest records, loss only)."""
GRID = (3e-4, 9e-4, 2.7e-3, 8.1e-3)
"""Four learning rates spaced 3x (extended by 3x on the chosen side while the choice is at an edge)."""
BUDGET = 8
"""The main budget: the trainable parameters of uniform rank 8 on every projection."""
PEERS_FURTHER = ("lora-ga", "pissa", "eva")
FULL_GRID = (1e-5, 3e-5, 1e-4, 3e-4)
"""The full fine-tune's learning rates (spaced 3x; extended like the rows' while at an edge)."""


def row_set(kind: str) -> tuple[int, dict, list]:
    """(budget, rows, comparisons) of a run of ``--rows kind``: rows as (label, init) -> name; comparisons as (row,
    reference) pairs, each on held-out loss and on category accuracy (the decision table's family).

    core: the five core rows at the main budget. budget2: the same at uniform rank 2's parameters (a second budget).
    further: lora-ranks' default against LoRA-GA, PiSSA, EVA (its ranks redistributed) and the full fine-tune (the
    ceiling), at the main budget. default: lora-ranks' default and warm uniform ranks alone (the subset sweep)."""
    budget = 2 if kind == "budget2" else BUDGET
    default, rslora_scale, warm_uniform = ((f"r{budget}-budget-fisher", "warm"), (f"r{budget}-budget-fisher-rslora",
                                                                                     "warm"), (f"r{budget}-uniform", "warm"))
    peft, rslora = (f"r{budget}-uniform", "default"), (f"r{budget}-uniform", "rslora")
    names = {default: "lora-ranks default (Fisher allocation, warm)", rslora_scale: "lora-ranks at rsLoRA's scale",
             warm_uniform: "warm uniform ranks", peft: "PEFT LoraConfig() (alpha 8)", rslora: "rsLoRA (PEFT, alpha 16)"}
    if kind == "default":
        return budget, {row: names[row] for row in (default, warm_uniform)}, [(default, warm_uniform)]
    if kind == "further":
        peers = {(f"r{budget}-uniform", peer): f"{peer} (PEFT)" for peer in PEERS_FURTHER}
        rows = {default: names[default], **peers, ("full-finetune", "full"): "full fine-tune (every parameter)"}
        return budget, rows, [(default, row) for row in rows if row != default]
    return budget, names, [(default, peft), (default, rslora), (default, warm_uniform), (rslora_scale, rslora),
                           (rslora_scale, default), (warm_uniform, peft)]


ROWS = row_set("core")[1]
DEFAULT, RSLORA_SCALE, WARM_UNIFORM, PEFT, RSLORA = ROWS


def build_data(out: Path, seed: int, sizes: dict) -> dict:
    """The WordNet splits under ``<out>/data`` (built once; deterministic for the database and the seed)."""
    from lora_ranks.wordnet import WordNetError, build_splits

    data = out / "data"
    if not (data / "wordnet.json").is_file():
        try:
            build_splits(data, sizes, seed=seed)
        except WordNetError as exc:
            sys.exit(f"lora-ranks: error: {exc}")
    return {split: str(data / f"{split}.jsonl") for split in sizes}


def baselines(base: str, paths: dict, results: Path, device: str) -> dict:
    """Chance, the majority class and the base model's zero-shot exact match (per task) and held-out loss; measured
    once and committed (``baselines.json``)."""
    path = results / "baselines.json"
    if path.is_file():
        return json.loads(path.read_text())
    import torch

    from lora_ranks._io import atomic_write_json
    from lora_ranks.data import load_records
    from lora_ranks.evidence.accuracy import checkable_records, exact_match_by_task
    from lora_ranks.evidence.comparison import eval_examples
    from lora_ranks.evidence.fidelity import held_out_loss
    from lora_ranks.loading import load_model
    from lora_ranks.wordnet import category_baselines

    start = time.perf_counter()
    model, tokenizer = load_model(base, dtype=torch.float32)
    model.to(device)
    scored = exact_match_by_task(model, tokenizer, checkable_records(paths["eval"], 10**6, tasks=("category", "word")),
                                 max_new_tokens=8, batch_size=32)
    record = {**category_baselines(load_records(paths["train"]), load_records(paths["eval"])),
              "zero_shot": {task: {"correct": m.correct, "n": m.n, "accuracy": m.accuracy} for task, m in scored.items()},
              "zero_shot_loss": held_out_loss(model, eval_examples(paths["eval"], tokenizer, 10**6, 128),
                                              tokenizer.pad_token_id),
              "seconds": time.perf_counter() - start}
    atomic_write_json(path, record)
    return record


def compare_command(base: str, paths: dict, out: Path, args) -> list[str]:
    """The ``lora-ranks compare`` command line (what a user would type)."""
    return [str(Path(sys.executable).with_name("lora-ranks")), "compare", "--model", base,
            "--data", paths["train"], "--validation-data", paths["validation"], "--eval-data", paths["eval"],
            # one comparison folder per design (the further rows share the core's: the same preparations)
            "--out", str(out / ("compare" if args.subset == 0.01 and args.rows in ("core", "further")
                                else f"compare-{args.rows}-subset{args.subset:g}")),
            "--results-dir", str(args.results_dir),
            "--spectrum", "fisher", "--min-rank", "1", "--max-rank", "64", "--smoothing", "none",
            "--finetune-max-length", "128", "--no-finetune-gradient-checkpointing",
            "--finetune-subset-ratio", str(args.subset), "--finetune-batch-size", "4",
            "--finetune-max-steps", str(args.finetune_max_steps),
            "--lora-max-steps", "1000000", "--lora-epochs", str(args.epochs), "--lora-batch-size", "8",
            "--lora-max-length", "128", "--no-lora-gradient-checkpointing", "--lora-dropout", "0",
            "--lora-warmup-ratio", "0.05",
            # float32 on every machine: the committed rows ran in float32 (no bf16 units where they ran), and a row
            # trained in bf16 must not join them (its key would differ, and its file name would not).
            "--finetune-precision", "float32", "--lora-precision", "float32",
            "--seeds", *map(str, args.seeds), "--seeded-preparation", "--tuning-seeds", str(args.tuning_seeds),
            "--budget-ranks", str(row_set(args.rows)[0]), "--allocations", "budget-fisher",
            *(["--alpha-variants", "rslora"] if args.rows != "default" else []),
            # further: the core run's design (same budget, allocations, alpha variants), so its rows are reused
            *(["--peers", "default", "rslora"] if args.rows in ("core", "budget2") else []),
            *(["--peers", *PEERS_FURTHER, "--full-finetune", "--full-learning-rates", *map(str, FULL_GRID)]
              if args.rows == "further" else []),
            "--learning-rates", *map(str, args.learning_rates),
            "--max-rate-extensions", "3", "--eval-interval", str(args.eval_interval), "--patience",
            str(args.patience), "--validation-samples", "1000000", "--eval-samples", "1000000",
            "--eval-max-length", "128", "--accuracy-samples", "1000000", "--accuracy-tasks", "category", "word",
            "--max-new-tokens", "8", "--accuracy-batch-size", "32"]


def run_compare(command: list[str], log: Path, device: str, threads: int | None, workers: int = 1) -> float:
    """Run the comparison (one training at a time; on ``device``; ``threads`` CPU threads when given), its log
    appended to ``log``; its wall time."""
    env = {**os.environ, "LORA_RANKS_TASK_RUNNER": "threads", "LORA_RANKS_MAX_WORKERS": str(workers)}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    with open(log, "a") as handle:
        done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"lora-ranks compare failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def summarize(results: Path, args, seconds: float | None) -> str:
    """The tables, from the committed results alone (a row missing seeds is shown with those it has)."""
    from lora_ranks.evidence.experiment import holm, paired_comparison
    from lora_ranks.evidence.runs import RowResult, choose_learning_rates

    budget, ROWS, COMPARISONS = row_set(args.rows)  # noqa: N806 (the module's names, for this set of rows)
    DEFAULT = next(iter(ROWS))  # noqa: N806
    PEFT, RSLORA = (f"r{budget}-uniform", "default"), (f"r{budget}-uniform", "rslora")  # noqa: N806
    runs = [RowResult(**{k: v for k, v in json.loads(p.read_text()).items() if k != "committed_key"})
            for p in sorted(results.glob("*-seed*-lr*.json"))]
    runs = [r for r in runs if r.seed in args.seeds]  # further's table: its 3 seeds, not the core's 5
    preparation = {int(p.stem.removeprefix("preparation-seed")): json.loads(p.read_text())
                   for p in results.glob("preparation-seed*.json")}
    base = json.loads((results / "baselines.json").read_text()) if (results / "baselines.json").is_file() else None
    tuning = args.seeds[:args.tuning_seeds]
    trials = [r for r in runs if r.seed in tuning and (r.label, r.init) in ROWS]
    chosen, record = choose_learning_rates(trials) if trials else ({}, {})
    final = {row: {r.seed: r for r in runs if (r.label, r.init) == row and row in chosen
                   and r.learning_rate == chosen[row] and not r.diverged} for row in ROWS}

    def accuracy(run, task: str = "category") -> float | None:
        correct, n = run.accuracy_by_task.get(task, (0, 0))
        return correct / n if n else None

    category = accuracy

    def prep(row, seed) -> tuple[float, float]:
        if row[1] != "warm":  # a peer's own initialization passes (EVA's, LoRA-GA's; their seconds are in its run's)
            run = final.get(row, {}).get(seed)
            return (run.preparation_flops if run else 0.0), 0.0
        p = preparation.get(seed, {})
        return p.get("total") or math.nan, p.get("seconds") or math.nan

    def mean_sd(values) -> str:
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return "—"
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return f"{mean:.4f} ± {sd:.4f}"

    def mean(values, spec: str) -> str:
        values = [v for v in values if v is not None and not math.isnan(v)]
        return format(sum(values) / len(values), spec) if values else "—"

    def pct(values) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "—"
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return f"{100 * mean:.1f}% ± {100 * sd:.1f}"

    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    title = {"core": "the core rows", "further": "further rows", "budget2": "the core rows at a second budget",
             "default": f"lora-ranks' default with a {100 * args.subset:g}% subset"}[args.rows]
    lines = [f"### WordNet on SmolLM2-135M: {title} at the plateau ({date.today().isoformat()}, {machine})", "",
             "`.venv/bin/python benchmarks/wordnet_benchmark.py " + " ".join(sys.argv[1:]) + "`"
             + (f" ({seconds / 3600:.1f} h this invocation)" if seconds else "") + ". Budget: the parameters of "
             f"uniform rank {budget}. Seeds {', '.join(map(str, args.seeds))}; learning rates tuned on seeds "
             f"{', '.join(map(str, tuning))} (grid {' / '.join(f'{lr:g}' for lr in args.learning_rates)}, "
             "extended 3x while at an edge), the other seeds at the chosen rate. Early stopping: validation every "
             f"{args.eval_interval} steps, patience {args.patience}, cap {args.epochs:g} epochs. Held-out loss: "
             "nats per response token on every held-out record; accuracy: exact match per task.", ""]
    if base:
        zs = base["zero_shot"]
        lines += [f"Baselines on the {base['n']} held-out category records: chance {100 * base['chance']:.1f}% "
                  f"(1 of {round(1 / base['chance'])}), majority class ({base['majority_class']}) "
                  f"{100 * base['majority']:.1f}%, the base model zero-shot {100 * zs['category']['accuracy']:.1f}%; "
                  f"word for a definition zero-shot {100 * zs['word']['accuracy']:.1f}% (n = {zs['word']['n']}); "
                  f"held-out loss of the base model {base['zero_shot_loss']:.4f}.", ""]
    lines += ["| row | seeds | lr (grid; at edge?) | held-out loss | category accuracy | word accuracy | best step "
              "(stopped) | train FLOPs to best + prep | wall s to best + prep | preparation's share (FLOPs; wall) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row, name in ROWS.items():
        seeds = final[row]
        if not seeds:
            lines.append(f"| {name} | 0 | — | — | — | — | — | — | — |")
            continue
        entry = record[f"{row[0]}/{row[1]}"]
        grid = "/".join(sorted(entry["per_seed"], key=float))
        rs = list(seeds.values())
        steps = ", ".join(f"{r.best_step} ({r.stopped})" for r in rs)
        flops = mean([r.best_train_flops + prep(row, r.seed)[0] for r in rs], ".3g")  # "—" until it is committed
        wall = mean([r.best_seconds + prep(row, r.seed)[1] for r in rs], ".0f")
        # what the preparation (the brief fine-tune, the curvature passes, the SVDs and roots, the warm start: all in
        # its wall seconds) is of the row's total compute to its best checkpoint
        share = [(prep(row, r.seed)[0] / (r.best_train_flops + prep(row, r.seed)[0]),
                  prep(row, r.seed)[1] / (r.best_seconds + prep(row, r.seed)[1])) for r in rs]
        share = f"{mean([a for a, _ in share], '.0%')}; {mean([b for _, b in share], '.0%')}"
        lines.append(f"| {name} | {len(rs)} | {chosen[row]:g} ({grid}; {'yes' if entry['at_edge'] else 'no'}) | "
                     f"{mean_sd([r.loss for r in rs])} | {pct([category(r) for r in rs])} | "
                     f"{pct([accuracy(r, 'word') for r in rs])} | "
                     f"{steps} | {flops} | {wall} | {share} |")
    # Paired comparisons, Holm-corrected over the family.
    tests = {}
    for mine, other in COMPARISONS:
        seeds = sorted(set(final[mine]) & set(final[other]))
        if len(seeds) < 2:
            continue
        for metric, get in (("held-out loss", lambda r: r.loss), ("category accuracy", category)):
            a = [get(final[mine][s]) for s in seeds]
            b = [get(final[other][s]) for s in seeds]
            if None in a or None in b:
                continue
            tests[(mine, other, metric)] = paired_comparison(a, b)
    # lora-ranks' default against a plain LoRA given its total compute (preparation and training to its stop): the
    # plain LoRA's best validation loss among its evaluations within that many FLOPs, paired by seed.
    at_compute = "validation loss at lora-ranks' total compute"
    for mine, other in ((DEFAULT, PEFT), (DEFAULT, RSLORA)) if PEFT in ROWS else ():
        a, b = [], []
        for seed in sorted(set(final[mine]) & set(final[other])):
            budget = final[mine][seed].train_flops + prep(mine, seed)[0]
            inside = [pt["validation_loss"] for pt in final[other][seed].validation_curve
                      if pt["train_flops"] + prep(other, seed)[0] <= budget]
            if inside and not math.isnan(budget):
                a.append(final[mine][seed].validation_loss)
                b.append(min(inside))
        if len(a) >= 2:
            tests[(mine, other, at_compute)] = paired_comparison(a, b)
    adjusted = holm({key: (v["p"] if v["p"] == v["p"] else 1.0) for key, v in tests.items()})
    lines += ["", f"Paired differences (row minus reference, mean ± SE over the seeds both have), two-sided t-test "
              f"p, Holm-corrected over these {len(tests)} comparisons; 'beats' = corrected p < 0.05.", "",
              "| row | reference | metric | difference | p | Holm p | verdict |", "|---|---|---|---|---|---|---|"]
    for (mine, other, metric), v in tests.items():
        better = v["mean"] < 0 if "loss" in metric else v["mean"] > 0
        verdict = ("beats" if better else "loses to") if adjusted[mine, other, metric] < 0.05 else "not established"
        scale = 1 if "loss" in metric else 100
        unit = " pt" if scale == 100 else ""
        lines.append(f"| {ROWS[mine]} | {ROWS[other]} | {metric} | {scale * v['mean']:+.4f} ± {scale * v['se']:.4f}"
                     f"{unit} (n = {v['n']}) | {v['p']:.3g} | {adjusted[mine, other, metric]:.3g} | {verdict} |")
    # Compute: to reach PEFT LoraConfig()'s best validation loss; best within lora-ranks' total compute.
    lines += [] if PEFT not in ROWS else [
              "", "Compute, per seed then averaged (validation curves; FLOPs of training to each evaluation plus the "
              "row's preparation): the total FLOPs at which a row first reaches the best validation loss of PEFT's "
              "LoraConfig() on the same seed, and a row's best validation loss within the FLOPs lora-ranks' default "
              "spends in all (its preparation and training up to its stop).", "",
              "| row | reaches LoraConfig()'s best (seeds) | FLOPs to reach it | best validation loss within "
              "lora-ranks' total |", "|---|---|---|---|"]
    for row, name in ROWS.items() if PEFT in ROWS else ():
        reached, flops, within = 0, [], []
        for seed, run in final[row].items():
            target = final[PEFT].get(seed)
            ours = final[DEFAULT].get(seed)
            p = prep(row, seed)[0]
            curve = [(pt["train_flops"] + p, pt["validation_loss"]) for pt in run.validation_curve]
            if target is not None:
                hit = next((f for f, v in curve if v <= target.validation_loss), None)
                if hit is not None:
                    reached += 1
                    flops.append(hit)
            if ours is not None:
                budget = ours.train_flops + prep(DEFAULT, seed)[0]
                inside = [v for f, v in curve if f <= budget]
                within.append(min(inside) if inside else None)
        lines.append(f"| {name} | {reached} of {len(final[row])} | "
                     f"{(sum(flops) / len(flops)) if flops else float('nan'):.3g} | {mean_sd(within)} |")
    plot_curves(final, prep, results.parent / f"{results.name}-{args.rows}.png", ROWS)
    raw = results.parent / f"{results.name}-{args.rows}.json"  # benchmarks/results/wordnet-smollm2-core.json
    raw.write_text(json.dumps({"learning_rate_choices": record, "baselines": base, "preparation": preparation,
                               "comparisons": [{"row": ROWS[m], "reference": ROWS[o], "metric": metric, **v,
                                                "holm_p": adjusted[m, o, metric]}
                                               for (m, o, metric), v in tests.items()],
                               "rows": {ROWS[row]: {str(s): {"loss": r.loss, "validation_loss": r.validation_loss,
                                                             "category_accuracy": category(r),
                                                             "best_step": r.best_step, "stopped": r.stopped,
                                                             "learning_rate": r.learning_rate}
                                                    for s, r in sorted(final[row].items())} for row in ROWS}},
                              indent=1, default=str) + "\n")
    return "\n".join(lines) + "\n"


def plot_curves(final: dict, prep, path: Path, rows: dict) -> None:
    """Validation loss against total FLOPs and against wall time (preparation included), one line per run, a colour
    per row; the best checkpoint of each run marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for colour, (row, name) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], rows.items()):
        for i, (seed, run) in enumerate(sorted(final[row].items())):
            flops, seconds = prep(row, seed)
            curve = run.validation_curve
            for ax, x, offset in ((axes[0], "train_flops", flops), (axes[1], "seconds", seconds)):
                xs = [p[x] + offset for p in curve]
                ax.plot(xs, [p["validation_loss"] for p in curve], color=colour, alpha=0.7, lw=1,
                        label=name if i == 0 and ax is axes[0] else None)
                best = next(p for p in curve if p["step"] == run.best_step)
                ax.plot([best[x] + offset], [best["validation_loss"]], "o", color=colour, ms=3)
    axes[0].set(xscale="log", xlabel="total FLOPs (preparation + training)", ylabel="validation loss (nats/token)")
    axes[1].set(xlabel="wall seconds (preparation + training, evaluations excluded)")
    axes[0].legend(fontsize=8)
    fig.suptitle("WordNet on SmolLM2-135M: every run to its plateau (dot: the checkpoint reported)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m", help="a known base (lora-ranks base) or a model folder")
    parser.add_argument("--out", default="outputs/wordnet-smollm2")
    parser.add_argument("--results-dir", type=Path, default=None, help="where rows are committed (default: "
                        "benchmarks/results/wordnet-smollm2 for core and further at --subset 0.01, else "
                        "wordnet-smollm2-<rows>-subset<share>: a committed row's file name does not say its "
                        "preparation, so rows of one name and another design need a folder of their own)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0-4 (core), 0-2 (the others)")
    parser.add_argument("--tuning-seeds", type=int, default=2)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=list(GRID))
    parser.add_argument("--epochs", type=float, default=3.0, help="the cap of a LoRA run, in epochs")
    parser.add_argument("--eval-interval", type=int, default=50, help="steps between validation evaluations")
    parser.add_argument("--patience", type=int, default=3, help="evaluations without improvement before stopping")
    parser.add_argument("--subset", type=float, default=0.01, help="the brief fine-tune's share of the fit records")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--sizes", type=json.loads, default=SIZES, help="JSON: split -> task -> records")
    parser.add_argument("--finetune-max-steps", type=int, default=100, help="cap of the brief fine-tune's steps")
    parser.add_argument("--workers", type=int, default=1, help="rows trained at once (LORA_RANKS_MAX_WORKERS): 1 on "
                        "a CPU; on a GPU several rows share it (each SmolLM2 row needs ~2 GB)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the training process (default: "
                        "torch's, one per core). On a CPU shared with other work, 1: two threads of a niced process, "
                        "one of them preempted, wait on each other at every parallel region (measured here: 13-18 s "
                        "per step with 2, 3-4 s with 1)")
    parser.add_argument("--rows", choices=("core", "further", "budget2", "default"), default="core",
                        help="core: the five core rows; further: LoRA-GA, PiSSA, EVA and the full fine-tune beside "
                        "lora-ranks' default; budget2: the core rows at uniform rank 2's parameters; default: "
                        "lora-ranks' default and warm uniform ranks only (the subset sweep, with --subset)")
    parser.add_argument("--summarize", action="store_true", help="only the tables, from the committed results")
    parser.add_argument("--record", action="store_true", help="append the tables to BENCHMARKS.md")
    args = parser.parse_args()
    if args.seeds is None:
        args.seeds = [0, 1, 2, 3, 4] if args.rows == "core" else [0, 1, 2]
    if args.results_dir is None:  # the core's folder for the rows of its design (or of distinct names); else their own
        shared = args.subset == 0.01 and args.rows in ("core", "further")  # one design: the same preparations
        args.results_dir = REPO / "benchmarks" / "results" / ("wordnet-smollm2" if shared
                                                             else f"wordnet-smollm2-{args.rows}-subset{args.subset:g}")
    args.results_dir = args.results_dir.resolve()
    seconds = None
    if not args.summarize:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            sys.exit("lora-ranks: error: --device cuda, but CUDA is not available here")
        out = Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        args.results_dir.mkdir(parents=True, exist_ok=True)
        from lora_ranks.bases import KNOWN_BASES, make_base

        base = str(make_base(args.base).path) if args.base in KNOWN_BASES else args.base
        paths = build_data(out, args.data_seed, args.sizes)
        baselines(base, paths, args.results_dir, args.device)
        seconds = run_compare(compare_command(base, paths, out, args), out / "compare.log", args.device, args.threads,
                              args.workers)
    emit(summarize(args.results_dir, args, seconds), args.record)


if __name__ == "__main__":
    main()
