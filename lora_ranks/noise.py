"""The noise floor of a delta's spectrum: how many directions rise above what noise alone would give.

A brief fine-tune on a small subset leaves optimizer noise in ΔW, spread over all directions; an energy rule
counts it as signal. Modelled as ΔW = S + N with N of i.i.d. entries of variance ν, the singular values of N fill
a Marchenko-Pastur bulk whose edge is about √ν (√m + √n), and Gavish & Donoho (2014, "The optimal hard threshold
for singular values is 4/√3") give the threshold that minimizes the error of the truncated estimate of S:

    known ν:    τ = λ*(β) √n √ν,   λ*(β) = √(2(β+1) + 8β / (β+1 + √(β² + 14β + 1)))
    unknown ν:  τ = ω(β) · median(s),   ω(β) ≈ 0.56 β³ − 0.95 β² + 1.82 β + 1.43

for an m x n matrix with β = m / n ≤ 1 (n the long side). ``signal_rank`` is the number of singular values above
τ. From the whole spectrum (the exact methods return it) the median rule is used. From a top-k spectrum the noise
variance is estimated from the exact total energy less that of the directions above the threshold,
ν = (‖ΔW‖² − Σ_{s_i > τ} s_i²) / (m n − r (m + n − r)) (the degrees of freedom a rank-r signal takes), iterated from
the energy the top k leave until the signal rank stops changing. Only the plain weight spectrum fits this noise
model (a curvature-weighted one reshapes the noise), so the floor is always read from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .spectra import Spectrum

__all__ = ["NoiseFloor", "noise_floor", "optimal_threshold_coefficient", "median_threshold_coefficient"]


@dataclass(frozen=True)
class NoiseFloor:
    """The estimated noise threshold of one spectrum and the count of singular values above it.

    Attributes:
        threshold: τ, in the units of the singular values (float).
        signal_rank: the number of singular values > τ (int).
        method: "median" (whole spectrum, unknown noise level) or "tail" (top-k, noise level from the tail energy).
    """

    threshold: float
    signal_rank: int
    method: str


def optimal_threshold_coefficient(beta: float) -> float:
    """λ*(β) of Gavish & Donoho (2014), eq. (11): the optimal threshold over √n σ for a known noise level."""
    return math.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + math.sqrt(beta**2 + 14 * beta + 1)))


def median_threshold_coefficient(beta: float) -> float:
    """ω(β) of Gavish & Donoho (2014), eq. (5): the optimal threshold over the median singular value (their cubic
    approximation, accurate to about 0.02)."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def noise_floor(spectrum: Spectrum) -> NoiseFloor:
    """The noise threshold and signal rank of a weight-delta spectrum (see the module docstring).

    A zero delta has threshold 0 and signal rank 0.
    """
    s = np.asarray(spectrum.singular_values, dtype=np.float64)
    m, n = sorted(spectrum.shape)  # m <= n
    beta = m / n
    if spectrum.total_energy <= 0 or s.size == 0 or s[0] <= 0:
        return NoiseFloor(0.0, 0, "median")
    if s.size >= m:  # the whole spectrum
        threshold = median_threshold_coefficient(beta) * float(np.median(s[:m]))
        method = "median"
    else:
        k = s.size
        variance = max(spectrum.total_energy - float(np.sum(s**2)), 0.0) / max(1, (m - k) * (n - k))
        rank = -1
        for _ in range(20):  # a fixed point: the rank above the threshold, and the noise energy besides it
            threshold = optimal_threshold_coefficient(beta) * math.sqrt(n * variance)
            new_rank = int(np.count_nonzero(s > threshold))
            if new_rank == rank:
                break
            rank = new_rank
            noise_energy = max(spectrum.total_energy - float(np.sum(s[:rank] ** 2)), 0.0)
            variance = noise_energy / max(1, m * n - rank * (m + n - rank))
        method = "tail"
    return NoiseFloor(threshold, int(np.count_nonzero(s > threshold)), method)
