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
