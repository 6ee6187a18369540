"""The allocation experiment's building blocks: allocations at equal budgets, and paired statistics over seeds.

``allocations_at_budget`` gives, for one parameter budget, the ranks of every allocation the experiment compares:
uniform ranks, the energy threshold tuned to the budget, and water-filling the budget on each spectrum (weight,
input-weighted, Fisher-weighted). ``paired_comparison`` compares two allocations trained on the same seeds:
the mean and standard deviation of the per-seed differences, the t statistic and its two-sided p-value
(Student's t with n − 1 degrees of freedom, computed here: no SciPy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..checkpoints import ModuleRef
from ..config import RankConfig, build_rank_config, parse_rank_config
from ..ranks import ModuleAllocation, allocate_ranks, lora_parameters
from ..settings import AllocationSettings, AlphaPolicy
from ..spectra import Spectrum
from .allocations import uniform_allocation

__all__ = ["parameters_of", "uniform_ranks", "energy_ranks_at_budget", "budget_ranks", "allocations_at_budget",
           "config_from_ranks", "budget_matrix_configs", "with_alpha_policy", "holm", "paired_comparison",
           "student_t_sf"]


def parameters_of(modules: Sequence[ModuleRef], ranks: Mapping[str, int]) -> int:
    """LoRA parameters of ``ranks``: sum of r (d_in + d_out)."""
    return sum(lora_parameters(m.shape, ranks[m.name]) for m in modules)


def uniform_ranks(modules: Sequence[ModuleRef], rank: int) -> dict[str, int]:
    """The same rank everywhere (capped at each module's short side)."""
    return {m.name: min(rank, *m.shape) for m in modules}


def budget_ranks(modules: Sequence[ModuleRef], spectra: Mapping[str, Spectrum], budget: int, *, min_rank: int,
                 max_rank: int) -> dict[str, int]:
    """Water-filling of ``budget`` parameters on ``spectra`` (energy per parameter; ``ranks.water_fill``)."""
    settings = AllocationSettings(rank_rule="budget", budget=float(budget), min_rank=min_rank, max_rank=max_rank,
                                  smoothing="none")
    return {a.name: a.final_rank for a in allocate_ranks(modules, spectra, settings)}


def energy_ranks_at_budget(modules: Sequence[ModuleRef], spectra: Mapping[str, Spectrum], budget: int, *,
                           min_rank: int, max_rank: int) -> tuple[dict[str, int], float]:
    """The energy-threshold ranks (no smoothing) of the largest tau whose parameters fit ``budget``, by bisection
    over tau: (ranks, tau)."""
    def ranks_at(tau: float) -> dict[str, int]:
        settings = AllocationSettings(energy_threshold=tau, min_rank=min_rank, max_rank=max_rank, smoothing="none")
        return {a.name: a.final_rank for a in allocate_ranks(modules, spectra, settings)}

    low, high = 1e-6, 1.0
    best = ranks_at(low)
    if parameters_of(modules, best) > budget:
        return best, low  # even the smallest tau (min_rank everywhere) exceeds the budget
    for _ in range(40):
        mid = (low + high) / 2
        ranks = ranks_at(mid)
        if parameters_of(modules, ranks) <= budget:
            low, best = mid, ranks
        else:
            high = mid
    return best, low


def allocations_at_budget(modules: Sequence[ModuleRef], spectra_by_kind: Mapping[str, Mapping[str, Spectrum]],
                          budget: int, *, min_rank: int = 1, max_rank: int = 64) -> dict[str, dict[str, int]]:
    """Every compared allocation at ``budget`` parameters: ``uniform`` (the largest single rank that fits),
    ``energy`` (tau tuned to the budget, on the weight spectrum), and ``budget-<kind>`` (water-filling) for each
    kind of spectrum given (``weight``, ``input``, ``fisher``)."""
    out = {"uniform": uniform_allocation(modules, budget),
           "energy": energy_ranks_at_budget(modules, spectra_by_kind["weight"], budget, min_rank=min_rank,
                                            max_rank=max_rank)[0]}
    for kind, spectra in spectra_by_kind.items():
        out[f"budget-{kind}"] = budget_ranks(modules, spectra, budget, min_rank=min_rank, max_rank=max_rank)
    return out


def config_from_ranks(modules: Sequence[ModuleRef], ranks: Mapping[str, int], base_parameters: int, *,
                      spectra: Mapping[str, Spectrum] | None = None, alpha_policy: AlphaPolicy = AlphaPolicy(),
                      min_rank: int = 1, max_rank: int = 64, extra_metadata: Mapping | None = None) -> RankConfig:
    """A rank config for given ranks (no rule applied: every stage of the allocation is ``ranks``); the energy each
    rank keeps is read from ``spectra`` when given (else recorded as 0)."""
    allocations = []
    for m in modules:
        r = ranks[m.name]
        kept = spectra[m.name].energy_kept(r) if spectra is not None else 0.0
        allocations.append(ModuleAllocation(name=m.name, module_type=m.module_type, layer=m.layer, depth=m.depth,
                                            shape=m.shape, raw_rank=r, saturated=False, bounded_rank=r, smoothed_rank=r,
                                            final_rank=r, energy_retained=kept, weight_key=m.weight_key))
    return build_rank_config(allocations, AllocationSettings(min_rank=min_rank, max_rank=max_rank),
                             base_parameters=base_parameters, alpha_policy=alpha_policy,
                             extra_metadata=dict(extra_metadata or {}))


def budget_matrix_configs(modules: Sequence[ModuleRef], spectra_by_kind: Mapping[str, Mapping[str, Spectrum]],
                          rank_budgets: Sequence[int], base_parameters: int, *, alpha_policy: AlphaPolicy = AlphaPolicy(),
                          min_rank: int = 1, max_rank: int = 64, extra_metadata: Mapping | None = None
                          ) -> dict[str, RankConfig]:
    """Rank configs of every allocation of ``allocations_at_budget`` at each budget ``r`` (the parameters of uniform
    rank r), labelled ``r<r>-<allocation>`` (e.g. ``r4-budget-fisher``); each records its allocation and budget."""
    per_rank = sum(m.shape[0] + m.shape[1] for m in modules)
    main = spectra_by_kind.get("weight") or next(iter(spectra_by_kind.values()))
    out = {}
    for r in rank_budgets:
        for method, ranks in allocations_at_budget(modules, spectra_by_kind, r * per_rank, min_rank=min_rank,
                                                   max_rank=max_rank).items():
            out[f"r{r}-{method}"] = config_from_ranks(
                modules, ranks, base_parameters, spectra=main, alpha_policy=alpha_policy, min_rank=min_rank,
                max_rank=max_rank, extra_metadata={**(extra_metadata or {}), "allocation": method, "budget_rank": r,
                                                   "budget_parameters": r * per_rank})
    return out


def with_alpha_policy(config: RankConfig, alpha_policy: AlphaPolicy) -> RankConfig:
    """``config``'s ranks under another alpha policy: ``alpha_pattern``, ``lora_alpha`` and ``use_rslora`` as
    ``build_rank_config`` sets them for that policy (e.g. lora-ranks at rsLoRA's scaling, alpha / sqrt(r))."""
    data = config.model_dump(mode="json")
    first_type = config.analysis_metadata.modules[config.target_modules[0]].module_type
    data.update(alpha_pattern={key: alpha_policy.alpha(rank) for key, rank in config.rank_pattern.items()},
                lora_alpha=alpha_policy.alpha(config.layer_ranks[first_type]),
                use_rslora=alpha_policy.policy == "rslora", alpha_policy=alpha_policy.model_dump())
    return parse_rank_config(data, source="rank config")


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979): the family-wise error rate of the comparisons ``pvalues``
    (name -> p) held at the level each adjusted p is compared with. Sorted ascending, the i-th smallest (i from 0) of
    m is multiplied by m - i, made non-decreasing and capped at 1."""
    order = sorted(pvalues, key=lambda name: pvalues[name])
    m, running, out = len(order), 0.0, {}
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[name]))
        out[name] = running
    return {name: out[name] for name in pvalues}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Lentz's method; Numerical Recipes, 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Per-seed differences a − b: mean, sample std, standard error, t = mean / se, two-sided p (df = n − 1).

    ``t`` is inf (and p 0) when every difference is the same nonzero value, nan (and p 1) when all are zero.
    """
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired comparison needs two equal-length samples of at least 2, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = std / math.sqrt(n)
    if se == 0:
        t = math.copysign(math.inf, mean) if mean != 0 else math.nan
        p = 0.0 if mean != 0 else 1.0
    else:
        t = mean / se
        p = 2.0 * student_t_sf(abs(t), n - 1)
    return {"mean": mean, "std": std, "se": se, "t": t, "p": p, "n": n}
