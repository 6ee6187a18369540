"""lora-ranks: decide per-module LoRA ranks from the spectrum of a brief full fine-tune's weight deltas.

The library is pure (no Prefect): stages are ``checkpoints`` -> ``spectra`` -> ``ranks`` -> ``config``,
with ``data``/``finetune`` producing the checkpoint pair and ``report`` the plots and raw data.
Orchestration lives in the top-level ``tasks`` and ``flows`` packages.
"""

__version__ = "0.1.0"

from .analysis import analyze_checkpoints  # noqa: E402
from .checkpoints import Checkpoint, CheckpointError, CheckpointPair, ModuleRef, TargetSpec  # noqa: E402
from .config import AlphaPolicy, RankConfigError, load_rank_config, save_rank_config  # noqa: E402
from .ranks import AllocationSettings, allocate_ranks  # noqa: E402
from .spectra import Spectrum, compute_spectrum  # noqa: E402

__all__ = [
    "__version__",
    "analyze_checkpoints",
    "Checkpoint",
    "CheckpointError",
    "CheckpointPair",
    "ModuleRef",
    "TargetSpec",
    "AlphaPolicy",
    "RankConfigError",
    "load_rank_config",
    "save_rank_config",
    "AllocationSettings",
    "allocate_ranks",
    "Spectrum",
    "compute_spectrum",
]
