"""The demos that run two flows: on a real pretrained base (``demo --base NAME``) and on a tiny Qwen2.5-VL
(``demo --vl``): svd-analysis with its brief fine-tune, then a short warm-started dynamic-LoRA run from the config."""

from __future__ import annotations

from pathlib import Path

from flows.svd_analysis import svd_analysis
from flows.train_dynamic_lora import train_dynamic_lora_flow
from lora_ranks.analysis.layout import OutputLayout
from lora_ranks.config import load_rank_config
from lora_ranks.synthetic import DEMO_VL_MODEL, demo_data_path, demo_training_settings

__all__ = ["real_demo", "vl_demo"]


def real_demo(name: str, output_dir: str, settings: dict, overwrite: bool = False) -> list[str]:
    """The demo on a real pretrained base (``demo --base smollm2-135m``): svd-analysis with a brief fine-tune on the
    synthetic records (Fisher spectra, ranks, plots), then a short warm-started dynamic-LoRA run from the config."""
    model = f"demo:{name}"
    config_path = svd_analysis(base_model=model, output_dir=output_dir, overwrite=overwrite, **settings)
    config = load_rank_config(config_path)
    layout = OutputLayout(Path(output_dir).resolve())
    result = train_dynamic_lora_flow(model=config.checkpoints.pretrained.path, rank_config=config_path,
                                     data_path=str(demo_data_path(layout.demo_inputs_dir, model)),
                                     output_dir=str(layout.train_dir),
                                     training=demo_training_settings(model, settings["finetune"].precision))
    by_type = _rank_by_module_type(config)
    return [f"Base:               {config.checkpoints.pretrained.path}",
            f"Rank config:        {config_path}  ({len(config.modules)} modules; mean rank by type: {by_type})",
            f"Rank heatmap:       {layout.plots_dir / 'rank_heatmap.png'}",
            f"Plots:              {layout.plots_dir}", f"Raw data:           {layout.raw_data_dir}",
            f"Checkpoint pair:    {layout.finetune_dir}",
            f"Adapter:            {result.adapter_dir}  ({result.trainable_parameters:,} trainable parameters, loss "
            f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f})"]


def _rank_by_module_type(config) -> str:
    """``q_proj 5.2, k_proj 3.1, ...``: the mean rank of each module type (the last part of its name)."""
    ranks: dict[str, list[int]] = {}
    for record in config.modules.values():
        ranks.setdefault(record.module_type, []).append(record.final_rank)
    return ", ".join(f"{kind} {sum(r) / len(r):.1f}" for kind, r in ranks.items())


def vl_demo(output_dir: str, settings: dict, overwrite: bool = False) -> list[str]:
    """The vision-language demo: svd-analysis on a tiny Qwen2.5-VL with synthetic image tasks (fine-tune, spectra,
    rank config), then a short dynamic-LoRA training run on the same image records."""
    config_path = svd_analysis(base_model=DEMO_VL_MODEL, output_dir=output_dir, overwrite=overwrite, **settings)
    config = load_rank_config(config_path)
    layout = OutputLayout(Path(output_dir).resolve())
    data = demo_data_path(layout.demo_inputs_dir, DEMO_VL_MODEL)
    result = train_dynamic_lora_flow(model=config.checkpoints.pretrained.path,
                                     rank_config=config_path, data_path=str(data), output_dir=str(layout.train_dir),
                                     training=demo_training_settings(DEMO_VL_MODEL, settings["finetune"].precision))
    return [f"Rank config:        {config_path}", f"Plots:              {layout.plots_dir}",
            f"Adapter:            {result.adapter_dir}  ({result.trainable_parameters:,} trainable parameters, loss "
            f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f})"]
