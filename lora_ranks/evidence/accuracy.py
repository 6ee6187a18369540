"""A task metric beside loss: exact-match accuracy of greedy-decoded responses on records with a checkable answer.

A record is checkable when its response is a short answer to compare: an instruction record's ``output``, or a
conversation's last assistant message. Plain text records are not. The prompt is tokenized exactly as training
tokenizes it (``data._prompt_and_response``: the pieces before the response), the response decoded greedily up to
EOS or ``max_new_tokens``, special tokens dropped, and compared after normalization: surrounding whitespace
stripped, inner runs of whitespace collapsed to one space, case folded.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import _prompt_and_response, load_records, record_kind

__all__ = ["ExactMatch", "checkable_records", "normalize_answer", "exact_match", "exact_match_by_task"]


@dataclass
class ExactMatch:
    """Exact-match accuracy over ``n`` records: ``correct`` of them, the share and its binomial standard error."""

    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def standard_error(self) -> float:
        p = self.accuracy
        return math.sqrt(p * (1 - p) / self.n) if self.n else float("nan")


def normalize_answer(text: str) -> str:
    """Whitespace collapsed and stripped, case folded."""
    return " ".join(text.split()).casefold()


def _answer(record: dict) -> str | None:
    kind = record_kind(record)
    if kind == "instruction":
        return record["output"]
    if kind == "chat" and record["messages"][-1]["role"] == "assistant":
        return record["messages"][-1]["content"]
    return None


def checkable_records(data_path: str | Path, limit: int, seed: int = 0, tasks: Sequence[str] = (),
                      task_key: str = "task") -> list[dict]:
    """A seeded sample of at most ``limit`` checkable records of ``data_path`` (see the module docstring); with
    ``tasks``, only records whose ``task_key`` is one of them (a task scored by loss only, such as a definition, is
    left out)."""
    records = [r for r in load_records(data_path) if "images" not in r and _answer(r) is not None
               and (not tasks or str(r.get(task_key, "default")) in tasks)]
    random.Random(seed).shuffle(records)
    return records[:limit]


def exact_match_by_task(model: torch.nn.Module, tokenizer, records: Sequence[dict], max_new_tokens: int,
                        task_key: str = "task") -> dict[str, ExactMatch]:
    """``exact_match`` of the records of each task (``task_key``; "default" without it): task -> ExactMatch."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(str(record.get(task_key, "default")), []).append(record)
    return {task: exact_match(model, tokenizer, group, max_new_tokens) for task, group in sorted(groups.items())}


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer, records: Sequence[dict], max_new_tokens: int) -> ExactMatch:
    """Greedy-decode each record's response with ``model`` (one record at a time: no padding) and count exact
    matches with its answer after ``normalize_answer``."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for record in records:
        pieces = _prompt_and_response(record, tokenizer)
        last = max(i for i, (_, train) in enumerate(pieces) if train)
        prompt = "".join(text for text, _ in pieces[:last])
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        correct += normalize_answer(text) == normalize_answer(_answer(record))
    return ExactMatch(correct, len(records))
