"""One row run of the comparison: train a LoRA (lora-ranks' config, or a peer method), evaluate it in the same
process (held-out loss during and after training, exact-match accuracy), and account for its compute.

The run's folder (``ComparisonLayout.run_dir``)::
    <run>/adapter/               # the adapter as served (a base-changing peer's converted rank-2r LoRA)
    <run>/model/                 # the full fine-tune's model instead (its best checkpoint)
    <run>/training_metrics.json  # the training loop's metrics
    <run>/row.json               # the RowResult: losses, accuracy, curve, FLOPs, parameters
    <run>/partial.safetensors    # while it trains with early stopping: its last evaluated moment (partial_runs)
"""

from __future__ import annotations

# PEFT is imported when a served adapter is read back: the committed-results checks import this module without it.
import json
import random
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch

from .._io import atomic_folder, atomic_write_json
from ..config import load_rank_config
from ..data import load_records
from ..finetune import TrainingDivergedError, enable_gradient_checkpointing, planned_steps, prepare_examples, train_loop
from ..loading import load_model
from ..progress import LOGGER
from ..settings import LoRATrainingSettings
from ..train import TrainLayout, prepare_lora_run, save_lora_run
from ..training_loop import LoopState
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
from .compute import forward_flops, frozen_training_flops, full_training_flops, matmul_parameters
from .fidelity import held_out_loss
from .learning_rates import choose_learning_rates, next_learning_rates
from .monitor import RowMonitor
from .partial_runs import PARTIAL_FILE, load_partial
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
    rank_config = None if spec.is_full else load_rank_config(spec.config_path)
    meta = rank_config.analysis_metadata if rank_config else _NO_ALLOCATION
    start = time.perf_counter()
    row = _RowModel.build(base_model, spec, rank_config, train_path, settings, evaluation, out)
    monitor, resume = _monitor(row, spec, evaluation, settings, out, key, start)
    stopped = "planned"
    try:
        losses, use_bf16 = train_loop(row.model, row.examples, row.pad, settings, row.device, on_step=monitor.on_step,
                                      progress=progress, desc=f"{spec.name} seed {spec.seed}",
                                      after_update=row.built.after_update if row.built else None,
                                      tokens_per_step=monitor.tokens_per_step, resume=resume,
                                      on_checkpoint=monitor.checkpoint if monitor.saves else None,
                                      checkpoint_every=evaluation.eval_interval)
    except TrainingDivergedError:
        if monitor.stopping is not None and monitor.stopping.best_state is not None:
            losses, use_bf16, stopped = [], False, "diverged"
        elif evaluation.validation_data_path:  # a learning-rate trial: the rate is too high, say so and go on
            return _finish(monitor.diverged(settings.learning_rate, str(out), meta), done, key, spec, committed,
                           design_key)
        else:
            raise
    seconds = time.perf_counter() - monitor.start - monitor.evaluating
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
                                          seconds, monitor.start, held_out, in_memory)
    if evaluation.validation_data_path and stopping is None:
        validation = held_out_loss(model, monitor.validation_records, row.pad, what="validation loss")
    accuracy, accuracy_n, by_task = _accuracy(model, row.tokenizer, evaluation)
    preparation_tokens, preparation = _preparation_flops(row, model)
    tokens = sum(monitor.tokens_per_step)
    result = RowResult(spec.label, spec.init, spec.seed, settings.learning_rate, str(out), loss, row.trainable, row.n,
                       tokens, row.training_flops(tokens),
                       preparation_tokens, preparation, seconds, accuracy, accuracy_n, monitor.curve, served_factor,
                       in_memory if served_factor == 2 else None, validation, len(monitor.tokens_per_step), best_step,
                       best_flops, best_seconds, stopped, False, stopping.curve if stopping else [],
                       forward_flops(row.n, monitor.validation_tokens) * len(stopping.curve) if stopping else 0.0,
                       by_task, meta.allocation, meta.budget_rank)
    return _finish(result, done, key, spec, committed, design_key)


