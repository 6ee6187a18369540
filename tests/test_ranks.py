"""Rank allocation: each step on hand-computed cases."""

import itertools

import numpy as np
import pytest

from lora_ranks.checkpoints import ModuleRef
from lora_ranks.ranks import (
    AllocationSettings,
    allocate_ranks,
    energy_rank,
    lora_parameters,
    round_rank,
    smooth_across_depth,
    water_fill,
)
from lora_ranks.spectra import Spectrum


def _spectrum(values, total=None, shape=(64, 64)):
    values = np.asarray(values, dtype=np.float64)
    return Spectrum(values, float(np.sum(values**2)) if total is None else total, shape, "test", 0.0, 0.0)


@pytest.mark.parametrize("values,tau,expected", [
    ([3, 2, 1], 0.5, 1),          # 9/14 = 0.64 >= 0.5
    ([3, 2, 1], 0.9, 2),          # 13/14 = 0.93
    ([3, 2, 1], 1.0, 3),
    ([1, 1, 1, 1], 0.75, 3),      # exactly on the threshold counts as reached
    ([0, 0, 0], 0.9, 0),          # zero delta
])
def test_energy_rank(values, tau, expected):
    assert energy_rank(_spectrum(values), tau) == expected


def test_energy_rank_uses_the_exact_total_not_the_truncated_sum():
    # Top 3 of a longer spectrum: within the truncated list 3 values hold 100%, but of the true total only 14/28.
    s = _spectrum([3, 2, 1], total=28.0)
    assert energy_rank(s, 0.5) == 3
    assert energy_rank(s, 0.9) is None  # not reached within the computed values


@pytest.mark.parametrize("ranks,method,window,expected", [
    ([4, 40, 4, 4], "median", 3, [22, 4, 4, 4]),   # ends use the shrunken window: median(4, 40) = 22
    ([8, 8, 64, 8, 8], "median", 3, [8, 8, 8, 8, 8]),
    ([10, 20, 30], "mean", 3, [15, 20, 25]),
    ([10, 20, 30], "none", 3, [10, 20, 30]),
    ([5], "median", 3, [5]),
])
def test_smooth_across_depth(ranks, method, window, expected):
    assert smooth_across_depth(ranks, method, window) == expected


@pytest.mark.parametrize("rank,multiple,max_rank,expected", [(5, 8, 128, 8), (8, 8, 128, 8), (127, 8, 128, 128),
                                                              (130, 8, 100, 96), (3, 1, 128, 3)])
def test_round_rank(rank, multiple, max_rank, expected):
    assert round_rank(rank, multiple, max_rank) == expected


def _modules(shapes):
    return [ModuleRef(f"model.layers.{d}.mlp.{t}", f"model.layers.{d}.mlp.{t}.weight", shape, f"model.layers.{d}", d, t)
            for (d, t), shape in shapes.items()]


def test_water_fill_matches_brute_force_optimum():
    shapes = {"a": (4, 4), "b": (4, 12), "c": (8, 8)}  # cost per rank: 8, 16, 16
    spectra = {"a": _spectrum([3, 1, 0.5, 0.1], shape=(4, 4)), "b": _spectrum([4, 3, 2, 1], shape=(4, 12)),
               "c": _spectrum([2, 2, 1.5, 1, 0.5, 0.2, 0.1, 0.1], shape=(8, 8))}
    budget = 100
    got = water_fill(shapes, spectra, budget, min_rank=1, max_rank=4)
    spent = sum(lora_parameters(shapes[n], r) for n, r in got.items())
    assert spent <= budget
    energy = lambda ranks: sum(float(np.sum(spectra[n].singular_values[:r] ** 2)) for n, r in ranks.items())  # noqa: E731
    best = max(
        (dict(zip(shapes, rs)) for rs in itertools.product(range(1, 5), repeat=3)
         if sum(lora_parameters(shapes[n], r) for n, r in zip(shapes, rs)) <= budget),
        key=energy,
    )
    assert energy(got) == pytest.approx(energy(best))


def test_water_fill_refuses_a_budget_below_the_minimum():
    shapes = {"a": (4, 4)}
    with pytest.raises(ValueError, match="below the 32 needed"):
        water_fill(shapes, {"a": _spectrum([1, 1, 1, 1], shape=(4, 4))}, budget=10, min_rank=4, max_rank=4)


