"""Stage 5: PEFT LoRA models with the heterogeneous ranks of a rank config.

PEFT's ``rank_pattern`` silently ignores keys that match nothing and takes the first key that matches, so a
wrong config can become a silently wrong model. Here every model is checked after it is built: each module
the config names must carry a LoRA adapter of exactly the configured rank (read from ``lora_A.weight``), and
no other module may carry one; otherwise ``DynamicLoRAError`` lists every mismatch.

    model, tokenizer = create_model_with_dynamic_lora("Qwen/Qwen3-8B", "configs/lora_rank_config.json",
                                                      quantization="4bit")
"""

from __future__ import annotations

# PEFT (3-5 s to import) is imported when an adapter is built or loaded: extraction and the check's input checks
# import this module for its config helpers without building one.
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_folder, atomic_write_json
from .adapter_files import ADAPTER_CONFIG, PEFT_KEY_PREFIX, RANK_CONFIG
from .config import RankConfig, RankConfigError, check_config_matches_model, load_rank_config, parse_rank_config
from .errors import LoraRanksError, list_problems
from .loading import Quantization, detect_model_type, load_model
from .serving import note_serving, read_adapter
from .settings import LoRATrainingSettings
from .training_loop import enable_gradient_checkpointing

__all__ = [
    "DynamicLoRAError",
    "DynamicLoRAConfig",
    "PEFTModelFactory",
    "create_model_with_dynamic_lora",
    "create_peft_model_from_config",
    "load_peft_checkpoint",
    "detect_model_type",
    "lora_ranks_of",
    "validate_peft_model",
    "save_adapter",
]


class DynamicLoRAError(LoraRanksError):
    """A PEFT model does not carry the adapters its rank config asks for."""


