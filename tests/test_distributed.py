"""Two processes (accelerate launch, gloo on the CPU) train as one: the brief fine-tune and LoRA training with
``processes=2`` give the loss curve of one process with the same batch, within 1e-4 (float sums in another order);
only process 0 writes, and what it writes is what one process writes (issue 38 item 4)."""

import json
from pathlib import Path

import pytest

from lora_ranks.errors import LoraRanksError
from lora_ranks.settings import FinetuneSettings, LoRATrainingSettings

TOLERANCE = 1e-4
"""Largest difference of a step's loss (nats/token) between one process and two: the gradients are the same sums in
another order (each process's mean scaled by its share of the batch's label tokens, then all-reduced)."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset

    root = tmp_path_factory.mktemp("ddp")
    base = build_tiny_qwen3(root / "base", num_layers=2)
    data = write_synthetic_dataset(root / "d.jsonl", 8)
    return base, data, root


@pytest.mark.slow
def test_two_processes_fine_tune_as_one(inputs, tmp_path):
    from safetensors.torch import load_file

    from lora_ranks.finetune import run_preliminary_finetune

    base, data, _ = inputs
    settings = FinetuneSettings(max_steps=4, batch_size=6, subset_ratio=1.0, learning_rate=1e-3, seed=3,
                                gradient_checkpointing=False)
    one = run_preliminary_finetune(base, data, tmp_path / "one", settings, device="cpu", progress=False)
    two = run_preliminary_finetune(base, data, tmp_path / "two", settings.replace(processes=2), device="cpu",
                                   progress=False)
    assert len(two.losses) == len(one.losses) == 4
    assert max(abs(a - b) for a, b in zip(one.losses, two.losses)) <= TOLERANCE, (one.losses, two.losses)
    a = load_file(next((tmp_path / "one" / "finetuned").glob("*.safetensors")))
    b = load_file(next((tmp_path / "two" / "finetuned").glob("*.safetensors")))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4  # the same weights (after 4 AdamW steps)
    metrics = json.loads((tmp_path / "two" / "training_metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["losses"] == two.losses  # written by process 0 of 2
    assert json.loads((tmp_path / "one" / "training_metrics.json").read_text())["processes"] == 1
    print("fine-tune, largest loss difference:", max(abs(a - b) for a, b in zip(one.losses, two.losses)))
    assert not list((tmp_path / "two").glob(".*.new"))  # one writer: nothing left behind


@pytest.mark.slow
def test_two_processes_train_a_lora_as_one(inputs, tmp_path):
    from lora_ranks.analysis import analyze_checkpoints
    from lora_ranks.analysis.layout import OutputLayout
    from lora_ranks.finetune import run_preliminary_finetune
    from lora_ranks.train import train_dynamic_lora

    base, data, root = inputs
    pair = run_preliminary_finetune(base, data, root / "ft", FinetuneSettings(max_steps=3, subset_ratio=1.0),
                                    device="cpu", progress=False)
    analyze_checkpoints(pair.pretrained_dir, pair.finetuned_dir, root / "an")
    config = OutputLayout(root / "an").config_path
    settings = LoRATrainingSettings(max_steps=4, batch_size=4, learning_rate=2e-3, seed=1, init="cold",
                                    lora_dropout=0.0, gradient_checkpointing=False)
    one = train_dynamic_lora(base, config, data, tmp_path / "one", settings, device="cpu", progress=False)
    two = train_dynamic_lora(base, config, data, tmp_path / "two", settings.replace(processes=2), device="cpu",
                             progress=False)
    assert max(abs(a - b) for a, b in zip(one.losses, two.losses)) <= TOLERANCE, (one.losses, two.losses)
    assert two.trainable_parameters == one.trainable_parameters
    assert json.loads(Path(two.metrics_path).read_text())["processes"] == 2
    print("LoRA, largest loss difference:", max(abs(a - b) for a, b in zip(one.losses, two.losses)))
    adapter = {name: json.loads((Path(r.adapter_dir) / "adapter_config.json").read_text()) for name, r in
               (("one", one), ("two", two))}
    assert adapter["one"]["rank_pattern"] == adapter["two"]["rank_pattern"]


def test_what_cannot_run_in_several_processes_is_refused_before_any_work(monkeypatch, tmp_path, inputs):
    import importlib.util

    from lora_ranks.distributed import check_launchable
    from lora_ranks.finetune import run_preliminary_finetune

    base, data, _ = inputs
    with pytest.raises(LoraRanksError, match="batch size is 1: give a batch size of at least 2"):
        run_preliminary_finetune(base, data, tmp_path / "out", FinetuneSettings(batch_size=1, processes=2),
                                 device="cpu", progress=False)
    assert not (tmp_path / "out").exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(LoraRanksError, match="not installed: pip install accelerate"):
        check_launchable(2, 8, "cpu", "--processes")
    check_launchable(1, 1, "cpu")  # one process needs nothing


def test_only_a_process_outside_a_group_launches():
    from lora_ranks.distributed import should_launch, world

    assert world() == (0, 1) and not should_launch(1) and should_launch(2)
