"""The records a rank config is made of: one per module, the checkpoints and their identity, how the spectra were
computed, the curvature, timings, the split-half fine-tunes and the analysis metadata that holds them."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, computed_field, model_validator

from ..errors import LoraRanksError
from ..ranks import RANK_RULES
from ..settings import AllocationSettings, AnalysisSettings, CurvatureSettings
from ..spectra.kind import SpectrumKind

__all__ = ["SCHEMA_VERSION", "MAX_LORA_SCALE", "RankConfigError", "ModuleRecord", "CheckpointRecord",
           "CheckpointIdentity", "SvdRecord", "CurvatureRecord", "Timings", "SplitHalfRecord", "AnalysisMetadata"]


SCHEMA_VERSION = 2


#: The largest LoRA scale (alpha / r; alpha / sqrt(r) with rsLoRA) a config may give a module: 1000 is AlphaPolicy's
#: largest scale, and beyond that an update swamps the base model from the first step.
MAX_LORA_SCALE = 10_000


Number = Union[int, float]  # an int when whole (alpha = 2r), else a float: written back as read


class RankConfigError(LoraRanksError):
    """A rank config file is missing, unreadable, or does not follow the schema."""


class _Record(BaseModel):
    """Base of the config's parts: frozen, unknown keys refused, no NaN or infinity, help text = field docstring."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


class ModuleRecord(_Record):
    """Why one module got its rank: every intermediate of the allocation, and how its spectrum was computed."""

    module_type: str = ""
    """What the module is across depth (q_proj; visual.attn.qkv in a vision tower)."""
    layer: str = ""
    """The repeated block it belongs to (model.layers.3)."""
    depth: int = Field(0, ge=0)
    """Index of that block within its stack."""
    shape: tuple[PositiveInt, PositiveInt]
    """(d_out, d_in) of the weight."""
    raw_rank: Optional[int] = Field(None, ge=0)
    """The rule's rank before bounds (energy: smallest r keeping tau of the exact energy; signal: the directions
    above the noise); empty when tau is not reached within the computed singular values."""
    saturated: bool = False
    """The raw rank exceeds max_rank (the module would want more)."""
    bounded_rank: int = Field(1, ge=1)
    """The raw rank clipped to [min_rank, min(max_rank, d_out, d_in)]."""
    smoothed_rank: int = Field(1, ge=1)
    """After smoothing across depth (equal to bounded_rank in budget mode)."""
    final_rank: int = Field(ge=1)
    """The rank of the module's LoRA (after rounding, or water-filling in budget mode)."""
    energy_retained: float = Field(0.0, ge=0)
    """Share of the spectrum's exact energy the final rank keeps (0 when written without spectra)."""
    zero_delta: bool = False
    """The module did not change in the fine-tune (it gets min_rank)."""
    weight_key: str = ""
    """Tensor name on disk, so that later stages read the weight without building the model."""
    signal_rank: Optional[int] = Field(None, ge=0)
    """Singular values of the weight spectrum above its noise floor (Gavish-Donoho)."""
    noise_threshold: Optional[float] = None
    """That noise floor, in units of the weight spectrum."""
    split_half_rank: Optional[int] = Field(None, ge=0)
    """Directions two fine-tunes on disjoint halves of the data share (noise_estimate split-half)."""
    spectrum: SpectrumKind = SpectrumKind.WEIGHT
    """The spectrum the rank was read from."""
    fallback: str = ""
    """Why this module used another spectrum than asked, if it did."""
    svd_method: Optional[str] = None
    """How the singular values were computed (gram, svdvals, randomized, ...)."""
    rel_error_bound: Optional[float] = None
    """A posteriori bound on the relative error of the computed singular values."""
    svd_seconds: Optional[float] = None
    """Compute time of this module's spectrum, seconds."""
    device: Optional[str] = None
    """Where the spectrum was computed."""
    total_energy: Optional[float] = None
    """The exact energy of the spectrum's matrix (||dW||_F^2 for the weight spectrum)."""


class CheckpointRecord(_Record):
    """One checkpoint of the analyzed pair."""

    source: str
    """Where it came from (a local folder or a hub id)."""
    path: str
    """The folder the analysis read."""
    header_fingerprint: str
    """sha256 over tensor names, shapes, dtypes and sizes of every shard."""
    content_fingerprint: Optional[str] = None
    """sha256 of the analyzed tensors' bytes."""


class CheckpointIdentity(_Record):
    """Both checkpoints of the analyzed pair."""

    pretrained: CheckpointRecord
    finetuned: CheckpointRecord


class SvdRecord(_Record):
    """How the spectra were computed, over all modules."""

    methods: list[str]
    """Methods used."""
    max_rel_error_bound: float
    """The largest accuracy bound of any module's singular values."""
    total_seconds: float
    """Per-matrix compute seconds, summed (a layer's matrices run side by side: can exceed wall time)."""
    top_k: int
    """Singular values computed per module (max_rank + 1, so that saturation shows)."""


