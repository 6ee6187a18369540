"""The first step of every flow that writes: claim its output folder (``lora_ranks.outputs``)."""

from __future__ import annotations

from prefect import task

from lora_ranks.outputs import claim_output_dir, record_made_entries


@task(name="claim-output")
def claim_output_task(output_dir: str, made_by: str, inputs: dict[str, str | None], overwrite: bool = False) -> str:
    """Refuse an output folder that would take anything of the user's (a file, a folder of an input, a non-empty
    folder this tool did not write unless ``overwrite``), then mark it as this tool's. Returns it, resolved."""
    return str(claim_output_dir(output_dir, made_by, inputs=list(inputs.items()), overwrite=overwrite))


def record_outputs(flow, flow_run, state) -> None:
    """Flow hook, however the run ends: in a folder of the user's written into with ``overwrite``, list the names
    this run made there as the tool's (``lora_ranks.outputs.record_made_entries``)."""
    if flow_run.parameters.get("output_dir"):
        record_made_entries(flow_run.parameters["output_dir"])


#: The hooks of every flow that claims an output folder: ``@flow(name=..., **RECORD_OUTPUTS)``.
RECORD_OUTPUTS = {f"on_{end}": [record_outputs] for end in ("completion", "failure", "crashed", "cancellation")}
