"""What users pick instead of lora-ranks: PEFT's own LoRA variants and data-driven inits, as comparison rows.

Every peer is built through PEFT's API on the modules lora-ranks adapts, at the ranks of the budget's uniform config
(rank r everywhere, capped at each module's short side): the same trainable parameters as the lora-ranks rows of that
budget, except where the method's budget is not counted in parameters (EVA redistributes ranks; AdaLoRA starts
above its target rank and prunes), whose actual count is reported. ``default`` keeps PEFT's own ``lora_alpha`` (8,
so a scale of 8 / r) where lora-ranks' uniform config sets alpha = 2r: it is PEFT's ``LoraConfig()`` at the budget's
rank, as a user who sets only ``r`` gets it (lora-ranks' own cold uniform row, ``--cold-baseline``, keeps the
config's alpha). The other peers take the uniform config's alpha (rsLoRA: 2r / sqrt(r)).

==========  ==========================================================================  ==========  =============
peer        PEFT                                                                        data        served as
==========  ==========================================================================  ==========  =============
default     ``LoraConfig(r=r)`` as users get it: A Kaiming, B = 0, ``lora_alpha`` 8      no          plain LoRA
rslora      ``use_rslora=True`` (scale alpha / sqrt(r), alpha of the uniform config)     no          plain LoRA
pissa       ``init_lora_weights="pissa_niter_4"`` (top singular directions of W)         no          rank-2r LoRA*
olora       ``init_lora_weights="olora"`` (QR of W)                                      no          rank-2r LoRA*
eva         ``"eva"``, ``EvaConfig(rho=2)``, ``initialize_lora_eva_weights``             forward     plain LoRA
corda       ``"corda"``, ``CordaConfig(corda_method="ipm")``, ``preprocess_corda``       forward     rank-2r LoRA*
lora-ga     ``"lora_ga"``, ``LoraGAConfig()``, ``preprocess_loraga``                     backward    rank-2r LoRA*
adalora     ``AdaLoraConfig(init_r=1.5r, target_r=r)``, ``update_and_allocate`` per step  no          PEFT AdaLoRA
==========  ==========================================================================  ==========  =============

\\* PiSSA, OLoRA, CorDA and LoRA-GA move the base weights (W_res = W − s·B₀A₀) and train from there. Served on the
original base, such an adapter is PEFT's conversion (``save_pretrained(path_initial_model_for_weight_conversion=...)``):
a plain LoRA of rank 2r, [B, B₀] and [A; −A₀]: the comparison evaluates exactly that converted adapter on the
original base, and it costs twice the parameters at serving.

The data-driven peers see ``calibration`` records (a seeded sample of the training records): EVA and CorDA forward
passes, LoRA-GA forward and backward passes. Their token counts are returned for the compute accounting
(``evidence.compute``).
"""

from __future__ import annotations

# PEFT (3-5 s to import) is imported when a peer is built or checked against the installed version: compare's input
# checks import this module for the peers' names.
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import collate, tokenize_record
from ..errors import LoraRanksError
from ..loading import load_model
from ..model import DynamicLoRAConfig
from .fidelity import EVAL_BATCH_SIZE

__all__ = ["Peer", "PEERS", "PeerModel", "PeerError", "build_peer_model", "check_peers", "save_served_adapter"]


class PeerError(LoraRanksError):
    """A peer method cannot be built for this model or these settings."""


