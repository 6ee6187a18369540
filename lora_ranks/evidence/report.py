"""The comparison's results as files: rows per config over seeds, paired differences, the preparation's compute,
the plots (``comparison_report``)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .._io import atomic_write_json
from ..config import load_rank_config
from ..plots import write_comparison_plot, write_curves_plot
from ..reports import Record
from .comparison import ComparisonLayout
from .compute import lora_ranks_preparation
from .experiment import paired_comparison
from .fidelity import mean_and_std

__all__ = ["ComparisonReport", "preparation_of", "comparison_report"]


class PairedDifference(Record):
    """``experiment.paired_comparison``: a row's per-seed losses minus the reference's, paired by seed."""

    mean: float
    std: float
    se: float
    t: Optional[float] = None
    """None when every difference is the same (t is not finite)."""
    p: Optional[float] = None
    """Two-sided p-value of the paired t-test (uncorrected)."""
    n: int


class CurvePoint(Record):
    """One evaluation step of a row's curve, averaged over its seeds."""

    step: int
    train_flops: float
    total_flops: Optional[float] = None
    """Preparation + training FLOPs; None when the preparation is unknown."""
    seconds: float
    loss: float


class ComparisonRow(Record):
    """One row of a comparison: an allocation (or peer) and init over its seeds (``comparison_report``)."""

    allocation: str
    """The row's label (``r8-budget-fisher``, ``full-finetune``, a peer's config label)."""
    method: str
    """The allocation rule, or the peer's init for a peer row."""
    budget_rank: Optional[int] = None
    init: str
    """"warm", "cold", a peer ("default", "rslora", "pissa", ...) or "full"."""
    trainable_parameters: Optional[int] = None
    learning_rate: Optional[float] = None
    loss_mean: float
    """Held-out loss (nats per token), mean over seeds."""
    loss_std: float
    losses: list[float]
    seeds: list[int]
    vs_uniform: Optional[PairedDifference] = None
    """Against the uniform ranks of the same budget (None for those themselves, or under 2 paired seeds)."""
    vs_default: Optional[PairedDifference] = None
    """Against PEFT's ``LoraConfig()`` (the ``default`` peer), else against cold uniform ranks."""
    gap_closed: Optional[float] = None
    """Share of the held-out-loss gap between cold uniform LoRA and the full fine-tune this row closes."""
    accuracy_mean: Optional[float] = None
    accuracy_se: Optional[float] = None
    accuracy_by_task: dict[str, float] = {}
    train_flops: Optional[float] = None
    preparation_flops: Optional[float] = None
    """What was spent before the first LoRA step (None: unknown, never counted as free)."""
    preparation_seconds: Optional[float] = None
    seconds: Optional[float] = None
    served_rank_factor: Optional[int] = None
    diverged_seeds: list[int] = []
    curve: list[CurvePoint] = []
    runs: list[dict[str, Any]] = []
    """Per seed: losses, best step, why training stopped, FLOPs and seconds (``_run_summary``)."""


@dataclass
class ComparisonReport:
    """Where the comparison's results are, and its rows (one per allocation and init: loss mean, std, per seed)."""

    results_path: str
    plot_path: str
    rows: list[ComparisonRow]


def preparation_of(analysis_config_path: str | Path, layout: ComparisonLayout, n: int) -> dict:
    """What lora-ranks spent before its rows' first LoRA step (``compute.lora_ranks_preparation``): FLOPs of the
    brief fine-tune (its ``training_metrics.json`` beside the fine-tuned folder), of the split-half fine-tunes when
    the analysis ran them, and of the curvature passes; and ``seconds``, the fine-tunes' recorded seconds plus the
    analysis' (an estimate: the flow's analysis clock starts before its fine-tune, so this can count the fine-tune
    twice, and the warm start's extraction is left out; ``compare`` replaces it by the wall time it measures around
    the whole preparation)."""
    config = load_rank_config(analysis_config_path)
    metrics = [Path(config.checkpoints.finetuned.path).parent / "training_metrics.json"]
    metrics += sorted(layout.analysis.split_half_dir.glob("half-*/training_metrics.json"))
    flops = lora_ranks_preparation(config, n, metrics)
    seconds = sum(json.loads(m.read_text()).get("seconds", 0.0) for m in metrics if m.is_file())
    timings = config.analysis_metadata.timings
    return {**flops, "seconds": seconds + (timings.analysis_seconds if timings else 0.0)}


