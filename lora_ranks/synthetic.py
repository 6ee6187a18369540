"""Offline stand-ins for what a user brings: a multi-task dataset, a tokenizer and a tiny Qwen3.

There is no model hub on the machines this tool is tested on, so the demo and the tests build everything
here in seconds: templated tasks with learnable structure (so a brief fine-tune moves the weights in a
low-rank way), a byte-level BPE tokenizer trained with ``tokenizers``, and a Qwen3 built from a config.
"""

from __future__ import annotations

# torch, numpy and transformers are imported when a model or an image is built: the command line reads the demo's
# names and records from here without them (the Qwen2.5-VL classes alone take ~2 s to import).
import json
import random
import string
import warnings
from pathlib import Path
from typing import Literal

from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ._io import atomic_write_text
from .bases import KNOWN_BASES, make_base
from .outputs import note_written
from .settings import LoRATrainingSettings

__all__ = ["DEMO_MODEL", "DEMO_VL_MODEL", "build_demo_inputs", "demo_data_path", "demo_finetune_settings",
           "is_demo_model", "real_demo_base",
           "SYNTHETIC_TASKS", "synthetic_records",
           "write_synthetic_dataset", "train_tokenizer", "build_tiny_qwen3",
           "write_planted_pair", "write_synthetic_vl_dataset", "build_tiny_qwen25_vl",
           "CHAT_TEMPLATE"]

#: A minimal Qwen-style chat template; ``{% generation %}`` is not needed because masking is done by us.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: Model name that stands for "build a tiny Qwen3 offline" in flows and the CLI (no hub needed).
DEMO_MODEL = "demo:tiny-qwen3"
DEMO_VL_MODEL = "demo:tiny-qwen25-vl"  # the vision-language demo: a tiny random Qwen2.5-VL and synthetic image tasks
DEMO_VL_RECORDS_PER_TASK = 40
DEMO_LAYERS = 4  # the demo model's depth: enough layers for across-depth smoothing to show
DEMO_RECORDS_PER_TASK = 400  # 2,000 records over the five tasks
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


def _word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _example(task: str, rng: random.Random) -> tuple[str, str, str]:
    """(instruction, input, output) for one templated task."""
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return "Add the two numbers.", f"{a} + {b}", str(a + b)
    if task == "reverse":
        w = _word(rng)
        return "Reverse the word.", w, w[::-1]
    if task == "upper":
        w = " ".join(_word(rng) for _ in range(rng.randint(1, 3)))
        return "Write the text in capital letters.", w, w.upper()
    if task == "sort":
        w = _word(rng, 4, 8)
        return "Sort the letters alphabetically.", w, "".join(sorted(w))
    if task == "count":
        w = _word(rng, 3, 9)
        return "Count the letters.", w, str(len(w))
    raise ValueError(f"unknown synthetic task {task!r}; choose from {SYNTHETIC_TASKS}")


SYNTHETIC_TASKS: tuple[str, ...] = ("add", "reverse", "upper", "sort", "count")


def synthetic_records(
    n_per_task: int | dict[str, int],
    *,
    fmt: Literal["instruction", "chat", "text", "mixed"] = "instruction",
    seed: int = 0,
    tasks: tuple[str, ...] = SYNTHETIC_TASKS,
) -> list[dict]:
    """Templated multi-task records in the formats ``data.load_records`` reads.

    Args:
        n_per_task: records per task (an int for all, or a dict ``task -> count`` for unbalanced sets).
        fmt: "instruction" ({instruction, input, output, task}), "chat" ({messages, task}), "text"
            ({text, task}), or "mixed" (cycles through the three).
        seed: makes the records deterministic.
    """
    rng = random.Random(seed)
    counts = n_per_task if isinstance(n_per_task, dict) else {t: n_per_task for t in tasks}
    records = []
    formats = ("instruction", "chat", "text")
    for task, count in counts.items():
        for i in range(count):
            instruction, inp, out = _example(task, rng)
            kind = formats[i % 3] if fmt == "mixed" else fmt
            if kind == "instruction":
                records.append({"instruction": instruction, "input": inp, "output": out, "task": task})
            elif kind == "chat":
                records.append({"messages": [{"role": "user", "content": f"{instruction}\n{inp}"},
                                             {"role": "assistant", "content": out}], "task": task})
            else:
                records.append({"text": f"{instruction} {inp} => {out}", "task": task})
    rng.shuffle(records)
    return records


