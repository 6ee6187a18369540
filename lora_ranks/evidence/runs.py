"""One row run of the comparison: train a LoRA (lora-ranks' config, or a peer method), evaluate it in the same
process (held-out loss during and after training, exact-match accuracy), and account for its compute.

The run's folder (``ComparisonLayout.run_dir``)::
    <run>/adapter/               # the adapter as served (a base-changing peer's converted rank-2r LoRA)
    <run>/training_metrics.json  # the training loop's metrics
    <run>/row.json               # the RowResult: losses, accuracy, curve, FLOPs, parameters
    <run>/partial.safetensors    # while it trains with early stopping: its last evaluated moment (partial_runs)
"""

from __future__ import annotations

# PEFT is imported when a served adapter is read back: the committed-results checks import this module without it.
import json
import math
import random
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .._io import atomic_write_json
from ..config import load_rank_config
from ..data import load_records
from ..finetune import TrainingDivergedError, planned_steps, prepare_examples, train_loop
from ..loading import load_model
from ..progress import LOGGER
from ..settings import LoRATrainingSettings
from ..train import TrainLayout, prepare_lora_run, save_lora_run
from .accuracy import checkable_records, exact_match_by_task
from .committed import (
    Committed,
    _commit,
    check_results_dir,
    committed_key,
    committed_name,
    read_committed,
)
from .comparison import eval_examples
from .compute import forward_flops, frozen_training_flops, matmul_parameters
from .fidelity import held_out_loss
from .learning_rates import choose_learning_rates, next_learning_rates
from .partial_runs import PARTIAL_FILE, PartialRun, load_partial, save_partial
from .peers import build_peer_model, save_served_adapter
from .rows import (
    RowEvaluation,
    RowResult,
    RowSpec,
    comparison_rows,
    curve_steps,
    row_key,
    select_configs,
)

__all__ = ["RowSpec", "RowEvaluation", "RowResult", "Committed", "train_row", "curve_steps",
           "choose_learning_rates", "next_learning_rates", "comparison_rows", "row_key", "committed_key",
           "committed_name", "read_committed", "select_configs", "check_results_dir"]


