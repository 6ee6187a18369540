"""Task writing plots, raw data and the Prefect UI artifacts of an analysis."""

from __future__ import annotations

import base64
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from lora_ranks.analysis import LayerResult, load_spectra
from lora_ranks.config import load_rank_config
from lora_ranks.report import write_plots, write_raw_data


@task(name="write-report")
def write_report_task(config_path: str, svd_dir: str, results: list[LayerResult]) -> dict[str, str]:
    """Plots + raw data under ``svd_dir``; in the Prefect UI a summary (markdown, with the plots embedded as
    data URIs so they render on the artifact page without a file server), a per-module table and a link to
    the config."""
    config = load_rank_config(config_path)
    spectra = load_spectra(r.path for r in results)
    paths = {**write_plots(svd_dir, config, spectra), **write_raw_data(svd_dir, config, spectra)}
    meta = config["analysis_metadata"]
    rows = [{"module": name, "type": m["module_type"], "raw": m["raw_rank"], "final": m["final_rank"],
             "energy kept": round(m["energy_retained"], 4), "saturated": m["saturated"]}
            for name, m in meta["modules"].items()]
    create_table_artifact(key="rank-table", table=rows, description="Per-module LoRA ranks")
    lines = [
        "# LoRA rank analysis", "",
        f"Config: `{Path(config_path).resolve()}`", "",
        f"Modules: {meta['n_modules']}, saturated: {meta['n_saturated']}, "
        f"compression ratio: {config['compression_ratio']:.4%}, trainable: {config['trainable_parameters']:,}", "",
        "| module type | median rank |", "|---|---|",
        *[f"| {t} | {r} |" for t, r in config["layer_ranks"].items()], "",
        f"SVD: {', '.join(meta['svd']['methods'])}, max relative error bound {meta['svd']['max_rel_error_bound']:.1e}, "
        f"{meta['svd']['total_seconds']:.2f} s of compute summed over matrices", "",
        "Plots: " + ", ".join(f"`{p}`" for k, p in paths.items() if p.endswith(".png")), "",
        *[f"![{k}](data:image/png;base64,{base64.b64encode(Path(p).read_bytes()).decode()})\n"
          for k, p in paths.items() if p.endswith(".png")],
    ]
    create_markdown_artifact(key="svd-analysis-summary", markdown="\n".join(lines), description="Rank analysis summary")
    create_link_artifact(key="rank-config", link=Path(config_path).resolve().as_uri(), link_text="lora_rank_config.json",
                         description="The rank config written by this run")
    get_run_logger().info("Plots and raw data in %s", svd_dir)
    return paths
