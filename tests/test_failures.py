"""Failures that read well: hostile input through the CLI as a user types it, no retries of deterministic errors,
no tracebacks for user errors, every header problem listed at once."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_ranks.checkpoints import CheckpointError, CheckpointPair
from lora_ranks.errors import is_transient, is_user_error
from lora_ranks.synthetic import write_planted_pair

REPO = Path(__file__).resolve().parents[1]
TARGET = "model.layers.1.self_attn.o_proj.weight"


class _NeverRun(AssertionError):
    """A flow's command got past its preflight (the ``cli`` fixture's run stands in for it)."""


@pytest.fixture
def cli(capsys, monkeypatch):
    """``cli(*args)``: the command line in this process (``flows.cli.main``), for input that its preflight must
    refuse: a flow's command never reaches its run (``run_command`` fails the test), so Prefect never started; the
    others (extract, export) refuse in their library call, before it writes anything. Returns a
    ``CompletedProcess`` with the exit status and what was printed. (A command's own process, as a user runs it:
    tests/test_imports.py, test_reliability's analyze-then-extract and the failing run below.)"""
    import flows.cli
    from flows.cli.commands import FLOW_OF

    real_run = flows.cli.run_command

    def run_unless_a_flow(command, inputs, settings):
        if command in FLOW_OF:
            raise _NeverRun(f"{command} got past its preflight: it would have started Prefect and run its flow")
        return real_run(command, inputs, settings)

    monkeypatch.setattr(flows.cli, "run_command", run_unless_a_flow)
    monkeypatch.setenv("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")  # main sets it; keep it to this test

    def run(*args):
        capsys.readouterr()
        argv = [str(a) for a in args]
        status = flows.cli.main(argv)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, status, out, err)

    return run


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


def _rewrite(folder: Path, change) -> Path:
    tensors = _tensors(folder)
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _hostile(kind: str, pair: tuple[Path, Path], root: Path) -> Path:
    """A copy of the fine-tuned checkpoint with one kind of damage."""
    ft = Path(shutil.copytree(pair[1], root / kind))
    if kind == "missing":
        return _rewrite(ft, lambda t: t.pop(TARGET))
    if kind == "shape":
        return _rewrite(ft, lambda t: t.update({TARGET: t[TARGET][:, :-1].contiguous()}))
    if kind == "two-problems":
        return _rewrite(ft, lambda t: (t.pop(TARGET), t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)})))
    if kind == "quantized":
        return _rewrite(ft, lambda t: t.update({TARGET: t[TARGET].to(torch.int8)}))
    if kind == "truncated":
        data = (ft / "model.safetensors").read_bytes()
        (ft / "model.safetensors").write_bytes(data[: len(data) - 4096])
        return ft
    if kind == "pickle-only":
        torch.save(_tensors(ft), ft / "pytorch_model.bin")
        (ft / "model.safetensors").unlink()
        return ft
    if kind == "nan":
        return _rewrite(ft, lambda t: t[TARGET].__setitem__((3, 5), float("nan")))
    raise ValueError(kind)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return write_planted_pair(root / "base", root / "ft", planted_rank=(3, 8), noise=1e-3)


def _assert_one_line_error(done, *fragments, only_line=True):
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-4000:]
    output = (done.stdout + done.stderr).strip().splitlines()
    assert "Traceback" not in done.stdout + done.stderr
    assert "Retry" not in done.stdout + done.stderr
    assert output[-1].startswith("lora-ranks: error: "), output[-5:]
    for fragment in fragments:
        assert fragment in output[-1], output[-1]
    if only_line:
        assert done.stdout.strip() == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize("kind,fragments", [
    ("missing", [f"tensor {TARGET!r} is missing from the fine-tuned checkpoint"]),
    ("shape", [f"tensor {TARGET!r} has shape (64, 64) in the base but (64, 63)"]),
    ("two-problems", ["2 problem(s)", "is missing from the fine-tuned", "model.layers.0.mlp.up_proj.weight' has shape"]),
    ("quantized", ["is stored as I8 in the fine-tuned checkpoint", "dequantize"]),
    ("truncated", ["cannot read safetensors file", "truncated or corrupt"]),
    ("pickle-only", ["holds only pickle-based weights", "--allow-pickle"]),
])
def test_header_problems_end_the_cli_before_prefect_starts(cli, pair, tmp_path, kind, fragments):
    finetuned = _hostile(kind, pair, tmp_path)
    done = cli("analyze", "--base", pair[0], "--finetuned", finetuned, "--out", tmp_path / "out")
    _assert_one_line_error(done, *fragments)
    assert not (tmp_path / "out" / "configs").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


