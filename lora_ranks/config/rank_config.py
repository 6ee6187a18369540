"""``RankConfig``, the rank config itself (``lora_rank_config.json``), its PEFT-facing patterns, and
``build_rank_config``, which makes one from the allocations."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, Field, ValidationError, model_validator

from .._version import __version__
from ..checkpoints import ModuleRef
from ..ranks import ModuleAllocation, lora_parameters
from ..settings import AllocationSettings, AlphaPolicy, AnalysisSettings, CurvatureSettings
from ..spectra.kind import SpectrumKind
from .records import (
    MAX_LORA_SCALE,
    SCHEMA_VERSION,
    AnalysisMetadata,
    CheckpointIdentity,
    ModuleRecord,
    Number,
    RankConfigError,
    _Record,
)

__all__ = ["RankConfig", "anchored_key", "build_rank_config", "parse_rank_config", "migrate"]


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
