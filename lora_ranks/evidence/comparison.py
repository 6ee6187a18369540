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

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._io import atomic_write_json, atomic_write_text
from ..analysis import (
    Layout,
    OutputLayout,
    config_curvature_roots,
    dense_roots,
    input_weighted_spectra,
    load_spectra,
    spectra_files,
)
from ..checkpoints import CheckpointPair
from ..config import load_rank_config, save_rank_config
from ..data import load_records, tokenize_record
from ..loading import load_model
from ..plots import write_comparison_plot, write_curves_plot, write_fidelity_plot, write_sensitivity_plot
from ..settings import ComparisonSettings, FidelitySettings, FinetuneSettings, NoiseEstimate
from ..spectra import SpectrumKind
from ..spectra.weighted import factor_root
from .allocations import allocation_configs
from .experiment import budget_matrix_configs, config_from_ranks, paired_comparison, with_alpha_policy
from .fidelity import DeltaBasis, fidelity_sweep, fidelity_to, held_out_loss, mean_and_std, reference_outputs
from .sensitivity import module_sensitivities, spearman

__all__ = ["ComparisonLayout", "FidelityReport", "FidelityTable", "ComparabilityReport", "ComparisonReport",
           "eval_examples", "split_records", "run_fidelity_report", "write_allocation_configs", "allocation_fidelity",
           "comparability_check", "evaluate_adapter", "comparison_report", "preparation_of", "split_validation"]


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


@dataclass
class ComparisonReport:
    """Where the comparison's results are, and its rows (one per allocation: loss mean, std, per seed)."""

    results_path: str
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
    from ..data import DataError, subset_size

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
    import hashlib

    from ..checkpoints import Checkpoint, resolve_model_path

    parts: list = [Checkpoint(resolve_model_path(finetuned_model)).header_fingerprint() if finetuned_model else None]
    for item in settings:
        data = item.key_dict()
        if isinstance(item, ComparisonSettings):  # only what shapes the configs and their preparation
            data = {k: data[k] for k in ("budget_ranks", "allocations", "alpha_variants", "seeded_preparation")}
        parts.append(data)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


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
    import hashlib

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
    from ..finetune import run_preliminary_finetune

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
    from ..model import load_peft_checkpoint

    model, tokenizer = load_peft_checkpoint(base_model, adapter_dir)
    return held_out_loss(model, _held_out(eval_data_path, tokenizer, settings), tokenizer.pad_token_id)