def write_synthetic_dataset(path: str | Path, n_per_task: int | dict[str, int] = 200, **kwargs) -> Path:
    """Write ``synthetic_records(...)`` as JSONL to ``path`` (atomically) and return the path."""
    records = synthetic_records(n_per_task, **kwargs)
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def train_tokenizer(texts: list[str], vocab_size: int = 384):
    """Train a byte-level BPE on ``texts`` offline and wrap it for transformers.

    Returns:
        ``PreTrainedTokenizerFast`` with pad/bos/eos/unk set and a Qwen-style chat template.
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_qwen3(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 176,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """Save a randomly initialized Qwen3ForCausalLM (safetensors) and a tokenizer to ``out_dir``.

    With no ``tokenizer`` given, one is trained on synthetic records. ``vocab_size`` is ``len(tokenizer)``.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if tokenizer is None:
        texts = [json.dumps(r) for r in synthetic_records(100, fmt="mixed", seed=seed)]
        tokenizer = train_tokenizer(texts)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_planted_pair(
    base_dir: str | Path,
    finetuned_dir: str | Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 176,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 256,
    planted_rank: int | tuple[int, ...] = 8,
    decay: float = 0.7,
    noise: float = 1e-3,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write a Qwen3 checkpoint pair whose deltas have *planted* spectra.

    For every target projection, fine-tuned = base + U diag(s) V^T + E, with U, V random orthonormal,
    s_i = decay^i for i < r (r cycles through ``planted_rank`` across modules), and E Gaussian with
    ||E||_F = noise * ||diag(s)||_F (a noise floor). The spectrum of the *stored* delta is what tests
    compare against (after rounding to ``dtype``).

    Args:
        dtype: "float32", "bfloat16" or "float16": storage dtype of both checkpoints.
        max_shard_size: e.g. "200KB" to write sharded checkpoints with an index file.

    Returns:
        (base_dir, finetuned_dir).
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         head_dim=hidden_size // num_heads, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(base_dir, **kwargs)
    ranks = (planted_rank,) if isinstance(planted_rank, int) else tuple(planted_rank)
    gen = torch.Generator().manual_seed(seed + 1)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    i = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not name.endswith(targets):
                continue
            d_out, d_in = module.weight.shape
            r = min(ranks[i % len(ranks)], d_out, d_in)
            i += 1
            u = torch.linalg.qr(torch.randn(d_out, r, generator=gen, dtype=torch.float64)).Q  # (d_out, r)
            v = torch.linalg.qr(torch.randn(d_in, r, generator=gen, dtype=torch.float64)).Q  # (d_in, r)
            s = decay ** torch.arange(r, dtype=torch.float64)  # (r,)
            delta = (u * s) @ v.T  # (d_out, d_in), singular values s
            floor = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
            delta += floor * (noise * torch.linalg.vector_norm(s) / torch.linalg.vector_norm(floor))
            scale = module.weight.detach().double().abs().mean()  # delta comparable to the weights
            module.weight.copy_((module.weight.double() + scale * delta).to(module.weight.dtype))
    model.save_pretrained(finetuned_dir, **kwargs)
    return Path(base_dir), Path(finetuned_dir)


VISION_SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def write_synthetic_vl_dataset(folder: str | Path, n_per_task: int = 20, *, seed: int = 0, size: int = 56) -> Path:
    """Small generated images and vision chat records (JSONL) for two tasks.

    "color": a plain image, answer its colour name; "side": a white square on the left or right half of a
    black image, answer "left" or "right". Writes ``<folder>/images/*.png`` and ``<folder>/vl.jsonl``.
    """
    import numpy as np

    rng = random.Random(seed)
    out = Path(folder)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_per_task):
        name, rgb = rng.choice(sorted(_COLORS.items()))
        pixels = np.zeros((size, size, 3), dtype=np.uint8) + np.array(rgb, dtype=np.uint8)
        Image.fromarray(pixels).save(out / "images" / f"color-{i}.png")
        records.append({"images": [f"images/color-{i}.png"], "task": "color", "messages": [
            {"role": "user", "content": "What colour is this image?"}, {"role": "assistant", "content": name}]})
        side = rng.choice(["left", "right"])
        pixels = np.zeros((size, size, 3), dtype=np.uint8)
        x0 = 4 if side == "left" else size // 2 + 4
        pixels[size // 4: 3 * size // 4, x0: x0 + size // 2 - 8] = 255
        Image.fromarray(pixels).save(out / "images" / f"side-{i}.png")
        records.append({"images": [f"images/side-{i}.png"], "task": "side", "messages": [
            {"role": "user", "content": "Is the square on the left or the right?"},
            {"role": "assistant", "content": side}]})
    rng.shuffle(records)
    return atomic_write_text(out / "vl.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def build_tiny_qwen25_vl(out_dir: str | Path, *, hidden_size: int = 64, num_layers: int = 2, vision_depth: int = 2,
                         seed: int = 0) -> Path:
    """Save a randomly initialised Qwen2.5-VL (safetensors), a tokenizer with the vision tokens, and a
    Qwen2-VL image processor (56x56 images -> 4 placeholder tokens) to ``out_dir``.

    The text config's ``mrope_section`` sums to head_dim / 2 and the vision tower's ``out_hidden_size``
    equals the text hidden size, as Qwen2.5-VL requires.
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    texts = [json.dumps(r) for r in synthetic_records(50, fmt="mixed", seed=seed)] + list(_COLORS) + ["left", "right"]
    tokenizer = train_tokenizer(texts)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_SPECIAL_TOKENS})
    heads = 4
    head_dim = hidden_size // heads
    section = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]  # sums to head_dim / 2
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id,
                         rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0}),
        vision_config=dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=hidden_size, fullatt_block_indexes=[vision_depth - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                          temporal_patch_size=2).save_pretrained(out)
    return out


#: The demo's base: a 4-layer Qwen3 (hidden 64) pretrained on the Python standard library's source, committed with
#: the package (1.3 MB); rebuilt reproducibly by ``python -m lora_ranks.pretrain --preset demo --out <this folder>``.
DEMO_BASE = Path(__file__).resolve().parent / "assets" / "demo-base"


def real_demo_base(model: str) -> str | None:
    """The known real base (``bases.KNOWN_BASES``) a demo model name ``demo:<base>`` asks for, else None."""
    name = model.removeprefix("demo:") if model.startswith("demo:") else None
    return name if name in KNOWN_BASES else None


def is_demo_model(model: str) -> bool:
    """A model name the demo builds (or fetches) itself: the tiny Qwen3, the tiny Qwen2.5-VL, ``demo:<real base>``."""
    return model in (DEMO_MODEL, DEMO_VL_MODEL) or real_demo_base(model) is not None


def build_demo_inputs(out_dir: str | Path, data_path: str | Path | None = None, model: str = DEMO_MODEL
                      ) -> tuple[Path, Path]:
    """The offline demo's inputs: the pretrained demo base (``DEMO_BASE``; a randomly initialised tiny Qwen3 under
    ``out_dir`` if the package was installed without it) and, unless ``data_path`` is given, a synthetic multi-task
    JSONL under ``out_dir``. With ``model`` = ``DEMO_VL_MODEL``: a tiny randomly initialised Qwen2.5-VL (with its
    image processor) and synthetic image records; with ``demo:<base>`` (e.g. ``demo:smollm2-135m``): that real
    base, made once and cached (``bases.make_base``), and the same synthetic records. Returns (model folder,
    dataset path)."""
    real = real_demo_base(model)
    if real is not None:
        model_dir = make_base(real).path
        if data_path is None:
            data_path = write_synthetic_dataset(demo_data_path(out_dir, model), DEMO_RECORDS_PER_TASK, fmt="mixed")
        return model_dir, Path(data_path)

    if model == DEMO_VL_MODEL:
        model_dir = build_tiny_qwen25_vl(Path(out_dir) / "tiny-qwen25-vl")
        note_written(model_dir)
        if data_path is None:
            data_path = write_synthetic_vl_dataset(demo_data_path(out_dir, model).parent, DEMO_VL_RECORDS_PER_TASK)
        return model_dir, Path(data_path)
    if (DEMO_BASE / "model.safetensors").is_file():
        model_dir = DEMO_BASE
    else:
        warnings.warn(f"the pretrained demo base {DEMO_BASE} is missing: using a randomly initialised model", stacklevel=2)
        model_dir = build_tiny_qwen3(Path(out_dir) / "tiny-qwen3", num_layers=DEMO_LAYERS)
        note_written(model_dir)
    if data_path is None:
        data_path = write_synthetic_dataset(demo_data_path(out_dir, model), DEMO_RECORDS_PER_TASK, fmt="mixed")
    return model_dir, Path(data_path)


def demo_data_path(out_dir: str | Path, model: str = DEMO_MODEL) -> Path:
    """Where ``build_demo_inputs(out_dir, model=model)`` writes the demo's records."""
    return Path(out_dir) / ("vl-data/vl.jsonl" if model == DEMO_VL_MODEL else "synthetic.jsonl")


