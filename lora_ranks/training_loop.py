"""The training loop every trained model of the tool runs: the brief fine-tune (``finetune.py``), LoRA training
(``train.py``), the comparison's rows (``evidence/runs.py``), the check's measured steps and the base builder.

Deliberately plain torch, on one screen: AdamW (or 8-bit AdamW), warmup + cosine/linear decay, gradient
accumulation, optional gradient checkpointing, bf16 autocast where the hardware has bf16 units (see
``finetune.py``'s docstring for precision), a progress line every few seconds, NaN/inf stops at once
(``TrainingDivergedError``), and several processes as one (``distributed``: each micro-batch dealt across them).
"""

from __future__ import annotations

# bitsandbytes, wandb and tqdm's notebook-aware bar are imported only when asked for: wandb and bitsandbytes are
# optional, and each costs seconds to import.
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .data import collate
from .devices import resolve_precision
from .distributed import world
from .errors import LoraRanksError
from .progress import Heartbeat
from .settings import TrainingSettings

__all__ = ["TrainingDivergedError", "LoopState", "train_loop", "planned_steps", "check_step_fits",
           "enable_gradient_checkpointing"]


class TrainingDivergedError(LoraRanksError):
    """Training stopped because its loss or gradients became NaN or infinite (no model is written)."""


@dataclass
class LoopState:
    """Where ``train_loop`` stands after ``step`` optimizer steps: what it needs, beside the trainable weights, to go
    on exactly as if it had not stopped (``resume``). ``order``: the record indices still to come in this epoch;
    ``rng_state``: the data-order generator's (``random.Random.getstate()``); ``optimizer``: the optimizer's
    ``state_dict()`` (tensors on the training device)."""

    step: int
    losses: list[float]
    order: list[int]
    rng_state: tuple
    optimizer: dict


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
               tokens_per_step: list[int] | None = None, resume: LoopState | None = None,
               on_checkpoint: Callable[[LoopState], None] | None = None,
               checkpoint_every: int = 0) -> tuple[list[float], bool]:
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
        on_checkpoint, checkpoint_every: ``on_checkpoint(state)`` after every ``checkpoint_every``-th step (after
            ``on_step``; not after the last step, nor when stopping): the caller saves ``state`` with the trainable
            weights to continue from later.
        resume: a state ``on_checkpoint`` received, the model's trainable weights being those of that moment:
            training goes on from step ``resume.step + 1`` with the same data order, optimizer state and schedule,
            so that its steps are those of an uninterrupted run. One process only.

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
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    run = _wandb_run(settings, desc) if rank == 0 else None
    total = planned_steps(len(examples), settings)
    warmup = int(settings.warmup_ratio * total)
    rng = random.Random(settings.seed)
    order: list[int] = []
    losses: list[float] = []
    first = 0
    if resume is not None:
        if processes > 1:
            raise ValueError("train_loop: resuming is supported in one process only")
        first, losses, order = resume.step, list(resume.losses), list(resume.order)
        rng.setstate(resume.rng_state)
        optimizer.load_state_dict(resume.optimizer)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=first, desc=f"{desc} (bf16)" if use_bf16 else desc, unit="step")
    heartbeat = Heartbeat(f"{desc} (bf16)" if use_bf16 else desc, total, "step",
                          emit=None if rank == 0 else (lambda _: None), initial=first)
    for step in range(first, total):
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
        if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < total:
            on_checkpoint(LoopState(step + 1, list(losses), list(order), rng.getstate(), optimizer.state_dict()))
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
