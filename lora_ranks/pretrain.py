"""Small base models pretrained here, offline, on real text: the source of the Python standard library.

There is no model hub on the machines this tool is built and tested on, yet a rank analysis means little on a
randomly initialised base (its "fine-tune" is training from scratch). So the demo and the allocation experiment
start from a model pretrained here on the one sizeable body of real text every Python installation ships: the
standard library's source (about 12 MB of code, comments and docstrings; test suites left out), split into a
training and a held-out part by file. ``pretrain_base`` trains a byte-level BPE tokenizer and a Qwen3 on it with
the project's own training loop and writes the model folder with ``pretraining.json`` (loss curve, held-out loss).

    python -m lora_ranks.pretrain --preset demo --out lora_ranks/assets/demo-base   # the committed demo base
    python -m lora_ranks.pretrain --preset experiment --out outputs/experiment/base
"""

from __future__ import annotations

# transformers' model classes are imported when a model is built: the records and tokenizer helpers do without them.
import argparse
import ast
import hashlib
import json
import random
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ._io import atomic_folder, atomic_write_json
from .data import tokenize_record
from .evidence.fidelity import held_out_loss
from .finetune import train_loop
from .settings import TrainingSettings
from .synthetic import synthetic_records, train_tokenizer

__all__ = ["BasePreset", "PRESETS", "stdlib_documents", "corpus_records", "pretrain_base", "license_paragraphs",
           "shifted_task_mix"]

_SKIP_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class BasePreset:
    """Shape and training budget of a pretrained base (Qwen3 architecture)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int  # BPE vocabulary trained on the corpus
    steps: int
    batch_size: int
    seq_len: int  # tokens per training sequence
    learning_rate: float


PRESETS = {
    # The demo's base: the shape of the demo model (4 layers, hidden 64), a few minutes of training.
    "demo": BasePreset(hidden_size=64, intermediate_size=176, num_layers=4, num_heads=4, num_kv_heads=2,
                       vocab_size=1024, steps=1500, batch_size=16, seq_len=128, learning_rate=3e-3),
    # The allocation experiment's base: 6 layers, hidden 256, ~20 minutes on 2 CPU cores.
    "experiment": BasePreset(hidden_size=256, intermediate_size=704, num_layers=6, num_heads=4, num_kv_heads=2,
                             vocab_size=4096, steps=1200, batch_size=16, seq_len=128, learning_rate=1.5e-3),
}


def stdlib_documents() -> list[tuple[str, str]]:
    """(relative path, text) of every standard-library source file, test suites left out, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        if _SKIP_PARTS & set(path.relative_to(root).parts):
            continue
        out.append((str(path.relative_to(root)), path.read_text(encoding="utf-8", errors="replace")))
    return out


def _held_out(name: str, fraction: float) -> bool:
    """A stable split by file: the same files are held out on every machine with the same standard library."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def corpus_records(documents: list[tuple[str, str]], chunk_chars: int = 1200, held_out: float = 0.05,
                   seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Text records ``{"text", "task": "stdlib"}`` of about ``chunk_chars`` characters, cut at line ends:
    (training records, held-out records), the split by file; the training records shuffled (seeded)."""
    train, evaluation = [], []
    for name, text in documents:
        lines, chunk = text.splitlines(keepends=True), ""
        for line in lines:
            chunk += line
            if len(chunk) >= chunk_chars:
                (evaluation if _held_out(name, held_out) else train).append({"text": chunk, "task": "stdlib"})
                chunk = ""
        if chunk.strip():
            (evaluation if _held_out(name, held_out) else train).append({"text": chunk, "task": "stdlib"})
    random.Random(seed).shuffle(train)
    return train, evaluation


