"""Curvature kept on a module's short side, and the weighted spectrum and truncation of any module.

Wide factors (``ProjectedCurvature``). At Qwen2.5-7B's MLP a factor is 18944 x 18944: 2.9 GB in float64, a
Cholesky factorization of 25 s and a product with ΔW of 23 s on two CPU cores (BENCHMARKS.md), three per layer. Such a
factor is never formed. Every projection has one short side d_s (3584 there) and σ(M)² are the eigenvalues of the
d_s x d_s Gram of M on that side:

    side "input"  (d_in <= d_out):  Mᵀ M = R_Aᵀ (ΔWᵀ G ΔW + λ_G ΔWᵀ ΔW) R_A
    side "output" (d_out < d_in):   M Mᵀ = R_Gᵀ (ΔW A ΔWᵀ + λ_A ΔW ΔWᵀ) R_G,

where the projected far factor ΔWᵀ G ΔW (or ΔW A ΔWᵀ) is accumulated during the calibration pass from ΔWᵀ g (or
ΔW x) per token (``lora_ranks.kfac``), and ΔWᵀ ΔW is the weight spectrum's own Gram. The spectrum is exact (the
eigenvalues of a float64 Gram, the weight spectrum's "gram" method, same resolution), the energy is its trace, and
the truncation comes from the top eigenvectors of the same Gram (``projected_truncation_factors``). Cost per
module: the Gram of ΔW (d_s² d_long), two triangular d_s³ products and one d_s x d_s eigendecomposition, against
d_long³ / 3 + 2 d_long² d_s for the dense factors; no matrix of the wide side is ever held.

``module_weighted_spectrum`` and ``module_truncation_factors`` take a module's curvature in either form (dense roots,
``weighted.py``; or ``ProjectedCurvature``) and call the matching path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..devices import cuda_or_cpu
from .spectrum import Spectrum, default_device, resolve_method, short_side_gram, values_from_gram_eigenvalues
from .weighted import FactorRoot, balanced_factors, weighted_spectrum, weighted_truncation_factors

__all__ = ["ModuleCurvature", "ProjectedCurvature", "module_truncation_factors", "module_weighted_spectrum",
           "projected_spectrum", "projected_truncation_factors", "shares_gram"]


@dataclass(frozen=True)
class ProjectedCurvature:
    """The curvature of a module one of whose factors is too wide to form (``CurvatureSettings.dense_factor_limit``),
    kept on the module's short side (see the module docstring).

    Attributes:
        side: "input": near = A (d_in, the short side), far = G, ``projected`` = ΔWᵀ G ΔW (d_in, d_in);
            "output": near = G (d_out), far = A, ``projected`` = ΔW A ΔWᵀ (d_out, d_out).
        near_root: the damped root of the near factor (``factor_root``; identity for an input-only spectrum whose
            near factor is G).
        projected: Tensor (d_s, d_s), float64, the far factor seen through ΔW (undamped); None when the far factor
            is the identity (an input-only spectrum on side "input").
        far_shift: λ of the far factor, ``damping`` x its mean eigenvalue (trace / width); 0 with ``projected`` None.
    """

    side: str
    near_root: FactorRoot
    projected: torch.Tensor | None
    far_shift: float

    def __post_init__(self):
        if self.side not in ("input", "output"):
            raise ValueError(f"side must be 'input' or 'output', got {self.side!r}")


#: What a module's curvature is: dense (G root, A root), or kept on its short side.
ModuleCurvature = tuple[FactorRoot, FactorRoot] | ProjectedCurvature


def shares_gram(curvature: ModuleCurvature, delta: torch.Tensor, top_k: int, method: str = "auto",
                device: str | None = None) -> bool:
    """True when the weight spectrum of ``delta`` (``compute_spectrum`` with ``method`` on ``device``) is the Gram
    method on the CPU and ``curvature`` is projected onto the side that Gram is of: one Gram then serves both."""
    if not isinstance(curvature, ProjectedCurvature):
        return False
    dev = torch.device(device) if device is not None else default_device()
    return (dev.type == "cpu" and resolve_method(method, dev, tuple(delta.shape), top_k) == "gram"
            and curvature.side == ("input" if delta.shape[1] <= delta.shape[0] else "output"))


def _projected_gram(delta: torch.Tensor, curvature: ProjectedCurvature, device: torch.device,
                    gram: torch.Tensor | None) -> torch.Tensor:
    """T = R_nearᵀ (projected + λ_far D) R_near, (d_s, d_s) float64 on ``device``: the Gram of M on its short side."""
    d = short_side_gram(delta.to(device), curvature.side) if gram is None else gram.to(device, torch.float64)
    far = d if curvature.projected is None else curvature.projected.to(device, torch.float64) + curvature.far_shift * d
    root = curvature.near_root.to(device)
    t = root.left(root.right(far))
    return (t + t.T) / 2  # symmetric to round-off


def projected_spectrum(delta: torch.Tensor, top_k: int, curvature: ProjectedCurvature, *,
                       device: torch.device | str | None = None, gram: torch.Tensor | None = None) -> Spectrum:
    """Exact energy and singular values of M = G^½ ΔW A^½ from its short-side Gram (``ProjectedCurvature``).

    Args:
        delta: Tensor (d_out, d_in), the weight delta.
        top_k: singular values wanted (the whole spectrum of the short side is returned, as by the "gram" method).
        curvature: the module's projected curvature.
        device: where to compute (float64 there); None picks CUDA when visible.
        gram: ΔWᵀ ΔW or ΔW ΔWᵀ (the short side's), when the caller has it already (the weight spectrum's).

    Returns:
        Spectrum with method "projected-gram": values below sqrt(2 d_s eps64) s_1 are 0, as for "gram"; the energy
        tr(T) = tr(G_λ ΔW A_λ ΔWᵀ) (damped factors), exact.
    """
    start = time.perf_counter()
    dev = torch.device(device) if device is not None else default_device()
    (values, energy), oom = cuda_or_cpu(lambda d: _projected_values(delta, curvature, d, gram), dev)
    where = "cpu (CUDA out of memory)" if oom else str(dev)
    s, bound = values_from_gram_eigenvalues(values, min(top_k, values.shape[0]))
    return Spectrum(s.numpy().astype(np.float64), energy, tuple(delta.shape), "projected-gram", bound,
                    time.perf_counter() - start, where, cuda_oom_fallback=oom)


def _projected_values(delta, curvature, dev, gram) -> tuple[torch.Tensor, float]:
    """(ascending eigenvalues of T, float64 on the CPU; tr T)."""
    t = _projected_gram(delta, curvature, dev, gram)
    energy = float(torch.diagonal(t).sum())
    if dev.type == "cpu":
        values = torch.from_numpy(np.linalg.eigvalsh(t.numpy()))  # OpenBLAS dsyevd: faster than torch's here
    else:
        values = torch.linalg.eigvalsh(t).cpu()
    return values, max(energy, 0.0)


def projected_truncation_factors(delta: torch.Tensor, rank: int, scale: float, curvature: ProjectedCurvature, *,
                                 device: torch.device | str | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``weighted_truncation_factors`` for a module with ``ProjectedCurvature``: the same minimizer of
    ‖G^½ (ΔW − L) A^½‖_F, from the top eigenvectors of the short-side Gram T.

    Side "input": T = Mᵀ M = V S² Vᵀ, M_r = M V_r V_rᵀ, so L = R_G^-ᵀ M_r R_A^-1 = (ΔW R_A V_r)(V_rᵀ R_A^-1): G is
    never needed. Side "output": T = M Mᵀ = U S² Uᵀ and L = (R_G^-ᵀ U_r)(U_rᵀ R_Gᵀ ΔW). Then balanced as the dense
    path does. Eigenvectors of a Gram resolve a gap σ_r² − σ_{r+1}² to eps64 σ_1², as the "gram" spectrum does.
    Cost: one d_s x d_s eigendecomposition and products with ΔW, O(d_out d_in r).

    Returns:
        (lora_A (r, d_in) float32, lora_B (d_out, r) float32, relative weighted error ‖M − M_r‖_F / ‖M‖_F).
    """
    d_out, d_in = delta.shape
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank must be in [1, {min(d_out, d_in)}] for a {tuple(delta.shape)} delta, got {rank=}")
    dev = torch.device(device) if device is not None else default_device()
    return cuda_or_cpu(lambda d: _projected_truncation(delta, rank, scale, curvature, d), dev)[0]


