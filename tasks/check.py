"""Tasks of the pre-deployment check: a few lines around ``lora_ranks.check``. No retries: a measurement that runs
out of memory is a result, and the same inputs measure the same way again."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from lora_ranks.check import (
    CheckReport,
    InferenceMeasurement,
    StepMeasurement,
    Target,
    assess,
    check_inputs,
    markdown_table,
    predict_sizes,
    run_measurement,
    write_report,
)
from lora_ranks.settings import CheckSettings, LoRATrainingSettings


@task(name="check-inputs")
def check_inputs_task(model: str, rank_config: str, settings: CheckSettings, training: LoRATrainingSettings,
                      trust_remote_code: bool = False) -> Target:
    """Bad input fails here, before anything is built: modules the model lacks, an absent device, a too-long seq_len."""
    return check_inputs(model, rank_config, settings, training, trust_remote_code)


@task(name="measure-inference")
def measure_inference_task(target: Target, settings: CheckSettings) -> InferenceMeasurement:
    """Parameters, bytes and forward latency (base, unmerged, merged), in a fresh process."""
    return run_measurement(target, settings, "inference")


@task(name="measure-training-step", task_run_name="measure-training-step-checkpointing-{gradient_checkpointing}")
def measure_training_step_task(target: Target, settings: CheckSettings, gradient_checkpointing: bool
                               ) -> StepMeasurement:
    """Peak memory and speed of a training step, in a fresh process of its own."""
    return run_measurement(target, settings, "training", gradient_checkpointing)


@task(name="write-check-report")
def write_check_report_task(target: Target, settings: CheckSettings, training: LoRATrainingSettings,
                            inference: InferenceMeasurement, steps: dict[bool, StepMeasurement],
                            output_dir: str) -> CheckReport:
    """The verdict: check_report.json, the table in the log and as a UI artifact."""
    report = assess(target, settings, training, predict_sizes(target), inference, steps)
    path = write_report(report, output_dir)
    create_markdown_artifact(key="check-config", markdown=markdown_table(report),
                             description="Memory and latency of a rank config on this worker")
    # The table itself is the UI artifact (and what the command prints); the log says where and what failed.
    get_run_logger().info("Check of %s on %s: %s; report %s", report.target["rank_config"], report.machine.device,
                          "; ".join(report.failures) or "no budget fails", path)
    return report
