"""Progress lines of long steps (issue 38 item 5): paced across a thread's loops, with rate and time left, from the
training loop, the evaluations and the curvature passes, into the Prefect run's log."""

import logging

import pytest
import torch

from lora_ranks import progress
from lora_ranks.progress import Heartbeat, Pace


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lines_come_when_the_pace_is_due_and_at_the_end_of_a_loop_that_reported():
    clock, lines = FakeClock(), []
    pace = Pace(every=10, clock=clock)
    beat = Heartbeat("training", 100, "step", pace=pace, emit=lines.append)
    for step in range(1, 101):
        clock.now += 1.0  # one second a step
        beat.update(step, f"loss {1 / step:.4f}")
    # 100 s: a line at 10, 20, ..., 100 s (the last also as the last item)
    assert len(lines) == 10
    assert lines[0] == "training: step 10/100 (10.0%), 1.00 s/step, ~90s left; loss 0.1000"
    assert lines[-1] == "training: step 100/100 (100.0%), 1.00 s/step, 100s in all; loss 0.0100"


def test_a_loop_shorter_than_the_pace_says_nothing_and_a_run_of_them_still_reports():
    clock, lines = FakeClock(), []
    pace = Pace(every=10, clock=clock)
    for module in range(30):  # 30 evaluations of 3 s each: none alone is long, all together 90 s
        beat = Heartbeat(f"KL of module {module}", 3, "batch", pace=pace, emit=lines.append)
        for done in range(3):
            beat.update(done)
            clock.now += 1.0
        beat.update(3)
    assert 8 <= len(lines) <= 18  # every ~10 s (plus the end of each loop that reported), never 90 s of silence
    gaps = [int(line.split(":")[0].split()[-1]) for line in lines]
    assert gaps == sorted(gaps) and gaps[-1] >= 26


def test_unknown_totals_and_forced_lines():
    clock, lines = FakeClock(), []
    beat = Heartbeat("reading", None, "record", pace=Pace(every=10, clock=clock), emit=lines.append)
    clock.now = 4.0
    beat.update(400, force=True)
    assert lines == ["reading: 400 records, 100.0 records/s"]


@pytest.fixture
def every_item(monkeypatch):
    """Every progress line written (a pace of 0 s for this thread), collected from ``lora_ranks.progress``."""
    monkeypatch.setattr(progress._threads, "pace", Pace(every=0.0), raising=False)
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    progress.LOGGER.addHandler(handler)
    level = progress.LOGGER.level
    progress.LOGGER.setLevel(logging.INFO)
    yield lines
    progress.LOGGER.removeHandler(handler)
    progress.LOGGER.setLevel(level)


def test_training_evaluation_and_curvature_report(tmp_path, every_item):
    from lora_ranks.checkpoints import ModuleRef
    from lora_ranks.evidence.fidelity import held_out_loss
    from lora_ranks.finetune import prepare_examples, train_loop
    from lora_ranks.kfac import collect_curvature
    from lora_ranks.loading import load_model
    from lora_ranks.settings import TrainingSettings
    from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset

    base = build_tiny_qwen3(tmp_path / "base", num_layers=1)
    data = write_synthetic_dataset(tmp_path / "d.jsonl", 6)
    model, tokenizer = load_model(base, dtype=torch.float32)
    examples, _, _ = prepare_examples(data, tokenizer, max_length=64)
    train_loop(model, examples, tokenizer.pad_token_id, TrainingSettings(max_steps=3, batch_size=2),
               torch.device("cpu"), progress=False, desc="LoRA training seed 0")
    steps = [line for line in every_item if line.startswith("LoRA training seed 0: step ")]
    assert [line.split()[5] for line in steps] == ["1/3", "2/3", "3/3"], steps
    assert "loss " in steps[0] and "lr " in steps[0] and "left" in steps[0] and "in all" in steps[-1]

    every_item.clear()
    held_out_loss(model, examples[:6], tokenizer.pad_token_id, batch_size=2, what="validation loss")
    assert [line.split(":")[1].split()[1] for line in every_item] == ["0/6", "2/6", "4/6"]

    every_item.clear()
    modules = [ModuleRef(name, name + ".weight", tuple(module.weight.shape), "model.layers.0", 0, name.split(".")[-1])
               for name, module in model.named_modules() if name.endswith(("q_proj", "down_proj"))]
    list(collect_curvature(model, examples, tokenizer.pad_token_id, modules, kind="fisher", samples=1, seed=0,
                           batch_size=2, memory_bytes=2**30))
    assert every_item and every_item[0].startswith("fisher curvature (1 pass): batch ")


def test_lines_reach_the_prefect_run_log(prefect_harness, every_item):
    from prefect import flow, task

    from lora_ranks.progress import Heartbeat
    from tasks._common import install_progress_forwarding

    install_progress_forwarding()
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    run_logger = logging.getLogger("prefect.task_runs")
    run_logger.addHandler(handler)

    @task
    def long_step():
        beat = Heartbeat("curvature", 2, "batch")
        beat.update(1)
        beat.update(2)

    @flow
    def pipeline():
        long_step()

    try:
        pipeline()
    finally:
        run_logger.removeHandler(handler)
    assert "curvature: batch 1/2 (50.0%)" in " ".join(seen), seen
    assert any(line.startswith("curvature: batch 2/2 (100.0%)") for line in seen), seen
