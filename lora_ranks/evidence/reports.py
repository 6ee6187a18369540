"""The evidence as files: the fidelity report of an analysis, and the allocation comparison's steps and results.

Each function here is what one Prefect task of ``svd-analysis`` or ``compare-allocations`` calls; they read and
write files under the layouts below and return small picklable values.

Comparison layout under one root::

    <root>/data/{train,eval}.jsonl           # the held-out split (when no eval data is given)
    <root>/analysis/...                      # an OutputLayout: the svd-analysis run on the train records
    <root>/configs/{uniform,energy,budget}.json
    <root>/runs/<allocation>-seed<seed>/     # adapter/ and training_metrics.json of every trained LoRA
    <root>/results.json, <root>/comparison.png
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .._io import atomic_write_json, atomic_write_text
from ..analysis import OutputLayout, load_spectra, spectra_files
from ..checkpoints import CheckpointPair
from ..config import allocation_settings_of, load_rank_config, modules_from_config, save_rank_config
from ..data import load_records, tokenize_record
from ..loading import load_model
from ..report import write_comparison_plot, write_fidelity_plot
from ..settings import FidelitySettings
from .allocations import allocation_configs
from .fidelity import DeltaBasis, fidelity_sweep, held_out_loss, mean_and_std

__all__ = ["ComparisonLayout", "FidelityReport", "ComparisonReport", "eval_examples", "split_records",
           "run_fidelity_report", "write_allocation_configs", "evaluate_adapter", "comparison_report"]


@dataclass(frozen=True)
class ComparisonLayout:
    """The folders and files of one ``compare-allocations`` run (see the module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def analysis(self) -> OutputLayout:
        return OutputLayout(self.root / "analysis")

    @property
    def configs_dir(self) -> Path:
        return self.root / "configs"

    def run_dir(self, label: str, seed: int) -> Path:
        return self.root / "runs" / f"{label}-seed{seed}"

    @property
    def results_path(self) -> Path:
        return self.root / "results.json"


@dataclass
class FidelityReport:
    """Where the fidelity report is, and its rows (one per allocation measured)."""

    json_path: str
    plot_path: str
    rows: list[dict]


@dataclass
class ComparisonReport:
    """Where the comparison's results are, and its rows (one per allocation: loss mean, std, per seed)."""

    results_path: str
    plot_path: str
    rows: list[dict]


def eval_examples(data_path: str | Path, tokenizer, limit: int, seed: int = 0) -> list[dict]:
    """A seeded sample of ``limit`` records of ``data_path``, tokenized with response-only labels."""
    records = load_records(data_path)
    random.Random(seed).shuffle(records)
    return [tokenize_record(r, tokenizer) for r in records[:limit]]


def split_records(data_path: str | Path, out_dir: str | Path, eval_fraction: float, seed: int = 0) -> tuple[str, str]:
    """Shuffle records (seeded) into ``train.jsonl`` / ``eval.jsonl`` under ``out_dir``: a partition, so held-out
    records are never trained on. Returns (train path, eval path)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got eval_fraction={eval_fraction}")
    records = load_records(data_path)
    random.Random(seed).shuffle(records)
    n_eval = max(1, int(len(records) * eval_fraction))
    out = Path(out_dir)
    atomic_write_text(out / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in records[:n_eval]))
    atomic_write_text(out / "train.jsonl", "".join(json.dumps(r) + "\n" for r in records[n_eval:]))
    return str(out / "train.jsonl"), str(out / "eval.jsonl")


def run_fidelity_report(config_path: str | Path, svd_dir: str | Path, eval_data_path: str | Path, out_dir: str | Path,
                        settings: FidelitySettings = FidelitySettings()) -> FidelityReport:
    """Fidelity sweep (tau, budget, uniform) of extracted adapters on held-out records: ``fidelity.json`` and
    ``fidelity.png`` under ``out_dir``. Loads the config's base and fine-tuned models (both in memory)."""
    config = load_rank_config(config_path)
    identity = config["analysis_metadata"]["checkpoints"]
    base_dir, ft_dir = identity["pretrained"]["path"], identity["finetuned"]["path"]
    base, tokenizer = load_model(base_dir)
    finetuned, _ = load_model(ft_dir)
    basis = DeltaBasis(CheckpointPair(base_dir, ft_dir), modules_from_config(config))
    allocation = allocation_settings_of(config)
    points = fidelity_sweep(base, finetuned, basis, load_spectra(spectra_files(svd_dir)),
                            eval_examples(eval_data_path, tokenizer, settings.eval_samples), tokenizer.pad_token_id,
                            taus=settings.taus, min_rank=allocation.min_rank, max_rank=allocation.max_rank)
    rows = [{**{k: v for k, v in asdict(p).items() if k != "ranks"}, "loss_difference": p.loss_difference}
            for p in points]
    out = Path(out_dir)
    json_path = atomic_write_json(out / "fidelity.json", {"points": rows, "eval_data": str(eval_data_path),
                                                          "eval_samples": settings.eval_samples})
    return FidelityReport(str(json_path), write_fidelity_plot(out, points), rows)


def write_allocation_configs(config_path: str | Path, svd_dir: str | Path, out_dir: str | Path) -> dict[str, str]:
    """uniform / energy / budget rank configs at (about) the analysis config's parameter count, written as
    ``<out_dir>/<label>.json``; returns their paths by label."""
    config = load_rank_config(config_path)
    configs = allocation_configs(modules_from_config(config), load_spectra(spectra_files(svd_dir)),
                                 config["base_parameters"], allocation_settings_of(config),
                                 extra_metadata={"curvature": config["analysis_metadata"].get("curvature", {})})
    return {label: str(save_rank_config(Path(out_dir) / f"{label}.json", cfg)) for label, cfg in configs.items()}


def evaluate_adapter(base_model: str | Path, adapter_dir: str | Path, eval_data_path: str | Path,
                     eval_samples: int = 200) -> float:
    """Held-out loss (nats per response token) of base + adapter on a seeded sample of ``eval_data_path``."""
    from ..model import load_peft_checkpoint

    model, tokenizer = load_peft_checkpoint(base_model, adapter_dir)
    return held_out_loss(model, eval_examples(eval_data_path, tokenizer, eval_samples), tokenizer.pad_token_id)


def comparison_report(layout: ComparisonLayout, configs: dict[str, str], runs: Sequence[tuple[str, int]],
                      losses: Sequence[float], details: dict) -> ComparisonReport:
    """Rows (mean +- std of the held-out loss over seeds, per allocation), ``results.json`` and ``comparison.png``.

    ``runs`` and ``losses`` are parallel: (allocation label, seed) and its held-out loss; ``details`` is recorded
    in results.json beside the rows (data paths, steps, ...).
    """
    rows = []
    for label, path in configs.items():
        values = [loss for (run_label, _), loss in zip(runs, losses) if run_label == label]
        seeds = [seed for run_label, seed in runs if run_label == label]
        mean, std = mean_and_std(values)
        rows.append({"allocation": label, "trainable_parameters": load_rank_config(path)["trainable_parameters"],
                     "loss_mean": mean, "loss_std": std, "losses": values, "seeds": seeds})
    results = atomic_write_json(layout.results_path, {"rows": rows, **details})
    return ComparisonReport(str(results), write_comparison_plot(layout.root, rows), rows)