def demo_training_settings(model: str, precision: str = "auto"):
    """The demo's short dynamic-LoRA run after its analysis (LoRATrainingSettings): 8 steps of 4 records of at most
    96 tokens on a real base (``demo:<base>``), 20 steps of 8 on the vision-language demo's image records."""
    if model == DEMO_VL_MODEL:
        return LoRATrainingSettings(max_steps=20, batch_size=8, learning_rate=1e-3, precision=precision)
    return LoRATrainingSettings(max_steps=8, batch_size=4, max_length=96, learning_rate=1e-3,
                                gradient_checkpointing=False, precision=precision)


def demo_finetune_settings(settings, model: str = DEMO_MODEL):
    """``settings`` (FinetuneSettings) adapted to the demo's small synthetic set: at least a fifth of the records,
    a learning rate of at least 1e-3 and at most 40 steps, so that the fine-tune moves the weights in seconds. On a
    real base (``demo:<base>``, ~135M parameters, ~5 s a step on 2 cores) the fine-tune is the brief one the tool
    prescribes, cut to fit minutes: 100 records (5%), at most 12 steps of 4 records of at most 96 tokens, the
    learning rate as given, no gradient checkpointing (the model fits)."""
    if real_demo_base(model) is not None:
        return settings.replace(subset_ratio=max(settings.subset_ratio, 0.05), max_steps=min(settings.max_steps, 12),
                                batch_size=min(settings.batch_size, 4), max_length=min(settings.max_length, 96),
                                gradient_checkpointing=False)
    return settings.replace(**{"subset_ratio": max(settings.subset_ratio, 0.2),
                               "learning_rate": max(settings.learning_rate, 1e-3),
                               "max_steps": min(settings.max_steps, 40)})