def train_row(base_model: str, spec: RowSpec, train_path: str, out_dir: str | Path, settings: LoRATrainingSettings,
              evaluation: RowEvaluation, *, progress: bool = False, committed: Committed | None = None) -> RowResult:
    """Train the row of ``spec`` on every record of ``train_path`` with ``settings`` (its seed is ``spec.seed``) and
    evaluate it in this process; writes the run folder (module docstring) and returns its RowResult.

    lora-ranks' rows train as ``train_dynamic_lora`` does (same seed, init, data order), except that an unquantized
    base stays float32 under bf16 (autocast only, as the peers'): every row is evaluated in float32. A peer is built by
    ``evidence.peers.build_peer_model`` at the config's uniform ranks, from ``evaluation.peer_records`` training
    records when it needs data.

    With early stopping (``evaluation.early_stopping``): the validation loss is measured every
    ``evaluation.eval_interval`` steps and at the last one; training stops once ``evaluation.patience`` evaluations in
    a row brought no lower loss, and the trainable weights of the best evaluation are restored before the held-out
    loss, the accuracy and the saved adapter are taken. The learning-rate schedule is that of the planned steps (the
    cap), whether or not training stops early. A run that diverges keeps its best checkpoint when it has one; with
    none (or without early stopping) it is returned as ``diverged`` when a validation split is given (a learning-rate
    trial), and raises ``TrainingDivergedError`` otherwise.

    With ``committed``, a result committed in ``committed.results_dir`` under the same ``committed_key`` is returned
    without training (a fresh clone resumes from committed rows), and a finished row is committed there.
    """

    settings = settings.replace(seed=spec.seed)
    out = Path(out_dir)
    design_key = committed_key(base_model, spec, train_path, settings, evaluation, committed.design) if committed else None
    reused = read_committed(committed.results_dir, spec, settings.learning_rate, design_key) if committed else None
    if reused is not None:
        return reused
    key = row_key(base_model, spec, train_path, settings, evaluation)
    done = out / "row.json"
    resumed = _resumed(done, key)
    if resumed is not None:  # a finished run of the same inputs: resume without training again
        _commit(resumed, spec, committed, design_key)
        return resumed
    rank_config = load_rank_config(spec.config_path)
    meta = rank_config.analysis_metadata
    start = time.perf_counter()
    row = _RowModel.build(base_model, spec, rank_config, train_path, settings, evaluation, out)
    # A run with early stopping saves its state at each evaluation and goes on from the last one when stopped midway
    # (not AdaLoRA's, whose rank allocator keeps state of its own).
    resumable = evaluation.early_stopping and (row.built is None or row.built.after_update is None)
    partial = load_partial(out, key, row.device) if resumable else None
    if partial is not None:
        start = time.perf_counter() - partial.measured["elapsed"]  # the run's seconds as if never stopped
    monitor = _Monitor(row, spec, evaluation, planned_steps(len(row.examples), settings), start)
    if partial is not None:
        monitor.restore(partial)
        LOGGER.info(f"{spec.name} seed {spec.seed}: resuming from step {partial.loop.step} ({out / PARTIAL_FILE})")
    stopped = "planned"
    try:
        losses, use_bf16 = train_loop(row.model, row.examples, row.pad, settings, row.device, on_step=monitor.on_step,
                                      progress=progress, desc=f"{spec.name} seed {spec.seed}",
                                      after_update=row.built.after_update if row.built else None,
                                      tokens_per_step=monitor.tokens_per_step,
                                      resume=partial.loop if partial else None,
                                      on_checkpoint=(lambda state: monitor.checkpoint(state, out, key)) if resumable
                                      else None, checkpoint_every=evaluation.eval_interval)
    except TrainingDivergedError:
        if monitor.stopping is not None and monitor.stopping.best_state is not None:
            losses, use_bf16, stopped = [], False, "diverged"
        elif evaluation.validation_data_path:  # a learning-rate trial: the rate is too high, say so and go on
            return _finish(monitor.diverged(settings.learning_rate, str(out), meta), done, key, spec, committed,
                           design_key)
        else:
            raise
    seconds = time.perf_counter() - start - monitor.evaluating
    stopping = monitor.stopping
    best_step = best_flops = best_seconds = validation = None
    if stopping is not None:  # the best evaluation's weights, and where it was
        stopped = stopped if stopped == "diverged" else "patience" if stopping.stop_now else "cap"
        stopping.restore(row.model)
        best_step, best_flops, best_seconds = (stopping.best_point[k] for k in ("step", "train_flops", "seconds"))
        validation = stopping.best_loss
    held_out = eval_examples(evaluation.eval_data_path, row.tokenizer, evaluation.eval_samples, evaluation.max_length)
    in_memory = held_out_loss(row.model, held_out, row.pad)
    model, loss, served_factor = row.save(TrainLayout(out), base_model, spec, train_path, settings, losses, use_bf16,
                                          seconds, start, held_out, in_memory)
    if evaluation.validation_data_path and stopping is None:
        validation = held_out_loss(model, monitor.validation_records, row.pad, what="validation loss")
    accuracy, accuracy_n, by_task = _accuracy(model, row.tokenizer, evaluation)
    preparation_tokens, preparation = _preparation_flops(row, model)
    tokens = sum(monitor.tokens_per_step)
    result = RowResult(spec.label, spec.init, spec.seed, settings.learning_rate, str(out), loss, row.trainable, row.n,
                       tokens, frozen_training_flops(row.n, row.trainable, tokens),
                       preparation_tokens, preparation, seconds, accuracy, accuracy_n, monitor.curve, served_factor,
                       in_memory if served_factor == 2 else None, validation, len(monitor.tokens_per_step), best_step,
                       best_flops, best_seconds, stopped, False, stopping.curve if stopping else [],
                       forward_flops(row.n, monitor.validation_tokens) * len(stopping.curve) if stopping else 0.0,
                       by_task, meta.allocation, meta.budget_rank)
    return _finish(result, done, key, spec, committed, design_key)


def _finish(result: RowResult, done: Path, key: str, spec: RowSpec, committed: Committed | None,
            design_key: str | None) -> RowResult:
    """Write the run's row.json (with its inputs' key, to resume from) and commit the result when asked; the
    partial run it may have saved on the way is no longer needed."""
    atomic_write_json(done, {**asdict(result), "key": key})
    (done.parent / PARTIAL_FILE).unlink(missing_ok=True)
    _commit(result, spec, committed, design_key)
    return result


