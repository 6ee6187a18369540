"""Compute accounting of the comparison: training and preparation FLOPs of every row, by one stated formula.

The formula (Kaplan et al. 2020, "Scaling laws", section 2.1; the usual LoRA accounting of Hu et al. 2021):
    forward pass                       2 N   FLOPs per token
    training with the base frozen      4 N + 6 P   (forward 2N, input gradients 2N; P trainable adapter
                                                    parameters get forward, input and weight gradients)
    training every parameter           6 N   (forward 2N, input gradients 2N, weight gradients 2N)
    backward pass for input gradients  2 N   (the curvature passes: gradients reach the activations, no weight)

N = ``matmul_parameters(model)``: the weights of every ``nn.Linear`` (the LM head included, once when tied), the
parameters a token multiplies through; embeddings (a lookup) and norms are left out. Attention's T² term is left out
too: the experiment's sequences are at most 96 tokens, where it adds ~2% at hidden 256. Tokens are the non-padding
tokens of each batch (``train_loop(tokens_per_step=...)``).

Preparation: what a row spends before its first LoRA step.
* lora-ranks: the brief full fine-tune (6N per token), the split-half fine-tunes when the noise estimate is
  split-half (6N each), and the curvature passes (per pass over the calibration tokens: one forward, and for the
  Fisher ``fisher_samples`` backward passes for input gradients). The SVDs, Gram eigendecompositions and Cholesky
  roots are not in these FLOPs (they are not per-token work); they are in the preparation's wall time, which
  ``compare`` measures around the whole preparation (fine-tune, factors, roots, spectra, configs and the warm
  start's extraction) and reports beside the FLOPs.
* EVA, CorDA: forward passes over their calibration batches (2N per token); LoRA-GA: forward and backward with the
  target weights' gradients (4N + 2 N_target per token). PiSSA, OLoRA: an SVD / QR of each weight, not counted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoints import build_meta_model, resolve_model_path
from ..kfac import plan_passes
from ..spectra.kind import SpectrumKind

__all__ = ["FORWARD", "matmul_parameters", "model_matmul_parameters", "frozen_training_flops", "full_training_flops",
           "forward_flops", "finetune_flops", "curvature_flops", "lora_ranks_preparation"]

FORWARD = 2
"""FLOPs per parameter and token of a forward pass (a multiply and an add)."""


def matmul_parameters(model: torch.nn.Module) -> int:
    """N: parameters of every ``nn.Linear`` weight in ``model`` (each tensor once, so a tied LM head counts once
    with the embedding it shares), including those wrapped by PEFT's LoRA layers (their ``base_layer``); LoRA's
    own A and B matrices are not counted (they are the trainable P of ``frozen_training_flops``)."""
    seen: set[int] = set()
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".lora_" not in f".{name}" and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def model_matmul_parameters(model_path: str | Path) -> int:
    """``matmul_parameters`` of the model in ``model_path`` (a local folder or a known name), without reading its
    weights: the model is built from its ``config.json`` on PyTorch's meta device (``checkpoints.build_meta_model``)."""
    return matmul_parameters(build_meta_model(resolve_model_path(model_path)))


def forward_flops(n: int, tokens: int) -> float:
    """2 N per token."""
    return float(FORWARD * n * tokens)


def frozen_training_flops(n: int, trainable: int, tokens: int) -> float:
    """4 N + 6 P per token: training ``trainable`` adapter parameters on a frozen base of N."""
    return float((2 * FORWARD * n + 3 * FORWARD * trainable) * tokens)


def full_training_flops(n: int, tokens: int) -> float:
    """6 N per token: training every parameter."""
    return float(3 * FORWARD * n * tokens)


def finetune_flops(metrics_path: str | Path, n: int) -> float | None:
    """6 N x the tokens a fine-tune recorded in its ``training_metrics.json`` (``tokens``); None when the file or
    the count is missing (a fine-tune made before the count was recorded, or elsewhere)."""
    path = Path(metrics_path)
    if not path.is_file():
        return None
    tokens = json.loads(path.read_text()).get("tokens")
    return None if tokens is None else full_training_flops(n, int(tokens))


def curvature_flops(n: int, tokens: int, passes: int, kind: SpectrumKind | str, samples: int) -> float:
    """The curvature passes: per pass over the ``tokens`` calibration tokens, one forward (2N) and for the Fisher
    ``samples`` backward passes for input gradients (2N each); "input" factors need the forward only."""
    backward = samples if SpectrumKind(kind).needs_output_factor else 0
    return float(passes * FORWARD * n * tokens * (1 + backward))


def lora_ranks_preparation(config, n: int, finetune_metrics: Sequence[str | Path]) -> dict[str, float | None]:
    """The preparation FLOPs of lora-ranks' rows from the analysis config (a ``RankConfig``) and the training
    metrics of the fine-tunes it needed (the pair's, and the split halves' when used): ``finetune``, ``curvature``
    and their ``total`` (None when a fine-tune's token count is missing)."""
    finetunes = [finetune_flops(p, n) for p in finetune_metrics]
    finetune = None if any(f is None for f in finetunes) else sum(finetunes)
    curvature = 0.0
    record = config.analysis_metadata.curvature
    if record is not None and record.has_factors and record.tokens:
        settings = record.settings
        kind = "fisher" if record.kind.needs_output_factor else "input"
        # The passes are recorded; a config from before they were planned them at its setting (4 GiB by default then).
        passes = record.passes or len(plan_passes(config.module_refs(), kind,
                                                  int((settings.factor_memory_gb or 4.0) * 2**30)))
        curvature = curvature_flops(n, record.tokens, passes, kind, settings.fisher_samples)
    return {"finetune": finetune, "curvature": curvature,
            "total": None if finetune is None else finetune + curvature}
