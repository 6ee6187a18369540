"""What is checked before anything is built, and what is predicted from the config alone.

``check_inputs`` answers bad input with one ``CheckInputError`` naming it: a rank config that names modules the
model lacks (all of them listed), a device that is not there, a sequence longer than the model's context.
Non-positive batch, sequence length and budgets are refused by ``CheckSettings`` itself.
"""

from __future__ import annotations

# torch-level modules, transformers and bitsandbytes are imported by the checks that read the model: the command line
# imports this package at start (its error types, the report's name).
from pathlib import Path

from ..devices import resolve_device, resolve_precision
from ..errors import LoraRanksError
from ..settings import CheckSettings, LoRATrainingSettings
from .measure import Target
from .report import SizePrediction

__all__ = ["CheckInputError", "check_inputs", "predict_sizes", "bitsandbytes_problem", "resolve_device"]

#: Bytes per element of the LoRA weights PEFT builds: float32 (``autocast_adapter_dtype`` upcasts bf16/fp16).
ADAPTER_BYTES_PER_PARAMETER = 4


class CheckInputError(LoraRanksError):
    """An input of ``lora-ranks check`` that cannot be measured (named in the message)."""


def check_inputs(model: str, rank_config: str, settings: CheckSettings,
                 training: LoRATrainingSettings = LoRATrainingSettings(), trust_remote_code: bool = False) -> Target:
    """Everything that can be checked without building the model; returns what to measure.

    Raises:
        RankConfigError: the config is invalid, or names modules the model lacks or of other shapes (all listed).
        CheckInputError: the device is not available, or ``seq_len`` exceeds the model's context.
        PrecisionError: training's ``precision`` is bf16 and the CPU measured on has no bf16 units (on CUDA the
            measuring process checks it: asking here would create a CUDA context that takes memory from the
            measurements).
        LoraRanksError: the model or the config file is missing.
    """
    from ..checkpoints import resolve_model_path
    from ..config import check_config_matches_model, load_rank_config

    device = resolve_device(settings.device)
    if device == "cpu":
        resolve_precision(training.precision, device)
    config = load_rank_config(rank_config)
    root = resolve_model_path(model)
    check_config_matches_model(config, root)
    context = _context_length(root)
    if context is not None and settings.seq_len > context:
        raise CheckInputError(f"seq_len {settings.seq_len} is longer than the context of {model} "
                              f"(max_position_embeddings {context}): measure at a seq_len of at most {context}")
    return Target(model=str(model), rank_config=str(Path(rank_config).resolve()), device=device,
                  quantization=training.quantization, optimizer=training.optimizer, lora_dropout=training.lora_dropout,
                  trust_remote_code=trust_remote_code, precision=training.precision)


def bitsandbytes_problem(target: Target) -> str | None:
    """Why the target cannot be built here when it needs bitsandbytes (4/8-bit base, 8-bit AdamW); else None."""
    if target.quantization is None and target.optimizer != "adamw8bit":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # not installed, or no backend for this platform
        needs = f"{target.quantization} quantization" if target.quantization else "the adamw8bit optimizer"
        return f"{needs} needs bitsandbytes, which cannot load here ({type(exc).__name__}: {exc})"
    return None


def predict_sizes(target: Target) -> SizePrediction:
    """Parameter counts and bytes predicted from the rank config and the model's config (no weights read).

    Returns ``adapter_parameters`` (sum of r * (d_in + d_out)), ``adapter_bytes`` (float32 LoRA weights),
    ``parameters`` (base + adapter) and ``base_parameters``. The base's bytes (``base_bytes``) depend on the dtype
    training loads it in on the device, which the measuring process reports (``verdict.assess`` predicts them from
    it); nothing here touches the device, so that no CUDA context of this process takes memory from the measurements.
    """
    from ..checkpoints import build_meta_model, resolve_model_path
    from ..model import DynamicLoRAConfig

    meta = build_meta_model(resolve_model_path(target.model))
    modules = dict(meta.named_modules())
    config = DynamicLoRAConfig.from_file(target.rank_config)
    shapes = {name: (modules[name].in_features, modules[name].out_features) for name in config.target_modules}
    adapter = config.predicted_parameters(shapes)
    base = sum(p.numel() for p in meta.parameters())
    return SizePrediction(adapter_parameters=adapter, adapter_bytes=adapter * ADAPTER_BYTES_PER_PARAMETER,
                          parameters=base + adapter, base_parameters=base)


def _context_length(root: Path) -> int | None:
    """The text model's ``max_position_embeddings`` (None when the config does not say)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(root), trust_remote_code=False)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)
