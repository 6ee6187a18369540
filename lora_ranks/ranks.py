"""Stage 3: from spectra to one LoRA rank per module.

Each step is a small pure function; ``allocate_ranks`` composes them and records every intermediate
value so the config's metadata shows why a module got its rank:

1. raw rank: the smallest r whose top-r energy reaches tau of the *exact* total (``energy_rank``);
2. bounds: clip to [min_rank, max_rank] (and to min(d_out, d_in), the largest useful rank); a module whose raw rank exceeds max_rank is flagged
   ``saturated`` (full fine-tuning deltas of 4096-wide layers often need ranks in the thousands for 90%);
3. smoothing across depth: a moving median (or mean) over the same module type in neighbouring layers
   (``smooth_across_depth``), then clipped back into the bounds;
4. rounding up to a multiple (serving stacks like multiples of 8), never beyond max_rank.

Budget mode replaces 1-3: ``water_fill`` spends a total trainable-parameter budget greedily on the
singular directions with the most energy per parameter, sigma_k^2 / (d_out + d_in), within the bounds.
"""

from __future__ import annotations

import heapq
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np

from .checkpoints import ModuleRef
from .spectra import Spectrum

__all__ = [
    "AllocationSettings",
    "ModuleAllocation",
    "allocate_ranks",
    "energy_rank",
    "smooth_across_depth",
    "round_rank",
    "water_fill",
    "lora_parameters",
]

Smoothing = Literal["none", "median", "mean"]


@dataclass(frozen=True)
class AllocationSettings:
    """How spectra become ranks. Every field is recorded in the config's metadata."""

    energy_threshold: float = 0.9
    """tau: fraction of ||dW||_F^2 the rank must keep; 0.9 is the original design's default."""
    min_rank: int = 4
    """Lower bound: below 4, LoRA adapters train poorly and serving gains nothing."""
    max_rank: int = 128
    """Upper bound: keeps adapters small (memory, latency); modules that want more are flagged saturated."""
    smoothing: Smoothing = "median"
    """Across-depth smoothing per module type: a median resists single-layer outliers; "none" turns it off."""
    smoothing_window: int = 3
    """Odd window length (layers) of the moving median/mean; 3 = each layer and its two neighbours."""
    round_to: int = 1
    """Round final ranks up to a multiple of this (e.g. 8 for serving stacks); 1 = no rounding."""
    budget_parameters: int | None = None
    """Budget mode: total LoRA parameters sum r * (d_in + d_out) to spend; replaces threshold ranks."""
    budget_fraction: float | None = None
    """Budget mode: the budget as a fraction of the base model's parameters (e.g. 0.01)."""

    def __post_init__(self) -> None:
        if not (0.0 < self.energy_threshold <= 1.0) or math.isnan(self.energy_threshold):
            raise ValueError(f"energy_threshold must be in (0, 1], got energy_threshold={self.energy_threshold}")
        if not isinstance(self.min_rank, int) or self.min_rank < 1:
            raise ValueError(f"min_rank must be an integer >= 1, got min_rank={self.min_rank!r}")
        if not isinstance(self.max_rank, int) or self.max_rank < self.min_rank:
            raise ValueError(f"max_rank must be an integer >= min_rank, got min_rank={self.min_rank}, max_rank={self.max_rank!r}")
        if self.smoothing not in ("none", "median", "mean"):
            raise ValueError(f"smoothing must be 'none', 'median' or 'mean', got smoothing={self.smoothing!r}")
        if self.smoothing_window < 1 or self.smoothing_window % 2 == 0:
            raise ValueError(f"smoothing_window must be a positive odd integer, got smoothing_window={self.smoothing_window}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got round_to={self.round_to}")
        if self.round_to > self.max_rank:
            raise ValueError(f"round_to ({self.round_to}) exceeds max_rank ({self.max_rank})")
        if self.budget_parameters is not None and self.budget_fraction is not None:
            raise ValueError("give budget_parameters or budget_fraction, not both")
        if self.budget_parameters is not None and self.budget_parameters <= 0:
            raise ValueError(f"budget_parameters must be positive, got budget_parameters={self.budget_parameters}")
        if self.budget_fraction is not None and not (0.0 < self.budget_fraction <= 1.0):
            raise ValueError(f"budget_fraction must be in (0, 1], got budget_fraction={self.budget_fraction}")

    @property
    def budget_mode(self) -> bool:
        return self.budget_parameters is not None or self.budget_fraction is not None

    @property
    def required_top_k(self) -> int:
        """Singular values needed per module: max_rank + 1 so saturation is visible."""
        return self.max_rank + 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModuleAllocation:
    """Rank decision for one module (all ranks are integers; ``raw_rank`` is None when tau is not reached
    within the computed singular values, i.e. the raw rank exceeds ``len(singular_values)``)."""

    name: str
    module_type: str
    layer: str
    depth: int
    shape: tuple[int, int]
    raw_rank: int | None
    saturated: bool
    bounded_rank: int
    smoothed_rank: int
    final_rank: int
    energy_retained: float
    zero_delta: bool = False
    weight_key: str = ""  # tensor name on disk, so later stages can read the weight without transformers

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def lora_parameters(shape: tuple[int, int], rank: int) -> int:
    """Trainable parameters of a rank-r LoRA on a (d_out, d_in) weight: r * (d_in + d_out)."""
    return rank * (shape[0] + shape[1])


