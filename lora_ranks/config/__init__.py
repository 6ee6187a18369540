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

from ..settings import AlphaPolicy
from .files import check_config_matches_model, load_rank_config, mismatch_message, save_rank_config
from .rank_config import RankConfig, anchored_key, build_rank_config, migrate, parse_rank_config
from .records import (
    MAX_LORA_SCALE,
    SCHEMA_VERSION,
    AnalysisMetadata,
    CheckpointIdentity,
    CheckpointRecord,
    CurvatureRecord,
    ModuleRecord,
    RankConfigError,
    SplitHalfRecord,
    SvdRecord,
    Timings,
)

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
    "mismatch_message",
    "MAX_LORA_SCALE",
]
