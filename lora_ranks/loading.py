"""Loading a model and its tokenizer: the one loader every stage uses.

Local folders and hub ids (resolved to a local snapshot), safetensors only, no remote code unless asked,
Qwen2.5-VL as ``Qwen2_5_VLForConditionalGeneration`` (other models as ``AutoModelForCausalLM``), optionally
4/8-bit quantized with bitsandbytes. The tokenizer always has a pad token (the EOS token when the model
defines none), since batches are padded.
"""

from __future__ import annotations

# transformers is imported when a model or processor is loaded: model-type detection reads config.json without it.
import json
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoints import resolve_model_path
from .construction import MODEL_CONSTRUCTION

__all__ = ["Quantization", "load_model", "load_image_processor", "detect_model_type"]

Quantization = Literal["4bit", "8bit"]


def detect_model_type(model_dir: str | Path) -> Literal["qwen3", "qwen2_5_vl", "causal_lm"]:
    """Model family from ``config.json``: Qwen3, Qwen2.5-VL, or any other causal LM."""
    config = Path(model_dir) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type", "") if config.is_file() else ""
    return model_type if model_type in ("qwen3", "qwen2_5_vl") else "causal_lm"


def load_model(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    quantization: Quantization | None = None,
    trust_remote_code: bool = False,
    device_map: Any = None,
    **load_kwargs: Any,
):
    """(model, tokenizer) from a local folder or hub id.

    Args:
        dtype: weights dtype; None keeps transformers' default. With ``quantization`` it is the compute dtype
            (None: bf16 on CUDA, float32 on the CPU).
        quantization: None, "4bit" (nf4, double quantization) or "8bit" (LLM.int8), with bitsandbytes; the model is
            placed on ``device_map`` (default: GPU 0 when CUDA is available, else the CPU).
        trust_remote_code: run Python code shipped with the model (off: only architectures transformers knows
            load, so a downloaded folder cannot execute anything).
        device_map: passed to ``from_pretrained``.
        load_kwargs: further ``from_pretrained`` arguments.
    """
    import transformers

    root = resolve_model_path(name_or_path)
    kwargs: dict[str, Any] = dict(use_safetensors=True, trust_remote_code=trust_remote_code, **load_kwargs)
    if quantization is not None:
        cuda = torch.cuda.is_available()
        compute = dtype or (torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32)
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit",
            bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
        kwargs["dtype"] = compute
        kwargs["device_map"] = device_map or ({"": 0} if cuda else {"": "cpu"})
    else:
        kwargs["dtype"] = dtype
        if device_map is not None:
            kwargs["device_map"] = device_map
    cls = (transformers.Qwen2_5_VLForConditionalGeneration if detect_model_type(root) == "qwen2_5_vl"
           else transformers.AutoModelForCausalLM)
    with MODEL_CONSTRUCTION:  # from_pretrained unties weights process-wide while it runs (see construction.py)
        model = cls.from_pretrained(str(root), **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_image_processor(name_or_path: str | Path):
    """The image processor saved with a vision-language model (``preprocessor_config.json``), or None."""
    root = resolve_model_path(name_or_path)
    if not (root / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(root))
