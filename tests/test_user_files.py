"""Nothing of the user's is lost, with or without --overwrite (issue: a sweep of every subcommand as a new user):
--overwrite writes the tool's files into a folder and never deletes, replaces or moves one it did not write; folders
beside a path that merely look like the tool's temporary ones are never touched; a folder is the tool's only if its
marker says so; counts, seeds, ranks and alphas out of range, Prefect settings that cannot work, a full disk, a second
command on the same output and the smaller cases of the sweep each end in one line, exit 2, before any work."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from lora_ranks.analysis import analyze_checkpoints
from lora_ranks.extract import extract_lora
from lora_ranks.outputs import MARKER, RUN_ENTRIES, claim_output_dir, read_marker
from lora_ranks.settings import AllocationSettings
from lora_ranks.synthetic import write_planted_pair, write_synthetic_dataset

SETTINGS = AllocationSettings(energy_threshold=0.9, min_rank=2, max_rank=16, smoothing="none")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A planted pair (2 layers, 64 wide), its run (marked, as the command's are), rank config and adapter, data."""
    root = tmp_path_factory.mktemp("user-files")
    base, ft = write_planted_pair(root / "base", root / "ft", planted_rank=(3, 8), noise=1e-3)
    claim_output_dir(root / "run", "svd-analysis")
    analyze_checkpoints(base, ft, root / "run", settings=SETTINGS)
    extract_lora(base, ft, root / "run" / "configs" / "lora_rank_config.json", root / "adapter")
    write_synthetic_dataset(root / "data.jsonl", 4)
    return root


def _digest(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones too): sha256 of a file, "dir", or a link's target."""
    def fingerprint(p: Path) -> str:
        if p.is_symlink():
            return "link to " + str(p.readlink())
        return "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()

    return {str(p.relative_to(root)): fingerprint(p) for p in sorted(root.rglob("*"))}


def _main(argv: list) -> int:
    return main([str(a) for a in argv])


def _refused(capsys, argv: list, fragment: str, untouched: Path) -> str:
    """One line, exit 2, naming ``fragment``; nothing under ``untouched`` changed."""
    capsys.readouterr()  # what earlier commands of the test printed
    before = _digest(untouched)
    assert _main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("lora-ranks: error: "), captured.err
    assert fragment in lines[0], lines[0]
    assert _digest(untouched) == before
    return lines[0]


def _users_project(root: Path) -> Path:
    (root / "results").mkdir(parents=True)
    (root / "notes.txt").write_text("my notes\n")
    (root / "experiment.log").write_text("epoch 1\n")
    (root / "results" / "table.csv").write_text("a,b\n1,2\n")
    return root


def test_overwrite_into_a_users_folder_keeps_every_file_of_theirs(ws, tmp_path, capsys):
    config = ws / "run" / "configs" / "lora_rank_config.json"
    extract = ["extract", "--base", ws / "base", "--finetuned", ws / "ft", "--config", config]
    project = _users_project(tmp_path / "project")
    theirs = _digest(project)
    assert _main([*extract, "--out", project, "--overwrite"]) == 0
    after = _digest(project)
    assert all(after[name] == digest for name, digest in theirs.items())  # every file of theirs, byte for byte
    assert (project / "adapter_config.json").is_file() and read_marker(project)["kind"] == "folder"
    data = tmp_path / "data"  # a folder that is not even an input of extract
    data.mkdir()
    shutil.copy(ws / "data.jsonl", data / "train.jsonl")
    assert _main([*extract, "--out", data, "--overwrite"]) == 0
    assert (data / "train.jsonl").read_bytes() == (ws / "data.jsonl").read_bytes()
    # The user's model: --overwrite never replaces its config or weights (one line, before any work).
    pair = Path(shutil.copytree(ws / "ft", tmp_path / "pair" / "finetuned"))
    (pair / "notes.txt").write_text("mine\n")
    _refused(capsys, ["export", ws / "adapter", "--format", "merged", "--out", pair, "--overwrite"],
             "holds config.json, generation_config.json, model.safetensors, which this tool did not write", tmp_path)
    capsys.readouterr()


def test_overwrite_replaces_the_tools_own_files_and_removes_its_stale_ones(ws, tmp_path, capsys):
    project = _users_project(tmp_path / "project")
    assert _main(["export", ws / "adapter", "--out", project, "--overwrite"]) == 0
    files = set(read_marker(project)["files"])
    assert "export_report.json" in files and "notes.txt" not in files
    first = (project / "export_report.json").stat().st_mtime_ns
    assert _main(["export", ws / "adapter", "--out", project, "--overwrite"]) == 0  # the tool's own: replaced
    assert (project / "export_report.json").stat().st_mtime_ns != first
    assert (project / "notes.txt").read_text() == "my notes\n"
    (project / "export_report.json").write_text("edited by hand: the user's now\n")
    _refused(capsys, ["export", ws / "adapter", "--out", project, "--overwrite"],
             "holds export_report.json, which this tool did not write", tmp_path)