def comparison_report(layout: ComparisonLayout, configs: dict[str, str], results: Sequence, details: dict,
                      reference_init: str = "warm", full_finetune: dict[int, float] | None = None,
                      preparation: dict | None = None) -> ComparisonReport:
    """Rows (held-out loss per allocation and init or peer: mean +- std over seeds, paired differences, accuracy,
    compute), ``results.json``, ``comparison.png`` and, when the runs recorded curves, ``curves.png``.

    Args:
        configs: label -> rank config path of the compared configs (the rows' order; a row whose config is not
            there, e.g. every one of its runs was committed earlier, is described from its runs).
        results: the ``runs.RowResult`` of every trained LoRA (final runs: one learning rate per row). A run that
            diverged (``diverged``) is left out of its row, whose ``diverged_seeds`` lists it.
        details: recorded in results.json beside the rows (data paths, steps, ...).
        reference_init: the init of the uniform ranks every row is paired against (training.init); a config with
            a budget of its own (``signal``) is paired with the uniform ranks closest to it in parameters.
        full_finetune: seed -> held-out loss of a full fine-tune trained as long (the reference of the gap).
        preparation: lora-ranks' preparation (``preparation_of``): FLOPs (``total``) and ``seconds``; or, with a
            preparation per seed, seed -> such a dict. Counted for every lora-ranks row that needs the analysis
            (all but cold uniform ranks), as the mean over the row's seeds.

    Each row has ``vs_uniform`` (``paired_comparison`` of its per-seed losses minus those of the uniform ranks at
    the same budget and ``reference_init``; None for those uniform ranks themselves and with fewer than 2 seeds; a t
    that is not finite, when every difference is the same, is None), ``vs_default`` (the same against PEFT's
    ``LoraConfig()``, the ``default`` peer, when trained, else against cold uniform ranks) and, when cold uniform
    ranks and the full fine-tune were trained, ``gap_closed``: the share of the held-out-loss gap between cold
    uniform LoRA and the full fine-tune that the row closes. ``accuracy_mean`` / ``accuracy_se`` (over seeds; the
    binomial SE of one run with one seed) and ``accuracy_by_task`` (task -> mean over seeds), ``train_flops``,
    ``preparation_flops`` (None when unknown), ``preparation_seconds``, ``seconds`` (means over seeds), ``curve``
    (per evaluation step, the mean loss over seeds against total FLOPs = preparation + training) and ``runs`` (per
    seed: the losses, the best step and why training stopped, FLOPs and seconds to the best step and in all, and the
    validation curve) come from the runs.
    """
    table = _Runs(results, configs, preparation)
    full_mean = mean_and_std(list(full_finetune.values()))[0] if full_finetune else None
    rows = [table.row(label, init, reference_init, full_mean) for label in table.labels for init in table.inits
            if table.runs_of(label, init)]
    if full_finetune:
        seeds = sorted(full_finetune)
        mean, std = mean_and_std([full_finetune[s] for s in seeds])
        base_parameters = next(iter(table.metadata.values())).base_parameters if table.metadata else None
        rows.append(ComparisonRow(allocation="full-finetune", method="full-finetune", init="full",
                                  trainable_parameters=base_parameters, loss_mean=mean, loss_std=std,
                                  losses=[full_finetune[s] for s in seeds], seeds=seeds, gap_closed=1.0))
    results_path = atomic_write_json(layout.results_path, {"rows": [row.to_json() for row in rows],
                                                           "reference_init": reference_init,
                                                           "preparation": _json_keys(preparation), **details})
    if any(row.curve for row in rows):
        write_curves_plot(layout.curves_plot_path, rows)
    return ComparisonReport(str(results_path), write_comparison_plot(layout.comparison_plot_path, rows), rows)


