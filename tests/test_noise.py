"""The noise floor: signal rank of planted low-rank signals in i.i.d. noise, from whole and top-k spectra."""

import numpy as np
import pytest
import torch

from lora_ranks.noise import median_threshold_coefficient, noise_floor, optimal_threshold_coefficient
from lora_ranks.spectra import compute_spectrum


def _planted(m, n, rank, strength, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64)).Q
    s = strength * torch.linspace(2.0, 1.0, rank, dtype=torch.float64)
    return (u * s) @ v.T + torch.randn(m, n, generator=gen, dtype=torch.float64)  # noise variance 1


def test_coefficients_match_the_paper():
    """Gavish & Donoho (2014): lambda*(1) = 4/sqrt(3); omega(1) ~ 2.858 (their Table 1)."""
    assert optimal_threshold_coefficient(1.0) == pytest.approx(4 / 3**0.5, rel=1e-12)
    assert median_threshold_coefficient(1.0) == pytest.approx(2.858, abs=0.02)


@pytest.mark.parametrize("shape,rank", [((400, 200), 6), ((150, 300), 3), ((256, 256), 10)])
@pytest.mark.parametrize("top_k", [None, 40])
def test_signal_rank_finds_planted_directions_above_the_bulk(shape, rank, top_k):
    """Planted singular values 1.5-3x the bulk edge sqrt(m) + sqrt(n) are all found, and nothing of the noise."""
    m, n = shape
    edge = m**0.5 + n**0.5
    delta = _planted(m, n, rank, strength=1.5 * edge)
    spectrum = compute_spectrum(delta, top_k or 1, method="svdvals" if top_k is None else "randomized")
    if top_k is not None:  # a top-k spectrum, as the randomized method returns
        from dataclasses import replace

        spectrum = replace(spectrum, singular_values=np.linalg.svd(delta.numpy(), compute_uv=False)[:top_k])
    floor = noise_floor(spectrum)
    assert floor.method == ("median" if top_k is None else "tail")
    assert floor.signal_rank == rank
    assert 0.8 * edge < floor.threshold < 1.5 * edge  # near the Marchenko-Pastur bulk edge


def test_pure_noise_has_no_signal_and_a_zero_delta_has_no_floor():
    noise = torch.randn(300, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert noise_floor(compute_spectrum(noise, 1, method="svdvals")).signal_rank == 0
    zero = compute_spectrum(torch.zeros(30, 20), 5)
    assert noise_floor(zero).signal_rank == 0 and noise_floor(zero).threshold == 0.0


def test_an_exactly_low_rank_delta_keeps_its_rank():
    """A merged LoRA (no noise): the round-off tail is zero, so every nonzero direction is signal."""
    gen = torch.Generator().manual_seed(2)
    delta = torch.randn(120, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, 80, generator=gen, dtype=torch.float64)
    assert noise_floor(compute_spectrum(delta, 20)).signal_rank == 5


def _shared_signal_two_noises(m, n, rank, strength, seed=0):
    """Two deltas with one planted rank-``rank`` signal and independent noise of variance 1 each."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64)).Q
    signal = (u * (strength * torch.linspace(2.0, 1.0, rank, dtype=torch.float64))) @ v.T
    return (signal + torch.randn(m, n, generator=gen, dtype=torch.float64),
            signal + torch.randn(m, n, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("shape,rank", [((300, 200), 5), ((128, 384), 8)])
def test_split_half_rank_counts_the_directions_both_halves_share(shape, rank):
    """A planted signal 2-4x the bulk edge is shared; the noise directions are not (agreement near 0)."""
    from lora_ranks.noise import split_half_rank, subspace_agreement

    m, n = shape
    a, b = _shared_signal_two_noises(m, n, rank, strength=2 * (m**0.5 + n**0.5))
    agreement = subspace_agreement(a, b, 30)
    assert agreement.shape == (30,) and np.all(agreement[:rank] > 0.8) and np.all(agreement[rank + 2:] < 0.3)
    assert split_half_rank(agreement) == rank


def test_subspace_agreement_against_principal_angles_by_hand():
    """Identical deltas agree at every rank; a reference by the definition (cosines of principal angles from QR
    bases, Björck-Golub) matches at each rank; independent noise agrees at no rank."""
    from lora_ranks.noise import split_half_rank, subspace_agreement

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(60, 40, generator=gen, dtype=torch.float64)
    b = a + 0.3 * torch.randn(60, 40, generator=gen, dtype=torch.float64)
    assert np.allclose(subspace_agreement(a, a, 20), 1.0)
    ours = subspace_agreement(a, b, 10)
    ua, _, va = np.linalg.svd(a.numpy())
    ub, _, vb = np.linalg.svd(b.numpy())
    for r in range(1, 11):
        left = np.linalg.svd(ua[:, :r].T @ ub[:, :r], compute_uv=False).min()
        right = np.linalg.svd(va[:r] @ vb[:r].T, compute_uv=False).min()
        assert ours[r - 1] == pytest.approx(left * right, abs=1e-10)
    noise = torch.randn(60, 40, generator=gen, dtype=torch.float64)
    assert split_half_rank(subspace_agreement(a, noise, 20)) == 0
    with pytest.raises(ValueError, match=r"k must be in \[1, 20\]"):
        subspace_agreement(a, a, 21)


def test_the_signal_rule_reads_the_chosen_noise_estimate():
    """rank_rule signal keeps the noise-floor rank, or with noise_estimate split-half the split-half rank (which it
    then needs); other rules only record the split-half ranks."""
    from lora_ranks.checkpoints import ModuleRef
    from lora_ranks.ranks import allocate_ranks
    from lora_ranks.settings import AllocationSettings

    delta = _planted(120, 80, 6, strength=2 * (120**0.5 + 80**0.5))
    module = ModuleRef("m", "m.weight", (120, 80), "layer.0", 0, "q_proj")
    spectra = {"m": compute_spectrum(delta, 41)}
    floor = allocate_ranks([module], spectra, AllocationSettings(rank_rule="signal", min_rank=1, max_rank=40))[0]
    assert floor.raw_rank == floor.signal_rank == 6 and floor.split_half_rank is None
    split = AllocationSettings(rank_rule="signal", noise_estimate="split-half", min_rank=1, max_rank=40)
    chosen = allocate_ranks([module], spectra, split, split_half={"m": 3})[0]
    assert chosen.raw_rank == chosen.final_rank == 3 and chosen.signal_rank == 6 and chosen.split_half_rank == 3
    with pytest.raises(ValueError, match="needs the split-half ranks"):
        allocate_ranks([module], spectra, split)
    energy = AllocationSettings(noise_estimate="split-half", min_rank=1, max_rank=40, smoothing="none")
    assert allocate_ranks([module], spectra, energy)[0].split_half_rank is None
