"""lora-ranks: decide per-module LoRA ranks from the spectrum of a brief full fine-tune's weight deltas.

The library is pure (no Prefect). Stages, each a module or package of this folder::

    settings      every option of every stage, declared once
    data, finetune                the checkpoint pair: records, the brief full fine-tune
    checkpoints   stage 1: read the pair lazily, discover targets, deltas
    spectra       stage 2: exact energy + top singular values; truncated SVD factors
    analysis      per-layer spectra on disk (the unit of parallel work), assembled into a rank config
    ranks         stage 3: spectra -> one rank per module (threshold, bounds, smoothing, budget)
    config        stage 4: lora_rank_config.json, the contract between analysis and model building
    model, train, extract         stage 5: PEFT models with those ranks; training; adapters from a full fine-tune
    plots, evidence               plots and raw data; do the ranks help?
    export        adapters every server reads right (uniform rank, or merged)
    check         stage 6: memory and latency of a rank config on this machine, budgets as assertions

Orchestration lives in the top-level ``tasks`` and ``flows`` packages. Names below are imported on first use,
so ``import lora_ranks`` (and reading the settings) stays fast.
"""

from importlib import import_module

from ._version import __version__

_EXPORTS = {
    "analyze_checkpoints": "analysis",
    "Checkpoint": "checkpoints", "CheckpointError": "checkpoints", "CheckpointPair": "checkpoints",
    "ModuleRef": "checkpoints", "TargetSpec": "checkpoints",
    "RankConfig": "config", "RankConfigError": "config", "load_rank_config": "config", "save_rank_config": "config",
    "LoraRanksError": "errors",
    "extract_lora": "extract",
    "DynamicLoRAConfig": "model", "DynamicLoRAError": "model", "PEFTModelFactory": "model",
    "create_model_with_dynamic_lora": "model", "create_peft_model_from_config": "model", "load_peft_checkpoint": "model",
    "lora_config": "model",
    "check_warm_start": "model",
    "allocate_ranks": "ranks",
    "check_rank_config": "check", "CheckSettings": "settings",
    "AllocationSettings": "settings", "AlphaPolicy": "settings", "AnalysisSettings": "settings",
    "FinetuneSettings": "settings", "LoRATrainingSettings": "settings",
    "Spectrum": "spectra", "compute_spectrum": "spectra",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'lora_ranks' has no attribute {name!r}")
