"""`lora-ranks check`: memory and latency of a rank config measured on this machine, budgets as assertions."""

import json
import os
import signal
import sys

import pytest

from flows.cli import main
from lora_ranks.analysis import analyze_checkpoints
from lora_ranks.check import InferenceMeasurement, StepMeasurement, Target, check_rank_config, format_table
from lora_ranks.check.measure import GIB, run_isolated
from lora_ranks.check.measuring import measure_training_step
from lora_ranks.errors import LoraRanksError
from lora_ranks.ranks import AllocationSettings
from lora_ranks.settings import CheckSettings, LoRATrainingSettings
from lora_ranks.synthetic import build_tiny_qwen3


@pytest.fixture(scope="module")
def tiny(planted_pair, tmp_path_factory):
    """A tiny Qwen3 (2 layers, hidden 64, with a tokenizer) and a heterogeneous rank config of its shapes (made
    from the planted pair, which has the same shapes)."""
    root = tmp_path_factory.mktemp("check")
    model = build_tiny_qwen3(root / "model")
    analyze_checkpoints(*planted_pair, root / "ranks",
                        settings=AllocationSettings(energy_threshold=0.99, min_rank=2, max_rank=16, smoothing="none"))
    config = root / "ranks" / "configs" / "lora_rank_config.json"
    assert len(set(json.loads(config.read_text())["rank_pattern"].values())) > 1
    return str(model), str(config)


def _args(tiny, out, *extra):
    return ["check", "--model", tiny[0], "--lora-config", tiny[1], "--out", str(out), "--seq-len", "128",
            "--latency-repeats", "5", *extra]


@pytest.mark.slow
def test_budgets_that_hold_pass_and_the_report_says_what_was_measured(tiny, tmp_path, capsys, prefect_harness):
    assert main(_args(tiny, tmp_path / "ok", "--max-train-memory-gb", "64", "--max-infer-overhead", "100")) == 0
    out = capsys.readouterr().out
    assert "training peak, checkpointing on *" in out and "All budgets hold." in out
    report = json.loads((tmp_path / "ok" / "check_report.json").read_text())
    assert report["ok"] and report["failures"] == []
    predicted, measured = report["predicted"], report["inference"]
    for key in ("adapter_parameters", "parameters", "adapter_bytes", "base_bytes"):
        assert measured[key] == predicted[key], key  # float32 on the CPU: bytes follow from the config
    assert predicted["adapter_parameters"] == json.loads(open(tiny[1]).read())["trainable_parameters"]
    for gc in ("on", "off"):
        step = report["training_step"][f"gradient_checkpointing_{gc}"]
        assert step["loaded_bytes"] < step["peak_bytes"] < 64 * GIB and step["tokens_per_s"] > 0
    for key in ("base_ms", "unmerged_ms", "merged_ms"):  # timings are reported, not asserted (a loaded machine)
        assert measured[key] > 0
    for phase in ("unmerged", "merged"):  # the raw rounds are kept; the ms reported are the median ratio's round
        assert [len(t) for t in measured["rounds"][phase].values()] == [5, 5]
        assert measured[f"{phase}_ms"] / measured[f"{phase}_base_ms"] - 1 == measured[f"{phase}_overhead"]
    verdicts = {r["quantity"]: r["verdict"] for r in report["rows"]}
    assert verdicts["training peak, checkpointing on *"] == verdicts["forward, unmerged adapter"] == "ok"


def test_budgets_that_cannot_hold_fail_with_the_right_line(tiny, tmp_path, capsys, monkeypatch, prefect_harness):
    """Through the check-config flow, which fails (CheckFailed, a one-line state message); the command exits with 1.
    The measurements are given (5 GiB without checkpointing): the real ones are the test above's, and each costs a
    process of its own."""
    import tasks.check

    inference, steps = _measured(0.3)
    monkeypatch.setattr(tasks.check, "run_measurement", lambda target, settings, what, gradient_checkpointing=False:
                        inference if what == "inference" else steps[gradient_checkpointing])
    code = main(_args(tiny, tmp_path / "bad", "--max-train-memory-gb", "0.001", "--no-gradient-checkpointing"))
    captured = capsys.readouterr()
    assert code == 1
    assert "training peak, checkpointing off *" in captured.out  # the table is shown, the mode training uses marked
    assert f"Report:   {tmp_path / 'bad' / 'check_report.json'}" in captured.out
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("lora-ranks: check failed: training peak, checkpointing off: ")
    assert error.endswith("checkpointing off: 5.00 GiB, budget <= 0.001 GiB")
    report = json.loads((tmp_path / "bad" / "check_report.json").read_text())
    assert not report["ok"] and len(report["failures"]) == 1