def _monitor(row: _RowModel, spec: RowSpec, evaluation: RowEvaluation, settings: LoRATrainingSettings, out: Path,
             key: str, start: float) -> tuple[RowMonitor, LoopState | None]:
    """The row's monitor, and the training loop's state to resume from. With early stopping (not AdaLoRA's, whose
    rank allocator keeps state of its own) the run is saved at each evaluation (``partial_runs``), and a run of the
    same inputs saved in ``out`` is taken up: its wall clock goes on from the seconds it had run."""
    resumable = evaluation.early_stopping and (row.built is None or row.built.after_update is None)
    partial = load_partial(out, key, row.device) if resumable else None
    if partial is not None:
        start = time.perf_counter() - partial.measured["elapsed"]
    monitor = RowMonitor(row, spec, evaluation, planned_steps(len(row.examples), settings), start,
                         saves_to=(out, key) if resumable else None)
    if partial is None:
        return monitor, None
    monitor.restore(partial)
    LOGGER.info(f"{spec.name} seed {spec.seed}: resuming from step {partial.loop.step} ({out / PARTIAL_FILE})")
    return monitor, partial.loop


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


_NO_ALLOCATION = SimpleNamespace(allocation=None, budget_rank=None)
"""The full fine-tune's stand-in for a rank config's metadata: no allocation, no budget."""

_INITIALIZING = threading.Lock()
"""Held while a row seeds torch's global generator and draws its initialization (``_RowModel.build``)."""


class _RowModel:
    """A row's model before training: a PEFT peer (``built``), lora-ranks' LoRA (``run``) or the full fine-tune
    (``full``: the base with every parameter trained), with its tokenizer, the tokenized training records, the
    device, and its parameter counts (``n``: matmul parameters; ``trainable``)."""

    def __init__(self, model, tokenizer, examples: list[dict], device, built=None, run=None, full: bool = False):
        self.model, self.tokenizer, self.examples, self.device, self.built, self.run, self.full = (
            model, tokenizer, examples, device, built, run, full)
        self.pad = tokenizer.pad_token_id
        self.n = matmul_parameters(model)
        self.trainable = (sum(p.numel() for p in model.parameters() if p.requires_grad) if full
                          else model.get_nb_trainable_parameters()[0])

    def training_flops(self, tokens: int) -> float:
        """FLOPs of training on ``tokens`` tokens: 6N per token for the full fine-tune, 4N + 6P for a LoRA."""
        return full_training_flops(self.n, tokens) if self.full else frozen_training_flops(self.n, self.trainable,
                                                                                             tokens)

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
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if spec.is_full:  # every parameter, float32 master weights (bf16 autocast only, when on), as finetune's
            torch.manual_seed(settings.seed)
            model, tokenizer = load_model(base_model, dtype=torch.float32)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            model.requires_grad_(True)
            if settings.gradient_checkpointing:
                enable_gradient_checkpointing(model)
            examples, _, _ = prepare_examples(train_path, tokenizer, max_length=settings.max_length, seed=settings.seed)
            return cls(model.to(device).train(), tokenizer, examples, device, full=True)
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
        served-rank factor): a peer whose adapter is converted to be served is evaluated as served, on the base; the
        full fine-tune's model is saved whole (``<run>/model``)."""
        if self.full:
            with atomic_folder(layout.root / "model", overwrite=True, content="model") as tmp:
                self.model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
            atomic_write_json(layout.metrics_path, {"model": str(base_model), "full_finetune": True, "losses": losses,
                                                    "settings": settings.to_dict(), "bf16": use_bf16,
                                                    "n_train": len(self.examples), "seconds": seconds})
            return self.model, in_memory, 1
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


def _target_parameters(model: torch.nn.Module) -> int:
    """Weights of the modules carrying LoRA adapters (their base layers)."""
    return sum(m.base_layer.weight.numel() for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
