"""Task of the export stage."""

from __future__ import annotations

from prefect import get_run_logger, task

from lora_ranks.export import export_adapter
from lora_ranks.reports import ExportReport
from lora_ranks.settings import ExportSettings


@task(name="export-adapter")
def export_adapter_task(adapter_dir: str, out_dir: str, settings: ExportSettings, base: str | None = None,
                        trust_remote_code: bool = False) -> ExportReport:
    """Uniform-rank or merged export of a saved adapter; logs what it wrote and what it cost."""
    report = export_adapter(adapter_dir, out_dir, settings, base, trust_remote_code)
    note = getattr(report, "note", None)
    get_run_logger().info("Exported %s as %s to %s: %s bytes of adapter -> %s bytes%s", adapter_dir, report.format,
                          out_dir, f"{report.bytes_before:,}", f"{report.bytes_after:,}", f" ({note})" if note else "")
    return report
