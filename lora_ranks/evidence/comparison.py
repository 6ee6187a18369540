"""The evidence as files: the fidelity report of an analysis, and the allocation comparison's steps and results.

Each function here is what one Prefect task of ``svd-analysis`` or ``compare-allocations`` calls; they read and
write files under the layouts below and return small picklable values.

Comparison layout under one root::
    <root>/data/{train,eval}.jsonl           # the held-out split (when no eval data is given)
    <root>/demo_inputs/                      # the offline demo's model and data, when used
    <root>/analysis/...                      # an OutputLayout: the svd-analysis run on the train records
    <root>/warm/<allocation>/                # the adapter extracted at each config's ranks (the warm start)
    <root>/configs/<allocation>.json         # uniform, energy, budget; or r<r>-uniform, r<r>-budget-fisher, ...
    <root>/runs/<allocation>-seed<seed>/     # adapter/ and training_metrics.json of every trained LoRA
    <root>/runs/<allocation>-cold-seed<seed>/  # the cold baseline's (comparison.cold_baseline)
    <root>/runs/full-finetune-seed<seed>/    # the full fine-tune reference's (comparison.full_finetune)
    <root>/allocation_fidelity.json          # with budget ranks: each config's KL to the fine-tuned model
    <root>/sensitivity.json, sensitivity.png  # with comparability: predicted vs measured KL per module
    <root>/results.json, <root>/comparison.png, <root>/curves.png (with curve_points)
    <root>/data/{fit,validation}.jsonl       # with learning_rates or early stopping: the training records less a
                                             #   validation split (carved before the analysis)
    <root>/seeds/seed<seed>/{analysis,configs,warm}/  # with seeded_preparation: each seed's own preparation
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .._io import atomic_write_json, atomic_write_text
from ..analysis import (
    Layout,
    OutputLayout,
    input_weighted_spectra,
    load_spectra,
    spectra_files,
)
from ..checkpoints import Checkpoint, CheckpointPair, resolve_model_path
from ..config import load_rank_config, save_rank_config
from ..data import DataError, load_records, subset_size, tokenize_record
from ..devices import precision_key
from ..loading import load_model
from ..plots import write_fidelity_plot
from ..settings import ComparisonSettings, FidelitySettings, FinetuneSettings, NoiseEstimate
from ..spectra import SpectrumKind
from .allocations import allocation_configs
from .experiment import budget_matrix_configs, config_from_ranks, with_alpha_policy
from .fidelity import DeltaBasis, fidelity_sweep

__all__ = ["ComparisonLayout", "FidelityReport", "eval_examples", "split_records", "run_fidelity_report",
           "write_allocation_configs", "split_validation", "check_comparison_data", "expected_labels",
           "design_digest"]


@dataclass(frozen=True)
class ComparisonLayout(Layout):
    """The folders and files of one ``compare-allocations`` run (see the module docstring)."""

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

    @property
    def comparison_plot_path(self) -> Path:
        return self.root / "comparison.png"

    @property
    def curves_plot_path(self) -> Path:
        """Held-out loss against total FLOPs (preparation + training), one panel per budget."""
        return self.root / "curves.png"

    @property
    def validation_data_path(self) -> Path:
        """The validation split carved from the training records (learning-rate choice)."""
        return self.data_dir / "validation.jsonl"

    @property
    def fit_data_path(self) -> Path:
        """The training records less the validation split: what LoRAs train on when learning rates are chosen."""
        return self.data_dir / "fit.jsonl"

    @property
    def demo_inputs_dir(self) -> Path:
        return self.root / "demo_inputs"

    @property
    def train_data_path(self) -> Path:
        """The records LoRAs train on (the analysis pair too), when no eval data is given."""
        return self.data_dir / "train.jsonl"

    @property
    def eval_data_path(self) -> Path:
        """The held-out records, when no eval data is given."""
        return self.data_dir / "eval.jsonl"

    def config_path(self, label: str) -> Path:
        return self.configs_dir / f"{label}.json"

    def warm_adapter_dir(self, label: str) -> Path:
        """The adapter extracted from the analysis pair at config ``label``'s ranks: the warm start of its runs."""
        return self.root / "warm" / label

    @property
    def allocation_fidelity_path(self) -> Path:
        return self.root / "allocation_fidelity.json"

    @property
    def sensitivity_path(self) -> Path:
        return self.root / "sensitivity.json"

    @property
    def sensitivity_plot_path(self) -> Path:
        return self.root / "sensitivity.png"

    def seed_layout(self, seed: int) -> ComparisonLayout:
        """The preparation of one seed (``seeded_preparation``): its analysis, configs and warm starts."""
        return ComparisonLayout(self.root / "seeds" / f"seed{seed}")


