"""Stage 0: a brief full-parameter fine-tune on a stratified subset, saving the checkpoint pair.

Layout written (the original design's)::
    <out>/pretrained/            # the base model as safetensors, written only when the base is not already a
                                 #   local safetensors folder (or with copy_base=True); otherwise
                                 #   training_metrics.json records that folder's path and fingerprint
    <out>/finetuned/             # all parameters after training, safetensors + tokenizer
    <out>/training_metrics.json  # losses, per-task counts before/after sampling, settings, timings

The training loop (``training_loop.py``) is deliberately plain torch (AdamW, warmup + cosine/linear decay, gradient
accumulation, optional gradient checkpointing, bf16 autocast where the hardware has bf16 units) so one screen shows
everything it does; LoRA training (``train.py``) and the comparison's rows (``evidence/runs.py``) run the same loop. The options
are ``FinetuneSettings`` / ``TrainingSettings`` in ``lora_ranks.settings``.

Precision (``TrainingSettings.precision``, resolved by ``devices.resolve_precision``): under bf16 the matrix
products run in bf16 (``torch.autocast``) while every trained weight, its gradient and AdamW's state keep the
model's dtype: a float32 base (the demo's, the cached SmolLM2) trains float32 master weights and its fine-tuned
checkpoint is float32 as before; a base stored in bf16 (most hub models) loads and trains in bf16 whatever the
precision, as before. "auto" picks bf16 on a CUDA GPU of compute capability 8.0+ and on a CPU with avx512_bf16 or
amx_bf16 (``devices.bf16_units``), float32 elsewhere, where bf16 would be emulated and slower. The analysis'
numerics (float64 spectra and factors) never depend on it.
"""

from __future__ import annotations

# transformers' tokenizer classes are imported when records are tokenized: the input checks import this module.
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._io import atomic_folder, atomic_write_json, atomic_write_text
from .checkpoints import Checkpoint, resolve_model_path
from .data import TASK_KEY, DataError, load_records, stratified_subset, tokenize_record
from .devices import bf16_units, resolve_precision
from .distributed import check_launchable, is_main, launch, should_launch, wait_for_everyone, world
from .loading import load_image_processor, load_model
from .settings import FinetuneSettings
from .training_loop import (  # the loop lives there; re-exported here, where callers have always found it
    TrainingDivergedError,
    check_step_fits,
    enable_gradient_checkpointing,
    planned_steps,
    train_loop,
)

__all__ = ["FinetuneSettings", "FinetuneResult", "TrainingDivergedError", "run_preliminary_finetune", "train_loop",
           "prepare_examples", "enable_gradient_checkpointing", "split_half_records", "run_split_half_finetunes",
           "planned_steps", "check_step_fits"]


@dataclass
class FinetuneResult:
    """Where the checkpoint pair is, plus the loss curve (small, picklable)."""

    pretrained_dir: str
    finetuned_dir: str
    metrics_path: str
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    bf16: bool = False
    """Trained under bf16 autocast (``TrainingSettings.precision``)."""


def prepare_examples(data_path: str | Path, tokenizer, *, max_length: int, seed: int = 0, subset_ratio: float = 1.0,
                     max_samples: int | None = None, task_key: str = TASK_KEY, image_processor=None):
    """Load, stratify and tokenize: (examples, SubsetReport, number of records in the file).

    ``subset_ratio`` / ``max_samples`` pick a stratified subset by ``task_key`` (all records by default). Image
    paths in vision records are relative to the dataset file's folder.
    """
    records = load_records(data_path)
    subset, report = stratified_subset(records, subset_ratio, max_samples if max_samples is not None else len(records),
                                       seed=seed, task_key=task_key)
    examples = [tokenize_record(r, tokenizer, max_length, image_processor=image_processor,
                                base_dir=Path(data_path).parent) for r in subset]
    return examples, report, len(records)


