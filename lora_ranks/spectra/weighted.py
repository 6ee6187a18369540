"""Loss-weighted spectra and truncations of a weight delta, from Kronecker curvature factors.

With the K-FAC factors of a linear module, A = E[x xᵀ] (d_in, d_in) of its inputs and G = E[g gᵀ] (d_out, d_out)
of the loss gradients at its outputs (``lora_ranks.kfac``), the second-order loss increase of perturbing the
weight by E is ½ tr(G E A Eᵀ) = ½ ‖G^½ E A^½‖_F². So the singular values of the weighted delta

    M = G^½ ΔW A^½        (d_out, d_in)

rank the directions of ΔW by what dropping them costs in loss (σ_i² / 2 each, in the units of G), which makes
them comparable across modules; the plain spectrum of ΔW (G = A = I) does not. With G = I it is the input-weighted
spectrum (the output error of the module), with A = I the output-weighted one.

Damping. The factors are estimated from a finite calibration set and are often singular (fewer tokens than
dimensions, directions the data never excites). Both are damped, A + λ_A I with λ_A = ``damping`` × mean
eigenvalue of A (likewise G), Tikhonov damping as in K-FAC (Martens & Grosse 2015) and GPTQ. The spectrum and the
truncation use the same damped factors, so the truncation minimizes exactly the objective whose spectrum is
reported; as damping grows both tend to the plain SVD of ΔW (up to a scale).

Cost: one ``eigh`` of each factor (O(d³), shared by the modules that see the same input) and two products of
ΔW with a square factor, O(d_out d_in (d_out + d_in)); all in float64.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .spectrum import Spectrum, compute_spectrum

__all__ = ["SymmetricRoot", "symmetric_root", "weighted_spectrum", "weighted_truncation_factors"]


@dataclass(frozen=True)
class SymmetricRoot:
    """A damped symmetric PSD factor C + λI through its eigendecomposition: the square root and its inverse.

    Attributes:
        eigenvalues: Tensor (d,), float64, ascending, damped (all > 0 unless the factor is zero and undamped).
        eigenvectors: Tensor (d, d), float64, orthonormal columns.
        damping: the absolute λ added.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    damping: float

    def root(self) -> torch.Tensor:
        """(C + λI)^½: Tensor (d, d), float64."""
        return (self.eigenvectors * self.eigenvalues.clamp(min=0).sqrt()) @ self.eigenvectors.T

    def inverse_root(self) -> torch.Tensor:
        """(C + λI)^-½ (pseudo-inverse on exactly zero eigenvalues): Tensor (d, d), float64."""
        values = self.eigenvalues.clamp(min=0)
        inv = torch.where(values > 0, values.rsqrt(), torch.zeros_like(values))
        return (self.eigenvectors * inv) @ self.eigenvectors.T


def symmetric_root(factor: torch.Tensor | None, dim: int, damping: float) -> SymmetricRoot:
    """Eigendecomposition of ``factor`` + ``damping`` × mean eigenvalue × I; ``factor=None`` stands for I.

    Args:
        factor: Tensor (d, d), symmetric PSD (any float dtype; computed in float64), or None.
        dim: d (used when ``factor`` is None).
        damping: relative damping, >= 0.
    """
    if factor is None:
        return SymmetricRoot(torch.ones(dim, dtype=torch.float64), torch.eye(dim, dtype=torch.float64), 0.0)
    if factor.shape != (dim, dim):
        raise ValueError(f"curvature factor has shape {tuple(factor.shape)}, expected ({dim}, {dim})")
    c = factor.to(torch.float64)
    c = (c + c.T) / 2  # symmetric to round-off
    shift = damping * float(torch.diagonal(c).mean())  # mean eigenvalue = trace / d
    values, vectors = torch.linalg.eigh(c + shift * torch.eye(dim, dtype=torch.float64))
    return SymmetricRoot(values, vectors, shift)


def _weighted(delta: torch.Tensor, out_root: SymmetricRoot, in_root: SymmetricRoot) -> torch.Tensor:
    """M = G^½ ΔW A^½ in float64: Tensor (d_out, d_in)."""
    return out_root.root() @ delta.to(torch.float64) @ in_root.root()