def _measured(unmerged_overhead: float) -> tuple[InferenceMeasurement, dict[bool, StepMeasurement]]:
    """An inference measurement and training steps, typed as ``run_measurement`` returns them (for ``assess``)."""
    inference = {"adapter_parameters": 10, "parameters": 110, "adapter_bytes": 40, "adapter_dtype": "float32",
                 "base_bytes": 400, "dtype": "float32", "device_name": "cpu (test)", "base_ms": 10.0,
                 "unmerged_ms": 10.0 * (1 + unmerged_overhead), "unmerged_base_ms": 10.0,
                 "unmerged_overhead": unmerged_overhead, "merged_ms": 10.0, "merged_base_ms": 10.0, "merged_overhead": 0.0}
    step = {"peak_bytes": 3 * GIB, "loaded_bytes": GIB, "peak_covers": "the training steps", "step_seconds": 1.0,
            "tokens_per_s": 100.0}
    return InferenceMeasurement(**inference), {True: StepMeasurement(**step),
                                                              False: StepMeasurement(**{**step, "peak_bytes": 5 * GIB})}


@pytest.mark.parametrize("budgets, failures", [
    (dict(max_train_memory_gb=4, max_infer_overhead=0.5), []),
    (dict(max_train_memory_gb=2, max_infer_overhead=0.5), ["training peak, checkpointing on: 3.00 GiB, budget <= 2 GiB"]),
    (dict(max_train_memory_gb=4, max_infer_overhead=0.05), ["forward, unmerged adapter: +30.0%, budget <= +5.0%"]),
])
def test_each_budget_is_an_assertion_on_its_line(tiny, budgets, failures):
    """The verdicts from given measurements: the memory budget applies to the checkpointing training uses (on: 3
    GiB; off would be 5), the latency budget to the unmerged adapter (+30%)."""
    from lora_ranks.check import assess, predict_sizes

    target = Target(*tiny, "cpu")
    settings = CheckSettings(seq_len=128, **budgets)
    inference, steps = _measured(0.3)
    report = assess(target, settings, LoRATrainingSettings(), predict_sizes(target), inference, steps)
    assert report.failures == failures and report.ok == (not failures)
    verdicts = {r.quantity: r.verdict for r in report.rows}
    assert verdicts["training peak, checkpointing on *"] == ("FAIL" if "training" in str(failures) else "ok")
    assert verdicts["training peak, checkpointing off"] == ""  # not the mode training uses: shown, not asserted
    assert verdicts["forward, unmerged adapter"] == ("FAIL" if "forward" in str(failures) else "ok")


def test_the_ms_beside_each_overhead_are_the_round_it_was_computed_from(tiny):
    """Given rounds whose separate medians disagree with the median ratio (unmerged: medians 12.55 vs 10.5 ms,
    +19.5%; median ratio +30%): each row's adapter / base ms give its printed percentage, in the table and in
    markdown, and the JSON report keeps the raw rounds."""
    import re

    from lora_ranks.check import assess, markdown_table, predict_sizes
    from lora_ranks.check.measure import latency_figures

    rounds = {"unmerged": {"base_ms": [10.0, 12.0, 11.0, 9.0], "adapter_ms": [13.0, 18.0, 12.1, 9.9]},  # x1.3, 1.5, 1.1, 1.1
              "merged": {"base_ms": [10.0, 12.0, 11.0, 9.0], "adapter_ms": [9.5, 12.0, 11.55, 8.1]}}  # x.95, 1, 1.05, .9
    inference = _measured(0.0)[0].model_copy(update=latency_figures(rounds))
    target = Target(*tiny, "cpu")
    report = assess(target, CheckSettings(seq_len=128, max_infer_overhead=0.5), LoRATrainingSettings(),
                    predict_sizes(target), inference, _measured(0.0)[1])
    assert report.to_json()["inference"]["rounds"] == rounds  # check_report.json holds the raw per-round times
    assert report.inference.base_ms == 10.5  # the base row: the median of all 8 base rounds
    row = re.compile(r"forward, (unmerged|merged) adapter\s*\|?\s*([+-]\d+\.\d)% \((\d+\.\d\d) vs (\d+\.\d\d) ms\)")
    for text in (format_table(report), markdown_table(report)):
        found = {m[1]: (float(m[2]), float(m[3]), float(m[4])) for m in row.finditer(text)}
        assert found == {"unmerged": (30.0, 13.0, 10.0), "merged": (0.0, 12.0, 12.0)}, text
        for percent, adapter_ms, base_ms in found.values():
            assert round(100 * (adapter_ms / base_ms - 1), 1) == percent
    assert re.search(r"forward, base\s+10\.50 ms \(median of all rounds\)", format_table(report))


def test_running_out_of_memory_in_the_mode_training_uses_fails_without_a_budget(tiny):
    from lora_ranks.check import assess, predict_sizes

    target = Target(*tiny, "cpu")
    inference, steps = _measured(0.3)
    oom = StepMeasurement(out_of_memory="CUDA out of memory", peak_bytes=0, peak_covers="loading")
    report = assess(target, CheckSettings(seq_len=128), LoRATrainingSettings(), predict_sizes(target), inference,
                    {True: oom, False: steps[False]})
    assert report.failures == ["training peak, checkpointing on: out of memory (CUDA out of memory)"]
    report = assess(target, CheckSettings(seq_len=128), LoRATrainingSettings(), predict_sizes(target), inference,
                    {True: steps[True], False: oom})  # only the mode training does not use ran out: informative
    assert report.ok


