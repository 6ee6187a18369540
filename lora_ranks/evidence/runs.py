"""One row run of the comparison: train a LoRA (lora-ranks' config, or a peer method), evaluate it in the same
process (held-out loss during and after training, exact-match accuracy), and account for its compute.

The run's folder (``ComparisonLayout.run_dir``)::

    <run>/adapter/               # the adapter as served (a base-changing peer's converted rank-2r LoRA)
    <run>/training_metrics.json  # the training loop's metrics
    <run>/row.json               # the RowResult: losses, accuracy, curve, FLOPs, parameters
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._io import atomic_write_json
from ..config import load_rank_config
from ..finetune import planned_steps, prepare_examples, train_loop
from ..settings import LoRATrainingSettings
from .accuracy import checkable_records, exact_match
from .compute import forward_flops, frozen_training_flops, matmul_parameters
from .fidelity import held_out_loss

__all__ = ["RowSpec", "RowEvaluation", "RowResult", "train_row", "curve_steps", "choose_learning_rates",
           "comparison_rows", "row_key", "select_configs"]


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
    """When given, the run's loss on it (``eval_samples`` records) is recorded too: the learning-rate choice."""

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
    loss: float
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
    """Loss on the validation split, when the evaluation names one."""


def select_configs(configs: dict[str, str], allocations: Sequence[str]) -> dict[str, str]:
    """The configs (label -> path) whose allocation is in ``allocations`` (all when empty). A label is the allocation
    (``budget``) or ``r<r>-<allocation>`` (``r2-budget-fisher``)."""
    import re

    if not allocations:
        return dict(configs)
    return {label: path for label, path in configs.items() if re.sub(r"^r\d+-", "", label) in allocations}


def comparison_rows(config_labels: Sequence[str], inits: Sequence[str], peers: Sequence[str]) -> list[tuple[str, str]]:
    """The (label, init) rows of a comparison: every config at every init, then every peer at each budget's uniform
    config (labels ``uniform`` or ``r<r>-uniform``). The peer ``default`` is PEFT's default LoRA: the cold uniform
    row, added when not already there."""
    rows = [(label, init) for label in config_labels for init in inits]
    uniforms = [label for label in config_labels if label == "uniform" or label.endswith("-uniform")]
    rows += [(label, "cold") for label in uniforms if "default" in peers and (label, "cold") not in rows]
    rows += [(label, peer) for label in uniforms for peer in peers if peer != "default"]
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


def choose_learning_rates(trials: Sequence[RowResult]) -> tuple[dict[tuple[str, str], RowResult], dict[str, dict]]:
    """Per row (label, init), the trial of lowest validation loss: (row -> that RowResult, and the record for
    results.json: "label/init" -> the chosen rate and every rate's validation loss). Ties keep the first rate."""
    best: dict[tuple[str, str], RowResult] = {}
    record: dict[str, dict] = {}
    for result in trials:
        if result.validation_loss is None:
            raise ValueError(f"trial {result.label}/{result.init} at lr {result.learning_rate:g} has no validation loss")
        key = (result.label, result.init)
        if key not in best or result.validation_loss < best[key].validation_loss:
            best[key] = result
        record.setdefault(f"{result.label}/{result.init}", {"validation_losses": {}})["validation_losses"][
            f"{result.learning_rate:g}"] = result.validation_loss
    for (label, init), result in best.items():
        record[f"{label}/{init}"]["learning_rate"] = result.learning_rate
    return best, record


def curve_steps(total: int, points: int) -> set[int]:
    """``points`` evenly spaced steps in 1..total, the last one included (fewer when total is smaller)."""
    if points <= 0:
        return set()
    return {max(1, round(total * (i + 1) / points)) for i in range(points)}