class _Runs:
    """The runs of a comparison, indexed for its rows: by (label, init, seed), with each label's config (when its
    file is there) and lora-ranks' preparation (one for every seed, or one per seed)."""

    def __init__(self, results: Sequence, configs: dict[str, str], preparation: dict | None):
        self.diverged = [r for r in results if getattr(r, "diverged", False)]
        self.results = [r for r in results if not getattr(r, "diverged", False)]
        self.by_run = {(r.label, r.init, r.seed): r for r in self.results}
        self.inits = list(dict.fromkeys(r.init for r in self.results))
        self.metadata = {label: load_rank_config(path) for label, path in configs.items() if Path(path).is_file()}
        self.labels = list(dict.fromkeys([*configs, *(r.label for r in self.results)]))
        self.preparation = (preparation if preparation and "total" not in preparation else
                            None if preparation is None else {None: preparation})

    def runs_of(self, label: str, init: str) -> list:
        return [self.by_run[key] for key in sorted(self.by_run) if key[:2] == (label, init)]

    def budget_of(self, label: str) -> int | None:
        if label in self.metadata:
            return self.metadata[label].analysis_metadata.budget_rank
        return next((r.budget_rank for r in self.results if r.label == label), None)

    def allocation_of(self, label: str) -> str | None:
        if label in self.metadata:
            return self.metadata[label].analysis_metadata.allocation
        return next((r.allocation for r in self.results if r.label == label), None)

    def parameters_of(self, label: str) -> float:
        if label in self.metadata:
            return self.metadata[label].trainable_parameters
        return _mean([r.trainable_parameters for r in self.results if r.label == label and r.init in ("warm", "cold")]
                     or [0])

    def uniform_of(self, label: str) -> str:
        """The uniform ranks ``label`` is paired with: at its budget rank, or the closest in parameters."""
        r = self.budget_of(label)
        if r is not None:
            return f"r{r}-uniform"
        if "uniform" in self.labels or label == "uniform":
            return "uniform"
        # a budget of its own (the signal rule): the uniform ranks of the budget closest in parameters
        uniforms = [u for u in self.labels if self.allocation_of(u) == "uniform"]
        own = self.parameters_of(label)
        return min(uniforms, key=lambda u: abs(self.parameters_of(u) - own), default="uniform")

    def per_seed(self, label: str, init: str) -> dict[int, float]:
        return {seed: r.loss for (run_label, run_init, seed), r in self.by_run.items()
                if (run_label, run_init) == (label, init)}

    def paired_to(self, label: str, init: str, other: tuple[str, str]) -> PairedDifference | None:
        mine, reference = self.per_seed(label, init), self.per_seed(*other)
        paired = [s for s in sorted(mine) if s in reference]
        if len(paired) < 2 or (label, init) == other:
            return None
        return PairedDifference(**_finite(paired_comparison([mine[s] for s in paired], [reference[s] for s in paired])))

    def preparation_for(self, seeds: Sequence[int], key: str) -> float | None:
        if self.preparation is None:
            return None
        values = [(self.preparation.get(s) or self.preparation.get(str(s)) or self.preparation.get(None)
                   or {}).get(key) for s in seeds]
        return None if any(v is None for v in values) else _mean(values)

    def row(self, label: str, init: str, reference_init: str, full_mean: float | None) -> ComparisonRow:
        """The row of ``label`` at ``init`` (see ``comparison_report``)."""
        runs = self.runs_of(label, init)
        seeds = [r.seed for r in runs]
        mean, std = mean_and_std([r.loss for r in runs])
        cold_uniform = self.per_seed(self.uniform_of(label), "cold")
        gap = None
        if full_mean is not None and cold_uniform:
            baseline = mean_and_std(list(cold_uniform.values()))[0]
            gap = (baseline - mean) / (baseline - full_mean) if baseline != full_mean else None
        peer = init not in ("warm", "cold")
        plain_lora = init == "cold" and (self.allocation_of(label) or label) == "uniform"
        # None when lora-ranks' preparation is unknown (a pair fine-tuned elsewhere): not counted as free
        own_prep = (_mean([r.preparation_flops for r in runs]) if peer else 0.0 if plain_lora
                    else self.preparation_for(seeds, "total"))
        own_seconds = 0.0 if peer or plain_lora else self.preparation_for(seeds, "seconds")
        accuracy_mean, accuracy_se, by_task = _accuracy_summary(runs)
        uniform = self.uniform_of(label)
        reference_default = (uniform, "default" if self.per_seed(uniform, "default") else "cold")
        return ComparisonRow(
            allocation=label, method=init if peer else (self.allocation_of(label) or label),
            budget_rank=self.budget_of(label), init=init,
            trainable_parameters=round(_mean([r.trainable_parameters for r in runs])),
            learning_rate=runs[0].learning_rate, loss_mean=mean, loss_std=std, losses=[r.loss for r in runs],
            seeds=seeds, vs_uniform=self.paired_to(label, init, (uniform, reference_init)),
            vs_default=self.paired_to(label, init, reference_default), gap_closed=gap, accuracy_mean=accuracy_mean,
            accuracy_se=accuracy_se, accuracy_by_task=by_task, train_flops=_mean([r.train_flops for r in runs]),
            preparation_flops=own_prep, preparation_seconds=own_seconds, seconds=_mean([r.seconds for r in runs]),
            served_rank_factor=runs[0].served_rank_factor,
            diverged_seeds=sorted(r.seed for r in self.diverged if (r.label, r.init) == (label, init)),
            curve=_mean_curve(runs, own_prep), runs=[_run_summary(r) for r in runs])