class CurvatureRecord(_Record):
    """The curvature behind the spectra: its settings and, when factors were collected, their calibration."""

    settings: CurvatureSettings
    """The curvature settings, with spectrum made concrete (auto resolved)."""
    calibration_data: Optional[str] = None
    """The calibration records (the fine-tuning data)."""
    records: Optional[int] = None
    """Calibration records the factors were estimated from."""
    tokens: Optional[int] = None
    """Non-padding tokens of those records."""
    response_tokens: Optional[int] = None
    """Tokens the fine-tune trained on (responses)."""
    folder: Optional[str] = None
    """The folder of the per-layer factor files."""
    silent_modules: list[str] = []
    """Modules whose output factor stayed zero (no gradient reached them); they fall back to the input spectrum."""
    seconds: Optional[float] = None
    """Wall time of the collection: model load, records, passes over them, files."""
    passes: Optional[int] = None
    """Passes over the calibration records (layers whose factors fit ``factor_memory_gb`` share one)."""
    factor_memory_gb: Optional[float] = None
    """The factor memory per pass the passes were planned for, GiB: the setting, or when it was left empty the
    automatic value (half the memory available once the model was loaded)."""
    accumulation_seconds: Optional[float] = None
    """Of ``seconds``, the time in the hooks forming and summing the factors (the rest: the model, loading)."""
    load_seconds: Optional[float] = None
    """Of ``seconds``, loading the fine-tuned model and tokenizing the calibration records."""

    @property
    def kind(self) -> SpectrumKind:
        """The spectrum the analysis asked for (weight when it was left on auto without calibration records)."""
        return SpectrumKind.WEIGHT if self.settings.spectrum == "auto" else self.settings.spectrum

    @property
    def has_factors(self) -> bool:
        """True when factor files were written (a weighted spectrum, with its folder recorded)."""
        return self.kind.weighted and bool(self.folder)


class Timings(_Record):
    """Wall times of the analysis, seconds."""

    analysis_seconds: float
    """From the start of the analysis to the config."""
    discovery_seconds: Optional[float] = None
    """Reading headers, planning, and collecting curvature factors (serial path)."""
    spectra_wall_seconds: Optional[float] = None
    """Computing every layer's spectra (serial path)."""
    layer_task_seconds: dict[str, float] = {}
    """Each layer task's compute time (the flow)."""


class SplitHalfRecord(_Record):
    """How well the deltas of two fine-tunes on disjoint halves of the data agree, direction by direction."""

    agreement: list[float]
    """Agreement of the top-k singular subspaces, k = 1, 2, ... (1 = identical directions)."""
    min_agreement: float
    """The agreement above which a direction counts as shared."""


class AnalysisMetadata(_Record):
    """Everything the analysis recorded: settings, per-module decisions, checkpoints, accuracy, timings."""

    tool_version: str = "unknown"
    """The lora-ranks release that wrote the config."""
    settings: AllocationSettings = AllocationSettings()
    """The allocation settings the ranks were chosen with (replayed by the comparison)."""
    modules: dict[str, ModuleRecord]
    """Per module (full name as PEFT sees it on the loaded model): why it got its rank."""
    checkpoints: Optional[CheckpointIdentity] = None
    """The analyzed pair."""
    layer_fingerprints: dict[str, str] = {}
    """Per layer: fingerprint of its file of spectra."""
    svd: Optional[SvdRecord] = None
    """How the spectra were computed."""
    analysis: Optional[AnalysisSettings] = None
    """The analysis settings (targets, spectrum method, device)."""
    curvature: Optional[CurvatureRecord] = None
    """The curvature behind the spectra."""
    timings: Optional[Timings] = None
    """Wall times."""
    split_half: dict[str, SplitHalfRecord] = {}
    """Per module, with noise_estimate split-half: the agreement of the two halves' deltas."""
    allocation: Optional[str] = None
    """In a comparison: the allocation this config is (uniform, energy, budget-fisher, ...)."""
    budget_rank: Optional[int] = None
    """In a comparison: the budget, as the uniform rank whose parameters it equals."""
    budget_parameters: Optional[int] = None
    """In a comparison: the budget in LoRA parameters."""
    legacy: dict[str, Any] = {}
    """Keys of an older schema that this release does not read (kept by the migration, not used)."""

    # Derived, written for readers of the JSON file; recomputed (never read) on load.
    @computed_field
    @property
    def mode(self) -> Literal["energy_threshold", "signal", "budget"]:
        """The rank rule, as the design overview names it."""
        return RANK_RULES[self.settings.rank_rule].design_name

    @computed_field
    @property
    def n_modules(self) -> int:
        """Modules in the config."""
        return len(self.modules)

    @computed_field
    @property
    def n_saturated(self) -> int:
        """Modules whose raw rank exceeds max_rank."""
        return len(self.saturated_modules)

    @computed_field
    @property
    def saturated_modules(self) -> list[str]:
        """Those modules."""
        return [n for n, m in self.modules.items() if m.saturated]

    @computed_field
    @property
    def zero_delta_modules(self) -> list[str]:
        """Modules that did not change in the fine-tune."""
        return [n for n, m in self.modules.items() if m.zero_delta]

    @computed_field
    @property
    def fallback_modules(self) -> dict[str, str]:
        """Modules that used another spectrum than asked, and why."""
        return {n: m.fallback for n, m in self.modules.items() if m.fallback}

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        if isinstance(data, dict):
            derived = {name for name, info in cls.model_computed_fields.items()}
            data = {k: v for k, v in data.items() if k not in derived}
        return data