def _resumed(done: Path, key: str) -> RowResult | None:
    """The result a finished run left in ``done`` (row.json), when its inputs' key is ``key``."""
    if not done.is_file():
        return None
    saved = json.loads(done.read_text())
    return RowResult(**saved) if saved.pop("key", None) == key else None


_INITIALIZING = threading.Lock()
"""Held while a row seeds torch's global generator and draws its initialization (``_RowModel.build``)."""


class _RowModel:
    """A row's model before training: a PEFT peer (``built``) or lora-ranks' LoRA (``run``), with its tokenizer, the
    tokenized training records, the device, and its parameter counts (``n``: matmul parameters; ``trainable``)."""

    def __init__(self, model, tokenizer, examples: list[dict], device, built=None, run=None):
        self.model, self.tokenizer, self.examples, self.device, self.built, self.run = (
            model, tokenizer, examples, device, built, run)
        self.pad = tokenizer.pad_token_id
        self.n = matmul_parameters(model)
        self.trainable = model.get_nb_trainable_parameters()[0]

    @classmethod
    def build(cls, base_model: str, spec: RowSpec, rank_config, train_path: str, settings: LoRATrainingSettings,
              evaluation: RowEvaluation, out: Path) -> _RowModel:
        """The row's model, initialized from its seed. Rows trained at once (``compare``'s thread pool) share
        torch's one random generator: each seeds it, then draws its initialization (PEFT's, EVA's randomized
        SVDs) while holding ``_INITIALIZING``, so that it draws what it would alone. (Dropout masks, drawn while
        rows train side by side, are not covered: rows with dropout repeat exactly only one at a time.)"""
        with _INITIALIZING:
            return cls._build(base_model, spec, rank_config, train_path, settings, evaluation, out)

    @classmethod
    def _build(cls, base_model: str, spec: RowSpec, rank_config, train_path: str, settings: LoRATrainingSettings,
               evaluation: RowEvaluation, out: Path) -> _RowModel:
        if spec.is_peer:
            torch.manual_seed(settings.seed)
            records = load_records(train_path)
            random.Random(settings.seed).shuffle(records)
            built = build_peer_model(base_model, rank_config, spec.init, records[:evaluation.peer_records],
                                     max_length=settings.max_length, lora_dropout=settings.lora_dropout,
                                     total_steps=planned_steps(len(records), settings), work_dir=out,
                                     batch_size=settings.batch_size)
            examples, _, _ = prepare_examples(train_path, built.tokenizer, max_length=settings.max_length,
                                              seed=settings.seed)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            built.model.to(device)
            return cls(built.model, built.tokenizer, examples, device, built=built)
        # The base stays float32 (bf16 autocast only, when on), as the peers': every row and the full fine-tune
        # are evaluated in float32 (a base stored in bf16 evaluates 0.05 nats/token higher on SmolLM2-135M).
        run = prepare_lora_run(base_model, spec.config_path, train_path, settings, init_from=spec.warm_adapter,
                               base_dtype=None if settings.quantization else torch.float32)
        return cls(run.model, run.tokenizer, run.examples, run.device, run=run)

    def save(self, layout: TrainLayout, base_model: str, spec: RowSpec, train_path: str,
             settings: LoRATrainingSettings, losses: list[float], use_bf16: bool, seconds: float, start: float,
             held_out: list[dict], in_memory: float):
        """Write the run's adapter and metrics; returns (the model evaluated from here on, its held-out loss, the
        served-rank factor): a peer whose adapter is converted to be served is evaluated as served, on the base."""
        if self.built is None:
            save_lora_run(self.run, layout, base_model, spec.config_path, train_path, settings, losses, use_bf16,
                          spec.warm_adapter, start)
            return self.model, in_memory, 1
        model, loss, served_factor = self.model, in_memory, 1
        adapter_dir = save_served_adapter(self.built, layout.adapter_dir)
        if self.built.initial_adapter_dir is not None:  # evaluate the converted adapter on the original base
            from peft import PeftModel

            base, _ = load_model(base_model, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, str(adapter_dir)).to(self.device)
            loss, served_factor = held_out_loss(model, held_out, self.pad), 2
        atomic_write_json(layout.metrics_path, {"model": str(base_model), "peer": spec.init, "losses": losses,
                                                "settings": settings.to_dict(), "bf16": use_bf16,
                                                "n_train": len(self.examples), "seconds": seconds})
        return model, loss, served_factor


