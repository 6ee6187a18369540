"""Stage 4: the rank config, ``lora_rank_config.json``: the contract between analysis and model building.

The file *is* ``RankConfig``, a pydantic model (schema version 2): every reader loads it with
``load_rank_config`` and reads attributes, like PEFT's ``adapter_config.json`` is its ``LoraConfig``. Its fields
and help texts are the schema; ``python -m lora_ranks.config_schema`` writes them out as the JSON Schema
(``docs/lora_rank_config.schema.json``) and the field table of ``docs/rank-config.md``.

Schema-1 files (written by releases up to 0.2) are migrated on load (``migrate``): the version is bumped, the
separate ``budget_parameters`` / ``budget_fraction`` settings of the oldest files become ``budget``, and keys
this release does not know are kept under ``analysis_metadata.legacy``.

PEFT matches a ``rank_pattern`` key ``K`` against a module name with ``re.match(rf"(.*\\.)?({K})$", name)``
and takes the first key that matches. Our keys are ``^`` + the escaped full module name, so each matches
exactly one module and the order cannot matter.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, computed_field, model_validator

from ._io import atomic_write_json, strict_json_loads
from ._version import __version__
from .errors import LoraRanksError, list_problems, summarize_problems
from .ranks import RANK_RULES, ModuleAllocation, lora_parameters
from .settings import AllocationSettings, AlphaPolicy, AnalysisSettings, CurvatureSettings
from .spectra.kind import SpectrumKind

__all__ = [
    "SCHEMA_VERSION",
    "AlphaPolicy",
    "RankConfig",
    "RankConfigError",
    "AnalysisMetadata",
    "ModuleRecord",
    "CheckpointRecord",
    "CheckpointIdentity",
    "SvdRecord",
    "CurvatureRecord",
    "Timings",
    "SplitHalfRecord",
    "anchored_key",
    "build_rank_config",
    "save_rank_config",
    "load_rank_config",
    "parse_rank_config",
    "migrate",
    "check_config_matches_model",
]

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


class RankConfig(_Record):
    """``lora_rank_config.json``: a LoRA rank per module, the PEFT arguments that give it, and why."""

    schema_version: Literal[2] = SCHEMA_VERSION
    """Version of this schema; older files are migrated on load."""
    layer_ranks: dict[str, int]
    """Per module type: the median final rank (the design overview's summary)."""
    target_modules: list[str] = Field(min_length=1)
    """Full names of the adapted modules on the loaded model (PEFT's target_modules)."""
    rank_pattern: dict[str, int]
    """PEFT's rank_pattern: per target, the anchored escaped name (^model\\.layers\\.0\\.self_attn\\.q_proj) -> rank."""
    alpha_pattern: dict[str, Number]
    """PEFT's alpha_pattern, keyed like rank_pattern: lora_alpha per module (from alpha_policy)."""
    lora_alpha: Number
    """PEFT's global lora_alpha: the alpha of the first module type's median rank."""
    use_rslora: bool = False
    """PEFT's use_rslora: scale by alpha / sqrt(r) instead of alpha / r."""
    alpha_policy: AlphaPolicy = AlphaPolicy()
    """How lora_alpha was set per module."""
    compression_ratio: float = Field(gt=0)
    """LoRA trainable parameters / base model parameters."""
    trainable_parameters: int = Field(ge=1)
    """LoRA parameters of all modules: sum of r * (d_out + d_in)."""
    base_parameters: int = Field(ge=1)
    """Parameters of the base model."""
    analysis_metadata: AnalysisMetadata
    """Per-module decisions, settings, accuracy and identities."""

    @model_validator(mode="after")
    def _consistent(self) -> RankConfig:
        targets = self.target_modules
        if not all(targets):
            raise ValueError("target_modules must be module names, got an empty name")
        if len(set(targets)) != len(targets):
            raise ValueError(f"target_modules lists {next(t for t in targets if targets.count(t) > 1)!r} twice")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        for section in ("layer_ranks", "rank_pattern", "alpha_pattern"):
            for key, value in getattr(self, section).items():
                if value <= 0:
                    raise ValueError(f"{section}[{key!r}] must be a positive number, got {value!r}")
        expected = {anchored_key(t): t for t in targets}
        for section in ("rank_pattern", "alpha_pattern"):
            extra = sorted(set(getattr(self, section)) - set(expected))
            if extra:
                raise ValueError(f"{section} has key {extra[0]!r} that is not an anchored target module name")
        missing = sorted(set(expected) - set(self.rank_pattern))
        if missing:
            raise ValueError(f"rank_pattern has no rank for target module {expected[missing[0]]!r}")
        modules = self.analysis_metadata.modules
        unknown = [n for n in modules if anchored_key(n) not in self.rank_pattern]
        if unknown:
            raise ValueError(f"analysis_metadata.modules names {unknown[0]!r}, which has no rank_pattern entry")
        unrecorded = [t for t in targets if t not in modules]
        if unrecorded:
            raise ValueError(f"target module {unrecorded[0]!r} has no record in analysis_metadata.modules")
        for name, record in modules.items():
            if record.final_rank != self.rank_pattern[anchored_key(name)]:
                raise ValueError(f"module {name!r}: final_rank {record.final_rank!r} disagrees with rank_pattern "
                                 f"{self.rank_pattern[anchored_key(name)]!r}")
            if record.final_rank > min(record.shape):  # more parameters than the module itself, and no more rank
                raise ValueError(f"module {name!r}: rank {record.final_rank} is larger than its smaller side "
                                 f"(shape {tuple(record.shape)}): a LoRA's rank is at most {min(record.shape)} there")
            alpha = self.alpha_of(name)
            scale = alpha / (record.final_rank ** 0.5 if self.use_rslora else record.final_rank)
            if scale > MAX_LORA_SCALE:
                raise ValueError(f"module {name!r}: lora_alpha {alpha!r} at rank {record.final_rank} scales its update "
                                 f"by {scale:.3g}, above {MAX_LORA_SCALE:,}: such an update swamps the base model")
        return self

    # -- reading ---------------------------------------------------------------------------------------------------

    @property
    def modules(self) -> dict[str, ModuleRecord]:
        """Per-module records, in the order of ``target_modules``."""
        return {name: self.analysis_metadata.modules[name] for name in self.target_modules}

    @property
    def ranks(self) -> dict[str, int]:
        """Module name -> LoRA rank, for every target."""
        return {name: self.rank_pattern[anchored_key(name)] for name in self.target_modules}

    def alpha_of(self, name: str) -> Number:
        """lora_alpha of module ``name`` (its alpha_pattern entry, else the global lora_alpha)."""
        return self.alpha_pattern.get(anchored_key(name), self.lora_alpha)

    @property
    def allocation_settings(self) -> AllocationSettings:
        """The allocation settings the ranks were chosen with."""
        return self.analysis_metadata.settings

    @property
    def checkpoints(self) -> Optional[CheckpointIdentity]:
        """The analyzed pair (None for a config written without one, e.g. from given ranks)."""
        return self.analysis_metadata.checkpoints

    @property
    def spectrum_kind(self) -> SpectrumKind:
        """The spectrum the analysis asked for (recorded in its curvature record; weight when none is)."""
        curvature = self.analysis_metadata.curvature
        return curvature.kind if curvature is not None else SpectrumKind.WEIGHT

    def module_refs(self):
        """The targets as ``ModuleRef``s (names, on-disk tensor names, shapes, layers) from the records, so later
        stages read weights without building a model; None when a record lacks ``weight_key``."""
        from .checkpoints import ModuleRef

        modules = self.modules
        if not all(m.weight_key for m in modules.values()):
            return None
        return [ModuleRef(n, m.weight_key, tuple(m.shape), m.layer, m.depth, m.module_type) for n, m in modules.items()]

    # -- writing ---------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The JSON-ready content of the file."""
        return self.model_dump(mode="json")

    def replace(self, **updates: Any) -> RankConfig:
        """A copy with ``updates`` (top-level fields, or ``analysis_metadata={...}`` keys to change in it),
        validated like a file."""
        data = self.to_dict()
        meta = updates.pop("analysis_metadata", None)
        data.update(updates)
        if meta:
            data["analysis_metadata"] = {**data["analysis_metadata"], **_plain(meta)}
        return parse_rank_config(data, source="rank config")


def _plain(value: Any) -> Any:
    """Records and settings inside a mapping as plain data (for ``replace``)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def anchored_key(module_name: str) -> str:
    """The ``rank_pattern`` key that PEFT matches to ``module_name`` and nothing else."""
    return "^" + re.escape(module_name)


def build_rank_config(
    allocations: Sequence[ModuleAllocation],
    settings: AllocationSettings,
    *,
    base_parameters: int,
    alpha_policy: AlphaPolicy = AlphaPolicy(),
    spectra_info: Mapping[str, Mapping[str, Any]] | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> RankConfig:
    """The validated config of these rank decisions.

    Args:
        allocations: one per module (from ``allocate_ranks``).
        settings: the allocation settings used (recorded).
        base_parameters: parameter count of the base model, the denominator of ``compression_ratio``.
        alpha_policy: scaling policy (recorded; sets ``alpha_pattern``/``lora_alpha``/``use_rslora``).
        spectra_info: per module name, method/accuracy/timing facts to record next to its decision
            (``ModuleRecord`` fields).
        extra_metadata: more ``AnalysisMetadata`` fields (checkpoints, timings, curvature, ...).

    Raises:
        RankConfigError: an empty allocation, a non-positive ``base_parameters``, or a record that does not
            follow the schema.
    """
    if not allocations:
        raise RankConfigError("no modules to write: the allocation is empty")
    if base_parameters <= 0:
        raise RankConfigError(f"base_parameters must be positive, got {base_parameters}")
    by_type: dict[str, list[int]] = {}
    for a in allocations:
        by_type.setdefault(a.module_type, []).append(a.final_rank)
    layer_ranks = {t: int(np.median(r)) for t, r in by_type.items()}
    trainable = sum(lora_parameters(a.shape, a.final_rank) for a in allocations)
    modules = {}
    for a in allocations:
        entry = a.to_dict()
        entry.pop("name")
        if spectra_info and a.name in spectra_info:
            entry.update(spectra_info[a.name])
        modules[a.name] = entry
    config = {
        "schema_version": SCHEMA_VERSION,
        "layer_ranks": layer_ranks,
        "target_modules": [a.name for a in allocations],
        "rank_pattern": {anchored_key(a.name): a.final_rank for a in allocations},
        "alpha_pattern": {anchored_key(a.name): alpha_policy.alpha(a.final_rank) for a in allocations},
        "lora_alpha": alpha_policy.alpha(layer_ranks[allocations[0].module_type]),
        "use_rslora": alpha_policy.policy == "rslora",
        "alpha_policy": alpha_policy,
        "compression_ratio": trainable / base_parameters,
        "trainable_parameters": trainable,
        "base_parameters": base_parameters,
        "analysis_metadata": {"tool_version": __version__, "settings": settings, "modules": modules,
                              **(extra_metadata or {})},
    }
    return parse_rank_config(config, source="rank config")


def save_rank_config(path: str | Path, config: RankConfig) -> Path:
    """Write ``config`` atomically to ``path`` (a failed write leaves the previous file as it was)."""
    if not isinstance(config, RankConfig):
        raise TypeError(f"save_rank_config takes a RankConfig, got {type(config).__name__}")
    return atomic_write_json(path, config.to_dict())


def load_rank_config(path: str | Path) -> RankConfig:
    """Read, migrate (schema 1) and validate a rank config file.

    Raises:
        RankConfigError: naming the file and the first problem found.
    """
    path = Path(path)
    if path.is_dir():
        from .analysis.layout import OutputLayout

        inside = next((p for p in (path / "lora_rank_config.json", OutputLayout(path).config_path) if p.is_file()), None)
        raise RankConfigError(f"rank config {path} is a folder; give the rank config file"
                              + (f": {inside}" if inside else " (lora_rank_config.json)"))
    if path.exists() and not path.is_file():
        raise RankConfigError(f"rank config {path} is not a regular file (a pipe, device or socket); give the rank "
                              "config file (lora_rank_config.json)")
    if not path.is_file():
        raise RankConfigError(f"rank config {path} does not exist")
    try:
        data = strict_json_loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise RankConfigError(f"rank config {path} is not valid JSON: {exc}") from None
    return parse_rank_config(data, source=str(path))


def parse_rank_config(data: Any, source: str = "rank config") -> RankConfig:
    """A ``RankConfig`` from parsed JSON (or one already built), migrated and validated.

    Raises:
        RankConfigError: ``source``, then the first problem, with where it is (``analysis_metadata.modules.X.shape``).
    """
    if isinstance(data, RankConfig):
        return data
    if not isinstance(data, dict):
        raise RankConfigError(f"{source}: top level must be a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version is None and ("peft_type" in data or "made_by" in data):
        raise RankConfigError(f"{source}: is a PEFT adapter's file, not a rank config: give the lora_rank_config.json "
                              "an analysis wrote (an adapter folder holds a copy of it)")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise RankConfigError(f"{source}: schema_version {version} is newer than this release of lora-ranks reads "
                              f"({SCHEMA_VERSION}); upgrade lora-ranks")
    if version not in (1, SCHEMA_VERSION):
        raise RankConfigError(f"{source}: schema_version must be 1 or {SCHEMA_VERSION}, got {version!r}")
    try:
        return RankConfig.model_validate(migrate(data))
    except ValidationError as exc:
        raise RankConfigError(f"{source}: {_first_problem(exc)}") from None


def _first_problem(exc: ValidationError) -> str:
    """The first error of a validation as one phrase: where (dotted, with [key] for dict keys), what, the value."""
    error = exc.errors()[0]
    where = ""
    for part in error["loc"]:
        if isinstance(part, int):
            where += f"[{part}]"
        elif where and ("." in part or "^" in part):
            where += f"[{part!r}]"
        else:
            where += ("." if where else "") + str(part)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing" and error["loc"] and isinstance(error["loc"][-1], int):
        return f"{where.rsplit('[', 1)[0]}: too few items (item {error['loc'][-1]} is missing)"
    if error["type"] == "missing":
        return f"missing required key {where!r}"
    shown = "" if error["type"] in ("value_error", "assertion_error") else f", got {error.get('input')!r}"
    return f"{where}: {message}{shown}" if where else message


def migrate(data: Mapping[str, Any]) -> dict:
    """Schema-1 content as schema 2 (a copy; schema-2 content is returned as is).

    Schema 1 stored the derived summaries (``mode``, ``n_modules``, ...) too; they are recomputed. Settings keys of
    the oldest files map onto today's (``budget_parameters`` / ``budget_fraction`` -> ``budget``). Every key this
    release does not know is kept under ``analysis_metadata.legacy``, where it was: a metadata key under its own
    name, one of the allocation settings under ``legacy["settings"]``, of the analysis settings under
    ``legacy["analysis"]``, of the curvature settings under ``legacy["curvature.settings"]`` and of a module record
    under ``legacy["modules"][name]``.
    """
    if data.get("schema_version") != 1:
        return dict(data)
    out = copy.deepcopy(dict(data))
    out["schema_version"] = SCHEMA_VERSION
    meta = out.get("analysis_metadata")
    if not isinstance(meta, dict):
        return out
    dropped: dict[str, Any] = {}

    def known_only(record: dict, fields, where: str) -> dict:
        """``record``'s known keys; the others kept in ``dropped[where]``."""
        unknown = {k: v for k, v in record.items() if k not in fields}
        if unknown:
            dropped[where] = unknown
        return {k: v for k, v in record.items() if k in fields}

    settings = meta.get("settings")
    if isinstance(settings, dict):
        for old in ("budget_parameters", "budget_fraction"):
            value = settings.pop(old, None)
            if value is not None:
                settings["budget"] = float(value)
        meta["settings"] = known_only(settings, AllocationSettings.model_fields, "settings")
    if isinstance(meta.get("analysis"), dict):
        meta["analysis"] = known_only(meta["analysis"], AnalysisSettings.model_fields, "analysis")
    curvature = meta.get("curvature")
    if isinstance(curvature, dict) and isinstance(curvature.get("settings"), dict):
        curvature["settings"] = known_only(curvature["settings"], CurvatureSettings.model_fields, "curvature.settings")
    modules = meta.get("modules")
    if isinstance(modules, dict):
        module_keys: dict[str, dict] = {}
        for name, record in modules.items():
            if isinstance(record, dict):
                unknown = {k: v for k, v in record.items() if k not in ModuleRecord.model_fields}
                if unknown:
                    module_keys[name] = unknown
                modules[name] = {k: v for k, v in record.items() if k in ModuleRecord.model_fields}
        if module_keys:
            dropped["modules"] = module_keys
    known = set(AnalysisMetadata.model_fields) | set(AnalysisMetadata.model_computed_fields)
    legacy = {k: meta.pop(k) for k in list(meta) if k not in known}
    legacy.update(dropped)
    if legacy:
        meta["legacy"] = legacy
    return out


def check_config_matches_model(config: RankConfig, model: Any) -> None:
    """Check that every module the config names exists in ``model`` as a linear layer of the recorded shape.

    Args:
        config: a rank config.
        model: a ``torch.nn.Module`` (e.g. the loaded base model), or a model folder, which is built on the
            meta device for the check (no weights read).

    Raises:
        RankConfigError: listing every module that is missing, not linear, or of another shape.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        from .checkpoints import build_meta_model

        model = build_meta_model(model)
    modules = dict(model.named_modules())
    problems: list[tuple[str, str]] = []
    for name, record in config.modules.items():
        module = modules.get(name)
        if module is None:
            problems.append(("missing", f"{name}: no such module in the model"))
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) and not (weight is not None and weight.ndim == 2):
            problems.append(("not linear", f"{name}: is a {type(module).__name__}, not a linear layer"))
            continue
        # Quantized layers store packed weights: their logical shape is (out_features, in_features).
        actual = (module.out_features, module.in_features) if hasattr(module, "out_features") else tuple(weight.shape)
        if tuple(actual) != tuple(record.shape):
            problems.append(("of another shape",
                             f"{name}: weight shape {tuple(actual)} but the config was made for {tuple(record.shape)}"))
    if problems:
        raise RankConfigError(mismatch_message(config, "model", problems))


def mismatch_message(config: RankConfig, against: str, problems: list[tuple[str, str]]) -> str:
    """The one line for a rank config that does not fit a model or checkpoints: every problem when a few modules do
    not fit; a summary by kind, and the likely cause, when none does (a config made for another model)."""
    total = len(config.target_modules)
    if len(problems) < total:
        return list_problems(f"rank config does not fit the {against}", [text for _, text in problems])
    made_from = config.checkpoints.pretrained.path if config.checkpoints else None
    return summarize_problems(f"rank config does not fit the {against}: none of its {total} modules does", problems) \
        + "; was it made for another model" + (f" (it was analyzed from {made_from})?" if made_from else "?")
