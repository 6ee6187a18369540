"""What each ``lora-ranks`` subcommand runs once its preflight passed (``run_command``): its flow, or a plain library
call for ``extract``, ``export`` and ``base``, and the lines that say where the results are. Each branch imports what
it runs: the command line imports this module when it starts, and a command waits for its own flow's imports only.
"""

from __future__ import annotations

from pathlib import Path

from lora_ranks.bases import make_base
from lora_ranks.check import REPORT_NAME
from lora_ranks.check.verdict import format_table


def run_command(command: str, inputs: dict, settings: dict) -> list[str]:
    """Run the subcommand's flow (or library call); returns the lines that say where the results are."""
    if command == "demo" and (inputs.get("vl") or inputs.get("demo_base")):
        # Two flows each, imported with them (the command line imports this module before any flow)
        from flows.cli.demos import real_demo, vl_demo

        if inputs.pop("vl"):
            return vl_demo(inputs["output_dir"], settings, inputs["overwrite"])
        return real_demo(inputs["demo_base"], inputs["output_dir"], settings, inputs["overwrite"])
    inputs.pop("vl", None)
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


def _serving_lines(problems: dict[str, str], adapter_dir) -> list[str]:
    """What the user must know before serving a heterogeneous adapter (also in the adapter's README.md)."""
    if not problems:
        return []
    lines = [f"Serving:  {server} {problem}" for server, problem in problems.items()]
    return lines + [f"          exact copy for every server: lora-ranks export {Path(adapter_dir).resolve()} "
                    f"--out {Path(adapter_dir).resolve()}-uniform"]

