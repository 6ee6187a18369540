"""Rank allocations to compare at equal trainable parameters: uniform, energy threshold, budget water-filling."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from ..checkpoints import ModuleRef
from ..config import RankConfig, build_rank_config
from ..ranks import allocate_ranks, lora_parameters
from ..settings import AllocationSettings, AlphaPolicy
from ..spectra import Spectrum

__all__ = ["uniform_allocation", "allocation_configs"]


def uniform_allocation(modules: Sequence[ModuleRef], budget: int) -> dict[str, int]:
    """The largest single rank r (capped per module at min(d_out, d_in)) whose parameters fit ``budget``."""
    best = {m.name: 1 for m in modules}
    for r in range(1, max(min(m.shape) for m in modules) + 1):
        ranks = {m.name: min(r, min(m.shape)) for m in modules}
        if sum(lora_parameters(m.shape, ranks[m.name]) for m in modules) > budget:
            break
        best = ranks
    return best


def allocation_configs(modules: Sequence[ModuleRef], spectra: Mapping[str, Spectrum], base_parameters: int,
                       settings: AllocationSettings, alpha_policy: AlphaPolicy = AlphaPolicy(),
                       extra_metadata: Mapping | None = None,
                       split_half: Mapping[str, int] | None = None) -> dict[str, RankConfig]:
    """Rank configs for the comparison at (about) equal trainable parameters (``extra_metadata`` is recorded in
    each, e.g. the analysis' curvature record, so that extraction can use the matching truncation).

    "energy" uses ``settings`` (the method of the original design; ``split_half``: the analysis' split-half
    ranks, which its signal rule may need); "budget" water-fills exactly its
    parameter count; "uniform" takes the largest single rank that does not exceed it.
    """
    energy = allocate_ranks(modules, spectra, settings, split_half=split_half)
    budget = sum(lora_parameters(a.shape, a.final_rank) for a in energy)
    budget_settings = settings.replace(rank_rule="budget", budget=float(budget))
    water = allocate_ranks(modules, spectra, budget_settings)
    uniform_ranks = uniform_allocation(modules, budget)
    uniform = []
    for a in energy:
        r = uniform_ranks[a.name]
        kept = spectra[a.name].energy_kept(r)
        uniform.append(dataclasses.replace(a, bounded_rank=r, smoothed_rank=r, final_rank=r, energy_retained=kept))
    out = {}
    for label, allocs, used in (("uniform", uniform, settings), ("energy", energy, settings), ("budget", water, budget_settings)):
        out[label] = build_rank_config(allocs, used, base_parameters=base_parameters, alpha_policy=alpha_policy,
                                       extra_metadata={**(extra_metadata or {}), "allocation": label,
                                                       "budget_parameters": budget})
    return out
