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

Where the fine-tuning data is at hand, a second estimate needs no noise model: fine-tune twice, on disjoint
halves of the subset, and count the directions the two deltas share (``subspace_agreement``). A direction the
data asks for appears in both; optimizer noise does not repeat. The agreement at rank r is the cosine of the
largest principal angle between the two top-r left singular subspaces times that of the right ones (Björck &
Golub 1973: the smallest singular value of U_aᵀ U_b); ``split_half_rank`` is the largest r whose agreement
reaches ``MIN_AGREEMENT``. Each half sees half the data, so its deltas are noisier than the full fine-tune's: the
estimate is conservative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .spectra import Spectrum

__all__ = ["NoiseFloor", "noise_floor", "optimal_threshold_coefficient", "median_threshold_coefficient",
           "subspace_agreement", "split_half_rank", "MIN_AGREEMENT"]

#: Agreement a rank must reach to count as shared by both halves: e.g. cosines of 0.71 on both sides. Two random
#: r-dimensional subspaces of a d-dimensional space have a largest-angle cosine near 0 for r much smaller than d.
MIN_AGREEMENT = 0.5


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


def subspace_agreement(delta_a: torch.Tensor, delta_b: torch.Tensor, k: int) -> np.ndarray:
    """How far the top singular subspaces of two deltas agree, rank by rank (see the module docstring).

    Args:
        delta_a, delta_b: Tensor (d_out, d_in), the deltas of two fine-tunes on disjoint halves of the data
            (any float dtype; computed in float64).
        k: ranks examined, 1 <= k <= min(d_out, d_in) // 2 (beyond half the dimension, any two subspaces are forced
            to overlap).

    Returns:
        (k,) float64: entry r - 1 is cos θ_max(U_a[:, :r], U_b[:, :r]) · cos θ_max(V_a[:, :r], V_b[:, :r]), in [0, 1].
        Cost: two full SVDs, O(d_out d_in min(d_out, d_in)), and k small ones.
    """
    if delta_a.shape != delta_b.shape:
        raise ValueError(f"deltas differ in shape: {tuple(delta_a.shape)} vs {tuple(delta_b.shape)}")
    if not 1 <= k <= min(delta_a.shape) // 2:
        raise ValueError(f"k must be in [1, {min(delta_a.shape) // 2}] for shape {tuple(delta_a.shape)}, got {k}")
    u_a, _, vh_a = torch.linalg.svd(delta_a.to(torch.float64), full_matrices=False)  # (m, p), (p, n)
    u_b, _, vh_b = torch.linalg.svd(delta_b.to(torch.float64), full_matrices=False)
    left = u_a[:, :k].T @ u_b[:, :k]  # (k, k) cosines between the two bases
    right = vh_a[:k] @ vh_b[:k].T
    out = np.empty(k)
    for r in range(1, k + 1):
        out[r - 1] = float(torch.linalg.svdvals(left[:r, :r])[-1] * torch.linalg.svdvals(right[:r, :r])[-1])
    return np.clip(out, 0.0, 1.0)


def split_half_rank(agreement: np.ndarray, min_agreement: float = MIN_AGREEMENT) -> int:
    """The largest rank r whose ``agreement[r - 1]`` reaches ``min_agreement`` (0 when none does). The largest,
    not the first drop: two directions of nearly equal strength may come in swapped order from the two halves,
    which lowers the agreement at the first of them and restores it at the second."""
    hits = np.nonzero(np.asarray(agreement) >= min_agreement)[0]
    return int(hits[-1]) + 1 if hits.size else 0
