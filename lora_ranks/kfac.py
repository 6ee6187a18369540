"""Loss-aware curvature: the Kronecker factors of each target module's Fisher information (K-FAC).

For a linear module y = W x, the loss gradient of one token is g xᵀ with g = ∂L/∂y. K-FAC (Martens & Grosse 2015)
approximates the Fisher information of W by a Kronecker product of two small matrices,

    F ≈ G ⊗ A,    A = E[x xᵀ]  (d_in, d_in),    G = E[g gᵀ]  (d_out, d_out),

expectations over the non-padding token positions of a calibration set (the fine-tuning subset). G uses labels
*sampled from the model itself* at the positions the fine-tune trained on (the true Fisher, by Monte Carlo with
``samples`` draws per record), not the data labels: the empirical Fisher (data labels) is a poor curvature
estimate and, in this project's pilot, gave worse ranks than uniform ones. The loss is the sum of the per-token
losses, so g is a per-token log-likelihood gradient. Under this approximation the expected per-response-token KL
of perturbing W by E is ½ (T / T_resp) tr(G E A Eᵀ), with T / T_resp the ratio of all to response tokens
(``CurvatureFactors.token_ratio``); the same for every module, so the weighted spectra are comparable across
modules (``lora_ranks.spectra.weighted``).

Precision. Each batch's products are formed in float32 (float64 for a float64 model) and summed over batches in
float64.

Memory. Factors are accumulated in float64 for the modules of a group of layers at a time: each pass over the
calibration set holds the factors of the layers whose float64 factors fit ``memory_bytes`` (at least one
layer), so the memory held is at most max(``memory_bytes``, one layer's factors) plus the model and one batch,
whatever the depth; the number of passes is about the total factor size over ``memory_bytes``. (A 7B layer's
factors would be 8 · (3 · 3584² + 3 · 18944² + ...) ≈ 9 GB if formed; see the next paragraph.) Each pass runs the
whole model, so the analysis leaves ``memory_bytes`` to ``automatic_factor_memory`` (half the memory available
once the model is loaded) unless told otherwise. Modules that read the same input tensor (q/k/v, gate/up) share one
A, computed once. Each batch's product goes to a buffer reused for every factor of its width, so a pass allocates
nothing of a factor's size per batch on the CPU (on CUDA each product is copied to the host).

Batches. The records run sorted by length (``length_batches``): padded positions cost the model's passes like
real ones, and the factors are sums over records, so the order changes only round-off and which label draw lands
where.

Wide factors. A factor wider than ``dense_limit`` (``CurvatureSettings.dense_factor_limit``) on a module whose
other side is within it (Qwen2.5-7B: G of gate_proj and up_proj, A of down_proj, 18944 wide) is never formed. The
pass keeps it seen through the module's weight delta ΔW (``delta_of``), on the short side: for a wide G, the sum of
(ΔWᵀ g)(ΔWᵀ g)ᵀ (d_in, d_in) = ΔWᵀ G ΔW; for a wide A, of (ΔW x)(ΔW x)ᵀ (d_out, d_out) = ΔW A ΔWᵀ; with the
wide factor's trace for its damping (``CurvatureFactors.projected``). Per token that costs one product with ΔW
(d_out d_in) and a d_s² outer product instead of a d_long² one (a quarter of the flops at 7B), holds 2 · 8 d_s² +
4 d_out d_in bytes (the float32 delta) instead of 8 (d_in² + d_out²), and spares the analysis every d_long³ step
(``spectra.projected.ProjectedCurvature``). An input-only spectrum never needs G, so only wide A are projected
there.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoints import ModuleRef
from .data import IGNORE_INDEX, collate
from .errors import CalibrationError, LoraRanksError  # noqa: F401  (CalibrationError re-exported)
from .kfac_plan import automatic_factor_memory, curvature_kind, factor_bytes, plan_passes, projection_side
from .progress import Heartbeat
from .spectra.kind import SpectrumKind

__all__ = ["CurvatureFactors", "collect_curvature", "curvature_kind", "plan_passes", "factor_bytes",
           "projection_side", "sample_labels", "length_batches", "calibration_tokens", "automatic_factor_memory",
           "CalibrationError"]

@dataclass
class CurvatureFactors:
    """The factors of one module, float64 on the CPU.

    Attributes:
        input_factor: A = E[x xᵀ], Tensor (d_in, d_in); shared (the same object) by modules reading one input; None
            when A is wide and projected (``projected_side`` "output").
        output_factor: G = E[g gᵀ], Tensor (d_out, d_out), or None for input-only curvature or a wide, projected G.
        tokens: T, the token positions averaged over.
        response_tokens: T_resp, the positions whose next token was trained on (where labels are sampled).
        input_key: the name of the module whose input A was computed from (itself, or the first of its group).
        projected_side: None (both factors formed), "input" (G is wide: ``projected`` = ΔWᵀ G ΔW, (d_in, d_in))
            or "output" (A is wide: ``projected`` = ΔW A ΔWᵀ, (d_out, d_out)); see the module docstring.
        projected: that matrix, float64, or None.
        far_trace: the trace of the wide factor (its damping is relative to trace / width); 0 if none.
    """

    input_factor: torch.Tensor | None
    output_factor: torch.Tensor | None
    tokens: int
    response_tokens: int
    input_key: str = ""
    fired: bool = True
    projected_side: str | None = None
    projected: torch.Tensor | None = None
    far_trace: float = 0.0

    @property
    def token_ratio(self) -> float:
        """T / T_resp: converts ½ tr(G E A Eᵀ) into the expected KL per response token."""
        return self.tokens / max(1, self.response_tokens)


def calibration_tokens(examples: Sequence[dict]) -> tuple[int, int]:
    """(token positions, response positions) of tokenized examples: what the factors average over."""
    tokens = sum(len(e["input_ids"]) for e in examples)
    response = sum(sum(1 for label in e["labels"][1:] if label != IGNORE_INDEX) for e in examples)
    return tokens, response


def length_batches(examples: Sequence[dict], batch_size: int) -> list[list[int]]:
    """Indices of ``examples`` in batches of ``batch_size``, the records sorted by token count (ties in data order).

    Every batch is padded to its longest record, and padded positions cost the model's passes as much as real ones:
    in data order 80 of the demo's records (1,922 tokens) padded to 3,368 in batches of 8, sorted to 2,128.
    The factors are sums over the records, so the order changes only the float32 round-off of each batch's product
    and which Monte-Carlo label draw lands on which position (the draws follow the batches, seeded once per pass)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    return [order[start: start + batch_size] for start in range(0, len(order), batch_size)]


