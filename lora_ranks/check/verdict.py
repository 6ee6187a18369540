"""The check's verdict: one table row per quantity, each given budget an assertion, as text, markdown and JSON.

A budget fails when the measured value exceeds it, and also when it could not be measured (the assertion is
not verified). A training step that runs out of memory with the gradient checkpointing training uses fails even
without a budget: training would not fit this device.
"""

from __future__ import annotations

# torch (the machine line of the report) is imported when a report is assessed: the command line imports this
# module at start, for the table it prints.
import platform
from pathlib import Path

from .._io import atomic_write_json
from ..errors import LoraRanksError
from ..settings import CheckSettings, LoRATrainingSettings
from .measure import GIB, TRAINING_STEPS, Target
from .report import CheckReport, CheckRow, InferenceMeasurement, Machine, SizePrediction, StepMeasurement

__all__ = ["CheckFailed", "assess", "format_table", "markdown_table", "write_report", "REPORT_NAME"]

REPORT_NAME = "check_report.json"
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class CheckFailed(LoraRanksError):
    """At least one assertion of ``lora-ranks check`` failed; ``report`` holds the whole check."""

    def __init__(self, message: str, report: CheckReport | None = None):
        super().__init__(message)
        self.report = report


def assess(target: Target, settings: CheckSettings, training: LoRATrainingSettings, predicted: SizePrediction,
           inference: InferenceMeasurement, steps: dict[bool, StepMeasurement]) -> CheckReport:
    """The report: inputs, predictions, measurements, table rows and failures.

    Args:
        predicted: ``inputs.predict_sizes``.
        inference: ``measuring.measure_inference`` (``impossible`` set when it could not run).
        steps: gradient checkpointing (True/False) -> ``measuring.measure_training_step``.
    """
    rows: list[CheckRow] = []
    failures: list[str] = []

    def row(quantity: str, value: str, budget: str = "", verdict: str = "", short: str = "") -> None:
        rows.append(CheckRow(quantity=quantity, value=value, budget=budget, verdict=verdict))
        name = quantity.removesuffix(" *")
        if verdict == "FAIL":
            failures.append(f"{name}: {short or value}" + (f", budget {budget}" if budget else ""))
        elif budget and verdict == "not measured":
            failures.append(f"{name}: not measured ({value}), budget {budget}")

    sizes = inference  # the counts are there unless the model could not be built at all
    for key, label in (("adapter_parameters", "adapter parameters"), ("parameters", "parameters, base + adapter")):
        measured, expected = getattr(sizes, key), getattr(predicted, key)
        row(label, _measured_vs_predicted(measured, expected, lambda n: f"{n:,}"), verdict=_agreement(expected, measured))
    row(f"adapter bytes, {sizes.adapter_dtype or 'float32'}",
        _measured_vs_predicted(sizes.adapter_bytes, predicted.adapter_bytes, _bytes),
        verdict=_agreement(predicted.adapter_bytes, sizes.adapter_bytes))
    # An unquantized base: its parameters times the bytes of the dtype training loads it in; a packed 4/8-bit
    # base's bytes are bitsandbytes' business, not predicted.
    dtype = target.quantization or sizes.dtype
    predicted = predicted.model_copy(update={"base_bytes": predicted.base_parameters * _DTYPE_BYTES[dtype]
                                             if dtype in _DTYPE_BYTES else None})
    row(f"base weights, {dtype or 'dtype unknown'}",
        _measured_vs_predicted(sizes.base_bytes, predicted.base_bytes, _bytes),
        verdict=_agreement(predicted.base_bytes, sizes.base_bytes) if predicted.base_bytes else "")

    for checkpointing in (True, False):
        used = checkpointing == training.gradient_checkpointing
        quantity = f"training peak, checkpointing {'on' if checkpointing else 'off'}{' *' if used else ''}"
        budget = f"<= {settings.max_train_memory_gb:g} GiB" if used and settings.max_train_memory_gb else ""
        step = steps[checkpointing]
        if step.impossible is not None:
            row(quantity, step.impossible, budget, "not measured")
        elif step.out_of_memory is not None:
            row(quantity, f"out of memory ({step.out_of_memory})", budget, "FAIL" if used else "")
        else:
            over = budget and step.peak_bytes > settings.max_train_memory_gb * GIB
            row(quantity, _peak_text(step), budget, ("FAIL" if over else "ok") if budget else "", _bytes(step.peak_bytes))

    budget = f"<= +{settings.max_infer_overhead:.1%}" if settings.max_infer_overhead else ""
    if inference.impossible is not None:
        row("forward latency", inference.impossible, budget, "not measured")
    else:
        over = budget and inference.unmerged_overhead > settings.max_infer_overhead
        row("forward, base", f"{inference.base_ms:.2f} ms (median of all rounds)")
        row("forward, unmerged adapter", _overhead_text(inference, "unmerged"),
            budget, ("FAIL" if over else "ok") if budget else "", f"{inference.unmerged_overhead:+.1%}")
        row("forward, merged adapter", _overhead_text(inference, "merged"))

    import torch

    return CheckReport(target=target.to_dict(), settings=settings.to_dict(),
                       training={"gradient_checkpointing": training.gradient_checkpointing},
                       machine=Machine(device=sizes.device_name or target.device, torch=torch.__version__,
                                       python=platform.python_version()),
                       predicted=predicted, inference=inference,
                       training_step={"gradient_checkpointing_on": steps[True], "gradient_checkpointing_off": steps[False]},
                       notes=_notes(target, settings, training), rows=rows, failures=failures, ok=not failures)