class _Monitor:
    """What a row measures while it trains (``on_step``, train_loop's callback): the held-out loss at the curve's
    steps, and with early stopping the validation loss every ``eval_interval`` steps (``stopping``); the seconds
    spent evaluating (``evaluating``), left out of the run's wall time; the tokens of every step."""

    def __init__(self, row: _RowModel, spec: RowSpec, evaluation: RowEvaluation, total: int, start: float):
        self.row, self.spec, self.evaluation, self.total, self.start = row, spec, evaluation, total, start
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
        self.stopping = _EarlyStopping(evaluation.patience) if evaluation.early_stopping else None

    def diverged(self, learning_rate: float, out: str, meta) -> RowResult:
        """The result of a learning-rate trial that diverged with no checkpoint to keep: the rate is too high."""
        spec, row, tokens = self.spec, self.row, sum(self.tokens_per_step)
        return RowResult(spec.label, spec.init, spec.seed, learning_rate, out, None, row.trainable, row.n, tokens,
                         frozen_training_flops(row.n, row.trainable, tokens), steps=len(self.tokens_per_step),
                         stopped="diverged", diverged=True, validation_curve=self.stopping.curve if self.stopping else [],
                         allocation=meta.allocation, budget_rank=meta.budget_rank)

    def checkpoint(self, state, run_dir: Path, key: str) -> None:
        """Save the run as it stands after ``state.step`` (train_loop's ``on_checkpoint``; ``partial_runs``)."""
        stopping, model = self.stopping, self.row.model
        weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        measured = {"tokens_per_step": self.tokens_per_step, "curve": self.curve, "evaluating": self.evaluating,
                    "elapsed": time.perf_counter() - self.start,
                    "stopping": {"best_loss": stopping.best_loss, "best_point": stopping.best_point,
                                 "since": stopping.since, "curve": stopping.curve}}
        save_partial(run_dir, PartialRun(key, state, weights, stopping.best_state, torch.get_rng_state(), measured))

    def restore(self, partial: PartialRun) -> None:
        """Take up a saved run (``checkpoint``): its trainable weights, random generator and measurements."""
        measured, stopping = partial.measured, self.stopping
        with torch.no_grad():
            for name, p in self.row.model.named_parameters():
                if p.requires_grad:
                    p.copy_(partial.weights[name])
        torch.set_rng_state(partial.torch_rng)
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
        point = {"step": step, "tokens": tokens, "train_flops": frozen_training_flops(row.n, row.trainable, tokens),
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


def _accuracy(model, tokenizer, evaluation: RowEvaluation) -> tuple[float | None, int, dict[str, list[int]]]:
    """Exact-match accuracy of greedy answers on the held-out records that can be checked: (overall, records
    scored, {task: [correct, scored]})."""
    if not evaluation.accuracy_samples:
        return None, 0, {}
    records = checkable_records(evaluation.eval_data_path, evaluation.accuracy_samples, tasks=evaluation.accuracy_tasks)
    if not records:
        return None, 0, {}
    scored = exact_match_by_task(model, tokenizer, records, evaluation.max_new_tokens,
                                 batch_size=evaluation.accuracy_batch_size)
    n = sum(m.n for m in scored.values())
    return sum(m.correct for m in scored.values()) / n, n, {task: [m.correct, m.n] for task, m in scored.items()}


def _preparation_flops(row: _RowModel, model) -> tuple[int, float]:
    """(tokens, FLOPs) a peer spent preparing its init before training (0 for lora-ranks' rows, whose preparation
    is the analysis, counted separately)."""
    if row.built is None:
        return 0, 0.0
    tokens = row.built.preparation_tokens
    if row.built.peer.preparation == "forward":
        return tokens, forward_flops(row.n, tokens)
    if row.built.peer.preparation == "backward":  # forward, input and target-weight gradients
        return tokens, frozen_training_flops(row.n, 0, tokens) + 2.0 * _target_parameters(model) * tokens
    return tokens, 0.0


class _EarlyStopping:
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


def _target_parameters(model: torch.nn.Module) -> int:
    """Weights of the modules carrying LoRA adapters (their base layers)."""
    return sum(m.base_layer.weight.numel() for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