def check_trainable_tokens(records: list[dict], model: str | Path, max_length: int, flag: str = "--max-length",
                           what: str = "the records") -> None:
    """Some record keeps a response token to train on within ``max_length`` tokens (text records; with only vision
    records nothing is checked): a length that cuts every response off would fail at the first step.

    Raises:
        DataError: naming the flag, the length and the shortest prompt.
    """
    text = [r for r in records if "images" not in r]
    if not text:
        return
    from transformers import AutoTokenizer


    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(model)))
    shortest = None
    for record in text[:2000]:  # a sample is enough: one record that trains suffices
        labels = tokenize_record(record, tokenizer, max_length)["labels"]
        if any(label != -100 for label in labels[1:]):
            return
        prompt = sum(1 for label in tokenize_record(record, tokenizer, 10**6)["labels"] if label == -100)
        shortest = prompt if shortest is None else min(shortest, prompt)
    raise DataError(f"{flag} {max_length} cuts off every response of {what}: no token is left to train on (the "
                    f"shortest prompt is {shortest} tokens): raise {flag}")


def _save_dir(model, tokenizer, target: Path, image_processor=None) -> None:
    """Save model, tokenizer (and image processor) as a folder that replaces ``target`` only once complete."""
    with atomic_folder(target, content="model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if image_processor is not None:
            image_processor.save_pretrained(tmp)


def run_preliminary_finetune(
    model_path: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    settings: FinetuneSettings = FinetuneSettings(),
    *,
    device: str | None = None,
    on_step: Callable[[int, int, float, float], None] | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> FinetuneResult:
    """Fine-tune every parameter of ``model_path`` briefly on a stratified subset of ``data_path``.

    Args:
        model_path: local Hugging Face folder (safetensors) of the base causal LM.
        data_path: JSON/JSONL dataset (see ``lora_ranks.data``).
        out_dir: where pretrained/, finetuned/ and training_metrics.json go.
        settings: see FinetuneSettings.
        device: "cuda", "cpu", ... (None: CUDA when available).
        on_step: called as ``on_step(step, total_steps, loss, lr)`` after each optimizer step (logging).
        progress: show a console progress bar.
        trust_remote_code: run Python code shipped with the model (off: only architectures transformers
            knows load, so a downloaded folder cannot execute anything).
    """
    start = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolve_precision(settings.precision, dev)  # a bf16 the hardware lacks is refused before any work
    if should_launch(settings.processes):  # this call again, in settings.processes processes
        check_launchable(settings.processes, settings.batch_size, device, "processes")
        return launch("finetune", {"model_path": str(model_path), "data_path": str(data_path), "out_dir": str(out_dir),
                                   "settings": settings.to_dict(), "trust_remote_code": trust_remote_code},
                      settings.processes, cpu=dev.type == "cpu")
    writes = is_main()  # one process of several: only the first writes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)

    # Step 1: data -- stratified subset, tokenized with response-only labels.
    model, tokenizer = load_model(model_path, trust_remote_code=trust_remote_code)
    image_processor = load_image_processor(model_path)
    examples, report, n_records = prepare_examples(
        data_path, tokenizer, max_length=settings.max_length, seed=settings.seed, subset_ratio=settings.subset_ratio,
        max_samples=settings.max_samples, task_key=settings.task_key, image_processor=image_processor)

    # Step 2: the pretrained side of the pair (a local safetensors base is referenced, not copied).
    pretrained_dir = _pretrained_side(model, tokenizer, image_processor, model_path, out, settings.copy_base, writes)
    pretrained_fingerprint = Checkpoint(pretrained_dir).header_fingerprint()

    # Step 3: train.
    _ready_to_train(model, dev, settings)
    step_tokens: list[int] = []
    losses, use_bf16 = train_loop(model, examples, tokenizer.pad_token_id, settings, dev, on_step=on_step,
                                  progress=progress, desc="preliminary fine-tune", tokens_per_step=step_tokens)
    total = len(losses)

    # Step 4: the fine-tuned side, then the metrics.
    model.config.use_cache = True
    finetuned_dir = out / "finetuned"
    if writes:
        _save_dir(model.cpu(), tokenizer, finetuned_dir, image_processor)
    seconds = time.perf_counter() - start
    metrics = {
        "model": str(model_path), "pretrained_dir": str(pretrained_dir),
        "pretrained_copied": pretrained_dir == out / "pretrained", "pretrained_fingerprint": pretrained_fingerprint,
        "finetuned_dir": str(finetuned_dir), "data": str(data_path), "n_records": n_records, "n_train": len(examples),
        "task_counts_before": report.counts_before, "task_counts_after": report.counts_after,
        "settings": settings.to_dict(), "device": str(dev),
        "processes": world()[1],  # data-parallel processes that trained (lora_ranks.distributed)
        "bf16": use_bf16,  # matrix products under bf16 autocast; the weights trained and saved are float32
        "bf16_units": bf16_units(dev) if use_bf16 else None, "steps": total,
        "tokens": sum(step_tokens),  # non-padding tokens trained on (compute: ~6 x parameters FLOPs each)
        "losses": losses, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "seconds": seconds,
    }
    metrics_path = atomic_write_json(out / "training_metrics.json", metrics) if writes else out / "training_metrics.json"
    return FinetuneResult(str(pretrained_dir), str(finetuned_dir), str(metrics_path), losses, total, seconds,
                          use_bf16)


def _pretrained_side(model, tokenizer, image_processor, model_path: str | Path, out: Path, copy_base: bool,
                     writes: bool) -> Path:
    """The pretrained side of the pair: ``model_path`` itself when it is a local safetensors folder (referenced, not
    copied) unless ``copy_base``, else the loaded model saved to ``out/pretrained`` (by the writing process)."""
    local_safetensors = Path(model_path).is_dir() and any(Path(model_path).glob("*.safetensors"))
    if local_safetensors and not copy_base:
        return Path(model_path).resolve()
    pretrained_dir = out / "pretrained"
    if writes:
        _save_dir(model, tokenizer, pretrained_dir, image_processor)
    wait_for_everyone()  # every process reads the pretrained side's fingerprint next
    return pretrained_dir


def _ready_to_train(model, dev: torch.device, settings: FinetuneSettings) -> None:
    """On ``dev`` in train mode; the vision tower frozen and gradient checkpointing on when the settings ask."""
    model.to(dev).train()
    if settings.freeze_vision:
        for name, param in model.named_parameters():
            if ".visual." in f".{name}":
                param.requires_grad_(False)
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(model)
        model.config.use_cache = False


def split_half_records(data_path: str | Path, settings: FinetuneSettings) -> tuple[list[dict], list[dict]]:
    """The preliminary fine-tune's stratified subset (the same records, by the same settings and seed), dealt into
    two disjoint halves: within each task alternately, so both halves keep the task mix. Image paths of vision
    records are made absolute, so the halves can be written anywhere."""
    records = load_records(data_path)
    subset, _ = stratified_subset(records, settings.subset_ratio, settings.max_samples, seed=settings.seed,
                                  task_key=settings.task_key)
    root = Path(data_path).resolve().parent
    halves: tuple[list[dict], list[dict]] = ([], [])
    seen: dict[str, int] = {}
    for record in subset:
        if "images" in record:
            record = {**record, "images": [str(root / name) for name in record["images"]]}
        task = str(record.get(settings.task_key, "default"))
        halves[seen.get(task, 0) % 2].append(record)
        seen[task] = seen.get(task, 0) + 1
    if not halves[1]:
        raise DataError(f"noise_estimate 'split-half' splits the fine-tuning subset in two, but the subset of {data_path} "
                        f"has {len(subset)} record(s), no task with two (each half takes records of every task): raise "
                        "--subset-ratio / --max-samples, or use the spectrum estimate")
    return halves


def run_split_half_finetunes(model_path: str | Path, data_path: str | Path, out_dir: str | Path,
                             settings: FinetuneSettings = FinetuneSettings(), **kwargs) -> tuple[FinetuneResult, FinetuneResult]:
    """Two brief fine-tunes of ``model_path``, one on each half of the fine-tuning subset (``split_half_records``),
    with the main fine-tune's steps, learning rate and seed: ``<out_dir>/half-a`` and ``half-b`` (each a
    ``run_preliminary_finetune`` folder; the halves' records in ``half-a.jsonl`` / ``half-b.jsonl``). ``kwargs`` go
    to ``run_preliminary_finetune`` (device, progress, ...). For the split-half noise estimate (``noise``)."""
    out = Path(out_dir)
    results = []
    for name, half in zip(("half-a", "half-b"), split_half_records(data_path, settings)):
        path = atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in half))
        every_record = settings.replace(subset_ratio=1.0, max_samples=len(half))
        results.append(run_preliminary_finetune(model_path, path, out / name, every_record, **kwargs))
    return results[0], results[1]
