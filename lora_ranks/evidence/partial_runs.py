"""A row run's last evaluated moment, saved while it trains, so that a run stopped midway (a killed session, a
machine handed back) goes on from there instead of from step 0, and ends as the uninterrupted run would have.

One file in the run's folder, ``<run>/partial.safetensors``, replaced atomically at each validation evaluation (with
early stopping) and removed when the run finishes. Its tensors: the trainable weights (``weights.<name>``), those of
the best evaluation so far (``best.<name>``), the optimizer's state (``optimizer.<param index>.<name>``) and torch's
random generators (``torch_rng``, and ``cuda_rng`` on a GPU: dropout's masks come from the device's); its metadata
(``"partial"``: JSON): the inputs' key (``row_key``: a partial of other inputs is ignored), the training loop's
place (``LoopState`` without tensors), the optimizer's param groups, and what the run measured so far (curves,
tokens per step, seconds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .._io import atomic_write
from ..training_loop import LoopState

__all__ = ["PartialRun", "save_partial", "load_partial", "PARTIAL_FILE"]

PARTIAL_FILE = "partial.safetensors"
_FORMAT = 1


@dataclass
class PartialRun:
    """What a run had done at its last checkpoint.

    ``weights``/``best_weights``: trainable parameter name -> tensor (float32, CPU); ``loop``: the training loop's
    state (its optimizer state dict's tensors on the CPU); ``torch_rng``/``cuda_rng``: torch's CPU generator and, on a
    GPU, the device's (``torch.cuda.get_rng_state``), uint8 tensors; ``measured``: the monitor's record (``tokens_per_step``,
    ``curve``, ``evaluating`` and ``elapsed`` in seconds, and the early-stopping state ``stopping``: ``best_loss``,
    ``best_point``, ``since``, ``curve``)."""

    key: str
    loop: LoopState
    weights: dict[str, torch.Tensor]
    best_weights: dict[str, torch.Tensor] | None
    torch_rng: torch.Tensor
    measured: dict
    cuda_rng: torch.Tensor | None = None


def save_partial(run_dir: str | Path, partial: PartialRun) -> Path:
    """Write ``partial`` to ``<run_dir>/partial.safetensors`` atomically (the previous one stays until it is
    replaced whole)."""
    tensors = {f"weights.{n}": t.detach().cpu().contiguous() for n, t in partial.weights.items()}
    tensors.update({f"best.{n}": t.detach().cpu().contiguous() for n, t in (partial.best_weights or {}).items()})
    state, scalars = {}, {}
    for index, entry in partial.loop.optimizer["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
        state[str(index)] = sorted(entry)
    tensors["torch_rng"] = partial.torch_rng
    if partial.cuda_rng is not None:
        tensors["cuda_rng"] = partial.cuda_rng.cpu()
    meta = {"format": _FORMAT, "key": partial.key, "step": partial.loop.step, "losses": partial.loop.losses,
            "order": partial.loop.order, "rng_state": partial.loop.rng_state, "optimizer_state": state,
            "optimizer_scalars": scalars, "param_groups": partial.loop.optimizer["param_groups"],
            "best": partial.best_weights is not None, "measured": partial.measured}
    path = Path(run_dir) / PARTIAL_FILE
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"partial": json.dumps(meta)}))


def load_partial(run_dir: str | Path, key: str, device: torch.device | str = "cpu") -> PartialRun | None:
    """The partial run saved in ``run_dir`` when its inputs' key is ``key`` (else None: a run of other inputs, or
    none); tensors on ``device`` (the optimizer's state where its parameters are)."""
    path = Path(run_dir) / PARTIAL_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("partial", "{}"))
    if meta.get("format") != _FORMAT or meta.get("key") != key:
        return None
    tensors = load_file(str(path), device=str(device))
    weights = {n[len("weights."):]: t for n, t in tensors.items() if n.startswith("weights.")}
    best = {n[len("best."):]: t for n, t in tensors.items() if n.startswith("best.")} if meta["best"] else None
    state = {}
    for index, names in meta["optimizer_state"].items():
        scalars = meta["optimizer_scalars"].get(index, {})
        state[int(index)] = {name: scalars[name] if name in scalars else tensors[f"optimizer.{index}.{name}"]
                             for name in names}
    version, internal, gauss = meta["rng_state"]
    loop = LoopState(meta["step"], meta["losses"], meta["order"], (version, tuple(internal), gauss),
                     {"state": state, "param_groups": meta["param_groups"]})
    cuda_rng = tensors["cuda_rng"].cpu() if "cuda_rng" in tensors else None
    return PartialRun(key, loop, weights, best, tensors["torch_rng"].cpu(), meta["measured"], cuda_rng)
