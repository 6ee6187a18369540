"""The comparison's checks of its configs before any LoRA trains: each config's extracted adapter against the
fine-tuned model (``allocation_fidelity``), whether loss-aware spectra predict what truncating a module costs
(``comparability_check``), and the full fine-tune and adapter references (``full_finetune_loss``,
``evaluate_adapter``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._io import atomic_write_json
from ..analysis import (
    config_curvature_roots,
    dense_roots,
)
from ..checkpoints import CheckpointPair
from ..config import load_rank_config
from ..data import load_records
from ..finetune import run_preliminary_finetune
from ..loading import load_model
from ..model import load_peft_checkpoint
from ..plots import write_sensitivity_plot
from ..settings import ComparisonSettings, FidelitySettings, FinetuneSettings
from ..spectra import SpectrumKind
from ..spectra.weighted import factor_root
from .comparison import ComparisonLayout, _held_out
from .fidelity import DeltaBasis, fidelity_to, held_out_loss, reference_outputs
from .sensitivity import module_sensitivities, spearman

__all__ = ["FidelityTable", "ComparabilityReport", "allocation_fidelity", "comparability_check",
           "full_finetune_loss", "evaluate_adapter"]


@dataclass
class FidelityTable:
    """The compared configs' fidelity (``allocation_fidelity``): where it is, the ceiling KL, a row per config and
    truncation."""

    json_path: str
    ceiling_kl: float
    rows: list[dict]


@dataclass
class ComparabilityReport:
    """The comparability check (``comparability_check``): where it is, its plot, Spearman per spectrum."""

    json_path: str
    plot_path: str
    spearman: dict[str, float]


def allocation_fidelity(analysis_config_path: str | Path, configs: dict[str, str], eval_data_path: str | Path,
                        layout: ComparisonLayout, settings: FidelitySettings) -> FidelityTable:
    """KL(fine-tuned || base + merged extracted adapter) of every compared config (label -> path, made by
    ``write_allocation_configs`` from the analysis config at ``analysis_config_path``), on held-out records.

    Each config is measured with the plain truncated SVD ("weight") and, when its analysis recorded curvature
    factors, with the matching loss-aware truncation (the one warm starts use). ``ceiling`` is the KL of full-rank
    deltas on the analyzed modules: what the adapted modules can carry at all. ``excess_ratio`` of a row is its
    KL above the ceiling over that of uniform ranks at the same budget with the plain truncation (< 1: closer to the
    fine-tune than uniform ranks). Writes ``layout.allocation_fidelity_path``, with a digest of its inputs: a
    resumed comparison whose configs, records and settings are unchanged reuses it. Holds every module's full SVD
    in memory (``DeltaBasis``): for the small models of experiments.
    """
    key = _fidelity_key(analysis_config_path, configs, eval_data_path, settings)
    previous = _read_json(layout.allocation_fidelity_path)
    if previous is not None and previous.get("key") == key:
        return FidelityTable(str(layout.allocation_fidelity_path), previous["ceiling_kl"], previous["rows"])
    analysis = load_rank_config(analysis_config_path)
    loaded = {label: load_rank_config(path) for label, path in configs.items()}
    pair_dirs = analysis.checkpoints.pretrained.path, analysis.checkpoints.finetuned.path
    modules = analysis.module_refs()
    base, tokenizer = load_model(pair_dirs[0], dtype=torch.float32)
    finetuned, _ = load_model(pair_dirs[1], dtype=torch.float32)
    reference = reference_outputs(finetuned, _held_out(eval_data_path, tokenizer, settings),
                                  tokenizer.pad_token_id)
    del finetuned
    roots = config_curvature_roots(analysis, modules)
    roots = None if roots is None else dense_roots(roots, "the allocation fidelity")
    bases = {SpectrumKind.WEIGHT: DeltaBasis(CheckpointPair(*pair_dirs), modules)}
    if roots is not None:
        bases[analysis.spectrum_kind] = DeltaBasis(CheckpointPair(*pair_dirs), modules, roots)
    ceiling = fidelity_to(reference, bases[SpectrumKind.WEIGHT].apply(base, {m.name: min(m.shape) for m in modules}))[0]
    rows = []
    for label, config in loaded.items():
        meta = config.analysis_metadata
        for truncation, basis in bases.items():
            kl = fidelity_to(reference, basis.apply(base, config.ranks))[0]
            rows.append({"allocation": label, "method": meta.allocation or label,
                         "budget_rank": meta.budget_rank, "truncation": str(truncation),
                         "trainable_parameters": config.trainable_parameters, "kl": kl, "excess": kl - ceiling})
    uniform_excess = {row["budget_rank"]: row["excess"] for row in rows
                      if row["method"] == "uniform" and row["truncation"] == "weight"}
    for row in rows:
        denominator = uniform_excess.get(row["budget_rank"])
        row["excess_ratio"] = row["excess"] / denominator if denominator else None
    path = atomic_write_json(layout.allocation_fidelity_path,
                             {"ceiling_kl": ceiling, "rows": rows, "eval_data": str(eval_data_path),
                              "eval_samples": settings.eval_samples, "key": key})
    return FidelityTable(str(path), ceiling, rows)


def _fidelity_key(analysis_config_path, configs: dict[str, str], eval_data_path, settings: FidelitySettings) -> str:
    """A digest of what ``allocation_fidelity`` measures: the analysis config (it names the pair and records its
    spectra), every compared config's file, the held-out records and the settings."""
    digest = hashlib.sha256(json.dumps([sorted(configs), settings.to_dict()], sort_keys=True, default=str).encode())
    for path in (analysis_config_path, *(configs[label] for label in sorted(configs)), eval_data_path):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def comparability_check(config_path: str | Path, eval_data_path: str | Path, layout: ComparisonLayout,
                        settings: ComparisonSettings, fidelity: FidelitySettings) -> ComparabilityReport:
    """Are the spectra comparable across modules? Truncate each module alone to ``settings.comparability_rank`` in
    the fine-tuned model and measure the KL it adds on ``settings.comparability_records`` held-out records;
    Spearman of predicted vs measured, per spectrum: the weight spectrum's discarded energy, and with a Fisher
    analysis also the input-weighted and the Fisher prediction (½ T / T_resp times the discarded weighted energy,
    ``evidence.sensitivity``). Writes ``sensitivity.json`` and the scatter plot ``sensitivity.png`` where ``layout``
    puts them. Costs one forward pass over the records per module and spectrum."""
    eval_samples, rank = settings.comparability_records, settings.comparability_rank
    config = load_rank_config(config_path)
    pair_dirs = config.checkpoints.pretrained.path, config.checkpoints.finetuned.path
    modules = config.module_refs()
    finetuned, tokenizer = load_model(pair_dirs[1], dtype=torch.float32)
    examples = _held_out(eval_data_path, tokenizer, fidelity, limit=eval_samples)
    curvature = config.analysis_metadata.curvature
    kind = config.spectrum_kind
    bases = {"weight": (None, 1.0)}
    roots = config_curvature_roots(config, modules)  # the factors' roots, once
    roots = None if roots is None else dense_roots(roots, "the comparability check")
    if roots is not None and kind.needs_output_factor:
        shapes = {m.name: m.shape for m in modules}
        bases["input"] = ({name: (factor_root(None, shapes[name][0], 0.0), a) for name, (_, a) in roots.items()},
                          1.0)
        bases["fisher"] = (roots, 0.5 * curvature.tokens / curvature.response_tokens)
    elif roots is not None:
        bases[str(kind)] = (roots, 1.0)
    result = {}
    for name, (roots, scale) in bases.items():
        rows = module_sensitivities(finetuned, DeltaBasis(CheckpointPair(*pair_dirs), modules, roots), examples,
                                    tokenizer.pad_token_id, rank=rank, scale=scale)
        result[name] = {"spearman": spearman([r.predicted for r in rows], [r.measured_kl for r in rows]),
                        "rows": [asdict(r) for r in rows]}
    path = atomic_write_json(layout.sensitivity_path, {"rank": rank, "eval_samples": eval_samples,
                                                                   "spectra": result})
    return ComparabilityReport(str(path), write_sensitivity_plot(layout.sensitivity_plot_path, result),
                               {name: v["spearman"] for name, v in result.items()})


