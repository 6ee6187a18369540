"""What a comparison row is: its spec (label, init, seed, config), how it is evaluated, its result, which rows a
comparison runs, and the key of a finished row's inputs."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..adapter_files import ADAPTER_WEIGHTS
from ..settings import ComparisonSettings, FidelitySettings, LoRATrainingSettings

__all__ = ["RowSpec", "RowEvaluation", "RowResult", "select_configs", "comparison_rows", "row_key", "curve_steps",
           "FULL", "FULL_LABEL"]

FULL = "full"
"""The init of the full fine-tune row: every parameter trained, no rank config (``RowSpec.is_full``)."""
FULL_LABEL = "full-finetune"


@dataclass(frozen=True)
class RowSpec:
    """What one run trains.

    Attributes:
        label: the config's label (``r2-budget-fisher``; a peer trains at its budget's ``r2-uniform``;
            ``full-finetune`` for the full fine-tune).
        init: "warm" or "cold" for lora-ranks' configs, the peer's name (``evidence.peers.PEERS``) for a peer,
            ``FULL`` for the full fine-tune (every parameter trained: the ceiling).
        config_path: the rank config (a peer: the budget's uniform config, whose ranks and alpha it takes; the full
            fine-tune has none: "").
        warm_adapter: the adapter a warm run starts from.
    """

    label: str
    init: str
    seed: int
    config_path: str
    warm_adapter: str | None = None

    @property
    def is_peer(self) -> bool:
        return self.init not in ("warm", "cold", FULL)

    @property
    def is_full(self) -> bool:
        return self.init == FULL

    @property
    def name(self) -> str:
        """The run's folder name stem, e.g. ``r2-budget-fisher`` (the reference init), ``r2-uniform-cold``,
        ``full-finetune``."""
        return self.label if self.init in ("warm", FULL) else f"{self.label}-{self.init}"


_COMPARISON = ComparisonSettings()  # the evaluation's defaults are the comparison settings' (one definition)


@dataclass(frozen=True)
class RowEvaluation:
    """How a run is evaluated: the held-out records and, optionally, a curve and accuracy."""

    eval_data_path: str
    eval_samples: int
    max_length: int
    curve_points: int = _COMPARISON.curve_points
    curve_samples: int = _COMPARISON.curve_samples
    accuracy_samples: int = _COMPARISON.accuracy_samples
    max_new_tokens: int = _COMPARISON.max_new_tokens
    peer_records: int = _COMPARISON.peer_records
    validation_data_path: str | None = None
    """When given, the run's loss on it (``validation_samples`` records) is recorded too: the learning-rate choice,
    and early stopping."""
    eval_interval: int = 0
    """Early stopping: optimizer steps between validation evaluations (and the last step); 0: no early stopping."""
    patience: int = 0
    """Early stopping: evaluations without a lower validation loss before training stops; the best evaluated
    checkpoint is restored and is what the row reports (0: no early stopping)."""
    validation_samples: int = _COMPARISON.validation_samples
    """Validation records evaluated (a seeded sample); 0: ``eval_samples``."""
    accuracy_tasks: tuple[str, ...] = tuple(_COMPARISON.accuracy_tasks)
    """Tasks (the records' ``task`` key) whose checkable records are scored; empty: every checkable record."""
    accuracy_batch_size: int = _COMPARISON.accuracy_batch_size
    """Records decoded together for the accuracy (``accuracy.exact_match``)."""

    @classmethod
    def of(cls, eval_data_path: str, fidelity: FidelitySettings, comparison: ComparisonSettings,
           validation_data_path: str | None) -> RowEvaluation:
        """The evaluation a comparison's settings describe (``validation_data_path`` used with early stopping)."""
        return cls(eval_data_path, fidelity.eval_samples, fidelity.eval_max_length, comparison.curve_points,
                   comparison.curve_samples, comparison.accuracy_samples, comparison.max_new_tokens,
                   comparison.peer_records, validation_data_path if comparison.early_stopping else None,
                   comparison.eval_interval or 0, comparison.patience or 0, comparison.validation_samples,
                   tuple(comparison.accuracy_tasks), comparison.accuracy_batch_size)

    @property
    def early_stopping(self) -> bool:
        return bool(self.validation_data_path and self.eval_interval > 0 and self.patience > 0)

    def replace_validation(self, path: str) -> RowEvaluation:
        """This evaluation, plus the validation loss on ``path``."""
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

    digest = hashlib.sha256(json.dumps([str(base_model), asdict(spec), settings.to_dict(), asdict(evaluation)],
                                       sort_keys=True, default=str).encode())
    files = [spec.config_path, train_path, evaluation.eval_data_path, evaluation.validation_data_path]
    if spec.warm_adapter:
        files.append(str(Path(spec.warm_adapter) / ADAPTER_WEIGHTS))
    for path in files:
        if path and Path(path).is_file():
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def curve_steps(total: int, points: int) -> set[int]:
    """``points`` evenly spaced steps in 1..total, the last one included (fewer when total is smaller)."""
    if points <= 0:
        return set()
    return {max(1, round(total * (i + 1) / points)) for i in range(points)}
