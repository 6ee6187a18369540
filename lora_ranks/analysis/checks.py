"""What an analysis checks before any work: the device, the pair's headers, the budget, and (cheaply) the weights.

The command line runs these before Prefect starts, the ``svd-analysis`` flow before it fine-tunes or analyzes a
layer, so that bad input ends the run in seconds with nothing written.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from ..checkpoints import CheckpointPair, ModuleRef
from ..devices import resolve_device
from ..ranks import check_budget, check_rank_bounds
from ..settings import AllocationSettings, AnalysisSettings

__all__ = ["check_pair", "check_before_finetune"]


def check_pair(base: str | Path, finetuned: str | Path, analysis: AnalysisSettings, allocation: AllocationSettings,
               *, allow_pickle: bool = False, read_weights: bool = True) -> OrderedDict[str, list[ModuleRef]]:
    """Check an existing pair before analyzing it; returns its target modules by layer.

    Checked: the device, every problem the headers show (``CheckpointPair.preflight``), the rank bounds and the
    budget against the modules' shapes (``ranks.check_rank_bounds``: no --min-rank that makes every module full
    rank; ``ranks.check_budget``) and, with ``read_weights``, NaN or Inf in any analyzed weight and a pair that is
    identical (``CheckpointPair.check_contents``: one read of the analyzed weights, I/O-bound). The library's
    ``analyze_checkpoints`` allows full-rank bounds (a reference for exact extraction); the command line does not.

    Raises:
        DeviceError, CheckpointError, BudgetError: naming what is wrong.
    """
    resolve_device(analysis.device)
    pair = CheckpointPair(base, finetuned, allow_pickle=allow_pickle)
    layers = pair.preflight(analysis.targets)
    modules = [m for group in layers.values() for m in group]
    check_rank_bounds(allocation, {m.name: m.shape for m in modules})
    check_budget(allocation, {m.name: m.shape for m in modules}, pair.base_parameters if allocation.budget_mode else None)
    if read_weights:
        pair.check_contents(modules)
    return layers


def check_before_finetune(base: str | Path, analysis: AnalysisSettings, allocation: AllocationSettings, *,
                          allow_pickle: bool = False) -> None:
    """Check what a run that fine-tunes first can know from the base alone: the device, and the rank bounds and the
    budget against the base's target modules (the fine-tuned model has the same shapes).

    Raises:
        DeviceError, CheckpointError, BudgetError: naming what is wrong.
    """
    resolve_device(analysis.device)
    pair = CheckpointPair(base, base, allow_pickle=allow_pickle)
    shapes = {m.name: m.shape for m in pair.modules(analysis.targets)}
    check_rank_bounds(allocation, shapes)
    check_budget(allocation, shapes, pair.base_parameters if allocation.budget_mode else None)