def energy_rank(spectrum: Spectrum, energy_threshold: float) -> int | None:
    """Smallest r with sum_{i<=r} s_i^2 >= tau * ||dW||_F^2, or None if the computed values do not reach it.

    Returns 0 for a zero delta. The comparison allows a relative slack of 1e-12 so that tau = 1 is reached
    by a full spectrum despite round-off.
    """
    if spectrum.total_energy <= 0.0:
        return 0
    cumulative = spectrum.cumulative_energy()  # (k,)
    hits = np.nonzero(cumulative >= energy_threshold * (1.0 - 1e-12))[0]
    if hits.size == 0:
        return None
    return int(hits[0]) + 1


def smooth_across_depth(ranks: Sequence[int], method: Smoothing = "median", window: int = 3) -> list[int]:
    """Moving median/mean of ``ranks`` (one module type, ordered by depth); the window shrinks at the ends.

    The mean is rounded to the nearest integer (halves up). ``method="none"`` returns the input.
    """
    if method == "none" or window == 1 or len(ranks) <= 1:
        return list(ranks)
    half = window // 2
    out = []
    for i in range(len(ranks)):
        neighbourhood = ranks[max(0, i - half): i + half + 1]
        value = float(np.median(neighbourhood)) if method == "median" else float(np.mean(neighbourhood))
        out.append(int(math.floor(value + 0.5)))
    return out