def full_finetune_loss(base_model: str | Path, train_path: str | Path, eval_data_path: str | Path, out_dir: str | Path,
                       settings: FinetuneSettings, fidelity: FidelitySettings,
                       validation_data_path: str | Path | None = None) -> float | tuple[float, float]:
    """Fine-tune every parameter on all of ``train_path`` (``settings``: steps, batch, learning rate, seed) and
    return the held-out loss of the result (the reference of the comparison's gap closed); with
    ``validation_data_path``, (held-out loss, validation loss) for the learning-rate choice."""
    n_records = len(load_records(train_path))
    every_record = settings.replace(subset_ratio=1.0, max_samples=n_records)
    result = run_preliminary_finetune(base_model, train_path, out_dir, every_record, progress=False)
    model, tokenizer = load_model(result.finetuned_dir)
    loss = held_out_loss(model, _held_out(eval_data_path, tokenizer, fidelity), tokenizer.pad_token_id)
    if validation_data_path is None:
        return loss
    return loss, held_out_loss(model, _held_out(validation_data_path, tokenizer, fidelity), tokenizer.pad_token_id)


def evaluate_adapter(base_model: str | Path, adapter_dir: str | Path, eval_data_path: str | Path,
                     settings: FidelitySettings) -> float:
    """Held-out loss (nats per response token) of base + adapter on a seeded sample of ``eval_data_path``."""
    model, tokenizer = load_peft_checkpoint(base_model, adapter_dir)
    return held_out_loss(model, _held_out(eval_data_path, tokenizer, settings), tokenizer.pad_token_id)
