"""Training a dynamic-rank LoRA with a rank config, reusing the fine-tune stage's data pipeline and loop.

Layout written::

    <out>/adapter/                 # PEFT adapter (adapter_config.json, adapter_model.safetensors) + the rank config
    <out>/training_metrics.json    # losses, trainable parameters and their share, settings, timings
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ._io import atomic_write_json
from .finetune import FinetuneSettings, prepare_examples, train_loop
from .model import DynamicLoRAConfig, PEFTModelFactory, Quantization, load_peft_checkpoint, save_adapter

__all__ = ["TrainResult", "train_dynamic_lora"]


@dataclass
class TrainResult:
    """Where the adapter and metrics are (small, picklable)."""

    adapter_dir: str
    metrics_path: str
    trainable_parameters: int
    total_parameters: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def trainable_share(self) -> float:
        return self.trainable_parameters / self.total_parameters


def train_dynamic_lora(
    model_name: str | Path,
    rank_config_path: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    settings: FinetuneSettings = FinetuneSettings(subset_ratio=1.0, max_samples=10**9, learning_rate=2e-4),
    *,
    quantization: Quantization | None = None,
    init_from: str | Path | None = None,
    device: str | None = None,
    on_step: Callable[[int, int, float, float], None] | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> TrainResult:
    """Train a LoRA with the config's per-module ranks on ``data_path`` and save the adapter.

    Args:
        settings: training knobs (shared with the preliminary fine-tune; by default all records, lr 2e-4).
        quantization: None, "4bit" or "8bit" base weights (QLoRA style).
        init_from: an adapter folder (e.g. from ``lora-ranks extract``) to start from instead of PEFT's
            default init (SVD warm start); its ranks are validated against its own rank config.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    config = DynamicLoRAConfig.from_file(rank_config_path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(settings.seed)
    factory = PEFTModelFactory(config, quantization=quantization, gradient_checkpointing=settings.gradient_checkpointing,
                               trust_remote_code=trust_remote_code)
    if init_from is not None:
        model, tokenizer = load_peft_checkpoint(model_name, init_from, quantization=quantization, is_trainable=True,
                                                trust_remote_code=trust_remote_code)
    else:
        model, tokenizer = factory.build(model_name)
    if quantization is None:
        model.to(dev)
    model.train()
    examples, report, n_records = prepare_examples(data_path, tokenizer, settings)
    losses, use_bf16 = train_loop(model, examples, tokenizer.pad_token_id, settings, dev, on_step=on_step,
                                  progress=progress, desc="dynamic LoRA")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    adapter_dir = save_adapter(model, out / "adapter", config)
    metrics = {
        "model": str(model_name), "rank_config": str(rank_config_path), "data": str(data_path),
        "quantization": quantization, "init_from": str(init_from) if init_from else None,
        "trainable_parameters": trainable, "total_parameters": total, "trainable_share": trainable / total,
        "n_records": n_records, "n_train": len(examples), "task_counts_after": report.counts_after,
        "settings": asdict(settings), "device": str(dev), "bf16": use_bf16, "losses": losses,
        "first_loss": losses[0], "last_loss": losses[-1], "seconds": time.perf_counter() - start,
    }
    metrics_path = atomic_write_json(out / "training_metrics.json", metrics)
    return TrainResult(str(adapter_dir), str(metrics_path), trainable, total, losses, metrics["seconds"])