@dataclass(frozen=True)
class Peer:
    """One peer method: its PEFT configuration and what it needs."""

    name: str
    summary: str
    lora_kwargs: dict = field(default_factory=dict)
    """Overrides of the uniform config's ``peft.LoraConfig`` arguments."""
    preparation: str | None = None
    """None, "forward" (EVA, CorDA: forward passes over the calibration records) or "backward" (LoRA-GA)."""
    changes_base: bool = False
    """True when the method moves the base weights (served as a converted rank-2r LoRA on the original base)."""

    @property
    def needs_data(self) -> bool:
        return self.preparation is not None


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("default", "PEFT's LoraConfig() as users get it: A Kaiming, B = 0, lora_alpha 8 (PEFT's default)",
         {"lora_alpha": 8, "alpha_pattern": {}}),
    Peer("rslora", "rank-stabilized scaling alpha / sqrt(r)", {"use_rslora": True}),
    Peer("pissa", "principal singular directions of W as the init (4 subspace iterations)",
         {"init_lora_weights": "pissa_niter_4"}, changes_base=True),
    Peer("olora", "orthonormal (QR) init from W", {"init_lora_weights": "olora"}, changes_base=True),
    Peer("eva", "explained-variance init from activations, ranks redistributed (rho 2)",
         {"init_lora_weights": "eva"}, preparation="forward"),
    Peer("corda", "context-oriented decomposition, instruction-previewed (ipm)", {"init_lora_weights": "corda"},
         preparation="forward", changes_base=True),
    Peer("lora-ga", "gradient-approximating init from estimated full gradients", {"init_lora_weights": "lora_ga"},
         preparation="backward", changes_base=True),
    Peer("adalora", "SVD-form adapters whose ranks are pruned during training (init 1.5 r, target r)"),
)}


@dataclass
class PeerModel:
    """A peer's PEFT model ready to train, and what building it cost."""

    model: torch.nn.Module
    tokenizer: object
    peer: Peer
    preparation_tokens: int = 0
    """Non-padding tokens of the passes its init ran (0 for data-free peers)."""
    after_update: Callable[[int], None] | None = None
    """Called after each optimizer step (AdaLoRA's rank allocation), else None."""
    initial_adapter_dir: str | None = None
    """Where the initial adapter was saved (base-changing peers), for the served conversion."""


def check_peers(names: Sequence[str], *, quantization: str | None, module_types: dict[str, str] | None = None
                ) -> None:
    """Refuse peers that cannot run, in one line naming the peer and why (before any work).

    Args:
        module_types: target module name -> class name (e.g. ``Linear``, ``Conv1D``), when known.

    Raises:
        PeerError: an unknown name; a peer that changes or reads the base weights (PiSSA, OLoRA, CorDA, LoRA-GA,
            EVA) with a quantized base, or any peer but ``default`` (peers are built on a float32 base); a target
            module that is not an ``nn.Linear`` (PEFT's data-driven inits and the served conversion support linear
            layers only).
    """
    for name in names:
        if name not in PEERS:
            raise PeerError(f"unknown peer {name!r}: choose from {', '.join(PEERS)}")
        peer = PEERS[name]
        if quantization is not None and (peer.changes_base or peer.preparation):
            raise PeerError(f"peer {name!r} needs the base weights in full precision (PEFT initializes it from them), "
                            f"but the LoRAs train on a {quantization} base: drop --lora-quantization or this peer")
        if quantization is not None and name != "default":
            raise PeerError(f"peer {name!r} trains on a float32 base here, but the LoRAs train on a {quantization} "
                            "base: drop --lora-quantization to compare it at equal footing")
        if module_types and name != "default" and name != "rslora":
            other = {m: t for m, t in module_types.items() if t != "Linear"}
            if other:
                module, kind = next(iter(other.items()))
                raise PeerError(f"peer {name!r} cannot be applied to {module} (a {kind}, not a Linear layer): PEFT "
                                "builds it for linear layers only")


def _batches(examples: Sequence[dict], pad_token_id: int, batch_size: int) -> list[dict]:
    return [collate(examples[i: i + batch_size], pad_token_id) for i in range(0, len(examples), batch_size)]


def _tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


class _CountingLoader:
    """The calibration batches as a sized iterable that counts the tokens read (EVA stops early once every layer's
    components converged, and may iterate more than once)."""

    def __init__(self, batches: list[dict]):
        self.batches, self.tokens = batches, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.tokens += _tokens(batch)
            yield batch


