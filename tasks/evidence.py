"""Tasks of the evidence stage: fidelity report, train/eval split, equal-budget configs, their fidelity, the
comparability check, one row's training and evaluation, the comparison report. Each is one library call
(``lora_ranks.evidence.comparison``) plus its UI artifacts."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lora_ranks._io import atomic_write_json
from lora_ranks.analysis import OutputLayout
from lora_ranks.evidence import (
    ComparabilityReport,
    ComparisonLayout,
    ComparisonReport,
    FidelityTable,
    allocation_fidelity,
    comparability_check,
    comparison_report,
    full_finetune_loss,
    preparation_of,
    run_fidelity_report,
    split_records,
    split_validation,
    write_allocation_configs,
)
from lora_ranks.evidence.runs import Committed, RowEvaluation, RowResult, RowSpec, train_row
from lora_ranks.plots import allocation_fidelity_markdown, comparison_markdown, markdown_image
from lora_ranks.settings import ComparisonSettings, FidelitySettings, FinetuneSettings, LoRATrainingSettings


@task(name="split-data")
def split_data_task(data_path: str, comparison_root: str, eval_fraction: float, seed: int = 0) -> tuple[str, str]:
    """Shuffle records (seeded) into train.jsonl / eval.jsonl; the eval records are never trained on."""
    return split_records(data_path, ComparisonLayout(comparison_root), eval_fraction, seed)


@task(name="fidelity-report")
def fidelity_report_task(config_path: str, analysis_root: str, eval_data_path: str, settings: FidelitySettings) -> str:
    """Fidelity sweep (tau, budget, uniform) of extracted adapters on held-out records; JSON + plot + artifacts."""
    report = run_fidelity_report(config_path, OutputLayout(analysis_root), eval_data_path, settings)
    create_table_artifact(key="fidelity-table", table=report.rows, description="Fidelity of extracted adapters")
    create_markdown_artifact(key="fidelity-curve", markdown="# Fidelity vs parameters\n\n"
                             + markdown_image(report.plot_path, "fidelity") + "\n",
                             description="Trainable parameters vs KL to the fine-tuned model")
    get_run_logger().info("Fidelity report: %s", report.json_path)
    return report.json_path


@task(name="allocation-configs")
def allocation_configs_task(config_path: str, comparison_root: str, budget_ranks: tuple[int, ...],
                            alpha_variants: tuple[str, ...] = ()) -> dict[str, str]:
    """The compared rank configs: uniform / energy / budget at the analysis config's parameter count, or every
    allocation at each of ``budget_ranks``; and each again at the ``alpha_variants`` policies."""
    return write_allocation_configs(config_path, ComparisonLayout(comparison_root), budget_ranks, alpha_variants)


@task(name="allocation-fidelity")
def allocation_fidelity_task(analysis_config_path: str, configs: dict[str, str], eval_data_path: str,
                             comparison_root: str, settings: FidelitySettings) -> FidelityTable:
    """KL of every compared config's extracted adapter to the fine-tuned model (plain and loss-aware truncation)."""
    table = allocation_fidelity(analysis_config_path, configs, eval_data_path, ComparisonLayout(comparison_root),
                                settings)
    create_markdown_artifact(key="allocation-fidelity", markdown=allocation_fidelity_markdown(table.rows, table.ceiling_kl),
                             description="KL to the fine-tuned model of each compared config's extracted adapter")
    get_run_logger().info("Allocation fidelity: %s", table.json_path)
    return table


@task(name="comparability-check")
def comparability_check_task(config_path: str, eval_data_path: str, comparison_root: str,
                             settings: ComparisonSettings, fidelity: FidelitySettings) -> ComparabilityReport:
    """Predicted vs measured KL of truncating one module at a time; Spearman per spectrum and a scatter plot."""
    report = comparability_check(config_path, eval_data_path, ComparisonLayout(comparison_root), settings, fidelity)
    create_markdown_artifact(key="comparability", markdown="# Comparable across modules?\n\nSpearman of predicted vs "
                             "measured KL: " + ", ".join(f"{k} {v:.2f}" for k, v in report.spearman.items()) + "\n\n"
                             + markdown_image(report.plot_path, "comparability") + "\n",
                             description=f"One module truncated to rank {settings.comparability_rank} at a time: "
                                         "predicted vs measured KL")
    get_run_logger().info("Comparability (Spearman): %s", {k: round(v, 3) for k, v in report.spearman.items()})
    return report