@dataclass
class FidelityReport:
    """Where the fidelity report is, and its rows (one per allocation measured)."""

    json_path: str
    plot_path: str
    rows: list[dict]


def eval_examples(data_path: str | Path, tokenizer, limit: int, max_length: int, seed: int = 0) -> list[dict]:
    """A seeded sample of ``limit`` records of ``data_path``, tokenized to at most ``max_length`` tokens with
    response-only labels."""
    records = load_records(data_path)
    random.Random(seed).shuffle(records)
    return [tokenize_record(r, tokenizer, max_length) for r in records[:limit]]


def _held_out(data_path: str | Path, tokenizer, settings: FidelitySettings, limit: int | None = None) -> list[dict]:
    """The held-out records the evidence evaluates on (``settings.eval_samples`` of them unless ``limit``)."""
    return eval_examples(data_path, tokenizer, limit or settings.eval_samples, settings.eval_max_length)


def split_validation(train_path: str | Path, layout: ComparisonLayout, fraction: float, seed: int = 0) -> tuple[str, str]:
    """Carve a validation split from the training records (seeded): (fit path, validation path), a partition."""
    records = load_records(train_path)
    random.Random(seed).shuffle(records)
    n_validation = max(1, int(len(records) * fraction))
    if n_validation >= len(records):
        raise ValueError(f"{train_path} has {len(records)} record(s): too few to carve a validation split from")
    atomic_write_text(layout.validation_data_path, "".join(json.dumps(r) + "\n" for r in records[:n_validation]))
    atomic_write_text(layout.fit_data_path, "".join(json.dumps(r) + "\n" for r in records[n_validation:]))
    return str(layout.fit_data_path), str(layout.validation_data_path)


