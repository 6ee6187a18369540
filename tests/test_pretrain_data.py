"""The 6.5M experiment's fine-tuning mix: every record and licence paragraph once, so that its held-out records
share none with training (Debian's licence folder holds symlinks, GPL -> GPL-3, and near-copies across versions)."""

import json
import random
from pathlib import Path

import pytest

from lora_ranks.pretrain import license_paragraphs, shifted_task_mix

CLAUSES = [f"Clause {i}: the licensee may copy, modify and distribute the work under condition number {i}, "
           f"provided that notice {i} is kept in every copy and no warranty of kind {i} is implied." for i in range(6)]


def _licenses(root: Path) -> Path:
    """A licence folder in Debian's shape: A, a link to it, B (A with one word changed per clause: a new version),
    C (other text)."""
    root.mkdir()
    (root / "A-1").write_text("\n\n".join(CLAUSES) + "\n")
    (root / "A").symlink_to("A-1")
    (root / "B-2").write_text("\n\n".join(c.replace("copy,", "share,") for c in CLAUSES) + "\n")
    (root / "C").write_text("\n\n".join(f"An unrelated paragraph number {i} about the weather in a small town, "
                                         f"with rain on day {i} and sun on the day after." for i in range(4)) + "\n")
    return root


def _tests(root: Path) -> Path:
    """Two test files that define the same function with the same docstring (one record, not two)."""
    root.mkdir()
    body = 'def test_sorting_keeps_order():\n    """Sorting keeps the order of equal keys stable."""\n'
    (root / "test_a.py").write_text(body)
    (root / "test_b.py").write_text(body + 'def test_other():\n    """Another docstring, long enough to count."""\n')
    return root


def test_licence_paragraphs_skip_links_and_near_copies(tmp_path):
    paragraphs = license_paragraphs(_licenses(tmp_path / "licenses"))
    assert len(paragraphs) == len(CLAUSES) + 4 == len(set(paragraphs))
    assert all("share," not in p for p in paragraphs)  # B's near-copies of A's clauses are left out
    assert license_paragraphs(tmp_path / "missing") == []


def test_the_mix_has_each_record_once_and_any_split_shares_none(tmp_path):
    records = shifted_task_mix(40, seed=0, licenses=_licenses(tmp_path / "licenses"), test_root=_tests(tmp_path / "t"))
    keys = [json.dumps(r, sort_keys=True) for r in records]
    assert len(keys) == len(set(keys))
    assert sum(r["task"] == "testname" for r in records) == 2 and sum(r["task"] == "prose" for r in records) == 10
    random.Random(1).shuffle(records)  # the experiment's split (benchmarks/experiment_allocations.step_data)
    held, train = records[:15], records[15:]
    assert not {json.dumps(r, sort_keys=True) for r in held} & {json.dumps(r, sort_keys=True) for r in train}
    assert not {r["text"] for r in held if "text" in r} & {r["text"] for r in train if "text" in r}


@pytest.mark.skipif(not Path("/usr/share/common-licenses/GPL-3").is_file(),
                    reason="Debian's licence folder is not here; the fixture test above covers the same code")
def test_the_real_licence_folder_gives_each_paragraph_once():
    paragraphs = license_paragraphs()
    assert len(paragraphs) == len(set(paragraphs)) > 100
    gpl3 = " ".join(Path("/usr/share/common-licenses/GPL-3").read_text().split())
    from_gpl3 = [p for p in paragraphs if p in gpl3]
    assert len(from_gpl3) == len(set(from_gpl3))  # GPL -> GPL-3 read once
