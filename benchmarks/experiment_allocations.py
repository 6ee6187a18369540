"""Reproducible CPU experiment: do dynamic ranks beat uniform ranks at equal budget? (issue 7)

1. A small Qwen3 (hidden 128, 4 layers) is built offline and trained on three synthetic tasks (add,
   reverse, upper) so that it has structure: this is the "pretrained" base.
2. The ``compare-allocations`` flow then runs the whole pipeline on a new task mix (sort, count, reverse):
   a held-out split; the brief full fine-tune on 1% of the train records; the spectral analysis with its
   fidelity report (tau sweep of extracted adapters, with budget and uniform ranks at equal parameters);
   LoRAs trained from scratch with uniform, energy-threshold and budget ranks at equal budget, 3 seeds each;
   held-out loss.
3. The tables are printed and, with --record, appended to BENCHMARKS.md.

    .venv/bin/python benchmarks/experiment_allocations.py [--record] [--out outputs/experiment]

Takes a few minutes on 2 CPU cores.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/experiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lora-steps", type=int, default=60)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    out = Path(args.out).resolve()

    from flows._runtime import apply_defaults

    apply_defaults()
    from flows.compare_allocations import compare_allocations
    from lora_ranks.finetune import run_preliminary_finetune
    from lora_ranks.settings import (
        AllocationSettings,
        ComparisonSettings,
        FidelitySettings,
        FinetuneSettings,
        LoRATrainingSettings,
    )
    from lora_ranks.synthetic import build_tiny_qwen3, synthetic_records, train_tokenizer, write_synthetic_dataset

    # Step 1: a base model with structure.
    tokenizer = train_tokenizer([json.dumps(r) for r in synthetic_records(150, fmt="mixed", seed=7)], vocab_size=512)
    scratch = build_tiny_qwen3(out / "scratch", hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
                               num_kv_heads=2, tokenizer=tokenizer)
    pretrain_data = write_synthetic_dataset(out / "pretrain.jsonl", 400, fmt="mixed", seed=1,
                                            tasks=("add", "reverse", "upper"))
    pretrained = run_preliminary_finetune(scratch, pretrain_data, out / "pretraining",
                                          FinetuneSettings(subset_ratio=1.0, max_steps=400, epochs=100, batch_size=16,
                                                           learning_rate=2e-3, gradient_checkpointing=False),
                                          progress=False)
    base = pretrained.finetuned_dir

    # Step 2: the whole pipeline on a new task mix.
    data = write_synthetic_dataset(out / "task.jsonl", 1000, fmt="mixed", seed=2, tasks=("sort", "count", "reverse"))
    results_path = compare_allocations(
        base_model=base, data_path=str(data), output_dir=str(out / "compare"),
        allocation=AllocationSettings(energy_threshold=0.9, min_rank=2, max_rank=64),
        comparison=ComparisonSettings(seeds=tuple(args.seeds)),
        training=LoRATrainingSettings(max_steps=args.lora_steps, epochs=10**6, learning_rate=2e-3, batch_size=16),
        finetune=FinetuneSettings(max_steps=100, learning_rate=1e-3, subset_ratio=0.01),
        fidelity=FidelitySettings(fidelity_report=True))

    # Step 3: tables.
    results = json.loads(Path(results_path).read_text())
    fidelity = json.loads((out / "compare" / "analysis" / "analysis_outputs" / "fidelity" / "fidelity.json").read_text())
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    lines = [f"### Dynamic vs uniform ranks at equal budget ({date.today().isoformat()}, CPU: {machine})", "",
             "Qwen3 hidden 128, 4 layers, pretrained here on add/reverse/upper, then fine-tuned (1% of 800 train "
             "records, 100 steps) on sort/count/reverse; 200 held-out records. Command: "
             "`.venv/bin/python benchmarks/experiment_allocations.py`", "",
             "Fidelity of extracted adapters (mean KL(fine-tuned || base + adapter), nats/token, held-out responses):", "",
             "| tau | parameters | energy ranks KL | budget ranks KL | uniform ranks KL |", "|---|---|---|---|---|"]
    energy_points = [p for p in fidelity["points"] if p["method"] == "energy"]
    for e in energy_points:
        same = {p["method"]: p for p in fidelity["points"]
                if p["method"] != "energy" and p["setting"] == e["trainable_parameters"]}
        lines.append(f"| {e['setting']:g} | {e['trainable_parameters']:,} | {e['mean_kl']:.4g} | "
                     f"{same['budget']['mean_kl']:.4g} ({same['budget']['trainable_parameters']:,}) | "
                     f"{same['uniform']['mean_kl']:.4g} ({same['uniform']['trainable_parameters']:,}) |")
    lines += ["", f"LoRA trained from scratch at equal budget (tau = 0.9 sets it), {args.lora_steps} steps, "
              f"seeds {args.seeds}; held-out loss, mean ± std:", "",
              "| allocation | parameters | held-out loss | per seed |", "|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['allocation']} | {r['trainable_parameters']:,} | {r['loss_mean']:.4f} ± {r['loss_std']:.4f} | "
                     + ", ".join(f"{v:.4f}" for v in r["losses"]) + " |")
    emit("\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