def weighted_spectrum(delta: torch.Tensor, top_k: int, *, output_root: SymmetricRoot, input_root: SymmetricRoot,
                      method: str = "auto", device: str | None = None) -> Spectrum:
    """Exact energy and top singular values of G^½ ΔW A^½ (see the module docstring).

    Args:
        delta: Tensor (d_out, d_in), the weight delta.
        top_k: singular values wanted (max_rank + 1).
        output_root, input_root: the damped roots of G (d_out) and A (d_in) from ``symmetric_root``.
        method, device: as for ``compute_spectrum`` (the float64 Gram by default on the CPU).

    Returns:
        Spectrum of the weighted delta: ``total_energy`` = ‖G^½ ΔW A^½‖_F² = tr(G ΔW A ΔWᵀ) (damped factors).
    """
    start = time.perf_counter()
    weighted = _weighted(delta, output_root, input_root)  # (d_out, d_in)
    spectrum = compute_spectrum(weighted, top_k, method=method, device=device)
    return Spectrum(**{**spectrum.__dict__, "seconds": time.perf_counter() - start})


def weighted_truncation_factors(delta: torch.Tensor, rank: int, scale: float, *, output_root: SymmetricRoot,
                                input_root: SymmetricRoot) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors of the rank-``rank`` L minimizing ‖G^½ (ΔW − L) A^½‖_F (damped factors).

    With M = G^½ ΔW A^½ = U S Vᵀ, the minimizer is L = G^-½ M_r A^-½ (M_r the truncated SVD; Eckart-Young in the
    weighted norm, since X ↦ G^½ X A^½ is a bijection on rank-r matrices when both roots are invertible, which
    damping guarantees). It is split as s · B A with balanced factors, from L's own SVD L = P Σ Qᵀ:

        lora_B = P diag(√Σ) / √s     (d_out, r)
        lora_A = diag(√Σ) Qᵀ / √s    (r, d_in),

    as the plain truncated SVD splits. The obvious split (G^-½ U_r √S_r, √S_r V_rᵀ A^-½) is the same product but
    badly unbalanced (G^-½ is large where gradients are small): as a warm start it trained to a clearly worse loss
    than a cold start in BENCHMARKS.md's experiment. L's SVD comes from the thin QRs of the obvious factors and an
    r x r SVD, so it costs O((d_out + d_in) r²).

    Returns:
        (lora_A (r, d_in) float32, lora_B (d_out, r) float32, relative weighted error ‖M − M_r‖_F / ‖M‖_F).
    """
    d_out, d_in = delta.shape
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank must be in [1, {min(d_out, d_in)}] for a {tuple(delta.shape)} delta, got {rank=}")
    weighted = _weighted(delta, output_root, input_root)
    u, s, vh = torch.linalg.svd(weighted, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    total = float(torch.sum(s**2))
    rel_error = (float(torch.sum(s[rank:] ** 2)) / total) ** 0.5 if total > 0 else 0.0
    root_s = s[:rank].sqrt()  # (r,)
    norm = scale ** -0.5  # split the LoRA scale evenly between the factors
    lora_b = output_root.inverse_root() @ (u[:, :rank] * root_s)  # (d_out, r), unbalanced
    lora_a = (root_s[:, None] * vh[:rank]) @ input_root.inverse_root()  # (r, d_in), unbalanced
    lora_a, lora_b = _balanced(lora_a, lora_b)
    return (norm * lora_a).float().contiguous(), (norm * lora_b).float().contiguous(), rel_error


def _balanced(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors (A (r, d_in), B (d_out, r)) of the same product B A with equal singular values: B = P √Σ,
    A = √Σ Qᵀ for B A = P Σ Qᵀ (thin QR of both factors, then an r x r SVD)."""
    q_b, r_b = torch.linalg.qr(lora_b)  # (d_out, r), (r, r)
    q_a, r_a = torch.linalg.qr(lora_a.T)  # (d_in, r), (r, r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # (r, r) each
    root = s.sqrt()
    return (root[:, None] * vh) @ q_a.T, q_b @ (u * root)
