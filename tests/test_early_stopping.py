"""A row trained to its own plateau: early stopping on a validation split (the best checkpoint restored and
reported), divergence during learning-rate trials, committed results reused on a fresh run; on the tiny planted
base, a few steps each."""

import json
from pathlib import Path

import pytest

from lora_ranks.config import save_rank_config
from lora_ranks.evidence.runs import Committed, RowEvaluation, RowSpec, committed_key, committed_name, train_row
from lora_ranks.settings import LoRATrainingSettings


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The tiny base (2 layers, hidden 64), demo records split in train / validation / eval, a uniform rank-2 config."""
    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.evidence.experiment import config_from_ranks, uniform_ranks
    from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset

    root = tmp_path_factory.mktemp("stopping")
    base = build_tiny_qwen3(root / "base")
    lines = Path(write_synthetic_dataset(root / "data.jsonl", 8, fmt="mixed")).read_text().splitlines()
    (root / "eval.jsonl").write_text("\n".join(lines[:6]) + "\n")
    (root / "validation.jsonl").write_text("\n".join(lines[6:12]) + "\n")
    (root / "train.jsonl").write_text("\n".join(lines[12:]) + "\n")
    (root / "train4.jsonl").write_text("\n".join(lines[12:16]) + "\n")  # few enough to overfit on any CPU
    modules = CheckpointPair(base, base).modules()
    config = save_rank_config(root / "uniform.json", config_from_ranks(modules, uniform_ranks(modules, 2), 10**6))
    return root, str(base), str(config)


# A rate high enough that the validation loss turns up within a few steps: early stopping has something to stop.
SETTINGS = LoRATrainingSettings(max_steps=30, epochs=100, batch_size=4, learning_rate=0.1, lora_dropout=0.0,
                                max_length=48, gradient_checkpointing=False, warmup_ratio=0.0, schedule="constant")


def _evaluation(root, **kw) -> RowEvaluation:
    return RowEvaluation(str(root / "eval.jsonl"), eval_samples=6, max_length=48,
                         validation_data_path=str(root / "validation.jsonl"), **kw)


def _served_losses(base: str, adapter: Path, root: Path) -> tuple[float, float]:
    """Held-out and validation loss of the saved adapter, loaded afresh."""
    from lora_ranks.evidence.comparison import eval_examples
    from lora_ranks.evidence.fidelity import held_out_loss
    from lora_ranks.model import load_peft_checkpoint

    model, tokenizer = load_peft_checkpoint(base, adapter)
    return tuple(held_out_loss(model, eval_examples(root / name, tokenizer, 6, 48), tokenizer.pad_token_id)
                 for name in ("eval.jsonl", "validation.jsonl"))


def test_early_stopping_restores_and_reports_the_best_checkpoint(setting):
    root, base, config = setting
    # Four training records: the validation loss turns up within tens of steps whatever the CPU's kernels (on 28
    # records it still fell at step 30 on an AVX-512 machine, and stopping was not reached).
    settings = SETTINGS.replace(max_steps=80)
    result = train_row(base, RowSpec("r2-uniform", "cold", 0, config), str(root / "train4.jsonl"), root / "run",
                       settings, _evaluation(root, eval_interval=2, patience=2))
    curve = result.validation_curve
    assert [p["step"] for p in curve] == list(range(2, result.steps + 1, 2))
    best = min(curve, key=lambda p: p["validation_loss"])
    assert result.stopped == "patience" and result.steps < settings.max_steps  # stopped before the cap
    assert result.best_step == best["step"] == result.steps - 2 * 2  # two evaluations without improvement
    assert result.validation_loss == best["validation_loss"] < curve[-1]["validation_loss"]
    assert result.best_train_flops == best["train_flops"] < result.train_flops
    # The adapter saved and the held-out loss reported are the best checkpoint's, not the last step's.
    held_out, validation = _served_losses(base, root / "run" / "adapter", root)
    assert held_out == pytest.approx(result.loss, rel=1e-5)
    assert validation == pytest.approx(result.validation_loss, rel=1e-5)


def test_a_run_that_never_plateaus_says_it_hit_the_cap(setting):
    root, base, config = setting
    result = train_row(base, RowSpec("r2-uniform", "cold", 0, config), str(root / "train.jsonl"), root / "cap",
                       SETTINGS.replace(learning_rate=1e-3, max_steps=4), _evaluation(root, eval_interval=1,
                                                                                      patience=10))
    assert result.stopped == "cap" and result.steps == 4 and len(result.validation_curve) == 4


def test_a_diverged_trial_is_reported_not_raised(setting, monkeypatch):
    from lora_ranks.evidence import runs
    from lora_ranks.finetune import TrainingDivergedError

    def diverging(*args, **kwargs):
        raise TrainingDivergedError("loss nan at step 1")

    monkeypatch.setattr(runs, "train_loop", diverging)
    root, base, config = setting
    result = train_row(base, RowSpec("r2-uniform", "cold", 0, config), str(root / "train.jsonl"), root / "nan",
                       SETTINGS, _evaluation(root, eval_interval=2, patience=2))
    assert result.diverged and result.stopped == "diverged" and result.loss is None and result.validation_loss is None
    without_validation = RowEvaluation(str(root / "eval.jsonl"), eval_samples=6, max_length=48)
    with pytest.raises(TrainingDivergedError):  # a final run that diverges is an error, not a row
        train_row(base, RowSpec("r2-uniform", "cold", 0, config), str(root / "train.jsonl"), root / "nan2",
                  SETTINGS, without_validation)


def test_a_committed_row_is_reused_by_a_fresh_run_and_a_changed_one_retrains(setting, tmp_path):
    root, base, config = setting
    committed = Committed(str(tmp_path / "results"), design="preparation settings")
    spec = RowSpec("r2-uniform", "cold", 1, config)
    settings = SETTINGS.replace(max_steps=2, learning_rate=1e-3)
    first = train_row(base, spec, str(root / "train.jsonl"), tmp_path / "a", settings, _evaluation(root),
                      committed=committed)
    saved = json.loads((tmp_path / "results" / committed_name(spec, 1e-3)).read_text())
    assert saved["loss"] == first.loss and saved["committed_key"]
    # a fresh clone: another output folder, the rank config gone; the committed row is read, nothing is trained
    fresh = RowSpec("r2-uniform", "cold", 1, str(tmp_path / "no-such-config.json"))
    again = train_row(base, fresh, str(root / "train.jsonl"), tmp_path / "b", settings, _evaluation(root),
                      committed=committed)
    assert again.loss == first.loss and not (tmp_path / "b").exists()
    other = Committed(committed.results_dir, design="other preparation settings")
    retrained = train_row(base, spec, str(root / "train.jsonl"), tmp_path / "c", settings, _evaluation(root),
                          committed=other)
    assert (tmp_path / "c" / "row.json").is_file() and retrained.loss == first.loss  # same seed: same numbers


def test_a_setting_added_later_leaves_committed_keys_alone_at_its_old_value(setting):
    """Rows committed before `processes` existed keep their key at processes=1; another value is another row."""
    root, base, config = setting
    spec = RowSpec("r2-uniform", "cold", 1, config)
    one, two = SETTINGS, SETTINGS.replace(processes=2)
    assert "processes" not in one.key_dict() and two.key_dict()["processes"] == 2
    before = {k: v for k, v in one.to_dict().items() if k != "processes"}  # what an earlier release digested
    assert one.key_dict() == before
    keys = {committed_key(base, spec, str(root / "train.jsonl"), s, _evaluation(root), "design") for s in (one, two)}
    assert len(keys) == 2


def test_a_run_stopped_midway_resumes_from_its_last_evaluation_as_if_never_stopped(setting, tmp_path, monkeypatch):
    """A run killed after an evaluation goes on from there (weights, AdamW state, data order, schedule, curves and
    early-stopping state) and ends exactly as the uninterrupted run; a run of other inputs ignores the saved state."""
    from lora_ranks.evidence import monitor, partial_runs, runs

    root, base, config = setting
    spec, train = RowSpec("r2-uniform", "cold", 0, config), str(root / "train.jsonl")
    # warmup and cosine decay over 12 steps, evaluated every 2: a resumed schedule that restarted would show; dropout
    # on: the masks after the resume are those of the uninterrupted run only if the generator is restored too
    settings = SETTINGS.replace(max_steps=12, learning_rate=3e-2, warmup_ratio=0.25, schedule="cosine",
                                lora_dropout=0.1)
    evaluation = _evaluation(root, eval_interval=2, patience=10, curve_points=3)
    whole = train_row(base, spec, train, tmp_path / "whole", settings, evaluation)
    assert not (tmp_path / "whole" / partial_runs.PARTIAL_FILE).exists()  # removed once the run finished

    real_save, loaded = monitor.save_partial, []

    def killed_after_step_6(run_dir, partial):
        real_save(run_dir, partial)
        if partial.loop.step == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(monitor, "save_partial", killed_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_row(base, spec, train, tmp_path / "cut", settings, evaluation)
    assert (tmp_path / "cut" / partial_runs.PARTIAL_FILE).is_file() and not (tmp_path / "cut" / "row.json").exists()
    monkeypatch.setattr(monitor, "save_partial", real_save)
    real_load = runs.load_partial
    monkeypatch.setattr(runs, "load_partial", lambda *a: loaded.append(real_load(*a)) or loaded[-1])
    resumed = train_row(base, spec, train, tmp_path / "cut", settings, evaluation)
    assert loaded[-1] is not None and loaded[-1].loop.step == 6  # it did resume, from step 6
    assert len(loaded[-1].loop.losses) == 6 and loaded[-1].best_weights is not None
    for field in ("loss", "validation_loss", "validation_curve", "curve", "steps", "best_step", "train_tokens",
                  "train_flops", "best_train_flops", "stopped", "accuracy"):
        a, b = getattr(whole, field), getattr(resumed, field)
        if field.endswith("curve"):  # wall seconds differ between the two runs; everything else is the same
            a, b = ([{k: v for k, v in p.items() if k != "seconds"} for p in c] for c in (a, b))
        assert a == b, field
    assert not (tmp_path / "cut" / partial_runs.PARTIAL_FILE).exists()

    # A saved state of other inputs (here another learning rate) is ignored: that run starts from step 0.
    monkeypatch.setattr(monitor, "save_partial", killed_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_row(base, spec, train, tmp_path / "other", settings, evaluation)
    monkeypatch.setattr(monitor, "save_partial", real_save)
    train_row(base, spec, train, tmp_path / "other", settings.replace(learning_rate=1e-2), evaluation)
    assert loaded[-1] is None


def test_a_preparation_is_committed_once_per_design_and_read_by_design(tmp_path):
    """A preparation's record measured when it really ran is kept over a cached rerun's (fewer seconds), and a
    longer one replaces it; another design replaces it; reading keeps only the asked design's records (and those
    committed before designs were recorded)."""
    from lora_ranks.evidence.committed import commit_preparation, read_preparations

    first = commit_preparation(tmp_path, 0, "d1", {"total": 5.0, "seconds": 60.0})
    assert commit_preparation(tmp_path, 0, "d1", {"total": 5.0, "seconds": 0.4}) == first  # a cached rerun's
    assert first == {"total": 5.0, "seconds": 60.0, "design": "d1"}
    first = commit_preparation(tmp_path, 0, "d1", {"total": 5.0, "seconds": 61.0})
    assert json.loads((tmp_path / "preparation-seed0.json").read_text()) == first and first["seconds"] == 61.0
    commit_preparation(tmp_path, None, "d1", {"total": 1.0, "seconds": 9.0})
    (tmp_path / "preparation-seed3.json").write_text(json.dumps({"total": 2.0, "seconds": 8.0}))  # no design
    assert read_preparations(tmp_path, "d1") == {0: first, "shared": {"total": 1.0, "seconds": 9.0, "design": "d1"},
                                                 3: {"total": 2.0, "seconds": 8.0}}
    other = commit_preparation(tmp_path, 0, "d2", {"total": 7.0, "seconds": 70.0})
    assert other["design"] == "d2" and 0 not in read_preparations(tmp_path, "d1")
