"""Stage 2: the spectrum of one weight delta: exact total energy and accurate top-k singular values.

Energy-based ranks need two numbers per candidate rank r: the energy kept, sum_{i<=r} s_i^2, and the
total energy ||dW||_F^2. Many extractors divide by the sum over a *truncated* spectrum, which overstates
the kept fraction; here the denominator is always the exact Frobenius norm (a float64 reduction over all
entries), and only the top-k values (k >= max rank) are computed, to a checked relative accuracy.

Methods (``method=``):

``"gram"``
    Eigenvalues of the float64 Gram matrix of the short side (``dWᵀdW`` or ``dWdWᵀ``), s = sqrt(lambda).
    Cost O(m n^2 + n^3) for n = min(m, n). On the CPU it runs through NumPy (BLAS ``dsyrk`` + LAPACK
    ``dsyevd``), on CUDA through torch. Backward-stable eigenvalues give
    |ds_i| / s_i <~ n * eps64 * (s_1 / s_i)^2 / 2, i.e. about 1e-10 at s_1 / s_i = 1e3: exact for our needs.
    Values below the resolution sqrt(2 n eps64) * s_1 (~1e-6 s_1) are returned as 0 (round-off, such as the
    zero tail of an exactly low-rank delta), for ``"svdvals"`` those below 2 n eps64 * s_1.
``"svdvals"``
    LAPACK singular values in float64 (the reference; slowest).
``"randomized"``
    Randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4) with q = k + oversample
    columns in float32, then a float64 Rayleigh-Ritz step and an *a-posteriori* check: for every Ritz
    triplet (s_i, u_i, v_i) with i < k the residual ``r_i = ||dW v_i - s_i u_i||`` bounds the distance from
    s_i to a true singular value (``dWᵀ u_i = s_i v_i`` holds exactly by construction), and Ritz values
    never exceed the true ones (interlacing). The check accepts when ``r_i <= tol * s_i`` for all i < k
    (pairs with s_i + r_i below the Gram resolution count as exact zeros and are returned as 0);
    otherwise more power iterations run, and after ``max_power_iters`` the exact Gram method is used.
    Slowly decaying or flat tails (a noise floor) converge slowly and usually end in that fallback:
    fast when the spectrum has structure, never wrong when it has not.
``"auto"``
    ``"gram"`` on the CPU. On CUDA, ``"randomized"`` when the short side is at least 3x q (eigvalsh is
    relatively slow there and matrix products fast), else ``"gram"``. Measured on 2 CPU cores (AMD EPYC,
    float64): 2816x1024, Gram 0.09 s vs LAPACK float32 ``svd`` 0.48 s (0.14 s ``svdvals``);
    18944x3584 (Qwen2.5-7B MLP), Gram 5 s vs randomized 26 s: on a planted noise floor the randomized check
    failed after 16 iterations and fell back to the Gram.

The GPU is used when one is visible (``device=None``); a CUDA out-of-memory error on one matrix falls
back to the CPU for that matrix and says so in ``Spectrum.cuda_oom_fallback`` (and, for people, in
``Spectrum.device``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..devices import cuda_or_cpu

__all__ = ["Spectrum", "SpectrumMethod", "compute_spectrum", "default_device", "gram_spectrum", "resolve_method",
           "short_side_gram"]

SpectrumMethod = Literal["auto", "gram", "svdvals", "randomized"]
_EPS64 = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class Spectrum:
    """Top singular values and exact energy of one delta matrix.

    Attributes:
        singular_values: ndarray of shape (k',), float64, non-increasing: the largest singular values. The
            exact methods ("gram", "svdvals") return the whole spectrum, k' = min(m, n), since LAPACK computes
            it anyway (so raw ranks above max_rank stay exact), values below the method's resolution
            (~1e-6 s_1 for "gram") set to 0; "randomized" returns k' = top_k.
        total_energy: ||dW||_F^2 over *all* singular values, float64 (exact, not from the truncated list).
        shape: (d_out, d_in) of the delta.
        method: method that produced the values ("gram", "svdvals", "randomized", or
            "randomized->gram" when the a-posteriori check failed and the exact fallback ran).
        rel_error_bound: estimated bound on max_i |s_i - s_i*| / s_i* over the top ``top_k`` values
            (from backward-error analysis for exact methods, from Ritz residuals for randomized).
        seconds: wall time of the computation.
        device: where it ran ("cpu", "cuda:0", "cpu (CUDA out of memory)").
        power_iters: subspace iterations used by the randomized method (0 otherwise).
        cuda_oom_fallback: True when CUDA raised ``torch.OutOfMemoryError`` and the values were computed on the
            CPU instead (what code tests; ``device`` says the same for people).
    """

    singular_values: np.ndarray
    total_energy: float
    shape: tuple[int, int]
    method: str
    rel_error_bound: float
    seconds: float
    device: str = "cpu"
    power_iters: int = 0
    cuda_oom_fallback: bool = False

    def cumulative_energy(self) -> np.ndarray:
        """Fraction of the total energy kept by the top r values, r = 1..k: ndarray (k,), float64."""
        if self.total_energy <= 0.0:
            return np.zeros_like(self.singular_values)
        return np.cumsum(self.singular_values**2) / self.total_energy

    def energy_kept(self, rank: int) -> float:
        """Fraction of the total energy kept by the top ``rank`` values (ranks beyond the stored values keep what
        all of them keep); 1.0 for a zero delta, which has nothing to lose."""
        if self.total_energy <= 0.0:
            return 1.0
        return float(self.cumulative_energy()[min(rank, len(self.singular_values)) - 1])


def default_device() -> torch.device:
    """The first CUDA device when one is visible, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def compute_spectrum(
    delta: torch.Tensor,
    top_k: int,
    *,
    method: SpectrumMethod = "auto",
    device: torch.device | str | None = None,
    tol: float = 1e-5,
    oversample: int | None = None,
    power_iters: int = 4,
    max_power_iters: int = 16,
    seed: int = 0,
) -> Spectrum:
    """Exact energy and the top ``top_k`` singular values of ``delta``.

    Args:
        delta: Tensor of shape (m, n), any float dtype; not modified.
        top_k: number of leading singular values wanted (clipped to min(m, n)); use max_rank + 1 so that
            saturation at the upper bound can be seen.
        method: see the module docstring.
        device: where to compute; None picks CUDA when available.
        tol: randomized method's acceptance threshold on the relative Ritz residual r_i / s_i. The
            default 1e-5 keeps every returned value within 1e-5 relative of a true singular value,
            comfortably inside the 1e-4 accuracy the rank decision is designed for.
        oversample: extra columns beyond ``top_k`` for the randomized method; None uses
            max(top_k, 32), since oversampling speeds convergence on slowly decaying spectra far more
            than extra iterations (Halko et al. 2011, sec. 4.5).
        power_iters: subspace iterations before the first check.
        max_power_iters: iterations after which the exact Gram method is used instead.
        seed: seed for the Gaussian test matrix (results are deterministic for a seed).

    Returns:
        Spectrum with at least min(top_k, m, n) singular values, float64 (the whole spectrum from exact
        methods).
    """
    if delta.ndim != 2:
        raise ValueError(f"delta must be a 2-D matrix, got shape {tuple(delta.shape)}")
    if not delta.is_floating_point():
        raise ValueError(f"delta must be floating point, got dtype {delta.dtype}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k=}")
    if method not in ("auto", "gram", "svdvals", "randomized"):
        raise ValueError(f"method must be one of auto, gram, svdvals, randomized; got {method=!r}")
    if not 0.0 < tol < 1.0:
        raise ValueError(f"tol must be in (0, 1), got {tol=}")
    dev = torch.device(device) if device is not None else default_device()
    result, fell_back = cuda_or_cpu(lambda d: _compute_spectrum(delta, top_k, method, d, tol, oversample, power_iters,
                                                                max_power_iters, seed), dev)
    if fell_back:
        return Spectrum(**{**result.__dict__, "device": "cpu (CUDA out of memory)", "cuda_oom_fallback": True})
    return result


def _compute_spectrum(delta, top_k, method, dev, tol, oversample, power_iters, max_power_iters, seed) -> Spectrum:
    start = time.perf_counter()
    m, n = delta.shape
    k = min(top_k, m, n)
    a = delta.to(device=dev)
    total_energy = float(torch.linalg.vector_norm(a, dtype=torch.float64) ** 2)  # exact ||dW||_F^2
    if total_energy == 0.0:  # zero delta: all singular values are exactly 0
        return Spectrum(np.zeros(min(m, n)), 0.0, (m, n), "zero", 0.0, time.perf_counter() - start, str(dev))

    q = _columns(k, m, n, oversample)
    method = resolve_method(method, dev, (m, n), top_k, oversample)

    iters = 0
    if method == "svdvals":
        s = _resolved(torch.linalg.svdvals(a.to(torch.float64)), min(m, n), squared=False)
        bound = _exact_bound(s[:k], min(m, n), squared=False)
    elif method == "gram":
        s, bound = _gram_values(a, k)
    else:
        s, bound, iters = _randomized_values(a, k, q, tol, power_iters, max_power_iters, seed)
        if s is None:
            s, bound = _gram_values(a, k)
            method = "randomized->gram"
    values = s.detach().cpu().numpy().astype(np.float64)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return Spectrum(values, total_energy, (m, n), method, float(bound), time.perf_counter() - start, str(dev), iters)


def _columns(k: int, m: int, n: int, oversample: int | None) -> int:
    """Columns q of the randomized method's subspace: k plus the oversampling, at most the short side."""
    p = max(k, 32) if oversample is None else int(oversample)
    return min(k + p, min(m, n))


def resolve_method(method: SpectrumMethod, device: torch.device | str | None, shape: tuple[int, int], top_k: int,
                   oversample: int | None = None) -> str:
    """The method ``method`` stands for on ``device`` for a ``shape`` delta ("auto" resolved, others unchanged).

    "auto": the Gram on the CPU (it wins at every measured shape, see the module docstring); on CUDA the
    randomized method when its subspace is at most a third of the short side, since each randomized pass costs
    ~2 m n q flops vs ~m n^2 for the Gram matrix: with q close to the short side the exact method is as cheap
    and needs no check.
    """
    if method != "auto":
        return method
    dev = torch.device(device) if device is not None else default_device()
    m, n = shape
    q = _columns(min(top_k, m, n), m, n, oversample)
    return "randomized" if dev.type == "cuda" and 3 * q <= min(m, n) else "gram"


def _resolved(s: torch.Tensor, n: int, squared: bool) -> torch.Tensor:
    """``s`` (non-increasing) with the values below the method's resolution set to exactly 0.

    A backward-stable method perturbs the matrix it works on by ~n * eps64 times its norm: about
    n * eps64 * s_1 for singular values directly, n * eps64 * s_1^2 for the Gram's eigenvalues, i.e.
    sqrt(n * eps64) * s_1 (~1e-6 s_1) for s. Values below that are round-off (the zero tail of an exactly
    low-rank delta, e.g. a merged LoRA), not measurements; each holds < 1e-11 of s_1^2 of energy.
    """
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return s
    return torch.where(s >= _resolution(float(s[0]), n, squared), s, torch.zeros_like(s))


def _resolution(s1: float, n: int, squared: bool) -> float:
    """Smallest singular value a backward-stable method resolves next to ``s1`` (see ``_resolved``)."""
    return s1 * (math.sqrt(2 * n * _EPS64) if squared else 2 * n * _EPS64)


def _exact_bound(s: torch.Tensor, n: int, squared: bool) -> float:
    """Backward-error bound on the relative error of the smallest returned nonzero value (values below the
    resolution are already 0, see ``_resolved``)."""
    positive = s[s > 0]
    if positive.numel() == 0:
        return 0.0
    ratio = float(positive[0] / positive[-1])
    return n * _EPS64 * (ratio**2 / 2 if squared else ratio)


def _gram_values(a: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    eig = torch.from_numpy(_gram_eigenvalues_numpy(a)) if a.device.type == "cpu" else _gram_eigenvalues_torch(a)
    return values_from_gram_eigenvalues(eig, k)


def values_from_gram_eigenvalues(eig: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """(singular values, non-increasing, below the Gram's resolution set to 0; the error bound of the top ``k``) from
    the ascending eigenvalues ``eig`` (n,) of a float64 Gram: the "gram" method's last step, shared by every Gram."""
    s = torch.sqrt(torch.clamp(torch.flip(eig, (0,)), min=0.0))  # (n,): the whole spectrum, kept for free
    s = _resolved(s, s.shape[0], squared=True)
    return s, _exact_bound(s[:k], s.shape[0], squared=True)


def _gram_eigenvalues_torch(a: torch.Tensor) -> torch.Tensor:
    """Ascending float64 eigenvalues of the short-side Gram matrix of ``a`` (m, n), on ``a``'s device."""
    a64 = a.to(torch.float64)
    gram = a64.T @ a64 if a64.shape[0] >= a64.shape[1] else a64 @ a64.T  # (n, n) for the short side n
    del a64
    return torch.linalg.eigvalsh(gram)  # LAPACK / cuSOLVER compute all of them anyway


def _gram_eigenvalues_numpy(a: torch.Tensor) -> np.ndarray:
    """Ascending float64 eigenvalues of the short-side Gram matrix of ``a`` (m, n), through NumPy.

    On the CPU NumPy is the faster backend for exactly this pair of calls: ``x @ x.T`` on one contiguous
    array is dispatched to BLAS ``dsyrk`` (the symmetric product, half the flops of a general matrix
    product; torch has no syrk), and its bundled OpenBLAS runs ``dsyevd`` faster than torch's MKL on the
    AMD machines we measured (2816x1024: 0.089 s vs 0.155 s for Gram + eigenvalues, see BENCHMARKS.md).
    """
    a = a.detach()
    # A contiguous float64 delta is used in place (what the analysis passes on the CPU), else copied.
    x = (a if a.dtype == torch.float64 and a.is_contiguous() else a.to(torch.float64).contiguous()).numpy()
    gram = x.T @ x if x.shape[0] > x.shape[1] else x @ x.T  # (short, short) float64, both via dsyrk
    del x
    return np.linalg.eigvalsh(gram)


def short_side_gram(delta: torch.Tensor, side: str | None = None) -> torch.Tensor:
    """The float64 Gram of one side of ``delta`` (d_out, d_in): ΔWᵀ ΔW (d_in, d_in) for ``side`` "input", ΔW ΔWᵀ
    (d_out, d_out) for "output"; None: the short side ("input" when d_in <= d_out). On ``delta``'s device; through
    NumPy's ``dsyrk`` on the CPU (see ``_gram_eigenvalues_numpy``)."""
    side = side or ("input" if delta.shape[1] <= delta.shape[0] else "output")
    d = delta.detach().to(torch.float64)
    if d.device.type == "cpu":
        x = d.contiguous().numpy()
        return torch.from_numpy(x.T @ x if side == "input" else x @ x.T)
    return d.T @ d if side == "input" else d @ d.T


def gram_spectrum(gram: torch.Tensor, delta: torch.Tensor, top_k: int) -> Spectrum:
    """The "gram" method's ``Spectrum`` of ``delta`` from its short-side Gram (``short_side_gram``), already computed
    (a caller that needs the Gram for something else, e.g. ``spectra.projected.projected_spectrum``). CPU."""
    start = time.perf_counter()
    m, n = delta.shape
    total_energy = float(torch.linalg.vector_norm(delta.detach(), dtype=torch.float64) ** 2)
    if total_energy == 0.0:
        return Spectrum(np.zeros(min(m, n)), 0.0, (m, n), "zero", 0.0, time.perf_counter() - start, "cpu")
    eig = torch.from_numpy(np.linalg.eigvalsh(gram.detach().to(torch.float64).cpu().numpy()))
    s, bound = values_from_gram_eigenvalues(eig, min(top_k, m, n))
    return Spectrum(s.numpy().astype(np.float64), total_energy, (m, n), "gram", float(bound),
                    time.perf_counter() - start, "cpu")


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def _randomized_values(a, k, q, tol, power_iters, max_power_iters, seed):
    """Randomized subspace iteration with an a-posteriori residual check (see module docstring).

    Returns (values (k,) float64, bound, iterations) or (None, inf, iterations) when the check never
    passed within ``max_power_iters``.
    """
    m, n = a.shape
    work = a.to(torch.float32)  # (m, n): matrix products in float32, the fast path on every device
    gen = torch.Generator(device=work.device).manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, device=work.device, dtype=work.dtype)  # (n, q)
    basis = _orth(work @ omega)  # (m, q) orthonormal range estimate
    a64 = a.to(torch.float64)
    iters, next_check = 0, power_iters
    while True:
        while iters < next_check:
            basis = _orth(work @ _orth(work.T @ basis))  # one power iteration, re-orthonormalized both ways
            iters += 1
        basis64 = _orth(basis.to(torch.float64))  # float32 QR is orthonormal only to ~1e-7; redo in float64
        small = basis64.T @ a64  # (q, n) Rayleigh-Ritz projection
        u_small, s, vh = torch.linalg.svd(small, full_matrices=False)  # (q, q), (q,), (q, n)
        s_k, v_k = s[:k], vh[:k].T  # (k,), (n, k)
        residual = a64 @ v_k - basis64 @ (u_small[:, :k] * s_k)  # (m, k): dW v_i - s_i u_i
        r = torch.linalg.vector_norm(residual, dim=0)  # (k,)
        # A Ritz pair whose value and residual are both below the Gram method's resolution is numerically
        # zero (the zero tail of an exactly low-rank delta): returned as 0, as "gram" would, instead of
        # failing the relative check forever.
        zero = (s_k + r) <= _resolution(float(s[0]), min(m, n), squared=True)
        floor = float(s[0]) * 1e-12
        rel = torch.where(zero, torch.zeros_like(r), r / torch.clamp(s_k, min=floor))
        worst = float(rel.max())
        if worst <= tol:
            return torch.where(zero, torch.zeros_like(s_k), s_k), worst, iters
        if iters >= max_power_iters:
            return None, math.inf, iters
        next_check = min(max_power_iters, iters + max(2, power_iters // 2))
