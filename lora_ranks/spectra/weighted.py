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

No eigendecomposition is needed: for any roots with G = R_G R_Gᵀ and A = R_A R_Aᵀ (``FactorRoot``; by default the
Cholesky factors), σ(R_Gᵀ ΔW R_A) = σ(G^½ ΔW A^½), and the truncation's minimizer is recovered with triangular
solves. Cost: one Cholesky factorization of each factor (d³/3 flops, shared by the modules that see the same
input), two products of ΔW with a triangular factor, about d_out d_in (d_out + d_in) flops as triangular products
(``times_lower``; twice that as dense ones), and the spectrum; all in float64. The eigendecomposition path
(``symmetric_root``) is the reference and the fallback for factors that are not positive definite.

Wide factors: ``projected.py`` (a factor too wide to form, kept on the module's short side).

Device. With ``device`` a CUDA device, the products and eigenvalues run there in float64 (exact, as on the CPU);
a CUDA out-of-memory error computes that module on the CPU instead and says so (``Spectrum.cuda_oom_fallback``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..devices import cuda_or_cpu
from .spectrum import (
    Spectrum,
    compute_spectrum,
    default_device,
)

__all__ = ["FactorRoot", "balanced_factors", "factor_root", "symmetric_root", "times_lower", "weighted_spectrum",
           "weighted_truncation_factors"]


@dataclass(frozen=True)
class FactorRoot:
    """A square root R of a damped PSD curvature factor, C + λI = R Rᵀ, and the products the weighted spectra need.

    Any such R gives the same weighted spectrum and truncation: Rᵀ = Q (C + λI)^½ for an orthogonal Q (polar
    decomposition), so σ(R_Gᵀ ΔW R_A) = σ(G^½ ΔW A^½), and the loss-aware truncation R_G^-ᵀ M_r R_A^-1 of
    M = R_Gᵀ ΔW R_A is the same matrix for every choice of roots. Three kinds:

    - ``cholesky``: R = L, the lower-triangular Cholesky factor; triangular products with L (``times_lower``: 56% of
      a dense product's flops at d = 3584) and triangular solves. The default: a Cholesky factorization costs d³/3
      flops, an ``eigh`` about 9 d³ (measured 32x faster at d = 4096).
    - ``eigh``: R = (C + λI)^½, the symmetric root, through an eigendecomposition (pseudo-inverse on exactly zero
      eigenvalues). The reference, and the fallback where the damped factor is not positive definite (an undamped
      singular or all-zero factor), where Cholesky fails.
    - ``identity``: no weighting on that side (R = I).

    Attributes:
        kind: "cholesky", "eigh" or "identity".
        root: Tensor (d, d), float64: L, the symmetric root, or I.
        inverse: Tensor (d, d), float64, for ``eigh`` only: the (pseudo-)inverse of ``root``; else None.
        damping: the absolute λ added.
    """

    kind: str
    root: torch.Tensor
    inverse: torch.Tensor | None
    damping: float

    def to(self, device: torch.device | str) -> FactorRoot:
        """This root with its tensors on ``device`` (float64 kept)."""
        inverse = None if self.inverse is None else self.inverse.to(device)
        return FactorRoot(self.kind, self.root.to(device), inverse, self.damping)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """R X for X (d, n)."""
        if self.kind == "identity":
            return x
        return self.root @ x if self.kind == "eigh" else times_lower(x.T, self.root, transposed=True).T

    def left(self, x: torch.Tensor) -> torch.Tensor:
        """Rᵀ X for X (d, n): the output side of M = R_Gᵀ ΔW R_A."""
        if self.kind == "identity":
            return x
        return self.root.T @ x if self.kind == "eigh" else times_lower(x.T, self.root).T

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """X R for X (n, d): the input side of M."""
        if self.kind == "identity":
            return x
        return x @ self.root if self.kind == "eigh" else times_lower(x, self.root)

    def left_inverse(self, x: torch.Tensor) -> torch.Tensor:
        """R^-ᵀ X for X (d, n) (a triangular solve for Cholesky roots)."""
        if self.kind == "identity":
            return x
        if self.kind == "eigh":
            return self.inverse.T @ x
        return torch.linalg.solve_triangular(self.root.T, x, upper=True)

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        """X R^-1 for X (n, d) (a triangular solve for Cholesky roots)."""
        if self.kind == "identity":
            return x
        if self.kind == "eigh":
            return x @ self.inverse
        return torch.linalg.solve_triangular(self.root, x, upper=False, left=False)


#: Below this width a triangular product is one plain matrix product (the zeros' flops cost less than more calls).
_TRIANGULAR_BLOCK = 512


def times_lower(x: torch.Tensor, lower: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """X L for X (n, d) and a lower-triangular L (d, d), or X Lᵀ (L upper-triangular) with ``transposed``; the other
    triangle of ``lower`` is never read.

    A triangular matrix product (BLAS ``trmm``, which torch does not expose) by recursive halving: with
    L = [[L11, 0], [L21, L22]], X L = [X1 L11 + X2 L21, X2 L22], so each level does one full product of a quarter of
    L and recurses on the two diagonal blocks, down to ``_TRIANGULAR_BLOCK``. It costs (1/2 + O(block / d)) of the
    2 n d² flops of ``x @ lower`` (56% at d = 3584), all in matrix products; round-off is that of a matrix product
    (the same sums, in another order).

    Returns:
        Tensor (n, d) in the inputs' dtype, on their device.
    """
    d = lower.shape[0]
    if d <= _TRIANGULAR_BLOCK:
        triangle = torch.tril(lower)
        return x @ (triangle.T if transposed else triangle)
    h = d // 2
    out = torch.empty(x.shape[0], d, dtype=torch.result_type(x, lower), device=x.device)
    if transposed:  # X Lᵀ with Lᵀ = [[L11ᵀ, L21ᵀ], [0, L22ᵀ]]: [X1 L11ᵀ, X1 L21ᵀ + X2 L22ᵀ]
        out[:, :h] = times_lower(x[:, :h], lower[:h, :h], transposed=True)
        out[:, h:] = times_lower(x[:, h:], lower[h:, h:], transposed=True)
        out[:, h:].addmm_(x[:, :h], lower[h:, :h].T)
    else:
        out[:, :h] = times_lower(x[:, :h], lower[:h, :h])
        out[:, :h].addmm_(x[:, h:], lower[h:, :h])
        out[:, h:] = times_lower(x[:, h:], lower[h:, h:])
    return out


def _damped(factor: torch.Tensor, dim: int, damping: float) -> tuple[torch.Tensor, float]:
    """(C + λI with λ = ``damping`` × mean eigenvalue of C, λ): Tensor (d, d) float64, symmetrized."""
    if factor.shape != (dim, dim):
        raise ValueError(f"curvature factor has shape {tuple(factor.shape)}, expected ({dim}, {dim})")
    c = factor.to(torch.float64)
    c = (c + c.T) / 2  # symmetric to round-off
    shift = damping * float(torch.diagonal(c).mean())  # mean eigenvalue = trace / d
    return c + shift * torch.eye(dim, dtype=torch.float64, device=c.device), shift


def _identity(dim: int) -> FactorRoot:
    return FactorRoot("identity", torch.eye(dim, dtype=torch.float64), None, 0.0)


def factor_root(factor: torch.Tensor | None, dim: int, damping: float,
                device: torch.device | str | None = None) -> FactorRoot:
    """The Cholesky root of ``factor`` + ``damping`` × mean eigenvalue × I (``factor=None`` stands for I); the
    symmetric (eigh) root where the damped factor is not positive definite.

    Args:
        factor: Tensor (d, d), symmetric PSD (any float dtype; computed in float64), or None.
        dim: d.
        damping: relative damping, >= 0.
        device: where to factor it and keep the root (float64 there: the same root as on the CPU up to
            round-off); None: where ``factor`` is. A CUDA out-of-memory error factors it on the CPU.

    Cost: O(d³/3) for the factorization; products and solves with the root are O(d² n).
    """
    if factor is None:
        return _identity(dim) if device is None else _identity(dim).to(device)
    if device is not None and torch.device(device).type == "cuda":
        return cuda_or_cpu(lambda d: factor_root(factor.to(d), dim, damping), device)[0]
    damped, shift = _damped(factor, dim, damping)
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:  # not positive definite: the exact eigendecomposition, with its pseudo-inverse
        return symmetric_root(factor, dim, damping)
    return FactorRoot("cholesky", lower, None, shift)


def symmetric_root(factor: torch.Tensor | None, dim: int, damping: float) -> FactorRoot:
    """The symmetric root (C + λI)^½ through an eigendecomposition (``factor=None`` stands for I): the reference
    for ``factor_root``, and its fallback. Cost: one ``eigh``, O(9 d³)."""
    if factor is None:
        return _identity(dim)
    damped, shift = _damped(factor, dim, damping)
    values, vectors = torch.linalg.eigh(damped)
    values = values.clamp(min=0)
    inverse = torch.where(values > 0, values.rsqrt(), torch.zeros_like(values))
    return FactorRoot("eigh", (vectors * values.sqrt()) @ vectors.T, (vectors * inverse) @ vectors.T, shift)


def _weighted(delta: torch.Tensor, out_root: FactorRoot, in_root: FactorRoot) -> torch.Tensor:
    """M = R_Gᵀ ΔW R_A in float64: Tensor (d_out, d_in)."""
    return in_root.right(out_root.left(delta.to(torch.float64)))


def weighted_spectrum(delta: torch.Tensor, top_k: int, *, output_root: FactorRoot, input_root: FactorRoot,
                      method: str = "auto", device: str | None = None) -> Spectrum:
    """Exact energy and top singular values of G^½ ΔW A^½ (see the module docstring).

    Args:
        delta: Tensor (d_out, d_in), the weight delta.
        top_k: singular values wanted (max_rank + 1).
        output_root, input_root: the damped roots of G (d_out) and A (d_in) from ``factor_root``.
        method, device: as for ``compute_spectrum`` (the float64 Gram by default on the CPU). On CUDA the weighted
            matrix is formed there too, in float64, and ``compute_spectrum`` runs its method and accuracy check there.

    Returns:
        Spectrum of the weighted delta: ``total_energy`` = ‖R_Gᵀ ΔW R_A‖_F² = tr(G ΔW A ΔWᵀ) (damped factors).
    """
    start = time.perf_counter()
    dev = torch.device(device) if device is not None else default_device()
    where = dev if dev.type == "cuda" else output_root.root.device  # on CUDA the weighted matrix is formed there
    weighted, _ = cuda_or_cpu(lambda d: _weighted(delta.to(d), output_root.to(d), input_root.to(d)), where)  # float64
    spectrum = compute_spectrum(weighted, top_k, method=method, device=device)
    return Spectrum(**{**spectrum.__dict__, "seconds": time.perf_counter() - start})


def weighted_truncation_factors(delta: torch.Tensor, rank: int, scale: float, *, output_root: FactorRoot,
                                input_root: FactorRoot) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors of the rank-``rank`` L minimizing ‖G^½ (ΔW − L) A^½‖_F (damped factors).

    With M = R_Gᵀ ΔW R_A = U S Vᵀ, the minimizer is L = R_G^-ᵀ M_r R_A^-1 (M_r the truncated SVD; Eckart-Young in
    the weighted norm, since ‖R_Gᵀ X R_A‖_F = ‖G^½ X A^½‖_F and X ↦ R_Gᵀ X R_A is a bijection on rank-r matrices
    when both roots are invertible, which damping guarantees; the same L for every choice of roots). It is split as
    s · B A with balanced factors, from L's own SVD L = P Σ Qᵀ:

        lora_B = P diag(√Σ) / √s     (d_out, r)
        lora_A = diag(√Σ) Qᵀ / √s    (r, d_in),

    as the plain truncated SVD splits. The obvious split (R_G^-ᵀ U_r √S_r, √S_r V_rᵀ R_A^-1) is the same product but
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
    lora_b = output_root.left_inverse(u[:, :rank] * root_s)  # (d_out, r), unbalanced
    lora_a = input_root.right_inverse(root_s[:, None] * vh[:rank])  # (r, d_in), unbalanced
    lora_a, lora_b = balanced_factors(lora_a, lora_b)
    return (norm * lora_a).float().contiguous(), (norm * lora_b).float().contiguous(), rel_error


def balanced_factors(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors (A (r, d_in), B (d_out, r)) of the same product B A with equal singular values: B = P √Σ,
    A = √Σ Qᵀ for B A = P Σ Qᵀ (thin QR of both factors, then an r x r SVD)."""
    q_b, r_b = torch.linalg.qr(lora_b)  # (d_out, r), (r, r)
    q_a, r_a = torch.linalg.qr(lora_a.T)  # (d_in, r), (r, r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # (r, r) each
    root = s.sqrt()
    return (root[:, None] * vh) @ q_a.T, q_b @ (u * root)