def pretrain_base(out_dir: str | Path, preset: BasePreset, *, seed: int = 0, progress: bool = True) -> Path:
    """Train a tokenizer and a Qwen3 of shape ``preset`` on the standard library; write the model folder.

    Writes ``config.json``, ``model.safetensors``, the tokenizer and ``pretraining.json`` (losses, held-out loss,
    corpus size, seconds) into ``out_dir``, replaced whole only once complete. Deterministic for a seed on a
    given machine and standard library.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM


    start = time.perf_counter()
    torch.manual_seed(seed)
    documents = stdlib_documents()
    train, evaluation = corpus_records(documents, chunk_chars=preset.seq_len * 5, seed=seed)
    tokenizer = train_tokenizer([r["text"] for r in train[:4000]], vocab_size=preset.vocab_size)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=preset.hidden_size, intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads, head_dim=preset.hidden_size // preset.num_heads,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config)
    needed = preset.steps * preset.batch_size
    examples = [tokenize_record(r, tokenizer, preset.seq_len) for r in train[:needed]]
    settings = TrainingSettings(max_steps=preset.steps, epochs=10**6, batch_size=preset.batch_size,
                                learning_rate=preset.learning_rate, warmup_ratio=0.05, schedule="cosine",
                                max_length=preset.seq_len, gradient_checkpointing=False, seed=seed)
    model.train()
    losses, _ = train_loop(model, examples, tokenizer.pad_token_id, settings, torch.device("cpu"), progress=progress,
                           desc="pretraining")
    evaluation_examples = [tokenize_record(r, tokenizer, preset.seq_len) for r in evaluation[:300]]
    evaluation_loss = held_out_loss(model, evaluation_examples, tokenizer.pad_token_id)
    metrics = {"preset": asdict(preset), "seed": seed, "documents": len(documents), "train_records": len(train),
               "records_trained": len(examples), "held_out_records": len(evaluation_examples),
               "tokens_seen": preset.steps * preset.batch_size * preset.seq_len, "losses": losses,
               "held_out_loss": evaluation_loss, "seconds": time.perf_counter() - start,
               "parameters": sum(p.numel() for p in model.parameters())}
    with atomic_folder(out_dir, content="model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "pretraining.json", metrics)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = pretrain_base(args.out, PRESETS[args.preset], seed=args.seed)
    metrics = json.loads((path / "pretraining.json").read_text())
    print(f"{path}: {metrics['parameters']:,} parameters, loss {metrics['losses'][0]:.3f} -> {metrics['losses'][-1]:.3f}, "
          f"held-out {metrics['held_out_loss']:.3f}, {metrics['seconds']:.0f} s")


if __name__ == "__main__":
    main()


def license_paragraphs(folder: str | Path = "/usr/share/common-licenses", *, min_chars: int = 80,
                       max_chars: int = 700, near: float = 0.5) -> list[str]:
    """The prose paragraphs of the licence texts in ``folder``, each once: regular files only, in name order (a
    symlink, such as Debian's GPL -> GPL-3, is the file it points at and is skipped), whitespace collapsed,
    ``min_chars``..``max_chars`` long, and a paragraph of which at least a share ``near`` of its word 8-grams
    occur in the paragraphs kept before it (the same clause in GPL-2 and GPL-3) left out. Empty when the folder is missing."""
    root = Path(folder)
    if not root.is_dir():
        return []
    kept: list[str] = []
    seen: set[tuple[str, ...]] = set()  # the word 8-grams of the kept paragraphs

    def shingles(text: str) -> set[tuple[str, ...]]:
        words = text.lower().split()
        return {tuple(words[i: i + 8]) for i in range(max(1, len(words) - 7))}

    for path in sorted(root.iterdir()):
        if path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for raw in text.split("\n\n"):
            paragraph = " ".join(raw.split())
            if not min_chars <= len(paragraph) <= max_chars:
                continue
            own = shingles(paragraph)
            if len(own & seen) >= near * len(own):
                continue
            seen |= own
            kept.append(paragraph)
    return kept


def shifted_task_mix(n_per_task: int, seed: int = 0, *, licenses: str | Path = "/usr/share/common-licenses",
                     test_root: str | Path | None = None) -> list[dict]:
    """A fine-tuning mix that shifts away from what the stdlib-pretrained base saw, from real offline text:

    * ``prose``: English license and documentation text (``licenses``, by default Debian's common licences;
      ``license_paragraphs``: each paragraph once, near-copies across licence versions left out), as plain text
      records: a change of register from code to prose;
    * ``testname``: name a standard-library *test* function from the first line of its docstring (the test
      suites, ``test_root``, by default the standard library's ``test`` folder, are left out of the pretraining
      corpus): instruction records, a mapping from prose to identifiers;
    * ``algorithmic``: sort, count or reverse a word (templated), instruction records: a skill the base never
      practised.

    ``n_per_task`` records of each (fewer when a source is smaller), shuffled with ``seed``. Every record occurs
    once (a docstring line naming the same function in two files, or a templated question drawn twice, is kept
    once), so any split of the records shares none between its parts.
    """


    rng = random.Random(seed)
    prose = [{"text": p, "task": "prose"} for p in license_paragraphs(licenses)]
    rng.shuffle(prose)
    names = []
    root = Path(test_root) if test_root is not None else Path(sysconfig.get_paths()["stdlib"]) / "test"
    for path in sorted(root.rglob("*.py")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("__"):
                doc = (ast.get_docstring(node) or "").strip()
                first = doc.splitlines()[0] if doc else ""
                if 20 < len(first) < 120:
                    names.append({"instruction": "Name the test function this docstring belongs to.", "input": first,
                                  "output": node.name, "task": "testname"})
    names = _unique(names)
    rng.shuffle(names)
    algorithmic = _unique(synthetic_records(n_per_task // 3 + 1, fmt="instruction", seed=seed,
                                            tasks=("sort", "count", "reverse")))
    for r in algorithmic:
        r["task"] = "algorithmic"
    records = prose[:n_per_task] + names[:n_per_task] + algorithmic[:n_per_task]
    rng.shuffle(records)
    return records


def _unique(records: list[dict]) -> list[dict]:
    """The records, each content once (the first kept), in order."""
    seen, out = set(), []
    for record in records:
        key = json.dumps({k: v for k, v in record.items() if k != "task"}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out