def sample_labels(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn from the model's own next-token distribution where the data has a label, else -100.

    Args:
        logits: Tensor (B, T, V), the model's outputs.
        labels: Tensor (B, T), the data's labels (-100 where not trained).
        generator: seeds the draws (CPU generator).

    Returns:
        Tensor (B, T) of sampled next-token labels aligned like ``labels`` (position t holds token t's label).
    """
    probs = torch.softmax(logits[:, :-1].detach().double(), dim=-1)  # (B, T-1, V): predicts token t+1
    flat = probs.reshape(-1, probs.shape[-1]).cpu()
    draws = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:2]).to(labels.device)
    sampled = torch.full_like(labels, IGNORE_INDEX)
    trained = labels[:, 1:] != IGNORE_INDEX
    sampled[:, 1:] = torch.where(trained, draws, torch.full_like(draws, IGNORE_INDEX))
    return sampled


def collect_curvature(
    model: torch.nn.Module,
    examples: Sequence[dict],
    pad_token_id: int,
    modules: Sequence[ModuleRef],
    *,
    kind: SpectrumKind,
    samples: int,
    seed: int,
    batch_size: int,
    memory_bytes: int,
    on_batch: Callable[[int, int], None] | None = None,
    dense_limit: int | None = None,
    delta_of: Callable[[ModuleRef], torch.Tensor] | None = None,
    stats: dict | None = None,
) -> Iterator[tuple[str, dict[str, CurvatureFactors]]]:
    """Yield ``(layer, {module name: CurvatureFactors})`` for every layer of ``modules``, in depth order.

    Args:
        model: the fine-tuned model (its module names are ``ModuleRef.name``); used in eval mode, not modified.
        examples: tokenized records (``input_ids``, ``labels``) -- the calibration set.
        pad_token_id: pads batches.
        modules: the target modules.
        kind: "input" (A only, forward passes) or "fisher" (A and G, with ``samples`` backward passes per batch).
        samples: Monte-Carlo label draws per record for G.
        seed: seeds the label draws.
        batch_size: records per forward pass.
        memory_bytes: budget for the float64 factors held at once (see the module docstring).
        on_batch: called as ``on_batch(done, total)`` after each batch, counted over all the passes (progress).
        dense_limit: factors wider than this are projected (see the module docstring); None: never.
        delta_of: the weight delta ΔW (d_out, d_in) of a module, loaded when a pass needs it; required when a module
            is projected.
        stats: filled as the passes run: "passes" (planned), "accumulation_seconds" (in the hooks: the factors'
            products and sums, the projections), "delta_seconds" (reading deltas).

    Raises:
        CalibrationError: when ``examples`` is empty or no position is trained on (no response tokens).
    """
    kind = curvature_kind(kind)
    by_name = dict(model.named_modules())
    sides = _check_curvature_inputs(examples, kind, modules, by_name, dense_limit, delta_of)
    passes = plan_passes(modules, kind, memory_bytes, dense_limit)
    stats = {} if stats is None else stats
    stats.update(passes=len(passes), accumulation_seconds=0.0, delta_seconds=0.0)
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    try:
        per_pass = math.ceil(len(examples) / batch_size)
        heartbeat = Heartbeat(f"{kind} curvature ({len(passes)} pass{'es' if len(passes) > 1 else ''})",
                              len(passes) * per_pass, "batch")

        def report(done: int, total: int) -> None:  # batches done over all the passes
            heartbeat.update(done)
            if on_batch is not None:
                on_batch(done, total)

        for number, group in enumerate(passes):
            wanted = [m for m in modules if m.layer in group]
            device = next(model.parameters()).device
            started = time.perf_counter()
            # Multiplied in float32 like the other products (float64 for a float64 model), on the model's device.
            projection = {m.name: (sides[m.name], delta_of(m).to(device, torch.float64 if dtype == torch.float64
                                                                   else torch.float32))
                          for m in wanted if m.name in sides}
            stats["delta_seconds"] += time.perf_counter() - started
            progress = functools.partial(_progress, report, number * per_pass, len(passes) * per_pass)
            factors = _one_pass(model, by_name, examples, pad_token_id, wanted, kind, samples, seed, batch_size,
                                progress, projection, stats)
            del projection
            for layer in group:
                yield layer, {m.name: factors[m.name] for m in wanted if m.layer == layer}
    finally:
        model.train(was_training)


def _check_curvature_inputs(examples: Sequence[dict], kind: SpectrumKind, modules: Sequence[ModuleRef], by_name: dict,
                            dense_limit: int | None, delta_of) -> dict[str, str]:
    """The calibration records have tokens to train on, the model has every module, and a delta is at hand for each
    projected one; returns the projected modules' sides (``projection_side``)."""
    if not examples:
        raise CalibrationError("no calibration records to estimate curvature from")
    _, response = calibration_tokens(examples)
    if kind.needs_output_factor and response == 0:
        raise CalibrationError("the calibration records have no response tokens to sample labels at")
    missing = [m.name for m in modules if m.name not in by_name]
    if missing:
        raise LoraRanksError(f"the model has no module {missing[0]!r} ({len(missing)} target module(s) missing)")
    sides = {m.name: side for m in modules if (side := projection_side(m, kind, dense_limit)) is not None}
    if sides and delta_of is None:
        raise ValueError(f"{next(iter(sides))} has a factor wider than {dense_limit}: collect_curvature needs delta_of")
    return sides


def _progress(on_batch: Callable[[int, int], None], before: int, total: int, done: int) -> None:
    on_batch(before + done, total)


def _rows(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked positions' vectors, (n, d), for one batch's product: float64 stays float64 (exact references);
    anything else is multiplied in float32 (fast), and every batch's product is summed into float64."""
    rows = tensor.detach()[mask]
    return rows if rows.dtype == torch.float64 else rows.float()


def _add(sums: dict, key: str, rows: torch.Tensor, scratch: dict) -> None:
    """sums[key] += rowsᵀ rows: the batch's product in the rows' dtype, summed in float64 on the CPU.

    On the CPU nothing of the factor's size is allocated per batch (at 7B a layer sums nine 3584-wide products per batch, and
    fresh memory of that size costs as much to touch as the product takes): the product goes to a buffer reused
    for every factor of its width (``scratch``), and a float32 product is added to the float64 sum in place by
    NumPy, which widens it exactly in small chunks (torch's mixed-dtype ``add_`` makes a float64 copy first, 4x
    slower here)."""
    width = rows.shape[1]
    buffer = scratch.get((width, rows.dtype, rows.device))
    if buffer is None:
        buffer = scratch[(width, rows.dtype, rows.device)] = torch.empty(width, width, dtype=rows.dtype,
                                                                         device=rows.device)
    product = torch.mm(rows.T, rows, out=buffer).cpu()  # (width, width); on CUDA a copy to the CPU
    if key not in sums:
        sums[key] = product.to(torch.float64, copy=True)
    elif product.dtype == torch.float64:
        sums[key].add_(product)
    else:
        np.add(sums[key].numpy(), product.numpy(), out=sums[key].numpy())


def _squared_norm(rows: torch.Tensor) -> float:
    """‖rows‖_F² (a wide factor's trace contribution, summed over batches in float64): reduced in the rows' dtype,
    pairwise, so to ~1e-7 relative for float32 rows; only the damping's scale depends on it."""
    return float(torch.linalg.vector_norm(rows)) ** 2


def _timed(stats: dict, hook: Callable) -> Callable:
    """``hook`` with its wall time added to ``stats["accumulation_seconds"]`` (exact on the CPU; on CUDA the
    transfer of each product to the CPU synchronizes)."""
    def timed(*args):
        start = time.perf_counter()
        try:
            return hook(*args)
        finally:
            stats["accumulation_seconds"] += time.perf_counter() - start
    return timed


def _one_pass(model, by_name, examples, pad_token_id, modules, kind, samples, seed, batch_size, on_batch,
              projection=None, stats=None):
    """One pass over the calibration set with hooks on ``modules``: their factors (see ``collect_curvature``).
    ``projection``: module -> (side, ΔW on the model's device) for the modules whose wide factor is projected."""
    projection = projection or {}
    stats = {"accumulation_seconds": 0.0} if stats is None else stats
    device = next(model.parameters()).device
    inputs: dict[str, torch.Tensor] = {}  # input key -> Σ x xᵀ (float64, CPU)
    input_key: dict[str, str] = {}  # module -> key of the A it shares
    outputs: dict[str, torch.Tensor] = {}  # module -> Σ g gᵀ
    projected: dict[str, torch.Tensor] = {}  # module -> Σ (ΔWᵀ g)(ΔWᵀ g)ᵀ or Σ (ΔW x)(ΔW x)ᵀ
    far_trace: dict[str, float] = {}  # module -> Σ ‖g‖² or Σ ‖x‖² of its wide factor
    state: dict = {"mask": None, "seen": {}}
    scratch: dict = {}  # (width, dtype, device) -> the product buffer every factor of that width reuses (``_add``)
    handles = []

    def forward_hook(name: str, layer: str):
        side, delta = projection.get(name, (None, None))

        def hook(module, args, output):
            x = args[0]
            mask = state["mask"]  # (B, T) bool: non-padding positions
            seen = state["seen"]  # (layer, address) -> (tensor, key); holding the tensor keeps its address unique
            shared = seen.get((layer, x.data_ptr()))
            if side == "output":  # A is wide: keep ΔW A ΔWᵀ from the projected inputs ΔW x, never A itself
                rows = _rows(x, mask)  # (n, d_in)
                _add(projected, name, rows @ delta.T, scratch)  # (n, d_out)
                far_trace[name] = far_trace.get(name, 0.0) + _squared_norm(rows)
                input_key[name] = ""
            elif shared is not None and shared[0] is x:  # q/k/v (gate/up) read the same tensor: share its A
                input_key[name] = shared[1]
            else:
                seen[(layer, x.data_ptr())] = (x, name)
                input_key[name] = name
                _add(inputs, name, _rows(x, mask), scratch)  # (n, d_in)
            if kind.needs_output_factor and output.requires_grad:
                def grad_hook(grad):
                    rows = _rows(grad, state["mask"])  # (n, d_out)
                    if side == "input":  # G is wide: keep ΔWᵀ G ΔW from the projected gradients ΔWᵀ g
                        _add(projected, name, rows @ delta, scratch)  # (n, d_in)
                        far_trace[name] = far_trace.get(name, 0.0) + _squared_norm(rows)
                    else:
                        _add(outputs, name, rows, scratch)
                output.register_hook(_timed(stats, grad_hook))
        return _timed(stats, hook)

    def inputs_require_grad(module, args, output):  # gradients reach the target modules without any weight grads
        return output.requires_grad_(True)

    for m in modules:
        handles.append(by_name[m.name].register_forward_hook(forward_hook(m.name, m.layer)))
    if kind.needs_output_factor:
        handles.append(model.get_input_embeddings().register_forward_hook(inputs_require_grad))
    generator = torch.Generator().manual_seed(seed)
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = response = 0
    try:
        for number, indices in enumerate(length_batches(examples, batch_size), start=1):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices], pad_token_id).items()}
            mask = batch["attention_mask"].bool()
            state["mask"], state["seen"] = mask, {}
            tokens += int(mask.sum())
            response += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            with torch.set_grad_enabled(kind.needs_output_factor):
                # Image records (Qwen2.5-VL) also carry pixel_values and image_grid_thw.
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                if logits.dtype not in (torch.float32, torch.float64):
                    logits = logits.float()
                for draw in range(samples if kind.needs_output_factor else 0):
                    sampled = sample_labels(logits, batch["labels"], generator)
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                             sampled[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                                             reduction="sum")
                    loss.backward(retain_graph=draw < samples - 1)
            if on_batch is not None:
                on_batch(number)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
    scratch.clear()  # the product buffers are not needed past the pass
    # Sums become means in place: a fresh 3584-wide float64 matrix costs ~40 ms to allocate and touch, per factor.
    normalized = {key: total.div_(tokens) for key, total in inputs.items()}  # one A per distinct input
    out = {}
    for m in modules:
        key = input_key.get(m.name)
        if key is None:  # the module never ran on these records (e.g. a vision tower with text-only data)
            out[m.name] = CurvatureFactors(torch.zeros(0), None, tokens, response, "", fired=False)
            continue
        side = projection.get(m.name, (None,))[0]
        g = outputs[m.name].div_(tokens * samples) if kind.needs_output_factor and m.name in outputs else None
        if side is None:
            out[m.name] = CurvatureFactors(normalized[key], g, tokens, response, key,
                                           fired=not kind.needs_output_factor or g is not None)
            continue
        count = tokens * samples if side == "input" else tokens  # G averages over label draws too
        moment = projected.get(m.name)
        fired = moment is not None and (not kind.needs_output_factor or side == "input" or g is not None)
        out[m.name] = CurvatureFactors(normalized.get(key) if side == "input" else None, g, tokens, response, key,
                                       fired=fired, projected_side=side,
                                       projected=moment.div_(count) if moment is not None else None,
                                       far_trace=far_trace.get(m.name, 0.0) / count)
    return out