BAD_OPTIONS = [
    (["--energy", "1.5"], ["--energy-threshold 1.5: input should be less than or equal to 1"]),
    (["--energy-threshold", "0"], ["--energy-threshold 0: input should be greater than 0"]),
    (["--min-rank", "16", "--max-rank", "8"], ["--max-rank (8) must be at least --min-rank (16)"]),
    (["--min-rank", "0"], ["--min-rank 0: input should be greater than or equal to 1"]),
    (["--budget", "-5"], ["--budget -5: input should be greater than 0"]),
    (["--smoothing", "gauss"], ["argument --smoothing: invalid choice: 'gauss'", "median"]),
    (["--smoothing-window", "2"], ["--smoothing-window must be odd"]),
    (["--max-rank", "lots"], ["--max-rank lots: input should be a valid integer"]),
    (["--device", "tpu"], ["--device tpu: device must be cpu, cuda or cuda:N"]),
    (["--noise-estimate", "split-half"], ["noise_estimate 'split-half' needs the fine-tuning data (--data, data_path)"]),
]
"""(options after ``analyze --base b --finetuned f --out DIR``, fragments of the one line that refuses them)"""

# Every case of BAD_OPTIONS in one process (a process per case cost ~0.4 CPU-seconds each), its output captured per
# case, and the heavy packages imported so far noted after each.
_REFUSE_EACH = """
import contextlib, io, json, sys
from flows.cli import main
results = []
for args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(args)
        except SystemExit as exc:
            status = exc.code
    heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'prefect', 'transformers'})
    results.append([status, out.getvalue(), err.getvalue(), heavy])
print(json.dumps(results))
"""


