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
factors are 8 · (3 · 3584² + 18944² + ...) ≈ 9 GB; by default about one layer per pass.) Modules that read the
same input tensor (q/k/v, gate/up) share one A, computed once.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .checkpoints import ModuleRef
from .data import IGNORE_INDEX, collate
from .errors import CalibrationError, LoraRanksError  # noqa: F401  (CalibrationError re-exported)

__all__ = ["CurvatureFactors", "collect_curvature", "plan_passes", "factor_bytes", "sample_labels",
           "calibration_tokens", "CalibrationError"]

CurvatureKind = Literal["input", "fisher"]


@dataclass
class CurvatureFactors:
    """The factors of one module, float64 on the CPU.

    Attributes:
        input_factor: A = E[x xᵀ], Tensor (d_in, d_in); shared (the same object) by modules reading one input.
        output_factor: G = E[g gᵀ], Tensor (d_out, d_out), or None for input-only curvature.
        tokens: T, the token positions averaged over.
        response_tokens: T_resp, the positions whose next token was trained on (where labels are sampled).
        input_key: the name of the module whose input A was computed from (itself, or the first of its group).
    """

    input_factor: torch.Tensor
    output_factor: torch.Tensor | None
    tokens: int
    response_tokens: int
    input_key: str = ""
    fired: bool = True

    @property
    def token_ratio(self) -> float:
        """T / T_resp: converts ½ tr(G E A Eᵀ) into the expected KL per response token."""
        return self.tokens / max(1, self.response_tokens)


def factor_bytes(module: ModuleRef, kind: CurvatureKind) -> int:
    """float64 bytes of one module's factors: 8 (d_in² + d_out²), or 8 d_in² for input-only."""
    d_out, d_in = module.shape
    return 8 * (d_in * d_in + (d_out * d_out if kind == "fisher" else 0))


def plan_passes(modules: Sequence[ModuleRef], kind: CurvatureKind, memory_bytes: int) -> list[list[str]]:
    """Layers grouped into passes, in depth order, each group's factors within ``memory_bytes`` (or one layer)."""
    per_layer: OrderedDict[str, int] = OrderedDict()
    for m in modules:
        per_layer[m.layer] = per_layer.get(m.layer, 0) + factor_bytes(m, kind)
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


def calibration_tokens(examples: Sequence[dict]) -> tuple[int, int]:
    """(token positions, response positions) of tokenized examples: what the factors average over."""
    tokens = sum(len(e["input_ids"]) for e in examples)
    response = sum(sum(1 for label in e["labels"][1:] if label != IGNORE_INDEX) for e in examples)
    return tokens, response


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
    kind: CurvatureKind,
    samples: int,
    seed: int,
    batch_size: int,
    memory_bytes: int,
    on_batch: Callable[[int, int], None] | None = None,
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
        on_batch: called as ``on_batch(done, total)`` after each batch of each pass (progress).

    Raises:
        CalibrationError: when ``examples`` is empty or no position is trained on (no response tokens).
    """
    if not examples:
        raise CalibrationError("no calibration records to estimate curvature from")
    tokens, response = calibration_tokens(examples)
    if kind == "fisher" and response == 0:
        raise CalibrationError("the calibration records have no response tokens to sample labels at")
    by_name = dict(model.named_modules())
    missing = [m.name for m in modules if m.name not in by_name]
    if missing:
        raise LoraRanksError(f"the model has no module {missing[0]!r} ({len(missing)} target module(s) missing)")
    passes = plan_passes(modules, kind, memory_bytes)
    was_training = model.training
    model.eval()
    try:
        for group in passes:
            wanted = [m for m in modules if m.layer in group]
            factors = _one_pass(model, by_name, examples, pad_token_id, wanted, kind, samples, seed, batch_size,
                                on_batch, len(passes) * math.ceil(len(examples) / batch_size))
            for layer in group:
                yield layer, {m.name: factors[m.name] for m in wanted if m.layer == layer}
    finally:
        model.train(was_training)


def _rows(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked positions' vectors, (n, d), for one batch's product: float64 stays float64 (exact references);
    anything else is multiplied in float32 (fast), and every batch's product is summed into float64."""
    rows = tensor.detach()[mask]
    return rows if rows.dtype == torch.float64 else rows.float()


def _one_pass(model, by_name, examples, pad_token_id, modules, kind, samples, seed, batch_size, on_batch, total):
    """One pass over the calibration set with hooks on ``modules``: their factors (see ``collect_curvature``)."""
    device = next(model.parameters()).device
    inputs: dict[str, torch.Tensor] = {}  # input key -> Σ x xᵀ (float64, CPU)
    input_key: dict[str, str] = {}  # module -> key of the A it shares
    outputs: dict[str, torch.Tensor] = {}  # module -> Σ g gᵀ
    state: dict = {"mask": None, "seen": {}}
    handles = []

    def forward_hook(name: str, layer: str):
        def hook(module, args, output):
            x = args[0]
            mask = state["mask"]  # (B, T) bool: non-padding positions
            seen = state["seen"]  # (layer, address) -> (tensor, key); holding the tensor keeps its address unique
            shared = seen.get((layer, x.data_ptr()))
            if shared is not None and shared[0] is x:  # q/k/v (gate/up) read the same tensor: share its A
                input_key[name] = shared[1]
            else:
                seen[(layer, x.data_ptr())] = (x, name)
                input_key[name] = name
                rows = _rows(x, mask)  # (n, d_in)
                product = (rows.T @ rows).to(torch.float64).cpu()
                inputs[name] = product if name not in inputs else inputs[name] + product
            if kind == "fisher" and output.requires_grad:
                def grad_hook(grad):
                    rows = _rows(grad, state["mask"])  # (n, d_out)
                    product = (rows.T @ rows).to(torch.float64).cpu()
                    outputs[name] = product if name not in outputs else outputs[name] + product
                output.register_hook(grad_hook)
        return hook

    def inputs_require_grad(module, args, output):  # gradients reach the target modules without any weight grads
        return output.requires_grad_(True)

    for m in modules:
        handles.append(by_name[m.name].register_forward_hook(forward_hook(m.name, m.layer)))
    if kind == "fisher":
        handles.append(model.get_input_embeddings().register_forward_hook(inputs_require_grad))
    generator = torch.Generator().manual_seed(seed)
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = response = 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(list(examples[start: start + batch_size]), pad_token_id).items()}
            mask = batch["attention_mask"].bool()
            state["mask"], state["seen"] = mask, {}
            tokens += int(mask.sum())
            response += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            with torch.set_grad_enabled(kind == "fisher"):
                # Image records (Qwen2.5-VL) also carry pixel_values and image_grid_thw.
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                if logits.dtype not in (torch.float32, torch.float64):
                    logits = logits.float()
                for draw in range(samples if kind == "fisher" else 0):
                    sampled = sample_labels(logits, batch["labels"], generator)
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                             sampled[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                                             reduction="sum")
                    loss.backward(retain_graph=draw < samples - 1)
            if on_batch is not None:
                on_batch(start // batch_size + 1, total)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
    normalized = {key: total / tokens for key, total in inputs.items()}  # one A per distinct input
    out = {}
    for m in modules:
        key = input_key.get(m.name)
        if key is None:  # the module never ran on these records (e.g. a vision tower with text-only data)
            out[m.name] = CurvatureFactors(torch.zeros(0), None, tokens, response, "", fired=False)
            continue
        g = outputs[m.name] / (tokens * samples) if kind == "fisher" and m.name in outputs else None
        out[m.name] = CurvatureFactors(normalized[key], g, tokens, response, key, fired=kind == "input" or g is not None)
    return out