def train_row(base_model: str, spec: RowSpec, train_path: str, out_dir: str | Path, settings: LoRATrainingSettings,
              evaluation: RowEvaluation, *, progress: bool = False) -> RowResult:
    """Train the row of ``spec`` on every record of ``train_path`` with ``settings`` (its seed is ``spec.seed``) and
    evaluate it in this process; writes the run folder (module docstring) and returns its RowResult.

    lora-ranks' rows train as ``train_dynamic_lora`` does (same seed, init, data order), except that an unquantized
    base stays float32 under bf16 (autocast only, as the peers'): every row is evaluated in float32. A peer is built by
    ``evidence.peers.build_peer_model`` at the config's uniform ranks, from ``evaluation.peer_records`` training
    records when it needs data.
    """
    from ..data import load_records
    from ..loading import load_model
    from ..train import TrainLayout, prepare_lora_run, save_lora_run
    from .comparison import eval_examples

    settings = settings.replace(seed=spec.seed)
    out = Path(out_dir)
    layout = TrainLayout(out)
    key = row_key(base_model, spec, train_path, settings, evaluation)
    done = out / "row.json"
    if done.is_file():  # a finished run of the same inputs: resume without training again
        import json

        saved = json.loads(done.read_text())
        if saved.pop("key", None) == key:
            return RowResult(**saved)
    start = time.perf_counter()
    built = None
    if spec.is_peer:
        import random

        from .peers import build_peer_model

        torch.manual_seed(settings.seed)
        records = load_records(train_path)
        random.Random(settings.seed).shuffle(records)
        built = build_peer_model(base_model, load_rank_config(spec.config_path), spec.init,
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
    tokens_per_step: list[int] = []
    evaluating = [0.0]  # seconds spent evaluating, left out of the run's wall time

    def on_step(step: int, _total: int, _loss: float, _lr: float) -> None:
        if step in at:
            began = time.perf_counter()
            tokens = sum(tokens_per_step)
            curve.append({"step": step, "tokens": tokens, "train_flops": frozen_training_flops(n, trainable, tokens),
                          "seconds": began - start - evaluating[0],
                          "loss": held_out_loss(model, curve_records, pad)})
            model.train()
            evaluating[0] += time.perf_counter() - began

    curve: list[dict] = []
    losses, use_bf16 = train_loop(model, examples, pad, settings, device, on_step=on_step, progress=progress,
                                  desc=f"{spec.name} seed {spec.seed}",
                                  after_update=built.after_update if built else None, tokens_per_step=tokens_per_step)
    seconds = time.perf_counter() - start - evaluating[0]
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
    validation = None
    if evaluation.validation_data_path:
        validation = held_out_loss(model, eval_examples(evaluation.validation_data_path, tokenizer,
                                                        evaluation.eval_samples, evaluation.max_length), pad)
    accuracy = None
    accuracy_n = 0
    if evaluation.accuracy_samples:
        records = checkable_records(evaluation.eval_data_path, evaluation.accuracy_samples)
        if records:
            scored = exact_match(model, tokenizer, records, evaluation.max_new_tokens)
            accuracy, accuracy_n = scored.accuracy, scored.n
    preparation_tokens = built.preparation_tokens if built else 0
    preparation = 0.0
    if built is not None and built.peer.preparation == "forward":
        preparation = forward_flops(n, preparation_tokens)
    elif built is not None and built.peer.preparation == "backward":  # forward, input and target-weight gradients
        preparation = frozen_training_flops(n, 0, preparation_tokens) + 2.0 * _target_parameters(model) * preparation_tokens
    result = RowResult(spec.label, spec.init, spec.seed, settings.learning_rate, str(out), loss, trainable, n,
                       sum(tokens_per_step), frozen_training_flops(n, trainable, sum(tokens_per_step)),
                       preparation_tokens, preparation, seconds, accuracy, accuracy_n, curve, served_factor,
                       in_memory if served_factor == 2 else None, validation)
    atomic_write_json(done, {**asdict(result), "key": key})
    return result


def _target_parameters(model: torch.nn.Module) -> int:
    """Weights of the modules carrying LoRA adapters (their base layers)."""
    return sum(m.base_layer.weight.numel() for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
