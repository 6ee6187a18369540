"""Benchmark: how cheap can the Fisher spectrum get before its ranks get worse? (issue 18, "cheaper Fisher factors")

On the cached pair of ``experiment_allocations.py`` (run it first: it builds ``<out>/analysis-pair`` and
``<out>/compare/allocation_fidelity.json``), side by side in one process:

* the analysis fine-tune, timed again here (what ``svd-analysis`` costs without curvature), and the weight-spectrum
  analysis;
* the Fisher analysis with fewer Monte-Carlo label draws (``--fisher-samples``) and fewer calibration records
  (``--max-samples`` of the subset) than the default 4 draws x 320 records: wall time, and its added share of the
  svd-analysis time (target of issue 18: <= 50%);
* the fidelity of each variant's budget allocation with its matching truncation: KL of base + extracted adapter to
  the fine-tuned model on the 200 held-out records, as a ratio of excess KL to uniform ranks' (the experiment's
  measure; 4 x 320 gave 0.88 / 0.75 / 0.70).

    .venv/bin/python benchmarks/bench_fisher_cost.py [--record] [--out outputs/experiment]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import emit  # noqa: E402
from benchmarks.experiment_allocations import _json, step_analysis_pair, step_data  # noqa: E402

#: (label draws per record, calibration records); (4, 320) is today's default on this experiment.
VARIANTS = ((4, 320), (2, 320), (1, 320), (4, 80), (1, 160), (1, 80))


def analyze(pair, train: Path, folder: Path, spectrum: str, samples: int, records: int) -> float:
    """Seconds of one ``analyze_checkpoints`` run (fresh folder: no cache)."""
    from lora_ranks.analysis import analyze_checkpoints
    from lora_ranks.settings import AllocationSettings, CurvatureSettings, FinetuneSettings

    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    analyze_checkpoints(*pair, folder, settings=AllocationSettings(min_rank=1, max_rank=64, smoothing="none"),
                        curvature=CurvatureSettings(spectrum=spectrum, fisher_samples=samples), calibration_data=train,
                        subset=FinetuneSettings(subset_ratio=0.2, max_samples=records, max_length=96, seed=0))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/experiment")
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    fidelity = _json(out / "compare" / "allocation_fidelity.json")  # the ceiling and uniform ranks' KL excess
    if fidelity is None or not (out / "analysis-pair" / "training_metrics.json").is_file():
        sys.exit(f"{out} has no cached experiment: run benchmarks/experiment_allocations.py first")

    from lora_ranks.analysis import config_curvature_roots, load_spectra, spectra_files
    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.config import load_rank_config
    from lora_ranks.evidence import DeltaBasis, eval_examples, fidelity_to, reference_outputs
    from lora_ranks.evidence.experiment import budget_ranks
    from lora_ranks.finetune import run_preliminary_finetune
    from lora_ranks.loading import load_model
    from lora_ranks.settings import FidelitySettings, FinetuneSettings

    train, eval_path = step_data(out)
    pair = step_analysis_pair(out, out / "base", train, argparse.Namespace(subset=0.2, ft_steps=60, ft_lr=3e-4))
    work = out / "fisher-cost"
    start = time.perf_counter()  # the analysis fine-tune again, timed in this run (the experiment's settings)
    run_preliminary_finetune(out / "base", train, work / "finetune", FinetuneSettings(
        subset_ratio=0.2, max_steps=60, epochs=10**6, batch_size=8, learning_rate=3e-4, max_length=96,
        gradient_checkpointing=False, seed=0), progress=False)
    finetune_s = time.perf_counter() - start
    weight_s = analyze(pair, train, work / "weight", "weight", 1, 320)
    svd_analysis_s = finetune_s + weight_s

    base, tokenizer = load_model(pair[0], dtype=torch.float32)
    finetuned, _ = load_model(pair[1], dtype=torch.float32)
    held_out = FidelitySettings()
    reference = reference_outputs(finetuned, eval_examples(eval_path, tokenizer, held_out.eval_samples,
                                                           held_out.eval_max_length), tokenizer.pad_token_id)
    ceiling = fidelity["ceiling_kl"]
    uniform_excess = {row["budget_rank"]: row["excess"] for row in fidelity["rows"]
                      if row["method"] == "uniform" and row["truncation"] == "weight"}
    modules = load_rank_config(work / "weight" / "configs" / "lora_rank_config.json").module_refs()
    per_module = sum(m.shape[0] + m.shape[1] for m in modules)
    rows = []
    for samples, records in VARIANTS:
        folder = work / f"fisher-{samples}x{records}"
        seconds = analyze(pair, train, folder, "fisher", samples, records)
        config = load_rank_config(folder / "configs" / "lora_rank_config.json")
        svd = folder / "analysis_outputs" / "svd"
        spectra = load_spectra(spectra_files(svd))
        basis = DeltaBasis(CheckpointPair(*pair), modules, config_curvature_roots(config, modules))
        ratios = []
        for r in args.budgets:
            ranks = budget_ranks(modules, spectra, r * per_module, min_rank=1, max_rank=64)
            kl = fidelity_to(reference, basis.apply(base, ranks))[0]
            ratios.append((kl - ceiling) / uniform_excess[r])
        rows.append((samples, f"{records} ({config.analysis_metadata.curvature.tokens:,})", seconds, ratios))
        print(samples, records, f"{seconds:.1f} s", [f"{x:.2f}" for x in ratios], flush=True)

    machine = f"CPU: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lines = [f"### Cheaper Fisher factors ({date.today().isoformat()}, {machine})", "",
             f"The experiment's analysis pair (Qwen3 6 layers, hidden 256). svd-analysis without curvature, timed in this "
             f"run: fine-tune {finetune_s:.1f} s + weight spectra {weight_s:.1f} s = {svd_analysis_s:.1f} s. Fidelity: "
             "excess KL of the Fisher budget allocation with its truncation / uniform ranks' (lower is better; "
             "uniform = 1). Command: `.venv/bin/python benchmarks/bench_fisher_cost.py`", "",
             "| label draws | calibration records (tokens) | Fisher analysis | added to svd-analysis | "
             + " | ".join(f"fidelity r = {r}" for r in args.budgets) + " |",
             "|---|---|---|---|" + "---|" * len(args.budgets)]
    for samples, records, seconds, ratios in rows:
        lines.append(f"| {samples} | {records} | {seconds:.1f} s | +{100 * (seconds - weight_s) / svd_analysis_s:.0f}% | "
                     + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    emit("\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