def build_peer_model(base_model: str | Path, uniform_config, peer_name: str, calibration_records: Sequence[dict], *,
                     max_length: int, lora_dropout: float, total_steps: int, work_dir: str | Path,
                     batch_size: int = EVAL_BATCH_SIZE, trust_remote_code: bool = False) -> PeerModel:
    """The PEFT model of ``peer_name`` on ``base_model`` at the ranks of ``uniform_config`` (a ``RankConfig``):
    float32 weights, in training mode, on the CPU (the caller moves it).

    Args:
        calibration_records: records for the data-driven inits, tokenized here to ``max_length`` tokens (EVA and
            LoRA-GA in batches of ``batch_size``; CorDA one record per pass, as its covariance hook expects).
        total_steps: training steps (AdaLoRA's schedule: pruning from 10% to 80% of them).
        work_dir: where the initial adapter of a base-changing peer is saved (for the served conversion).
    """
    from peft import get_peft_model


    peer = PEERS[peer_name]
    model, tokenizer = load_model(base_model, dtype=torch.float32, trust_remote_code=trust_remote_code)
    pad = tokenizer.pad_token_id
    calibration = [tokenize_record(r, tokenizer, max_length) for r in calibration_records] if peer.needs_data else []
    uniform = DynamicLoRAConfig(uniform_config, lora_dropout=lora_dropout)
    kwargs = {**uniform.peft_kwargs(), **peer.lora_kwargs}
    if peer.needs_data and not calibration:
        raise PeerError(f"peer {peer_name!r} needs calibration records, and none were given")
    tokens = 0
    if peer_name == "adalora":
        from peft import AdaLoraConfig

        r = kwargs["r"]
        config = AdaLoraConfig(init_r=max(r + 1, math.ceil(1.5 * r)), target_r=r, lora_alpha=kwargs["lora_alpha"],
                               target_modules=kwargs["target_modules"], lora_dropout=lora_dropout,
                               total_step=total_steps, tinit=max(1, total_steps // 10),
                               tfinal=max(1, total_steps // 5), deltaT=max(1, total_steps // 20),
                               task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        return PeerModel(peft_model, tokenizer, peer,
                         after_update=lambda step: peft_model.base_model.update_and_allocate(step))
    if peer_name == "eva":
        from peft import EvaConfig

        kwargs["eva_config"] = EvaConfig(rho=2.0)
    if peer_name == "corda":
        from peft.tuners.lora.config import CordaConfig

        kwargs["corda_config"] = CordaConfig(corda_method="ipm", verbose=False)
    if peer_name == "lora-ga":
        from peft import LoraGAConfig

        kwargs["lora_ga_config"] = LoraGAConfig()
    from peft import LoraConfig

    config = LoraConfig(**kwargs)
    if peer_name == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        records = [collate([e], pad) for e in calibration]

        @torch.no_grad()
        def run_model() -> None:
            for batch in records:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

        preprocess_corda(model, config, run_model=run_model)
        tokens = sum(_tokens(b) for b in records)
    elif peer_name == "lora-ga":
        from peft import preprocess_loraga

        batches = _batches(calibration, pad, batch_size)

        def train_step() -> None:
            model.train()
            for batch in batches:
                model(**batch).loss.backward()

        preprocess_loraga(model, config, train_step=train_step)
        model.zero_grad(set_to_none=True)
        tokens = sum(_tokens(b) for b in batches)
    peft_model = get_peft_model(model, config)
    if peer_name == "eva":
        from peft import initialize_lora_eva_weights

        loader = _CountingLoader(_batches(calibration, pad, batch_size))
        initialize_lora_eva_weights(peft_model, loader, show_progress_bar=False)
        tokens = loader.tokens
    initial = None
    if peer.changes_base:  # the init, saved as a plain adapter: the reference of the served conversion
        initial = Path(work_dir) / "initial_adapter"
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(str(initial))
        peft_model.peft_config["default"].init_lora_weights = kwargs["init_lora_weights"]
    peft_model.train()
    return PeerModel(peft_model, tokenizer, peer, preparation_tokens=tokens,
                     initial_adapter_dir=str(initial) if initial else None)


def save_served_adapter(built: PeerModel, out_dir: str | Path) -> Path:
    """Save the trained peer as it would be served on the original base: for a base-changing peer PEFT's conversion
    to a plain LoRA of rank 2r (``path_initial_model_for_weight_conversion``), else the adapter itself."""
    out = Path(out_dir)
    if built.initial_adapter_dir is None:
        built.model.save_pretrained(str(out))
    else:
        built.model.save_pretrained(str(out), path_initial_model_for_weight_conversion=built.initial_adapter_dir)
    return out
