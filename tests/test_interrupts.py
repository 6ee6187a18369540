"""^C and SIGTERM in the middle of a command, sent as a terminal or a supervisor sends them (to the process group, or
to the process alone): one line, ``lora-ranks: interrupted``, exit 130 / 143 within 10 s, no traceback, every process
the command started gone (checked by PID), and no staging folder or temporary file left behind."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The demo's base (with its tokenizer), demo records, a uniform rank-2 config of it."""
    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.config import save_rank_config
    from lora_ranks.evidence.experiment import config_from_ranks, uniform_ranks
    from lora_ranks.synthetic import DEMO_BASE, write_synthetic_dataset

    root = tmp_path_factory.mktemp("interrupts")
    data = write_synthetic_dataset(root / "data.jsonl", 16)
    modules = CheckpointPair(DEMO_BASE, DEMO_BASE).modules()
    config = save_rank_config(root / "uniform.json", config_from_ranks(modules, uniform_ranks(modules, 2), 10**6))
    return root, str(DEMO_BASE), str(data), str(config)


def _interrupt(args: list[str], cwd: Path, ready: str, sig: int, *, group: bool, server: bool = True,
               child: str | None = None, children: int = 1, then: int | None = None) -> tuple[int, float, str]:
    """Start ``lora-ranks ARGS`` in a process group of its own (as a shell job), wait until its stderr matches
    ``ready`` (and, with ``child``, until ``children`` processes it started have a command line matching it), note every process
    it started, send ``sig`` (to the group or the process; with ``then``, that signal too 0.3 s later, as an
    impatient user's second ^C), and check that all of them are gone. Returns (exit status, seconds from the signal
    to the exit, stderr)."""
    exe = Path(sys.executable).with_name("lora-ranks")
    err_path = cwd / f"stderr-{time.monotonic_ns()}.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([str(exe), *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not re.search(ready, err_path.read_text()) or (child and sum(
                bool(re.search(child, " ".join(p.cmdline()))) for p in psutil.Process(proc.pid).children(recursive=True))
                < children):
            assert proc.poll() is None, f"ended before {ready!r}: {err_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"never reached {ready!r}: {err_path.read_text()[-3000:]}"
            time.sleep(0.2)
        started = psutil.Process(proc.pid).children(recursive=True)
        if server:  # the case the issue found: Prefect's temporary server under the flow
            assert any("uvicorn" in " ".join(p.cmdline()) for p in started), [p.cmdline() for p in started]
        sent = time.monotonic()
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        if then is not None:
            time.sleep(0.3)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, then) if group else proc.send_signal(then)
        status = proc.wait(timeout=10)
        seconds = time.monotonic() - sent
        _, alive = psutil.wait_procs(started, timeout=5)
        assert not alive, f"left running: {[(p.pid, p.cmdline()) for p in alive]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return status, seconds, err_path.read_text()


def _assert_clean(status: int, stderr: str, sig: int, out: Path) -> None:
    from lora_ranks.locks import lock_file

    assert status == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}[sig], stderr[-3000:]
    assert not lock_file(out).exists()  # released, and its file removed
    assert "Traceback" not in stderr and "Error" not in stderr and "ERROR" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "lora-ranks: interrupted", stderr[-3000:]
    near = [*out.rglob("*"), *out.parent.glob(f".{out.name}*")] if out.exists() else [*out.parent.glob(f".{out.name}*")]
    left = [p for p in near if ".lora-ranks-" in p.name or p.name.endswith(".tmp")]
    assert not left, left


def test_train_on_sigterm_to_the_process(setting):
    root, base, data, config = setting
    out = root / "train"
    status, seconds, stderr = _interrupt(["train", "--model", base, "--lora-config", config, "--data", data, "--out",
                                          str(out), "--init", "cold", "--max-steps", "500", "--batch-size", "2"],
                                         root, r"\d+/\d+ \[", signal.SIGTERM, group=False)
    _assert_clean(status, stderr, signal.SIGTERM, out)
    assert seconds < 10


# The check's CPU measurements run in processes forked from a fork server (lora_ranks.check.measure): the server and
# one measuring process share its command line.
_MEASURING = "multiprocessing.forkserver"


def test_check_on_sigterm_to_its_group_stops_the_measuring_worker(setting):
    root, base, _, config = setting
    out = root / "check"
    status, seconds, stderr = _interrupt(["check", "--model", base, "--lora-config", config, "--out", str(out),
                                          "--latency-repeats", "10000", "--seq-len", "64"], root,
                                         r"check-inputs-\w+' - Finished", signal.SIGTERM, group=True,
                                         child=_MEASURING, children=2)
    _assert_clean(status, stderr, signal.SIGTERM, out)
    assert seconds < 10


def test_analyze_on_ctrl_c_at_the_terminal(setting, planted_pair):
    """^C at a terminal reaches the command's whole process group (its temporary Prefect server included)."""
    root = setting[0]
    out = root / "analyze"
    status, seconds, stderr = _interrupt(["analyze", "--base", str(planted_pair[0]), "--finetuned",
                                          str(planted_pair[1]), "--out", str(out)], root,
                                         r"Created task run|Beginning|discover", signal.SIGINT, group=True)
    _assert_clean(status, stderr, signal.SIGINT, out)
    assert seconds < 10


