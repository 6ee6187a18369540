"""The split-half noise estimate: how many directions of each module's delta two fine-tunes on disjoint halves of
the data share (``noise.subspace_agreement``), module by module from the checkpoints.

``run_split_half_finetunes`` (``finetune.py``) makes the two halves' checkpoints; ``split_half_ranks`` reads one
module's two deltas at a time (memory: two (d_out, d_in) float64 deltas and their SVDs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import CheckpointPair, ModuleRef
from ..config import SplitHalfRecord
from ..noise import MIN_AGREEMENT, split_half_rank, subspace_agreement

__all__ = ["SplitHalfModule", "split_half_ranks"]


@dataclass(frozen=True)
class SplitHalfModule:
    """One module's split-half noise estimate."""

    rank: int
    """How many leading directions the two halves' deltas share (``noise.split_half_rank``)."""
    record: SplitHalfRecord
    """The agreement, direction by direction, as the rank config records it (``analysis_metadata.split_half``)."""


def split_half_ranks(pretrained: str | Path, half_a: str | Path, half_b: str | Path, modules: Sequence[ModuleRef],
                     max_rank: int, *, allow_pickle: bool = False) -> dict[str, SplitHalfModule]:
    """Module name -> its split-half estimate, from the deltas half_a − pretrained and half_b − pretrained,
    examined up to rank min(max_rank, min(d_out, d_in) // 2)."""
    pair_a = CheckpointPair(pretrained, half_a, allow_pickle=allow_pickle)
    pair_b = CheckpointPair(pretrained, half_b, allow_pickle=allow_pickle)
    out = {}
    for m in modules:
        k = min(max_rank, min(m.shape) // 2)  # 0 for a module too thin to compare: no agreement, rank 0
        agreement = (subspace_agreement(pair_a.delta(m, torch.float64), pair_b.delta(m, torch.float64), k)
                     if k >= 1 else np.zeros(0))
        out[m.name] = SplitHalfModule(split_half_rank(agreement), SplitHalfRecord(
            agreement=[round(float(x), 6) for x in agreement], min_agreement=MIN_AGREEMENT))
        pair_a.close()
        pair_b.close()
    return out
