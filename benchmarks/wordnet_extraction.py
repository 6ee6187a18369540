"""Extraction on a real pair (issue 37, item 8): SmolLM2-135M fully fine-tuned on the WordNet mix, compressed to an
adapter of a given size three ways, and each adapter scored against the fine-tune it stands for.

* **lora-ranks** (what a user types): ``lora-ranks analyze --spectrum fisher`` on the pair (calibration: the fit
  records), the Fisher water-filling config at each size (the comparison's ``r<r>-budget-fisher``), then
  ``lora-ranks extract`` (its loss-aware truncation).
* **mergekit-extract-lora** (mergekit 0.1.5, its own command): uniform rank r, the plain truncated SVD.
* **PEFT ``convert_to_lora``** at the largest energy threshold that fits the size (``extraction_peers.py``).

Size = the LoRA parameters of uniform rank r on the 210 projections. Scores on the held-out WordNet records: mean
KL(fine-tuned || base + merged adapter) per response token, its excess over the ceiling (full-rank deltas on the same
modules), the held-out loss, and exact-match accuracy on the category and word tasks beside the fine-tune's own.

The pair: ``--finetuned`` (a model folder), by default the full fine-tune of ``wordnet_benchmark.py --rows further``
(seed 0 at its chosen rate, its best checkpoint: ``<run>/model``). The brief fine-tune of a comparison's seed
(``--finetuned outputs/wordnet-smollm2/compare/seeds/seed0/analysis/saved_models/preliminary_finetune/finetuned``) is
a real pair too, and a quick check of this script.

    .venv/bin/pip install --no-deps --target outputs/mergekit-site mergekit==0.1.5 immutables   # once
    .venv/bin/python benchmarks/wordnet_extraction.py [--finetuned DIR] [--record]
"""

from __future__ import annotations

import argparse
import json
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
from benchmarks.extraction_peers import (  # noqa: E402
    adapter_parameters,
    convert_to_lora_adapter,
    merged,
    mergekit_adapter,
    table_rows,
)

RESULTS = REPO / "benchmarks" / "results" / "wordnet-smollm2"


def default_finetuned() -> Path:
    """The ``further`` rows' full fine-tune of seed 0 at its chosen rate (the rate of lowest mean validation loss
    over the tuning seeds, as the benchmark chooses it): its best checkpoint's folder."""
    from lora_ranks.evidence.runs import RowResult, choose_learning_rates

    trials = [RowResult(**{k: v for k, v in json.loads(p.read_text()).items() if k != "committed_key"})
              for p in sorted(RESULTS.glob("full-finetune-seed*-lr*.json"))]
    if not any(t.seed == 0 for t in trials):
        sys.exit("lora-ranks: error: no committed full fine-tune of seed 0 in benchmarks/results/wordnet-smollm2: run "
                 "`benchmarks/wordnet_benchmark.py --rows further` first, or give --finetuned")
    chosen, _ = choose_learning_rates([t for t in trials if t.seed in (0, 1)])
    best = next(t for t in trials if t.seed == 0 and t.learning_rate == chosen["full-finetune", "full"])
    model = Path(best.run_dir) / "model"
    if not (model / "config.json").is_file():
        sys.exit(f"lora-ranks: error: the full fine-tune's model {model} is not on this machine (its result is "
                 "committed, its weights are not): run `benchmarks/wordnet_benchmark.py --rows further` here, or "
                 "give --finetuned")
    return model


