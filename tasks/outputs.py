"""The first step of every flow that writes: claim its output folder (``lora_ranks.outputs``)."""

from __future__ import annotations

from prefect import task

from lora_ranks.outputs import claim_output_dir


@task(name="claim-output")
def claim_output_task(output_dir: str, made_by: str, inputs: dict[str, str | None], overwrite: bool = False) -> str:
    """Refuse an output folder that would take anything of the user's (a file, a folder of an input, a non-empty
    folder this tool did not write unless ``overwrite``), then mark it as this tool's. Returns it, resolved."""
    return str(claim_output_dir(output_dir, made_by, inputs=list(inputs.items()), overwrite=overwrite))
