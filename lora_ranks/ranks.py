"""Stage 3: from spectra to one LoRA rank per module.

Each step is a small pure function; ``allocate_ranks`` composes them and records every intermediate
value so the config's metadata shows why a module got its rank:

1. raw rank: the smallest r whose top-r energy reaches tau of the *exact* total (``energy_rank``);
2. bounds: clip to [min_rank, max_rank] (and to min(d_out, d_in), the largest useful rank); a module whose raw
   rank exceeds max_rank is flagged ``saturated`` (full fine-tuning deltas of 4096-wide layers often need ranks
   in the thousands for 90%);
3. smoothing across depth: a moving median (or mean) over the same module type in neighbouring layers
   (``smooth_across_depth``), then clipped back into the bounds;
4. rounding up to a multiple (serving stacks like multiples of 8), never beyond max_rank.

The signal rule replaces 1: the raw rank is the number of singular values above the noise floor of the
module's weight spectrum (``noise.noise_floor``, Gavish-Donoho); bounds, smoothing and rounding follow as above.
Every module's floor and signal rank are recorded whatever the rule.

Budget mode replaces 1-3: ``water_fill`` spends a total trainable-parameter budget greedily on the
singular directions with the most energy per parameter, sigma_k^2 / (d_out + d_in), within the bounds, in
steps of ``round_to`` directions, so that ranks are multiples of it there too.

The options themselves (``AllocationSettings``) are declared in ``lora_ranks.settings``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .checkpoints import ModuleRef
from .errors import LoraRanksError
from .noise import NoiseFloor, noise_floor
from .settings import AllocationSettings, NoiseEstimate, Smoothing
from .spectra import Spectrum

__all__ = [
    "AllocationSettings",
    "BudgetError",
    "budget_bounds",
    "check_budget",
    "check_rank_bounds",
    "ModuleAllocation",
    "RANK_RULES",
    "RankRule",
    "allocate_ranks",
    "energy_rank",
    "smooth_across_depth",
    "round_rank",
    "water_fill",
    "lora_parameters",
]

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
    signal_rank: int | None = None  # singular values of the weight spectrum above its noise floor
    noise_threshold: float | None = None  # that floor (Gavish-Donoho), in units of the weight spectrum
    split_half_rank: int | None = None  # directions two fine-tunes on disjoint halves share (noise_estimate split-half)
    spectrum: str = "weight"  # the spectrum the rank was read from: weight, input or fisher
    fallback: str = ""  # why this module used another spectrum than asked, if it did

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


def smooth_across_depth(ranks: Sequence[int], method: Smoothing, window: int) -> list[int]:
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


class BudgetError(LoraRanksError):
    """A parameter budget that cannot be spent as asked (too small for the lower bounds, or more than the upper
    bounds can take); the message gives the numbers."""


def _budget_grid(shape: tuple[int, int], min_rank: int, max_rank: int, step: int,
                 computed: int | None = None) -> tuple[int, int]:
    """(starting rank, largest rank) of a module on water-filling's grid of multiples of ``step`` (see
    ``water_fill``); ``computed`` is the number of singular values at hand (None: enough)."""
    first = -(-min_rank // step) * step  # smallest multiple of step >= min_rank
    cap = min(max_rank, *shape, *(() if computed is None else (computed,)))
    top = (cap // step) * step or cap
    return min(first, top), top


def budget_bounds(shapes: Mapping[str, tuple[int, int]], min_rank: int, max_rank: int, step: int = 1) -> tuple[int, int]:
    """(fewest, most) LoRA parameters a budget allocation over ``shapes`` can spend: every module at its starting
    rank, and every module at its largest rank (``water_fill``'s grid)."""
    least = most = 0
    for shape in shapes.values():
        start, top = _budget_grid(shape, min_rank, max_rank, step)
        least += lora_parameters(shape, start)
        most += lora_parameters(shape, top)
    return least, most


def check_rank_bounds(settings: AllocationSettings, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Refuse a ``min_rank`` at or above the full rank min(d_out, d_in) of every module: each would be adapted at full
    rank, a full fine-tune with extra steps, whatever the spectra say.

    Raises:
        BudgetError: naming the largest full rank among the modules.
    """
    full = max(min(shape) for shape in shapes.values())
    if settings.min_rank >= full and full > 1:
        raise BudgetError(f"--min-rank {settings.min_rank} is at least the full rank of every module (at most {full}, "
                          f"min(d_out, d_in) of {len(shapes)} modules): every module would be adapted at full rank; "
                          f"lower --min-rank below {full}")


def check_budget(settings: AllocationSettings, shapes: Mapping[str, tuple[int, int]],
                 base_parameters: int | None = None) -> None:
    """Refuse, before any work, a budget (``settings.budget``) that water-filling cannot spend as asked.

    Raises:
        BudgetError: the budget is below what ``min_rank`` in every module costs, or above what ``max_rank`` in
            every module costs (every rank would be pinned at its upper bound), with both numbers.
    """
    if not settings.budget_mode:
        return
    budget = settings.budget_parameters(base_parameters)
    least, most = budget_bounds(shapes, settings.min_rank, settings.max_rank, settings.round_to)
    given = f"--budget {settings.budget:g}" + (f" ({budget:,} parameters)" if settings.budget <= 1 else "")
    if budget < least:
        raise BudgetError(f"{given} is below the {least:,} LoRA parameters that rank {settings.min_rank} (--min-rank) in "
                          f"each of the {len(shapes)} modules costs: raise the budget or lower --min-rank")
    if budget > most:
        raise BudgetError(f"{given} is more than the {most:,} LoRA parameters that the largest ranks (--max-rank "
                          f"{settings.max_rank}, or the module's own size) in all {len(shapes)} modules cost: every "
                          "rank would be pinned at its upper bound; lower the budget or raise --max-rank")


def water_fill(
    shapes: Mapping[str, tuple[int, int]],
    spectra: Mapping[str, Spectrum],
    budget: int,
    min_rank: int,
    max_rank: int,
    step: int = 1,
) -> dict[str, int]:
    """Spend ``budget`` LoRA parameters across modules, greedily by energy per parameter.

    Ranks move on the grid of multiples of ``step`` (the settings' ``round_to``): every module starts at the
    smallest multiple of ``step`` that is at least ``min_rank``, and its largest rank is the largest multiple
    of ``step`` within ``max_rank``, min(d_out, d_in) and its computed singular values. (A module too small for
    any multiple of ``step`` keeps the largest rank it allows.) Then the next ``step`` singular directions of
    some module are added, always choosing the increment with the largest sum(s_i^2) / (step * (d_out + d_in))
    that still fits the budget, until nothing fits or every module is at its largest rank. Because each
    module's s_i^2 is non-increasing, this greedy order is optimal for the relaxed (fractional) problem of
    maximizing retained energy at a parameter budget.

    Raises:
        BudgetError: if the budget cannot pay for the starting ranks (names the minimum needed).
    """
    first = -(-min_rank // step) * step  # smallest multiple of step >= min_rank
    grid = {n: _budget_grid(shape, min_rank, max_rank, step, len(spectra[n].singular_values))
            for n, shape in shapes.items()}
    top = {n: g[1] for n, g in grid.items()}
    ranks = {n: g[0] for n, g in grid.items()}
    spent = sum(lora_parameters(shapes[n], r) for n, r in ranks.items())
    if spent > budget:
        raise BudgetError(
            f"parameter budget {budget:,} is below the {spent:,} needed to give every module rank {first} "
            f"(min_rank={min_rank} rounded up to a multiple of round_to={step}); raise the budget or lower min_rank"
        )
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        r = ranks[name]
        if r + step > top[name]:
            return
        gain = float(np.sum(spectra[name].singular_values[r: r + step] ** 2))
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


@dataclass(frozen=True)
class _RuleContext:
    """What a rank rule reads: the modules, their spectra, the settings, every module's noise floor (of its weight
    spectrum), the split-half ranks when they were estimated, and each module's largest useful rank."""

    modules: Sequence[ModuleRef]
    spectra: Mapping[str, Spectrum]
    settings: AllocationSettings
    base_parameters: int | None
    floors: Mapping[str, NoiseFloor]
    split_half: Mapping[str, int] | None
    cap: Mapping[str, int]


def _energy_ranks(c: _RuleContext) -> dict[str, int | None]:
    """Raw ranks: the smallest r keeping ``energy_threshold`` of each module's exact energy."""
    return {m.name: energy_rank(c.spectra[m.name], c.settings.energy_threshold) for m in c.modules}


def _signal_ranks(c: _RuleContext) -> dict[str, int | None]:
    """Raw ranks: the directions above the noise, from the weight spectrum's noise floor or the split-half ranks."""
    if c.settings.noise_estimate is NoiseEstimate.SPLIT_HALF:
        if c.split_half is None:
            raise ValueError("rank_rule signal with noise_estimate split-half needs the split-half ranks (two "
                             "fine-tunes on halves of the data)")
        return {m.name: c.split_half[m.name] for m in c.modules}
    return {m.name: c.floors[m.name].signal_rank for m in c.modules}


def _smoothed_and_rounded(c: _RuleContext, bounded: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(smoothed, final): bounded ranks smoothed across depth per module type, clipped back into the bounds, then
    rounded up to multiples of ``round_to``."""
    smoothed = dict(bounded)
    by_type: dict[str, list[ModuleRef]] = {}
    for m in c.modules:
        by_type.setdefault(m.module_type, []).append(m)
    for group in by_type.values():
        group = sorted(group, key=lambda m: m.depth)
        values = smooth_across_depth([bounded[m.name] for m in group], c.settings.smoothing, c.settings.smoothing_window)
        for m, v in zip(group, values):
            smoothed[m.name] = min(max(v, c.settings.min_rank), c.cap[m.name])
    final = {n: round_rank(r, c.settings.round_to, c.cap[n]) for n, r in smoothed.items()}
    return smoothed, final


def _water_filled(c: _RuleContext, bounded: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(smoothed, final): the budget water-filled across modules (``water_fill``); no smoothing, which would break the
    budget (smoothed = bounded)."""
    budget = c.settings.budget_parameters(c.base_parameters)
    shapes = {m.name: m.shape for m in c.modules}
    final = water_fill(shapes, c.spectra, budget, c.settings.min_rank, c.settings.max_rank, c.settings.round_to)
    return dict(bounded), final


@dataclass(frozen=True)
class RankRule:
    """A rank rule: how raw ranks are read off the spectra, and how final ranks follow from the bounded ones."""

    raw_ranks: Callable[[_RuleContext], dict[str, int | None]]
    final_ranks: Callable[[_RuleContext, Mapping[str, int]], tuple[dict[str, int], dict[str, int]]]
    design_name: str  # what the original design calls the mode (recorded as the config's ``mode``)


#: The rank rules by ``AllocationSettings.rank_rule``; a new rule is an entry here (and a value of that field).
RANK_RULES: dict[str, RankRule] = {
    "energy": RankRule(_energy_ranks, _smoothed_and_rounded, "energy_threshold"),
    "signal": RankRule(_signal_ranks, _smoothed_and_rounded, "signal"),
    "budget": RankRule(_energy_ranks, _water_filled, "budget"),
}


def allocate_ranks(
    modules: Sequence[ModuleRef],
    spectra: Mapping[str, Spectrum],
    settings: AllocationSettings,
    base_parameters: int | None = None,
    *,
    weight_spectra: Mapping[str, Spectrum] | None = None,
    kinds: Mapping[str, str] | None = None,
    fallbacks: Mapping[str, str] | None = None,
    split_half: Mapping[str, int] | None = None,
) -> list[ModuleAllocation]:
    """Decide the rank of every module.

    Args:
        modules: the analyzed modules (names, types, depths, shapes).
        spectra: ``module.name -> Spectrum`` with at least ``settings.required_top_k`` values (or the full
            spectrum of smaller matrices): the spectra ranks are read from (weight or curvature-weighted).
        settings: rule, threshold, bounds, smoothing, rounding, budget.
        base_parameters: base-model parameter count, needed when the budget is a fraction.
        weight_spectra: the plain spectra of the deltas, for the noise floor, when ``spectra`` are weighted
            (default: ``spectra``).
        kinds: module name -> which spectrum ``spectra`` holds ("weight", "input", "fisher"), recorded.
        fallbacks: module name -> why it fell back to another spectrum than asked, recorded.
        split_half: module name -> split-half rank (``analysis.split_half``), recorded; the signal rule's rank
            when ``settings.noise_estimate`` is "split-half" (then required by that rule).

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

    weight_spectra = weight_spectra or spectra
    context = _RuleContext(modules, spectra, settings, base_parameters,
                           floors={m.name: noise_floor(weight_spectra[m.name]) for m in modules},
                           split_half=split_half,
                           # A rank above min(d_out, d_in) adds parameters but no expressiveness: cap there too.
                           cap={m.name: min(settings.max_rank, min(m.shape)) for m in modules})
    rule = RANK_RULES[settings.rank_rule]
    raw = rule.raw_ranks(context)
    zero = {m.name: spectra[m.name].total_energy <= 0.0 for m in modules}  # unchanged modules: min_rank
    bounded = {}
    for m in modules:
        r = raw[m.name]
        bounded[m.name] = context.cap[m.name] if r is None else min(max(r, settings.min_rank), context.cap[m.name])
    saturated = {m.name: raw[m.name] is None or raw[m.name] > settings.max_rank for m in modules}
    smoothed, final = rule.final_ranks(context, bounded)
    floors = context.floors

    out = []
    for m in modules:
        spectrum = spectra[m.name]
        r = final[m.name]
        kept = spectrum.energy_kept(r)
        out.append(ModuleAllocation(name=m.name, module_type=m.module_type, layer=m.layer, depth=m.depth,
                                    shape=m.shape, raw_rank=raw[m.name], saturated=saturated[m.name],
                                    bounded_rank=bounded[m.name], smoothed_rank=smoothed[m.name], final_rank=r,
                                    energy_retained=kept, zero_delta=zero[m.name], weight_key=m.weight_key,
                                    signal_rank=floors[m.name].signal_rank, noise_threshold=floors[m.name].threshold,
                                    split_half_rank=(split_half or {}).get(m.name),
                                    spectrum=(kinds or {}).get(m.name, "weight"),
                                    fallback=(fallbacks or {}).get(m.name, "")))
    return out
