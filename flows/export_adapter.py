"""Flow ``export-adapter``: a heterogeneous-rank adapter as one that every server reads right.

Steps:
    1. check the adapter (and, for a merged export, the base it fits);
    2. write it zero-padded to one serving rank with its scales folded in (uniform), or merged into the base.
"""

from __future__ import annotations

from typing import Annotated, Optional

from flows._runtime import apply_defaults, described, documented

apply_defaults()

from prefect import flow  # noqa: E402

from lora_ranks.settings import INPUT_HELP, ExportSettings, SafetySettings  # noqa: E402
from tasks.export import export_adapter_task  # noqa: E402


@flow(name="export-adapter")
@documented
def export_adapter_flow(
    adapter_dir: Annotated[str, described(INPUT_HELP["source_adapter"])],
    output_dir: Annotated[str, described(INPUT_HELP["export_dir"])],
    base_model: Annotated[Optional[str], described(INPUT_HELP["export_base"])] = None,
    export: Annotated[ExportSettings, described(ExportSettings)] = ExportSettings(),
    safety: Annotated[SafetySettings, described(SafetySettings)] = SafetySettings(),
) -> dict:
    """Export a saved adapter; returns the export report (rank, bytes before and after)."""
    return export_adapter_task(adapter_dir, output_dir, export, base_model, safety.trust_remote_code)
