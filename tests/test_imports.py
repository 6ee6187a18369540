"""The library is pure: importing it must not import Prefect (tasks/flows depend on it, never the reverse)."""

import subprocess
import sys
from pathlib import Path


def test_import_lora_ranks_does_not_import_prefect():
    code = "import sys, lora_ranks, lora_ranks.analysis, lora_ranks.plots, lora_ranks.finetune, lora_ranks.data," \
           "lora_ranks.model, lora_ranks.extract, lora_ranks.train;" \
           "bad = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'));" \
           "print(bad); sys.exit(1 if bad else 0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"lora_ranks imported Prefect modules: {done.stdout} {done.stderr}"


def test_library_source_never_mentions_prefect_imports():
    root = Path(__file__).resolve().parents[1] / "lora_ranks"
    offenders = [p.name for p in root.rglob("*.py") if "import prefect" in p.read_text() or "from prefect" in p.read_text()]
    assert offenders == []


def test_cli_help_lists_subcommands():
    exe = Path(sys.executable).with_name("lora-ranks")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    done = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for sub in ("demo", "analyze", "finetune", "train", "extract"):
        assert sub in done.stdout


def _cli():
    exe = Path(sys.executable).with_name("lora-ranks")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]


def test_cli_reports_bad_input_in_one_line(tmp_path):
    done = subprocess.run(_cli() + ["extract", "--base", str(tmp_path / "missing"), "--finetuned", str(tmp_path / "ft"),
                                    "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"lora-ranks: error: rank config {tmp_path / 'c.json'} does not exist"