def format_table(report: CheckReport) -> str:
    """The rows as an aligned plain-text table (the command line's output)."""
    header = CheckRow(quantity="quantity", value="value", budget="budget", verdict="verdict")
    rows = [header, *report.rows]
    fields = ("quantity", "value", "budget", "verdict")
    widths = {k: max(len(getattr(r, k)) for r in rows) for k in fields}
    lines = ["  ".join(getattr(r, k).ljust(widths[k]) for k in fields).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * widths[k] for k in fields))
    return "\n".join([f"Check on {report.machine.device}, torch {report.machine.torch}", *lines, *report.notes])


def markdown_table(report: CheckReport) -> str:
    """The rows as a markdown table with a verdict line (the Prefect artifact)."""
    lines = [f"# Check of {Path(report.target['rank_config']).name} on {report.machine.device}", "",
             "| quantity | value | budget | verdict |", "|---|---|---|---|"]
    lines += [f"| {r.quantity} | {r.value} | {r.budget} | {r.verdict} |" for r in report.rows]
    verdict = "All budgets hold." if report.ok else "Failed: " + "; ".join(report.failures)
    return "\n".join([*lines, "", *report.notes, "", verdict])


def write_report(report: CheckReport, output_dir: str | Path) -> Path:
    """``<output_dir>/check_report.json``, written atomically."""
    return atomic_write_json(Path(output_dir) / REPORT_NAME, report.to_json())


def _notes(target: Target, settings: CheckSettings, training: LoRATrainingSettings) -> list[str]:
    """What the figures mean: shapes, optimizer, what a peak covers."""
    from ..checkpoints import resolve_model_path
    from ..loading import detect_model_type

    memory = ("the CUDA allocator's peak reserved memory" if target.device.startswith("cuda")
              else "the peak resident memory of the measuring process")
    vision = detect_model_type(resolve_model_path(target.model)) == "qwen2_5_vl"
    return [f"training: {settings.batch} x {settings.seq_len} tokens, {training.optimizer}, "
            f"{target.quantization or 'unquantized'} base, {TRAINING_STEPS} steps; peak = {memory} (weights, adapter, optimizer "
            f"state and activations); * = the gradient checkpointing training uses",
            f"latency: {settings.latency_batch} x {settings.seq_len} tokens, {settings.latency_repeats} interleaved "
            "rounds after a warm-up; overhead = the median of the per-round ratios to the base, beside the adapter "
            "vs base ms of that median round (raw rounds in the JSON report)",
            *(["a vision-language model: measured on text tokens; images add the vision tower's activations and "
               "image tokens"] if vision else [])]


def _measured_vs_predicted(measured, predicted, fmt) -> str:
    return f"{fmt(measured) if measured is not None else '-'} (predicted {fmt(predicted) if predicted else 'n/a'})"


def _agreement(predicted: int | None, measured: int | None) -> str:
    if measured is None:
        return "not measured"
    return "matches" if predicted == measured else f"differs by {measured - predicted:+,}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _overhead_text(inference: InferenceMeasurement, phase: str) -> str:
    """``+76.0% (24.75 vs 14.06 ms)``: the median per-round ratio (``phase`` "unmerged" or "merged") beside the
    adapter and base times of the round it was measured in, so that 24.75 / 14.06 - 1 is the percentage."""
    adapter_ms, base_ms = inference.phase_ms(phase)
    return f"{inference.overhead(phase):+.1%} ({adapter_ms:.2f} vs {base_ms:.2f} ms)"


def _peak_text(step: StepMeasurement) -> str:
    """``1.23 GiB (of 80 GiB; allocated 1.1 GiB), 5,000 tokens/s`` on CUDA; with the loaded model's size on the CPU."""
    if step.device_total_bytes is not None:
        context = f"of {_bytes(step.device_total_bytes)}; allocated {_bytes(step.peak_allocated_bytes)}"
    else:
        context = f"model loaded: {_bytes(step.loaded_bytes)}"
    return f"{_bytes(step.peak_bytes)} ({context}), {step.tokens_per_s:,.0f} tokens/s"