def test_bad_options_are_one_line_without_loading_torch_or_prefect(tmp_path):
    """Options are validated first: one line, exit 2, and neither torch nor Prefect was even imported."""
    argvs = [["analyze", "--base", "b", "--finetuned", "f", "--out", str(tmp_path), *args] for args, _ in BAD_OPTIONS]
    done = subprocess.run([sys.executable, "-c", _REFUSE_EACH, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert len(results) == len(BAD_OPTIONS)
    for (args, fragments), (status, out, err, heavy) in zip(BAD_OPTIONS, results):
        assert status == 2 and out == "", (args, status, out, err)
        assert heavy == [], (args, heavy)  # validated before any heavy import
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lora-ranks: error: "), (args, err)
        for fragment in fragments:
            assert fragment in lines[0], (args, lines[0])


def test_nan_weights_are_found_before_prefect_starts_and_nothing_is_written(cli, pair, tmp_path):
    finetuned = _hostile("nan", pair, tmp_path)
    done = cli("analyze", "--base", pair[0], "--finetuned", finetuned, "--out", tmp_path / "out")
    _assert_one_line_error(done, f"tensor {TARGET!r}", "contains NaN or Inf")
    assert not (tmp_path / "out").exists()  # not even the good layers' files


# Runs the real command line, with its preflight switched off so that the failure comes from inside the flow run
# (a NaN found by the analyze-layer task): what the terminal shows when a run fails in Prefect.
_FAILING_RUN = """
import sys
import flows.cli as cli
cli.run_preflight = lambda *args: None
sys.exit(cli.main())
"""


@pytest.mark.slow
def test_a_failing_flow_prints_no_prefect_internals(pair, tmp_path):
    """Prefect's temporary server used to print ~140 lines of its own tracebacks (a cancelled event flush) after
    about one failing run in three, sometimes after the error line. The command now drops what its server prints
    once it stops it (test_interrupts checks that with a child that always prints then); here the real command, in
    its own process with its own temporary server: the error is always the last line, with no traceback. (--debug
    bringing the traceback back: the next test.)"""
    finetuned = _hostile("nan", pair, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_SERVER_LOGGING_LEVEL")}
    done = subprocess.run([sys.executable, "-c", _FAILING_RUN, "analyze", "--base", str(pair[0]),
                           "--finetuned", str(finetuned), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    text = done.stdout + done.stderr
    assert done.returncode == 2, text[-3000:]
    assert "Finished in state Failed" in done.stderr  # the failure came from inside the flow run
    for internal in ("Traceback", "CancelledError", "Error flushing", "task_run_recorder"):
        assert internal not in text, f"{internal!r} in\n{text[-3000:]}"
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("lora-ranks: error: ") and "contains NaN or Inf" in last, last


def test_debug_brings_the_traceback_of_a_user_error_back(pair, tmp_path, capsys, monkeypatch):
    """A user error is one line; with --debug the same failure also prints its traceback (exit status 2 both ways)."""
    import flows.cli

    def fails(command, inputs, settings):
        raise CheckpointError(f"tensor {TARGET!r} contains NaN or Inf (injected)")

    monkeypatch.setattr(flows.cli, "run_command", fails)
    monkeypatch.setenv("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
    monkeypatch.delenv("LORA_RANKS_DEBUG", raising=False)  # --debug sets it
    argv = ["analyze", "--base", str(pair[0]), "--finetuned", str(pair[1]), "--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert flows.cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines() == [
        f"lora-ranks: error: tensor {TARGET!r} contains NaN or Inf (injected)"]
    assert flows.cli.main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "CheckpointError" in err
    assert err.strip().splitlines()[-1].startswith("lora-ranks: error: ")



def test_identical_checkpoints_are_refused_before_prefect_starts(cli, pair, tmp_path):
    """The same folder twice, or a copy of the base given as the fine-tuned model: nothing was fine-tuned, and the
    user is told so at once (the library still analyzes such a pair, with a warning: tests/test_reliability.py)."""
    done = cli("analyze", "--base", pair[0], "--finetuned", pair[0], "--out", tmp_path / "out")
    _assert_one_line_error(done, "are the same folder")
    copy = shutil.copytree(pair[0], tmp_path / "copy")
    done = cli("analyze", "--base", pair[0], "--finetuned", copy, "--out", tmp_path / "out")
    _assert_one_line_error(done, "are identical in all 14 analyzed modules", "nothing was fine-tuned")
    assert not (tmp_path / "out").exists()


def test_a_config_naming_modules_the_model_lacks_is_refused_before_training(cli, pair, tmp_path):
    from lora_ranks.analysis import analyze_checkpoints
    from lora_ranks.synthetic import write_synthetic_dataset

    analyze_checkpoints(*pair, tmp_path / "an")
    config = tmp_path / "an" / "configs" / "lora_rank_config.json"
    other = write_planted_pair(tmp_path / "b1", tmp_path / "f1", num_layers=1, hidden_size=32, num_heads=2,
                               num_kv_heads=1, intermediate_size=64)
    data = write_synthetic_dataset(tmp_path / "d.jsonl", 2)
    done = cli("train", "--model", other[0], "--lora-config", config, "--data", data, "--out", tmp_path / "t")
    _assert_one_line_error(done, "rank config does not fit the model", "model.layers.1.self_attn.q_proj: no such module")
    done = cli("extract", "--base", other[0], "--finetuned", other[1], "--config", config, "--out", tmp_path / "x")
    _assert_one_line_error(done, "rank config does not fit the checkpoints")
    assert not (tmp_path / "t").exists() and not (tmp_path / "x").exists()


def test_bad_records_are_named_before_training(cli, pair, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine", "task": "a"}\n{"oops": 1}\n')
    done = cli("finetune", "--model", pair[0], "--data", data, "--out", tmp_path / "o")
    _assert_one_line_error(done, f"{data}:2")


def test_bad_held_out_records_are_named_before_any_analysis(cli, pair, tmp_path):
    """compare reads --eval-data only after the analysis: a missing or broken file must end the command first."""
    from lora_ranks.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "d.jsonl", 8)
    broken = tmp_path / "eval.jsonl"
    broken.write_text('{"text": "fine", "task": "a"}\n{"oops": 1}\n')
    for eval_data, fragment in ((tmp_path / "missing.jsonl", "missing.jsonl does not exist"), (broken, f"{broken}:2")):
        done = cli("compare", "--model", pair[0], "--finetuned", pair[1], "--data", data, "--eval-data", eval_data,
                    "--out", tmp_path / "cmp")
        _assert_one_line_error(done, fragment)
    assert not (tmp_path / "cmp").exists()


def test_preflight_lists_every_problem_at_once(pair, tmp_path):
    finetuned = _hostile("two-problems", pair, tmp_path)
    with pytest.raises(CheckpointError) as err:
        CheckpointPair(pair[0], finetuned).preflight()
    message = str(err.value)
    assert "2 problem(s)" in message and "\n" not in message
    assert TARGET in message and "model.layers.0.mlp.up_proj.weight" in message


# -- what is retried ----------------------------------------------------------------------------------------
class _State:
    def __init__(self, exc):
        self.exc = exc

    def result(self):
        raise self.exc


@pytest.mark.parametrize("exc,retried", [
    (CheckpointError("bad tensor"), False),
    (ValueError("a bug or a bad value"), False),
    (RuntimeError("a bug"), False),
    (FileNotFoundError(2, "No such file"), False),
    (PermissionError(13, "denied"), False),
    (OSError(5, "Input/output error"), True),  # EIO on network storage
    (OSError(116, "Stale file handle"), True),  # ESTALE
    (TimeoutError("read timed out"), True),
    (ConnectionResetError("peer reset"), True),
    (torch.OutOfMemoryError("CUDA out of memory"), True),
])
def test_only_transient_failures_are_retried(exc, retried):
    from tasks._common import retry_if_transient

    assert is_transient(exc) is retried
    assert retry_if_transient(None, None, _State(exc)) is retried


def test_validation_errors_are_user_errors():
    from pydantic import ValidationError

    from lora_ranks.settings import AllocationSettings

    with pytest.raises(ValidationError) as err:
        AllocationSettings(energy_threshold=2)
    assert is_user_error(err.value) and not is_transient(err.value)


@pytest.mark.slow
def test_a_deterministic_layer_failure_is_not_retried(pair, tmp_path, monkeypatch, task_states):
    import lora_ranks.analysis.layer as T  # the step the plan runs
    from flows.svd_analysis import svd_analysis

    def broken(pair_, modules, *args, **kwargs):
        raise CheckpointError(f"tensor of {modules[0].layer} is damaged (injected)")

    monkeypatch.setattr(T, "analyze_layer", broken)
    state = svd_analysis(base_model=str(pair[0]), finetuned_model=str(pair[1]), output_dir=str(tmp_path), refresh=True,
                         return_state=True)
    assert state.is_failed()
    assert "damaged (injected)" in state.message
    states = task_states(state)
    assert states["analyze-model.layers.0"] == [("Failed", 1)]  # one run: no retry of a deterministic error


# -- tracebacks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exc,debug,kept", [
    (CheckpointError("bad"), False, False),
    (CheckpointError("bad"), True, True),
    (RuntimeError("a bug"), False, True),
])
def test_engine_logs_drop_the_traceback_of_user_errors_only(exc, debug, kept, monkeypatch):
    from tasks._common import install_traceback_filter

    install_traceback_filter()
    monkeypatch.setenv("LORA_RANKS_DEBUG", "1" if debug else "0")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    logger = logging.getLogger("prefect.task_runs")
    handler = Keep()
    logger.addHandler(handler)
    try:
        try:
            raise exc
        except Exception:
            logger.error("Task run failed with exception: %r", exc, exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 1 and seen[0].getMessage().startswith("Task run failed")
    assert (seen[0].exc_info is not None) is kept


def test_the_temporary_servers_own_logs_stay_off_the_terminal(monkeypatch, tmp_path, capsys):
    """The command line gives Prefect's temporary server (a subprocess that inherits the terminal and the
    environment) a logging level at which its services' errors, such as an event flush cancelled at shutdown, and
    uvicorn's are not printed; the flow and task run loggers still are. --debug leaves the server's level alone."""
    from flows.cli import main

    monkeypatch.delenv("PREFECT_SERVER_LOGGING_LEVEL", raising=False)
    assert main(["analyze", "--base", "b", "--finetuned", "f", "--out", str(tmp_path), "--min-rank", "0"]) == 2
    level = os.environ["PREFECT_SERVER_LOGGING_LEVEL"]
    probe = ("import logging\nfrom prefect.logging.configuration import setup_logging\nsetup_logging()\n"
             "names = ['prefect.server.services.task_run_recorder', 'prefect.server.events.services.event_persister', "
             "'uvicorn.error', 'prefect.flow_runs', 'prefect.task_runs']\n"
             "print([logging.getLogger(n).isEnabledFor(logging.ERROR) for n in names])")
    env = {**os.environ, "PREFECT_SERVER_LOGGING_LEVEL": level}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert done.stdout.strip() == "[False, False, False, True, True]", done.stderr
    monkeypatch.delenv("PREFECT_SERVER_LOGGING_LEVEL")
    main(["--debug", "analyze", "--base", "b", "--finetuned", "f", "--out", str(tmp_path), "--min-rank", "0"])
    assert "PREFECT_SERVER_LOGGING_LEVEL" not in os.environ
    monkeypatch.delenv("LORA_RANKS_DEBUG", raising=False)
    capsys.readouterr()
