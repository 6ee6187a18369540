"""Real data that no one here wrote: tasks built from WordNet 3.0's noun database, split so that nothing held out
was trained on.

WordNet (Princeton University; a permissive licence) ships on Debian as ``wordnet-base`` (``apt-get install -y
wordnet-base``), with its database under ``/usr/share/wordnet``. Two of its files are read (``wndb(5WN)``):

* ``index.noun``: one line per lemma, ``lemma pos synset_cnt p_cnt [ptr...] sense_cnt tagsense_cnt offset...``;
  a lemma with ``synset_cnt == 1`` has exactly one sense;
* ``data.noun``: one line per synset, ``offset lex_filenum ss_type w_cnt word lex_id ... p_cnt [ptr...] | gloss``,
  ``w_cnt`` in hexadecimal; ``lex_filenum`` names its lexicographer file (``lexnames(5WN)``: 3 = noun.Tops ...
  28 = noun.time); the gloss is a definition, then examples in quotes after ``; "``.

Lines that begin with two spaces are the licence header. The nouns used are the single-sense lemmas that are one
word of letters (hyphens inside allowed): about 43,000, in 34,000 synsets. Three tasks, instruction records in the
project's format (``lora_ranks.data``) with ``task``, ``lemma`` and ``synset`` keys:

* ``category``: the lexicographer category of the noun (``animal``, ``person``, ...; categories with fewer than
  ``min_category`` nouns are left out): a one-word answer, scored by exact match;
* ``definition``: the definition of the noun (its gloss up to the examples): scored by loss only;
* ``word``: the noun for a definition, for synsets whose only word is the noun (one right answer): exact match.

The split is by **synset**: synsets with the same definition text are one group, every group goes whole to one of
train, validation and eval, and since every lemma has one sense, a lemma's records all go where its synset goes.
So no held-out lemma, synset, definition or record occurs in training (``overlap`` checks it; the tests assert
it). Validation is carved in the same way before anything else is drawn from the training groups.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._io import atomic_write_json, atomic_write_text
from .errors import LoraRanksError

__all__ = ["WORDNET_DIR", "LEXNAMES", "TASKS", "WordNetError", "Noun", "read_nouns", "task_records", "split_groups",
           "build_splits", "overlap", "category_baselines", "SplitReport"]

WORDNET_DIR = Path("/usr/share/wordnet")
"""Where Debian's ``wordnet-base`` installs the database."""

LEXNAMES = {3: "Tops", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition",
            10: "communication", 11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location", 16: "motive",
            17: "object", 18: "person", 19: "phenomenon", 20: "plant", 21: "possession", 22: "process",
            23: "quantity", 24: "relation", 25: "shape", 26: "state", 27: "substance", 28: "time"}
"""Noun lexicographer files by number (``lexnames(5WN)``), without the ``noun.`` prefix."""

TASKS = ("category", "definition", "word")
"""The tasks, in the order records are built."""

_WORD = re.compile(r"[a-z][a-z-]*[a-z]")


class WordNetError(LoraRanksError):
    """WordNet's database is missing or unreadable (the message names the package to install)."""


@dataclass(frozen=True)
class Noun:
    """One single-sense noun: its lemma (lower case, as indexed), the word as the synset writes it (case kept),
    its synset's offset, category, definition and the number of words in the synset."""

    lemma: str
    word: str
    synset: str
    category: str
    definition: str
    synset_words: int


def _require(wordnet_dir: Path) -> tuple[Path, Path]:
    index, data = wordnet_dir / "index.noun", wordnet_dir / "data.noun"
    missing = [p for p in (index, data) if not p.is_file()]
    if missing:
        raise WordNetError(f"WordNet's noun database is not at {wordnet_dir} ({missing[0].name} missing): install "
                           "Debian's package wordnet-base (apt-get install -y wordnet-base), or give its folder")
    return index, data


def _lines(path: Path) -> Iterable[str]:
    """The database lines of a WordNet file (the licence header, lines starting with two spaces, skipped)."""
    with open(path, encoding="latin-1") as handle:
        for line in handle:
            if line.strip() and not line.startswith("  "):
                yield line.rstrip("\n")


def _definition(gloss: str) -> str:
    """The gloss up to its examples (``; "``), whitespace collapsed."""
    return " ".join(gloss.split('; "')[0].split()).rstrip(";").strip()


