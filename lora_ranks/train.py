"""Training a dynamic-rank LoRA with a rank config, reusing the fine-tune stage's data pipeline and loop.

Layout written::
    <out>/adapter/                 # PEFT adapter (adapter_config.json, adapter_model.safetensors) + the rank config
    <out>/training_metrics.json    # losses, trainable parameters and their share, settings, precision, timings

Precision (``LoRATrainingSettings.precision``): under bf16 the frozen base is loaded in bf16 (it never changes,
and autocast would round it to bf16 in every product anyway; half the memory and no cast per step) while the LoRA
weights and AdamW's state stay float32 (PEFT's ``autocast_adapter_dtype``); the saved adapter is float32. Under
float32 the base loads in float32 on every device, CUDA included. A model stored in bf16 also evaluates in bf16
(its residual stream, norms and head): held-out losses of SmolLM2-135M came out 0.050 ± 0.008 nats/token higher
than the same adapter's on the float32 base (BENCHMARKS.md), so the comparison's rows, which are evaluated in
process, keep their base in float32 (``prepare_lora_run(base_dtype=torch.float32)``) and train under autocast only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._io import atomic_write_json
from .analysis.layout import Layout
from .config import RankConfig
from .devices import bf16_units, resolve_precision
from .distributed import check_launchable, is_main, launch, should_launch, world
from .errors import LoraRanksError
from .finetune import prepare_examples, train_loop
from .loading import load_image_processor
from .model import DynamicLoRAConfig, PEFTModelFactory, load_peft_checkpoint, save_adapter
from .serving import read_adapter, serving_problems
from .settings import LoRATrainingSettings

__all__ = ["TrainLayout", "TrainResult", "LoraRun", "prepare_lora_run", "save_lora_run", "train_dynamic_lora",
           "warm_start_source", "training_dtype"]


def training_dtype(bf16: bool) -> torch.dtype:
    """The dtype a LoRA's frozen base is loaded in (a quantized base's compute dtype): bf16 when training runs in
    bf16 (``devices.resolve_precision``), else float32."""
    return torch.bfloat16 if bf16 else torch.float32


@dataclass
class TrainResult:
    """Where the adapter and metrics are (small, picklable)."""

    adapter_dir: str
    metrics_path: str
    trainable_parameters: int
    total_parameters: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    bf16: bool = False
    """Trained under bf16 autocast (``precision``), with the frozen base stored in bf16."""
    serving_problems: dict[str, str] = field(default_factory=dict)
    """Server -> how it would mis-serve the adapter (``export.serving_problems``); empty when every server reads it
    right."""

    @property
    def trainable_share(self) -> float:
        return self.trainable_parameters / self.total_parameters


@dataclass(frozen=True)
class TrainLayout(Layout):
    """The folders and files of one LoRA training run under ``root``::
        <root>/adapter/                 # the trained adapter (with its rank config)
        <root>/training_metrics.json    # losses, parameter counts, settings
        <root>/warm_start_adapter/      # the SVD warm start extracted for it (init warm)
    """

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def metrics_path(self) -> Path:
        return self.root / "training_metrics.json"

    @property
    def warm_start_dir(self) -> Path:
        return self.root / "warm_start_adapter"


def warm_start_source(rank_config: RankConfig, warm_start_from: str | Path | None, init: str) -> Path | None:
    """The fine-tuned model to extract a warm start from: ``warm_start_from`` when given, else the fine-tuned
    checkpoint the rank config was analyzed from; None for a cold start (``init="cold"``).

    Raises:
        LoraRanksError: ``warm_start_from`` given with ``init="cold"``; or ``init="warm"`` without a fine-tuned model
            to start from (none given, and the config records none, or one that no longer exists): a warm start
            asked for is never silently a cold one.
    """
    if init == "cold":
        if warm_start_from is not None:
            raise LoraRanksError(f"warm_start_from={str(warm_start_from)!r} asks for a warm start, but init is 'cold'")
        return None
    if warm_start_from is not None:
        return Path(warm_start_from)
    recorded = rank_config.checkpoints.finetuned.path if rank_config.checkpoints else None
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    why = (f"the fine-tuned model the rank config was analyzed from, {recorded}, no longer exists" if recorded
           else "the rank config records no fine-tuned model (it was not made by an analysis of a pair)")
    raise LoraRanksError(f"init 'warm' needs a fine-tuned model to extract the warm start from, but {why}: give it "
                         "with --warm-start-from (warm_start_from), or train from PEFT's init with --init cold")


@dataclass
class LoraRun:
    """A LoRA built and its data tokenized, ready for ``train_loop`` (``prepare_lora_run``)."""

    model: torch.nn.Module
    tokenizer: object
    config: DynamicLoRAConfig
    examples: list[dict]
    report: object  # data.SubsetReport of the records trained on
    n_records: int
    device: torch.device
    bf16: bool = False  # the precision resolved on the device: autocast in train_loop
    base_dtype: torch.dtype = torch.float32  # the frozen base's (a quantized base's compute dtype)


def prepare_lora_run(model_name: str | Path, rank_config_path: str | Path, data_path: str | Path,
                     settings: LoRATrainingSettings, *, init_from: str | Path | None = None, device: str | None = None,
                     trust_remote_code: bool = False, base_dtype: torch.dtype | None = None) -> LoraRun:
    """Seed, build the LoRA (PEFT's init, or the adapter at ``init_from``), move it to the device and tokenize every
    record of ``data_path``: everything before the first step of ``train_dynamic_lora``.

    The base is loaded in ``base_dtype``, by default ``training_dtype`` of the resolved precision (bf16 or float32;
    with ``quantization``, the compute dtype); the LoRA weights are float32 either way.

    Raises:
        PrecisionError: ``precision`` "bf16" on a device without bf16 units, before anything is loaded.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = resolve_precision(settings.precision, dev)
    dtype = base_dtype or training_dtype(use_bf16)
    config = DynamicLoRAConfig.from_file(rank_config_path, lora_dropout=settings.lora_dropout)
    torch.manual_seed(settings.seed)
    factory = PEFTModelFactory(config, quantization=settings.quantization, dtype=dtype,
                               gradient_checkpointing=settings.gradient_checkpointing,
                               trust_remote_code=trust_remote_code)
    if init_from is not None:
        model, tokenizer = load_peft_checkpoint(model_name, init_from, quantization=settings.quantization,
                                                is_trainable=True, trust_remote_code=trust_remote_code, dtype=dtype)
    else:
        model, tokenizer = factory.build(model_name)
    if settings.quantization is None:
        model.to(dev)
    model.train()
    # Image records go through the image processor saved with a vision-language model, as in the fine-tune stage.
    examples, report, n_records = prepare_examples(data_path, tokenizer, max_length=settings.max_length,
                                                   seed=settings.seed, image_processor=load_image_processor(model_name))
    return LoraRun(model, tokenizer, config, examples, report, n_records, dev, use_bf16, dtype)


def save_lora_run(run: LoraRun, layout: TrainLayout, model_name: str | Path, rank_config_path: str | Path,
                  data_path: str | Path, settings: LoRATrainingSettings, losses: list[float], use_bf16: bool,
                  init_from: str | Path | None, start: float, extra: dict | None = None) -> TrainResult:
    """Save the trained adapter and ``training_metrics.json`` (plus ``extra`` keys) of a run; its TrainResult."""
    # PEFT's count: a packed 4-bit weight stores two parameters per element (numel() would count half of them).
    trainable, total = run.model.get_nb_trainable_parameters()
    adapter_dir = save_adapter(run.model, layout.adapter_dir, run.config,
                               {"made_by": "train", "base": str(model_name), "quantization": settings.quantization})
    metrics = {
        "model": str(model_name), "rank_config": str(rank_config_path), "data": str(data_path),
        "quantization": settings.quantization, "init_from": str(init_from) if init_from else None,
        "trainable_parameters": trainable, "total_parameters": total, "trainable_share": trainable / total,
        "n_records": run.n_records, "n_train": len(run.examples), "task_counts_after": run.report.counts_after,
        "settings": settings.to_dict(), "device": str(run.device), "processes": world()[1], "bf16": use_bf16,
        "bf16_units": bf16_units(run.device) if use_bf16 else None,
        "base_dtype": settings.quantization or str(run.base_dtype).removeprefix("torch."), "losses": losses,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "seconds": time.perf_counter() - start, **(extra or {}),
    }
    metrics_path = atomic_write_json(layout.metrics_path, metrics)
    return TrainResult(str(adapter_dir), str(metrics_path), trainable, total, losses, metrics["seconds"], use_bf16,
                       serving_problems(read_adapter(adapter_dir, weights=False)))


def train_dynamic_lora(
    model_name: str | Path,
    rank_config_path: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    settings: LoRATrainingSettings = LoRATrainingSettings(),
    *,
    init_from: str | Path | None = None,
    device: str | None = None,
    on_step: Callable[[int, int, float, float], None] | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> TrainResult:
    """Train a LoRA with the config's per-module ranks on all records of ``data_path`` and save the adapter.

    Args:
        settings: the training loop, quantization of the base (QLoRA) and LoRA dropout.
        init_from: an adapter folder (e.g. from ``lora-ranks extract``) to start from instead of PEFT's
            default init (SVD warm start); its ranks are validated against its own rank config.
    """
    start = time.perf_counter()
    if should_launch(settings.processes):  # this call again, in settings.processes processes
        check_launchable(settings.processes, settings.batch_size, device, "processes")
        cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
        return launch("train", {"model_name": str(model_name), "rank_config_path": str(rank_config_path),
                                "data_path": str(data_path), "out_dir": str(out_dir), "settings": settings.to_dict(),
                                "init_from": str(init_from) if init_from else None,
                                "trust_remote_code": trust_remote_code}, settings.processes, cpu=cpu)
    run = prepare_lora_run(model_name, rank_config_path, data_path, settings, init_from=init_from, device=device,
                           trust_remote_code=trust_remote_code)
    losses, use_bf16 = train_loop(run.model, run.examples, run.tokenizer.pad_token_id, settings, run.device,
                                  on_step=on_step, progress=progress, desc="dynamic LoRA")
    if not is_main():  # one process of several: the first saves; the result says where
        layout = TrainLayout(out_dir)
        trainable, total = run.model.get_nb_trainable_parameters()
        return TrainResult(str(layout.adapter_dir), str(layout.metrics_path), trainable, total, losses,
                           time.perf_counter() - start, use_bf16)
    return save_lora_run(run, TrainLayout(out_dir), model_name, rank_config_path, data_path, settings, losses,
                         use_bf16, init_from, start)
