"""Reproducible CPU experiment: do data-driven ranks beat uniform ranks at equal parameters? (issue 18)

0. Base: a Qwen3 (6 layers, hidden 256) pretrained here on the Python standard library's source
   (``python -m lora_ranks.pretrain --preset experiment``; ~20 minutes on 2 cores, cached in ``<out>/base``).
1. Data: a distribution-shifted task mix from offline text (license prose, naming stdlib test functions from
   their docstrings, templated sort/count/reverse; ``lora_ranks.pretrain.shifted_task_mix``): 1,600 training and
   200 held-out records.
2. The analysis pair: a brief full fine-tune of the base on a stratified subset of the training records.
3. Spectra of its deltas: weight, input-weighted and Fisher-weighted (``analyze_checkpoints``), and each module's
   noise floor.
4. Allocations at three budgets (the parameters of uniform ranks 2, 4 and 8): uniform, energy-tau (tau tuned to the
   budget), water-filling on the weight / input / Fisher spectra; and the signal-rank rule at its own budget.
5. Fidelity: KL(fine-tuned || base + extracted adapter) on the held-out records, with the plain truncated SVD and
   with the matching loss-aware truncation; the ceiling is the KL left by full-rank deltas on the projections.
6. Comparability: truncate one module at a time to rank 2; predicted vs measured KL, Spearman per spectrum.
7. Training: a LoRA for every allocation, cold (PEFT's init) and warm (extracted from the analysis pair), on every
   seed, trained on all training records; held-out loss; a full fine-tune trained as long, per seed. Paired
   differences per seed against warm uniform ranks, mean +- std, t and p.

Every result is cached under ``<out>`` (one JSON per trained run): an interrupted run resumes where it stopped.
The library functions are those the ``lora-ranks finetune / analyze / extract / train`` commands run.

    .venv/bin/python benchmarks/experiment_allocations.py [--record] [--out outputs/experiment]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import emit  # noqa: E402

METHODS = ("uniform", "energy", "budget-weight", "budget-input", "budget-fisher")
MATCHING_TRUNCATION = {"budget-input": "input", "budget-fisher": "fisher"}  # others: the plain truncated SVD


def _setup(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _save(path: Path, obj) -> None:
    from lora_ranks._io import atomic_write_json

    atomic_write_json(path, obj)


def step_base(out: Path) -> Path:
    from lora_ranks.pretrain import PRESETS, pretrain_base

    base = out / "base"
    if not (base / "pretraining.json").is_file():
        pretrain_base(base, PRESETS["experiment"], progress=False)
    return base


def step_data(out: Path, n_eval: int = 200) -> tuple[Path, Path]:
    import random

    from lora_ranks.pretrain import shifted_task_mix

    train, evaluation = out / "data" / "train.jsonl", out / "data" / "eval.jsonl"
    if not train.is_file():
        from lora_ranks._io import atomic_write_text

        records = shifted_task_mix(600, seed=0)
        random.Random(1).shuffle(records)
        atomic_write_text(evaluation, "".join(json.dumps(r) + "\n" for r in records[:n_eval]))
        atomic_write_text(train, "".join(json.dumps(r) + "\n" for r in records[n_eval:]))
    return train, evaluation


def step_analysis_pair(out: Path, base: Path, train: Path, args) -> tuple[str, str]:
    from lora_ranks.finetune import run_preliminary_finetune
    from lora_ranks.settings import FinetuneSettings

    folder = out / "analysis-pair"
    if not (folder / "training_metrics.json").is_file():
        run_preliminary_finetune(base, train, folder, FinetuneSettings(
            subset_ratio=args.subset, max_steps=args.ft_steps, epochs=10**6, batch_size=8, learning_rate=args.ft_lr,
            max_length=96, gradient_checkpointing=False, seed=0), progress=False)
    metrics = _json(folder / "training_metrics.json")
    return metrics["pretrained_dir"], metrics["finetuned_dir"]


def step_spectra(out: Path, pair: tuple[str, str], train: Path, args) -> dict:
    from lora_ranks.analysis import analyze_checkpoints, load_spectra, spectra_files
    from lora_ranks.settings import AllocationSettings, CurvatureSettings, FinetuneSettings

    subset = FinetuneSettings(subset_ratio=args.subset, max_length=96, seed=0)
    configs, timings = {}, {}
    for kind in ("weight", "input", "fisher"):
        folder = out / "analysis" / kind
        config_path = folder / "configs" / "lora_rank_config.json"
        if not config_path.is_file():
            start = time.perf_counter()
            analyze_checkpoints(*pair, folder, settings=AllocationSettings(min_rank=1, max_rank=64, smoothing="none"),
                                curvature=CurvatureSettings(spectrum=kind), calibration_data=train, subset=subset)
            _save(folder / "seconds.json", {"seconds": time.perf_counter() - start})
        configs[kind] = _json(config_path)
        timings[kind] = _json(folder / "seconds.json")["seconds"]
    spectra = {kind: load_spectra(spectra_files(out / "analysis" / kind / "analysis_outputs" / "svd")) for kind in configs}
    return {"configs": configs, "spectra": spectra, "seconds": timings}


def rank_config(modules, ranks: dict, base_parameters: int, curvature: dict, label: str) -> dict:
    """A rank config for ``ranks`` (constant alpha = 2r), recording the curvature its truncation may use."""
    from lora_ranks.evidence.experiment import config_from_ranks

    return config_from_ranks(modules, ranks, base_parameters, extra_metadata={"allocation": label, "curvature": curvature})


def step_allocations(out: Path, analysis: dict, budgets: list[int]) -> dict:
    from lora_ranks.config import modules_from_config, save_rank_config
    from lora_ranks.evidence.experiment import allocations_at_budget, parameters_of

    weight_config = analysis["configs"]["weight"]
    modules = modules_from_config(weight_config)
    base_parameters = weight_config["base_parameters"]
    per_module = sum(m.shape[0] + m.shape[1] for m in modules)
    rows = {}
    for r in budgets:
        budget = r * per_module
        allocations = allocations_at_budget(modules, analysis["spectra"], budget, min_rank=1, max_rank=64)
        for method, ranks in allocations.items():
            rows[(method, r)] = ranks
    signal = {name: max(1, min(64, m["signal_rank"])) for name, m in weight_config["analysis_metadata"]["modules"].items()}
    rows[("signal", 0)] = signal
    paths = {}
    for (method, r), ranks in rows.items():
        for truncation in ("weight", "input", "fisher"):
            curvature = analysis["configs"][truncation]["analysis_metadata"]["curvature"]
            label = f"{method}-r{r}-{truncation}"
            path = out / "configs" / f"{label}.json"
            if not path.is_file():
                save_rank_config(path, rank_config(modules, ranks, base_parameters, curvature, label))
            paths[(method, r, truncation)] = str(path)
    return {"ranks": rows, "paths": paths, "modules": modules, "base_parameters": base_parameters,
            "parameters": {key: parameters_of(modules, ranks) for key, ranks in rows.items()}}


def _roots(out: Path, kind: str, modules, analysis: dict):
    """Damped curvature roots of every module for a weighted basis (None for the weight spectrum)."""
    if kind == "weight":
        return None
    from lora_ranks.analysis import curvature_roots
    from lora_ranks.analysis.layout import layer_file

    folder = out / "analysis" / kind / "analysis_outputs" / "svd"
    damping = analysis["configs"][kind]["analysis_metadata"]["curvature"]["settings"]["curvature_damping"]
    roots = {}
    for layer in dict.fromkeys(m.layer for m in modules):
        roots.update(curvature_roots([m for m in modules if m.layer == layer], layer_file(folder, layer, "curvature"),
                                     damping)[0])
    return roots


def step_fidelity(out: Path, pair, eval_path: Path, analysis: dict, allocations: dict) -> dict:
    """KL of base + merged extracted adapter to the analysis fine-tune, per allocation and truncation."""
    cached = _json(out / "fidelity.json")
    if cached is not None:
        return cached
    import torch

    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.evidence import DeltaBasis, eval_examples, fidelity_to, reference_outputs
    from lora_ranks.loading import load_model

    base, tokenizer = load_model(pair[0], dtype=torch.float32)
    finetuned, _ = load_model(pair[1], dtype=torch.float32)
    reference = reference_outputs(finetuned, eval_examples(eval_path, tokenizer, 200), tokenizer.pad_token_id)
    modules = allocations["modules"]
    bases = {kind: DeltaBasis(CheckpointPair(*pair), modules, _roots(out, kind, modules, analysis))
             for kind in ("weight", "input", "fisher")}
    full = {m.name: min(m.shape) for m in modules}
    ceiling = fidelity_to(reference, bases["weight"].apply(base, full))[0]
    rows = []
    for (method, r), ranks in allocations["ranks"].items():
        truncations = {"weight"} | ({MATCHING_TRUNCATION[method]} if method in MATCHING_TRUNCATION else set())
        if method == "uniform":
            truncations |= {"input", "fisher"}
        for truncation in sorted(truncations):
            kl = fidelity_to(reference, bases[truncation].apply(base, ranks))[0]
            rows.append({"method": method, "budget_rank": r, "truncation": truncation, "kl": kl,
                         "excess": kl - ceiling, "parameters": allocations["parameters"][(method, r)]})
    result = {"ceiling_kl": ceiling, "rows": rows}
    _save(out / "fidelity.json", result)
    return result


def step_sensitivity(out: Path, pair, eval_path: Path, analysis: dict, allocations: dict) -> dict:
    """Truncate each module alone to rank 2: predicted (discarded energy) vs measured KL, per spectrum."""
    cached = _json(out / "sensitivity.json")
    if cached is not None:
        return cached
    import torch

    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.evidence import DeltaBasis, eval_examples, module_sensitivities, spearman
    from lora_ranks.loading import load_model

    finetuned, tokenizer = load_model(pair[1], dtype=torch.float32)
    examples = eval_examples(eval_path, tokenizer, 64)  # 126 one-module truncations: 64 records keep it to minutes
    modules = allocations["modules"]
    result = {}
    for kind in ("weight", "input", "fisher"):
        record = analysis["configs"][kind]["analysis_metadata"]["curvature"]
        scale = 0.5 * record["tokens"] / record["response_tokens"] if kind == "fisher" else 1.0
        rows = module_sensitivities(finetuned, DeltaBasis(CheckpointPair(*pair), modules, _roots(out, kind, modules, analysis)),
                                    examples, tokenizer.pad_token_id, rank=2, scale=scale)
        result[kind] = {"spearman": spearman([r.predicted for r in rows], [r.measured_kl for r in rows]),
                        "rows": [r.__dict__ for r in rows]}
    _save(out / "sensitivity.json", result)
    return result


class Trainer:
    """Trains and evaluates LoRAs in-process with the library's own pieces (``create_peft_model_from_config``,
    PEFT's adapter loading for warm starts, ``train_loop``, ``held_out_loss``: what ``lora-ranks train`` runs), with
    the base model loaded and the records tokenized once, since the runs differ only in ranks, init and seed."""

    def __init__(self, base: str, train: Path, eval_path: Path):
        import torch

        from lora_ranks.evidence import eval_examples
        from lora_ranks.finetune import prepare_examples
        from lora_ranks.loading import load_model

        self.base, self.tokenizer = load_model(base, dtype=torch.float32)
        self.train_examples = prepare_examples(train, self.tokenizer, max_length=96)[0]
        self.eval_examples = eval_examples(eval_path, self.tokenizer, 200)

    def lora(self, config_path: str, seed: int, init_from: Path | None, args) -> tuple[float, int]:
        """(held-out loss, trainable parameters) of one LoRA run."""
        import copy

        import torch
        from peft import PeftModel

        from lora_ranks.evidence import held_out_loss
        from lora_ranks.finetune import train_loop
        from lora_ranks.model import DynamicLoRAConfig, create_peft_model_from_config, validate_peft_model
        from lora_ranks.settings import LoRATrainingSettings

        config = DynamicLoRAConfig.from_file(config_path, lora_dropout=0.0)
        torch.manual_seed(seed)
        model = copy.deepcopy(self.base)
        if init_from is None:
            model = create_peft_model_from_config(model, config)
        else:
            model = PeftModel.from_pretrained(model, str(init_from), is_trainable=True)
            validate_peft_model(model, config)
        settings = LoRATrainingSettings(max_steps=args.lora_steps, epochs=10**6, batch_size=8, learning_rate=args.lora_lr,
                                        max_length=96, gradient_checkpointing=False, seed=seed, lora_dropout=0.0)
        model.train()
        train_loop(model, self.train_examples, self.tokenizer.pad_token_id, settings, torch.device("cpu"), progress=False)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return held_out_loss(model, self.eval_examples, self.tokenizer.pad_token_id), trainable

    def full(self, seed: int, args) -> float:
        """Held-out loss of a full fine-tune trained as long as the LoRAs, on the same records."""
        import copy

        import torch

        from lora_ranks.evidence import held_out_loss
        from lora_ranks.finetune import train_loop
        from lora_ranks.settings import TrainingSettings

        torch.manual_seed(seed)
        model = copy.deepcopy(self.base)
        model.train()
        settings = TrainingSettings(max_steps=args.lora_steps, epochs=10**6, batch_size=8, learning_rate=args.full_lr,
                                    max_length=96, gradient_checkpointing=False, seed=seed)
        train_loop(model, self.train_examples, self.tokenizer.pad_token_id, settings, torch.device("cpu"), progress=False)
        return held_out_loss(model, self.eval_examples, self.tokenizer.pad_token_id)


def train_one(out: Path, trainer: Trainer, config_path: str, seed: int, warm: bool, truncation: str, analysis_pair,
              args) -> dict:
    """One LoRA run, cached as JSON: held-out loss and seconds."""
    key = f"{Path(config_path).stem}-{'warm' if warm else 'cold'}-seed{seed}"
    result_path = out / "runs" / f"{key}.json"
    cached = _json(result_path)
    if cached is not None:
        return cached
    from lora_ranks.extract import extract_lora
    from lora_ranks.settings import ExtractionSettings

    start = time.perf_counter()
    init_from = None
    if warm:  # the SVD warm start: the adapter extracted from the analysis pair, with this config's truncation
        init_from = out / "warm" / Path(config_path).stem
        if not (init_from / "adapter_config.json").is_file():
            extract_lora(analysis_pair[0], analysis_pair[1], config_path, init_from,
                         settings=ExtractionSettings(truncation="weight" if truncation == "weight" else "curvature"))
    loss, trainable = trainer.lora(config_path, seed, init_from, args)
    result = {"key": key, "config": config_path, "seed": seed, "warm": warm, "truncation": truncation,
              "held_out_loss": loss, "trainable_parameters": trainable, "seconds": time.perf_counter() - start}
    _save(result_path, result)
    return result


def full_finetune_one(out: Path, trainer: Trainer, seed: int, args) -> dict:
    result_path = out / "runs" / f"full-finetune-seed{seed}.json"
    cached = _json(result_path)
    if cached is not None:
        return cached
    start = time.perf_counter()
    result = {"seed": seed, "held_out_loss": trainer.full(seed, args), "seconds": time.perf_counter() - start}
    _save(result_path, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/experiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8], help="uniform-rank equivalents")
    parser.add_argument("--subset", type=float, default=0.2, help="share of the training records the analysis pair sees")
    parser.add_argument("--ft-steps", type=int, default=60)
    parser.add_argument("--ft-lr", type=float, default=3e-4)
    parser.add_argument("--lora-steps", type=int, default=30)
    parser.add_argument("--lora-lr", type=float, default=1e-2, help="best of 1e-3..3e-2 for cold and warm LoRAs (seed 0, r=2)")
    parser.add_argument("--full-lr", type=float, default=1e-3, help="best of 2e-4..3e-3 for the full fine-tune (seed 0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-training", action="store_true", help="analysis, fidelity and comparability only")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    _setup(args.threads)
    started = time.perf_counter()
    clock = {}

    def lap(name: str) -> None:
        clock[name] = time.perf_counter() - started - sum(clock.values())

    base = step_base(out)
    lap("base")
    train, eval_path = step_data(out)
    pair = step_analysis_pair(out, base, train, args)
    lap("analysis pair")
    analysis = step_spectra(out, pair, train, args)
    lap("spectra")
    allocations = step_allocations(out, analysis, args.budgets)
    fidelity = step_fidelity(out, pair, eval_path, analysis, allocations)
    lap("fidelity")
    sensitivity = step_sensitivity(out, pair, eval_path, analysis, allocations)
    lap("sensitivity")
    runs = []
    if not args.skip_training:
        plan = []
        for (method, r) in allocations["ranks"]:
            truncation = MATCHING_TRUNCATION.get(method, "weight")
            plan.append((method, r, truncation, False))
            plan.append((method, r, truncation, True))
            if method == "uniform":
                plan.append((method, r, "fisher", True))  # uniform ranks, loss-aware warm start
        trainer = Trainer(str(base), train, eval_path)
        for method, r, truncation, warm in plan:
            for seed in args.seeds:
                result = train_one(out, trainer, allocations["paths"][(method, r, truncation)], seed, warm, truncation,
                                   pair, args)
                runs.append({**result, "method": method, "budget_rank": r})
        full = [full_finetune_one(out, trainer, seed, args) for seed in args.seeds]
        lap("training")
    else:
        full = []
    report = summarize(out, args, analysis, allocations, fidelity, sensitivity, runs, full, clock)
    emit(report, args.record)


def summarize(out: Path, args, analysis, allocations, fidelity, sensitivity, runs, full, clock) -> str:
    from lora_ranks.evidence.experiment import paired_comparison
    from lora_ranks.evidence.fidelity import mean_and_std
    from lora_ranks.report import write_sensitivity_plot

    pretraining = _json(out / "base" / "pretraining.json")
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    ceiling = fidelity["ceiling_kl"]
    lines = [f"### Allocations at equal parameters, harder experiment ({date.today().isoformat()}, CPU: {machine})", "",
             f"Base: Qwen3 6 layers, hidden 256, {pretraining['parameters']:,} parameters, pretrained here on the Python "
             f"standard library ({pretraining['tokens_seen']:,} tokens, held-out loss {pretraining['held_out_loss']:.3f}). "
             "Fine-tuning mix: license prose / naming stdlib tests from docstrings / sort-count-reverse; "
             f"{args.subset:.0%} subset for the analysis pair ({args.ft_steps} steps). Command: "
             "`.venv/bin/python benchmarks/experiment_allocations.py`", "",
             f"Analysis wall time: weight {analysis['seconds']['weight']:.1f} s, input {analysis['seconds']['input']:.1f} s, "
             f"fisher {analysis['seconds']['fisher']:.1f} s.", "",
             f"**Fidelity** (mean KL(fine-tuned || base + extracted adapter), nats/token, 200 held-out records; ceiling "
             f"= full-rank deltas on the projections: {ceiling:.4f}; excess = KL − ceiling):", "",
             "| budget (uniform r) | parameters | method | truncation | KL | excess / uniform's |", "|---|---|---|---|---|---|"]
    uniform_excess = {row["budget_rank"]: row["excess"] for row in fidelity["rows"]
                      if row["method"] == "uniform" and row["truncation"] == "weight"}
    for row in sorted(fidelity["rows"], key=lambda x: (x["budget_rank"], x["method"], x["truncation"])):
        ratio = (f"{row['excess'] / uniform_excess[row['budget_rank']]:.2f}" if row["budget_rank"] in uniform_excess
                 else "—")  # the signal rule has a budget of its own
        lines.append(f"| {row['budget_rank'] or 'signal'} | {row['parameters']:,} | {row['method']} | {row['truncation']} | "
                     f"{row['kl']:.4f} | {ratio} |")
    plot = write_sensitivity_plot(out, sensitivity)
    lines += ["", "**Comparability** (each module truncated alone to rank 2, KL on 64 held-out records; Spearman of "
              "predicted vs measured KL over "
              f"{len(sensitivity['fisher']['rows'])} modules; plot `{plot}`): "
              + ", ".join(f"{kind} {v['spearman']:.2f}" for kind, v in sensitivity.items()), ""]
    if runs:
        lines += [f"**Training** (LoRA, {args.lora_steps} steps, lr {args.lora_lr:g}, batch 8, on all training records; "
                  f"held-out loss, seeds {args.seeds}; paired difference vs warm uniform ranks, mean ± std, t, p):", "",
                  "| budget | method | init | truncation | parameters | held-out loss | vs warm uniform | t | p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        by_key = {}
        for run in runs:
            by_key.setdefault((run["budget_rank"], run["method"], run["warm"], run["truncation"]), []).append(run)
        for (r, method, warm, truncation), group in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
            losses = [g["held_out_loss"] for g in sorted(group, key=lambda g: g["seed"])]
            mean, std = mean_and_std(losses)
            closest = min(args.budgets, key=lambda b: abs(allocations["parameters"][("uniform", b)]
                                                          - allocations["parameters"][("signal", 0)]))
            reference_key = (r if r else closest, "uniform", True, "weight")
            reference = [g["held_out_loss"] for g in sorted(by_key[reference_key], key=lambda g: g["seed"])]
            paired = (r, method, warm, truncation) != reference_key and len(losses) >= 2  # a test needs 2+ seeds
            comparison = paired_comparison(losses, reference) if paired else None
            lines.append(f"| {r or 'signal'} | {method} | {'warm' if warm else 'cold'} | {truncation} | "
                         f"{group[0]['trainable_parameters']:,} | {mean:.4f} ± {std:.4f} | "
                         + (f"{comparison['mean']:+.4f} ± {comparison['std']:.4f} | {comparison['t']:.2f} | "
                            f"{comparison['p']:.3f} |" if comparison else "— | — | — |"))
        full_losses = [f["held_out_loss"] for f in full]
        mean, std = mean_and_std(full_losses)
        lines += ["", f"Full fine-tune trained as long (all parameters, lr {args.full_lr:g}): held-out loss "
                  f"{mean:.4f} ± {std:.4f}."]
    lines += ["", "Wall time by step (s): " + ", ".join(f"{k} {v:.0f}" for k, v in clock.items()), ""]
    _save(out / "results.json", {"fidelity": fidelity, "sensitivity": {k: v["spearman"] for k, v in sensitivity.items()},
                                 "runs": runs, "full_finetune": full, "clock": clock, "args": vars(args)})
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