def read_nouns(wordnet_dir: str | Path = WORDNET_DIR) -> list[Noun]:
    """Every single-sense noun that is one word of letters (hyphens inside allowed), sorted by lemma.

    Raises:
        WordNetError: ``index.noun`` or ``data.noun`` is missing (one line naming ``wordnet-base``), or a line of
            either does not parse.
    """
    index, data = _require(Path(wordnet_dir))
    single: dict[str, str] = {}
    for n, line in enumerate(_lines(index), start=1):
        fields = line.split()
        try:
            lemma, synset_cnt, offset = fields[0], int(fields[2]), fields[-1]
        except (IndexError, ValueError):
            raise WordNetError(f"{index}:{n}: not a WordNet index line: {line[:60]!r}") from None
        if synset_cnt == 1 and _WORD.fullmatch(lemma):
            single[lemma] = offset
    wanted = set(single.values())
    synsets: dict[str, tuple[int, list[str], str]] = {}
    for n, line in enumerate(_lines(data), start=1):
        head, bar, gloss = line.partition(" | ")
        fields = head.split()
        try:
            offset, lex, count = fields[0], int(fields[1]), int(fields[3], 16)
            words = [fields[4 + 2 * i] for i in range(count)]
        except (IndexError, ValueError):
            raise WordNetError(f"{data}:{n}: not a WordNet data line: {line[:60]!r}") from None
        if offset in wanted:
            synsets[offset] = (lex, words, gloss if bar else "")
    nouns = []
    for lemma, offset in sorted(single.items()):
        if offset not in synsets:
            raise WordNetError(f"{index}: lemma {lemma!r} points at synset {offset}, which {data} does not have")
        lex, words, gloss = synsets[offset]
        word = next((w for w in words if w.lower() == lemma), lemma)
        definition = _definition(gloss)
        if lex in LEXNAMES and definition:
            nouns.append(Noun(lemma, word, offset, LEXNAMES[lex], definition, len(words)))
    return nouns


