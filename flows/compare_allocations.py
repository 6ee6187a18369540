"""Flow ``compare-allocations``: do data-driven ranks beat uniform ranks at equal parameter budget?

Steps:
    1. split the data into train and held-out records (or use ``eval_data_path``); the demo model brings its data;
    2. ranks: the ``svd-analysis`` flow on the train records (as a subflow; it fine-tunes first unless
       ``finetuned_model`` is given), optionally with its fidelity report on the held-out records;
    3. three rank configs at (about) equal trainable parameters: uniform, energy threshold, budget water-filling;
    4. train a LoRA from scratch for every config and seed (identical data, steps and seeds);
    5. held-out loss of every adapter;
    6. a table (mean +- std over seeds) and a plot, as files and UI artifacts.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Annotated, Optional

from flows._runtime import apply_defaults

apply_defaults()

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from pydantic import Field  # noqa: E402

from flows.svd_analysis import svd_analysis  # noqa: E402
from lora_ranks._io import atomic_write_json  # noqa: E402
from lora_ranks.config import load_rank_config  # noqa: E402
from lora_ranks.evidence import mean_and_std  # noqa: E402
from lora_ranks.finetune import FinetuneSettings  # noqa: E402
from lora_ranks.report import write_comparison_plot  # noqa: E402
from lora_ranks.synthetic import DEMO_MODEL  # noqa: E402
from tasks.evidence import allocation_configs_task, evaluate_adapter_task, split_data_task  # noqa: E402
from tasks.finetune import build_demo_inputs  # noqa: E402
from tasks.train import train_dynamic_lora_task  # noqa: E402


@flow(name="compare-allocations")
def compare_allocations(
    base_model: Annotated[str, Field(description=f"Base model folder or hub id, or '{DEMO_MODEL}'")] = DEMO_MODEL,
    finetuned_model: Annotated[Optional[str], Field(description="Fine-tuned model; empty = run the preliminary fine-tune")] = None,
    data_path: Annotated[Optional[str], Field(description="JSON/JSONL data (split into train / held-out)")] = None,
    eval_data_path: Annotated[Optional[str], Field(description="Separate held-out data; empty = split data_path")] = None,
    output_dir: Annotated[str, Field(description="Root output folder")] = "outputs/compare-allocations",
    energy_threshold: Annotated[float, Field(gt=0, le=1, description="tau of the energy-threshold ranks")] = 0.9,
    min_rank: Annotated[int, Field(ge=1, description="Lower rank bound")] = 4,
    max_rank: Annotated[int, Field(ge=1, description="Upper rank bound")] = 128,
    seeds: Annotated[list[int], Field(description="Training seeds (>= 3 for a spread)")] = [0, 1, 2],
    max_steps: Annotated[int, Field(ge=1, description="LoRA training steps")] = 100,
    learning_rate: Annotated[float, Field(gt=0, description="LoRA learning rate")] = 2e-4,
    batch_size: Annotated[int, Field(ge=1, description="Micro-batch size")] = 8,
    eval_fraction: Annotated[float, Field(gt=0, lt=1, description="Held-out share when splitting data_path")] = 0.2,
    finetune_steps: Annotated[int, Field(ge=1, description="Preliminary fine-tune steps")] = 100,
    finetune_learning_rate: Annotated[float, Field(gt=0, description="Preliminary fine-tune learning rate")] = 1e-4,
    subset_ratio: Annotated[float, Field(gt=0, le=1, description="Preliminary fine-tune subset fraction")] = 0.01,
    fidelity_report: Annotated[bool, Field(description="Also run the fidelity sweep on the held-out records")] = True,
) -> str:
    """Train uniform / energy / budget LoRAs at equal budget over several seeds; returns results.json's path."""
    logger = get_run_logger()
    out = Path(output_dir).resolve()
    if len(seeds) < 1:
        raise ValueError("seeds must list at least one seed")

    # Step 1: train / held-out split (the demo model brings its own synthetic data).
    if base_model == DEMO_MODEL:
        base_model, data_path = build_demo_inputs(str(out / "demo_inputs"), data_path)
    if data_path is None:
        raise ValueError("data_path is required (records to fine-tune, train and evaluate on)")
    if eval_data_path is None:
        train_path, eval_data_path = split_data_task(data_path, str(out / "data"), eval_fraction)
    else:
        train_path = data_path

    # Step 2: ranks (and the optional fidelity report), from the train records only.
    config_path = svd_analysis(base_model=base_model, finetuned_model=finetuned_model, data_path=train_path,
                               output_dir=str(out / "analysis"), energy_threshold=energy_threshold, min_rank=min_rank,
                               max_rank=max_rank, finetune_steps=finetune_steps, learning_rate=finetune_learning_rate,
                               subset_ratio=subset_ratio, fidelity_report=fidelity_report, eval_data_path=eval_data_path)
    config = load_rank_config(config_path)
    pretrained = config["analysis_metadata"]["checkpoints"]["pretrained"]["path"]
    svd_dir = str(out / "analysis" / "analysis_outputs" / "svd")

    # Step 3: equal-budget configs.
    configs = allocation_configs_task(config_path, svd_dir, str(out / "configs"))

    # Step 4: train every config x seed.
    runs = [(label, seed) for label in configs for seed in seeds]
    trained = train_dynamic_lora_task.map(
        [pretrained] * len(runs), [configs[label] for label, _ in runs], [train_path] * len(runs),
        [str(out / "runs" / f"{label}-seed{seed}") for label, seed in runs],
        [FinetuneSettings(subset_ratio=1.0, max_samples=10**9, max_steps=max_steps, epochs=10**6,
                          learning_rate=learning_rate, batch_size=batch_size, seed=seed) for _, seed in runs])

    # Step 5: held-out loss.
    losses = evaluate_adapter_task.map([pretrained] * len(runs), [t.result().adapter_dir for t in trained],
                                       [eval_data_path] * len(runs), [label for label, _ in runs],
                                       [seed for _, seed in runs]).result()

    # Step 6: report.
    rows = []
    for label in configs:
        values = [loss for (l, _), loss in zip(runs, losses) if l == label]
        mean, std = mean_and_std(values)
        rows.append({"allocation": label, "trainable_parameters": load_rank_config(configs[label])["trainable_parameters"],
                     "loss_mean": mean, "loss_std": std, "losses": values, "seeds": list(seeds)})
    results = out / "results.json"
    atomic_write_json(results, {"rows": rows, "config": config_path, "train_data": train_path,
                                "eval_data": eval_data_path, "max_steps": max_steps, "learning_rate": learning_rate})
    plot = write_comparison_plot(out, rows)
    create_table_artifact(key="allocation-comparison", table=[{k: v for k, v in r.items() if k != "losses"} for r in rows],
                          description="Held-out loss at equal trainable parameters")
    image = base64.b64encode(Path(plot).read_bytes()).decode()
    lines = ["# Uniform vs data-driven ranks at equal budget", "", "| allocation | parameters | held-out loss |", "|---|---|---|",
             *[f"| {r['allocation']} | {r['trainable_parameters']:,} | {r['loss_mean']:.4f} ± {r['loss_std']:.4f} |" for r in rows],
             "", f"![comparison](data:image/png;base64,{image})"]
    create_markdown_artifact(key="allocation-comparison-summary", markdown="\n".join(lines))
    logger.info("Comparison: %s", json.dumps([{k: r[k] for k in ("allocation", "loss_mean", "loss_std")} for r in rows]))
    return str(results)


if __name__ == "__main__":
    compare_allocations()
