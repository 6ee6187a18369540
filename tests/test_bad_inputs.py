"""Bad input as a new user types it, every subcommand: one line, exit 2, nothing written, nothing of the user's
touched (the whole workspace is hashed before and after each command). These all end in the preflight, before
Prefect starts, so they run in-process (``flows.cli.main``) in well under a second each."""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flows.cli import main
from lora_ranks import _io
from lora_ranks.analysis import analyze_checkpoints
from lora_ranks.extract import extract_lora
from lora_ranks.outputs import MARKER, OutputFolderError, check_output_dir, claim_output_dir
from lora_ranks.settings import AllocationSettings
from lora_ranks.synthetic import DEMO_BASE, write_planted_pair, write_synthetic_dataset

SETTINGS = AllocationSettings(energy_threshold=0.9, min_rank=2, max_rank=16, smoothing="none")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A user's workspace: a planted pair and its rank config and adapter, a pair of another model with its config,
    a fine-tune with a NaN, an identical copy of the base, data, a folder of the user's, a plain file."""
    root = tmp_path_factory.mktemp("workspace")
    base, ft = write_planted_pair(root / "base", root / "ft", planted_rank=(3, 8), noise=1e-3)
    claim_output_dir(root / "run", "svd-analysis")  # marked as the command's runs are
    analyze_checkpoints(base, ft, root / "run", settings=SETTINGS)
    other_base, other_ft = write_planted_pair(root / "other-base", root / "other-ft", hidden_size=32,
                                              intermediate_size=96, planted_rank=2)
    analyze_checkpoints(other_base, other_ft, root / "other-run", settings=SETTINGS)
    config = root / "run" / "configs" / "lora_rank_config.json"
    extract_lora(base, ft, config, root / "adapter")
    nan = Path(shutil.copytree(ft, root / "ft-nan"))
    tensors = load_file(nan / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(nan / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(base, root / "base-copy")
    write_synthetic_dataset(root / "data.jsonl", 4)
    (root / "eval.jsonl").write_text('{"text": "a held-out record", "task": "a"}\n{"text": "another one", "task": "b"}\n')
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("my notes\n")
    (root / "file.txt").write_text("a file\n")
    (root / "no-tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(base / name, root / "no-tokenizer" / name)
    return root


def _digest(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones too) with the sha256 of its bytes (folders: "dir"; links: their
    target)."""
    def fingerprint(p: Path) -> str:
        if p.is_symlink():
            return "link to " + str(p.readlink())
        return "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()

    return {str(p.relative_to(root)): fingerprint(p) for p in sorted(root.rglob("*"))}


def _args(ws: Path, template: str) -> list[str]:
    return [a.replace("{ws}", str(ws)) for a in template.split()]


_PAIR = "--base {ws}/base --finetuned {ws}/ft"
_CONFIG = "{ws}/run/configs/lora_rank_config.json"
CASES = [
    # extract: never into or around an input, never over a file or a folder of the user's
    ("extract", f"{_PAIR} --config {_CONFIG} --out {{ws}}/ft", "--out {ws}/ft is --finetuned"),
    ("extract", f"{_PAIR} --config {_CONFIG} --out {{ws}}/ft/adapter", "lies inside --finetuned"),
    ("extract", f"{_PAIR} --config {_CONFIG} --out {{ws}}", "contains --base"),
    ("extract", f"{_PAIR} --config {_CONFIG} --out {{ws}}/ft --overwrite", "is --finetuned"),
    ("extract", f"{_PAIR} --config {_CONFIG} --out {{ws}}/mine", "did not write, holding 1 entry (notes.txt)"),
    ("extract", f"{_PAIR} --config {_CONFIG} --out {{ws}}/file.txt", "is a file, not a folder"),
    ("extract", f"{_PAIR} --config {_CONFIG} --out {{ws}}/file.txt/adapter", "which is a file, not a folder"),
    ("extract", f"{_PAIR} --config {{ws}}/run/configs --out {{ws}}/new", "is a folder; give the rank config file"),
    ("extract", f"{_PAIR} --config {{ws}}/other-run/configs/lora_rank_config.json --out {{ws}}/new",
     "made for another model"),
    ("extract", f"{_PAIR} --config {{ws}}/data.jsonl --out {{ws}}/new", "not valid JSON"),
    ("extract", f"--base {{ws}}/base --finetuned {{ws}}/base --config {_CONFIG} --out {{ws}}/new", "are the same folder"),
    ("extract", f"--base {{ws}}/base --finetuned {{ws}}/nothere/ft --config {_CONFIG} --out {{ws}}/new",
     "does not exist"),
    ("extract", f"--base {{ws}}/base --finetuned owner-x/not-here --config {_CONFIG} --out {{ws}}/new",
     "is no local folder"),
    # export: never over the adapter it reads
    ("export", "{ws}/adapter --out {ws}/adapter", "is ADAPTER_DIR"),
    ("export", "{ws}/adapter --out {ws}/adapter/uniform", "lies inside ADAPTER_DIR"),
    ("export", "{ws}/adapter --out {ws}/mine", "did not write"),
    ("export", "{ws}/adapter --out {ws}/file.txt", "is a file, not a folder"),
    ("export", "{ws}/adapter/adapter_config.json --out {ws}/new", "is a file; an adapter is a folder"),
    ("export", "{ws}/ft --out {ws}/new", "has no adapter_config.json"),
    ("export", "{ws}/adapter --out {ws}/new --format merged --base {ws}/other-base", "does not fit the base model"),
    # analyze: numbers, devices, paths and weights before any layer is analyzed
    ("analyze", f"{_PAIR} --out {{ws}}/new --budget 10", "--budget 10 is below the"),
    ("analyze", f"{_PAIR} --out {{ws}}/new --budget 1e30", "is more than the"),
    ("analyze", f"{_PAIR} --out {{ws}}/new --budget inf", "--budget inf: input should be a finite number"),
    ("analyze", f"{_PAIR} --out {{ws}}/new --budget nan", "--budget nan: input should be a finite number"),
    ("analyze", f"{_PAIR} --out {{ws}}/new --energy nan", "--energy-threshold nan: input should be a finite number"),
    ("analyze", f"{_PAIR} --out {{ws}}/new --rank-rule budget", "--rank-rule 'budget' needs --budget"),
    ("analyze", f"{_PAIR} --out {{ws}}/file.txt", "is a file, not a folder"),
    ("analyze", f"{_PAIR} --out {{ws}}/mine", "did not write"),
    ("analyze", f"{_PAIR} --out {{ws}}/ft", "is --finetuned"),
    ("analyze", "--base {ws}/base --finetuned {ws}/ft-nan --out {ws}/new", "ft-nan contains NaN or Inf"),
    # issue 39: errors that came after the work
    ("analyze", "--base {ws}/base --finetuned {ws}/ft --out {ws}/new --fidelity-report",
     "--fidelity-report measures the KL of base + adapters to the fine-tuned model on held-out records: give them"),
    ("analyze", "--base {ws}/base --finetuned {ws}/ft --data {ws}/data.jsonl --out {ws}/new --noise-estimate "
     "split-half --rank-rule signal --max-samples 1", "has 5 record(s), no task with two"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --spectrum fisher "
     "--min-calibration-tokens 100000", "fewer than the 100000 needed (min_calibration_tokens)"),
    ("analyze", "--base {ws}/base --finetuned {ws}/base-copy --out {ws}/new", "are identical in all"),
    ("analyze", "--base {ws}/base --finetuned {ws}/base --out {ws}/new", "are the same folder"),
    ("analyze", f"{_PAIR} --out {{ws}}/new --data {{ws}}/missing.jsonl", "missing.jsonl does not exist"),
    ("analyze", f"{_PAIR} --out {{ws}}/new --data {{ws}}/mine", "is a folder; give a .json or .jsonl file"),
    ("analyze", f"{_PAIR} --out {{ws}}/new --eval-data {{ws}}/missing.jsonl", "missing.jsonl does not exist"),
    ("analyze", "--base {ws}/base --finetuned {ws}/other-ft --out {ws}/new", "describe different architectures"),
    # finetune: no training run that cannot work
    ("finetune", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --learning-rate inf", "finite number"),
    ("finetune", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --learning-rate 1e10",
     "--learning-rate 1e10: input should be less than or equal to 1"),
    ("finetune", "--model {ws}/base --data {ws}/mine --out {ws}/new", "is a folder"),
    ("finetune", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/mine", "did not write"),
    ("finetune", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/base/run", "lies inside --model"),
    ("finetune", "--model {ws}/no-tokenizer --data {ws}/data.jsonl --out {ws}/new", "has no tokenizer"),
    ("finetune", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --wandb-project x", "wandb is not installed"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --budget-ranks 100000", "is above --max-rank"),
    # train
    ("train", "--model {ws}/base --lora-config {ws}/run/configs --data {ws}/data.jsonl --out {ws}/new",
     "is a folder; give the rank config file"),
    ("train", f"--model {{ws}}/base --lora-config {_CONFIG} --data {{ws}}/data.jsonl --out {{ws}}/base", "is --model"),
    ("train", f"--model {{ws}}/other-base --lora-config {_CONFIG} --data {{ws}}/data.jsonl --out {{ws}}/new",
     "made for another model"),
    ("train", f"--model {{ws}}/base --lora-config {_CONFIG} --data {{ws}}/data.jsonl --out {{ws}}/new --lr nan",
     "finite number"),
    ("train", f"--model {{ws}}/base --lora-config {_CONFIG} --data {{ws}}/data.jsonl --out {{ws}}/new --processes 2 "
     "--batch-size 1", "--processes 2 deals each micro-batch across the processes, but the batch size is 1"),
    ("finetune", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --processes 4 --batch-size 2",
     "give a batch size of at least 4"),
    ("finetune", f"--model {DEMO_BASE} --data {{ws}}/data.jsonl --out {{ws}}/new --max-length 1",
     "--max-length 1 cuts off every response of"),
    ("compare", f"--model {DEMO_BASE} --data {{ws}}/data.jsonl --out {{ws}}/new --spectrum weight --lora-max-length 2",
     "--lora-max-length 2 cuts off every response of"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --lora-processes 2",
     "--lora-processes 2: compare trains each row in one process"),
    # check
    ("check", f"--model {{ws}}/base --lora-config {_CONFIG} --out {{ws}}/new --max-infer-overhead nan",
     "--max-infer-overhead nan: input should be a finite number"),
    ("check", f"--model {{ws}}/base --lora-config {_CONFIG} --out {{ws}}/file.txt", "is a file"),
    ("check", f"--model {{ws}}/base --lora-config {_CONFIG} --out {{ws}}/new --device cuda:7", "is not available here"),
    # compare and demo: the budget before any fine-tune
    ("compare", "--model {ws}/base --finetuned {ws}/ft --data {ws}/data.jsonl --out {ws}/new --budget 10",
     "is below the"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --budget 10", "is below the"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/mine", "did not write"),
    # compare's peers and learning rates: before Prefect starts
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --peers pissa lora-xs", "unknown peer 'lora-xs'"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --learning-rates 1e-3 -0.01",
     "every learning rate must be in (0, 1], got -0.01"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --learning-rates 0", "got 0.0"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --full-learning-rates 1e-3 3e-3",
     "is off: turn it on (--full-finetune)"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --peers eva --lora-quantization 4bit",
     "peer 'eva' needs the base weights in full precision"),
    # issue 37's bad input: held-out records that are trained on, a grid that chooses nothing, early stopping that
    # cannot stop, a subset smaller than its batch
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --eval-data {ws}/data.jsonl --out {ws}/new",
     "--eval-data shares"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --eval-data {ws}/eval.jsonl --validation-data "
     "{ws}/eval.jsonl --out {ws}/new", "--validation-data shares 2 of its 2 record(s) with --eval-data"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --learning-rates 1e-3",
     "needs at least 2 values"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --learning-rates 1e-3 nan", "finite"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --eval-interval 0 --patience 2",
     "--eval-interval 0: input should be greater than 0"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --eval-interval 5 --patience -1",
     "--patience -1: input should be greater than 0"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --eval-interval 5",
     "early stopping needs both --eval-interval and --patience, got --eval-interval alone"),
    ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --finetune-batch-size 64",
     "fewer than --finetune-batch-size 64"),
    ("demo", "--budget 10 --out {ws}/new", "is below the"),
    ("demo", "--out {ws}/mine", "did not write"),
]
if not torch.cuda.is_available():
    CASES.append(("analyze", f"{_PAIR} --out {{ws}}/new --device cuda", "device cuda is not available here"))
    # a forced bf16 on a CPU without bf16 units (the suite hides the CPU's: conftest), each spelling of the flag
    CASES += [
        ("finetune", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --precision bf16",
         "--precision bf16 is not available here: "),
        ("train", f"--model {{ws}}/base --lora-config {_CONFIG} --data {{ws}}/data.jsonl --out {{ws}}/new --precision bf16",
         "--precision bf16 is not available here"),
        ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --lora-precision bf16",
         "--lora-precision bf16 is not available here"),
        ("compare", "--model {ws}/base --data {ws}/data.jsonl --out {ws}/new --finetune-precision bf16",
         "--finetune-precision bf16 is not available here"),
        ("demo", "--out {ws}/new --precision bf16", "--precision bf16 is not available here"),
        ("check", f"--model {{ws}}/base --lora-config {_CONFIG} --out {{ws}}/new --precision bf16",
         "--precision bf16 is not available here"),
    ]


@pytest.mark.parametrize("command,args,fragment", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(ws, capsys, monkeypatch, command, args, fragment):
    monkeypatch.setenv("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")  # main sets it; keep it to this test
    before = _digest(ws)
    rc = main([command, *_args(ws, args)])
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-ranks: error: "), err
    assert fragment.replace("{ws}", str(ws)) in lines[0], lines[0]
    assert len(lines[0]) < 600, lines[0]  # summarized, not every problem of a foreign config
    assert _digest(ws) == before  # nothing written, nothing moved, nothing deleted


def test_overwrite_writes_into_a_users_folder_and_keeps_their_files(ws, tmp_path, capsys):
    target = Path(shutil.copytree(ws / "mine", tmp_path / "mine"))
    config = ws / "run" / "configs" / "lora_rank_config.json"
    args = ["extract", "--base", str(ws / "base"), "--finetuned", str(ws / "ft"), "--config", str(config)]
    assert main([*args, "--out", str(target)]) == 2
    assert (target / "notes.txt").read_text() == "my notes\n"
    assert main([*args, "--out", str(target), "--overwrite"]) == 0
    assert (target / "notes.txt").read_text() == "my notes\n" and (target / "adapter_config.json").is_file()
    assert (target / MARKER).is_file()
    # Still a folder of the user's: writing it again asks again; with --overwrite the tool's files are replaced and
    # the user's kept; an export of it lands beside it.
    assert main([*args, "--out", str(target)]) == 2
    assert main([*args, "--out", str(target), "--overwrite"]) == 0
    assert (target / "notes.txt").read_text() == "my notes\n"
    assert main(["export", str(target), "--out", str(tmp_path / "uniform")]) == 0
    assert main(["export", str(target), "--out", str(tmp_path / "uniform")]) == 0
    capsys.readouterr()


def test_folders_that_only_look_like_outputs_of_this_tool_are_the_users(ws, tmp_path):
    """Folders without the marker (an old layout, the same file names) are not this tool's: refused without
    --overwrite, and with it, no file of theirs is written over."""
    run = Path(shutil.copytree(ws / "run", tmp_path / "run"))
    adapter = Path(shutil.copytree(ws / "adapter", tmp_path / "adapter"))
    for folder in (run, adapter):
        for marker in folder.rglob(MARKER):
            marker.unlink()
    with pytest.raises(OutputFolderError, match="this tool did not write"):
        check_output_dir(run, entries=("configs", "analysis_outputs"))
    with pytest.raises(OutputFolderError, match="holds configs, analysis_outputs, which this tool did not write"):
        check_output_dir(run, entries=("configs", "analysis_outputs"), overwrite=True)
    with pytest.raises(OutputFolderError, match="this tool did not write"):
        check_output_dir(adapter, folder_output=True)
    with pytest.raises(OutputFolderError, match="holds README.md, adapter_config.json, adapter_model.safetensors "
                                                "and 3 more, which this tool did not write and the adapter would"):
        check_output_dir(adapter, folder_output=True, overwrite=True)


def test_atomic_folder_never_renames_or_replaces_what_is_not_its_own(tmp_path):
    """The library guard itself (what the flows' inner writes go through): a file is refused, not moved aside; a
    folder of the user's is refused unless asked; what it wrote carries the marker."""
    (tmp_path / "file").write_text("keep")
    with pytest.raises(OutputFolderError, match="is a file"):
        with _io.atomic_folder(tmp_path / "file") as staging:
            (staging / "x").write_text("new")
    assert (tmp_path / "file").read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "a").write_text("mine")
    with pytest.raises(OutputFolderError, match="did not write"):
        with _io.atomic_folder(tmp_path / "user") as staging:
            (staging / "b").write_text("never reached: refused before the block")
    assert (tmp_path / "user" / "a").read_text() == "mine"
    with _io.atomic_folder(tmp_path / "user", overwrite=True) as staging:
        (staging / "b").write_text("new")
    assert sorted(p.name for p in (tmp_path / "user").iterdir()) == [MARKER, "a", "b"]
    assert (tmp_path / "user" / "a").read_text() == "mine"
    with pytest.raises(OutputFolderError, match="did not write"):  # still holds the user's file
        with _io.atomic_folder(tmp_path / "user") as staging:
            (staging / "c").write_text("never reached")
    with _io.atomic_folder(tmp_path / "user", overwrite=True) as staging:  # the tool's b goes, c comes, a stays
        (staging / "c").write_text("newer")
    assert sorted(p.name for p in (tmp_path / "user").iterdir()) == [MARKER, "a", "c"]
    with pytest.raises(OutputFolderError, match=r"holds a, which this tool did not write"):  # a is never replaced
        with _io.atomic_folder(tmp_path / "user", overwrite=True) as staging:
            (staging / "a").write_text("would replace the user's")
    assert (tmp_path / "user" / "a").read_text() == "mine" and not list(tmp_path.glob(".user.*"))


def test_a_fine_tune_whose_loss_turns_nan_stops_at_once_and_writes_no_model(ws, tmp_path):
    from lora_ranks.finetune import TrainingDivergedError, run_preliminary_finetune
    from lora_ranks.settings import FinetuneSettings
    from lora_ranks.synthetic import DEMO_BASE

    base = Path(shutil.copytree(DEMO_BASE, tmp_path / "base"))
    tensors = load_file(base / "model.safetensors")
    key = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[key][0, 0] = float("inf")  # what a learning rate of 1e10 does to the weights after one step
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    steps = []
    with pytest.raises(TrainingDivergedError, match=r"loss nan at the first step, before any update; nothing was "
                                                    r"written: the model's weights hold NaN or Inf"):
        run_preliminary_finetune(base, ws / "data.jsonl", tmp_path / "out",
                                 FinetuneSettings(max_steps=3, subset_ratio=1.0, batch_size=2), progress=False,
                                 on_step=lambda *a: steps.append(a))
    assert steps == []  # stopped before the first optimizer step
    assert not (tmp_path / "out" / "finetuned").exists()
    assert not any(p.suffix == ".safetensors" for p in (tmp_path / "out").rglob("*"))


def test_the_second_sweeps_cases(ws, tmp_path, capsys, monkeypatch):
    """Cases a second new-user sweep found: a folder written into with --overwrite is not the tool's afterwards; a file
    added to an export is not deleted by the next export; a run folder is not replaced by an export; a dangling link;
    an input reached through a link inside --out; NaN in a hand-edited config; a --base that is no model; an export
    rank above every module's full rank; negative seeds; a --min-rank that makes every module full rank."""
    monkeypatch.setenv("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
    import json

    mine = Path(shutil.copytree(ws / "mine", tmp_path / "mine"))
    config = ws / "run" / "configs" / "lora_rank_config.json"
    extract = ["extract", "--base", str(ws / "base"), "--finetuned", str(ws / "ft"), "--config", str(config)]

    def refused(argv, fragment):
        before = _digest(tmp_path)
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
        assert _digest(tmp_path) == before

    # --overwrite lets a run write into a folder of the user's, but does not make it the tool's.
    from lora_ranks.outputs import claim_output_dir, read_marker

    claim_output_dir(mine, "svd-analysis", overwrite=True)
    assert read_marker(mine)["kind"] == "foreign"
    refused([*extract, "--out", str(mine)], "a run of this tool wrote into")
    refused(["analyze", "--base", str(ws / "base"), "--finetuned", str(ws / "ft"), "--out", str(mine)], "did not write")
    # A file added by hand to an export survives the next export (refused, naming it); --overwrite replaces.
    assert main(["export", str(ws / "adapter"), "--out", str(tmp_path / "exp")]) == 0
    (tmp_path / "exp" / "my_notes.txt").write_text("mine\n")
    refused(["export", str(ws / "adapter"), "--out", str(tmp_path / "exp")],
            "1 file(s) this tool did not write, or changed since it wrote them (my_notes.txt)")
    # A run folder of the tool is written into, never replaced whole by an adapter.
    run = Path(shutil.copytree(ws / "run", tmp_path / "run"))
    refused(["export", str(ws / "adapter"), "--out", str(run)], "holds a run of this tool: an adapter or model is never written")
    refused(["analyze", "--base", str(ws / "base"), "--finetuned", str(ws / "ft"), "--out", str(tmp_path / "exp")],
            "is an adapter or model folder of this tool")
    # Links: a dangling --out, an --out that links to a folder, an input linked from inside --out.
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    refused(["export", str(ws / "adapter"), "--out", str(tmp_path / "dangling")], "which does not exist")
    (tmp_path / "link").symlink_to(mine)
    refused(["export", str(ws / "adapter"), "--out", str(tmp_path / "link"), "--overwrite"], "is a symbolic link")
    (mine / "ftlink").symlink_to(ws / "ft")
    refused(["extract", "--base", str(ws / "base"), "--finetuned", str(mine / "ftlink"), "--config", str(config),
             "--out", str(mine), "--overwrite"], "contains --finetuned")
    # Hand-edited inputs.
    nan_config = tmp_path / "nan.json"
    nan_config.write_text(config.read_text().replace('"lora_alpha": ', '"lora_alpha": NaN, "x": ', 1))
    refused([*extract[:-1], str(nan_config), "--out", str(tmp_path / "new")], "NaN is not a JSON number")
    bad_adapter = Path(shutil.copytree(ws / "adapter", tmp_path / "bad-adapter"))
    raw = json.loads((bad_adapter / "adapter_config.json").read_text())
    (bad_adapter / "adapter_config.json").write_text(json.dumps({**raw, "r": -8}))
    refused(["export", str(bad_adapter), "--out", str(tmp_path / "new")], "r must be a positive number, got -8")
    refused(["export", str(ws / "adapter"), "--out", str(tmp_path / "new"), "--format", "merged", "--base", str(mine)],
            "has no config.json")
    refused(["export", str(ws / "adapter"), "--out", str(tmp_path / "new"), "--rank", "512"],
            "above the full rank of every module (at most 64)")
    # Numbers.
    refused(["compare", "--model", str(ws / "base"), "--data", str(ws / "data.jsonl"), "--out", str(tmp_path / "new"),
             "--seeds", "-1"], "seeds must be non-negative")
    refused(["finetune", "--model", str(ws / "base"), "--data", str(ws / "data.jsonl"), "--out", str(tmp_path / "new"),
             "--seed", "-1"], "--seed -1: input should be greater than or equal to 0")
    refused(["analyze", "--base", str(ws / "base"), "--finetuned", str(ws / "ft"), "--out", str(tmp_path / "new"),
             "--min-rank", "100", "--max-rank", "128"], "--min-rank 100 is at least the full rank of every module")


def test_the_third_sweeps_cases(ws, tmp_path, capsys, monkeypatch, prefect_harness):
    """Cases a third sweep found: a copied model folder (its marker too), a folder holding one file of a tool's name,
    a model copy inside a run, a link planted inside a run folder, '' and '.', a name too long, a folder that cannot
    be created although os.access says yes (/proc as root), a garbage marker, a warm start from the base itself or
    from no model, a PEFT file given as the rank config."""
    monkeypatch.setenv("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
    config = ws / "run" / "configs" / "lora_rank_config.json"
    adapter = str(ws / "adapter")

    def refused(argv, fragment):
        before = _digest(tmp_path)
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
        assert _digest(tmp_path) == before

    run = Path(shutil.copytree(ws / "run", tmp_path / "run"))
    from lora_ranks.synthetic import DEMO_BASE

    assert main(["finetune", "--model", str(DEMO_BASE), "--data", str(ws / "data.jsonl"), "--out", str(run),
                 "--max-steps", "1", "--subset-ratio", "1"]) == 0
    capsys.readouterr()
    model = run / "saved_models" / "preliminary_finetune" / "finetuned"
    copy = Path(shutil.copytree(model, tmp_path / "model-copy"))  # the user's copy, marker and all
    refused(["export", adapter, "--out", str(copy)], "holds a model folder of this tool, which this command would")
    refused(["extract", "--base", str(ws / "base"), "--finetuned", str(ws / "ft"), "--config", str(config),
             "--out", str(copy)], "holds a model folder of this tool")
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "export_report.json").write_text("{}")
    (reports / "notes.txt").write_text("precious")
    refused(["export", adapter, "--out", str(reports)], "is a folder this tool did not write")
    mine = Path(shutil.copytree(ws / "base", run / "my_model"))
    refused(["export", adapter, "--out", str(mine)], "is a folder this tool did not write")
    refused(["finetune", "--model", str(DEMO_BASE), "--data", str(ws / "data.jsonl"), "--out", str(run)],
            "holds my_model/config.json")  # documents the user added to the run folder since its last run
    shutil.rmtree(mine)
    (model / "MY_NOTES.txt").write_text("mine")
    refused(["finetune", "--model", str(DEMO_BASE), "--data", str(ws / "data.jsonl"), "--out", str(run)],
            "MY_NOTES.txt")  # found before the fine-tune, not when its result is saved
    (model / "MY_NOTES.txt").unlink()
    (run / "analysis_outputs" / "svd" / "plots").symlink_to(tmp_path / "reports")  # analyze_checkpoints makes none
    refused(["analyze", "--base", str(ws / "base"), "--finetuned", str(ws / "ft"), "--out", str(run)],
            "holds symbolic links (analysis_outputs/svd/plots)")
    monkeypatch.chdir(tmp_path / "reports")
    refused(["export", adapter, "--out", ""], "is the current folder")
    refused(["export", adapter, "--out", "."], "is the current folder")
    refused(["export", adapter, "--out", str(tmp_path)], "holds, the current folder")
    refused(["export", adapter, "--out", str(tmp_path / ("x" * 300))], "cannot be used: File name too long")
    if Path("/proc/self").is_dir():
        refused(["analyze", "--base", str(ws / "base"), "--finetuned", str(ws / "ft"), "--out", "/proc/lora-ranks-x"],
                "cannot be written")
    garbage = Path(shutil.copytree(ws / "adapter", tmp_path / "garbage"))
    (garbage / MARKER).write_text('{"kind": "folder", "files": null}')
    (garbage / "mine.txt").write_text("mine")
    refused(["export", adapter, "--out", str(garbage)], "holds a .lora-ranks file this tool did not write")
    train = ["train", "--model", str(ws / "base"), "--lora-config", str(config), "--data", str(ws / "data.jsonl"),
             "--out", str(tmp_path / "train")]
    refused([*train, "--warm-start-from", str(ws / "base")], "is the base model itself")
    refused([*train, "--warm-start-from", str(ws / "adapter")], "--warm-start-from: ")
    refused(["train", "--model", str(ws / "base"), "--lora-config", str(ws / "adapter" / "adapter_config.json"),
             "--data", str(ws / "data.jsonl"), "--out", str(tmp_path / "train")], "not a rank config")


def test_the_fourth_sweeps_cases(ws, tmp_path, capsys, monkeypatch):
    """An input reached through a link and '..' ('link/../adapter' is where the link points, not what the text
    folds to), and a marker that is a folder or a link."""
    monkeypatch.setenv("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
    adapter = Path(shutil.copytree(ws / "adapter", tmp_path / "adapter"))
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "adlink").symlink_to(ws / "ft")  # user/adlink/.. is ws, not user
    (tmp_path / "user" / "tmplink").symlink_to(adapter)  # user/tmplink/.. is tmp_path
    monkeypatch.chdir(tmp_path / "user")
    before = _digest(tmp_path)

    def refused(argv, fragment):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
        assert _digest(tmp_path) == before

    refused(["export", "tmplink/../adapter", "--out", str(adapter)], f"is ADAPTER_DIR ({adapter})")
    refused(["export", "tmplink/../adapter", "--out", str(adapter), "--overwrite"], "is ADAPTER_DIR")
    refused(["extract", "--base", str(ws / "base"), "--finetuned", "adlink/../ft", "--config",
             str(ws / "run" / "configs" / "lora_rank_config.json"), "--out", str(ws / "ft"), "--overwrite"],
            "is --finetuned")
    run = Path(shutil.copytree(ws / "run", tmp_path / "run"))
    (run / MARKER).unlink()
    (run / MARKER).mkdir()
    before = _digest(tmp_path)
    refused(["analyze", "--base", str(ws / "base"), "--finetuned", str(ws / "ft"), "--out", str(run)],
            "did not write")
    (run / MARKER).rmdir()
    (run / MARKER).symlink_to(tmp_path / "user")
    before = _digest(tmp_path)
    refused(["export", str(ws / "adapter"), "--out", str(run)], "did not write")


def test_a_warm_start_that_cannot_be_had_is_refused_not_trained_cold(ws, tmp_path, capsys):
    """init warm (the default) with a rank config whose fine-tuned model is gone, or that records none: one line
    naming both ways on (--warm-start-from, --init cold), exit 2, before Prefect starts and with nothing written
    (it used to warn in the log and train from PEFT's init)."""
    from lora_ranks.config import load_rank_config, save_rank_config

    config = load_rank_config(ws / "run" / "configs" / "lora_rank_config.json")
    recorded = config.checkpoints.model_dump()
    gone = save_rank_config(tmp_path / "gone.json", config.replace(analysis_metadata={"checkpoints": {
        **recorded, "finetuned": {**recorded["finetuned"], "path": str(tmp_path / "deleted-ft")}}}))
    none = save_rank_config(tmp_path / "none.json", config.replace(analysis_metadata={"checkpoints": None}))
    before = _digest(tmp_path)
    for path, fragment in ((gone, f"{tmp_path / 'deleted-ft'}, no longer exists"), (none, "records no fine-tuned model")):
        argv = ["train", "--model", str(ws / "base"), "--lora-config", str(path), "--data", str(ws / "data.jsonl"),
                "--out", str(tmp_path / "train")]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0] and "--warm-start-from" in err[0] and "--init cold" in err[0], err
        assert _digest(tmp_path) == before
