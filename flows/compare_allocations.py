"""Flow ``compare-allocations``: do data-driven ranks beat uniform ranks at equal parameter budget?

Steps:
    0. ``claim-output``: refuse an output folder that would take anything of the user's, and mark a new one
       as this tool's (``lora_ranks.outputs``);
    1. split the data into train and held-out records (or use ``eval_data_path``); the demo model brings its data;
    2. ranks: the ``svd-analysis`` flow on the train records (as a subflow; it fine-tunes first unless
       ``finetuned_model`` is given), optionally with its fidelity report on the held-out records;
    3. rank configs at (about) equal trainable parameters: uniform, energy threshold, budget water-filling (with
       ``comparison.budget_ranks``: at each budget, water-filling on every spectrum the analysis has, the signal
       ranks, and the fidelity of every config's extracted adapter); with ``comparison.comparability``, whether the
       spectra predict what truncating one module costs;
    4. train a LoRA for every config and seed (identical data, steps and seeds), warm-started from the adapter
       extracted at its ranks unless ``training.init`` is "cold"; with ``comparison.cold_baseline`` also cold;
       with ``comparison.full_finetune`` a full fine-tune per seed, trained as long (the reference);
    5. held-out loss of every adapter;
    6. a table (mean +- std over seeds, paired differences to uniform ranks, the gap closed to the full fine-tune)
       and a plot, as files and UI artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from flows._runtime import apply_defaults, described, documented, task_runner

apply_defaults()

from prefect import flow, unmapped  # noqa: E402

from flows.svd_analysis import svd_analysis  # noqa: E402
from lora_ranks.config import load_rank_config  # noqa: E402
from lora_ranks.evidence import ComparisonLayout  # noqa: E402
from lora_ranks.settings import (  # noqa: E402
    INPUT_HELP,
    AllocationSettings,
    AlphaPolicy,
    AnalysisSettings,
    ComparisonSettings,
    CurvatureSettings,
    ExtractionSettings,
    FidelitySettings,
    FinetuneSettings,
    LoRATrainingSettings,
    SafetySettings,
)
from lora_ranks.synthetic import DEMO_MODEL  # noqa: E402
from tasks.evidence import (  # noqa: E402
    allocation_configs_task,
    allocation_fidelity_task,
    comparability_check_task,
    comparison_report_task,
    evaluate_adapter_task,
    full_finetune_task,
    split_data_task,
)
from tasks.finetune import build_demo_inputs_task  # noqa: E402
from tasks.outputs import claim_output_task  # noqa: E402
from tasks.train import extract_lora_task, train_dynamic_lora_task  # noqa: E402


# A bounded runner (LORA_RANKS_MAX_WORKERS, default 2): Prefect's default thread pool has no bound, and a matrix of
# 120 LoRAs trained at once ran a 23 GB machine out of memory.
@flow(name="compare-allocations", task_runner=task_runner())
@documented
def compare_allocations(
    base_model: Annotated[str, described(INPUT_HELP["base_model"])] = DEMO_MODEL,
    finetuned_model: Annotated[Optional[str], described(INPUT_HELP["finetuned_model"])] = None,
    data_path: Annotated[Optional[str], described(INPUT_HELP["data_path"])] = None,
    eval_data_path: Annotated[Optional[str], described(INPUT_HELP["eval_data_path"])] = None,
    output_dir: Annotated[str, described(INPUT_HELP["output_dir"])] = "outputs/compare-allocations",
    allocation: Annotated[AllocationSettings, described(AllocationSettings)] = AllocationSettings(),
    alpha: Annotated[AlphaPolicy, described(AlphaPolicy)] = AlphaPolicy(),
    analysis: Annotated[AnalysisSettings, described(AnalysisSettings)] = AnalysisSettings(),
    curvature: Annotated[CurvatureSettings, described(CurvatureSettings)] = CurvatureSettings(),
    finetune: Annotated[FinetuneSettings, described(FinetuneSettings)] = FinetuneSettings(),
    training: Annotated[LoRATrainingSettings, described(LoRATrainingSettings)] = LoRATrainingSettings(),
    comparison: Annotated[ComparisonSettings, described(ComparisonSettings)] = ComparisonSettings(),
    extraction: Annotated[ExtractionSettings, described(ExtractionSettings)] = ExtractionSettings(),
    fidelity: Annotated[FidelitySettings, described(FidelitySettings)] = FidelitySettings(),
    safety: Annotated[SafetySettings, described(SafetySettings)] = SafetySettings(),
    overwrite: Annotated[bool, described(INPUT_HELP["overwrite"])] = False,
) -> str:
    """Train LoRAs of different allocations at equal budgets over several seeds; returns results.json's path."""
    layout = ComparisonLayout(Path(claim_output_task(output_dir, "compare-allocations", {
        "base_model": base_model, "finetuned_model": finetuned_model, "data_path": data_path,
        "eval_data_path": eval_data_path}, overwrite)))

    # Step 1: train / held-out split (the demo model brings its own synthetic data).
    if base_model == DEMO_MODEL:
        base_model, data_path = build_demo_inputs_task(str(layout.demo_inputs_dir), data_path)
    if data_path is None:
        raise ValueError("data_path is required (records to fine-tune, train and evaluate on)")
    if eval_data_path is None:
        train_path, eval_data_path = split_data_task(data_path, str(layout.root), comparison.eval_fraction)
    else:
        train_path = data_path

    # Step 2: ranks, from the train records only; without budget ranks also the analysis' fidelity sweep (with
    # them, step 3 measures the fidelity of every compared config instead).
    config_path = svd_analysis(base_model=base_model, finetuned_model=finetuned_model, data_path=train_path,
                               output_dir=str(layout.analysis.root), allocation=allocation, alpha=alpha,
                               analysis=analysis, curvature=curvature, finetune=finetune, safety=safety,
                               fidelity=fidelity,
                               eval_data_path=None if comparison.budget_ranks else eval_data_path)
    pair = load_rank_config(config_path).checkpoints
    pretrained = pair.pretrained.path

    # Step 3: equal-budget configs; at budget ranks, their fidelity; optionally the comparability check.
    configs = allocation_configs_task(config_path, str(layout.root), comparison.budget_ranks)
    if comparison.budget_ranks:
        allocation_fidelity_task(config_path, configs, eval_data_path, str(layout.root), fidelity)
    if comparison.comparability:
        comparability_check_task(config_path, eval_data_path, str(layout.root), comparison, fidelity)

    # Step 4: train every config x init x seed (warm: from the adapter extracted at the config's ranks).
    finetuned = pair.finetuned.path
    inits = [training.init] + (["cold"] if comparison.cold_baseline and training.init == "warm" else [])
    warm = {}
    if "warm" in inits:
        extracted = extract_lora_task.map(unmapped(pretrained), unmapped(finetuned), list(configs.values()),
                                          [str(layout.warm_adapter_dir(label)) for label in configs],
                                          unmapped(safety.allow_pickle), unmapped(extraction))
        warm = dict(zip(configs, extracted.result()))
    runs = [(label, init, seed) for label in configs for init in inits for seed in comparison.seeds]
    trained = train_dynamic_lora_task.map(
        [pretrained] * len(runs), [configs[label] for label, _, _ in runs], [train_path] * len(runs),
        [str(layout.run_dir(label if init == training.init else f"{label}-{init}", seed)) for label, init, seed in runs],
        [training.replace(seed=seed, init=init) for _, init, seed in runs],
        [warm.get(label) if init == "warm" else None for label, init, _ in runs])
    full = None
    if comparison.full_finetune:  # every parameter, as many steps and records per step as the LoRAs
        steps = {k: v for k, v in training.to_dict().items() if k in ("max_steps", "epochs", "batch_size",
                                                                      "grad_accumulation", "max_length")}
        reference = finetune.replace(**steps)
        full = dict(zip(comparison.seeds, full_finetune_task.map(
            unmapped(pretrained), unmapped(train_path), unmapped(eval_data_path),
            [str(layout.run_dir("full-finetune", seed)) for seed in comparison.seeds], unmapped(reference),
            list(comparison.seeds), unmapped(fidelity)).result()))

    # Step 5: held-out loss.
    losses = evaluate_adapter_task.map([pretrained] * len(runs), [t.result().adapter_dir for t in trained],
                                       [eval_data_path] * len(runs), [f"{label}-{init}" for label, init, _ in runs],
                                       [seed for _, _, seed in runs], unmapped(fidelity)).result()

    # Step 6: report.
    report = comparison_report_task(str(layout.root), configs, runs, losses,
                                    {"config": config_path, "train_data": train_path, "eval_data": eval_data_path,
                                     "training": training.to_dict(), "comparison": comparison.to_dict()},
                                    training.init, full)
    return report.results_path


if __name__ == "__main__":
    compare_allocations()