@task(name="train-row", task_run_name="train-{spec.label}-{spec.init}-seed{spec.seed}-lr{settings.learning_rate:g}")
def train_row_task(base_model: str, spec: RowSpec, train_path: str, out_dir: str, settings: LoRATrainingSettings,
                   evaluation: RowEvaluation, committed: Committed | None = None) -> RowResult:
    """Train one comparison row (a lora-ranks config or a peer) and evaluate it in the same process: held-out loss
    (during and after training, the best checkpoint with early stopping), accuracy, compute; committed where
    ``committed`` says."""
    result = train_row(base_model, spec, train_path, out_dir, settings, evaluation, committed=committed)
    if result.diverged:
        get_run_logger().warning("%s seed %d diverged at learning rate %g", spec.name, spec.seed, settings.learning_rate)
    elif result.best_step is not None:
        get_run_logger().info("%s seed %d lr %g: best validation loss %.4f at step %d of %d (%s); held-out %.4f",
                              spec.name, spec.seed, settings.learning_rate, result.validation_loss, result.best_step,
                              result.steps, result.stopped, result.loss)
    return result


@task(name="split-validation")
def split_validation_task(train_path: str, comparison_root: str, fraction: float, seed: int = 0) -> tuple[str, str]:
    """Carve a validation split from the training records (learning-rate choice): (fit path, validation path)."""
    return split_validation(train_path, ComparisonLayout(comparison_root), fraction, seed)


@task(name="full-finetune-reference", task_run_name="full-finetune-seed{seed}-lr{settings.learning_rate:g}")
def full_finetune_task(base_model: str, train_path: str, eval_data_path: str, out_dir: str, settings: FinetuneSettings,
                       seed: int, fidelity: FidelitySettings, validation_data_path: str | None = None
                       ) -> float | tuple[float, float]:
    """Held-out loss of every parameter fine-tuned as long as the LoRAs train (the comparison's reference); with a
    validation split, (held-out loss, validation loss)."""
    return full_finetune_loss(base_model, train_path, eval_data_path, out_dir, settings.replace(seed=seed), fidelity,
                              validation_data_path)


@task(name="comparison-report")
def comparison_report_task(comparison_root: str, configs: dict[str, str], results: list[RowResult], details: dict,
                           reference_init: str = "warm", full_finetune: dict[int, float] | None = None,
                           preparations: dict | None = None, results_dir: str | None = None) -> ComparisonReport:
    """results.json, comparison.png (and curves.png) and the UI artifacts of the comparison.

    ``preparations``: "shared" or seed -> {config, root, seconds} of each preparation run here; the FLOPs come from
    ``preparation_of``, the seconds are the flow's measured wall time. With ``results_dir`` each is committed there
    (``preparation-seed<seed>.json``), and a seed prepared in an earlier run is read from there."""


    n = results[0].matmul_parameters if results else None
    preparation: dict | None = {}
    for key, prep in (preparations or {}).items():
        flops = preparation_of(prep["config"], ComparisonLayout(prep["root"]), n) if n else {}
        preparation[key] = {**flops, "seconds": prep["seconds"]}
        if results_dir:
            atomic_write_json(Path(results_dir) / f"preparation-{'seed' + str(key) if key != 'shared' else key}.json",
                              preparation[key])
    if results_dir:
        for path in sorted(Path(results_dir).glob("preparation-*.json")):
            key = path.stem.removeprefix("preparation-")
            key = int(key.removeprefix("seed")) if key.startswith("seed") else key
            preparation.setdefault(key, json.loads(path.read_text()))
    if "shared" in preparation:
        preparation = preparation["shared"]
    report = comparison_report(ComparisonLayout(comparison_root), configs, results, details, reference_init,
                               full_finetune, preparation or None)
    layout = ComparisonLayout(comparison_root)
    create_table_artifact(key="allocation-comparison", table=[r.model_dump(mode="json", exclude={"losses", "curve", "runs"})
                                                              for r in report.rows],
                          description="Held-out loss at equal trainable parameters")
    create_markdown_artifact(key="allocation-comparison-summary",
                             markdown=comparison_markdown(report.rows, report.plot_path, layout.curves_plot_path))
    get_run_logger().info("Comparison: %s", [(r.allocation, r.init, round(r.loss_mean, 4), round(r.loss_std, 4))
                                             for r in report.rows])
    return report
