"""Flow ``check-config``: will a rank config fit this hardware, and what will it cost at inference?

Steps:
    0. ``claim-output``: refuse an output folder that would take anything of the user's, and mark a new one
       as this tool's (``lora_ranks.outputs``);
    1. check the inputs (config against the model, device, sequence length) before anything is built;
    2. in a fresh process: parameter counts and bytes, forward latency of base, unmerged and merged adapter;
    3. in two more processes: peak memory of a training step with and without gradient checkpointing;
    4. the verdict: a table (log, UI artifact, check_report.json); the run fails when a budget does not hold.
"""

from __future__ import annotations

from typing import Annotated

from flows._runtime import apply_defaults, described, documented

apply_defaults()

from prefect import flow  # noqa: E402

from lora_ranks.check import CHECK_DIR, CheckFailed, CheckReport  # noqa: E402
from lora_ranks.settings import INPUT_HELP, CheckSettings, LoRATrainingSettings, SafetySettings  # noqa: E402
from tasks.check import (  # noqa: E402
    check_inputs_task,
    measure_inference_task,
    measure_training_step_task,
    write_check_report_task,
)
from tasks.outputs import RECORD_OUTPUTS, claim_output_task  # noqa: E402


@flow(name="check-config", **RECORD_OUTPUTS)
@documented
def check_config_flow(
    model: Annotated[str, described(INPUT_HELP["base_model"])],
    rank_config: Annotated[str, described(INPUT_HELP["rank_config"])],
    output_dir: Annotated[str, described(INPUT_HELP["check_dir"])] = CHECK_DIR,
    check: Annotated[CheckSettings, described(CheckSettings)] = CheckSettings(),
    training: Annotated[LoRATrainingSettings, described(LoRATrainingSettings)] = LoRATrainingSettings(),
    safety: Annotated[SafetySettings, described(SafetySettings)] = SafetySettings(),
    overwrite: Annotated[bool, described(INPUT_HELP["overwrite"])] = False,
) -> CheckReport:
    """Measure a rank config on this machine; returns the report, or fails naming every budget that does not hold."""
    output_dir = claim_output_task(output_dir, "check-config", {"model": model, "rank_config": rank_config}, overwrite)
    target = check_inputs_task(model, rank_config, check, training, safety.trust_remote_code)
    inference = measure_inference_task(target, check)
    # One process per setting, one after the other, so that neither measurement disturbs the other.
    steps = {gc: measure_training_step_task(target, check, gc) for gc in (True, False)}
    report = write_check_report_task(target, check, training, inference, steps, output_dir)
    if not report.ok:
        raise CheckFailed("check failed: " + "; ".join(report.failures), report)
    return report