def _accuracy_summary(runs: Sequence) -> tuple[float | None, float | None, dict[str, float]]:
    """(mean accuracy over seeds, its SE: over seeds, or the binomial SE of one run; task -> mean accuracy)."""
    accuracies = [r.accuracy for r in runs if r.accuracy is not None]
    accuracy_mean, accuracy_se = None, None
    if accuracies:
        accuracy_mean = _mean(accuracies)
        accuracy_se = (mean_and_std(accuracies)[1] / math.sqrt(len(accuracies)) if len(accuracies) > 1 else
                       math.sqrt(accuracy_mean * (1 - accuracy_mean) / max(1, runs[0].accuracy_n)))
    tasks = sorted({t for r in runs for t in getattr(r, "accuracy_by_task", {})})
    by_task = {t: _mean([r.accuracy_by_task[t][0] / r.accuracy_by_task[t][1] for r in runs
                         if t in r.accuracy_by_task and r.accuracy_by_task[t][1]]) for t in tasks}
    return accuracy_mean, accuracy_se, by_task


def _run_summary(run) -> dict:
    """One run of a row, for results.json: what early stopping and the compute questions need."""
    keys = ("seed", "loss", "validation_loss", "accuracy", "accuracy_by_task", "steps", "best_step", "stopped",
            "train_flops", "best_train_flops", "seconds", "best_seconds", "validation_flops", "validation_curve")
    return {k: getattr(run, k, None) for k in keys}


def _json_keys(value):
    """``value`` with int dict keys as strings (JSON's keys are strings)."""
    if isinstance(value, dict):
        return {str(k): _json_keys(v) for k, v in value.items()}
    return value


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _mean_curve(runs: Sequence, preparation_flops: float | None) -> list[dict]:
    """The runs' curves averaged over seeds, point by point (the runs share steps), with total FLOPs (None when the
    preparation is unknown)."""
    if not runs or not runs[0].curve or any(len(r.curve) != len(runs[0].curve) for r in runs):
        return []
    return [{"step": points[0]["step"], "train_flops": _mean([p["train_flops"] for p in points]),
             "total_flops": None if preparation_flops is None else preparation_flops + _mean([p["train_flops"]
                                                                                              for p in points]),
             "seconds": _mean([p["seconds"] for p in points]), "loss": _mean([p["loss"] for p in points])}
            for points in zip(*(r.curve for r in runs))]


def _finite(stats: dict) -> dict:
    """``stats`` with non-finite values (t of identical differences) as None: results.json is strict JSON."""
    return {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in stats.items()}