def test_lookalike_temporary_folders_are_never_touched(ws, tmp_path, capsys):
    """A missing path never makes the tool rename, delete or use a folder beside it named like its temporary ones."""
    backups = tmp_path / "backups"
    for name in (".model2.new", ".ft3.old", ".adapter2.old", ".adapter2.lora-ranks-0123456789ab.new",
                 ".adapter2.lora-ranks-0123456789ab.old"):
        shutil.copytree(ws / "ft", backups / name)
        (backups / name / "notes.txt").write_text("a backup of mine\n")
    _refused(capsys, ["analyze", "--base", backups / "model2", "--finetuned", ws / "ft", "--out", tmp_path / "o"],
             "does not exist", tmp_path)
    _refused(capsys, ["analyze", "--base", ws / "base", "--finetuned", backups / "ft3", "--out", tmp_path / "o"],
             "does not exist", tmp_path)
    _refused(capsys, ["train", "--model", backups / "model2", "--lora-config", ws / "run/configs/lora_rank_config.json",
                      "--data", ws / "data.jsonl", "--out", tmp_path / "o"], "does not exist", tmp_path)
    before = _digest(backups)
    assert _main(["export", ws / "adapter", "--out", backups / "adapter2"]) == 0
    capsys.readouterr()
    after = _digest(backups)
    assert {k: v for k, v in after.items() if not k.startswith("adapter2")} == before


def test_a_folder_is_the_tools_only_if_its_marker_says_so(ws, tmp_path, capsys):
    """A layout that looks like a run of this tool, without the marker, is the user's: refused without --overwrite,
    and with it the names the run would write over are refused (a hand-edited config, the user's own report)."""
    legacy = Path(shutil.copytree(ws / "run", tmp_path / "legacy"))
    (legacy / MARKER).unlink()
    (legacy / "configs" / "lora_rank_config.json").write_text('{"hand": "edited"}\n')
    analyze = ["analyze", "--base", ws / "base", "--finetuned", ws / "ft", "--out", legacy]
    _refused(capsys, analyze, "is a folder this tool did not write", tmp_path)
    _refused(capsys, [*analyze, "--overwrite"], "holds configs, analysis_outputs, which this tool did not write",
             tmp_path)
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "check_report.json").write_text('{"mine": true}\n')
    check = ["check", "--model", ws / "base", "--lora-config", ws / "run/configs/lora_rank_config.json", "--out", reports]
    _refused(capsys, check, "is a folder this tool did not write", tmp_path)
    _refused(capsys, [*check, "--overwrite"], "holds check_report.json, which this tool did not write", tmp_path)
    assert read_marker(legacy) is None and read_marker(reports) is None  # not claimed either


