"""The whole analysis in one process: ``analyze_checkpoints`` runs an ``AnalysisPlan``'s steps serially, for users
who do not need Prefect (the ``svd-analysis`` flow runs the same plan's steps as tasks, one per layer).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..config import RankConfig
from ..settings import AllocationSettings, AlphaPolicy, AnalysisSettings, CurvatureSettings, FinetuneSettings
from .assemble import zero_delta_message
from .layout import OutputLayout
from .plan import AnalysisPlan, StepClock

__all__ = ["analyze_checkpoints"]


def analyze_checkpoints(
    base: str | Path,
    finetuned: str | Path,
    out_dir: str | Path,
    *,
    settings: AllocationSettings = AllocationSettings(),
    analysis: AnalysisSettings = AnalysisSettings(),
    alpha_policy: AlphaPolicy = AlphaPolicy(),
    allow_pickle: bool = False,
    curvature: CurvatureSettings = CurvatureSettings(),
    calibration_data: str | Path | None = None,
    subset: FinetuneSettings = FinetuneSettings(),
) -> RankConfig:
    """Whole analysis in one process, layer after layer: the ``AnalysisPlan`` the ``svd-analysis`` flow fans out.

    Writes the config and per-layer spectra into ``OutputLayout(out_dir)``; returns the config. Warns
    (``UserWarning``) when some modules did not change at all. Unlike the flow and the command line, it accepts a
    ``min_rank`` at or above every module's full rank (exact-extraction references).

    Args:
        curvature: which spectrum ranks the directions; "input" and "fisher" first collect curvature factors from
            the fine-tuned model on ``calibration_data`` (the ``subset`` of it the fine-tune trains on).

    Raises:
        CheckpointError: listing every problem the headers show (before any tensor is read), or naming a
            tensor with NaN or Inf.
        CalibrationError: a curvature spectrum, or the split-half noise estimate, without usable calibration data.
        DeviceError, BudgetError: a device that is not there, a budget that cannot be spent (before any work).
    """
    clock = StepClock()
    layout = OutputLayout(out_dir)
    plan = AnalysisPlan(str(base), str(finetuned), None if calibration_data is None else str(calibration_data),
                        allocation=settings, alpha=alpha_policy, analysis=analysis, curvature=curvature, finetune=subset,
                        allow_pickle=allow_pickle, allow_full_rank=True)
    plan.check_inputs()
    layers = plan.check_pair()  # headers only; builds the model on the meta device for names
    modules = [m for group in layers.values() for m in group]
    factors = plan.collect_curvature(modules, layout.svd_dir)
    clock.mark_discovered()
    results = [plan.analyze_layer(group, layout.svd_dir, factors) for group in layers.values()]
    clock.mark_spectra_done()
    split_half = plan.split_half(layout.split_half_dir, modules)
    config = plan.assemble(modules, results, layout.config_path, factors, split_half, clock.timings(results))
    unchanged = config.analysis_metadata.zero_delta_modules
    if unchanged:
        warnings.warn(zero_delta_message(unchanged, settings.min_rank), stacklevel=2)
    return config
