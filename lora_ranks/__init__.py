"""lora-ranks: decide per-module LoRA ranks from the spectrum of a brief full fine-tune's weight deltas.

The library is pure (no Prefect): stages are ``checkpoints`` -> ``spectra`` -> ``ranks`` -> ``config`` ->
``model`` (PEFT), with ``data``/``finetune`` producing the checkpoint pair, ``report`` the plots and raw data,
``extract`` the truncated-SVD adapter of a full fine-tune and ``train`` the dynamic-rank LoRA training.
Orchestration lives in the top-level ``tasks`` and ``flows`` packages.
"""

__version__ = "0.1.0"

from .analysis import analyze_checkpoints  # noqa: E402
from .checkpoints import Checkpoint, CheckpointError, CheckpointPair, ModuleRef, TargetSpec  # noqa: E402
from .config import AlphaPolicy, RankConfigError, load_rank_config, save_rank_config  # noqa: E402
from .extract import extract_lora  # noqa: E402
from .model import (DynamicLoRAConfig, DynamicLoRAError, PEFTModelFactory, create_model_with_dynamic_lora,  # noqa: E402
                    create_peft_model_from_config, load_peft_checkpoint)
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
    "extract_lora",
    "DynamicLoRAConfig",
    "DynamicLoRAError",
    "PEFTModelFactory",
    "create_model_with_dynamic_lora",
    "create_peft_model_from_config",
    "load_peft_checkpoint",
]