@pytest.mark.parametrize("argv,fragment", [
    (["finetune", "--model", "{base}", "--data", "{data}", "--out", "{new}", "--seed", str(2**64)],
     "--seed 18446744073709551616: input should be less than or equal to 4294967295"),
    (["compare", "--model", "{base}", "--data", "{data}", "--out", "{new}", "--seeds", "0", str(2**70)],
     "seeds must be at most 4294967295"),
    (["train", "--model", "{base}", "--lora-config", "{config}", "--data", "{data}", "--out", "{new}",
      "--grad-accumulation", str(10**9)], "--grad-accumulation 1000000000: input should be less than or equal to 1024"),
    (["train", "--model", "{base}", "--lora-config", "{config}", "--data", "{data}", "--out", "{new}",
      "--batch-size", str(10**6)], "--batch-size 1000000: input should be less than or equal to 4096"),
    (["check", "--model", "{base}", "--lora-config", "{config}", "--out", "{new}", "--latency-repeats", str(10**18)],
     "less than or equal to 10000"),
    (["analyze", "--base", "{base}", "--finetuned", "{ft}", "--out", "{new}", "--alpha-scale", "1e300"],
     "--alpha-scale 1e300: input should be less than or equal to 1000"),
    (["extract", "--base", "{base}", "--finetuned", "{ft}", "--config", "{big}", "--out", "{new}"],
     "rank 300 is larger than its smaller side (shape (64, 64))"),
    (["train", "--model", "{base}", "--lora-config", "{huge}", "--data", "{data}", "--out", "{new}"],
     "rank 1000000000 is larger than its smaller side"),
    (["check", "--model", "{base}", "--lora-config", "{big}", "--out", "{new}"], "rank 300 is larger than"),
    (["extract", "--base", "{base}", "--finetuned", "{ft}", "--config", "{negative}", "--out", "{new}"],
     "lora_alpha must be a positive number, got -8"),
    (["finetune", "--model", "{base}", "--data", "{fifo}", "--out", "{new}"], "is not a regular file"),
    (["finetune", "--model", "{base}", "--data", "/dev/null", "--out", "{new}"], "is not a regular file"),
    (["analyze", "--base", "{loop}", "--finetuned", "{ft}", "--out", "{new}"], "or is a loop of links"),
    (["train", "--model", "{base}", "--lora-config", "{config}", "--data", "{data}", "--out", "{ft}", "--overwrite"],
     "is the rank config's fine-tuned model"),
    (["analyze", "--base", "{base}", "--finetuned", "{ft}", "--data", "{data}", "--out", "{new}", "--fisher-samples",
      str(10**18)], "--fisher-samples 1000000000000000000: input should be less than or equal to 1024"),
    (["finetune", "--model", "{base}", "--data", "{data}", "--out", "{new}", "--weight-decay", "1e18"],
     "--weight-decay 1e18: input should be less than or equal to 10"),
    (["extract", "--base", "{base}", "--finetuned", "{ft}", "--config", "{loud}", "--out", "{new}"],
     "scales its update by 3.33e+299, above 10,000"),
    (["extract", "--base", "{base}", "--finetuned", "{ft}", "--config", "{fifo}", "--out", "{new}"],
     "is not a regular file"),
    (["train", "--model", "{base}", "--lora-config", "{config}", "--data", "{data}", "--out", "{new}",
      "--grad-accumulation", "1024", "--batch-size", "4096"],
     "one step of --batch-size 4096 x --grad-accumulation 1024 = 4,194,304 sequences is more than 1 epoch(s) over the "
     "20 records"),
    (["extract", "--base", "{base}", "--finetuned", "{ft}", "--config", "{config}", "--out", "{long}"],
     "has a name too long for this tool's temporary copy beside it"),
])
def test_out_of_range_and_odd_inputs_are_one_line_before_any_work(ws, tmp_path, capsys, argv, fragment):
    config = ws / "run" / "configs" / "lora_rank_config.json"
    raw = json.loads(config.read_text())
    name = raw["target_modules"][0]
    key = next(k for k in raw["rank_pattern"] if k.endswith(name.replace(".", "\\.")))

    def edited(path: Path, **changes) -> Path:
        text = json.loads(config.read_text())
        for rank in changes.pop("rank", ()):
            text["rank_pattern"][key] = text["analysis_metadata"]["modules"][name]["final_rank"] = rank
        text.update(changes)
        path.write_text(json.dumps(text))
        return path

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    values = {"base": ws / "base", "ft": ws / "ft", "data": ws / "data.jsonl", "config": config, "new": tmp_path / "new",
              "fifo": tmp_path / "fifo", "loop": tmp_path / "loop-a", "big": edited(tmp_path / "big.json", rank=[300]),
              "huge": edited(tmp_path / "huge.json", rank=[10**9]),
              "negative": edited(tmp_path / "negative.json", lora_alpha=-8), "long": tmp_path / ("b" * 240),
              "loud": edited(tmp_path / "loud.json", alpha_pattern={key: 1e300})}
    _refused(capsys, [a.format(**values) for a in argv], fragment, ws)
    assert not (tmp_path / "new").exists()


def test_an_empty_device_means_automatic():
    from lora_ranks.settings import AnalysisSettings, CheckSettings

    assert AnalysisSettings(device="").device is None and CheckSettings(device="").device is None


def test_a_second_command_on_the_same_output_is_refused(ws, tmp_path, capsys):
    from lora_ranks.locks import output_lock

    with output_lock(tmp_path / "exp", "export"):  # what a running export holds
        line = _refused(capsys, ["export", ws / "adapter", "--out", tmp_path / "exp"],
                        "is being written by another lora-ranks command (lora-ranks export, PID", tmp_path)
    assert str(os.getpid()) in line
    assert _main(["export", str(ws / "adapter"), "--out", str(tmp_path / "exp")]) == 0  # released: it runs
    capsys.readouterr()


