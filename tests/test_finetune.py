"""The preliminary fine-tune on a tiny Qwen3: loss goes down, the pair is saved, reloads and differs."""

import json
from pathlib import Path

import pytest
import torch

from lora_ranks.finetune import FinetuneSettings, run_preliminary_finetune
from lora_ranks.loading import load_model
from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    base = build_tiny_qwen3(root / "base")
    data = write_synthetic_dataset(root / "data.jsonl", 60, fmt="mixed")
    settings = FinetuneSettings(subset_ratio=0.5, max_steps=25, learning_rate=2e-3, batch_size=8, epochs=100)
    return base, run_preliminary_finetune(base, data, root / "out", settings, progress=False)


def test_loss_goes_down(finetuned):
    _, result = finetuned
    losses = result.losses
    assert result.steps == 25 and len(losses) == 25
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_pair_reloads_and_differs(finetuned):
    base, result = finetuned
    pre, _ = load_model(result.pretrained_dir)
    post, _ = load_model(result.finetuned_dir)
    original, _ = load_model(base)
    for a, c in zip(pre.state_dict().values(), original.state_dict().values()):
        torch.testing.assert_close(a, c, rtol=0, atol=0)  # pretrained/ is the base, unchanged
    changed = [n for (n, a), b in zip(pre.state_dict().items(), post.state_dict().values()) if not torch.equal(a, b)]
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    result_dir = Path(result.finetuned_dir)
    assert list(result_dir.glob("*.safetensors")) and not list(result_dir.glob("*.bin"))


def test_metrics_record_counts_and_losses(finetuned):
    _, result = finetuned
    metrics = json.loads(open(result.metrics_path).read())
    assert metrics["task_counts_before"] == {t: 60 for t in ("add", "count", "reverse", "sort", "upper")}
    assert metrics["task_counts_after"] == {t: 30 for t in ("add", "count", "reverse", "sort", "upper")}
    assert metrics["losses"] == pytest.approx(result.losses)
    assert metrics["settings"]["max_steps"] == 25
    assert metrics["pretrained_copied"] is False and len(metrics["pretrained_fingerprint"]) == 64


def test_copy_base_false_records_the_local_folder(tmp_path):
    base = build_tiny_qwen3(tmp_path / "base", num_layers=1)
    data = write_synthetic_dataset(tmp_path / "d.jsonl", 5)
    result = run_preliminary_finetune(base, data, tmp_path / "out", FinetuneSettings(max_steps=1, copy_base=False),
                                      progress=False)
    assert result.pretrained_dir == str(base.resolve())
    assert not (tmp_path / "out" / "pretrained").exists()


@pytest.mark.parametrize("kwargs,match", [(dict(subset_ratio=0), "subset_ratio"), (dict(max_steps=0), "max_steps"),
                                          (dict(learning_rate=-1), "learning_rate"), (dict(schedule="step"), "schedule")])
def test_settings_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FinetuneSettings(**kwargs)


def test_copy_base_true_writes_pretrained(tmp_path):
    base = build_tiny_qwen3(tmp_path / "base", num_layers=1)
    data = write_synthetic_dataset(tmp_path / "d.jsonl", 5)
    result = run_preliminary_finetune(base, data, tmp_path / "out", FinetuneSettings(max_steps=1, copy_base=True),
                                      progress=False)
    assert result.pretrained_dir == str(tmp_path / "out" / "pretrained")
    pre, _ = load_model(result.pretrained_dir)
    original, _ = load_model(base)
    for a, b in zip(pre.state_dict().values(), original.state_dict().values()):
        assert torch.equal(a, b)


def test_8bit_adamw_trains(tmp_path):
    base = build_tiny_qwen3(tmp_path / "base", num_layers=1)
    data = write_synthetic_dataset(tmp_path / "d.jsonl", 20)
    result = run_preliminary_finetune(base, data, tmp_path / "out", FinetuneSettings(
        subset_ratio=1.0, max_steps=15, learning_rate=3e-3, batch_size=8, optimizer="adamw8bit"), progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(result.losses[-3:]) < sum(result.losses[:3])


def test_wandb_logging_sends_settings_and_losses_only(tmp_path, monkeypatch):
    import importlib.machinery
    import sys
    import types

    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probing find_spec("wandb") see a module
    fake.init = lambda **kwargs: calls["init"].append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_API_KEY", "sk-SENTINEL-should-not-leak")
    base = build_tiny_qwen3(tmp_path / "base", num_layers=1)
    data = write_synthetic_dataset(tmp_path / "d.jsonl", 5)
    run_preliminary_finetune(base, data, tmp_path / "out", FinetuneSettings(max_steps=3, wandb_project="demo"),
                             progress=False)
    assert calls["init"][0]["project"] == "demo" and calls["finish"] == 1
    assert [step for step, _ in calls["log"]] == [1, 2, 3] and set(calls["log"][0][1]) == {"loss", "lr"}
    assert "SENTINEL" not in repr(calls)


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    base = build_tiny_qwen3(tmp_path / "base", num_layers=1)
    data = write_synthetic_dataset(tmp_path / "d.jsonl", 5)
    with pytest.raises(ValueError, match="pip install wandb"):
        run_preliminary_finetune(base, data, tmp_path / "out", FinetuneSettings(max_steps=1, wandb_project="demo"),
                                 progress=False)
