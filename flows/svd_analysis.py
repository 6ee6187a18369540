"""Flow ``svd-analysis``: checkpoint pair -> per-layer spectra -> lora_rank_config.json + plots.

Steps:
    0. ``claim-output``: refuse an output folder that would take anything of the user's, and mark a new one
       as this tool's (``lora_ranks.outputs``);
    1. (optional) build the offline demo inputs, when ``base_model`` is ``"demo:tiny-qwen3"`` (or
       ``"demo:tiny-qwen25-vl"``, the vision-language demo, or ``"demo:smollm2-135m"``, a real base made once from
       the package registry);
    2. the analysis plan (``lora_ranks.analysis.AnalysisPlan``): the device, the data the steps need and, with an
       input or fisher spectrum, the calibration records (the fine-tuning data), checked before fine-tuning;
    3. (optional) preliminary full fine-tune, when no ``finetuned_model`` is given;
    4. preflight the pair (every problem its headers show, in one error), discover target modules by layer and
       fingerprint each layer's weights (``fingerprint-layer``, fanned out with ``.map``);
    5. (input or fisher spectrum) ``collect-curvature``: K-FAC factors from the fine-tuned model, one file a layer;
    6. one ``analyze-layer`` task per layer (cached by layer content, curvature and numerics: reruns compute only
       what is missing), with a progress artifact updated as layers finish;
    7. with ``allocation.noise_estimate`` "split-half", two more fine-tunes on disjoint halves of the subset and
       the directions each module's two deltas share; assemble the rank config;
    8. plots, raw data and UI artifacts; with ``fidelity.fidelity_report``, a tau sweep of extracted adapters'
       closeness to the fine-tuned model (``analysis_outputs/fidelity``).

Every option is a field of the settings parameters (``lora_ranks.settings``); the task runner (threads,
processes pinned one per GPU, or Dask) comes from LORA_RANKS_TASK_RUNNER (``flows/_runtime.py``). Results are
identical whichever runner is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from flows._runtime import apply_defaults, described, documented, task_runner

apply_defaults()

from prefect import flow, get_run_logger, unmapped  # noqa: E402
from prefect.artifacts import create_progress_artifact, update_progress_artifact  # noqa: E402

from lora_ranks.analysis import AnalysisPlan, OutputLayout, StepClock  # noqa: E402
from lora_ranks.evidence.fidelity import check_report_data  # noqa: E402
from lora_ranks.settings import (  # noqa: E402
    INPUT_HELP,
    AllocationSettings,
    AlphaPolicy,
    AnalysisSettings,
    CurvatureSettings,
    FidelitySettings,
    FinetuneSettings,
    NoiseEstimate,
    SafetySettings,
)
from lora_ranks.synthetic import DEMO_MODEL, demo_finetune_settings, is_demo_model  # noqa: E402
from tasks._cache import map_cached, run_cached  # noqa: E402
from tasks.analysis import (  # noqa: E402
    analyze_layer_task,
    assemble_rank_config_task,
    check_before_finetune_task,
    check_inputs_task,
    collect_curvature_task,
    curvature_result_is_current,
    discover_layers,
    fingerprint_layer,
    layer_result_is_current,
    split_half_ranks_task,
)
from tasks.evidence import fidelity_report_task  # noqa: E402
from tasks.finetune import (  # noqa: E402
    build_demo_inputs_task,
    preliminary_finetune_task,
    split_half_finetunes_task,
    split_halves_are_current,
)
from tasks.outputs import RECORD_OUTPUTS, claim_output_task  # noqa: E402
from tasks.plots import write_report_task  # noqa: E402


@flow(name="svd-analysis", task_runner=task_runner(), log_prints=True, **RECORD_OUTPUTS)
@documented
def svd_analysis(
    base_model: Annotated[str, described(INPUT_HELP["base_model"])] = DEMO_MODEL,
    finetuned_model: Annotated[Optional[str], described(INPUT_HELP["finetuned_model"])] = None,
    data_path: Annotated[Optional[str], described(INPUT_HELP["data_path"])] = None,
    output_dir: Annotated[str, described(INPUT_HELP["output_dir"])] = "outputs/svd-analysis",
    allocation: Annotated[AllocationSettings, described(AllocationSettings)] = AllocationSettings(),
    alpha: Annotated[AlphaPolicy, described(AlphaPolicy)] = AlphaPolicy(),
    analysis: Annotated[AnalysisSettings, described(AnalysisSettings)] = AnalysisSettings(),
    curvature: Annotated[CurvatureSettings, described(CurvatureSettings)] = CurvatureSettings(),
    finetune: Annotated[FinetuneSettings, described(FinetuneSettings)] = FinetuneSettings(),
    safety: Annotated[SafetySettings, described(SafetySettings)] = SafetySettings(),
    fidelity: Annotated[FidelitySettings, described(FidelitySettings)] = FidelitySettings(),
    eval_data_path: Annotated[Optional[str], described(INPUT_HELP["eval_data_path"])] = None,
    refresh: Annotated[bool, described(INPUT_HELP["refresh"])] = False,
    overwrite: Annotated[bool, described(INPUT_HELP["overwrite"])] = False,
) -> str:
    """Decide per-module LoRA ranks from the spectra of a brief full fine-tune's weight deltas.

    Returns the path of ``configs/lora_rank_config.json`` under ``output_dir``.
    """
    logger = get_run_logger()
    clock = StepClock()
    layout = OutputLayout(Path(claim_output_task(output_dir, "svd-analysis", {
        "base_model": base_model, "finetuned_model": finetuned_model, "data_path": data_path,
        "eval_data_path": eval_data_path}, overwrite)))

    # Step 1: demo inputs.
    if is_demo_model(base_model):
        demo = base_model
        base_model, data_path = build_demo_inputs_task(str(layout.demo_inputs_dir), data_path, demo)
        if finetuned_model is None:  # the demo set is small: a fine-tune sized to it (and to minutes)
            finetune = demo_finetune_settings(finetune, demo)

    # Step 2: the plan, and what it needs checked before any fine-tuning (data, calibration records).
    plan = AnalysisPlan(base_model, finetuned_model, data_path, allocation=allocation, alpha=alpha, analysis=analysis,
                        curvature=curvature, finetune=finetune, allow_pickle=safety.allow_pickle,
                        trust_remote_code=safety.trust_remote_code)
    check_inputs_task(plan)
    check_report_data(fidelity, data_path, eval_data_path)  # the report is the last step: its data checked now

    # Step 3: preliminary fine-tune (the device and the budget checked against the base first).
    if finetuned_model is None:
        check_before_finetune_task(plan)
        ft = preliminary_finetune_task(base_model, data_path, str(layout.finetune_dir), finetune,
                                       safety.trust_remote_code)
        plan = plan.with_pair(ft.pretrained_dir, ft.finetuned_dir)

    # Step 4: preflight and layers.
    layers = discover_layers(plan)
    names, groups = list(layers.keys()), list(layers.values())
    digests = fingerprint_layer.map(unmapped(plan), names, groups)

    # Step 5: curvature factors from the fine-tuned model (input and fisher spectra), cached like the layers.
    modules = [m for group in groups for m in group]
    factors = _curvature(plan, modules, str(layout.svd_dir), digests, refresh) if plan.spectrum.weighted else None
    clock.mark_discovered()

    # Step 6: one SVD task per layer, cached by the layer's content and the numerics.
    results = _layer_spectra(plan, names, groups, digests, str(layout.svd_dir), factors, refresh)
    clock.mark_spectra_done()

    # Step 7: (split-half noise estimate) two fine-tunes on halves of the subset and the directions they share,
    # cached by their inputs like the layers; the rank config.
    split_half = None
    if allocation.noise_estimate is NoiseEstimate.SPLIT_HALF:
        split_half = _split_half(plan, modules, str(layout.split_half_dir), refresh)
    config_path = assemble_rank_config_task(plan, layers, results, str(layout.config_path), clock.timings(results),
                                            factors, split_half)

    # Step 8: plots, raw data, UI artifacts (and the optional fidelity report).
    write_report_task(config_path, str(layout.root), results)
    if fidelity.fidelity_report:
        fidelity_report_task(config_path, str(layout.root), eval_data_path or data_path, fidelity)
    logger.info("Rank config: %s", config_path)
    logger.info("Plots and raw data: %s", layout.svd_dir)
    return config_path


if __name__ == "__main__":
    svd_analysis()


def _curvature(plan: AnalysisPlan, modules, svd_dir: str, digests, refresh: bool):
    """The curvature factors of every module (one task), rerun when its cached files are missing or changed."""
    return run_cached(collect_curvature_task, curvature_result_is_current,
                      "Recollecting curvature factors whose cached files are missing or changed",
                      refresh=refresh, plan=plan, modules=modules, svd_dir=svd_dir, digests=[d.result() for d in digests])


def _layer_spectra(plan: AnalysisPlan, names, groups, digests, svd_dir: str, factors, refresh: bool):
    """One analyze-layer task per layer, with a progress artifact; layers whose cached file changed rerun."""
    progress = create_progress_artifact(progress=0.0, key="svd-analysis-progress",
                                        description=f"Layers analyzed (of {len(names)})")
    return map_cached(analyze_layer_task, layer_result_is_current,
                      "Recomputing {n} layer(s) whose cached spectra file is missing or changed",
                      mapped=dict(layer=names, modules=groups, digests=digests),
                      shared=dict(plan=plan, svd_dir=svd_dir, factors=factors), refresh=refresh,
                      on_done=lambda done: update_progress_artifact(progress, progress=100.0 * done / len(names)))


def _split_half(plan: AnalysisPlan, modules, out_dir: str, refresh: bool):
    """Two fine-tunes on halves of the subset (cached by their inputs like the layers) and the directions they share."""
    halves = run_cached(split_half_finetunes_task, split_halves_are_current,
                        "Fine-tuning the split halves again: the cached fine-tunes' folders are missing or changed",
                        refresh=refresh, plan=plan, out_dir=out_dir)
    return split_half_ranks_task(plan, halves, modules)