def preparation_of(analysis_config_path: str | Path, layout: ComparisonLayout, n: int) -> dict:
    """What lora-ranks spent before its rows' first LoRA step (``compute.lora_ranks_preparation``): FLOPs of the
    brief fine-tune (its ``training_metrics.json`` beside the fine-tuned folder), of the split-half fine-tunes when
    the analysis ran them, and of the curvature passes; and ``seconds``, the fine-tunes' recorded seconds plus the
    analysis' (an estimate: the flow's analysis clock starts before its fine-tune, so this can count the fine-tune
    twice, and the warm start's extraction is left out; ``compare`` replaces it by the wall time it measures around
    the whole preparation)."""
    from .compute import lora_ranks_preparation

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
    diverged = [r for r in results if getattr(r, "diverged", False)]
    results = [r for r in results if not getattr(r, "diverged", False)]
    by_run = {(r.label, r.init, r.seed): r for r in results}
    inits = list(dict.fromkeys(r.init for r in results))
    metadata = {label: load_rank_config(path) for label, path in configs.items() if Path(path).is_file()}
    labels = list(dict.fromkeys([*configs, *(r.label for r in results)]))

    def budget_of(label: str) -> int | None:
        if label in metadata:
            return metadata[label].analysis_metadata.budget_rank
        return next((r.budget_rank for r in results if r.label == label), None)

    def allocation_of(label: str) -> str | None:
        if label in metadata:
            return metadata[label].analysis_metadata.allocation
        return next((r.allocation for r in results if r.label == label), None)

    def parameters_of(label: str) -> float:
        if label in metadata:
            return metadata[label].trainable_parameters
        return _mean([r.trainable_parameters for r in results if r.label == label and r.init in ("warm", "cold")]
                     or [0])

    def uniform_of(label: str) -> str:
        r = budget_of(label)
        if r is not None:
            return f"r{r}-uniform"
        if "uniform" in labels or label == "uniform":
            return "uniform"
        # a budget of its own (the signal rule): the uniform ranks of the budget closest in parameters
        uniforms = [u for u in labels if allocation_of(u) == "uniform"]
        own = parameters_of(label)
        return min(uniforms, key=lambda u: abs(parameters_of(u) - own), default="uniform")

    def per_seed(label: str, init: str) -> dict[int, float]:
        return {seed: r.loss for (run_label, run_init, seed), r in by_run.items() if (run_label, run_init) == (label, init)}

    def paired_to(label: str, init: str, other: tuple[str, str]) -> dict | None:
        mine, reference = per_seed(label, init), per_seed(*other)
        paired = [s for s in sorted(mine) if s in reference]
        if len(paired) < 2 or (label, init) == other:
            return None
        return _finite(paired_comparison([mine[s] for s in paired], [reference[s] for s in paired]))

    per_seed_preparation = (preparation if preparation and "total" not in preparation else
                            None if preparation is None else {None: preparation})

    def preparation_for(seeds: Sequence[int], key: str) -> float | None:
        if per_seed_preparation is None:
            return None
        values = [(per_seed_preparation.get(s) or per_seed_preparation.get(str(s)) or per_seed_preparation.get(None)
                   or {}).get(key) for s in seeds]
        return None if any(v is None for v in values) else _mean(values)

    full_mean = mean_and_std(list(full_finetune.values()))[0] if full_finetune else None
    rows = []
    for label in labels:
        for init in inits:
            runs = [by_run[key] for key in sorted(by_run) if key[:2] == (label, init)]
            if not runs:
                continue
            seeds = [r.seed for r in runs]
            mean, std = mean_and_std([r.loss for r in runs])
            cold_uniform = per_seed(uniform_of(label), "cold")
            gap = None
            if full_mean is not None and cold_uniform:
                baseline = mean_and_std(list(cold_uniform.values()))[0]
                gap = (baseline - mean) / (baseline - full_mean) if baseline != full_mean else None
            peer = init not in ("warm", "cold")
            plain_lora = init == "cold" and (allocation_of(label) or label) == "uniform"
            # None when lora-ranks' preparation is unknown (a pair fine-tuned elsewhere): not counted as free
            own_prep = (_mean([r.preparation_flops for r in runs]) if peer else 0.0 if plain_lora
                        else preparation_for(seeds, "total"))
            own_seconds = 0.0 if peer or plain_lora else preparation_for(seeds, "seconds")
            accuracies = [r.accuracy for r in runs if r.accuracy is not None]
            accuracy_mean, accuracy_se = None, None
            if accuracies:
                accuracy_mean = _mean(accuracies)
                accuracy_se = (mean_and_std(accuracies)[1] / math.sqrt(len(accuracies)) if len(accuracies) > 1 else
                               math.sqrt(accuracy_mean * (1 - accuracy_mean) / max(1, runs[0].accuracy_n)))
            tasks = sorted({t for r in runs for t in getattr(r, "accuracy_by_task", {})})
            by_task = {t: _mean([r.accuracy_by_task[t][0] / r.accuracy_by_task[t][1] for r in runs
                                 if t in r.accuracy_by_task and r.accuracy_by_task[t][1]]) for t in tasks}
            reference_default = (uniform_of(label), "default" if per_seed(uniform_of(label), "default") else "cold")
            rows.append({"allocation": label, "method": init if peer else (allocation_of(label) or label),
                         "budget_rank": budget_of(label), "init": init,
                         "trainable_parameters": round(_mean([r.trainable_parameters for r in runs])),
                         "learning_rate": runs[0].learning_rate,
                         "loss_mean": mean, "loss_std": std, "losses": [r.loss for r in runs], "seeds": seeds,
                         "vs_uniform": paired_to(label, init, (uniform_of(label), reference_init)),
                         "vs_default": paired_to(label, init, reference_default),
                         "gap_closed": gap, "accuracy_mean": accuracy_mean, "accuracy_se": accuracy_se,
                         "accuracy_by_task": by_task,
                         "train_flops": _mean([r.train_flops for r in runs]), "preparation_flops": own_prep,
                         "preparation_seconds": own_seconds,
                         "seconds": _mean([r.seconds for r in runs]),
                         "served_rank_factor": runs[0].served_rank_factor,
                         "diverged_seeds": sorted(r.seed for r in diverged if (r.label, r.init) == (label, init)),
                         "curve": _mean_curve(runs, own_prep),
                         "runs": [_run_summary(r) for r in runs]})
    if full_finetune:
        seeds = sorted(full_finetune)
        mean, std = mean_and_std([full_finetune[s] for s in seeds])
        base_parameters = next(iter(metadata.values())).base_parameters if metadata else None
        rows.append({"allocation": "full-finetune", "method": "full-finetune", "budget_rank": None, "init": "full",
                     "trainable_parameters": base_parameters, "loss_mean": mean, "loss_std": std,
                     "losses": [full_finetune[s] for s in seeds], "seeds": seeds, "vs_uniform": None, "gap_closed": 1.0})
    results_path = atomic_write_json(layout.results_path, {"rows": rows, "reference_init": reference_init,
                                                           "preparation": _json_keys(preparation), **details})
    if any(row.get("curve") for row in rows):
        write_curves_plot(layout.curves_plot_path, rows)
    return ComparisonReport(str(results_path), write_comparison_plot(layout.comparison_plot_path, rows), rows)


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
