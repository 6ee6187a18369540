"""Which spectrum of a module's delta ranks its directions: an enum that owns what each kind needs and means."""

from __future__ import annotations

from enum import Enum

__all__ = ["SpectrumKind"]


class SpectrumKind(str, Enum):
    """The spectrum a module's rank is read from (a ``str`` enum: it compares and serializes as its value).

    - ``weight``: σ(ΔW), the delta alone; needs only the checkpoints.
    - ``input``: σ(ΔW A^½), A = E[x xᵀ] the second moment of the module's inputs (its output error).
    - ``fisher``: σ(G^½ ΔW A^½) with the K-FAC Fisher factors (the loss cost of each direction, comparable across
      modules).
    """

    WEIGHT = "weight"
    INPUT = "input"
    FISHER = "fisher"

    @property
    def weighted(self) -> bool:
        """True when the spectrum is weighted by curvature factors (collected from calibration records)."""
        return self is not SpectrumKind.WEIGHT

    @property
    def needs_output_factor(self) -> bool:
        """True when the output factor G (backward passes with sampled labels) is needed besides A."""
        return self is SpectrumKind.FISHER

    @property
    def matrix(self) -> str:
        """The matrix whose singular values the spectrum holds, for plots and messages."""
        return {"weight": "W_ft - W_pre", "input": "the input-weighted delta dW A^1/2",
                "fisher": "the fisher-weighted delta G^1/2 dW A^1/2"}[self.value]

    def __str__(self) -> str:  # f-strings and logs show "fisher", not "SpectrumKind.FISHER"
        return self.value

    __format__ = str.__format__

    def __hash__(self) -> int:  # a member and its value are the same dict key ({"weight": ...}[WEIGHT] works)
        return hash(self.value)