def test_export_merged_copies_the_models_files_not_the_users(ws, tmp_path, capsys):
    base = Path(shutil.copytree(ws / "base", tmp_path / "base"))
    (base / "notes.txt").write_text("mine\n")
    (base / "tokenizer_config.json").write_text("{}\n")
    assert _main(["export", str(ws / "adapter"), "--format", "merged", "--base", str(base), "--out",
                 str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    names = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "tokenizer_config.json" in names and "notes.txt" not in names


def _cli(args: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lora-ranks")
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _one_line(done: subprocess.CompletedProcess, fragment: str) -> None:
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and fragment in lines[0], done.stdout + done.stderr


def test_prefect_settings_that_cannot_work_are_refused_before_any_work(ws, tmp_path):
    (tmp_path / "home-file").write_text("x\n")
    analyze = ["analyze", "--base", ws / "base", "--finetuned", ws / "ft", "--out", tmp_path / "new"]
    _one_line(_cli(analyze, tmp_path, {"PREFECT_HOME": str(tmp_path / "home-file")}),
              f"PREFECT_HOME {tmp_path / 'home-file'} is a file, not a folder")
    _one_line(_cli(analyze, tmp_path, {"PREFECT_API_URL": "http://127.0.0.1:9/api"}),
              "the Prefect server of PREFECT_API_URL http://127.0.0.1:9/api does not answer")
    assert not (tmp_path / "new").exists()


def test_a_deleted_working_folder(ws, tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    exe = Path(sys.executable).with_name("lora-ranks")
    done = subprocess.run(f"cd {gone} && rmdir {gone} && {exe} analyze --base {ws / 'base'} --finetuned {ws / 'ft'} "
                          f"--out {tmp_path / 'new'}", shell=True, capture_output=True, text=True, timeout=120)
    _one_line(done, "the current folder no longer exists")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB file system (tmpfs; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(ws, tiny_disk, capsys):
    # Foreseen: a merged model larger than the free space is refused before any work.
    line = _refused(capsys, ["export", ws / "adapter", "--format", "merged", "--out", tiny_disk / "merged"],
                    "but its file system has 256 KiB free", tiny_disk)
    assert re.search(r"takes about \d+ KiB", line), line
    # Not foreseen: the disk fills while the adapter is written (a filler leaves less room than it needs).
    (tiny_disk / "filler").write_bytes(b"\0" * (240 * 1024))
    _refused(capsys, ["extract", "--base", ws / "base", "--finetuned", ws / "ft", "--config",
                      ws / "run/configs/lora_rank_config.json", "--out", tiny_disk / "adapter"],
             f"no space left on the device of {tiny_disk / 'adapter'}", tiny_disk)
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]


def test_run_entries_cover_every_path_of_the_layouts():
    """``outputs.RUN_ENTRIES`` (what --overwrite lets a run write into a folder of the user's) names every top-level
    path the flows' layouts give: a path outside it would be written without the check."""
    import inspect

    from lora_ranks.analysis import OutputLayout
    from lora_ranks.check import REPORT_NAME
    from lora_ranks.evidence.comparison import ComparisonLayout
    from lora_ranks.train import TrainLayout

    def top_level(layout) -> set[str]:
        names = set()
        for name, member in inspect.getmembers(type(layout)):
            if name.startswith("_"):
                continue
            if isinstance(member, property):
                value = getattr(layout, name)
            elif inspect.isfunction(member) and list(inspect.signature(member).parameters)[1:] in (["label"],
                                                                                                 ["label", "seed"]):
                value = member(layout, *(["x", 0][: len(inspect.signature(member).parameters) - 1]))
            else:
                continue
            if isinstance(value, Path) and value != layout.root:
                names.add(value.relative_to(layout.root).parts[0])
            elif hasattr(value, "root"):  # a nested layout (the comparison's analysis)
                names.add(value.root.relative_to(layout.root).parts[0])
        return names

    root = Path("/run")
    assert top_level(OutputLayout(root)) <= set(RUN_ENTRIES["svd-analysis"])
    assert {"demo_inputs", "saved_models"} <= set(RUN_ENTRIES["preliminary-finetune"])
    assert top_level(TrainLayout(root)) == set(RUN_ENTRIES["train-dynamic-lora"])
    assert top_level(ComparisonLayout(root)) <= set(RUN_ENTRIES["compare-allocations"])
    assert "runs" in top_level(ComparisonLayout(root)) and "warm" in top_level(ComparisonLayout(root))
    assert RUN_ENTRIES["check-config"] == (REPORT_NAME,)


def test_a_marker_names_nothing_outside_its_folder_and_owns_only_files_as_written(ws, tmp_path, capsys):
    """The marker is a file anyone can edit or copy: names through .. or absolute ones make it invalid (nothing
    outside the folder is ever deleted); one that describes none of the folder's files (a name-only list of an earlier
    release, or sizes and times copied from elsewhere) is the user's file, refused and left alone; a file the tool wrote
    and the user rewrote since (a later save_pretrained, a hand edit) is the user's."""
    config = ws / "run" / "configs" / "lora_rank_config.json"
    extract = ["extract", "--base", ws / "base", "--finetuned", ws / "ft", "--config", config]
    (tmp_path / "victim.txt").write_text("keep\n")
    forged = _users_project(tmp_path / "forged")
    for files in (["../victim.txt"], [str(tmp_path / "victim.txt")]):  # not a marker the tool writes: refused
        (forged / MARKER).write_text(json.dumps({"kind": "folder", "content": "adapter", "made_by": "lora-ranks",
                                                 "files": files}))
        _refused(capsys, [*extract, "--out", forged, "--overwrite"], "holds a .lora-ranks file this tool did not write",
                 tmp_path)
    # A marker that describes none of its files (names only, as release 0.3.0 wrote; or sizes and times that match
    # nothing there: copied from elsewhere) is the user's file like any other: refused, and left as it is.
    for files, why in ((["notes.txt", "results/table.csv"], "it lists names only"),
                       ({"notes.txt": [1, 1], "results/table.csv": [2, 2]}, "none of the files it lists is there")):
        text = json.dumps({"kind": "folder", "content": "adapter", "made_by": "lora-ranks", "files": files})
        (forged / MARKER).write_text(text)
        _refused(capsys, [*extract, "--out", forged, "--overwrite"], f"does not describe its files: {why}", tmp_path)
        assert (forged / MARKER).read_text() == text
    assert (tmp_path / "victim.txt").read_text() == "keep\n"
    assert (forged / "notes.txt").read_text() == "my notes\n" and (forged / "results" / "table.csv").is_file()
    adapter = tmp_path / "adapter"
    assert _main([*extract, "--out", adapter]) == 0
    assert _main([*extract, "--out", adapter]) == 0  # a rerun replaces the tool's own files
    (adapter / "README.md").write_text("my notes on this adapter\n")
    _refused(capsys, [*extract, "--out", adapter], "1 file(s) this tool did not write, or changed since it wrote them "
                                                   "(README.md)", tmp_path)
    _refused(capsys, [*extract, "--out", adapter, "--overwrite"], "holds README.md, which this tool did not write",
             tmp_path)
    assert (adapter / "README.md").read_text() == "my notes on this adapter\n"


def test_a_run_into_a_users_folder_owns_only_the_names_it_made(ws, tmp_path, capsys, prefect_harness):
    """--overwrite into a folder of the user's: the marker lists, once the run ends, only what the run made there;
    a name of the layout the user creates afterwards (results.json, runs/) is theirs, and a later run refuses it."""
    from lora_ranks.outputs import RUN_ENTRIES, check_output_dir, record_made_entries

    folder = _users_project(tmp_path / "project")
    assert _main(["analyze", "--base", ws / "base", "--finetuned", ws / "ft", "--out", folder, "--overwrite"]) == 0
    marker = read_marker(folder)
    assert marker["kind"] == "foreign" and marker["entries"] == ["analysis_outputs", "configs"], marker
    assert not marker["pending"]
    assert _main(["analyze", "--base", ws / "base", "--finetuned", ws / "ft", "--out", folder, "--overwrite"]) == 0
    (folder / "saved_models").mkdir()
    (folder / "saved_models" / "mine.txt").write_text("mine\n")
    _refused(capsys, ["analyze", "--base", ws / "base", "--finetuned", ws / "ft", "--out", folder, "--overwrite"],
             "holds saved_models, which this tool did not write", tmp_path)
    # The same through the library: a run that made data/ and failed; results.json created by the user afterwards.
    other = _users_project(tmp_path / "other")
    claim_output_dir(other, "compare-allocations", overwrite=True)
    (other / "data").mkdir()
    record_made_entries(other)
    (other / "results.json").write_text('{"my": "results"}\n')
    with pytest.raises(Exception, match="holds results.json, which this tool did not write"):
        check_output_dir(other, overwrite=True, entries=RUN_ENTRIES["compare-allocations"])
    assert read_marker(other)["entries"] == ["data"]
    capsys.readouterr()


def test_an_overwrite_refuses_only_the_names_the_output_writes(ws, tmp_path, capsys, prefect_harness):
    """An adapter never writes config.json or model.safetensors: a folder holding a model is written into with
    --overwrite, the model untouched; and outputs are shared like other files (not 0600)."""
    folder = Path(shutil.copytree(ws / "ft", tmp_path / "model-and-adapter"))
    before = _digest(folder)
    assert _main(["extract", "--base", ws / "base", "--finetuned", ws / "ft", "--config",
                  ws / "run/configs/lora_rank_config.json", "--out", folder, "--overwrite"]) == 0
    assert all(_digest(folder)[k] == v for k, v in before.items())
    weights = folder / "adapter_model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o666 & ~_umask()
    capsys.readouterr()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_lock_folder_that_cannot_be_written_is_one_line(ws, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("x\n")
    monkeypatch.setenv("LORA_RANKS_CACHE", str(tmp_path / "a-file"))
    _refused(capsys, ["export", ws / "adapter", "--out", tmp_path / "exp"], "the lock folder", tmp_path)


def test_a_link_is_named_as_given(ws, tmp_path, capsys):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _refused(capsys, ["export", ws / "adapter", "--out", tmp_path / "link"],
             f"--out {tmp_path / 'link'} is a symbolic link (to {tmp_path / 'real'})", tmp_path)


def test_folders_a_user_made_inside_an_adapter_survive_its_rewrite(ws, tmp_path, capsys):
    """An empty folder (or empty nested ones) the user made in the tool's adapter is theirs: a rerun without
    --overwrite is refused, and with it the adapter's files are rewritten around them."""
    config = ws / "run" / "configs" / "lora_rank_config.json"
    extract = ["extract", "--base", ws / "base", "--finetuned", ws / "ft", "--config", config, "--out", tmp_path / "ad"]
    assert _main(extract) == 0
    (tmp_path / "ad" / "my_checkpoints").mkdir()
    (tmp_path / "ad" / "eval" / "runs").mkdir(parents=True)
    _refused(capsys, extract, "did not write", tmp_path)
    assert _main([*extract, "--overwrite"]) == 0
    assert (tmp_path / "ad" / "my_checkpoints").is_dir() and (tmp_path / "ad" / "eval" / "runs").is_dir()
    assert (tmp_path / "ad" / "adapter_config.json").is_file()
    capsys.readouterr()


def test_staging_lookalikes_with_a_copied_marker_are_never_touched(ws, tmp_path, capsys):
    """A folder named exactly like the tool's staging or aside folder of an output, even holding a marker with the
    same write id, is the user's unless the tool noted that write in its cache: recovery leaves it alone."""
    swap_id = "0123456789ab"
    for suffix, kind in ((".new", "staging"), (".old", "folder")):
        lookalike = tmp_path / f".ad.lora-ranks-{swap_id}{suffix}"
        lookalike.mkdir()
        (lookalike / "notes.txt").write_text("mine\n")
        (lookalike / MARKER).write_text(json.dumps({"kind": kind, "made_by": "lora-ranks", "swap_id": swap_id,
                                                    "content": "adapter", "files": {}}))
    before = _digest(tmp_path)
    assert _main(["export", ws / "adapter", "--out", tmp_path / "ad"]) == 0  # recovery runs before the write
    assert _main(["export", ws / "adapter", "--out", tmp_path / "ad", "--overwrite"]) == 0
    after = _digest(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("ad")} == before
    capsys.readouterr()


def test_an_output_under_a_dangling_link_is_refused(ws, tmp_path, capsys):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    _refused(capsys, ["export", ws / "adapter", "--out", tmp_path / "dangling" / "sub"],
             f"lies under {tmp_path / 'dangling'}, a symbolic link to {tmp_path / 'nowhere'}, which does not exist",
             tmp_path)
    _refused(capsys, ["analyze", "--base", ws / "base", "--finetuned", ws / "ft", "--out", tmp_path / "dangling" / "sub"],
             "a symbolic link to", tmp_path)
    assert not (tmp_path / "nowhere").exists()


def test_a_results_folder_holding_files_of_the_users_is_refused(ws, tmp_path, capsys):
    """compare --results-dir reads committed results and writes over stale ones: a file of the user's named like one
    (or the folder being a file) is one line before any work, and nothing is written."""
    compare = ["compare", "--model", ws / "base", "--data", ws / "data.jsonl", "--out", tmp_path / "run"]
    results = tmp_path / "results"
    results.mkdir()
    (results / "r4-uniform-seed0-lr0.0002.json").write_text("my own notes\n")
    _refused(capsys, [*compare, "--results-dir", results],
             "holds r4-uniform-seed0-lr0.0002.json, named like a result this tool commits but not one it wrote", tmp_path)
    _refused(capsys, [*compare, "--results-dir", ws / "data.jsonl"], "is a file: give the folder", tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    _refused(capsys, [*compare, "--results-dir", tmp_path / "dangling"],
             f"is a symbolic link to {tmp_path / 'nowhere'}, which does not exist", tmp_path)
    assert not (tmp_path / "run").exists() and not (tmp_path / "nowhere").exists()


def test_a_file_edited_in_a_run_folder_is_never_written_over(ws, tmp_path, capsys):
    """A run records the files it leaves (size, modification time) when it ends: one the user edits afterwards is
    theirs, and the next run into the folder is refused, with or without --overwrite; an untouched run reruns."""
    analyze = ["analyze", "--base", ws / "base", "--finetuned", ws / "ft", "--out", tmp_path / "run"]
    assert _main(analyze) == 0
    assert "configs/lora_rank_config.json" in read_marker(tmp_path / "run")["files"]
    assert _main(analyze) == 0  # nothing edited: a rerun is fine
    config = tmp_path / "run" / "configs" / "lora_rank_config.json"
    config.write_text(config.read_text().replace('"lora_alpha"', '"lora_alpha" ', 1))  # a hand edit
    for extra in ([], ["--overwrite"]):
        _refused(capsys, [*analyze, *extra], "holds configs/lora_rank_config.json, which you added or changed "
                                             "after this tool's last run", tmp_path)


def test_a_document_added_to_a_run_folder_under_a_name_the_run_never_wrote_is_kept(ws, tmp_path, capsys,
                                                                                          prefect_harness):
    """A finetune run's folder, then the user's own configs/lora_rank_config.json (a name finetune never writes):
    an analyze into that folder is refused, with or without --overwrite, instead of replacing it."""
    from lora_ranks.synthetic import DEMO_BASE

    run = tmp_path / "run"
    assert _main(["finetune", "--model", DEMO_BASE, "--data", ws / "data.jsonl", "--out", run, "--max-steps", "1",
                  "--subset-ratio", "1"]) == 0
    (run / "configs").mkdir()
    (run / "configs" / "lora_rank_config.json").write_text('{"my": 1}\n')
    for extra in ([], ["--overwrite"]):
        _refused(capsys, ["analyze", "--base", ws / "base", "--finetuned", ws / "ft", "--out", run, *extra],
                 "holds configs/lora_rank_config.json", tmp_path)
    assert (run / "configs" / "lora_rank_config.json").read_text() == '{"my": 1}\n'


def test_a_run_marker_without_a_file_list_protects_every_document(ws, tmp_path, capsys):
    """A run marker that lists no files (an earlier release's run, one made or copied by hand; a foreign marker too)
    cannot tell the tool's documents from the user's: a run into that folder is refused, with or without
    --overwrite, and the marker and the documents stay as they are. With nothing but binary files there, it runs."""
    analyze = ["analyze", "--base", ws / "base", "--finetuned", ws / "ft"]
    for i, marker in enumerate(({"kind": "run", "made_by": "svd-analysis"},
                                {"kind": "foreign", "made_by": "svd-analysis", "entries": ["configs"],
                                 "pending": []})):
        project = tmp_path / f"project{i}"
        (project / "configs").mkdir(parents=True)
        (project / "configs" / "lora_rank_config.json").write_text('{"my": 1}\n')
        (project / MARKER).write_text(json.dumps(marker))
        for extra in ([], ["--overwrite"]):
            _refused(capsys, [*analyze, "--out", project, *extra], "which this tool cannot tell from files of yours: "
                     "the .lora-ranks of the folder lists no files it wrote", tmp_path)
    binary = tmp_path / "binary"  # binary files too: a cache name of the tool's may be the user's file
    (binary / "analysis_outputs").mkdir(parents=True)
    (binary / "analysis_outputs" / "mine.safetensors").write_bytes(b"mine")
    (binary / MARKER).write_text(json.dumps({"kind": "run", "made_by": "svd-analysis"}))
    _refused(capsys, [*analyze, "--out", binary], "holds analysis_outputs/mine.safetensors, which this tool cannot "
             "tell from files of yours", tmp_path)
    legacy = tmp_path / "legacy"  # a marker and empty folders: nothing to lose; run, and listed from then on
    (legacy / "analysis_outputs").mkdir(parents=True)
    (legacy / MARKER).write_text(json.dumps({"kind": "run", "made_by": "svd-analysis"}))
    assert _main([*analyze, "--out", legacy]) == 0
    assert "configs/lora_rank_config.json" in read_marker(legacy)["files"]


def test_a_run_killed_outright_leaves_the_list_of_what_it_wrote(tmp_path):
    """Every document a run writes joins its marker's list at once (from any thread), so after a SIGKILL (no end
    of run recorded) the run resumes, and a document the user adds afterwards is refused."""
    from concurrent.futures import ThreadPoolExecutor

    from lora_ranks._io import atomic_write_bytes, atomic_write_json
    from lora_ranks.outputs import OutputFolderError, check_output_dir, claim_output_dir

    run = claim_output_dir(tmp_path / "run", "svd-analysis")
    names = [f"configs/c{i}.json" for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: atomic_write_json(run / n, {"n": n}), names))
    atomic_write_bytes(run / "analysis_outputs" / "factors.safetensors", b"x")  # binary: the tool's to recompute
    listed = read_marker(run)["files"]
    assert sorted(listed) == sorted(names)  # no end of run recorded: as after SIGKILL
    assert check_output_dir(run, entries=("configs", "analysis_outputs")) == run  # a rerun resumes
    atomic_write_json(run / "configs" / "c0.json", {"n": "rewritten by the tool"})
    assert check_output_dir(run, entries=("configs",)) == run  # the tool's own rewrite is listed again
    (run / "configs" / "mine.json").write_text("{}\n")
    with pytest.raises(OutputFolderError, match="holds configs/mine.json, which you added or changed"):
        check_output_dir(run, entries=("configs",), overwrite=True)


def test_a_full_disk_under_the_lock_folder_or_prefect_home_is_one_line(ws, tiny_disk, tmp_path, capsys, monkeypatch):
    """LORA_RANKS_CACHE or PREFECT_HOME on a full file system: one line before any work (not a traceback from the
    lock, nor Prefect's server hanging two minutes and then failing)."""
    with open(tiny_disk / "filler", "wb", buffering=0) as handle:  # fill it: a lock file can be made, not written
        with pytest.raises(OSError):
            while True:
                handle.write(b"x" * 4096)
    monkeypatch.setenv("LORA_RANKS_CACHE", str(tiny_disk / "cache"))
    (tiny_disk / "cache").mkdir()
    (tmp_path / "work").mkdir()
    _refused(capsys, ["export", ws / "adapter", "--out", tmp_path / "work" / "exp"], "No space left on device",
             tmp_path / "work")
    assert not list((tiny_disk / "cache").iterdir())  # no lock file, and no folder made for one
    monkeypatch.delenv("LORA_RANKS_CACHE")
    analyze = ["analyze", "--base", ws / "base", "--finetuned", ws / "ft", "--out", tmp_path / "new"]
    _one_line(_cli(analyze, tmp_path, {"PREFECT_HOME": str(tiny_disk / "prefect")}),
              f"PREFECT_HOME {tiny_disk / 'prefect'} has 0 MiB free on its device")
    assert not (tmp_path / "new").exists()


def test_what_a_user_does_while_a_run_goes_on_or_after_it_was_killed(tmp_path):
    """The sweep's third round: a document edited while the run still writes is the user's when the run ends; a run
    folder inside the output (compare's analysis) is checked like the output itself, before any work; in a folder of
    the user's written into with --overwrite, a name the run has begun to write is the tool's at once (a run killed
    outright reruns there); a temporary file left by a killed write goes with the next write of that file."""
    from lora_ranks._io import atomic_write_json
    from lora_ranks.outputs import OutputFolderError, check_output_dir, claim_output_dir, note_written, record_made_entries

    run = claim_output_dir(tmp_path / "run", "svd-analysis")
    atomic_write_json(run / "configs" / "lora_rank_config.json", {"tool": 1})
    (run / "configs" / "lora_rank_config.json").write_text('{"edited while the run went on": 1}\n')
    record_made_entries(run)  # the run ends after the edit
    with pytest.raises(OutputFolderError, match="holds configs/lora_rank_config.json, which you added or changed"):
        check_output_dir(run, entries=("configs",))

    outer = claim_output_dir(tmp_path / "cp", "compare-allocations")
    inner = claim_output_dir(outer / "analysis", "svd-analysis")
    atomic_write_json(inner / "configs" / "lora_rank_config.json", {"tool": 1})
    record_made_entries(inner)
    record_made_entries(outer)
    assert check_output_dir(outer, entries=("analysis",)) == outer
    (inner / "configs" / "lora_rank_config.json").write_text('{"mine": 1}\n')
    with pytest.raises(OutputFolderError, match="holds analysis/configs/lora_rank_config.json, which you added"):
        check_output_dir(outer, entries=("analysis",))

    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.md").write_text("mine\n")
    claimed = claim_output_dir(project, "svd-analysis", overwrite=True)
    assert "configs" in read_marker(claimed)["pending"]
    atomic_write_json(claimed / "configs" / "lora_rank_config.json", {"tool": 1})  # then SIGKILL: no end recorded
    marker = read_marker(claimed)
    assert "configs" in marker["entries"] and "configs" not in marker["pending"]
    assert "configs/lora_rank_config.json" in marker["files"] and "notes.md" not in marker["files"]
    assert check_output_dir(claimed, overwrite=True, entries=RUN_ENTRIES["svd-analysis"]) == claimed  # reruns
    note_written(claimed / "notes.md")  # a name of the user's is never listed, even if asked
    assert "notes.md" not in read_marker(claimed)["files"]

    target = run / "configs" / "other.json"
    dead = run / "configs" / ".other.json.lora-ranks-999999999-abc123.tmp"  # a pid no process has
    live = run / "configs" / f".other.json.lora-ranks-{os.getpid()}-abc123.tmp"
    for leftover in (dead, live):
        leftover.write_text("{")
    atomic_write_json(target, {"tool": 2})
    assert not dead.exists() and live.exists()