@dataclass
class DynamicLoRAConfig:
    """A validated rank config, turned into a ``peft.LoraConfig``.

    Attributes:
        rank_config: the rank config (a ``RankConfig``; a mapping is parsed, migrated and validated on construction).
        lora_dropout: dropout on the LoRA input (default: ``LoRATrainingSettings.lora_dropout``).
        init_lora_weights: PEFT's initialisation (True: A Kaiming, B zero, so training starts at the base).
    """

    rank_config: RankConfig
    lora_dropout: float = LoRATrainingSettings.model_fields["lora_dropout"].default
    init_lora_weights: bool | str = True
    source: str = "<dict>"

    def __post_init__(self) -> None:
        self.rank_config = parse_rank_config(self.rank_config, source=self.source)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got lora_dropout={self.lora_dropout}")
        for name in self.target_modules:
            if name.split(".")[-1] in ("lm_head", "embed_tokens", "wte", "word_embeddings"):
                raise RankConfigError(f"{self.source}: {name!r} is an output head or embedding; adapters on them "
                                      "are rejected by serving stacks, so rank configs never target them")

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> DynamicLoRAConfig:
        return cls(load_rank_config(path), source=str(path), **kwargs)

    @property
    def target_modules(self) -> list[str]:
        return list(self.rank_config.target_modules)

    @property
    def ranks(self) -> dict[str, int]:
        """Module name -> rank, for every targeted module."""
        return self.rank_config.ranks

    def predicted_parameters(self, shapes: Mapping[str, tuple[int, int]]) -> int:
        """LoRA parameters the built model will have: sum of r * (d_in + d_out) over targeted modules."""
        return sum(r * (shapes[n][0] + shapes[n][1]) for n, r in self.ranks.items())

    def peft_kwargs(self) -> dict[str, Any]:
        """The ``peft.LoraConfig`` arguments for this config (plain data; PEFT is not imported).

        ``r``/``lora_alpha`` (the fallbacks) are set to the most common rank and its alpha; every targeted
        module has its own anchored pattern entry anyway.
        """
        config = self.rank_config
        ranks = list(config.rank_pattern.values())
        common = max(set(ranks), key=ranks.count)
        common_module = next(name for name, r in config.ranks.items() if r == common)
        return dict(
            r=common,
            lora_alpha=config.alpha_of(common_module),
            target_modules=self.target_modules,
            rank_pattern=dict(config.rank_pattern),
            alpha_pattern=dict(config.alpha_pattern),  # never None: PEFT crashes on alpha_pattern=None
            use_rslora=config.use_rslora,
            lora_dropout=self.lora_dropout,
            init_lora_weights=self.init_lora_weights,
            bias="none",
            task_type="CAUSAL_LM",
        )

    def to_peft_config(self, **overrides: Any):
        """``peft.LoraConfig`` with anchored per-module ``rank_pattern``/``alpha_pattern``."""
        from peft import LoraConfig

        return LoraConfig(**{**self.peft_kwargs(), **overrides})

    def adapter_config(self, base_model_name_or_path: str) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT writes for ``to_peft_config()`` (for writers that do not
        import PEFT, like extraction)."""
        return {"peft_type": "LORA", "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
                "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None, **self.peft_kwargs()}


def lora_ranks_of(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """Module name (relative to the base model) -> rank of its LoRA adapter ``adapter_name``."""
    out = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and adapter_name in lora_a:
            out[name.removeprefix(PEFT_KEY_PREFIX)] = int(lora_a[adapter_name].weight.shape[0])
    return out


def validate_peft_model(model: torch.nn.Module, config: DynamicLoRAConfig, adapter_name: str = "default") -> None:
    """Raise DynamicLoRAError unless exactly the configured modules carry adapters of exactly the configured ranks."""
    built = lora_ranks_of(model, adapter_name)
    wanted = config.ranks
    problems = [f"{n}: no LoRA adapter (the config asks for rank {r})" for n, r in wanted.items() if n not in built]
    problems += [f"{n}: rank {built[n]} but the config asks for {r}" for n, r in wanted.items() if n in built and built[n] != r]
    problems += [f"{n}: has a rank-{r} adapter the config does not ask for" for n, r in built.items() if n not in wanted]
    if problems:
        raise DynamicLoRAError(list_problems(f"PEFT model does not match {config.source}", problems))


def lora_config(rank_config: RankConfig | Mapping | str | Path, *, model: torch.nn.Module | str | Path | None = None,
                **overrides: Any):
    """The ``peft.LoraConfig`` of a rank config, for any trainer that takes one (TRL's ``SFTTrainer(peft_config=)``,
    ``get_peft_model``): the target modules, each module's rank and alpha (``rank_pattern`` and ``alpha_pattern``,
    anchored so that one key matches one module) and rsLoRA's scale, as recorded. The adapters start at PEFT's init
    (B = 0); to start from lora-ranks' warm start instead, load the adapter folder ``lora-ranks extract`` writes with
    ``PeftModel.from_pretrained(base, folder, is_trainable=True)`` (docs/trainers.md).

    Args:
        rank_config: ``lora_rank_config.json`` (a path), or the config itself.
        model: the model (a module, or a model folder, built on the meta device) the config must fit; checked first
            when given.
        overrides: any ``LoraConfig`` field (``lora_dropout`` defaults to ``LoRATrainingSettings.lora_dropout``, what
            ``lora-ranks train`` uses).

    Raises:
        RankConfigError: not a valid rank config; or, with ``model``, modules the model lacks or has at other shapes,
            listed.
    """
    config = _as_config(rank_config)
    if model is not None:
        check_config_matches_model(config.rank_config, model)
    return config.to_peft_config(**overrides)


def check_warm_start(adapter_dir: str | Path, rank_config: RankConfig | Mapping | str | Path) -> None:
    """An adapter folder to start training from (``lora-ranks extract``'s warm start) carries exactly the config's
    modules at exactly its ranks (reads only the safetensors header and ``adapter_config.json``).

    Raises:
        DynamicLoRAError: one line naming the folder, the config and the first module that differs (and how many).
    """
    config = _as_config(rank_config)
    built, wanted = read_adapter(adapter_dir, weights=False).ranks, config.ranks
    problems = [f"{n}: rank {built[n]} but the config asks for {r}" for n, r in wanted.items() if n in built and built[n] != r]
    problems += [f"{n}: no adapter (the config asks for rank {r})" for n, r in wanted.items() if n not in built]
    problems += [f"{n}: a rank-{r} adapter the config does not ask for" for n, r in built.items() if n not in wanted]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DynamicLoRAError(f"the warm-start folder {adapter_dir} does not match {config.source}: {problems[0]}{more}; "
                               "extract the warm start with this config (lora-ranks extract --config ...)")


def create_peft_model_from_config(model: torch.nn.Module, config: DynamicLoRAConfig | RankConfig | Mapping | str | Path,
                                  adapter_name: str = "default", **lora_overrides: Any):
    """Wrap ``model`` in a PEFT model with the config's ranks, after checking the config fits the model.

    Raises:
        RankConfigError: the config names modules the model lacks (or of other shapes), listing them.
        DynamicLoRAError: PEFT did not build exactly the configured adapters.
    """
    from peft import get_peft_model

    config = _as_config(config)
    check_config_matches_model(config.rank_config, model)
    peft_model = get_peft_model(model, config.to_peft_config(**lora_overrides), adapter_name=adapter_name)
    validate_peft_model(peft_model, config, adapter_name)
    return peft_model


def _as_config(config: DynamicLoRAConfig | RankConfig | Mapping | str | Path) -> DynamicLoRAConfig:
    if isinstance(config, DynamicLoRAConfig):
        return config
    if isinstance(config, (str, Path)):
        return DynamicLoRAConfig.from_file(config)
    return DynamicLoRAConfig(config)


@dataclass
class PEFTModelFactory:
    """Loads a base model (optionally 4/8-bit) and wraps it with the config's heterogeneous LoRA.

    Attributes:
        config: the rank config.
        quantization: None, "4bit" (nf4, double quantization, bf16 compute on CUDA / float32 on CPU) or
            "8bit" (LLM.int8); bitsandbytes 0.45+ runs both on CPU and CUDA.
        dtype: weights dtype for unquantized loads (None: bf16 on CUDA, float32 on CPU).
        gradient_checkpointing: enable it on the base model (less activation memory when training).
        trust_remote_code: run Python code shipped with the model (off by default).
    """

    config: DynamicLoRAConfig | None = None
    quantization: Quantization | None = None
    dtype: torch.dtype | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    device_map: Any = None
    extra_load_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"quantization must be None, '4bit' or '8bit', got quantization={self.quantization!r}")

    def load_base(self, model_name: str | Path):
        """(base model, tokenizer) from a local folder or hub id; safetensors only (see ``loading.load_model``).

        Unquantized weights load in ``dtype`` (None: bf16 on CUDA, float32 on the CPU).
        """
        dtype = self.dtype
        if dtype is None and self.quantization is None:
            dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        return load_model(model_name, dtype=dtype, quantization=self.quantization, trust_remote_code=self.trust_remote_code,
                          device_map=self.device_map, **self.extra_load_kwargs)

    def build(self, model_name: str | Path, adapter_name: str = "default"):
        """(PEFT model, tokenizer or processor), validated against the config."""
        if self.config is None:
            raise ValueError("PEFTModelFactory.build needs a config (DynamicLoRAConfig); load_base does not")
        model, tokenizer = self.load_base(model_name)
        if self.quantization is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.gradient_checkpointing)
        elif self.gradient_checkpointing:
            enable_gradient_checkpointing(model)
            model.enable_input_require_grads()
        return create_peft_model_from_config(model, self.config, adapter_name), tokenizer


def create_model_with_dynamic_lora(model_name: str | Path, rank_config_path: str | Path, quantization: Quantization | None = None,
                                   **factory_kwargs: Any):
    """One call: (PEFT model with the config's ranks, tokenizer or processor). See PEFTModelFactory."""
    factory = PEFTModelFactory(DynamicLoRAConfig.from_file(rank_config_path), quantization=quantization, **factory_kwargs)
    return factory.build(model_name)


def load_peft_checkpoint(model_name: str | Path, adapter_dir: str | Path, *, quantization: Quantization | None = None,
                         is_trainable: bool = False, adapter_name: str = "default", **factory_kwargs: Any):
    """Load a saved adapter onto its base model: (PeftModel, tokenizer or processor).

    If the adapter folder holds the ``lora_rank_config.json`` it was built from, the loaded ranks are
    validated against it.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json; is it a saved PEFT adapter?")
    config_file = adapter_dir / RANK_CONFIG
    rank_config = DynamicLoRAConfig.from_file(config_file) if config_file.is_file() else None
    factory = PEFTModelFactory(rank_config, quantization=quantization, **factory_kwargs)
    base, tokenizer = factory.load_base(model_name)
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)
    if rank_config is not None:
        validate_peft_model(model, rank_config, adapter_name)
    return model, tokenizer


def save_adapter(model, out_dir: str | Path, config: DynamicLoRAConfig | None = None,
                 provenance: Mapping[str, Any] | None = None) -> Path:
    """``save_pretrained`` into a folder that replaces ``out_dir`` only once complete (see ``atomic_folder``); the
    rank config is copied next to the adapter so ``load_peft_checkpoint`` can validate it, and ``provenance`` (how
    it was made) is recorded; servers that would mis-serve the adapter are named in its README
    (``export.note_serving``)."""
    out = Path(out_dir)
    with atomic_folder(out, content="adapter") as tmp:
        model.save_pretrained(str(tmp))
        if config is not None:
            atomic_write_json(tmp / RANK_CONFIG, config.rank_config.to_dict())
        note_serving(tmp, {"made_by": "lora-ranks", **(provenance or {})}, out)
    return out
