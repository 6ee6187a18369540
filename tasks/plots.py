"""Task writing plots, raw data and the Prefect UI artifacts of an analysis."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from lora_ranks.analysis import LayerResult, OutputLayout, load_spectra
from lora_ranks.config import load_rank_config
from lora_ranks.plots import analysis_summary_markdown, rank_table_rows, write_plots, write_raw_data


@task(name="write-report")
def write_report_task(config_path: str, analysis_root: str, results: list[LayerResult]) -> dict[str, str]:
    """Plots + raw data of the analysis run at ``analysis_root``; in the Prefect UI a summary with the plots embedded,
    a per-module rank table and a link to the config."""
    layout = OutputLayout(analysis_root)
    config = load_rank_config(config_path)
    spectra = load_spectra(r.path for r in results)
    paths = {**write_plots(layout, config, spectra), **write_raw_data(layout, config, spectra)}
    create_table_artifact(key="rank-table", table=rank_table_rows(config), description="Per-module LoRA ranks")
    create_markdown_artifact(key="svd-analysis-summary", markdown=analysis_summary_markdown(config, config_path, paths),
                             description="Rank analysis summary")
    create_link_artifact(key="rank-config", link=Path(config_path).resolve().as_uri(), link_text="lora_rank_config.json",
                         description="The rank config written by this run")
    get_run_logger().info("Plots and raw data in %s", layout.svd_dir)
    return paths
