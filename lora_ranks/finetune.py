"""Stage 0: a brief full-parameter fine-tune on a stratified subset, saving the checkpoint pair.

Layout written (the original design's)::

    <out>/pretrained/            # the base model as safetensors, written only when the base is not already a
                                 #   local safetensors folder (or with copy_base=True); otherwise
                                 #   training_metrics.json records that folder's path and fingerprint
    <out>/finetuned/             # all parameters after training, safetensors + tokenizer
    <out>/training_metrics.json  # losses, per-task counts before/after sampling, settings, timings

The training loop is deliberately plain torch (AdamW, warmup + cosine/linear decay, gradient accumulation,
optional gradient checkpointing, bf16 autocast where the hardware has bf16 units) so one screen shows everything it
does; LoRA training (``train.py``) and the comparison's rows (``evidence/runs.py``) run the same loop. The options
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

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._io import atomic_folder, atomic_write_json, atomic_write_text
from .data import DataError, collate, load_records, stratified_subset, tokenize_record
from .devices import bf16_units, resolve_precision
from .distributed import check_launchable, is_main, launch, should_launch, wait_for_everyone, world
from .errors import LoraRanksError
from .loading import load_image_processor, load_model
from .progress import Heartbeat
from .settings import FinetuneSettings, TrainingSettings

__all__ = ["FinetuneSettings", "FinetuneResult", "TrainingDivergedError", "run_preliminary_finetune", "train_loop",
           "prepare_examples", "enable_gradient_checkpointing", "split_half_records", "run_split_half_finetunes"]


class TrainingDivergedError(LoraRanksError):
    """Training stopped because its loss or gradients became NaN or infinite (no model is written)."""


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
                     max_samples: int | None = None, task_key: str = "task", image_processor=None):
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

    from .checkpoints import resolve_model_path

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


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass (transformers 5 renamed the method; both spellings work)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def planned_steps(n_examples: int, settings: TrainingSettings) -> int:
    """Optimizer steps ``train_loop`` runs on ``n_examples``: min(max_steps, epochs over them), at least 1."""
    micro_per_epoch = math.ceil(n_examples / settings.batch_size)
    return min(settings.max_steps, max(1, math.floor(settings.epochs * micro_per_epoch / settings.grad_accumulation)))


def check_step_fits(n_examples: int, settings: TrainingSettings, what: str = "training") -> None:
    """One optimizer step (batch_size x grad_accumulation sequences) must fit in the passes over the examples that
    ``epochs`` allows: a larger step would cycle the data many times before its first update.

    Raises:
        LoraRanksError: naming the numbers and the options to lower.
    """
    per_step = settings.batch_size * settings.grad_accumulation
    if per_step > max(1, n_examples) * settings.epochs:
        raise LoraRanksError(f"{what}: one step of --batch-size {settings.batch_size} x --grad-accumulation "
                             f"{settings.grad_accumulation} = {per_step:,} sequences is more than {settings.epochs:g} "
                             f"epoch(s) over the {n_examples:,} records trained on: lower --grad-accumulation or "
                             "--batch-size")


def train_loop(model, examples: list[dict], pad_token_id: int, settings: TrainingSettings, device: torch.device, *,
               on_step: Callable[[int, int, float, float], None] | None = None, progress: bool = True,
               desc: str = "training", after_update: Callable[[int], None] | None = None,
               tokens_per_step: list[int] | None = None) -> tuple[list[float], bool]:
    """AdamW over the model's trainable parameters: warmup + decay, gradient accumulation, clipping at 1.0.
    Steps = min(max_steps, epochs over ``examples``). Returns (loss per step, bf16 used).

    Precision: ``settings.precision`` on ``device`` (``devices.resolve_precision``): under bf16 each forward pass
    runs in ``torch.autocast(device.type, dtype=torch.bfloat16)``: matrix products (linear layers, attention) in
    bf16, what autocast keeps in float32 (the loss functions among others) and the models' own upcasts (RMSNorm,
    the logits of transformers' loss) in float32; the parameters keep their dtype, so trained float32 weights,
    their gradients and AdamW's state stay float32 (master weights). The progress bar's description ends in
    "(bf16)".

    Args:
        on_step: called as ``on_step(step, total, loss, lr)`` after each optimizer step (gradients cleared); when
            it returns True, training stops after that step (early stopping). The learning-rate schedule is always
            that of the planned steps, so stopping early does not change the rate of the steps run.
        after_update: called as ``after_update(step)`` right after ``optimizer.step()``, while the gradients are
            still there (AdaLoRA's rank allocation reads them).
        tokens_per_step: when given, the non-padding tokens each step processed are appended to it (compute
            accounting).

    Raises:
        PrecisionError: ``precision`` "bf16" on a device without bf16 units (before any step).
        TrainingDivergedError: a step's loss or gradient norm is NaN or infinite; raised before that step updates
            any weight, so callers that save only after training write nothing.
    """
    check_step_fits(len(examples), settings, desc)
    use_bf16 = resolve_precision(settings.precision, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, settings)
    rank, processes = world()
    forward = model
    if processes > 1:  # data parallel (lora_ranks.distributed): gradients all-reduced in backward
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    run = _wandb_run(settings, desc) if rank == 0 else None
    total = planned_steps(len(examples), settings)
    warmup = int(settings.warmup_ratio * total)
    rng = random.Random(settings.seed)
    order: list[int] = []
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"{desc} (bf16)" if use_bf16 else desc, unit="step")
    heartbeat = Heartbeat(f"{desc} (bf16)" if use_bf16 else desc, total, "step",
                          emit=None if rank == 0 else (lambda _: None))
    for step in range(total):
        lr = settings.learning_rate * _lr_factor(step, total, warmup, settings.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_tokens = 0.0, 0
        for _ in range(settings.grad_accumulation):
            if len(order) < settings.batch_size:  # reshuffle at each epoch boundary
                fresh = list(range(len(examples)))
                rng.shuffle(fresh)
                order.extend(fresh)
            batch_idx, order = order[: settings.batch_size], order[settings.batch_size:]
            share = 1.0
            if processes > 1:  # this process's records of the global micro-batch, its loss weighted by its tokens
                trained = [_trained_tokens(examples[i]) for i in batch_idx]
                share = processes * sum(trained[rank::processes]) / max(1, sum(trained))
                batch_idx = batch_idx[rank::processes]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in batch_idx], pad_token_id).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                output = forward(**batch)
            loss = output.loss / settings.grad_accumulation
            if processes > 1:  # DDP averages over processes: share x mean = (processes / global count) x sum
                # a shard without trained tokens adds zero (its mean would be 0/0), still through every weight
                loss = loss * share if share > 0 else output.logits.sum() * 0.0
            loss.backward()
            step_loss += float(loss.detach())
            step_tokens += int(batch["attention_mask"].sum())
        if processes > 1:  # the global micro-batches' mean loss, and every process's tokens
            step_loss, step_tokens = _all_reduce_sum(step_loss, step_tokens, device)
            step_loss /= processes
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):  # stop before the weights turn NaN
            if bar is not None:
                bar.close()
            if run is not None:
                run.finish()
            what = f"loss {step_loss}" if not math.isfinite(step_loss) else f"gradient norm {grad_norm}"
            if step == 0:  # no weight has moved yet: the learning rate is not the cause
                raise TrainingDivergedError(f"{desc}: {what} at the first step, before any update; nothing was "
                                            "written: the model's weights hold NaN or Inf, or a batch has no "
                                            "response token to learn from (check the records and --max-length)")
            raise TrainingDivergedError(f"{desc} diverged: {what} at step {step + 1} of {total} (learning rate "
                                        f"{lr:.3g}); nothing was written: lower the learning rate (now "
                                        f"{settings.learning_rate:g}) or check the data")
        optimizer.step()
        if after_update is not None:
            after_update(step + 1)
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if tokens_per_step is not None:
            tokens_per_step.append(step_tokens)
        stop = bool(on_step(step + 1, total, step_loss, lr)) if on_step is not None else False
        if run is not None:
            run.log({"loss": step_loss, "lr": lr}, step=step + 1)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
        heartbeat.update(step + 1, f"loss {step_loss:.4f} lr {lr:.2e}" + ("; stopping early" if stop else ""),
                         force=stop)
        if stop:
            break
    if bar is not None:
        bar.close()
    if run is not None:
        run.finish()
    return losses, use_bf16


def _trained_tokens(example: dict) -> int:
    """Positions whose next-token label is trained (what a causal LM's loss averages over)."""
    return int((torch.as_tensor(example["labels"])[1:] != -100).sum())


def _all_reduce_sum(loss: float, tokens: int, device: torch.device) -> tuple[float, int]:
    """(loss, tokens) summed over the processes of the group (float64: the same sum on every process)."""
    import torch.distributed as dist

    both = torch.tensor([loss, float(tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(both)
    return float(both[0]), int(both[1])


def _optimizer(params: list, settings: TrainingSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # not installed, or no backend for this platform
        raise ValueError(f"optimizer='adamw8bit' needs bitsandbytes, which cannot be loaded here ({exc}); "
                         "use optimizer='adamw'") from exc
    return bnb.optim.AdamW8bit(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


def _wandb_run(settings: TrainingSettings, name: str):
    """A wandb run when ``wandb_project`` is set (config = the training settings only), else None."""
    if settings.wandb_project is None:
        return None
    try:
        import wandb
    except ImportError as exc:
        raise ValueError("wandb_project is set but wandb is not installed: pip install wandb "
                         "(or leave wandb_project empty)") from exc
    return wandb.init(project=settings.wandb_project, name=name, config=settings.to_dict(), reinit=True)


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
    local_safetensors = Path(model_path).is_dir() and any(Path(model_path).glob("*.safetensors"))
    if settings.copy_base or not local_safetensors:
        pretrained_dir = out / "pretrained"
        if writes:
            _save_dir(model, tokenizer, pretrained_dir, image_processor)
        wait_for_everyone()  # every process reads the fingerprint below
    else:
        pretrained_dir = Path(model_path).resolve()
    from .checkpoints import Checkpoint

    pretrained_fingerprint = Checkpoint(pretrained_dir).header_fingerprint()

    # Step 3: train.
    model.to(dev).train()
    if settings.freeze_vision:
        for name, param in model.named_parameters():
            if ".visual." in f".{name}":
                param.requires_grad_(False)
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(model)
        model.config.use_cache = False
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
        "model": str(model_path),
        "pretrained_dir": str(pretrained_dir),
        "pretrained_copied": pretrained_dir == out / "pretrained",
        "pretrained_fingerprint": pretrained_fingerprint,
        "finetuned_dir": str(finetuned_dir),
        "data": str(data_path),
        "n_records": n_records,
        "n_train": len(examples),
        "task_counts_before": report.counts_before,
        "task_counts_after": report.counts_after,
        "settings": settings.to_dict(),
        "device": str(dev),
        "processes": world()[1],  # data-parallel processes that trained (lora_ranks.distributed)
        "bf16": use_bf16,  # matrix products under bf16 autocast; the weights trained and saved are float32
        "bf16_units": bf16_units(dev) if use_bf16 else None,
        "steps": total,
        "tokens": sum(step_tokens),  # non-padding tokens trained on (compute: ~6 x parameters FLOPs each)
        "losses": losses,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": seconds,
    }
    metrics_path = atomic_write_json(out / "training_metrics.json", metrics) if writes else out / "training_metrics.json"
    return FinetuneResult(str(pretrained_dir), str(finetuned_dir), str(metrics_path), losses, total, seconds,
                          use_bf16)


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
