"""Flow ``compare-allocations``: do data-driven ranks beat uniform ranks at equal parameter budget?

Steps:
    0. ``claim-output``: refuse an output folder that would take anything of the user's, and mark a new one
       as this tool's (``lora_ranks.outputs``);
    1. split the data into train and held-out records (or use ``eval_data_path``); the demo model brings its data;
       with learning rates to choose or early stopping, the validation records (``validation_data_path``, or a
       split carved from the training records here, before the analysis draws anything from them);
    2. ranks: the ``svd-analysis`` flow on the training records less the validation split (as a subflow; it
       fine-tunes first unless ``finetuned_model`` is given), optionally with its fidelity report on the held-out
       records; once, or with ``comparison.seeded_preparation`` once per seed (the seed's subset, fine-tune,
       calibration sample, ranks and warm start), each when a row of its seed is first trained; its wall time is
       measured (fine-tune, factors, spectra, configs, warm-start extraction);
    3. rank configs at (about) equal trainable parameters: uniform, energy threshold, budget water-filling (with
       ``comparison.budget_ranks``: at each budget, water-filling on every spectrum the analysis has, the signal
       ranks, and the fidelity of every config's extracted adapter), with ``comparison.alpha_variants`` each
       config again at another alpha policy; with ``comparison.comparability``, whether the spectra predict what
       truncating one module costs;
    4. the rows: a LoRA for every config and seed (identical data and seeds), warm-started from the adapter
       extracted at its ranks unless ``training.init`` is "cold"; with ``comparison.cold_baseline`` also cold; with
       ``comparison.peers`` PEFT's variants and data-driven inits at each budget's uniform ranks
       (``lora_ranks.evidence.peers``); each run is evaluated in its own task: with early stopping
       (``comparison.eval_interval``, ``comparison.patience``) its best validation checkpoint, held-out loss after
       training (and at ``comparison.curve_points`` steps during it, against FLOPs), exact-match accuracy; with
       ``results_dir`` a row committed there is read instead, and every finished row is committed there;
    5. with ``comparison.learning_rates``, each row's rate is chosen first: every rate on the tuning seeds, on the
       training records less the validation split, the lowest mean validation loss kept, the grid extended while
       the choice is at its edge; with ``comparison.full_finetune`` a full fine-tune per seed, trained as long (the
       reference), its rate chosen from ``comparison.full_learning_rates`` on the first seed;
    6. a table (mean +- std over seeds, paired differences to uniform ranks and PEFT's ``LoraConfig()``, accuracy,
       compute with the preparation, the gap closed to the full fine-tune) and plots, as files and UI artifacts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

from flows._runtime import apply_defaults, described, documented, task_runner

apply_defaults()

from prefect import flow, unmapped  # noqa: E402

from flows.svd_analysis import svd_analysis  # noqa: E402
from lora_ranks.config import load_rank_config  # noqa: E402
from lora_ranks.evidence import ComparisonLayout  # noqa: E402
from lora_ranks.evidence.comparison import design_digest, expected_labels  # noqa: E402
from lora_ranks.evidence.runs import (  # noqa: E402
    Committed,
    RowEvaluation,
    RowSpec,
    check_results_dir,  # noqa: E402
    choose_learning_rates,
    committed_key,
    comparison_rows,
    next_learning_rates,
    read_committed,
    select_configs,
)
from lora_ranks.settings import (  # noqa: E402
    INPUT_HELP,
    AllocationSettings,
    AlphaPolicy,
    AnalysisSettings,
    ComparisonSettings,
    CurvatureSettings,
    ExtractionSettings,
    FidelitySettings,
    FinetuneSettings,
    LoRATrainingSettings,
    SafetySettings,
)
from lora_ranks.synthetic import DEMO_MODEL  # noqa: E402
from tasks.evidence import (  # noqa: E402
    allocation_configs_task,
    allocation_fidelity_task,
    comparability_check_task,
    comparison_report_task,
    full_finetune_task,
    split_data_task,
    split_validation_task,
    train_row_task,
)
from tasks.finetune import build_demo_inputs_task  # noqa: E402
from tasks.outputs import RECORD_OUTPUTS, claim_output_task  # noqa: E402
from tasks.train import extract_lora_task  # noqa: E402


# A bounded runner (LORA_RANKS_MAX_WORKERS, default 2): Prefect's default thread pool has no bound, and a matrix of
# 120 LoRAs trained at once ran a 23 GB machine out of memory.
@flow(name="compare-allocations", task_runner=task_runner(), **RECORD_OUTPUTS)
@documented
def compare_allocations(
    base_model: Annotated[str, described(INPUT_HELP["base_model"])] = DEMO_MODEL,
    finetuned_model: Annotated[Optional[str], described(INPUT_HELP["finetuned_model"])] = None,
    data_path: Annotated[Optional[str], described(INPUT_HELP["data_path"])] = None,
    eval_data_path: Annotated[Optional[str], described(INPUT_HELP["eval_data_path"])] = None,
    output_dir: Annotated[str, described(INPUT_HELP["output_dir"])] = "outputs/compare-allocations",
    allocation: Annotated[AllocationSettings, described(AllocationSettings)] = AllocationSettings(),
    alpha: Annotated[AlphaPolicy, described(AlphaPolicy)] = AlphaPolicy(),
    analysis: Annotated[AnalysisSettings, described(AnalysisSettings)] = AnalysisSettings(),
    curvature: Annotated[CurvatureSettings, described(CurvatureSettings)] = CurvatureSettings(),
    finetune: Annotated[FinetuneSettings, described(FinetuneSettings)] = FinetuneSettings(),
    training: Annotated[LoRATrainingSettings, described(LoRATrainingSettings)] = LoRATrainingSettings(),
    comparison: Annotated[ComparisonSettings, described(ComparisonSettings)] = ComparisonSettings(),
    extraction: Annotated[ExtractionSettings, described(ExtractionSettings)] = ExtractionSettings(),
    fidelity: Annotated[FidelitySettings, described(FidelitySettings)] = FidelitySettings(),
    safety: Annotated[SafetySettings, described(SafetySettings)] = SafetySettings(),
    overwrite: Annotated[bool, described(INPUT_HELP["overwrite"])] = False,
    validation_data_path: Annotated[Optional[str], described(INPUT_HELP["validation_data_path"])] = None,
    results_dir: Annotated[Optional[str], described(INPUT_HELP["results_dir"])] = None,
) -> str:
    """Train LoRAs of different allocations at equal budgets over several seeds; returns results.json's path."""
    layout = ComparisonLayout(Path(claim_output_task(output_dir, "compare-allocations", {
        "base_model": base_model, "finetuned_model": finetuned_model, "data_path": data_path,
        "eval_data_path": eval_data_path, "validation_data_path": validation_data_path}, overwrite)))
    if comparison.seeded_preparation and finetuned_model is not None:
        raise ValueError("seeded_preparation fine-tunes once per seed, but finetuned_model gives one pair: drop one")
    if results_dir:
        check_results_dir(results_dir)  # a file of the user's named like a committed result is never replaced

    # Step 1: train / held-out split (the demo model brings its own synthetic data), then the validation split,
    # carved before the analysis draws its subset: the brief fine-tune and the calibration never see it.
    if base_model == DEMO_MODEL:
        base_model, data_path = build_demo_inputs_task(str(layout.demo_inputs_dir), data_path)
    if data_path is None:
        raise ValueError("data_path is required (records to fine-tune, train and evaluate on)")
    if eval_data_path is None:
        train_path, eval_data_path = split_data_task(data_path, str(layout.root), comparison.eval_fraction)
    else:
        train_path = data_path
    fit_path, validation_path = train_path, validation_data_path
    if validation_path is None and (comparison.learning_rates or comparison.full_learning_rates
                                    or comparison.early_stopping):
        fit_path, validation_path = split_validation_task(train_path, str(layout.root), comparison.validation_fraction)

    # Step 2: ranks, from the fit records only, once or per seed (comparison.seeded_preparation); without budget
    # ranks also the analysis' fidelity sweep (with them, step 3 measures the fidelity of every compared config).
    # Step 3: equal-budget configs; at budget ranks, their fidelity; optionally the comparability check; the warm
    # starts. Each seed's preparation runs when one of its rows is first trained (a committed row needs none).
    prepared: dict = {}

    def prepare(seed: int) -> dict:
        key = seed if comparison.seeded_preparation else None
        if key in prepared:
            return prepared[key]
        root = layout.seed_layout(key) if key is not None else layout
        began = time.perf_counter()
        config_path = svd_analysis(
            base_model=base_model, finetuned_model=finetuned_model, data_path=fit_path,
            output_dir=str(root.analysis.root), allocation=allocation, alpha=alpha, analysis=analysis,
            curvature=curvature, finetune=finetune if key is None else finetune.replace(seed=key), safety=safety,
            fidelity=fidelity, eval_data_path=None if comparison.budget_ranks else eval_data_path)
        configs = select_configs(allocation_configs_task(config_path, str(root.root), comparison.budget_ranks,
                                                         comparison.alpha_variants), comparison.allocations)
        seconds = time.perf_counter() - began
        missing = [label for label in labels or () if label not in configs]
        if missing:
            raise ValueError(f"the analysis gave no config {missing[0]!r} (it gave {', '.join(configs)}): the "
                             "allocations asked for need a spectrum this analysis does not have")
        first = not prepared
        if comparison.budget_ranks and first:  # evidence about the configs, not preparation: not timed
            allocation_fidelity_task(config_path, configs, eval_data_path, str(root.root), fidelity)
        if comparison.comparability and first:
            comparability_check_task(config_path, eval_data_path, str(root.root), comparison, fidelity)
        pair = load_rank_config(config_path).checkpoints
        warm = {}
        if "warm" in inits:  # the warm starts are preparation: timed
            began = time.perf_counter()
            extracted = extract_lora_task.map(unmapped(pair.pretrained.path), unmapped(pair.finetuned.path),
                                              list(configs.values()),
                                              [str(root.warm_adapter_dir(label)) for label in configs],
                                              unmapped(safety.allow_pickle), unmapped(extraction))
            warm = dict(zip(configs, extracted.result()))
            seconds += time.perf_counter() - began
        prepared[key] = {"config": config_path, "configs": configs, "warm": warm, "seconds": seconds,
                         "root": str(root.root), "pretrained": pair.pretrained.path}
        return prepared[key]

    inits = [training.init] + (["cold"] if comparison.cold_baseline and training.init == "warm" else [])
    labels = expected_labels(comparison) if comparison.budget_ranks else None
    if labels is None:  # the configs' labels come from the analysis
        labels = list(prepare(comparison.seeds[0])["configs"])
    rows = comparison_rows(labels, inits, comparison.peers)
    evaluation = RowEvaluation.of(eval_data_path, fidelity, comparison, validation_path)
    committed = (Committed(results_dir, design_digest(finetuned_model, allocation, alpha, analysis, curvature,
                                                      finetune, extraction, comparison))
                 if results_dir else None)

    # Step 4: the rows: every config x init, and every peer at each budget's uniform ranks (warm: from the adapter
    # extracted at the config's ranks; PEFT's LoraConfig() is the peer "default"). A row committed in results_dir
    # with the same inputs is read, not trained.
    def train(batch: list[tuple[str, str, int, float]], row_evaluation: RowEvaluation) -> list:
        tag = (lambda lr: f"-lr{lr:g}") if comparison.learning_rates else (lambda lr: "")
        done, todo = {}, []
        for item in batch:
            label, init, seed, lr = item
            found = (read_committed(results_dir, RowSpec(label, init, seed, ""), lr, committed_key(
                base_model, RowSpec(label, init, seed, ""), fit_path, training.replace(learning_rate=lr),
                row_evaluation, committed.design)) if committed else None)
            if found is not None:
                done[item] = found
            else:
                todo.append(item)
        specs = []
        for label, init, seed, _ in todo:
            prep = prepare(seed)
            specs.append(RowSpec(label, init, seed, prep["configs"][label],
                                 prep["warm"].get(label) if init == "warm" else None))
        if todo:
            trained = train_row_task.map(unmapped(prepare(todo[0][2])["pretrained"]), specs, unmapped(fit_path),
                                         [str(layout.run_dir(spec.name + tag(lr), spec.seed))
                                          for spec, (*_, lr) in zip(specs, todo)],
                                         [training.replace(learning_rate=lr) for *_, lr in todo],
                                         unmapped(row_evaluation), unmapped(committed)).result()
            done.update(zip(todo, trained))
        return [done[item] for item in batch]

    # Step 5: with learning rates to choose from, each row trains at each on the tuning seeds (on the training
    # records less the validation split) and keeps the rate of lowest mean validation loss; a choice at an edge of
    # the rates tried extends them on that side and trains again, until it is interior (or max_rate_extensions);
    # then every other seed trains at it.
    choices = None
    tuning, rest = comparison.seeds[:comparison.tuning_seeds], comparison.seeds[comparison.tuning_seeds:]
    if comparison.learning_rates:
        trial_evaluation = evaluation.replace_validation(validation_path)
        trials = train([(label, init, seed, lr) for label, init in rows for seed in tuning
                        for lr in comparison.learning_rates], trial_evaluation)
        for _ in range(comparison.max_rate_extensions):
            chosen, choices = choose_learning_rates(trials)
            extend = next_learning_rates(choices)
            if not extend:
                break
            trials += train([(label, init, seed, extend[f"{label}/{init}"]) for label, init in rows
                             if f"{label}/{init}" in extend for seed in tuning], trial_evaluation)
        chosen, choices = choose_learning_rates(trials)
        results = [t for t in trials if t.learning_rate == chosen[t.label, t.init]]
        results += train([(label, init, seed, chosen[label, init]) for label, init in rows for seed in rest],
                         trial_evaluation if comparison.early_stopping else evaluation)
    else:
        results = train([(label, init, seed, training.learning_rate) for label, init in rows
                         for seed in comparison.seeds], evaluation)
    full = None
    if comparison.full_finetune:  # every parameter, as many steps and records per step as the LoRAs
        steps = {k: v for k, v in training.to_dict().items() if k in ("max_steps", "epochs", "batch_size",
                                                                      "grad_accumulation", "max_length")}
        reference = finetune.replace(**steps)
        pretrained = prepare(comparison.seeds[0])["pretrained"]

        def full_runs(seeds, rates, validation=None) -> list:
            runs = [(seed, lr) for seed in seeds for lr in rates]
            return full_finetune_task.map(
                unmapped(pretrained), unmapped(fit_path), unmapped(eval_data_path),
                [str(layout.run_dir(f"full-finetune-lr{lr:g}" if comparison.full_learning_rates else "full-finetune",
                                    seed)) for seed, lr in runs],
                [reference.replace(learning_rate=lr) for _, lr in runs], [seed for seed, _ in runs],
                unmapped(fidelity), unmapped(validation)).result()

        first = comparison.seeds[0]
        if comparison.full_learning_rates:
            trials = full_runs([first], comparison.full_learning_rates, validation_path)
            (loss, _), rate = min(zip(trials, comparison.full_learning_rates), key=lambda t: t[0][1])
            choices = {**(choices or {}), "full-finetune": {"learning_rate": rate, "validation_losses": {
                f"{lr:g}": validation for (_, validation), lr in zip(trials, comparison.full_learning_rates)}}}
            full = {first: loss, **dict(zip(comparison.seeds[1:], full_runs(comparison.seeds[1:], [rate])))}
        else:
            full = dict(zip(comparison.seeds, full_runs(comparison.seeds, [reference.learning_rate])))

    # Step 6: report.
    preparations = {("shared" if key is None else key): {k: prep[k] for k in ("config", "root", "seconds")}
                    for key, prep in prepared.items()}
    configs = next(iter(prepared.values()))["configs"] if prepared else {}
    report = comparison_report_task(str(layout.root), configs, results,
                                    {"config": next(iter(prepared.values()))["config"] if prepared else None,
                                     "train_data": train_path, "fit_data": fit_path,
                                     "validation_data": validation_path, "eval_data": eval_data_path,
                                     "training": training.to_dict(), "comparison": comparison.to_dict(),
                                     "learning_rate_choices": choices},
                                    training.init, full, preparations, results_dir)
    return report.results_path


if __name__ == "__main__":
    compare_allocations()