def test_export_in_the_middle_of_writing_when_the_terminal_closes(setting, tmp_path):
    """export runs no flow: hung up (SIGHUP, the terminal closed) while it writes its staging folder (slowed down
    here, so the signal lands there), it ends in one line with 129 and leaves no staging folder."""
    root, base, data, config = setting
    from lora_ranks.extract import extract_lora
    from lora_ranks.synthetic import write_planted_pair

    pair = write_planted_pair(tmp_path / "b", tmp_path / "f", planted_rank=2)
    from lora_ranks.analysis import analyze_checkpoints
    from lora_ranks.settings import AllocationSettings

    analyze_checkpoints(*pair, tmp_path / "run", settings=AllocationSettings(min_rank=1, max_rank=8))
    adapter = extract_lora(*pair, tmp_path / "run" / "configs" / "lora_rank_config.json", tmp_path / "adapter")
    assert adapter
    slow = tmp_path / "slow_export.py"  # the real command, with a pause inside the staging block
    slow.write_text("import sys, time\nimport lora_ranks._io as io\nreal = io.atomic_write_json\n"
                    "def paused(path, obj):\n    real(path, obj)\n    print('writing', file=sys.stderr, flush=True)\n"
                    "    time.sleep(60)\n"
                    "io.atomic_write_json = paused\nimport lora_ranks.export as export\nexport.atomic_write_json = paused\n"
                    "from flows.cli import main\nsys.argv[0] = 'lora-ranks'\nsys.exit(main())\n")
    exe = Path(sys.executable)
    proc = subprocess.Popen([str(exe), str(slow), "export", str(tmp_path / "adapter"), "--out", str(tmp_path / "exp")],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    line = ""
    while "writing" not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()
        assert line or proc.poll() is None
    os.killpg(proc.pid, signal.SIGHUP)
    status = proc.wait(timeout=10)
    rest = proc.stderr.read()
    _assert_clean(status, rest, signal.SIGHUP, tmp_path / "exp")
    assert not (tmp_path / "exp").exists()
    assert not [p for p in tmp_path.iterdir() if ".lora-ranks-" in p.name or p.name.endswith(".tmp")]


# A command (interrupts installed, as the command line does) with one child started as Prefect's temporary server is
# (``_own_session``), which prints "child ready"; then it either stops the child as a finished command stops its
# server (``silence_children``, then SIGTERM; then its last line) or waits to be signalled.
_COMMAND_WITH_A_CHILD = """
import signal, subprocess, sys, time
from flows import interrupts
interrupts.install()
child = interrupts._own_session(subprocess.Popen)([sys.executable, "-c", sys.argv[1]])
if sys.argv[2] == "finish":
    while "ready" not in open(sys.argv[3]).read():
        time.sleep(0.05)
    interrupts.silence_children()
    child.terminate()
    child.wait()
    print("the last line", file=sys.stderr, flush=True)
else:
    time.sleep(60)
"""

# Prints as it is stopped (as the server logs the requests its shutdown cancels) ...
_PRINTS_WHEN_STOPPED = """
import signal, sys, time
def stopped(*_):
    print("ERROR logged while being stopped", file=sys.stderr, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stopped)
print("child ready", file=sys.stderr, flush=True)
time.sleep(60)
"""
# ... or ignores SIGTERM (as multiprocessing's resource tracker does): its stop takes the whole grace period.
_IGNORES_SIGTERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("child ready", file=sys.stderr, flush=True)
time.sleep(60)
"""


def _command_with_a_child(tmp_path, child: str, then: str, signals=()) -> tuple[int, str, list]:
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _COMMAND_WITH_A_CHILD, child, then, str(err_path)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while "child ready" not in err_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.05)
        started = psutil.Process(proc.pid).children(recursive=True)
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.3)
        status = proc.wait(timeout=10)
        _, alive = psutil.wait_procs(started, timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for child in started:  # whatever the test found left running (the child is in a session of its own)
            with contextlib.suppress(psutil.Error):
                child.kill()
    return status, err_path.read_text(), alive


def test_what_an_isolated_child_prints_while_being_stopped_stays_off_the_terminal(tmp_path):
    """Prefect's temporary server logs the requests it cancels when it is stopped (an SQLAlchemy traceback, seen in
    CI after the one line): a child in a session of its own prints through the command, so what it prints before
    reaches the terminal, and what it prints while the command stops it does not, interrupted or finished."""
    status, stderr, alive = _command_with_a_child(tmp_path, _PRINTS_WHEN_STOPPED, "wait", [signal.SIGINT])
    assert status == 130 and not alive
    assert stderr.split() == ["child", "ready", "lora-ranks:", "interrupted"], stderr
    status, stderr, alive = _command_with_a_child(tmp_path, _PRINTS_WHEN_STOPPED, "finish")
    assert status == 0 and not alive
    assert stderr.splitlines() == ["child ready", "the last line"], stderr


@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT)])
def test_a_second_signal_while_stopping_still_ends_the_command(tmp_path, first, second):
    """^C twice, or SIGTERM then ^C, 0.3 s apart: the second signal lands inside the first one's stop, which waits
    the grace period on a child that ignores SIGTERM (it hung there once: the nested handler waited on the first's
    lock). One line, the first signal's status, within the grace period and the kill, and the child gone."""
    status, stderr, alive = _command_with_a_child(tmp_path, _IGNORES_SIGTERM, "wait", [first, second])
    assert status == {signal.SIGINT: 130, signal.SIGTERM: 143}[first] and not alive
    assert stderr.split() == ["child", "ready", "lora-ranks:", "interrupted"], stderr


def test_a_command_killed_outright_takes_its_isolated_child_with_it(tmp_path):
    """SIGKILL gives the command no chance to stop anything: a child started as Prefect's temporary server is (in a
    session of its own, out of reach of a ^C to the group) still ends, because the kernel signals it when its parent
    dies. (That the server is started this way: the tests above, which find it among the command's processes.)"""
    status, stderr, alive = _command_with_a_child(tmp_path, _PRINTS_WHEN_STOPPED, "wait", [signal.SIGKILL])
    assert status == -signal.SIGKILL and not alive
