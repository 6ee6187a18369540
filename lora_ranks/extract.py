"""LoRA extraction: the best rank-r adapter for each fine-tuning delta (truncated SVD), as a PEFT adapter.

For each module with rank r and LoRA scale s (alpha / r, or alpha / sqrt(r) with rsLoRA), the delta's
truncated SVD dW_r = U_r diag(sigma_r) V_r^T (Eckart-Young: the best rank-r approximation in Frobenius and
spectral norm) is split evenly between the two factors:

    lora_B = U_r diag(sqrt(sigma_r)) / sqrt(s)      # (d_out, r)
    lora_A = diag(sqrt(sigma_r)) V_r^T / sqrt(s)     # (r, d_in)      so that  s * B @ A = dW_r

The top singular subspace comes from the eigendecomposition of the Gram matrix of the short side (see
``truncated_svd_factors``). The relative reconstruction error ||dW - s B A||_F / ||dW||_F of every module is
written to ``extraction_report.json`` in the adapter folder. PEFT is not imported: the adapter is plain
safetensors + JSON, loaded by ``peft.PeftModel.from_pretrained`` like any other.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write, atomic_write_json
from .checkpoints import CheckpointPair, ModuleRef, TargetSpec
from .config import RankConfigError, anchored_key, check_config_matches_model, load_rank_config, modules_from_config

__all__ = ["truncated_svd_factors", "extract_lora"]


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


def _modules_to_extract(pair: CheckpointPair, rank_config: dict) -> dict[str, ModuleRef]:
    """The config's modules with their on-disk tensor names, checked against both checkpoints' headers.

    Configs record each module's ``weight_key``, so no model needs to be built (no transformers import);
    older configs without it fall back to the name mapping of ``CheckpointPair.modules``.
    """
    refs = modules_from_config(rank_config)
    if refs is None:
        check_config_matches_model(rank_config, pair.base.root)
        targets = TargetSpec(target_regex="|".join(map(re.escape, rank_config["target_modules"])), include_vision=True)
        return {m.name: m for m in pair.modules(targets)}
    problems = []
    for ref in refs:
        for ckpt in (pair.base, pair.finetuned):
            if ref.weight_key not in ckpt:
                problems.append(f"{ref.name}: tensor {ref.weight_key!r} is missing from {ckpt.root}")
            elif tuple(ckpt.shape(ref.weight_key)) != ref.shape:
                problems.append(f"{ref.name}: tensor {ref.weight_key!r} has shape {tuple(ckpt.shape(ref.weight_key))} "
                                f"in {ckpt.root}, the config was made for {ref.shape}")
    if problems:
        raise RankConfigError(f"rank config does not fit the checkpoints ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(problems))
    return {ref.name: ref for ref in refs}


def extract_lora(base: str | Path, finetuned: str | Path, rank_config_path: str | Path, out_dir: str | Path,
                 *, allow_pickle: bool = False) -> dict[str, Any]:
    """Write a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) whose every module is
    the truncated SVD of its delta at the configured rank; returns the extraction report.

    Raises:
        RankConfigError: listing every configured module whose tensor is missing from, or shaped differently
            in, either checkpoint.
    """
    from safetensors.torch import save_file

    from .model import DynamicLoRAConfig  # imports torch only; PEFT stays unimported

    start = time.perf_counter()
    config = DynamicLoRAConfig(load_rank_config(rank_config_path), lora_dropout=0.0, source=str(rank_config_path))
    pair = CheckpointPair(base, finetuned, allow_pickle=allow_pickle)
    wanted = config.ranks
    modules = _modules_to_extract(pair, config.rank_config)
    use_rslora = bool(config.rank_config.get("use_rslora", False))
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {"modules": {}}
    for name, rank in wanted.items():
        alpha = config.rank_config["alpha_pattern"].get(anchored_key(name), config.rank_config.get("lora_alpha", 2 * rank))
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        lora_a, lora_b, rel_error = truncated_svd_factors(pair.delta(modules[name]), rank, scale)
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b
        report["modules"][name] = {"rank": rank, "scale": scale, "relative_error": rel_error}
        pair.close()
    out = Path(out_dir)
    atomic_write_json(out / "adapter_config.json", config.adapter_config(str(pair.base.root)))
    atomic_write(out / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_json(out / "lora_rank_config.json", config.rank_config)
    errors = [m["relative_error"] for m in report["modules"].values()]
    report.update({"base": str(pair.base.root), "finetuned": str(pair.finetuned.root), "seconds": time.perf_counter() - start,
                   "mean_relative_error": sum(errors) / len(errors), "max_relative_error": max(errors)})
    atomic_write_json(out / "extraction_report.json", report)
    return report


