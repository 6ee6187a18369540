"""Data loading, stratified sampling (exact counts), response-only masking token by token."""

import json

import pytest

from lora_ranks.data import IGNORE_INDEX, DataError, load_records, stratified_subset, tokenize_record
from lora_ranks.synthetic import synthetic_records, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([json.dumps(r) for r in synthetic_records(30, fmt="mixed")])


def _records(counts):
    return [{"text": f"{t} {i}", "task": t} for t, n in counts.items() for i in range(n)]


@pytest.mark.parametrize("counts,ratio,max_samples,expected", [
    ({"a": 500, "b": 300, "c": 200}, 0.01, 1000, {"a": 5, "b": 3, "c": 2}),
    ({"a": 50, "b": 30, "c": 20}, 0.1, 1000, {"a": 5, "b": 3, "c": 2}),
    # 7 slots over 5/3/2 of 10: shares 3.5/2.1/1.4 -> floors 3/2/1, the one left goes to the largest remainder (a)
    ({"a": 5, "b": 3, "c": 2}, 0.7, 1000, {"a": 4, "b": 2, "c": 1}),
    # the cap wins: 100 of 10 000
    ({"a": 9000, "b": 1000}, 0.5, 100, {"a": 90, "b": 10}),
    # a tiny task still gets one sample, even when its share rounds to zero
    ({"a": 990, "b": 10}, 0.01, 1000, {"a": 10, "b": 1}),
    # a dataset smaller than 1/ratio still yields one per task
    ({"a": 3, "b": 2}, 0.01, 1000, {"a": 1, "b": 1}),
])
def test_stratified_counts_are_exact(counts, ratio, max_samples, expected):
    subset, report = stratified_subset(_records(counts), ratio, max_samples, seed=1)
    assert report.counts_after == expected
    assert report.counts_before == dict(sorted(counts.items()))
    assert len(subset) == sum(expected.values())


def test_sampling_is_deterministic_and_seed_dependent():
    records = _records({"a": 200, "b": 100})
    one, _ = stratified_subset(records, 0.1, 1000, seed=3)
    two, _ = stratified_subset(records, 0.1, 1000, seed=3)
    other, _ = stratified_subset(records, 0.1, 1000, seed=4)
    assert one == two and one != other


def test_records_without_task_share_one_stratum():
    _, report = stratified_subset([{"text": "x"}] * 10 + [{"text": "y", "task": "t"}] * 10, 0.5, 1000)
    assert report.counts_before == {"default": 10, "t": 10}


def test_instruction_masking_token_by_token(tokenizer):
    record = {"instruction": "Reverse the word.", "input": "abc", "output": "cba", "task": "reverse"}
    out = tokenize_record(record, tokenizer, 256)
    prompt = tokenizer("Reverse the word.\nabc\n", add_special_tokens=False)["input_ids"]
    answer = tokenizer("cba", add_special_tokens=False)["input_ids"]
    assert out["input_ids"] == prompt + answer + [tokenizer.eos_token_id]
    assert out["labels"] == [IGNORE_INDEX] * len(prompt) + answer + [tokenizer.eos_token_id]


def test_chat_masking_trains_only_assistant_turns(tokenizer):
    messages = [{"role": "user", "content": "Count the letters.\nabcd"}, {"role": "assistant", "content": "4"}]
    out = tokenize_record({"messages": messages}, tokenizer, 256)
    trained = [t for t, label in zip(out["input_ids"], out["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "4<|im_end|>\n<|endoftext|>"
    masked = [t for t, label in zip(out["input_ids"], out["labels"]) if label == IGNORE_INDEX]
    assert tokenizer.decode(masked) == "<|im_start|>user\nCount the letters.\nabcd<|im_end|>\n<|im_start|>assistant\n"


def test_chat_fallback_without_template(tokenizer):
    plain = train_tokenizer(["user: hi\nassistant: yo\n"] * 5)
    plain.chat_template = None
    out = tokenize_record({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, plain, 256)
    trained = [t for t, label in zip(out["input_ids"], out["labels"]) if label != IGNORE_INDEX]
    assert plain.decode(trained) == "yo\n<|endoftext|>"


def test_text_records_train_on_every_token(tokenizer):
    out = tokenize_record({"text": "hello world"}, tokenizer, 256)
    assert out["labels"] == out["input_ids"]


@pytest.mark.parametrize("content,match", [
    ("", "is empty"),
    ('{"text": "a"}\n{"oops"\n', r"data\.jsonl:2: invalid JSON"),
    ('{"text": "a"}\n{"foo": 1}\n', r"data\.jsonl:2: record has none of"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"data\.jsonl:1: chat record has no assistant"),
    ('{"instruction": "x"}\n', r"data\.jsonl:1: instruction record needs a string 'output'"),
])
def test_bad_files_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_records(path)


def test_json_list_files_load(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(synthetic_records(2, fmt="mixed")))
    assert len(load_records(path)) == 10


def test_a_records_file_is_parsed_once_per_content_and_each_caller_gets_its_own_copy(tmp_path, monkeypatch):
    import os

    import lora_ranks.data as data

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one", "task": "a"}\n')
    parsed = []
    monkeypatch.setattr(data, "_load_records", lambda p, real=data._load_records: parsed.append(p) or real(p))
    first = load_records(path)
    first[0]["text"] = "changed by a caller"
    assert load_records(path) == [{"text": "one", "task": "a"}] and len(parsed) == 1  # cached, and a copy
    path.write_text('{"text": "two", "task": "a"}\n')
    os.utime(path, ns=(1, 1))  # a new modification time, even on a coarse clock
    assert load_records(path) == [{"text": "two", "task": "a"}] and len(parsed) == 2  # the new content is read
    path.write_text('{"oops": 1}\n')
    os.utime(path, ns=(2, 2))
    for _ in range(2):  # a bad file is refused every time, never cached
        with pytest.raises(DataError, match=f"{path}:1"):
            load_records(path)
