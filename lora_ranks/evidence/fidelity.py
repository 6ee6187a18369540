"""Fidelity: how close does base + truncated delta (= the merged extracted adapter) get to the fine-tuned model?

For a rank allocation, replace every analyzed weight of the base model by its base value plus the truncated SVD
of its delta at the allocated rank, and measure on held-out records how close that model is to the fully
fine-tuned one:

    mean KL(P_finetuned || P_model) of next-token distributions over the response tokens (nats per token),
    and the difference in loss (cross-entropy of the labels) between the two.

A sweep over tau (energy-threshold ranks) and, at the same trainable-parameter counts, budget water-filling and
uniform ranks, gives parameters-vs-fidelity curves. Identical models give KL = 0; full-rank allocations give KL
at float tolerance when only the analyzed modules changed (both tested).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..checkpoints import CheckpointPair, ModuleRef
from ..data import IGNORE_INDEX, DataError, collate
from ..progress import Heartbeat
from ..ranks import allocate_ranks, lora_parameters
from ..settings import AllocationSettings, FidelitySettings
from ..spectra import Spectrum
from .allocations import uniform_allocation

__all__ = ["FidelityPoint", "next_token_fidelity", "ReferenceOutputs", "reference_outputs", "fidelity_to",
           "DeltaBasis", "fidelity_sweep", "held_out_loss", "mean_and_std"]

#: Sequences per forward pass when evaluating (held-out loss, reference outputs, KL): memory, not results.
EVAL_BATCH_SIZE = 8


@dataclass
class FidelityPoint:
    """One allocation's fidelity: parameters spent and distance to the fine-tuned model."""

    method: str  # "energy", "budget", "uniform", or "full"
    setting: float  # tau for "energy", the parameter budget otherwise
    trainable_parameters: int
    mean_kl: float  # nats per token, KL(P_finetuned || P_model)
    loss: float  # held-out cross-entropy of the model
    loss_finetuned: float
    ranks: dict[str, int]

    @property
    def loss_difference(self) -> float:
        return self.loss - self.loss_finetuned


@dataclass
class ReferenceOutputs:
    """A reference model's next-token log-probabilities at the label positions of some examples, computed once so
    that many models can be compared with it (each comparison then costs one forward pass of the model).

    ``batches`` holds, per batch: the model inputs, the label mask (B, T-1) bool, the targets (n,) and the
    reference log-probabilities (n, V) float64 at the n masked positions.
    """

    batches: list[tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]]
    count: int


@torch.no_grad()
def reference_outputs(reference: torch.nn.Module, examples: Sequence[dict], pad_token_id: int,
                      batch_size: int = EVAL_BATCH_SIZE) -> ReferenceOutputs:
    """Run ``reference`` once over ``examples`` (tokenized records) and keep its log-probabilities at the positions
    whose next-token label is trained (not -100)."""
    reference.eval()
    batches, count = [], 0
    heartbeat = Heartbeat("reference outputs", len(examples), "record")
    for start in range(0, len(examples), batch_size):
        heartbeat.update(start)
        batch = collate(examples[start: start + batch_size], pad_token_id)
        labels = batch["labels"][:, 1:]  # (B, T-1): next-token targets
        mask = labels != IGNORE_INDEX
        if not mask.any():
            continue
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = reference(**inputs).logits[:, :-1][mask]  # (n, V): only where a label is trained
        batches.append((inputs, mask, labels[mask], torch.log_softmax(logits.double(), dim=-1)))
        count += int(mask.sum())
    if count == 0:
        raise ValueError("no response tokens to evaluate: every label is -100")
    return ReferenceOutputs(batches, count)


@torch.no_grad()
def fidelity_to(reference: ReferenceOutputs, model: torch.nn.Module) -> tuple[float, float, float]:
    """(mean KL(P_reference || P_model), loss of model, loss of reference) over the reference's label positions."""
    model.eval()
    kl_sum = loss_model = loss_ref = 0.0
    heartbeat = Heartbeat("KL to the reference", len(reference.batches), "batch")
    for done, (inputs, mask, target, logp_ref) in enumerate(reference.batches):
        heartbeat.update(done)
        logp_model = torch.log_softmax(model(**inputs).logits[:, :-1][mask].double(), dim=-1)  # (n, V)
        kl_sum += float((logp_ref.exp() * (logp_ref - logp_model)).sum())
        loss_model -= float(logp_model.gather(-1, target.unsqueeze(-1)).sum())
        loss_ref -= float(logp_ref.gather(-1, target.unsqueeze(-1)).sum())
    return kl_sum / reference.count, loss_model / reference.count, loss_ref / reference.count


def next_token_fidelity(reference: torch.nn.Module, model: torch.nn.Module, examples: Sequence[dict],
                        pad_token_id: int, batch_size: int = EVAL_BATCH_SIZE) -> tuple[float, float, float]:
    """(mean KL(P_reference || P_model), loss of model, loss of reference) over label positions.

    ``examples`` are tokenized records ({"input_ids", "labels"}); positions whose next-token label is -100
    (prompts, padding) are skipped, so this measures the responses the fine-tune taught. To compare many models
    with one reference, compute ``reference_outputs`` once and call ``fidelity_to``.
    """
    return fidelity_to(reference_outputs(reference, examples, pad_token_id, batch_size), model)


