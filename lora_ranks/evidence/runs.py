"""One row run of the comparison: train a LoRA (lora-ranks' config, or a peer method), evaluate it in the same
process (held-out loss during and after training, exact-match accuracy), and account for its compute.

The run's folder (``ComparisonLayout.run_dir``)::
    <run>/adapter/               # the adapter as served (a base-changing peer's converted rank-2r LoRA)
    <run>/training_metrics.json  # the training loop's metrics
    <run>/row.json               # the RowResult: losses, accuracy, curve, FLOPs, parameters
"""

from __future__ import annotations

# PEFT is imported when a served adapter is read back: the committed-results checks import this module without it.
import json
import math
import random
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
    layout = TrainLayout(out)
    design_key = None
    if committed is not None:
        design_key = committed_key(base_model, spec, train_path, settings, evaluation, committed.design)
        reused = read_committed(committed.results_dir, spec, settings.learning_rate, design_key)
        if reused is not None:
            return reused
    key = row_key(base_model, spec, train_path, settings, evaluation)
    done = out / "row.json"
    if done.is_file():  # a finished run of the same inputs: resume without training again
        saved = json.loads(done.read_text())
        if saved.pop("key", None) == key:
            result = RowResult(**saved)
            _commit(result, spec, committed, design_key)
            return result
    rank_config = load_rank_config(spec.config_path)
    meta = rank_config.analysis_metadata
    start = time.perf_counter()
    built = None
    if spec.is_peer:
        torch.manual_seed(settings.seed)
        records = load_records(train_path)
        random.Random(settings.seed).shuffle(records)
        built = build_peer_model(base_model, rank_config, spec.init,
                                 records[:evaluation.peer_records], max_length=settings.max_length,
                                 lora_dropout=settings.lora_dropout, total_steps=planned_steps(len(records), settings),
                                 work_dir=out, batch_size=settings.batch_size)
        examples, _, _ = prepare_examples(train_path, built.tokenizer, max_length=settings.max_length,
                                          seed=settings.seed)
        model, tokenizer = built.model, built.tokenizer
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        run = None
    else:
        # The base stays float32 (bf16 autocast only, when on), as the peers': every row and the full fine-tune
        # are evaluated in float32 (a base stored in bf16 evaluates 0.05 nats/token higher on SmolLM2-135M).
        run = prepare_lora_run(base_model, spec.config_path, train_path, settings, init_from=spec.warm_adapter,
                               base_dtype=None if settings.quantization else torch.float32)
        model, tokenizer, examples, device = run.model, run.tokenizer, run.examples, run.device
    pad = tokenizer.pad_token_id
    n = matmul_parameters(model)
    trainable = model.get_nb_trainable_parameters()[0]
    total = planned_steps(len(examples), settings)
    at = curve_steps(total, evaluation.curve_points)
    curve_records = (eval_examples(evaluation.eval_data_path, tokenizer, evaluation.curve_samples,
                                   evaluation.max_length) if at else [])
    validation_records = (eval_examples(evaluation.validation_data_path, tokenizer,
                                        evaluation.validation_samples or evaluation.eval_samples, evaluation.max_length)
                          if evaluation.validation_data_path else [])
    validation_tokens = sum(len(e["input_ids"]) for e in validation_records)
    tokens_per_step: list[int] = []
    evaluating = [0.0]  # seconds spent evaluating, left out of the run's wall time
    curve: list[dict] = []
    stopping = _EarlyStopping(evaluation.patience) if evaluation.early_stopping else None

    def on_step(step: int, _total: int, _loss: float, _lr: float) -> bool:
        stop = False
        if step in at or (stopping is not None and (step % evaluation.eval_interval == 0 or step == total)):
            began = time.perf_counter()
            tokens = sum(tokens_per_step)
            point = {"step": step, "tokens": tokens, "train_flops": frozen_training_flops(n, trainable, tokens),
                     "seconds": began - start - evaluating[0]}
            if step in at:
                curve.append({**point, "loss": held_out_loss(model, curve_records, pad, what="curve loss")})
            if stopping is not None and (step % evaluation.eval_interval == 0 or step == total):
                stop = stopping.update(model, point, held_out_loss(model, validation_records, pad,
                                                                   what="validation loss"))
                LOGGER.info(f"{spec.name} seed {spec.seed} step {step}: validation loss "
                            f"{stopping.curve[-1]['validation_loss']:.4f} (best {stopping.best_loss:.4f} at step "
                            f"{stopping.best_point['step']}){'; stopping' if stop else ''}")
            model.train()
            evaluating[0] += time.perf_counter() - began
        return stop

    stopped = "planned"
    try:
        losses, use_bf16 = train_loop(model, examples, pad, settings, device, on_step=on_step, progress=progress,
                                      desc=f"{spec.name} seed {spec.seed}",
                                      after_update=built.after_update if built else None,
                                      tokens_per_step=tokens_per_step)
    except TrainingDivergedError:
        if stopping is not None and stopping.best_state is not None:
            losses, use_bf16, stopped = [], False, "diverged"
        elif evaluation.validation_data_path:  # a learning-rate trial: the rate is too high, say so and go on
            result = RowResult(spec.label, spec.init, spec.seed, settings.learning_rate, str(out), None, trainable, n,
                               sum(tokens_per_step), frozen_training_flops(n, trainable, sum(tokens_per_step)),
                               steps=len(tokens_per_step), stopped="diverged", diverged=True,
                               validation_curve=stopping.curve if stopping else [],
                               allocation=meta.allocation, budget_rank=meta.budget_rank)
            atomic_write_json(done, {**asdict(result), "key": key})
            _commit(result, spec, committed, design_key)
            return result
        else:
            raise
    seconds = time.perf_counter() - start - evaluating[0]
    steps_run = len(tokens_per_step)
    best_step = best_flops = best_seconds = validation = None
    if stopping is not None:
        if stopped != "diverged":
            stopped = "patience" if stopping.stop_now else "cap"
        stopping.restore(model)
        best_step, validation = stopping.best_point["step"], stopping.best_loss
        best_flops, best_seconds = stopping.best_point["train_flops"], stopping.best_point["seconds"]
    held_out = eval_examples(evaluation.eval_data_path, tokenizer, evaluation.eval_samples, evaluation.max_length)
    in_memory = held_out_loss(model, held_out, pad)
    loss, served_factor = in_memory, 1
    if built is not None:
        adapter_dir = save_served_adapter(built, layout.adapter_dir)
        if built.initial_adapter_dir is not None:  # evaluate the converted adapter on the original base
            from peft import PeftModel

            base, _ = load_model(base_model, dtype=torch.float32)
            served = PeftModel.from_pretrained(base, str(adapter_dir)).to(device)
            loss, served_factor = held_out_loss(served, held_out, pad), 2
            model = served
        atomic_write_json(layout.metrics_path, {"model": str(base_model), "peer": spec.init, "losses": losses,
                                                "settings": settings.to_dict(), "bf16": use_bf16,
                                                "n_train": len(examples), "seconds": seconds})
    else:
        save_lora_run(run, layout, base_model, spec.config_path, train_path, settings, losses, use_bf16,
                      spec.warm_adapter, start)
    if evaluation.validation_data_path and stopping is None:
        validation = held_out_loss(model, validation_records, pad, what="validation loss")
    accuracy = None
    accuracy_n = 0
    by_task: dict[str, list[int]] = {}
    if evaluation.accuracy_samples:
        records = checkable_records(evaluation.eval_data_path, evaluation.accuracy_samples,
                                    tasks=evaluation.accuracy_tasks)
        if records:
            scored = exact_match_by_task(model, tokenizer, records, evaluation.max_new_tokens,
                                         batch_size=evaluation.accuracy_batch_size)
            by_task = {task: [m.correct, m.n] for task, m in scored.items()}
            accuracy_n = sum(m.n for m in scored.values())
            accuracy = sum(m.correct for m in scored.values()) / accuracy_n
    preparation_tokens = built.preparation_tokens if built else 0
    preparation = 0.0
    if built is not None and built.peer.preparation == "forward":
        preparation = forward_flops(n, preparation_tokens)
    elif built is not None and built.peer.preparation == "backward":  # forward, input and target-weight gradients
        preparation = frozen_training_flops(n, 0, preparation_tokens) + 2.0 * _target_parameters(model) * preparation_tokens
    result = RowResult(spec.label, spec.init, spec.seed, settings.learning_rate, str(out), loss, trainable, n,
                       sum(tokens_per_step), frozen_training_flops(n, trainable, sum(tokens_per_step)),
                       preparation_tokens, preparation, seconds, accuracy, accuracy_n, curve, served_factor,
                       in_memory if served_factor == 2 else None, validation, steps_run, best_step, best_flops,
                       best_seconds, stopped, False, stopping.curve if stopping else [],
                       forward_flops(n, validation_tokens) * len(stopping.curve) if stopping else 0.0, by_task,
                       meta.allocation, meta.budget_rank)
    atomic_write_json(done, {**asdict(result), "key": key})
    _commit(result, spec, committed, design_key)
    return result


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
