"""Stage 6: check a rank config against the user's hardware before deploying it.

Builds the PEFT model exactly as training would, then measures on the given device: parameter and adapter bytes
(predicted from the config and measured), the peak memory of a training step with and without gradient
checkpointing (each in its own process), and the forward latency of the unmerged and merged adapter as ratios to
the base. Each budget of ``CheckSettings`` is an assertion.

    report = check_rank_config("Qwen/Qwen3-8B", "configs/lora_rank_config.json",
                               CheckSettings(batch=4, seq_len=1024, max_train_memory_gb=70, max_infer_overhead=0.05))
    print(format_table(report)); assert report.ok, report.failures

Modules: ``inputs`` (checks before anything is built, predictions), ``measure`` (child-process measurements),
``report`` (the typed records), ``verdict`` (budgets, tables, JSON).
"""

from __future__ import annotations

from ..settings import CHECK_DIR, CheckSettings, LoRATrainingSettings
from .inputs import CheckInputError, bitsandbytes_problem, check_inputs, predict_sizes
from .measure import Target, run_isolated
from .report import CheckReport, CheckRow, InferenceMeasurement, SizePrediction, StepMeasurement
from .verdict import REPORT_NAME, CheckFailed, assess, format_table, markdown_table, write_report

__all__ = ["check_rank_config", "check_inputs", "predict_sizes", "run_measurement", "Target", "CheckFailed", "CheckInputError",
           "assess", "format_table", "markdown_table", "write_report", "REPORT_NAME", "CHECK_DIR", "CheckReport", "CheckRow",
           "InferenceMeasurement", "SizePrediction", "StepMeasurement"]


def run_measurement(target: Target, settings: CheckSettings, what: str,
                    gradient_checkpointing: bool = False) -> InferenceMeasurement | StepMeasurement:
    """One measurement in a fresh process: ``what`` = "inference" or "training"; ``impossible`` set when the
    target cannot be built here (bitsandbytes missing) or the process died."""
    record = InferenceMeasurement if what == "inference" else StepMeasurement
    problem = bitsandbytes_problem(target)
    if problem is not None:
        return record(impossible=problem)
    # The measuring functions (torch, transformers and PEFT at their module's top) are imported only to measure: the
    # command line imports this package to check its inputs, before any of them.
    from .measuring import measure_inference, measure_training_step

    if what == "inference":
        found = run_isolated(measure_inference, target, settings.latency_batch, settings.seq_len, settings.latency_repeats)
    else:
        found = run_isolated(measure_training_step, target, settings.batch, settings.seq_len, gradient_checkpointing)
    return record.model_validate(found)  # the measuring process's dict, typed here


def check_rank_config(model: str, rank_config: str, settings: CheckSettings = CheckSettings(),
                      training: LoRATrainingSettings = LoRATrainingSettings(), trust_remote_code: bool = False,
                      output_dir: str | None = None) -> CheckReport:
    """The whole check in one call (what the ``check-config`` flow runs as tasks); returns the report and, with
    ``output_dir``, writes it as ``check_report.json``. Raises the errors of ``check_inputs`` on bad input."""
    target = check_inputs(model, rank_config, settings, training, trust_remote_code)
    report = assess(target, settings, training, predict_sizes(target), run_measurement(target, settings, "inference"),
                    {gc: run_measurement(target, settings, "training", gc) for gc in (True, False)})
    if output_dir is not None:
        write_report(report, output_dir)
    return report
