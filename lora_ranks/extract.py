"""LoRA extraction: the best rank-r adapter for each fine-tuning delta (truncated SVD), as a PEFT adapter.

For each module with rank r and LoRA scale s (alpha / r, or alpha / sqrt(r) with rsLoRA), the delta's
truncated SVD dW_r = U_r diag(sigma_r) V_r^T (Eckart-Young: the best rank-r approximation in Frobenius and
spectral norm) is split evenly between the two factors:

    lora_B = U_r diag(sqrt(sigma_r)) / sqrt(s)      # (d_out, r)
    lora_A = diag(sqrt(sigma_r)) V_r^T / sqrt(s)     # (r, d_in)      so that  s * B @ A = dW_r

The top singular vectors come from the float64 eigendecomposition of the Gram matrix of the short side, the
same exact method the analysis uses. The relative reconstruction error ||dW - s B A||_F / ||dW||_F of every
module is written to ``extraction_report.json`` in the adapter folder.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write, atomic_write_json
from .checkpoints import CheckpointPair, TargetSpec
from .config import anchored_key, check_config_matches_model, load_rank_config

__all__ = ["truncated_svd_factors", "extract_lora"]


def truncated_svd_factors(delta: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors of the best rank-``rank`` approximation of ``delta``.

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
    a = delta.to(torch.float64)
    tall = d_out >= d_in
    gram = a.T @ a if tall else a @ a.T  # (n, n), n = the short side
    eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending
    lam = torch.clamp(torch.flip(eigvals, (0,))[:rank], min=0.0)  # (r,)
    vecs = torch.flip(eigvecs, (1,))[:, :rank]  # (n, r) top eigenvectors
    sigma = torch.sqrt(lam)  # (r,)
    nonzero = sigma > sigma[0] * 1e-12  # directions at round-off level carry nothing: zero them, never divide by them
    safe = torch.where(nonzero, sigma, torch.ones_like(sigma))
    if tall:
        v = vecs  # (d_in, r)
        u = (a @ v) / safe  # (d_out, r)
    else:
        u = vecs  # (d_out, r)
        v = (a.T @ u) / safe  # (d_in, r)
    root = torch.sqrt(torch.where(nonzero, sigma, torch.zeros_like(sigma)) / scale)  # (r,)
    lora_b = u * root  # (d_out, r)
    lora_a = (v * root).T  # (r, d_in)
    total = float(torch.linalg.vector_norm(a) ** 2)
    residual = float(torch.linalg.vector_norm(a - scale * (lora_b @ lora_a)) ** 2)
    rel_error = math.sqrt(residual / total) if total > 0 else 0.0
    return lora_a.float().contiguous(), lora_b.float().contiguous(), rel_error


def extract_lora(base: str | Path, finetuned: str | Path, rank_config_path: str | Path, out_dir: str | Path,
                 *, allow_pickle: bool = False) -> dict[str, Any]:
    """Write a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) whose every module is
    the truncated SVD of its delta at the configured rank; returns the extraction report.

    Raises:
        RankConfigError: the config names modules the base model lacks.
    """
    from safetensors.torch import save_file

    from .model import DynamicLoRAConfig

    start = time.perf_counter()
    config = DynamicLoRAConfig(load_rank_config(rank_config_path), lora_dropout=0.0, source=str(rank_config_path))
    pair = CheckpointPair(base, finetuned, allow_pickle=allow_pickle)
    check_config_matches_model(config.rank_config, pair.base.root)
    wanted = config.ranks
    modules = {m.name: m for m in pair.modules(TargetSpec(target_regex="|".join(map(re.escape, wanted)), include_vision=True))}
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
    out.mkdir(parents=True, exist_ok=True)
    peft_config = config.to_peft_config(base_model_name_or_path=str(pair.base.root))
    peft_config.save_pretrained(str(out))  # adapter_config.json
    atomic_write(out / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_json(out / "lora_rank_config.json", config.rank_config)
    errors = [m["relative_error"] for m in report["modules"].values()]
    report.update({"base": str(pair.base.root), "finetuned": str(pair.finetuned.root), "seconds": time.perf_counter() - start,
                   "mean_relative_error": sum(errors) / len(errors), "max_relative_error": max(errors)})
    atomic_write_json(out / "extraction_report.json", report)
    return report

