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
    4. the rows: a LoRA for every config and seed (identical data, steps and seeds), warm-started from the adapter
       extracted at its ranks unless ``training.init`` is "cold"; with ``comparison.cold_baseline`` also cold; with
       ``comparison.peers`` PEFT's variants and data-driven inits at each budget's uniform ranks
       (``lora_ranks.evidence.peers``); each run is evaluated in its own task: held-out loss after training (and
       at ``comparison.curve_points`` steps during it, against FLOPs), exact-match accuracy;
    5. with ``comparison.learning_rates``, each row's rate is chosen first: every rate on the first seed, on the
       training records less a validation split, the lowest validation loss kept; with ``comparison.full_finetune``
       a full fine-tune per seed, trained as long (the reference), its rate chosen the same way from
       ``comparison.full_learning_rates``;
    6. a table (mean +- std over seeds, paired differences to uniform ranks and PEFT's default LoRA, accuracy,
       compute, the gap closed to the full fine-tune) and plots, as files and UI artifacts.
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
from lora_ranks.evidence.runs import RowEvaluation, RowSpec, choose_learning_rates, comparison_rows, select_configs  # noqa: E402
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
    full_finetune_task,
    split_data_task,
    split_validation_task,
    train_row_task,
)
from tasks.finetune import build_demo_inputs_task  # noqa: E402
from tasks.outputs import RECORD_OUTPUTS, claim_output_task  # noqa: E402
from tasks.train import extract_lora_task  # noqa: E402


# A bounded runner (LORA_RANKS_MAX_WORKERS, default 2): Prefect's default thread pool has no bound, and a matrix of
# 120 LoRAs trained at once ran a 23 GB machine out of memory.
@flow(name="compare-allocations", task_runner=task_runner(), **RECORD_OUTPUTS)
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
    configs = select_configs(allocation_configs_task(config_path, str(layout.root), comparison.budget_ranks),
                             comparison.allocations)
    if comparison.budget_ranks:
        allocation_fidelity_task(config_path, configs, eval_data_path, str(layout.root), fidelity)
    if comparison.comparability:
        comparability_check_task(config_path, eval_data_path, str(layout.root), comparison, fidelity)

    # Step 4: the rows: every config x init, and every peer at each budget's uniform ranks (warm: from the adapter
    # extracted at the config's ranks; PEFT's default LoRA is the cold uniform row).
    finetuned = pair.finetuned.path
    inits = [training.init] + (["cold"] if comparison.cold_baseline and training.init == "warm" else [])
    warm = {}
    if "warm" in inits:
        extracted = extract_lora_task.map(unmapped(pretrained), unmapped(finetuned), list(configs.values()),
                                          [str(layout.warm_adapter_dir(label)) for label in configs],
                                          unmapped(safety.allow_pickle), unmapped(extraction))
        warm = dict(zip(configs, extracted.result()))
    rows = comparison_rows(list(configs), inits, comparison.peers)
    evaluation = RowEvaluation(eval_data_path, fidelity.eval_samples, fidelity.eval_max_length,
                               comparison.curve_points, comparison.curve_samples, comparison.accuracy_samples,
                               comparison.max_new_tokens, comparison.peer_records)

    def specs(seeds) -> list[RowSpec]:
        return [RowSpec(label, init, seed, configs[label], warm.get(label) if init == "warm" else None)
                for label, init in rows for seed in seeds]

    def train(batch: list[tuple[RowSpec, float]], fit_path: str, row_evaluation: RowEvaluation) -> list:
        tag = (lambda lr: f"-lr{lr:g}") if comparison.learning_rates else (lambda lr: "")
        return train_row_task.map(unmapped(pretrained), [spec for spec, _ in batch], unmapped(fit_path),
                                  [str(layout.run_dir(spec.name + tag(lr), spec.seed)) for spec, lr in batch],
                                  [training.replace(learning_rate=lr) for _, lr in batch],
                                  unmapped(row_evaluation)).result()

    # Step 5: with learning rates to choose from, each row trains at each on the first seed (on the training records
    # less a validation split) and keeps the rate of lowest validation loss; then every seed trains at it.
    choices = None
    fit_path = train_path
    if comparison.learning_rates or comparison.full_learning_rates:  # every row trains on the same records
        fit_path, validation_path = split_validation_task(train_path, str(layout.root), comparison.validation_fraction)
    first, rest = comparison.seeds[0], comparison.seeds[1:]
    if comparison.learning_rates:
        trial_specs = [(spec, lr) for spec in specs([first]) for lr in comparison.learning_rates]
        trials = train(trial_specs, fit_path, evaluation.replace_validation(validation_path))
        best, choices = choose_learning_rates(trials)
        results = list(best.values()) + (train([(spec, best[spec.label, spec.init].learning_rate)
                                                for spec in specs(rest)], fit_path, evaluation) if rest else [])
    else:
        results = train([(spec, training.learning_rate) for spec in specs(comparison.seeds)], fit_path, evaluation)
    full = None
    if comparison.full_finetune:  # every parameter, as many steps and records per step as the LoRAs
        steps = {k: v for k, v in training.to_dict().items() if k in ("max_steps", "epochs", "batch_size",
                                                                      "grad_accumulation", "max_length")}
        reference = finetune.replace(**steps)

        def full_runs(seeds, rates, validation=None) -> list:
            runs = [(seed, lr) for seed in seeds for lr in rates]
            return full_finetune_task.map(
                unmapped(pretrained), unmapped(fit_path), unmapped(eval_data_path),
                [str(layout.run_dir(f"full-finetune-lr{lr:g}" if comparison.full_learning_rates else "full-finetune",
                                    seed)) for seed, lr in runs],
                [reference.replace(learning_rate=lr) for _, lr in runs], [seed for seed, _ in runs],
                unmapped(fidelity), unmapped(validation)).result()

        if comparison.full_learning_rates:
            trials = full_runs([first], comparison.full_learning_rates, validation_path)
            (loss, _), rate = min(zip(trials, comparison.full_learning_rates), key=lambda t: t[0][1])
            choices = {**(choices or {}), "full-finetune": {"learning_rate": rate, "validation_losses": {
                f"{lr:g}": validation for (_, validation), lr in zip(trials, comparison.full_learning_rates)}}}
            full = {first: loss, **dict(zip(rest, full_runs(rest, [rate])))}
        else:
            full = dict(zip(comparison.seeds, full_runs(comparison.seeds, [reference.learning_rate])))

    # Step 6: report.
    report = comparison_report_task(str(layout.root), configs, results,
                                    {"config": config_path, "train_data": train_path, "eval_data": eval_data_path,
                                     "training": training.to_dict(), "comparison": comparison.to_dict(),
                                     "learning_rate_choices": choices},
                                    training.init, full, config_path)
    return report.results_path


if __name__ == "__main__":
    compare_allocations()
