"""Tasks of the evidence stage: fidelity report, train/eval split, equal-budget configs, their fidelity, the
comparability check, one row's training and evaluation, the comparison report. Each is one library call
(``lora_ranks.evidence.comparison``) plus its UI artifacts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

import lora_ranks.data as data_module
import lora_ranks.evidence.fidelity as fidelity_module
import lora_ranks.evidence.fidelity_checks as fidelity_checks
import lora_ranks.extract as extract_module
from lora_ranks.analysis import OutputLayout
from lora_ranks.analysis.layer import numerics_identity
from lora_ranks.config import load_rank_config
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
from lora_ranks.evidence.committed import commit_preparation, read_preparations
from lora_ranks.evidence.compute import model_matmul_parameters
from lora_ranks.evidence.runs import Committed, RowEvaluation, RowResult, RowSpec, train_row
from lora_ranks.plots import allocation_fidelity_markdown, comparison_markdown, markdown_image
from lora_ranks.settings import ComparisonSettings, FidelitySettings, FinetuneSettings, LoRATrainingSettings
from lora_ranks.spectra import default_device
from tasks._cache import code_identity, file_digest, folder_digest


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


_FIDELITY_CODE = (fidelity_checks, fidelity_module, extract_module, data_module)
"""The modules whose code computes a fidelity table (beside the spectra's, in ``numerics_identity``)."""


def allocation_fidelity_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Cache key of ``allocation-fidelity``: the content of the analysis config and of every compared config (their
    durations left out), the files of the checkpoint pair the analysis config names, the held-out records' bytes,
    the settings, the code that computes the table (with the numerics identity and the version), the device type and
    the output folder."""
    pair = load_rank_config(parameters["analysis_config_path"]).checkpoints
    identity = [code_identity(numerics_identity(), _FIDELITY_CODE), default_device().type,
                _config_content(parameters["analysis_config_path"]),
                {label: _config_content(path) for label, path in sorted(parameters["configs"].items())},
                folder_digest(pair.pretrained.path), folder_digest(pair.finetuned.path),
                file_digest(parameters["eval_data_path"]), parameters["settings"].to_dict(),
                str(Path(parameters["comparison_root"]).resolve())]
    return "allocation-fidelity-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _config_content(path: str) -> str:
    """sha256 of a rank config's content without its durations (``timings`` and every ``*seconds`` field): a config
    written again by a resumed run, with the same ranks, spectra and checkpoints, keeps its identity."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "timings" and not k.endswith("seconds")}
        return [strip(v) for v in value] if isinstance(value, list) else value

    content = strip(json.loads(Path(path).read_text()))
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def fidelity_table_is_current(table: FidelityTable) -> bool:
    """True if the file a (possibly cached) fidelity table names is still there."""
    return Path(table.json_path).is_file()


@task(name="allocation-fidelity", cache_key_fn=allocation_fidelity_cache_key, persist_result=True)
def allocation_fidelity_task(analysis_config_path: str, configs: dict[str, str], eval_data_path: str,
                             comparison_root: str, settings: FidelitySettings) -> FidelityTable:
    """KL of every compared config's extracted adapter to the fine-tuned model (plain and loss-aware truncation).
    Cached by content (``allocation_fidelity_cache_key``): a resumed comparison reads it (on SmolLM2 it took ~10-20
    minutes on a CPU); ``fidelity_table_is_current`` says whether a cached table's file is still there."""
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


@task(name="preparation-record")
def preparation_record_task(analysis_config_path: str, root: str, pretrained: str, seconds: float,
                            committed: Committed | None = None, key: int | None = None) -> dict:
    """What a preparation cost: its FLOPs (``preparation_of``, N counted from the base's config) and the wall
    ``seconds`` the flow measured around it. With ``committed``, committed at once (``commit_preparation``: a record
    of more seconds, i.e. one measured when the preparation really ran, is kept) and the committed record returned."""
    record = {**preparation_of(analysis_config_path, ComparisonLayout(root), model_matmul_parameters(pretrained)),
              "seconds": seconds}
    if committed is None:
        return record
    return commit_preparation(committed.results_dir, key, committed.design, record)


@task(name="comparison-report")
def comparison_report_task(comparison_root: str, configs: dict[str, str], results: list[RowResult], details: dict,
                           reference_init: str = "warm", full_finetune: dict[int, float] | None = None,
                           preparations: dict | None = None, committed: Committed | None = None) -> ComparisonReport:
    """results.json, comparison.png (and curves.png) and the UI artifacts of the comparison.

    ``preparations``: "shared" or seed -> the record of each preparation made here (``preparation_record_task``);
    with ``committed``, those of seeds prepared by earlier runs are read from its results folder."""
    preparation: dict = dict(preparations or {})
    if committed is not None:
        preparation = {**read_preparations(committed.results_dir, committed.design), **preparation}
    preparation = {k: {f: v for f, v in record.items() if f != "design"} for k, record in preparation.items()}
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