def test_allocate_flags_saturation_bounds_and_smooths():
    mods = _modules({(d, "up_proj"): (256, 256) for d in range(3)})
    flat = _spectrum(np.ones(129), total=256.0, shape=(256, 256))         # needs ~231 for 90%: saturated
    spiky = _spectrum([10] + [0.01] * 128, shape=(256, 256))              # rank 1 -> min bound 4
    spectra = {mods[0].name: spiky, mods[1].name: flat, mods[2].name: spiky}
    out = allocate_ranks(mods, spectra, AllocationSettings(smoothing="none"))
    assert [a.raw_rank for a in out] == [1, None, 1]
    assert [a.saturated for a in out] == [False, True, False]
    assert [a.final_rank for a in out] == [4, 128, 4]
    smoothed = allocate_ranks(mods, spectra, AllocationSettings(smoothing="median"))
    assert [a.final_rank for a in smoothed] == [66, 4, 66]  # medians of (4,128), (4,128,4), (128,4)
    for a in smoothed:
        assert 4 <= a.final_rank <= 128


def test_allocate_caps_rank_at_the_short_side():
    mods = _modules({(0, "k_proj"): (16, 64)})
    out = allocate_ranks(mods, {mods[0].name: _spectrum(np.ones(16), shape=(16, 64))}, AllocationSettings())
    assert out[0].final_rank == 15  # 15/16 >= 0.9 ; never above min(d_out, d_in) = 16


def test_budget_mode_spends_within_budget():
    shapes = {(d, "up_proj"): (128, 128) for d in range(4)}
    mods = _modules(shapes)
    rng = np.random.default_rng(0)
    spectra = {m.name: _spectrum(np.sort(rng.random(128))[::-1] * (d + 1), shape=(128, 128)) for d, m in enumerate(mods)}
    budget = 40 * 256 * 4
    out = allocate_ranks(mods, spectra, AllocationSettings(budget=budget))
    assert sum(lora_parameters(a.shape, a.final_rank) for a in out) <= budget
    assert out[-1].final_rank >= out[0].final_rank  # the high-energy module gets more
    frac = allocate_ranks(mods, spectra, AllocationSettings(budget=0.5), base_parameters=2 * budget)
    assert [a.final_rank for a in frac] == [a.final_rank for a in out]


@pytest.mark.parametrize("round_to,min_rank", [(8, 4), (8, 8), (4, 2), (1, 4)])
def test_round_to_means_the_same_in_budget_mode(round_to, min_rank):
    """Budget mode: final ranks are multiples of round_to within [min_rank, max_rank], as in threshold mode."""
    shapes = {(d, t): (256, 128) for d in range(4) for t in ("q_proj", "up_proj")}
    mods = _modules(shapes)
    rng = np.random.default_rng(1)
    spectra = {m.name: _spectrum(np.sort(rng.random(128) ** (i + 1))[::-1], shape=(256, 128)) for i, m in enumerate(mods)}
    budget = 20 * 384 * len(mods)
    settings = AllocationSettings(budget=budget, round_to=round_to, min_rank=min_rank, max_rank=64)
    out = allocate_ranks(mods, spectra, settings)
    ranks = [a.final_rank for a in out]
    assert all(r % round_to == 0 and min_rank <= r <= 64 for r in ranks), ranks
    assert sum(lora_parameters(a.shape, a.final_rank) for a in out) <= budget
    assert len(set(ranks)) > 1  # the budget is spread unevenly, by energy
    threshold = allocate_ranks(mods, spectra, AllocationSettings(round_to=round_to, min_rank=min_rank, max_rank=64))
    assert all(a.final_rank % round_to == 0 for a in threshold)


@pytest.mark.parametrize("kwargs,match", [
    (dict(energy_threshold=0.0), "energy_threshold"),
    (dict(energy_threshold=1.5), "energy_threshold"),
    (dict(min_rank=0), "min_rank"),
    (dict(min_rank=16, max_rank=8), "max_rank"),
    (dict(smoothing="gauss"), "smoothing"),
    (dict(smoothing_window=2), "smoothing_window"),
    (dict(budget=-5), "budget"),
    (dict(budget=0), "budget"),
    (dict(round_to=256), "round_to"),
])
def test_settings_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AllocationSettings(**kwargs)


def test_energy_kept_is_the_cumulative_share_capped_at_the_stored_values():
    spectrum = _spectrum([3.0, 2.0, 1.0], total=16.0)  # 14 of 16 stored: a tail of 2 beyond the top 3
    assert spectrum.energy_kept(1) == pytest.approx(9 / 16)
    assert spectrum.energy_kept(3) == spectrum.energy_kept(10) == pytest.approx(14 / 16)
    assert _spectrum([0.0, 0.0], total=0.0).energy_kept(1) == 1.0  # a zero delta has nothing to lose


def test_every_rank_rule_setting_has_a_registry_entry():
    """``AllocationSettings.rank_rule`` choices and ``RANK_RULES`` are the same set: a rule is added in both."""
    import typing

    from lora_ranks.ranks import RANK_RULES

    assert set(typing.get_args(AllocationSettings.model_fields["rank_rule"].annotation)) == set(RANK_RULES)
