"""Flow ``svd-analysis``: checkpoint pair -> per-layer spectra -> lora_rank_config.json + plots.

Steps:
    1. (optional) build the offline demo inputs, when ``base_model`` is ``"demo:tiny-qwen3"``;
    2. (optional) preliminary full fine-tune, when no ``finetuned_model`` is given;
    3. discover target modules, grouped by layer;
    4. one ``fingerprint-layer`` and one ``analyze-layer`` task per layer, fanned out with ``.map``
       (analyze-layer is cached by layer content: reruns compute only what is missing), with a progress
       artifact updated as layers finish;
    5. assemble the rank config;
    6. plots, raw data and UI artifacts; with ``fidelity_report``, a tau sweep of extracted adapters'
       closeness to the fine-tuned model (``analysis_outputs/fidelity``).

The task runner (threads, processes pinned one per GPU, or Dask) comes from LORA_RANKS_TASK_RUNNER; see
``flows/_runtime.py``. Results are identical whichever runner is used.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal, Optional

from flows._runtime import apply_defaults, task_runner

apply_defaults()

from prefect import flow, get_run_logger, unmapped  # noqa: E402
from prefect.artifacts import create_progress_artifact, update_progress_artifact  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from pydantic import Field  # noqa: E402

from lora_ranks.analysis import OutputLayout  # noqa: E402
from lora_ranks.checkpoints import DEFAULT_TARGET_MODULES, TargetSpec  # noqa: E402
from lora_ranks.config import AlphaPolicy  # noqa: E402
from lora_ranks.synthetic import DEMO_MODEL  # noqa: E402
from lora_ranks.finetune import FinetuneSettings  # noqa: E402
from lora_ranks.ranks import AllocationSettings  # noqa: E402
from tasks.analysis import (analyze_layer_task, assemble_rank_config_task, discover_layers,  # noqa: E402
                            fingerprint_layer, layer_result_is_current)
from tasks.finetune import build_demo_inputs, preliminary_finetune_task  # noqa: E402
from tasks.evidence import fidelity_report_task  # noqa: E402
from tasks.report import write_report_task  # noqa: E402


@flow(name="svd-analysis", task_runner=task_runner(), log_prints=True)
def svd_analysis(
    base_model: Annotated[str, Field(description="Base model: a local Hugging Face folder, a hub id, or "
                                                 f"'{DEMO_MODEL}' to build a tiny offline model")] = DEMO_MODEL,
    finetuned_model: Annotated[Optional[str], Field(description="Already fine-tuned model folder; "
                                                              "empty = run the preliminary fine-tune")] = None,
    data_path: Annotated[Optional[str], Field(description="JSON/JSONL training data for the preliminary "
                                                        "fine-tune; empty with the demo model = synthetic data")] = None,
    output_dir: Annotated[str, Field(description="Root folder for checkpoints, config, plots and raw data")] = "outputs/svd-analysis",
    energy_threshold: Annotated[float, Field(gt=0, le=1, description="Fraction of delta energy each rank keeps (tau)")] = 0.9,
    min_rank: Annotated[int, Field(ge=1, description="Lower rank bound")] = 4,
    max_rank: Annotated[int, Field(ge=1, description="Upper rank bound; modules wanting more are flagged saturated")] = 128,
    smoothing: Annotated[Literal["none", "median", "mean"], Field(description="Across-depth smoothing per module type")] = "median",
    smoothing_window: Annotated[int, Field(ge=1, description="Odd smoothing window, in layers")] = 3,
    round_to: Annotated[int, Field(ge=1, description="Round ranks up to a multiple of this (8 suits serving stacks)")] = 1,
    budget_parameters: Annotated[Optional[int], Field(gt=0, description="Budget mode: total LoRA parameters to spread")] = None,
    budget_fraction: Annotated[Optional[float], Field(gt=0, le=1, description="Budget mode: budget as a fraction of base parameters")] = None,
    alpha_policy: Annotated[Literal["constant", "rslora"], Field(description="lora_alpha rule: alpha=2r, or rsLoRA")] = "constant",
    target_modules: Annotated[list[str], Field(description="Module names to analyze")] = list(DEFAULT_TARGET_MODULES),
    include_vision: Annotated[bool, Field(description="Also analyze a vision tower (Qwen2.5-VL)")] = False,
    svd_method: Annotated[Literal["auto", "gram", "svdvals", "randomized"], Field(description="Spectrum method")] = "auto",
    device: Annotated[Optional[str], Field(description="'cuda', 'cpu'; empty = CUDA when available")] = None,
    subset_ratio: Annotated[float, Field(gt=0, le=1, description="Fine-tune subset fraction")] = 0.01,
    max_samples: Annotated[int, Field(ge=1, description="Fine-tune subset cap")] = 1000,
    finetune_steps: Annotated[int, Field(ge=1, description="Fine-tune optimizer steps")] = 100,
    learning_rate: Annotated[float, Field(gt=0, description="Fine-tune peak learning rate")] = 1e-4,
    batch_size: Annotated[int, Field(ge=1, description="Fine-tune micro-batch size")] = 4,
    allow_pickle: Annotated[bool, Field(description="Accept pickle .bin checkpoints (weights_only load)")] = False,
    save_deltas: Annotated[bool, Field(description="Also save the float32 deltas (large: 4 bytes per parameter)")] = False,
    save_vectors: Annotated[bool, Field(description="Also save each delta's top singular directions (for extraction)")] = False,
    refresh: Annotated[bool, Field(description="Recompute every layer even when a cached result exists")] = False,
    trust_remote_code: Annotated[bool, Field(description="Run Python code shipped with the model (off: safe)")] = False,
    fidelity_report: Annotated[bool, Field(description="Also measure how close base + extracted adapters get to the "
                                                      "fine-tuned model (KL on held-out records) over a tau sweep")] = False,
    eval_data_path: Annotated[Optional[str], Field(description="Held-out records for the fidelity report; empty = a "
                                                             "sample of data_path (may overlap the fine-tune subset)")] = None,
) -> str:
    """Decide per-module LoRA ranks from the spectra of a brief full fine-tune's weight deltas.

    Returns the path of ``configs/lora_rank_config.json`` under ``output_dir``.
    """
    logger = get_run_logger()
    started = time.time()
    layout = OutputLayout(Path(output_dir).resolve())
    # Validate every setting before any expensive work.
    settings = AllocationSettings(energy_threshold=energy_threshold, min_rank=min_rank, max_rank=max_rank,
                                  smoothing=smoothing, smoothing_window=smoothing_window, round_to=round_to,
                                  budget_parameters=budget_parameters, budget_fraction=budget_fraction)
    targets = TargetSpec(target_modules=tuple(target_modules), include_vision=include_vision)
    policy = AlphaPolicy(policy=alpha_policy)

    # Step 1: demo inputs.
    if base_model == DEMO_MODEL:
        base_model, data_path = build_demo_inputs(str(layout.root / "demo_inputs"), data_path)
        if finetuned_model is None:  # the tiny demo set is small: train on a fifth of it, at a higher rate
            subset_ratio, learning_rate, finetune_steps = max(subset_ratio, 0.2), max(learning_rate, 1e-3), min(finetune_steps, 40)

    # Step 2: preliminary fine-tune.
    if finetuned_model is None:
        if data_path is None:
            raise ValueError("data_path is required to fine-tune (or pass finetuned_model to skip fine-tuning)")
        ft = preliminary_finetune_task(base_model, data_path, str(layout.finetune_dir),
                                       FinetuneSettings(subset_ratio=subset_ratio, max_samples=max_samples,
                                                        max_steps=finetune_steps, learning_rate=learning_rate,
                                                        batch_size=batch_size),
                                       trust_remote_code)
        base_model, finetuned_model = ft.pretrained_dir, ft.finetuned_dir

    # Step 3: layers.
    layers = discover_layers(base_model, finetuned_model, targets, allow_pickle)

    # Step 4: one SVD task per layer, cached by the layer's content.
    names, groups = list(layers.keys()), list(layers.values())
    digests = fingerprint_layer.map(names, groups, unmapped(base_model), unmapped(finetuned_model),
                                    unmapped(allow_pickle))
    analyze = analyze_layer_task.with_options(refresh_cache=True) if refresh else analyze_layer_task
    shared = dict(base=unmapped(base_model), finetuned=unmapped(finetuned_model), svd_dir=unmapped(str(layout.svd_dir)),
                  top_k=unmapped(settings.required_top_k), method=unmapped(svd_method), device=unmapped(device),
                  allow_pickle=unmapped(allow_pickle), save_deltas=unmapped(save_deltas),
                  save_vectors=unmapped(save_vectors))
    futures = analyze.map(names, groups, digests, **shared)
    progress = create_progress_artifact(progress=0.0, key="svd-analysis-progress",
                                        description=f"Layers analyzed (of {len(names)})")
    for done, future in enumerate(as_completed(futures), start=1):
        future.result()
        update_progress_artifact(progress, progress=100.0 * done / len(names))
    results = [f.result() for f in futures]
    # A cached result whose layer file was deleted or overwritten since is recomputed.
    stale = [i for i, r in enumerate(results) if not layer_result_is_current(r)]
    if stale:
        logger.warning("Recomputing %d layer(s) whose cached spectra file is missing or changed", len(stale))
        redo = analyze_layer_task.with_options(refresh_cache=True).map(
            [names[i] for i in stale], [groups[i] for i in stale], [digests[i] for i in stale], **shared)
        for i, result in zip(stale, redo.result()):
            results[i] = result

    # Step 5: the rank config.
    config_path = assemble_rank_config_task(base_model, finetuned_model, layers, results, settings,
                                            str(layout.config_path), policy, started, allow_pickle)

    # Step 6: plots, raw data, UI artifacts (and the optional fidelity report).
    write_report_task(config_path, str(layout.svd_dir), results)
    if fidelity_report:
        eval_data = eval_data_path or data_path
        if eval_data is None:
            raise ValueError("fidelity_report needs eval_data_path (or data_path) to evaluate on")
        fidelity_report_task(config_path, str(layout.svd_dir), eval_data, str(layout.root / "analysis_outputs" / "fidelity"),
                             [0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    logger.info("Rank config: %s", config_path)
    logger.info("Plots and raw data: %s", layout.svd_dir)
    return config_path


if __name__ == "__main__":
    svd_analysis()
