"""The learning rate of each row: the choice over the tuning seeds (lowest mean validation loss) and the grid's
extension while the choice is at an edge."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .rows import RowResult

__all__ = ["choose_learning_rates", "next_learning_rates"]


def choose_learning_rates(trials: Sequence[RowResult]) -> tuple[dict[tuple[str, str], float], dict[str, dict]]:
    """Per row (label, init), the rate of lowest mean validation loss over the seeds it was tried on: (row -> that
    rate, and the record for results.json: "label/init" -> the chosen rate, every rate's mean validation loss, each
    seed's, and ``at_edge``: whether the choice is the lowest or highest rate tried).

    A diverged trial (``RowResult.diverged``) counts as an infinite loss (recorded as None); a rate's mean is over
    the seeds that tried it, and a rate not tried on every seed any other rate was tried on is not chosen. Ties keep
    the lower rate."""
    losses: dict[tuple[str, str], dict[float, dict[int, float]]] = {}
    for result in trials:
        if result.validation_loss is None and not result.diverged:
            raise ValueError(f"trial {result.label}/{result.init} at lr {result.learning_rate:g} has no validation loss")
        value = math.inf if result.diverged else result.validation_loss
        losses.setdefault((result.label, result.init), {}).setdefault(result.learning_rate, {})[result.seed] = value
    chosen: dict[tuple[str, str], float] = {}
    record: dict[str, dict] = {}
    for row, by_rate in losses.items():
        seeds = set().union(*by_rate.values())
        complete = {lr: sum(per_seed.values()) / len(per_seed) for lr, per_seed in by_rate.items()
                    if set(per_seed) == seeds}
        best = min(sorted(complete), key=lambda lr: complete[lr])
        rates = sorted(by_rate)
        chosen[row] = best
        record[f"{row[0]}/{row[1]}"] = {
            "learning_rate": best, "at_edge": best in (rates[0], rates[-1]) and len(rates) > 1,
            "validation_losses": {f"{lr:g}": (None if not math.isfinite(v) else v)
                                  for lr, v in sorted(complete.items())},
            "per_seed": {f"{lr:g}": {str(seed): (None if not math.isfinite(v) else v) for seed, v in sorted(d.items())}
                         for lr, d in sorted(by_rate.items())}}
    return chosen, record


def next_learning_rates(record: dict[str, dict], *, max_rate: float = 1.0) -> dict[str, float]:
    """The rate to try next for each row of ``choose_learning_rates``' record whose choice is at an edge of the rates
    tried: one step beyond it, the step being the ratio of the edge to its neighbour (3x for a grid spaced 3x), above
    the highest rate or below the lowest. A row whose choice is interior, or at the top with the next rate above
    ``max_rate``, gets none. Returns "label/init" -> rate."""
    out = {}
    for row, entry in record.items():
        rates = sorted(float(lr) for lr in entry["per_seed"])
        best = entry["learning_rate"]
        if len(rates) < 2 or rates[0] < best < rates[-1]:
            continue
        if best == rates[-1]:
            step = rates[-1] / rates[-2]
            if best * step <= max_rate:
                out[row] = float(f"{best * step:.6g}")
        else:
            out[row] = float(f"{best / (rates[1] / rates[0]):.6g}")
    return out