def split_records(data_path: str | Path, layout: ComparisonLayout, eval_fraction: float, seed: int = 0) -> tuple[str, str]:
    """Shuffle records (seeded) into the train and eval files of ``layout``: a partition, so held-out records are never
    trained on. Returns (train path, eval path)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got eval_fraction={eval_fraction}")
    records = load_records(data_path)
    random.Random(seed).shuffle(records)
    n_eval = max(1, int(len(records) * eval_fraction))
    atomic_write_text(layout.eval_data_path, "".join(json.dumps(r) + "\n" for r in records[:n_eval]))
    atomic_write_text(layout.train_data_path, "".join(json.dumps(r) + "\n" for r in records[n_eval:]))
    return str(layout.train_data_path), str(layout.eval_data_path)


def run_fidelity_report(config_path: str | Path, layout: OutputLayout, eval_data_path: str | Path,
                        settings: FidelitySettings) -> FidelityReport:
    """Fidelity sweep (tau, budget, uniform) of extracted adapters on held-out records, from the analysis run at
    ``layout``: ``fidelity.json`` and ``fidelity.png`` where it puts them. Loads the config's base and fine-tuned
    models (both in memory)."""
    config = load_rank_config(config_path)
    base_dir, ft_dir = config.checkpoints.pretrained.path, config.checkpoints.finetuned.path
    base, tokenizer = load_model(base_dir)
    finetuned, _ = load_model(ft_dir)
    basis = DeltaBasis(CheckpointPair(base_dir, ft_dir), config.module_refs())
    allocation = config.allocation_settings
    points = fidelity_sweep(base, finetuned, basis, load_spectra(spectra_files(layout.svd_dir)),
                            _held_out(eval_data_path, tokenizer, settings), tokenizer.pad_token_id,
                            taus=settings.taus, min_rank=allocation.min_rank, max_rank=allocation.max_rank)
    rows = [{**{k: v for k, v in asdict(p).items() if k != "ranks"}, "loss_difference": p.loss_difference}
            for p in points]
    json_path = atomic_write_json(layout.fidelity_json_path, {"points": rows, "eval_data": str(eval_data_path),
                                                              "eval_samples": settings.eval_samples})
    return FidelityReport(str(json_path), write_fidelity_plot(layout.fidelity_plot_path, points), rows)


def write_allocation_configs(config_path: str | Path, layout: ComparisonLayout, budget_ranks: Sequence[int],
                             alpha_variants: Sequence[str] = ()) -> dict[str, str]:
    """The compared rank configs of the analysis at ``config_path`` (its spectra in ``layout.analysis``), written as
    ``layout.config_path(label)``; returns their paths by label.

    Without ``budget_ranks``: uniform / energy / budget at (about) the analysis config's parameter count. With them:
    at each budget r (the parameters of uniform rank r), uniform, energy-tau tuned to it, and water-filling on the
    weight spectrum and on every curvature-weighted spectrum the analysis' factors give (``budget_matrix_configs``):
    a Fisher analysis gives both the Fisher spectrum and the input-weighted one σ(ΔW A^1/2), from the same A
    factors. With them also ``signal``: each module's signal rank (of the analysis' noise estimate: the singular
    values of its weight spectrum above the noise floor, or the split-half rank), bounded to [1, max_rank]: a budget
    of its own. Every config records the analysis' curvature, so warm starts use its truncation. With
    ``alpha_variants`` (alpha policies: "constant", "rslora"), every config but uniform ranks is written again at
    each policy other than its own, at the same scale, labelled ``<label>-<policy>``.
    """
    config = load_rank_config(config_path)
    modules = config.module_refs()
    curvature = config.analysis_metadata.curvature
    files = spectra_files(layout.analysis.svd_dir)
    if not budget_ranks:
        split_half = {name: record.split_half_rank for name, record in config.modules.items()
                      if record.split_half_rank is not None} or None
        configs = allocation_configs(modules, load_spectra(files), config.base_parameters,
                                     config.allocation_settings, extra_metadata={"curvature": curvature},
                                     split_half=split_half)
    else:
        kind = config.spectrum_kind
        spectra = {SpectrumKind.WEIGHT: load_spectra(files, weight=True)}
        if kind.needs_output_factor:  # the same A factors give the input-weighted spectrum too
            spectra[SpectrumKind.INPUT] = input_weighted_spectra(config, modules, spectra[SpectrumKind.WEIGHT])
        if kind.weighted:
            spectra[kind] = load_spectra(files)
        settings = config.allocation_settings
        alpha_policy = config.alpha_policy
        # min_rank 1, not the configured one: a budget of uniform rank 2 is below min_rank 4 everywhere.
        configs = budget_matrix_configs(modules, spectra, budget_ranks, config.base_parameters,
                                        alpha_policy=alpha_policy, min_rank=1, max_rank=settings.max_rank,
                                        extra_metadata={"curvature": curvature})
        estimate = "split_half_rank" if settings.noise_estimate is NoiseEstimate.SPLIT_HALF else "signal_rank"
        signal = {name: max(1, min(settings.max_rank, getattr(record, estimate)))
                  for name, record in config.modules.items() if getattr(record, estimate) is not None}
        if len(signal) == len(modules):
            configs["signal"] = config_from_ranks(modules, signal, config.base_parameters,
                                                  spectra=spectra[SpectrumKind.WEIGHT],
                                                  alpha_policy=alpha_policy, min_rank=1, max_rank=settings.max_rank,
                                                  extra_metadata={"curvature": curvature, "allocation": "signal"})
    for label, cfg in list(configs.items()):
        if cfg.analysis_metadata.allocation == "uniform" or label == "uniform":
            continue
        for policy in alpha_variants:
            if policy != cfg.alpha_policy.policy:
                configs[f"{label}-{policy}"] = with_alpha_policy(cfg, cfg.alpha_policy.replace(policy=policy))
    return {label: str(save_rank_config(layout.config_path(label), cfg)) for label, cfg in configs.items()}


def check_comparison_data(data_path: str | Path, eval_data_path: str | Path | None,
                          validation_data_path: str | Path | None, comparison: ComparisonSettings,
                          finetune: FinetuneSettings | None) -> None:
    """What ``compare`` refuses before any work, in one line each (``DataError``): held-out (``eval_data_path``) or
    validation records that are also training records, or validation records that are also held out (compared as
    whole records); and, when the comparison fine-tunes (``finetune`` given), a brief fine-tune's stratified subset
    of fewer records than its batch (after the held-out and validation splits carved from ``data_path``)."""
    def keyed(path) -> dict[str, int]:
        return {json.dumps(r, sort_keys=True): i for i, r in enumerate(load_records(path), start=1)}

    train = keyed(data_path)
    held = keyed(eval_data_path) if eval_data_path else {}
    validation = keyed(validation_data_path) if validation_data_path else {}
    for flag, records, against, other in (("--eval-data", held, train, "--data"),
                                          ("--validation-data", validation, train, "--data"),
                                          ("--validation-data", validation, held, "--eval-data")):
        shared = [line for key, line in records.items() if key in against]
        if shared:
            path = eval_data_path if flag == "--eval-data" else validation_data_path
            raise DataError(f"{flag} shares {len(shared)} of its {len(records)} record(s) with {other} (e.g. "
                            f"{path}:{shared[0]}): records it evaluates on would be trained on (or held out twice); "
                            f"give {flag} records that are not in {other}")
    if finetune is None:
        return
    n = len(train)
    if not eval_data_path:
        n -= max(1, int(n * comparison.eval_fraction))
    if not validation_data_path and (comparison.learning_rates or comparison.full_learning_rates
                                     or comparison.early_stopping):
        n -= max(1, int(n * comparison.validation_fraction))
    tasks = {str(r.get(finetune.task_key, "default")) for r in load_records(data_path)}
    size = subset_size(max(n, 0), finetune.subset_ratio, finetune.max_samples, len(tasks))
    if size < finetune.batch_size:
        raise DataError(f"the brief fine-tune's subset would be {size} record(s) (--finetune-subset-ratio "
                        f"{finetune.subset_ratio:g} of the {n} training records, at most --finetune-max-samples "
                        f"{finetune.max_samples}), fewer than --finetune-batch-size {finetune.batch_size}: raise the "
                        "ratio or lower the batch")


def expected_labels(comparison: ComparisonSettings) -> list[str] | None:
    """The labels of the configs a comparison at ``comparison.budget_ranks`` trains, known before any analysis when
    its allocations are named (``r<r>-<allocation>``, then the alpha variants of each but uniform ranks); None
    when they depend on the analysis (no budget ranks, or every allocation)."""
    if not comparison.budget_ranks or not comparison.allocations or "signal" in comparison.allocations:
        return None
    if "budget" in comparison.allocations:
        return None
    labels = [f"r{r}-{a}" for r in comparison.budget_ranks for a in ("uniform", "energy", "budget-weight",
                                                                      "budget-input", "budget-fisher")
              if a in comparison.allocations]
    return labels + [f"{label}-{policy}" for label in labels if not label.endswith("-uniform")
                     for policy in comparison.alpha_variants]


def design_digest(finetuned_model: str | None, *settings) -> str:
    """A digest of what a comparison's preparation depends on besides the base model and the data (which the key
    of a committed row reads itself, ``runs.committed_key``): the given pair's fine-tuned side (its files' headers,
    not its path) and the settings objects (fine-tune, analysis, allocation, alpha, extraction, comparison). No
    path enters it, so a fresh clone elsewhere finds the rows committed here. The comparison's seeds, tuning and
    evaluation options are left out: a row's key carries its own seed, rate and evaluation."""

    parts: list = [Checkpoint(resolve_model_path(finetuned_model)).header_fingerprint() if finetuned_model else None]
    for item in settings:
        data = precision_key(item.key_dict())  # the fine-tune's precision as it runs here
        if isinstance(item, ComparisonSettings):  # only what shapes the configs and their preparation
            data = {k: data[k] for k in ("budget_ranks", "allocations", "alpha_variants", "seeded_preparation")}
        parts.append(data)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
