"""Truncated SVD as LoRA factors: the best rank-r adapter for a weight delta (Eckart-Young).

For a delta dW with LoRA scale s (alpha / r, or alpha / sqrt(r) with rsLoRA), the truncated SVD
dW_r = U_r diag(sigma_r) V_r^T (the best rank-r approximation in Frobenius and spectral norm) is split evenly
between the two factors::

    lora_B = U_r diag(sqrt(sigma_r)) / sqrt(s)      # (d_out, r)
    lora_A = diag(sqrt(sigma_r)) V_r^T / sqrt(s)     # (r, d_in)      so that  s * B @ A = dW_r
"""

from __future__ import annotations

import torch

__all__ = ["truncated_svd_factors"]


def truncated_svd_factors(delta: torch.Tensor, rank: int, scale: float,
                          precision: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors of the best rank-``rank`` approximation of ``delta`` (Eckart-Young).

    The top singular subspace comes from ``eigh`` of the Gram matrix of the short side in ``precision``
    (float32 by default: 2x faster than float64). With Q that orthonormal basis, the approximation is the
    projection of ``delta`` onto it (Q Q^T dW, or dW Q Q^T), whose error has the exact closed form
    ||dW||^2 - ||Q^T dW||^2, evaluated in float64. Rounding in the float32 Gram perturbs the kept energy by
    about eps32 * sqrt(n) * s_1^2; when that could move the relative error by more than 1e-6 (small errors,
    i.e. ranks reaching into a noise floor), the factors are recomputed with a float64 Gram.

    Args:
        delta: Tensor (d_out, d_in), any float dtype.
        rank: r <= min(d_out, d_in).
        scale: the LoRA scaling s that PEFT applies to B @ A.

    Returns:
        (lora_A (r, d_in) float32, lora_B (d_out, r) float32, relative Frobenius error of s * B @ A).
    """
    d_out, d_in = delta.shape
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank must be in [1, {min(d_out, d_in)}] for a {tuple(delta.shape)} delta, got {rank=}")
    a = delta.to(precision)
    rows_short = d_out < d_in
    gram = a @ a.T if rows_short else a.T @ a  # (n, n), n = the short side
    _, eigvecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    basis = torch.flip(eigvecs[:, -rank:], (1,)).to(torch.float64)  # (n, r) top singular vectors of that side
    # Re-orthonormalize in float64 (QR keeps the span and, with the sign fix, the order): the closed-form
    # error below needs Q^T Q = I to ~1e-16, float32 eigh delivers ~1e-7.
    q, r_factor = torch.linalg.qr(basis)
    basis = q * torch.sign(torch.diagonal(r_factor))
    a64 = delta.to(torch.float64)
    projected = basis.T @ a64 if rows_short else a64 @ basis  # (r, d_in) or (d_out, r): dW restricted to the basis
    energy = torch.linalg.vector_norm(projected, dim=1 if rows_short else 0) ** 2  # (r,) = sigma_i^2 (Rayleigh)
    total = float(torch.linalg.vector_norm(a64) ** 2)
    kept = float(energy.sum())
    rel_error = (max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0
    if precision != torch.float64 and total > 0:
        eps = torch.finfo(precision).eps
        energy_excess = eps * gram.shape[0] ** 0.5 * float(energy.max()) / total  # float32 Gram's effect, estimated
        if energy_excess / (2 * max(rel_error, 1e-12)) > 1e-6:
            return truncated_svd_factors(delta, rank, scale, torch.float64)
    sigma = torch.sqrt(energy)
    nonzero = sigma > (sigma.max() * 1e-12 if sigma.numel() else 0)  # round-off directions: zero, never divide
    root = torch.where(nonzero, torch.sqrt(sigma), torch.zeros_like(sigma))  # (r,)
    inv_root = torch.where(nonzero, 1.0 / torch.where(nonzero, root, torch.ones_like(root)), torch.zeros_like(root))
    if rows_short:  # dW_r = Q (Q^T dW): B = Q diag(sqrt s_i), A = diag(1/sqrt s_i) Q^T dW
        lora_b = basis * root
        lora_a = projected * inv_root[:, None]
    else:  # dW_r = (dW Q) Q^T: B = dW Q diag(1/sqrt s_i), A = diag(sqrt s_i) Q^T
        lora_b = projected * inv_root
        lora_a = (basis * root).T
    norm = scale ** -0.5  # split the LoRA scale evenly: s * B @ A = dW_r
    return (norm * lora_a).float().contiguous(), (norm * lora_b).float().contiguous(), rel_error
