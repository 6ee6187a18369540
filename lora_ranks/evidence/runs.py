"""One row run of the comparison: train a LoRA (lora-ranks' config, or a peer method), evaluate it in the same
process (held-out loss during and after training, exact-match accuracy), and account for its compute.

The run's folder (``ComparisonLayout.run_dir``)::

    <run>/adapter/               # the adapter as served (a base-changing peer's converted rank-2r LoRA)
    <run>/training_metrics.json  # the training loop's metrics
    <run>/row.json               # the RowResult: losses, accuracy, curve, FLOPs, parameters
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._io import atomic_write_json
from ..config import load_rank_config
from ..finetune import planned_steps, prepare_examples, train_loop
from ..progress import LOGGER
from ..settings import LoRATrainingSettings
from .accuracy import checkable_records, exact_match_by_task
from .compute import forward_flops, frozen_training_flops, matmul_parameters
from .fidelity import held_out_loss

__all__ = ["RowSpec", "RowEvaluation", "RowResult", "Committed", "train_row", "curve_steps", "choose_learning_rates",
           "next_learning_rates", "comparison_rows", "row_key", "committed_key", "committed_name", "read_committed",
           "select_configs"]


@dataclass(frozen=True)
class RowSpec:
    """What one run trains.

    Attributes:
        label: the config's label (``r2-budget-fisher``; a peer trains at its budget's ``r2-uniform``).
        init: "warm" or "cold" for lora-ranks' configs, the peer's name (``evidence.peers.PEERS``) for a peer.
        config_path: the rank config (a peer: the budget's uniform config, whose ranks and alpha it takes).
        warm_adapter: the adapter a warm run starts from.
    """

    label: str
    init: str
    seed: int
    config_path: str
    warm_adapter: str | None = None

    @property
    def is_peer(self) -> bool:
        return self.init not in ("warm", "cold")

    @property
    def name(self) -> str:
        """The run's folder name stem, e.g. ``r2-budget-fisher`` (the reference init), ``r2-uniform-cold``."""
        return self.label if self.init == "warm" else f"{self.label}-{self.init}"


@dataclass(frozen=True)
class RowEvaluation:
    """How a run is evaluated: the held-out records and, optionally, a curve and accuracy."""

    eval_data_path: str
    eval_samples: int
    max_length: int
    curve_points: int = 0
    curve_samples: int = 64
    accuracy_samples: int = 0
    max_new_tokens: int = 32
    peer_records: int = 64
    validation_data_path: str | None = None
    """When given, the run's loss on it (``validation_samples`` records) is recorded too: the learning-rate choice,
    and early stopping."""
    eval_interval: int = 0
    """Early stopping: optimizer steps between validation evaluations (and the last step); 0: no early stopping."""
    patience: int = 0
    """Early stopping: evaluations without a lower validation loss before training stops; the best evaluated
    checkpoint is restored and is what the row reports (0: no early stopping)."""
    validation_samples: int = 0
    """Validation records evaluated (a seeded sample); 0: ``eval_samples``."""
    accuracy_tasks: tuple[str, ...] = ()
    """Tasks (the records' ``task`` key) whose checkable records are scored; empty: every checkable record."""
    accuracy_batch_size: int = 1
    """Records decoded together for the accuracy (``accuracy.exact_match``)."""

    @property
    def early_stopping(self) -> bool:
        return bool(self.validation_data_path and self.eval_interval > 0 and self.patience > 0)

    def replace_validation(self, path: str) -> RowEvaluation:
        """This evaluation, plus the validation loss on ``path``."""
        from dataclasses import replace

        return replace(self, validation_data_path=path)


@dataclass
class RowResult:
    """One run's outcome (small, picklable; also ``row.json``)."""

    label: str
    init: str
    seed: int
    learning_rate: float
    run_dir: str
    loss: float | None
    """Held-out loss (nats per response token) after training, of the adapter as served."""
    trainable_parameters: int
    matmul_parameters: int
    """N of the compute formula (``evidence.compute``)."""
    train_tokens: int
    train_flops: float
    preparation_tokens: int = 0
    """Tokens of the peer's own initialization passes (lora-ranks' preparation is counted from the analysis)."""
    preparation_flops: float = 0.0
    seconds: float = 0.0
    """Wall time of building and training (the evaluations excluded)."""
    accuracy: float | None = None
    accuracy_n: int = 0
    curve: list[dict] = field(default_factory=list)
    """Evaluations during training: step, tokens, train_flops, seconds, loss (on ``curve_samples`` records)."""
    served_rank_factor: int = 1
    """2 when the served adapter is PEFT's rank-2r conversion (a base-changing peer)."""
    in_memory_loss: float | None = None
    """A converted peer's loss before the conversion (equal to ``loss`` up to float rounding)."""
    validation_loss: float | None = None
    """Loss on the validation split, when the evaluation names one (with early stopping: the best checkpoint's)."""
    steps: int = 0
    """Optimizer steps run (with early stopping, up to the stop: the best step plus the patience)."""
    best_step: int | None = None
    """With early stopping: the step of the lowest validation loss, the checkpoint the row reports."""
    best_train_flops: float | None = None
    """Training FLOPs up to ``best_step`` (``train_flops`` counts every step run)."""
    best_seconds: float | None = None
    """Wall time of building and training up to ``best_step`` (evaluations excluded)."""
    stopped: str = "planned"
    """Why training ended: "planned" (every planned step: no early stopping), "patience" (early stopping: the
    validation loss stopped improving), "cap" (early stopping asked for, but the planned steps, the cap of epochs
    or steps, ran out first: not shown to be at a plateau) or "diverged" (the loss became NaN; with early stopping
    the best checkpoint before it is reported, without one the row has no result: ``diverged``)."""
    diverged: bool = False
    """True when training diverged before any checkpoint could be kept: ``loss`` and ``validation_loss`` are then
    None, and a learning-rate choice treats the rate as infinitely bad."""
    validation_curve: list[dict] = field(default_factory=list)
    """Early stopping's evaluations: step, tokens, train_flops, seconds, validation loss."""
    validation_flops: float = 0.0
    """Forward FLOPs of the early-stopping evaluations (2N per validation token each time; not in ``train_flops``)."""
    accuracy_by_task: dict[str, list[int]] = field(default_factory=dict)
    """Exact matches per task: task -> [correct, n]."""
    allocation: str | None = None
    """The rank config's allocation (``uniform``, ``budget-fisher``, ...; None for a config made otherwise)."""
    budget_rank: int | None = None
    """The rank config's budget, as the rank of uniform ranks of the same parameters (None: no such budget)."""


def select_configs(configs: dict[str, str], allocations: Sequence[str]) -> dict[str, str]:
    """The configs (label -> path) whose allocation is in ``allocations`` (all when empty). A label is the allocation
    (``budget``) or ``r<r>-<allocation>`` (``r2-budget-fisher``), with an alpha variant's suffix (``-rslora``)."""
    import re

    if not allocations:
        return dict(configs)
    return {label: path for label, path in configs.items()
            if re.sub(r"-(constant|rslora)$", "", re.sub(r"^r\d+-", "", label)) in allocations}


def comparison_rows(config_labels: Sequence[str], inits: Sequence[str], peers: Sequence[str]) -> list[tuple[str, str]]:
    """The (label, init) rows of a comparison: every config at every init, then every peer at each budget's uniform
    config (labels ``uniform`` or ``r<r>-uniform``; ``default`` is PEFT's ``LoraConfig()`` at that rank,
    ``evidence.peers``)."""
    rows = [(label, init) for label in config_labels for init in inits]
    uniforms = [label for label in config_labels if label == "uniform" or label.endswith("-uniform")]
    rows += [(label, peer) for label in uniforms for peer in peers]
    return rows


def row_key(base_model: str, spec: RowSpec, train_path: str, settings: LoRATrainingSettings,
            evaluation: RowEvaluation) -> str:
    """A digest of everything a run's result depends on: the spec, settings and evaluation, and the content of the
    rank config, the warm-start adapter's weights and the data files (a finished run with the same key is reused)."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps([str(base_model), asdict(spec), settings.to_dict(), asdict(evaluation)],
                                       sort_keys=True, default=str).encode())
    files = [spec.config_path, train_path, evaluation.eval_data_path, evaluation.validation_data_path]
    if spec.warm_adapter:
        files.append(str(Path(spec.warm_adapter) / "adapter_model.safetensors"))
    for path in files:
        if path and Path(path).is_file():
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def choose_learning_rates(trials: Sequence[RowResult]) -> tuple[dict[tuple[str, str], float], dict[str, dict]]:
    """Per row (label, init), the rate of lowest mean validation loss over the seeds it was tried on: (row -> that
    rate, and the record for results.json: "label/init" -> the chosen rate, every rate's mean validation loss, each
    seed's, and ``at_edge``: whether the choice is the lowest or highest rate tried).

    A diverged trial (``RowResult.diverged``) counts as an infinite loss (recorded as None); a rate's mean is over
    the seeds that tried it, and a rate not tried on every seed any other rate was tried on is not chosen. Ties keep
    the lower rate."""
    losses: dict[tuple[str, str], dict[float, dict[int, float]]] = {}
    for result in trials:
        if result.validation_loss is None and not result.diverged:
            raise ValueError(f"trial {result.label}/{result.init} at lr {result.learning_rate:g} has no validation loss")
        value = math.inf if result.diverged else result.validation_loss
        losses.setdefault((result.label, result.init), {}).setdefault(result.learning_rate, {})[result.seed] = value
    chosen: dict[tuple[str, str], float] = {}
    record: dict[str, dict] = {}
    for row, by_rate in losses.items():
        seeds = set().union(*by_rate.values())
        complete = {lr: sum(per_seed.values()) / len(per_seed) for lr, per_seed in by_rate.items()
                    if set(per_seed) == seeds}
        best = min(sorted(complete), key=lambda lr: complete[lr])
        rates = sorted(by_rate)
        chosen[row] = best
        record[f"{row[0]}/{row[1]}"] = {
            "learning_rate": best, "at_edge": best in (rates[0], rates[-1]) and len(rates) > 1,
            "validation_losses": {f"{lr:g}": (None if not math.isfinite(v) else v)
                                  for lr, v in sorted(complete.items())},
            "per_seed": {f"{lr:g}": {str(seed): (None if not math.isfinite(v) else v) for seed, v in sorted(d.items())}
                         for lr, d in sorted(by_rate.items())}}
    return chosen, record


def next_learning_rates(record: dict[str, dict], *, max_rate: float = 1.0) -> dict[str, float]:
    """The rate to try next for each row of ``choose_learning_rates``' record whose choice is at an edge of the rates
    tried: one step beyond it, the step being the ratio of the edge to its neighbour (3x for a grid spaced 3x), above
    the highest rate or below the lowest. A row whose choice is interior, or at the top with the next rate above
    ``max_rate``, gets none. Returns "label/init" -> rate."""
    out = {}
    for row, entry in record.items():
        rates = sorted(float(lr) for lr in entry["per_seed"])
        best = entry["learning_rate"]
        if len(rates) < 2 or rates[0] < best < rates[-1]:
            continue
        if best == rates[-1]:
            step = rates[-1] / rates[-2]
            if best * step <= max_rate:
                out[row] = float(f"{best * step:.6g}")
        else:
            out[row] = float(f"{best / (rates[1] / rates[0]):.6g}")
    return out


def curve_steps(total: int, points: int) -> set[int]:
    """``points`` evenly spaced steps in 1..total, the last one included (fewer when total is smaller)."""
    if points <= 0:
        return set()
    return {max(1, round(total * (i + 1) / points)) for i in range(points)}


@dataclass(frozen=True)
class Committed:
    """Where finished rows are committed (one JSON per row, seed and rate) and the digest of the preparation's
    settings their key includes (``committed_key``)."""

    results_dir: str
    design: str


def committed_key(base_model: str, spec: RowSpec, train_path: str, settings: LoRATrainingSettings,
                  evaluation: RowEvaluation, design: str) -> str:
    """A digest of what a committed result (``train_row``'s ``results_dir``) stands for, that needs no preparation to
    compute: the base model's files (config and safetensors headers), the data files' bytes, the row (label, init,
    seed), the training settings (its learning rate included), the evaluation and ``design`` (the caller's digest of
    the preparation's settings: fine-tune, analysis, allocation). Unlike ``row_key`` it does not read the rank
    config or the warm start, which a fresh clone would have to prepare again."""
    import hashlib
    import json

    from ..checkpoints import Checkpoint, resolve_model_path

    evaluation_paths = {k: v for k, v in asdict(evaluation).items() if not k.endswith("_path")}
    digest = hashlib.sha256(json.dumps([spec.label, spec.init, spec.seed, settings.replace(seed=spec.seed).key_dict(),
                                        evaluation_paths, design], sort_keys=True, default=str).encode())
    model = resolve_model_path(base_model)
    config = Path(model) / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    digest.update(json.dumps(Checkpoint(model).header_fingerprint(), sort_keys=True, default=str).encode())
    for path in (train_path, evaluation.eval_data_path, evaluation.validation_data_path):
        if path and Path(path).is_file():
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def committed_name(spec: RowSpec, learning_rate: float) -> str:
    """The file name of a row's committed result: ``<row>-seed<seed>-lr<rate>.json``."""
    return f"{spec.name}-seed{spec.seed}-lr{learning_rate:g}.json"


_COMMITTED = re.compile(r".+-seed\d+-lr[^/]+\.json")
_PREPARATION = re.compile(r"preparation-.+\.json")


def check_results_dir(results_dir: str | Path, flag: str = "--results-dir") -> None:
    """Before any work: ``results_dir`` is a folder (or can be made one), and every file in it named like a committed
    result or preparation is one this tool wrote (a JSON object with its fields): a run reads them and writes over
    stale ones, so a file of the user's under such a name is never replaced.

    Raises:
        DataError: naming the folder and the first file that is not the tool's.
    """
    import json
    import os

    from ..data import DataError

    folder = Path(results_dir)
    if folder.is_symlink() and not folder.exists():
        raise DataError(f"{flag} {results_dir} is a symbolic link to {os.readlink(folder)}, which does not exist: "
                        "give a folder, or create the link's target first")
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{flag} {results_dir} is a file: give the folder where row results are committed")
    for parent in Path(os.path.abspath(folder)).parents:
        if parent.is_symlink() and not parent.exists():
            raise DataError(f"{flag} {results_dir} lies under {parent}, a symbolic link to {os.readlink(parent)}, "
                            "which does not exist")
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        row, prep = _COMMITTED.fullmatch(path.name), _PREPARATION.fullmatch(path.name)
        if not (row or prep):
            continue
        try:
            saved = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
        except (OSError, UnicodeDecodeError, ValueError):
            saved = None
        if not isinstance(saved, dict) or ("committed_key" if row else "seconds") not in saved:
            raise DataError(f"{flag} {results_dir} holds {path.name}, named like a result this tool commits but not "
                            "one it wrote: a run would read or replace it: move it, or choose another folder")


def read_committed(results_dir: str | Path, spec: RowSpec, learning_rate: float, key: str) -> RowResult | None:
    """The committed result of this row and rate in ``results_dir`` when its key is ``key``, else None."""
    import json

    path = Path(results_dir) / committed_name(spec, learning_rate)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.pop("committed_key", None) != key:
        return None
    saved.pop("key", None)
    return RowResult(**saved)


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
    from ..data import load_records
    from ..finetune import TrainingDivergedError
    from ..loading import load_model
    from ..train import TrainLayout, prepare_lora_run, save_lora_run
    from .comparison import eval_examples

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
        import json

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
        import random

        from .peers import build_peer_model

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
        from .peers import save_served_adapter

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


def _commit(result: RowResult, spec: RowSpec, committed: Committed | None, design_key: str | None) -> None:
    """Write the row's result where finished rows are committed (``committed_name``), with its key."""
    if committed is not None:
        atomic_write_json(Path(committed.results_dir) / committed_name(spec, result.learning_rate),
                          {**asdict(result), "committed_key": design_key})


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
