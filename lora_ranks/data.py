"""Training data for the preliminary fine-tune: loading, stratified subsets, tokenization with masking.

Record shapes (JSON list or JSONL, one object per line):

* chat: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}], "task": ...}``
  rendered with the tokenizer's chat template when it has one, else with the fallback
  ``"<role>: <content>\\n"`` per message;
* instruction: ``{"instruction": ..., "input": ..., "output": ..., "task": ...}`` (``input`` optional),
  rendered as ``"{instruction}\\n{input}\\n"`` + ``output``;
* plain text: ``{"text": ..., "task": ...}``;
* vision-language chat: ``{"images": ["a.png", ...], "messages": [...], "task": ...}`` (paths relative to the
  dataset file), for Qwen2.5-VL: the images go through the model's image processor (``pixel_values``,
  ``image_grid_thw``) and the first user turn gets one ``<|vision_start|><|image_pad|><|vision_end|>`` per
  image, each ``<|image_pad|>`` expanded to the image's ``t * h * w / merge_size**2`` placeholder tokens.

Loss is on the response only (assistant turns, ``output``); prompt tokens get label -100. Plain text is
trained on every token. Records without the task key fall into one stratum named ``"default"``.
"""

from __future__ import annotations

# torch is imported by collate alone: the command line checks records with this module before torch is imported.
import copy
import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import LoraRanksError

__all__ = ["DataError", "load_records", "check_vision_records", "record_kind", "stratified_subset", "subset_size",
           "SubsetReport",
           "tokenize_record", "collate", "TASK_KEY"]

TASK_KEY = "task"
"""The record field naming its task: the strata of the stratified subset, the tasks accuracy is scored by."""

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips


class DataError(LoraRanksError):
    """A dataset file or record is unusable (the message names the file and line)."""


def record_kind(record: dict, where: str = "record") -> str:
    """Return "chat", "instruction" or "text" for a record, or raise DataError naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "images" in record and (not isinstance(record["images"], list) or not record["images"]
                               or not all(isinstance(i, str) for i in record["images"])):
        raise DataError(f"{where}: 'images' must be a non-empty list of image paths")
    if "images" in record and "messages" not in record:
        raise DataError(f"{where}: a record with 'images' needs 'messages'")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: chat record has no assistant message to learn from")
        return "chat"
    if "instruction" in record or "output" in record:
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: instruction record needs a string {key!r}")
        return "instruction"
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return "text"
    raise DataError(f"{where}: record has none of 'messages', 'instruction'/'output', 'text' (keys: {sorted(record)})")


def load_records(path: str | Path) -> list[dict]:
    """Load and check every record of a ``.json`` (list of objects) or ``.jsonl`` file.

    A command reads its records file several times (the preflight, the brief fine-tune, the calibration subset, the
    split halves): the file is parsed and checked once per content, keyed by its path, size, modification time and
    inode, and each call gets its own copy of the records."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError:
        info = None
    if info is not None and path.is_file():
        key = (str(path.resolve()), info.st_size, info.st_mtime_ns, info.st_ino)
        if key not in _LOADED:
            _LOADED[key] = _load_records(path)
            while len(_LOADED) > _LOADED_FILES:
                _LOADED.pop(next(iter(_LOADED)))  # the oldest
        return copy.deepcopy(_LOADED[key])
    return _load_records(path)


_LOADED: dict[tuple, list[dict]] = {}
_LOADED_FILES = 4  # records files kept parsed (a command reads at most three: data, validation, held-out)