def lora_ranks(cli: str, *args: str) -> None:
    done = subprocess.run([cli, *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"lora-ranks {args[0]} failed: {(done.stderr or done.stdout)[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetuned", type=Path, default=None, help="the fine-tuned model folder (default above)")
    parser.add_argument("--data", type=Path, default=Path("outputs/wordnet-smollm2/data"),
                        help="the WordNet splits (wordnet_benchmark.py builds them)")
    parser.add_argument("--out", type=Path, default=Path("outputs/wordnet-smollm2/extraction"))
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--eval-records", type=int, default=600, help="held-out records scored (all 600 by default)")
    parser.add_argument("--results", type=Path, default=RESULTS.parent / "wordnet-extraction.json",
                        help="the raw results (JSON)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    import torch

    from lora_ranks.bases import make_base
    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.config import load_rank_config
    from lora_ranks.evidence import ComparisonLayout, DeltaBasis, fidelity_to, reference_outputs
    from lora_ranks.evidence.accuracy import checkable_records, exact_match_by_task
    from lora_ranks.evidence.comparison import eval_examples, write_allocation_configs
    from lora_ranks.evidence.experiment import parameters_of, uniform_ranks
    from lora_ranks.loading import load_model

    start = time.perf_counter()
    base_dir = str(make_base("smollm2-135m").path)
    ft_dir = str((args.finetuned or default_finetuned()).resolve())
    out = args.out.resolve()
    layout = ComparisonLayout(out)
    cli = str(Path(sys.executable).with_name("lora-ranks"))
    analysis_config = layout.analysis.root / "configs" / "lora_rank_config.json"
    # an analysis left in --out by an earlier run is reused only when it is of this pair (same fine-tuned weights)
    if analysis_config.is_file():
        earlier = load_rank_config(analysis_config)
        digest = CheckpointPair(base_dir, ft_dir).fingerprints(earlier.module_refs())[1]
    if not analysis_config.is_file() or earlier.checkpoints.finetuned.content_fingerprint != digest:
        lora_ranks(cli, "analyze", "--overwrite", "--base", base_dir, "--finetuned", ft_dir, "--data",
                   str(args.data / "train.jsonl"), "--out", str(layout.analysis.root), "--spectrum", "fisher",
                   "--min-rank", "1", "--max-rank", "64", "--smoothing", "none")
    configs = write_allocation_configs(analysis_config, layout, args.budgets)
    modules = load_rank_config(analysis_config).module_refs()
    pair = CheckpointPair(base_dir, ft_dir)
    eval_path = args.data / "eval.jsonl"
    finetuned, tokenizer = load_model(ft_dir, dtype=torch.float32)
    held_out = eval_examples(eval_path, tokenizer, args.eval_records, 128)
    reference = reference_outputs(finetuned, held_out, tokenizer.pad_token_id)
    scored = checkable_records(eval_path, args.eval_records, tasks=("category", "word"))

    def accuracy(model) -> dict:  # task -> {accuracy, correct, n}
        return {task: {"accuracy": m.accuracy, "correct": m.correct, "n": m.n}
                for task, m in exact_match_by_task(model, tokenizer, scored, 8, batch_size=32).items()}

    finetuned_accuracy = accuracy(finetuned)
    del finetuned
    base, _ = load_model(base_dir, dtype=torch.float32)
    ceiling = fidelity_to(reference, DeltaBasis(pair, modules).apply(base, {m.name: min(m.shape) for m in modules}))[0]
    del base
    rows = []
    for r in args.budgets:
        budget = parameters_of(modules, uniform_ranks(modules, r))
        adapters = {"lora-ranks extract (Fisher budget, its truncation)": (out / f"lora-ranks-r{r}", None)}
        lora_ranks(cli, "extract", "--base", base_dir, "--finetuned", ft_dir, "--config",
                   configs[f"r{r}-budget-fisher"], "--out", str(out / f"lora-ranks-r{r}"), "--overwrite")
        adapters["mergekit-extract-lora (uniform r)"] = (mergekit_adapter(base_dir, ft_dir, r, out / f"mergekit-r{r}"),
                                                         None)
        adapters["PEFT convert_to_lora (energy threshold)"] = convert_to_lora_adapter(base_dir, pair, modules, budget,
                                                                                      out / f"convert-r{r}")
        for method, (adapter, tau) in adapters.items():
            model = merged(base_dir, adapter)
            kl, loss, loss_ft = fidelity_to(reference, model)
            rows.append({"budget_rank": r, "budget": budget, "method": method, "tau": tau,
                         "parameters": adapter_parameters(adapter), "kl": kl, "excess": kl - ceiling, "loss": loss,
                         "loss_finetuned": loss_ft, "accuracy": accuracy(model)})
            print(f"r {r} {method}: KL {kl:.4f} (excess {kl - ceiling:.4f}), loss {loss:.4f}", flush=True)
    minutes = (time.perf_counter() - start) / 60
    args.results.write_text(json.dumps(
        {"finetuned": ft_dir, "ceiling_kl": ceiling, "finetuned_accuracy": finetuned_accuracy, "rows": rows,
         "eval_records": len(held_out), "minutes": minutes}, indent=1) + "\n")
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    lines = [f"### Extraction on a real pair: SmolLM2-135M fine-tuned on WordNet ({date.today().isoformat()}, CPU: "
             f"{machine})", "",
             "`.venv/bin/python benchmarks/wordnet_extraction.py " + " ".join(sys.argv[1:]) + f"` ({minutes:.0f} "
             f"min). Pair: {Path(ft_dir).relative_to(REPO) if Path(ft_dir).is_relative_to(REPO) else ft_dir}. "
             f"KL(fine-tuned || base + merged adapter) on {len(held_out)} held-out records, nats/token; ceiling "
             f"(full-rank deltas) {ceiling:.4f}; excess = KL − ceiling. Held-out loss of the fine-tune "
             f"{rows[0]['loss_finetuned']:.4f}; its exact match: category "
             f"{100 * finetuned_accuracy['category']['accuracy']:.1f}% (n = {finetuned_accuracy['category']['n']}), "
             f"word {100 * finetuned_accuracy['word']['accuracy']:.1f}% (n = {finetuned_accuracy['word']['n']}). Raw: "
             f"`{args.results.resolve().relative_to(REPO)}`.", "",
             "| size (uniform r) | method | parameters | KL | excess | lora-ranks' excess / this one's | held-out loss "
             "| category | word |", "|---|---|---|---|---|---|---|---|---|"]
    lines += table_rows(rows, args.budgets, lambda x: f" {100 * x['accuracy']['category']['accuracy']:.1f}% | "
                                                    f"{100 * x['accuracy']['word']['accuracy']:.1f}% |")
    emit("\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
