"""What ``extract`` and ``export`` return, and write beside their output as JSON: typed, read by attribute.

Each report is a frozen pydantic model; ``to_json()`` is the object written to ``extraction_report.json`` /
``export_report.json`` (the same keys, in the same order, as before they were typed) and ``model_validate`` reads
it back.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

__all__ = ["Record", "ModuleExtraction", "ExtractionReport", "UniformExportReport", "MergedExportReport", "ExportReport"]

Truncation = Literal["curvature", "weight"]


class Record(BaseModel):
    """Base of the records the library returns and writes as JSON (reports, check, comparison rows): frozen, unknown
    keys refused, no NaN or infinity (JSON has none), help text = field docstring."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)

    def to_json(self) -> dict:
        """The JSON object written beside the output."""
        return self.model_dump(mode="json")


class ModuleExtraction(Record):
    """How one module's delta became its LoRA factors."""

    rank: int
    """The configured rank r."""
    scale: float
    """alpha / r (alpha / sqrt(r) with rsLoRA): the factors are stored so that scale * B A is the truncation."""
    relative_error: float
    """||ΔW − scale B A|| / ||ΔW||, in the norm of ``truncation`` (Frobenius; curvature-weighted for "curvature")."""
    truncation: Truncation
    """Which norm the rank-r truncation is best in: the curvature-weighted one, or the plain (weight) one."""


class ExtractionReport(Record):
    """An extracted adapter: every module's truncation and its error, and where the pair came from."""

    modules: dict[str, ModuleExtraction]
    """Module name -> how it was extracted."""
    truncation: Truncation
    """The truncation asked for ("curvature" when the config has curvature factors and they were used)."""
    base: str = ""
    """The base checkpoint's folder."""
    finetuned: str = ""
    """The fine-tuned checkpoint's folder."""
    seconds: float = 0.0
    """Wall time of the extraction, in seconds."""
    mean_relative_error: float = 0.0
    """Mean of the modules' relative errors."""
    max_relative_error: float = 0.0
    """Largest of the modules' relative errors."""
    serving_problems: dict[str, str] = {}
    """Server -> how it would read the adapter wrong (``export.serving_problems``); empty when every server reads
    it right."""


class UniformExportReport(Record):
    """An adapter written at one rank R with global scale 1 (every server reads it right)."""

    format: Literal["uniform"] = "uniform"
    source: str
    """The adapter folder exported."""
    rank: int
    """The exported rank R."""
    global_scale: float = 1.0
    """lora_alpha / r of the export (1: the per-module scales are folded into lora_B)."""
    source_ranks: dict[str, int]
    """Module name -> its rank in the source adapter."""
    source_scales: dict[str, float]
    """Module name -> its scale in the source adapter."""
    bytes_before: int
    """Bytes of the source adapter's weights."""
    bytes_after: int = 0
    """Bytes of the exported adapter's weights."""


class MergedExportReport(Record):
    """An adapter merged into its base: a plain model folder."""

    format: Literal["merged"] = "merged"
    source: str
    """The adapter folder exported."""
    base: str
    """The base model folder it was merged into."""
    dtype: str
    """The merged weights' dtype ("float32", "bfloat16", ...)."""
    bytes_before: int
    """Bytes of the source adapter's weights."""
    note: Optional[str] = None
    """What the user should know about the merge (a quantized training base), or None."""
    bytes_after: int = 0
    """Bytes of the merged model's weights."""
    seconds: float = 0.0
    """Wall time of the export, in seconds."""


ExportReport = Union[UniformExportReport, MergedExportReport]
