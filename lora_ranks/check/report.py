"""The check's records, typed: what each measuring process returns, the size predictions, the table rows and the
whole report (``check_report.json`` is ``CheckReport.to_json()``; fields that do not apply are left out).

Units: bytes (int), milliseconds (``*_ms``), seconds (``*_seconds``); overheads are ratios minus 1 (0.05 = +5%).
"""

from __future__ import annotations

from typing import Any, Optional

from ..reports import Record

__all__ = ["SizePrediction", "InferenceMeasurement", "StepMeasurement", "CheckRow", "Machine", "CheckReport"]


class _Record(Record):
    def to_json(self) -> dict:
        """The JSON object, without the fields that do not apply (None): CPU measurements have no CUDA figures."""
        return self.model_dump(mode="json", exclude_none=True)


class SizePrediction(_Record):
    """Parameter counts and bytes predicted from the rank config and the model's config (``inputs.predict_sizes``)."""

    adapter_parameters: int
    """sum over modules of r * (d_in + d_out)."""
    adapter_bytes: int
    """The LoRA weights' bytes (float32)."""
    parameters: int
    """Base and adapter parameters."""
    base_parameters: int
    """The base's parameters."""
    base_bytes: Optional[int] = None
    """The base's bytes in the dtype training loads it in (from the measured dtype); None for a 4/8-bit base."""


class InferenceMeasurement(_Record):
    """``measuring.measure_inference``: counts and bytes of the built model, forward latency of base, unmerged and
    merged adapter; ``impossible`` says why the latency (or everything) could not be measured."""

    adapter_parameters: Optional[int] = None
    parameters: Optional[int] = None
    adapter_bytes: Optional[int] = None
    adapter_dtype: Optional[str] = None
    base_bytes: Optional[int] = None
    dtype: Optional[str] = None
    """The dtype the base was loaded in ("float32", "bfloat16")."""
    device_name: Optional[str] = None
    base_ms: Optional[float] = None
    """Median forward time of the base over every round of both phases."""
    unmerged_overhead: Optional[float] = None
    unmerged_ms: Optional[float] = None
    unmerged_base_ms: Optional[float] = None
    merged_overhead: Optional[float] = None
    merged_ms: Optional[float] = None
    merged_base_ms: Optional[float] = None
    rounds: Optional[dict[str, dict[str, list[float]]]] = None
    """Phase ("unmerged", "merged") -> {"base_ms": [...], "adapter_ms": [...]}, per round."""
    impossible: Optional[str] = None

    def overhead(self, phase: str) -> float:
        """The median per-round overhead of ``phase`` ("unmerged" or "merged")."""
        return getattr(self, f"{phase}_overhead")

    def phase_ms(self, phase: str) -> tuple[float, float]:
        """(adapter, base) forward ms of the round ``overhead(phase)`` was measured in."""
        return getattr(self, f"{phase}_ms"), getattr(self, f"{phase}_base_ms")


class StepMeasurement(_Record):
    """``measuring.measure_training_step``: peak memory and speed of training steps; ``out_of_memory`` when they did
    not fit, ``impossible`` when they could not be measured."""

    peak_bytes: Optional[int] = None
    """The figure budgets are checked against: CUDA peak reserved, or CPU peak resident memory."""
    peak_allocated_bytes: Optional[int] = None
    """CUDA peak allocated memory."""
    device_total_bytes: Optional[int] = None
    """CUDA device memory."""
    loaded_bytes: Optional[int] = None
    """Resident memory once the model was built (CPU)."""
    peak_covers: Optional[str] = None
    """What the peak includes."""
    step_seconds: Optional[float] = None
    """The last step's wall time."""
    tokens_per_s: Optional[float] = None
    out_of_memory: Optional[str] = None
    impossible: Optional[str] = None


class CheckRow(_Record):
    """One row of the table: a quantity, its value, its budget (empty: none) and the verdict."""

    quantity: str
    value: str
    budget: str = ""
    verdict: str = ""


class Machine(_Record):
    device: str
    torch: str
    python: str


class CheckReport(_Record):
    """Everything one check measured and decided."""

    target: dict[str, Any]
    """``measure.Target.to_dict()``: model, rank config, device, quantization, ..."""
    settings: dict[str, Any]
    """The ``CheckSettings``."""
    training: dict[str, Any]
    """The training settings the verdict applies to (gradient checkpointing)."""
    machine: Machine
    predicted: SizePrediction
    inference: InferenceMeasurement
    training_step: dict[str, StepMeasurement]
    """"gradient_checkpointing_on" / "gradient_checkpointing_off" -> the measurement."""
    notes: list[str]
    rows: list[CheckRow]
    failures: list[str]
    """One line per budget that does not hold."""
    ok: bool
