"""What a comparison row measures while it trains (``RowMonitor``, the training loop's ``on_step``): the held-out
curve, early stopping on the validation split (``EarlyStopping``), the tokens of every step, and the run's state saved
at each evaluation to resume from (``partial_runs``)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..progress import LOGGER
from .comparison import eval_examples
from .fidelity import held_out_loss
from .partial_runs import PartialRun, save_partial
from .rows import RowEvaluation, RowResult, RowSpec, curve_steps

__all__ = ["RowMonitor", "EarlyStopping"]


class RowMonitor:
    """What a row measures while it trains (``on_step``, train_loop's callback): the held-out loss at the curve's
    steps, and with early stopping the validation loss every ``eval_interval`` steps (``stopping``); the seconds
    spent evaluating (``evaluating``), left out of the run's wall time; the tokens of every step. ``row`` is the
    row's model as ``runs`` builds it (its model, tokenizer, pad id, parameter counts and ``training_flops``)."""

    def __init__(self, row, spec: RowSpec, evaluation: RowEvaluation, total: int, start: float,
                 saves_to: tuple[Path, str] | None = None):
        self.row, self.spec, self.evaluation, self.total, self.start = row, spec, evaluation, total, start
        self.saves_to = saves_to  # (run folder, inputs' key) where ``checkpoint`` saves the run, or None
        self.at = curve_steps(total, evaluation.curve_points)
        self.curve_records = (eval_examples(evaluation.eval_data_path, row.tokenizer, evaluation.curve_samples,
                                            evaluation.max_length) if self.at else [])
        self.validation_records = (eval_examples(evaluation.validation_data_path, row.tokenizer,
                                                 evaluation.validation_samples or evaluation.eval_samples,
                                                 evaluation.max_length)
                                   if evaluation.validation_data_path else [])
        self.validation_tokens = sum(len(e["input_ids"]) for e in self.validation_records)
        self.tokens_per_step: list[int] = []
        self.evaluating = 0.0
        self.curve: list[dict] = []
        self.stopping = EarlyStopping(evaluation.patience) if evaluation.early_stopping else None

    def diverged(self, learning_rate: float, out: str, meta) -> RowResult:
        """The result of a learning-rate trial that diverged with no checkpoint to keep: the rate is too high."""
        spec, row, tokens = self.spec, self.row, sum(self.tokens_per_step)
        return RowResult(spec.label, spec.init, spec.seed, learning_rate, out, None, row.trainable, row.n, tokens,
                         row.training_flops(tokens), steps=len(self.tokens_per_step),
                         stopped="diverged", diverged=True, validation_curve=self.stopping.curve if self.stopping else [],
                         allocation=meta.allocation, budget_rank=meta.budget_rank)

    @property
    def saves(self) -> bool:
        return self.saves_to is not None

    def checkpoint(self, state) -> None:
        """Save the run as it stands after ``state.step`` in ``saves_to`` (train_loop's ``on_checkpoint``;
        ``partial_runs``)."""
        began = time.perf_counter()
        run_dir, key = self.saves_to
        stopping, model = self.stopping, self.row.model
        weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        measured = {"tokens_per_step": self.tokens_per_step, "curve": self.curve, "evaluating": self.evaluating,
                    "elapsed": time.perf_counter() - self.start,
                    "stopping": {"best_loss": stopping.best_loss, "best_point": stopping.best_point,
                                 "since": stopping.since, "curve": stopping.curve}}
        device = self.row.device
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        save_partial(run_dir, PartialRun(key, state, weights, stopping.best_state, torch.get_rng_state(), measured,
                                         cuda_rng))
        self.evaluating += time.perf_counter() - began  # saving is the harness's cost, not the row's: left out

    def restore(self, partial: PartialRun) -> None:
        """Take up a saved run (``checkpoint``): its trainable weights, random generator and measurements."""
        measured, stopping = partial.measured, self.stopping
        with torch.no_grad():
            for name, p in self.row.model.named_parameters():
                if p.requires_grad:
                    p.copy_(partial.weights[name])
        torch.set_rng_state(partial.torch_rng)
        if partial.cuda_rng is not None and self.row.device.type == "cuda":
            torch.cuda.set_rng_state(partial.cuda_rng, self.row.device)
        self.tokens_per_step[:] = measured["tokens_per_step"]
        self.curve, self.evaluating = measured["curve"], measured["evaluating"]
        saved = measured["stopping"]
        stopping.best_loss, stopping.best_point, stopping.since, stopping.curve = (
            saved["best_loss"], saved["best_point"], saved["since"], saved["curve"])
        stopping.best_state = partial.best_weights

    def on_step(self, step: int, _total: int, _loss: float, _lr: float) -> bool:
        evaluation, stopping, row, model = self.evaluation, self.stopping, self.row, self.row.model
        validating = stopping is not None and (step % evaluation.eval_interval == 0 or step == self.total)
        if step not in self.at and not validating:
            return False
        stop = False
        began = time.perf_counter()
        tokens = sum(self.tokens_per_step)
        point = {"step": step, "tokens": tokens, "train_flops": row.training_flops(tokens),
                 "seconds": began - self.start - self.evaluating}
        if step in self.at:
            self.curve.append({**point, "loss": held_out_loss(model, self.curve_records, row.pad, what="curve loss")})
        if validating:
            stop = stopping.update(model, point, held_out_loss(model, self.validation_records, row.pad,
                                                               what="validation loss"))
            LOGGER.info(f"{self.spec.name} seed {self.spec.seed} step {step}: validation loss "
                        f"{stopping.curve[-1]['validation_loss']:.4f} (best {stopping.best_loss:.4f} at step "
                        f"{stopping.best_point['step']}){'; stopping' if stop else ''}")
        model.train()
        self.evaluating += time.perf_counter() - began
        return stop


class EarlyStopping:
    """The best validation loss so far, the trainable weights at it (a copy, on the model's device), and how many
    evaluations since brought no improvement."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_loss = math.inf
        self.best_point: dict = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.since = 0
        self.curve: list[dict] = []

    @property
    def stop_now(self) -> bool:
        return self.since >= self.patience

    def update(self, model: torch.nn.Module, point: dict, loss: float) -> bool:
        """Record an evaluation; True when training should stop."""
        self.curve.append({**point, "validation_loss": loss})
        if loss < self.best_loss:
            self.best_loss, self.best_point, self.since = loss, point, 0
            self.best_state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        else:
            self.since += 1
        return self.stop_now

    def restore(self, model: torch.nn.Module) -> None:
        if self.best_state is None:
            return
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.best_state:
                    p.copy_(self.best_state[name])