def _load_records(path: Path) -> list[dict]:
    if path.is_dir():
        raise DataError(f"dataset file {path} is a folder; give a .json or .jsonl file of records")
    if path.exists() and not path.is_file():  # a FIFO, a device (/dev/null), a socket: no records to read twice
        raise DataError(f"dataset file {path} is not a regular file (a pipe, device or socket); give a .json or .jsonl "
                        "file of records")
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist"
                        + (" (a symbolic link to a missing file, or a loop of links)" if path.is_symlink() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"dataset file {path} is not UTF-8 text (byte {exc.start}): is it a JSON/JSONL file?") from None
    if not text.strip():
        raise DataError(f"dataset file {path} is empty")
    records: list[tuple[str, dict]] = []
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json dataset must be a list of records, got {type(data).__name__}")
        records = [(f"{path} record {i}", r) for i, r in enumerate(data)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from exc
    if not records:
        raise DataError(f"dataset file {path} holds no records")
    for where, record in records:
        record_kind(record, where)
        for name in record.get("images", ()):
            _check_image(path.parent / name, where)
    return [r for _, r in records]


def _check_image(path: Path, where: str) -> None:
    """The image exists and is one PIL can read (its header only: cheap), or a DataError naming file:line."""
    if not path.is_file():
        raise DataError(f"{where}: image {path} does not exist")
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # PIL raises several types for unreadable or foreign files
        raise DataError(f"{where}: {path} is not a readable image ({type(exc).__name__}: {exc})") from None


@dataclass
class SubsetReport:
    """Per-task counts before and after sampling (written to training_metrics.json)."""

    counts_before: dict[str, int]
    counts_after: dict[str, int]
    subset_ratio: float
    max_samples: int
    seed: int


def stratified_subset(
    records: Sequence[dict],
    subset_ratio: float,
    max_samples: int,
    *,
    seed: int = 0,
    task_key: str = TASK_KEY,
) -> tuple[list[dict], SubsetReport]:
    """Sample a subset that keeps every task, in proportion to task size (``FinetuneSettings`` has the defaults).

    The target size is ``min(max_samples, round(ratio * N))``, at least one per task. Each task gets its
    proportional share's floor; the remaining slots go to the largest remainders (ties by task name);
    tasks still at zero then get one sample. Deterministic for a seed.
    """
    if not (0.0 < subset_ratio <= 1.0):
        raise ValueError(f"subset_ratio must be in (0, 1], got subset_ratio={subset_ratio}")
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got max_samples={max_samples}")
    if not records:
        raise DataError("cannot sample from an empty dataset")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(str(r.get(task_key, "default")), []).append(i)
    n = len(records)
    target = subset_size(n, subset_ratio, max_samples, len(groups))
    shares = {t: target * len(idx) / n for t, idx in groups.items()}
    alloc = {t: math.floor(s) for t, s in shares.items()}
    leftover = target - sum(alloc.values())
    for t in sorted(groups, key=lambda t: (-(shares[t] - alloc[t]), t))[:leftover]:
        alloc[t] += 1
    for t in groups:  # every task represented, even when its share rounds to zero
        if alloc[t] == 0:
            alloc[t] = 1
    rng = random.Random(seed)
    chosen: list[int] = []
    for t in sorted(groups):
        chosen.extend(rng.sample(groups[t], min(alloc[t], len(groups[t]))))
    chosen.sort()
    subset = [records[i] for i in chosen]
    report = SubsetReport({t: len(i) for t, i in sorted(groups.items())},
                          dict(sorted(Counter(str(r.get(task_key, "default")) for r in subset).items())),
                          subset_ratio, max_samples, seed)
    return subset, report


def subset_size(n_records: int, subset_ratio: float, max_samples: int, n_tasks: int = 1) -> int:
    """Records ``stratified_subset`` draws from ``n_records``: ``min(max_samples, round(ratio * n))``, at least one
    per task, at most ``n_records``."""
    return min(max(min(max_samples, round(subset_ratio * n_records)), n_tasks), n_records)


def _prompt_and_response(record: dict, tokenizer) -> list[tuple[str, bool]]:
    """Split a record into text pieces, each flagged True when it is trained on (the response)."""
    kind = record_kind(record)
    if kind == "text":
        return [(record["text"], True)]
    if kind == "instruction":
        prompt = record["instruction"] + ("\n" + record["input"] if record.get("input") else "") + "\n"
        return [(prompt, False), (record["output"], True)]
    pieces: list[tuple[str, bool]] = []
    if getattr(tokenizer, "chat_template", None):
        # Render the conversation up to each assistant turn; the difference is that turn's text.
        rendered = ""
        for i, message in enumerate(record["messages"]):
            upto = tokenizer.apply_chat_template(record["messages"][: i + 1], tokenize=False)
            if message["role"] == "assistant":
                head = tokenizer.apply_chat_template(record["messages"][:i], tokenize=False, add_generation_prompt=True)
                pieces.append((head[len(rendered):], False))
                pieces.append((upto[len(head):], True))
            else:
                pieces.append((upto[len(rendered):], False))
            rendered = upto
        return [(t, train) for t, train in pieces if t]
    for message in record["messages"]:  # documented fallback: "<role>: <content>\n"
        pieces.append((f"{message['role']}: ", False))
        pieces.append((message["content"] + "\n", message["role"] == "assistant"))
    return pieces


VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def tokenize_record(record: dict, tokenizer, max_length: int, *, image_processor=None,
                    base_dir: str | Path | None = None) -> dict:
    """Token ids and labels for one record; labels are -100 on prompt tokens. An EOS ends the response.

    Returns:
        {"input_ids": list[int], "labels": list[int]} of equal length <= max_length; vision records also
        carry "pixel_values" (Tensor (patches, C*T*P*P)) and "image_grid_thw" (LongTensor (n_images, 3)).
    """
    if "images" in record:
        return _tokenize_vision_record(record, tokenizer, max_length, image_processor, base_dir)
    ids, labels = _tokenize(record, tokenizer)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def _tokenize(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, train in _prompt_and_response(record, tokenizer):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if train else [IGNORE_INDEX] * len(piece))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def check_vision_records(records: list[dict], image_processor, where: str = "a record") -> None:
    """Image records need a model with an image processor (``preprocessor_config.json``); DataError otherwise."""
    if image_processor is None and any("images" in r for r in records):
        raise DataError(f"{where} has 'images' but the model has no image processor (preprocessor_config.json): "
                        "vision-language records need a vision-language model such as Qwen2.5-VL")


def _tokenize_vision_record(record, tokenizer, max_length, image_processor, base_dir) -> dict:
    check_vision_records([record], image_processor)

    root = Path(base_dir) if base_dir is not None else Path(".")
    images = []
    for name in record["images"]:
        path = root / name
        if not path.is_file():
            raise DataError(f"image {path} (from a record's 'images') does not exist")
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    vision = image_processor(images=images, return_tensors="pt")
    grid = vision["image_grid_thw"]  # (n_images, 3): t, h, w in patches
    per_image = (grid.prod(-1) // image_processor.merge_size**2).tolist()  # placeholder tokens per image
    messages = [dict(m) for m in record["messages"]]
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[first_user]["content"] = VISION_PLACEHOLDER * len(images) + messages[first_user]["content"]
    ids, labels = _tokenize({k: v for k, v in record.items() if k != "images"} | {"messages": messages}, tokenizer)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    expanded_ids, expanded_labels, counts = [], [], iter(per_image)
    for token, label in zip(ids, labels):
        n = next(counts) if token == pad else 1
        expanded_ids.extend([token] * n)
        expanded_labels.extend([IGNORE_INDEX] * n if token == pad else [label])
    if len(expanded_ids) > max_length:
        if expanded_ids[max_length:].count(pad):
            raise DataError(f"a vision record needs {len(expanded_ids)} tokens with its images, more than "
                            f"max_length={max_length}; raise max_length or use smaller images")
        expanded_ids, expanded_labels = expanded_ids[:max_length], expanded_labels[:max_length]
    return {"input_ids": expanded_ids, "labels": expanded_labels, "pixel_values": vision["pixel_values"],
            "image_grid_thw": grid}


def collate(batch: Sequence[dict], pad_token_id: int):
    """Right-pad a batch: input_ids/labels/attention_mask LongTensors of shape (batch, max_len); vision
    records' pixel_values and image_grid_thw are concatenated in batch order (Qwen2.5-VL's layout)."""
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    vision = [b for b in batch if "pixel_values" in b]
    if vision:
        out["pixel_values"] = torch.cat([b["pixel_values"] for b in vision])
        out["image_grid_thw"] = torch.cat([b["image_grid_thw"] for b in vision])
    return out
