"""What K-FAC's factors cost and how the layers share passes over the calibration records (``kfac``'s memory
paragraph): the kind of curvature a spectrum needs, the side a wide factor is kept on, each module's bytes, the memory
left for the factors once the model is loaded, and the layers grouped into passes within it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch

from .checkpoints import ModuleRef
from .spectra.kind import SpectrumKind

__all__ = ["curvature_kind", "projection_side", "factor_bytes", "automatic_factor_memory", "plan_passes"]


def curvature_kind(kind: SpectrumKind | str) -> SpectrumKind:
    """``kind`` as a ``SpectrumKind`` that is weighted by curvature ("input" or "fisher"; a plain string is read as
    its member).

    Raises:
        ValueError: for "weight" (no curvature) or a name that is no spectrum kind.
    """
    member = SpectrumKind(kind)
    if not member.weighted:
        raise ValueError(f"curvature is collected for a weighted spectrum (input or fisher), not {member}")
    return member


def projection_side(module: ModuleRef, kind: SpectrumKind, dense_limit: int | None) -> str | None:
    """Which side a module's curvature is kept on: None (both factors formed), "input" (G is wider than
    ``dense_limit`` and d_in <= d_out: G is projected) or "output" (A is wider and d_out < d_in). A module wide on both
    sides keeps dense factors (no short side to project onto); ``dense_limit`` None never projects."""
    kind = curvature_kind(kind)
    d_out, d_in = module.shape
    if dense_limit is None or max(d_out, d_in) <= dense_limit or min(d_out, d_in) > dense_limit:
        return None
    if d_in <= d_out:  # the wide factor is G, which an input-only spectrum never forms
        return "input" if kind.needs_output_factor else None
    return "output"


def factor_bytes(module: ModuleRef, kind: SpectrumKind, dense_limit: int | None = None) -> int:
    """Bytes one module holds during a pass: float64 factors, 8 (d_in² + d_out²) (8 d_in² for input-only); for a
    projected module the near factor and the projected one, 2 · 8 d_s², and its float32 delta, 4 d_out d_in."""
    kind = curvature_kind(kind)
    d_out, d_in = module.shape
    side = projection_side(module, kind, dense_limit)
    if side is not None:
        short = d_in if side == "input" else d_out
        near = 8 * short * short if side == "input" or kind.needs_output_factor else 0
        return near + 8 * short * short + 4 * d_out * d_in
    return 8 * (d_in * d_in + (d_out * d_out if kind.needs_output_factor else 0))


def automatic_factor_memory(device: torch.device | str | None = None, fraction: float = 0.5,
                            cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Bytes of factors to hold per pass when the setting is left empty: ``fraction`` of the memory available now,
    measured once the model is loaded. The rest is left to the batches' activations and to whatever else runs beside
    the collection.

    Available: the host's (``psutil``: free plus reclaimable page cache), less where this process's cgroup allows
    less (a container's limit, which psutil does not see). On a CUDA ``device`` also at most the device's free
    memory: the float32 deltas of the projected modules, counted in the same budget, go to the model's device."""
    available = min(psutil.virtual_memory().available, _cgroup_available(cgroup_root))
    if device is not None and torch.device(device).type == "cuda":
        available = min(available, torch.cuda.mem_get_info(torch.device(device))[0])
    return int(available * fraction)


def _cgroup_available(root: str) -> int:
    """The cgroup's memory limit less its usage (v2: ``memory.max`` / ``memory.current``; v1: ``memory/
    memory.limit_in_bytes`` / ``memory.usage_in_bytes``); unbounded when there is none or it cannot be read."""

    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            text = (Path(root) / limit).read_text().strip()
            if text == "max":
                return 2**63
            return max(0, int(text) - int((Path(root) / usage).read_text().strip()))
        except (OSError, ValueError):
            continue
    return 2**63


def plan_passes(modules: Sequence[ModuleRef], kind: SpectrumKind, memory_bytes: int,
                dense_limit: int | None = None) -> list[list[str]]:
    """Layers grouped into passes, in depth order, each group's factors within ``memory_bytes`` (or one layer)."""
    per_layer: OrderedDict[str, int] = OrderedDict()
    for m in modules:
        per_layer[m.layer] = per_layer.get(m.layer, 0) + factor_bytes(m, kind, dense_limit)
    passes: list[list[str]] = []
    held = 0
    for layer, size in per_layer.items():
        if passes and held + size <= memory_bytes:
            passes[-1].append(layer)
            held += size
        else:
            passes.append([layer])
            held = size
    return passes
