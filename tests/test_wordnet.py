"""WordNet 3.0 tasks: the database read right, records in the project's format, and held-out records that share no
lemma, synset, definition or record with training, on a small fixture in WordNet's own file format (always) and
on the real database when Debian's wordnet-base is installed."""

import json
import random
from pathlib import Path

import pytest

from lora_ranks.data import load_records, record_kind
from lora_ranks.wordnet import (
    LEXNAMES,
    WORDNET_DIR,
    WordNetError,
    build_splits,
    category_baselines,
    overlap,
    read_nouns,
    split_groups,
    task_records,
)

_HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2 Princeton University\n"
_CATEGORIES = {5: "animal", 6: "artifact", 18: "person", 20: "plant"}


def _write_fixture(root: Path, per_category: int = 30) -> dict:
    """``index.noun`` and ``data.noun`` in WordNet's format: ``per_category`` single-sense nouns in each of four
    categories, plus what must be left out or grouped: a two-sense lemma, a multi-word lemma, a lemma with a
    digit, two synsets sharing a definition, and a synset with two single-sense words. Returns what was planted."""
    rng = random.Random(0)
    synsets, index = [], {}
    offset = 1000

    def synset(lex: int, words: list[str], gloss: str) -> str:
        nonlocal offset
        offset += 137
        key = f"{offset:08d}"
        body = " ".join(f"{w} 0" for w in words)
        synsets.append(f"{key} {lex:02d} n {len(words):02x} {body} 001 @ 00001740 n 0000 | {gloss}  ")
        return key

    def letters(n: int) -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))

    for lex, name in _CATEGORIES.items():
        for i in range(per_category):
            word = f"{name[:3]}{letters(5)}"
            key = synset(lex, [word.capitalize() if lex == 18 and i % 3 == 0 else word],
                         f'a {name} called {word} number {i}; "an example with {word}"')
            index[word] = (1, [key])
    twin_a = synset(5, ["twinalpha"], "a shared definition of two synsets")
    twin_b = synset(5, ["twinbeta"], "a shared definition of two synsets")
    index["twinalpha"], index["twinbeta"] = (1, [twin_a]), (1, [twin_b])
    pair = synset(6, ["gizmo", "doohickey"], "a small device whose name one forgets")
    index["gizmo"], index["doohickey"] = (1, [pair]), (1, [pair])
    two = [synset(6, ["bank"], "a container for coins"), synset(17, ["bank"], "sloping land beside water")]
    index["bank"] = (2, two)
    index["ice_cream"] = (1, [synset(13, ["ice_cream"], "frozen dessert")])
    index["b12"] = (1, [synset(13, ["B12"], "a vitamin")])
    lines = [f"{lemma} n {count} 1 @ {count} 0 {' '.join(keys)}  " for lemma, (count, keys) in sorted(index.items())]
    (root / "index.noun").write_text(_HEADER + "\n".join(lines) + "\n", encoding="latin-1")
    (root / "data.noun").write_text(_HEADER + "\n".join(synsets) + "\n", encoding="latin-1")
    return {"twins": (twin_a, twin_b), "pair": pair}


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("wordnet")
    planted = _write_fixture(root)
    return root, planted


SIZES = {"train": {"category": 60, "definition": 30, "word": 30},
         "validation": {"category": 10, "definition": 5, "word": 5},
         "eval": {"category": 20, "definition": 10, "word": 10}}


def test_the_database_is_read_as_wordnet_writes_it(fixture_dir):
    root, planted = fixture_dir
    nouns = {n.lemma: n for n in read_nouns(root)}
    assert "bank" not in nouns and "ice_cream" not in nouns and "b12" not in nouns  # two senses, two words, a digit
    assert len(nouns) == 4 * 30 + 4
    capital = next(n for n in nouns.values() if n.category == "person" and n.word != n.lemma)
    assert capital.word == capital.lemma.capitalize()  # the word as the synset writes it
    assert nouns["gizmo"].synset == nouns["doohickey"].synset == planted["pair"] and nouns["gizmo"].synset_words == 2
    some = next(n for n in nouns.values() if n.category == "plant")
    assert some.definition.startswith("a plant called ") and "example" not in some.definition
    assert set(LEXNAMES[k] for k in _CATEGORIES) == {n.category for n in nouns.values()}


def test_records_are_the_projects_instruction_records(fixture_dir):
    root, _ = fixture_dir
    nouns = read_nouns(root)
    records = task_records(nouns)
    assert {r["task"] for rs in records.values() for r in rs} == {"category", "definition", "word"}
    for rs in records.values():
        assert all(record_kind(r) == "instruction" and r["lemma"] and r["synset"] for r in rs)
    gizmo = [r for r in records["word"] if r["lemma"] in ("gizmo", "doohickey")]
    assert gizmo == []  # two words in the synset: no single right answer
    assert len(records["category"]) == len(nouns)
    assert len(task_records(nouns, ("category",), categories=["plant"])["category"]) == 30