def round_rank(rank: int, multiple: int, max_rank: int) -> int:
    """Round ``rank`` up to a multiple of ``multiple``, capped at the largest multiple <= max_rank (or max_rank)."""
    if multiple <= 1:
        return rank
    rounded = -(-rank // multiple) * multiple
    cap = (max_rank // multiple) * multiple or max_rank
    return min(rounded, cap)


def water_fill(
    shapes: Mapping[str, tuple[int, int]],
    spectra: Mapping[str, Spectrum],
    budget: int,
    min_rank: int,
    max_rank: int,
    step: int = 1,
) -> dict[str, int]:
    """Spend ``budget`` LoRA parameters across modules, greedily by energy per parameter.

    Every module starts at ``min_rank`` (capped by its singular-value count). Then the next ``step``
    singular directions of some module are added, always choosing the increment with the largest
    sum(s_i^2) / (step * (d_out + d_in)) that still fits the budget, until nothing fits or all modules
    are at ``max_rank``. Because each module's s_i^2 is non-increasing, this greedy order is optimal for
    the relaxed (fractional) problem of maximizing retained energy at a parameter budget.

    Raises:
        ValueError: if the budget cannot pay for ``min_rank`` everywhere (names the minimum needed).
    """
    ranks = {name: min(min_rank, *shapes[name]) for name in shapes}
    spent = sum(lora_parameters(shapes[n], r) for n, r in ranks.items())
    if spent > budget:
        raise ValueError(
            f"parameter budget {budget:,} is below the {spent:,} needed to give every module min_rank={min_rank}; "
            "raise the budget or lower min_rank"
        )
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        r = ranks[name]
        s = spectra[name].singular_values
        if r + step > min(max_rank, len(s)):
            return
        gain = float(np.sum(s[r: r + step] ** 2))
        cost = step * (shapes[name][0] + shapes[name][1])
        heapq.heappush(heap, (-gain / cost, name))

    for name in shapes:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        cost = step * (shapes[name][0] + shapes[name][1])
        if spent + cost > budget:
            continue  # this module's next increment does not fit; cheaper ones may still
        ranks[name] += step
        spent += cost
        push(name)
    return ranks


def allocate_ranks(
    modules: Sequence[ModuleRef],
    spectra: Mapping[str, Spectrum],
    settings: AllocationSettings,
    base_parameters: int | None = None,
) -> list[ModuleAllocation]:
    """Decide the rank of every module.

    Args:
        modules: the analyzed modules (names, types, depths, shapes).
        spectra: ``module.name -> Spectrum`` with at least ``settings.required_top_k`` values (or the full
            spectrum of smaller matrices).
        settings: threshold, bounds, smoothing, rounding, budget.
        base_parameters: base-model parameter count, needed for ``budget_fraction``.

    Returns:
        One ModuleAllocation per module, in the order of ``modules``.
    """
    missing = [m.name for m in modules if m.name not in spectra]
    if missing:
        raise ValueError(f"no spectrum for {len(missing)} module(s), first: {missing[0]!r}")
    for m in modules:
        k = len(spectra[m.name].singular_values)
        if k < min(settings.required_top_k, *m.shape):
            raise ValueError(
                f"spectrum of {m.name!r} has {k} values; max_rank={settings.max_rank} needs "
                f"{settings.required_top_k} (or the full spectrum)"
            )

    raw = {m.name: energy_rank(spectra[m.name], settings.energy_threshold) for m in modules}
    zero = {m.name: spectra[m.name].total_energy <= 0.0 for m in modules}
    if any(zero.values()):
        names = [n for n, z in zero.items() if z]
        warnings.warn(f"{len(names)} module(s) did not change during fine-tuning (zero delta), e.g. {names[0]!r}; "
                      f"they get min_rank={settings.min_rank}", stacklevel=2)
    # A rank above min(d_out, d_in) adds parameters but no expressiveness: cap there too.
    cap = {m.name: min(settings.max_rank, min(m.shape)) for m in modules}
    bounded = {}
    for m in modules:
        r = raw[m.name]
        bounded[m.name] = cap[m.name] if r is None else min(max(r, settings.min_rank), cap[m.name])
    saturated = {m.name: raw[m.name] is None or raw[m.name] > settings.max_rank for m in modules}

    if settings.budget_mode:
        budget = settings.budget_parameters
        if budget is None:
            if base_parameters is None:
                raise ValueError("budget_fraction needs base_parameters (the base model's parameter count)")
            budget = int(settings.budget_fraction * base_parameters)
        shapes = {m.name: m.shape for m in modules}
        filled = water_fill(shapes, spectra, budget, settings.min_rank, settings.max_rank, settings.round_to)
        smoothed = dict(bounded)  # smoothing does not apply in budget mode (it would break the budget)
        final = filled
    else:
        smoothed = dict(bounded)
        by_type: dict[str, list[ModuleRef]] = {}
        for m in modules:
            by_type.setdefault(m.module_type, []).append(m)
        for group in by_type.values():
            group = sorted(group, key=lambda m: m.depth)
            values = smooth_across_depth([bounded[m.name] for m in group], settings.smoothing, settings.smoothing_window)
            for m, v in zip(group, values):
                smoothed[m.name] = min(max(v, settings.min_rank), cap[m.name])
        final = {n: round_rank(r, settings.round_to, cap[n]) for n, r in smoothed.items()}

    out = []
    for m in modules:
        spectrum = spectra[m.name]
        r = final[m.name]
        kept = float(spectrum.cumulative_energy()[min(r, len(spectrum.singular_values)) - 1]) if not zero[m.name] else 1.0
        out.append(ModuleAllocation(m.name, m.module_type, m.layer, m.depth, m.shape, raw[m.name],
                                    saturated[m.name], bounded[m.name], smoothed[m.name], r, kept, zero[m.name],
                                    m.weight_key))
    return out