def _projected_truncation(delta, rank, scale, curvature, dev):
    t = _projected_gram(delta, curvature, dev, None)
    values, vectors = torch.linalg.eigh(t)  # ascending
    values, top = torch.flip(values, (0,)).clamp(min=0.0), torch.flip(vectors[:, -rank:], (1,))  # (d_s,), (d_s, r)
    total = float(values.sum())
    rel_error = (float(values[rank:].sum()) / total) ** 0.5 if total > 0 else 0.0
    d = delta.to(dev, torch.float64)
    root = curvature.near_root.to(dev)
    if curvature.side == "input":
        lora_b, lora_a = d @ root.product(top), root.right_inverse(top.T)  # (d_out, r), (r, d_in)
    else:
        lora_b, lora_a = root.left_inverse(top), root.product(top).T @ d
    lora_a, lora_b = balanced_factors(lora_a, lora_b)
    norm = scale ** -0.5  # split the LoRA scale evenly between the factors
    return (norm * lora_a).float().cpu().contiguous(), (norm * lora_b).float().cpu().contiguous(), rel_error


def module_weighted_spectrum(delta: torch.Tensor, top_k: int, curvature: ModuleCurvature, *, method: str = "auto",
                             device: str | None = None, gram: torch.Tensor | None = None) -> Spectrum:
    """The weighted spectrum of one module, whichever form its curvature has (``gram``: projected form only)."""
    if isinstance(curvature, ProjectedCurvature):
        return projected_spectrum(delta, top_k, curvature, device=device, gram=gram)
    output_root, input_root = curvature
    return weighted_spectrum(delta, top_k, output_root=output_root, input_root=input_root, method=method,
                             device=device)


def module_truncation_factors(delta: torch.Tensor, rank: int, scale: float, curvature: ModuleCurvature
                              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The loss-aware truncation of one module, whichever form its curvature has (on the CPU for dense factors)."""
    if isinstance(curvature, ProjectedCurvature):
        return projected_truncation_factors(delta, rank, scale, curvature)
    output_root, input_root = curvature
    return weighted_truncation_factors(delta, rank, scale, output_root=output_root, input_root=input_root)