def test_split_shares_no_lemma_synset_definition_or_record(fixture_dir, tmp_path):
    root, planted = fixture_dir
    report = build_splits(tmp_path, SIZES, wordnet_dir=root, seed=3, min_category=10)
    splits = {name: load_records(tmp_path / f"{name}.jsonl") for name in SIZES}
    assert report.overlap == {"lemma": 0, "synset": 0, "definition": 0, "record": 0}
    # checked here independently of ``overlap``: every pair of splits
    for a in splits:
        for b in splits:
            if a >= b:
                continue
            for key in ("lemma", "synset"):
                assert not {r[key] for r in splits[a]} & {r[key] for r in splits[b]}, (a, b, key)
            definitions = [{r["output"] if r["task"] == "definition" else r["instruction"].split(": ", 1)[1]
                            for r in splits[s] if r["task"] != "category"} for s in (a, b)]
            assert not definitions[0] & definitions[1], (a, b)
            assert not {json.dumps(r, sort_keys=True) for r in splits[a]} & {json.dumps(r, sort_keys=True)
                                                                            for r in splits[b]}
    # synsets sharing a definition go to the same split
    where = {r["synset"]: name for name, rs in splits.items() for r in rs}
    twins = [where.get(s) for s in planted["twins"] if s in where]
    assert len(set(twins)) <= 1
    assert json.loads((tmp_path / "wordnet.json").read_text())["overlap"] == report.overlap
    assert sum(report.counts["eval"].values()) == len(splits["eval"]) and report.counts["train"]["category"] == 60


def test_overlap_counts_what_a_leaky_split_shares():
    train = [{"instruction": 'Define the noun "cat".', "output": "a small feline", "task": "definition",
              "lemma": "cat", "synset": "1"}]
    leaky = [{"instruction": "The noun defined as: a small feline", "output": "moggy", "task": "word",
              "lemma": "moggy", "synset": "2"}, dict(train[0])]
    assert overlap(train, leaky) == {"lemma": 1, "synset": 1, "definition": 2, "record": 1}


def test_group_split_is_a_partition_with_the_asked_shares(fixture_dir):
    root, _ = fixture_dir
    nouns = read_nouns(root)
    assignment = split_groups(nouns, {"eval": 0.2, "train": 0.8}, seed=0)
    assert set(assignment) == {n.synset for n in nouns} and set(assignment.values()) == {"eval", "train"}
    share = sum(v == "eval" for v in assignment.values()) / len(assignment)
    assert 0.1 < share < 0.3
    with pytest.raises(ValueError, match="split fractions"):
        split_groups(nouns, {"eval": 0.7, "train": 0.7}, seed=0)


def test_category_baselines_are_chance_and_the_majority_guess():
    train = [{"task": "category", "output": c} for c in ["person"] * 5 + ["plant"] * 3 + ["animal"] * 2]
    held = [{"task": "category", "output": c} for c in ["person", "plant", "plant", "animal"]]
    assert category_baselines(train, held) == {"chance": 1 / 3, "majority": 0.25, "majority_class": "person", "n": 4}


def test_a_missing_database_names_the_package_in_one_line(tmp_path):
    with pytest.raises(WordNetError) as caught:
        read_nouns(tmp_path)
    message = str(caught.value)
    assert "wordnet-base" in message and "\n" not in message and "apt-get install" in message
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lora_ranks.wordnet", "--out", str(tmp_path / "out"),
                           "--wordnet-dir", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0 and "wordnet-base" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(),
                    reason="WordNet 3.0 is not installed (apt-get install -y wordnet-base); the fixture tests above "
                           "cover the same code")
def test_real_wordnet_splits_share_nothing(tmp_path):
    sizes = {"train": {"category": 3000, "definition": 1500, "word": 1500},
             "validation": {"category": 150, "definition": 100, "word": 100},
             "eval": {"category": 300, "definition": 200, "word": 200}}
    report = build_splits(tmp_path, sizes, seed=0)
    assert report.overlap == {"lemma": 0, "synset": 0, "definition": 0, "record": 0}
    assert len(report.settings["categories"]) == 24 and report.settings["nouns"] > 40_000
    train = load_records(tmp_path / "train.jsonl")
    held = load_records(tmp_path / "eval.jsonl") + load_records(tmp_path / "validation.jsonl")
    assert not {r["lemma"] for r in train} & {r["lemma"] for r in held}
    assert not {r["synset"] for r in train} & {r["synset"] for r in held}
    baselines = category_baselines(train, load_records(tmp_path / "eval.jsonl"))
    assert baselines["majority_class"] == "person" and 0.1 < baselines["majority"] < 0.25