def task_records(nouns: Sequence[Noun], tasks: Sequence[str] = TASKS, categories: Iterable[str] | None = None
                 ) -> dict[str, list[dict]]:
    """The records of each task for ``nouns`` (module docstring): task -> records, in the nouns' order. A
    ``category`` record is made only for nouns whose category is in ``categories`` (all when None); a ``word``
    record only for a noun that is its synset's only word."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown WordNet task {unknown[0]!r}: choose from {', '.join(TASKS)}")
    allowed = None if categories is None else set(categories)
    out: dict[str, list[dict]] = {t: [] for t in tasks}
    for noun in nouns:
        meta = {"lemma": noun.lemma, "synset": noun.synset}
        if "category" in out and (allowed is None or noun.category in allowed):
            out["category"].append({"instruction": f'WordNet category of the noun "{noun.word}":',
                                    "output": noun.category, "task": "category", **meta})
        if "definition" in out:
            out["definition"].append({"instruction": f'Define the noun "{noun.word}".', "output": noun.definition,
                                      "task": "definition", **meta})
        if "word" in out and noun.synset_words == 1:
            out["word"].append({"instruction": f"The noun defined as: {noun.definition}", "output": noun.word,
                                "task": "word", **meta})
    return out


def split_groups(nouns: Sequence[Noun], fractions: Mapping[str, float], seed: int) -> dict[str, str]:
    """Assign every synset to a split: synsets that share a definition are one group, groups are shuffled (seeded)
    and dealt out in order of ``fractions`` (split name -> share of the groups; the last split takes the rest).
    Returns synset -> split name."""
    if not fractions or any(not 0 < f < 1 for f in fractions.values()) or sum(fractions.values()) > 1 + 1e-9:
        raise ValueError(f"split fractions must be in (0, 1) and sum to at most 1, got {dict(fractions)}")
    by_definition: dict[str, set[str]] = {}
    for noun in nouns:
        by_definition.setdefault(noun.definition, set()).add(noun.synset)
    parent: dict[str, str] = {}

    def find(s: str) -> str:
        while parent.setdefault(s, s) != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    for synsets in by_definition.values():
        first, *rest = sorted(synsets)
        for s in rest:
            parent[find(s)] = find(first)
    groups: dict[str, list[str]] = {}
    for noun in nouns:
        groups.setdefault(find(noun.synset), []).append(noun.synset)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    names = list(fractions)
    bounds, total = [], 0.0
    for name in names[:-1]:
        total += fractions[name]
        bounds.append(round(total * len(order)))
    assignment: dict[str, str] = {}
    for i, root in enumerate(order):
        split = names[sum(i >= b for b in bounds)]
        for synset in groups[root]:
            assignment[synset] = split
    return assignment


@dataclass
class SplitReport:
    """What ``build_splits`` wrote: records per split and task, the category distribution of each split, and the
    overlap check (every count must be 0)."""

    paths: dict[str, str]
    counts: dict[str, dict[str, int]]
    categories: dict[str, dict[str, int]]
    overlap: dict[str, int]
    settings: dict = field(default_factory=dict)


def build_splits(out_dir: str | Path, sizes: Mapping[str, Mapping[str, int]], *, wordnet_dir: str | Path = WORDNET_DIR,
                 seed: int = 0, min_category: int = 100) -> SplitReport:
    """Write ``<out_dir>/<split>.jsonl`` for every split of ``sizes`` (split -> task -> records; e.g. ``{"train":
    {"category": 3000, ...}, "validation": {...}, "eval": {...}}``) and ``<out_dir>/wordnet.json`` (the report).

    The synsets are dealt to the splits first, in proportion to the records each asks for (``split_groups``), so
    the validation and eval groups are fixed before any training record is drawn; then each split's records are a
    seeded sample of its own groups' records, per task (all of them when fewer). Categories with fewer than
    ``min_category`` nouns in the whole database are left out of the category task. Raises ``WordNetError`` when
    the database is missing, ``ValueError`` when the overlap check finds anything (it cannot, by construction).
    """
    nouns = read_nouns(wordnet_dir)
    counts = Counter(n.category for n in nouns)
    categories = sorted(c for c, k in counts.items() if k >= min_category)
    wanted = {split: sum(per_task.values()) for split, per_task in sizes.items()}
    if not wanted or any(v <= 0 for v in wanted.values()):
        raise ValueError(f"every split needs records, got {dict(sizes)}")
    splits = list(sizes)
    total = sum(wanted.values())
    # Held-out splits get a share of the groups a little above their share of records (they must not run short);
    # training takes the rest.
    held = [s for s in splits if s != "train"]
    fractions = {s: min(0.45, 1.5 * wanted[s] / total) for s in held}
    fractions["train"] = 1.0 - sum(fractions.values())
    assignment = split_groups(nouns, fractions, seed)
    by_split: dict[str, list[Noun]] = {s: [] for s in splits}
    for noun in nouns:
        by_split[assignment[noun.synset]].append(noun)
    rng = random.Random(seed + 1)
    out = Path(out_dir)
    written: dict[str, list[dict]] = {}
    report_counts: dict[str, dict[str, int]] = {}
    for split in splits:
        records = task_records(by_split[split], tuple(sizes[split]), categories)
        chosen: list[dict] = []
        for task, n in sizes[split].items():
            pool = records[task]
            chosen += rng.sample(pool, min(n, len(pool)))
        rng.shuffle(chosen)
        written[split] = chosen
        report_counts[split] = dict(Counter(r["task"] for r in chosen))
    found = overlap(written.get("train", []), [r for s in splits if s != "train" for r in written[s]])
    if any(found.values()):
        raise ValueError(f"held-out records overlap training: {found}")
    paths = {}
    for split, records in written.items():
        paths[split] = str(atomic_write_text(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in records)))
    report = SplitReport(paths, report_counts,
                         {s: dict(Counter(r["output"] for r in rs if r["task"] == "category").most_common())
                          for s, rs in written.items()},
                         found, {"sizes": {s: dict(v) for s, v in sizes.items()}, "seed": seed,
                                 "min_category": min_category, "categories": categories,
                                 "wordnet_dir": str(wordnet_dir), "nouns": len(nouns)})
    atomic_write_json(out / "wordnet.json", report.__dict__)
    return report


def overlap(train: Sequence[dict], held_out: Sequence[dict]) -> dict[str, int]:
    """How many held-out records share, with any training record: the lemma, the synset, the definition (the
    ``definition`` output or the ``word`` instruction's text), or the whole record (instruction and output). All 0
    for a clean split."""
    def definitions(records: Sequence[dict]) -> set[str]:
        out = set()
        for r in records:
            if r.get("task") == "definition":
                out.add(r["output"])
            elif r.get("task") == "word":
                out.add(r["instruction"].split(": ", 1)[1])
        return out

    lemmas = {r.get("lemma") for r in train} - {None}
    synsets = {r.get("synset") for r in train} - {None}
    texts = {(r.get("instruction"), r.get("output"), r.get("text")) for r in train}
    train_definitions = definitions(train)
    return {"lemma": sum(r.get("lemma") in lemmas for r in held_out),
            "synset": sum(r.get("synset") in synsets for r in held_out),
            "definition": sum(bool(definitions([r]) & train_definitions) for r in held_out),
            "record": sum((r.get("instruction"), r.get("output"), r.get("text")) in texts for r in held_out)}


def category_baselines(train: Sequence[dict], held_out: Sequence[dict]) -> dict[str, float]:
    """Exact-match accuracy on the held-out ``category`` records of two trivial guesses: ``chance`` (a uniform
    guess among the categories the training records use: 1 / their number) and ``majority`` (always the most
    frequent training category)."""
    train_counts = Counter(r["output"] for r in train if r.get("task") == "category")
    held = [r["output"] for r in held_out if r.get("task") == "category"]
    if not train_counts or not held:
        raise ValueError("category baselines need category records in both the training and the held-out records")
    majority = train_counts.most_common(1)[0][0]
    return {"chance": 1 / len(train_counts), "majority": sum(h == majority for h in held) / len(held),
            "majority_class": majority, "n": len(held)}


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--wordnet-dir", default=str(WORDNET_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", default='{"train": {"category": 3000, "definition": 1500, "word": 1500}, '
                        '"validation": {"category": 150, "definition": 100, "word": 100}, '
                        '"eval": {"category": 300, "definition": 200, "word": 200}}',
                        help="JSON: split -> task -> records")
    args = parser.parse_args(argv)
    try:
        report = build_splits(args.out, json.loads(args.sizes), wordnet_dir=args.wordnet_dir, seed=args.seed)
    except WordNetError as exc:
        raise SystemExit(f"lora-ranks: error: {exc}") from None
    print(json.dumps({"paths": report.paths, "counts": report.counts, "overlap": report.overlap}, indent=1))


if __name__ == "__main__":
    _main()
