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
from lora_ranks.checkpoints import resolve_model_path  # noqa: E402
from lora_ranks.config import load_rank_config  # noqa: E402
from lora_ranks.evidence import ComparisonLayout  # noqa: E402
from lora_ranks.evidence.comparison import design_digest, expected_labels  # noqa: E402
from lora_ranks.evidence.rows import FULL, FULL_LABEL  # noqa: E402
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
from tasks._cache import run_cached  # noqa: E402
from tasks.evidence import (  # noqa: E402
    allocation_configs_task,
    allocation_fidelity_task,
    comparability_check_task,
    comparison_report_task,
    fidelity_table_is_current,
    full_finetune_task,
    preparation_record_task,
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

    # Steps 2-5: the matrix (its preparations run when a row of their seed is first trained).
    matrix = _Matrix(layout, base_model, finetuned_model, fit_path, eval_data_path, validation_path, results_dir,
                     dict(allocation=allocation, alpha=alpha, analysis=analysis, curvature=curvature,
                          finetune=finetune, safety=safety, fidelity=fidelity), training, comparison, extraction)
    labels = expected_labels(comparison) if comparison.budget_ranks else None
    if labels is None:  # the configs' labels come from the analysis
        labels = list(matrix.prepare(comparison.seeds[0])["configs"])
    matrix.labels = labels
    rows = comparison_rows(labels, matrix.inits, comparison.peers)
    # the ceiling, trained to its own plateau as a row, its rate chosen as the rows' are
    full_as_row = comparison.full_finetune and comparison.early_stopping and bool(comparison.learning_rates)
    if full_as_row:
        rows.append((FULL_LABEL, FULL))
    evaluation = RowEvaluation.of(eval_data_path, fidelity, comparison, validation_path)
    results, choices = matrix.train_rows(rows, evaluation)
    full = {r.seed: r.loss for r in results if r.init == FULL} or None
    results = [r for r in results if r.init != FULL]
    if comparison.full_finetune and not full_as_row:
        full, choices = matrix.full_finetunes(finetune, choices)
    prepared = matrix.prepared

    # Step 6: report.
    preparations = {("shared" if key is None else key): prep["record"] for key, prep in prepared.items()}
    configs = next(iter(prepared.values()))["configs"] if prepared else {}
    report = comparison_report_task(str(layout.root), configs, results,
                                    {"config": next(iter(prepared.values()))["config"] if prepared else None,
                                     "train_data": train_path, "fit_data": fit_path,
                                     "validation_data": validation_path, "eval_data": eval_data_path,
                                     "training": training.to_dict(), "comparison": comparison.to_dict(),
                                     "learning_rate_choices": choices},
                                    training.init, full, preparations, matrix.committed)
    return report.results_path


class _Matrix:
    """One comparison between its steps: the preparation of each seed (made once, when a row of it is first
    trained), and the rows trained through tasks (a row committed in ``results_dir`` with the same inputs is read,
    not trained)."""

    def __init__(self, layout: ComparisonLayout, base_model: str, finetuned_model: str | None, fit_path: str,
                 eval_data_path: str, validation_path: str | None, results_dir: str | None, analysis_settings: dict,
                 training: LoRATrainingSettings, comparison: ComparisonSettings, extraction: ExtractionSettings):
        self.layout, self.base_model, self.finetuned_model = layout, base_model, finetuned_model
        self.fit_path, self.eval_data_path, self.validation_path = fit_path, eval_data_path, validation_path
        self.results_dir, self.settings = results_dir, analysis_settings
        self.training, self.comparison, self.extraction = training, comparison, extraction
        self.inits = [training.init] + (["cold"] if comparison.cold_baseline and training.init == "warm" else [])
        self.labels: list[str] | None = None  # the configs every preparation must give (None: the first one's)
        self.prepared: dict = {}
        s = analysis_settings
        self.committed = (Committed(results_dir, design_digest(finetuned_model, s["allocation"], s["alpha"],
                                                               s["analysis"], s["curvature"], s["finetune"],
                                                               extraction, comparison))
                          if results_dir else None)

    def prepare(self, seed: int) -> dict:
        """Step 2: ranks, from the fit records only, once or per seed (comparison.seeded_preparation); without
        budget ranks also the analysis' fidelity sweep (with them, step 3 measures the fidelity of every compared
        config). Step 3: equal-budget configs; at budget ranks, their fidelity; optionally the comparability check;
        the warm starts (timed with the analysis: preparation)."""
        comparison, s = self.comparison, self.settings
        key = seed if comparison.seeded_preparation else None
        if key in self.prepared:
            return self.prepared[key]
        root = self.layout.seed_layout(key) if key is not None else self.layout
        began = time.perf_counter()
        config_path = svd_analysis(
            base_model=self.base_model, finetuned_model=self.finetuned_model, data_path=self.fit_path,
            output_dir=str(root.analysis.root), allocation=s["allocation"], alpha=s["alpha"], analysis=s["analysis"],
            curvature=s["curvature"], finetune=s["finetune"] if key is None else s["finetune"].replace(seed=key),
            safety=s["safety"], fidelity=s["fidelity"],
            eval_data_path=None if comparison.budget_ranks else self.eval_data_path)
        configs = select_configs(allocation_configs_task(config_path, str(root.root), comparison.budget_ranks,
                                                         comparison.alpha_variants), comparison.allocations)
        seconds = time.perf_counter() - began
        missing = [label for label in self.labels or () if label not in configs]
        if missing:
            raise ValueError(f"the analysis gave no config {missing[0]!r} (it gave {', '.join(configs)}): the "
                             "allocations asked for need a spectrum this analysis does not have")
        first = not self.prepared
        if comparison.budget_ranks and first:  # evidence about the configs, not preparation: not timed
            run_cached(allocation_fidelity_task, fidelity_table_is_current, "the cached allocation fidelity's table "
                       "is gone: measuring it again", analysis_config_path=config_path, configs=configs,
                       eval_data_path=self.eval_data_path, comparison_root=str(root.root), settings=s["fidelity"])
        if comparison.comparability and first:
            comparability_check_task(config_path, self.eval_data_path, str(root.root), comparison, s["fidelity"])
        pair = load_rank_config(config_path).checkpoints
        warm = {}
        if "warm" in self.inits:  # the warm starts are preparation: timed
            began = time.perf_counter()
            extracted = extract_lora_task.map(unmapped(pair.pretrained.path), unmapped(pair.finetuned.path),
                                              list(configs.values()),
                                              [str(root.warm_adapter_dir(label)) for label in configs],
                                              unmapped(s["safety"].allow_pickle), unmapped(self.extraction))
            warm = dict(zip(configs, extracted.result()))
            seconds += time.perf_counter() - began
        # What it cost, committed at once beside the rows (a comparison stopped before its report keeps it).
        record = preparation_record_task(config_path, str(root.root), pair.pretrained.path, seconds, self.committed,
                                         key)
        self.prepared[key] = {"config": config_path, "configs": configs, "warm": warm, "record": record,
                              "root": str(root.root), "pretrained": pair.pretrained.path}
        return self.prepared[key]

    def train(self, batch: list[tuple[str, str, int, float]], row_evaluation: RowEvaluation) -> list:
        """Step 4: the rows of ``batch`` (label, init, seed, learning rate), each warm-started from the adapter
        extracted at its config's ranks (peers at each budget's uniform ranks; PEFT's LoraConfig() is the peer
        "default"); committed rows are read."""
        comparison, training, committed = self.comparison, self.training, self.committed
        tag = (lambda lr: f"-lr{lr:g}") if comparison.learning_rates else (lambda lr: "")
        done, todo = {}, []
        for item in batch:
            label, init, seed, lr = item
            found = (read_committed(self.results_dir, RowSpec(label, init, seed, ""), lr, committed_key(
                self.base_model, RowSpec(label, init, seed, ""), self.fit_path, training.replace(learning_rate=lr),
                row_evaluation, committed.design)) if committed else None)
            if found is not None:
                done[item] = found
            else:
                todo.append(item)
        specs = []
        for label, init, seed, _ in todo:
            if init == FULL:  # needs no preparation: it trains the base itself
                specs.append(RowSpec(label, init, seed, ""))
                continue
            prep = self.prepare(seed)
            specs.append(RowSpec(label, init, seed, prep["configs"][label],
                                 prep["warm"].get(label) if init == "warm" else None))
        if todo:
            pretrained = next((self.prepare(seed)["pretrained"] for _, init, seed, _ in todo if init != FULL),
                              None) or resolve_model_path(self.base_model)
            trained = train_row_task.map(unmapped(pretrained), specs,
                                         unmapped(self.fit_path),
                                         [str(self.layout.run_dir(spec.name + tag(lr), spec.seed))
                                          for spec, (*_, lr) in zip(specs, todo)],
                                         [training.replace(learning_rate=lr) for *_, lr in todo],
                                         unmapped(row_evaluation), unmapped(committed)).result()
            done.update(zip(todo, trained))
        return [done[item] for item in batch]

    def train_rows(self, rows: list[tuple[str, str]], evaluation: RowEvaluation) -> tuple[list, dict | None]:
        """Steps 4-5: every row on every seed; with learning rates to choose from, each row trains at each on the
        tuning seeds (on the training records less the validation split) and keeps the rate of lowest mean
        validation loss; a choice at an edge of the rates tried extends them on that side and trains again, until
        it is interior (or max_rate_extensions); then every other seed trains at it. Returns (results, the rate
        choices or None)."""
        comparison = self.comparison
        if not comparison.learning_rates:
            return self.train([(label, init, seed, self.training.learning_rate) for label, init in rows
                               for seed in comparison.seeds], evaluation), None
        # the full fine-tune's own grid (its rates are ~100x below a LoRA's), the fine-tune's rate when none is given
        full_rates = comparison.full_learning_rates or (self.settings["finetune"].learning_rate,)
        tuning, rest = comparison.seeds[:comparison.tuning_seeds], comparison.seeds[comparison.tuning_seeds:]
        trial_evaluation = evaluation.replace_validation(self.validation_path)
        trials = self.train([(label, init, seed, lr) for label, init in rows for seed in tuning
                             for lr in (full_rates if init == FULL else comparison.learning_rates)],
                            trial_evaluation)
        for _ in range(comparison.max_rate_extensions):
            chosen, choices = choose_learning_rates(trials)
            extend = next_learning_rates(choices)
            if not extend:
                break
            trials += self.train([(label, init, seed, extend[f"{label}/{init}"]) for label, init in rows
                                  if f"{label}/{init}" in extend for seed in tuning], trial_evaluation)
        chosen, choices = choose_learning_rates(trials)
        results = [t for t in trials if t.learning_rate == chosen[t.label, t.init]]
        results += self.train([(label, init, seed, chosen[label, init]) for label, init in rows for seed in rest],
                              trial_evaluation if comparison.early_stopping else evaluation)
        return results, choices

    def full_finetunes(self, finetune: FinetuneSettings, choices: dict | None) -> tuple[dict, dict | None]:
        """Step 5's reference: a full fine-tune per seed (every parameter, as many steps and records per step as the
        LoRAs), its rate chosen from comparison.full_learning_rates on the first seed. Returns ({seed: held-out
        loss}, the rate choices with the full fine-tune's added)."""
        comparison, training = self.comparison, self.training
        steps = {k: v for k, v in training.to_dict().items() if k in ("max_steps", "epochs", "batch_size",
                                                                      "grad_accumulation", "max_length")}
        reference = finetune.replace(**steps)
        pretrained = self.prepare(comparison.seeds[0])["pretrained"]

        def full_runs(seeds, rates, validation=None) -> list:
            runs = [(seed, lr) for seed in seeds for lr in rates]
            return full_finetune_task.map(
                unmapped(pretrained), unmapped(self.fit_path), unmapped(self.eval_data_path),
                [str(self.layout.run_dir(f"full-finetune-lr{lr:g}" if comparison.full_learning_rates
                                         else "full-finetune", seed)) for seed, lr in runs],
                [reference.replace(learning_rate=lr) for _, lr in runs], [seed for seed, _ in runs],
                unmapped(self.settings["fidelity"]), unmapped(validation)).result()

        first = comparison.seeds[0]
        if not comparison.full_learning_rates:
            return dict(zip(comparison.seeds, full_runs(comparison.seeds, [reference.learning_rate]))), choices
        trials = full_runs([first], comparison.full_learning_rates, self.validation_path)
        (loss, _), rate = min(zip(trials, comparison.full_learning_rates), key=lambda t: t[0][1])
        choices = {**(choices or {}), "full-finetune": {"learning_rate": rate, "validation_losses": {
            f"{lr:g}": validation for (_, validation), lr in zip(trials, comparison.full_learning_rates)}}}
        return {first: loss, **dict(zip(comparison.seeds[1:], full_runs(comparison.seeds[1:], [rate])))}, choices


if __name__ == "__main__":
    compare_allocations()
