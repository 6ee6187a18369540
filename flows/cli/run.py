"""What each ``lora-ranks`` subcommand runs once its preflight passed (``run_command``): its flow, or a plain library
call for ``extract``, ``export`` and ``base``, and the lines that say where the results are."""

from __future__ import annotations

from pathlib import Path

from lora_ranks.check.verdict import format_table


def run_command(command: str, inputs: dict, settings: dict) -> list[str]:
    """Run the subcommand's flow (or library call); returns the lines that say where the results are."""
    if command == "demo" and inputs.pop("vl"):
        return _vl_demo(inputs["output_dir"], settings, inputs["overwrite"])
    if command == "demo" and inputs.get("demo_base"):
        return _real_demo(inputs["demo_base"], inputs["output_dir"], settings, inputs["overwrite"])
    inputs.pop("demo_base", None)
    if command in ("demo", "analyze"):
        from flows.svd_analysis import svd_analysis
        from lora_ranks.analysis.layout import OutputLayout

        config_path = svd_analysis(**inputs, **settings)
        layout = OutputLayout(Path(inputs["output_dir"]).resolve())
        lines = [f"Rank config:        {config_path}",
                 f"Plots:              {layout.plots_dir}",
                 f"Raw data:           {layout.raw_data_dir}"]
        if command == "demo":
            lines.append(f"Checkpoint pair:    {layout.finetune_dir}")
        return lines
    if command == "base":
        from lora_ranks.bases import make_base

        made = make_base(inputs["name"], None if inputs.get("default_out") else inputs["base_dir"],
                         gguf_file=inputs["gguf_file"], overwrite=inputs["overwrite"])
        how = "made before, reused" if made.cached else f"made in {made.seconds:.0f} s"
        return [f"Base:     {made.path}  ({how}; float32, dequantized from a quantized GGUF: its weights carry that "
                "quantization noise)",
                *([f"Demo:     lora-ranks demo --base {inputs['name']}"] if inputs["name"] else []),
                f"Use:      --model {made.path}  (finetune, train, compare, check; --base in analyze)"]
    if command == "extract":
        from lora_ranks.extract import extract_lora

        report = extract_lora(**inputs, allow_pickle=settings["safety"].allow_pickle, settings=settings["extraction"])
        return [f"Adapter:  {Path(inputs['out_dir']).resolve()}  ({len(report.modules)} modules, {report.truncation} "
                f"truncation, relative error mean {report.mean_relative_error:.4f}, "
                f"max {report.max_relative_error:.4f})", *_serving_lines(report.serving_problems, inputs["out_dir"])]
    if command == "export":
        from lora_ranks.export import export_adapter

        report = export_adapter(inputs["adapter_dir"], inputs["out_dir"], settings["export"], inputs["base"],
                                settings["safety"].trust_remote_code, overwrite=inputs["overwrite"])
        merged = report.format == "merged"
        shape = f"merged, {report.dtype}" if merged else f"rank {report.rank}, global scale 1"
        lines = [f"Exported: {Path(inputs['out_dir']).resolve()}  ({shape}; {report.bytes_before:,} bytes of adapter "
                 f"-> {report.bytes_after:,} bytes)"]
        return lines + ([f"Note:     {report.note}"] if merged and report.note else [])
    if command == "train":
        from flows.train_dynamic_lora import train_dynamic_lora_flow

        result = train_dynamic_lora_flow(**inputs, **settings)
        return [f"Adapter:  {result.adapter_dir}", f"Metrics:  {result.metrics_path}",
                f"Trainable parameters: {result.trainable_parameters:,} ({100 * result.trainable_share:.3f}%)",
                f"Precision: {_precision_line(result.bf16)}",
                *_serving_lines(result.serving_problems, result.adapter_dir)]
    if command == "check":
        from flows.check_config import check_config_flow
        from lora_ranks.check import REPORT_NAME

        report = check_config_flow(**inputs, **settings)
        return [format_table(report), "", f"Report:   {Path(inputs['output_dir']).resolve() / REPORT_NAME}",
                "All budgets hold." if any(r.budget for r in report.rows) else "No budgets given."]
    if command == "compare":
        from flows.compare_allocations import compare_allocations

        return [f"Results:  {compare_allocations(**inputs, **settings)}"]
    from flows.preliminary_finetune import preliminary_finetune

    result = preliminary_finetune(**inputs, **settings)
    return [f"Pretrained: {result.pretrained_dir}", f"Fine-tuned: {result.finetuned_dir}",
            f"Metrics:    {result.metrics_path}", f"Precision:  {_precision_line(result.bf16)}"]


def _precision_line(bf16: bool) -> str:
    """How a training run computed, for its result lines."""
    return "bf16 autocast (float32 master weights)" if bf16 else "float32"


def _real_demo(name: str, output_dir: str, settings: dict, overwrite: bool = False) -> list[str]:
    """The demo on a real pretrained base (``demo --base smollm2-135m``): svd-analysis with a brief fine-tune on the
    synthetic records (Fisher spectra, ranks, plots), then a short warm-started dynamic-LoRA run from the config."""
    from flows.svd_analysis import svd_analysis
    from flows.train_dynamic_lora import train_dynamic_lora_flow
    from lora_ranks.analysis.layout import OutputLayout
    from lora_ranks.config import load_rank_config
    from lora_ranks.synthetic import demo_data_path, demo_training_settings

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


def _vl_demo(output_dir: str, settings: dict, overwrite: bool = False) -> list[str]:
    """The vision-language demo: svd-analysis on a tiny Qwen2.5-VL with synthetic image tasks (fine-tune, spectra,
    rank config), then a short dynamic-LoRA training run on the same image records."""
    from flows.svd_analysis import svd_analysis
    from flows.train_dynamic_lora import train_dynamic_lora_flow
    from lora_ranks.analysis.layout import OutputLayout
    from lora_ranks.config import load_rank_config
    from lora_ranks.synthetic import DEMO_VL_MODEL, demo_data_path, demo_training_settings

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


def _serving_lines(problems: dict[str, str], adapter_dir) -> list[str]:
    """What the user must know before serving a heterogeneous adapter (also in the adapter's README.md)."""
    if not problems:
        return []
    lines = [f"Serving:  {server} {problem}" for server, problem in problems.items()]
    return lines + [f"          exact copy for every server: lora-ranks export {Path(adapter_dir).resolve()} "
                    f"--out {Path(adapter_dir).resolve()}-uniform"]