@pytest.mark.slow
def test_gradient_checkpointing_lowers_the_peak_of_a_deep_model(tmp_path):
    """Each setting in its own process; 8 layers x 4 x 512 tokens hold ~300 MiB of activations without it."""
    model = build_tiny_qwen3(tmp_path / "deep", hidden_size=128, intermediate_size=384, num_layers=8)
    analyze_checkpoints(model, model, tmp_path / "ranks")
    target = Target(str(model), str(tmp_path / "ranks" / "configs" / "lora_rank_config.json"), "cpu")
    on, off = (run_isolated(measure_training_step, target, 4, 512, gc) for gc in (True, False))
    assert on["peak_bytes"] < off["peak_bytes"] - 100 * 2**20, (on, off)
    assert on["peak_covers"] == off["peak_covers"] == "the training steps (weights resident)"  # VmHWM was reset


def test_a_measurement_runs_in_its_own_process_and_its_death_is_reported():
    assert run_isolated(_pid)["pid"] != os.getpid()
    died = run_isolated(_die)
    assert died == {"impossible": "the measuring process died: killed by signal 9 (out of memory?)"}
    with pytest.raises(LoraRanksError, match="raised in the child"):
        run_isolated(_raise)


def test_out_of_memory_is_told_by_the_exception_type():
    """CUDA's ``torch.OutOfMemoryError`` and ``MemoryError`` count whatever they say; a RuntimeError that merely
    mentions memory does not. Torch's CPU allocator refuses with a plain RuntimeError (no subclass): the real one
    counts, and also when torch gives it a type one day."""
    import torch

    from lora_ranks.check.measuring import _first_line, _is_out_of_memory

    assert _is_out_of_memory(torch.OutOfMemoryError("Tried to allocate 2.00 GiB")) and _is_out_of_memory(MemoryError())
    assert not _is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (out of memory?)"))
    assert not _is_out_of_memory(ValueError("DefaultCPUAllocator: can't allocate memory"))
    with pytest.raises(RuntimeError) as refused:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: more than any address space
    assert _is_out_of_memory(refused.value)
    assert _first_line(MemoryError()) == "MemoryError"  # a bare MemoryError still makes a one-line result


def _pid() -> dict:
    return {"pid": os.getpid()}


def _die() -> dict:
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def _raise() -> dict:
    raise LoraRanksError("raised in the child")


def test_without_bitsandbytes_a_quantized_check_says_so_instead_of_guessing(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails, as where it cannot load
    report = check_rank_config(*tiny, CheckSettings(seq_len=128, max_train_memory_gb=10),
                               LoRATrainingSettings(quantization="4bit"))
    assert not report.ok
    table = format_table(report)
    assert "4bit quantization needs bitsandbytes, which cannot load here" in table
    assert report.failures == [f"training peak, checkpointing on: not measured ({report.rows[4].value}), "
                               "budget <= 10 GiB"]
    assert report.predicted.base_bytes is None  # a packed base is not predicted either
    unasserted = check_rank_config(*tiny, CheckSettings(seq_len=128), LoRATrainingSettings(quantization="4bit"))
    assert unasserted.ok and "not measured" in format_table(unasserted)


@pytest.mark.parametrize("extra, message", [
    (["--batch", "0"], "--batch 0: input should be greater than or equal to 1"),
    (["--seq-len", "0"], "--seq-len 0: input should be greater than or equal to 1"),
    (["--max-train-memory-gb", "-2"], "--max-train-memory-gb -2: input should be greater than 0"),
    (["--max-infer-overhead", "0"], "--max-infer-overhead 0: input should be greater than 0"),
    (["--device", "cuda:7"], "device cuda:7 is not available here"),
    (["--device", "npu"], "--device npu: device must be cpu, cuda or cuda:N"),
    (["--seq-len", "4096"], "seq_len 4096 is longer than the context of"),
])
def test_bad_input_is_one_line_before_anything_is_built(tiny, tmp_path, capsys, extra, message):
    args = _args(tiny, tmp_path / "never", *extra)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "never").exists()


def test_a_config_naming_modules_the_model_lacks_is_refused_with_the_list(tiny, tmp_path, capsys):
    shallow = build_tiny_qwen3(tmp_path / "one-layer", num_layers=1)
    capsys.readouterr()  # the model's own writing
    assert main(["check", "--model", str(shallow), "--lora-config", tiny[1], "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rank config does not fit the model: 7 problem(s)" in err[0]
    assert "model.layers.1.self_attn.q_proj: no such module in the model" in err[0]
    assert not (tmp_path / "never").exists()
