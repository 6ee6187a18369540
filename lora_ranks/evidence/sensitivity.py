"""Are loss-aware spectra comparable across modules? Predicted vs measured loss of truncating one module.

With curvature factors, ½ (T / T_resp) Σ_{i>r} σ_i² of the weighted spectrum predicts the KL (per response token)
that truncating one module's delta to rank r adds (``curvature``). The check: truncate each module alone to rank
r in the fine-tuned model (the others stay fine-tuned), measure KL(fine-tuned || that model) on held-out records,
and compare across modules with Spearman's rank correlation (the allocation only needs the order to be right).
The same check with the plain weight spectrum's discarded energy shows what an allocation on raw σ² assumes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .fidelity import DeltaBasis, fidelity_to, reference_outputs

__all__ = ["ModuleSensitivity", "module_sensitivities", "spearman"]


@dataclass
class ModuleSensitivity:
    """One module truncated alone: the predicted and the measured loss increase (nats per response token)."""

    module: str
    layer: str
    module_type: str
    rank: int
    predicted: float
    measured_kl: float


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of two samples (average ranks for ties); nan when either is constant."""
    def ranks(values):
        values = np.asarray(values, dtype=np.float64)
        order = np.argsort(values, kind="mergesort")
        out = np.empty(len(values))
        out[order] = np.arange(len(values), dtype=np.float64)
        for v in np.unique(values):  # ties share their average rank
            tied = values == v
            out[tied] = out[tied].mean()
        return out

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


@torch.no_grad()
def module_sensitivities(finetuned: torch.nn.Module, basis: DeltaBasis, examples: Sequence[dict], pad_token_id: int,
                         *, rank: int = 2, scale: float = 0.5) -> list[ModuleSensitivity]:
    """Truncate each module of ``basis`` alone to ``rank`` in a copy of ``finetuned`` and measure the KL it adds.

    The truncation is the basis' own (loss-aware for a weighted basis); ``predicted`` is ``scale`` times the energy
    it discards (½ T / T_resp for a Fisher-weighted basis; any constant for a comparison of orders).
    """
    reference = reference_outputs(finetuned, examples, pad_token_id)
    out = []
    for m in basis.modules:
        model = copy.deepcopy(finetuned)
        weight = dict(model.named_modules())[m.name].weight
        full = basis.truncated(m.name, min(m.shape))  # the whole delta, reconstructed in this basis
        weight -= (full - basis.truncated(m.name, rank)).to(weight.dtype)  # W_ft - dW + dW_r
        kl, _, _ = fidelity_to(reference, model)
        out.append(ModuleSensitivity(m.name, m.layer, m.module_type, rank, scale * basis.discarded_energy(m.name, rank),
                                     kl))
    return out