class DeltaBasis:
    """Full SVD of every analyzed delta, kept in memory, so any rank's truncation is a slice.

    With ``roots`` (module name -> damped (G, A) roots, ``spectra.weighted.FactorRoot``) the SVD is that of the
    weighted delta M = R_G^T dW R_A and a truncation is the loss-aware one, R_G^-T M_r R_A^-1; without, the plain
    truncated SVD.
    Meant for the models of fidelity experiments (small enough to hold U, S, V of every module).
    """

    def __init__(self, pair: CheckpointPair, modules: Sequence[ModuleRef], roots: Mapping | None = None):
        self.modules = list(modules)
        self.svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.roots: dict[str, tuple] = {}
        for m in self.modules:
            delta = pair.delta(m, torch.float64)  # (d_out, d_in)
            if roots is not None and m.name in roots:
                out_root, in_root = roots[m.name]
                delta = in_root.right(out_root.left(delta))
                self.roots[m.name] = (out_root, in_root)
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (m,k), (k,), (k,n)
            self.svd[m.name] = (u, s, vh)
        pair.close()

    def truncated(self, name: str, rank: int) -> torch.Tensor:
        """The best rank-``rank`` approximation of the delta of ``name`` (in the weighted norm when the basis has
        roots): (d_out, d_in), float64."""
        u, s, vh = self.svd[name]
        low_rank = (u[:, :rank] * s[:rank]) @ vh[:rank]
        if name in self.roots:
            out_root, in_root = self.roots[name]
            low_rank = in_root.right_inverse(out_root.left_inverse(low_rank))
        return low_rank

    def discarded_energy(self, name: str, rank: int) -> float:
        """Sum of the squared singular values beyond ``rank`` (in the weighted norm when the basis has roots)."""
        s = self.svd[name][1]
        return float(torch.sum(s[rank:] ** 2))

    def apply(self, base_model: torch.nn.Module, ranks: Mapping[str, int]) -> torch.nn.Module:
        """A copy of ``base_model`` with W += truncated delta at ``ranks`` (= base + merged extracted adapter)."""
        model = copy.deepcopy(base_model)
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, rank in ranks.items():
                weight = modules[name].weight
                weight += self.truncated(name, rank).to(weight.dtype)
        return model


def _params(modules: Sequence[ModuleRef], ranks: Mapping[str, int]) -> int:
    return sum(lora_parameters(m.shape, ranks[m.name]) for m in modules)


def fidelity_sweep(
    base_model: torch.nn.Module,
    finetuned_model: torch.nn.Module,
    basis: DeltaBasis,
    spectra: Mapping[str, Spectrum],
    examples: Sequence[dict],
    pad_token_id: int,
    *,
    taus: Sequence[float] = FidelitySettings.model_fields["taus"].default,
    min_rank: int = 1,
    max_rank: int = AllocationSettings.model_fields["max_rank"].default,
) -> list[FidelityPoint]:
    """Fidelity of energy-threshold ranks for each tau, and of budget water-filling and uniform ranks at the
    same parameter counts (smoothing off, so each method is seen on its own)."""
    modules = basis.modules
    points: list[FidelityPoint] = []
    reference = reference_outputs(finetuned_model, examples, pad_token_id)

    def measure(method: str, setting: float, ranks: dict[str, int]) -> None:
        kl, loss, loss_ft = fidelity_to(reference, basis.apply(base_model, ranks))
        points.append(FidelityPoint(method, setting, _params(modules, ranks), kl, loss, loss_ft, ranks))

    for tau in taus:
        settings = AllocationSettings(energy_threshold=tau, min_rank=min_rank, max_rank=max_rank, smoothing="none")
        energy = {a.name: a.final_rank for a in allocate_ranks(modules, spectra, settings)}
        measure("energy", tau, energy)
        budget = _params(modules, energy)
        water = allocate_ranks(modules, spectra, AllocationSettings(min_rank=min_rank, max_rank=max_rank,
                                                                    budget=float(budget)))
        measure("budget", budget, {a.name: a.final_rank for a in water})
        measure("uniform", budget, uniform_allocation(modules, budget))
    return points


def check_report_data(fidelity: FidelitySettings, data_path: str | None, eval_data_path: str | None) -> None:
    """The fidelity report has records to evaluate on (before any work: it is the analysis's last step).

    Raises:
        DataError: the report asked for without ``--eval-data`` or ``--data``.
    """
    if fidelity.fidelity_report and not (eval_data_path or data_path):
        raise DataError("--fidelity-report measures the KL of base + adapters to the fine-tuned model on held-out "
                        "records: give them (--eval-data, eval_data_path) or the training data (--data, data_path)")


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, examples: Sequence[dict], pad_token_id: int, batch_size: int = EVAL_BATCH_SIZE, *,
                  what: str = "held-out loss") -> float:
    """Mean cross-entropy (nats per token) of ``model`` over the label tokens of ``examples``, on the device of the
    model's parameters (the sums in float64). ``what`` names the evaluation in its progress lines."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    heartbeat = Heartbeat(what, len(examples), "record")
    for start in range(0, len(examples), batch_size):
        heartbeat.update(start)
        batch = {k: v.to(device) for k, v in collate(examples[start: start + batch_size], pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        # Only the label positions' log-softmax (float64): the same values, without a float64 copy of the logits
        # of every position (the vocabulary is 49k wide on SmolLM2, most positions are prompt or padding).
        logp = torch.log_softmax(logits[mask].double(), dim=-1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
        total -= float(logp.sum())
        count += int(mask.sum())
    return total / count


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
