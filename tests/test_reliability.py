"""Reliability and security guarantees that are not covered stage by stage elsewhere."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from lora_ranks.analysis import OutputLayout, analyze_checkpoints, load_spectra, spectra_files
from lora_ranks.checkpoints import CheckpointError, CheckpointPair
from lora_ranks.config import RankConfigError, check_config_matches_model
from lora_ranks.loading import load_model
from lora_ranks.plots import write_plots, write_raw_data
from lora_ranks.synthetic import write_planted_pair


def test_identical_checkpoints_fall_to_min_rank_with_a_warning(planted_pair, tmp_path):
    base = planted_pair[0]
    with pytest.warns(UserWarning, match=r"14 module\(s\) did not change"):
        config = analyze_checkpoints(base, base, tmp_path)
    assert set(config.rank_pattern.values()) == {4}
    assert len(config.analysis_metadata.zero_delta_modules) == 14
    assert all(m.zero_delta and m.raw_rank == 0 for m in config.modules.values())
    assert np.isfinite(config.compression_ratio)
    spectra = load_spectra(spectra_files(tmp_path / "analysis_outputs" / "svd"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log-scale axes of all-zero data warn; the files must still be written
        layout = OutputLayout(tmp_path)
        paths = {**write_plots(layout, config, spectra), **write_raw_data(layout, config, spectra)}
    assert all(Path(p).stat().st_size > 0 for p in paths.values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_named(planted_pair, tmp_path, bad):
    base = shutil.copytree(planted_pair[0], tmp_path / "base")
    from safetensors import safe_open

    with safe_open(str(planted_pair[0] / "model.safetensors"), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    tensors["model.layers.1.self_attn.o_proj.weight"][3, 5] = bad
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    pair = CheckpointPair(base, planted_pair[1])
    module = next(m for m in pair.modules() if m.name == "model.layers.1.self_attn.o_proj")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight.*NaN or Inf"):
        pair.delta(module)


def test_config_naming_modules_the_model_lacks_is_refused(planted_pair, tmp_path):
    config = analyze_checkpoints(*planted_pair, tmp_path)
    check_config_matches_model(config, planted_pair[0])  # fits its own model (built on the meta device)
    other = write_planted_pair(tmp_path / "b1", tmp_path / "f1", num_layers=1, hidden_size=32, num_heads=2,
                               num_kv_heads=1, intermediate_size=64)
    with pytest.raises(RankConfigError) as err:
        check_config_matches_model(config, other[0])
    assert "model.layers.1.self_attn.q_proj: no such module" in str(err.value)
    assert "7 of another shape (e.g. model.layers.0.self_attn.q_proj: weight shape (32, 32) but the config was made " \
           "for (64, 64))" in str(err.value)
    assert "made for another model" in str(err.value)


def test_remote_code_never_runs_by_default(tmp_path):
    """A model folder that ships Python code: loading it must fail, and the code must not have run."""
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n"
                                    "    model_type = 'evil'\n")
    with pytest.raises(Exception, match="trust_remote_code"):
        load_model(folder)
    assert not marker.exists()


def test_analyze_then_extract_as_typed_and_no_secret_reaches_any_output(planted_pair, tmp_path, capsys):
    """The documented commands, as a user types them: analyze a pair (the command's own process, with its temporary
    Prefect server, on this test worker's Prefect home), then extract its adapter (no Prefect: the command line's
    ``main`` in this process). API keys in the environment reach no output file, terminal line, log or artifact:
    the Prefect database, where the temporary server kept the run's logs and artifacts, holds no byte of them."""
    import os
    import subprocess
    import sys

    import flows.cli

    sentinel = "sk-test-SENTINEL-4f9c1d"
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
           **{var: sentinel for var in ("WANDB_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY")}}
    out = tmp_path / "an"
    done = subprocess.run([str(Path(sys.executable).with_name("lora-ranks")), "analyze", "--base", str(planted_pair[0]),
                           "--finetuned", str(planted_pair[1]), "--out", str(out), "--energy", "0.95", "--min-rank",
                           "2", "--round-to", "2"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    config_path = out / "configs" / "lora_rank_config.json"
    assert f"Rank config:        {config_path}" in done.stdout
    config = json.loads(config_path.read_text())
    assert config["analysis_metadata"]["settings"]["energy_threshold"] == 0.95
    assert all(r % 2 == 0 for r in config["rank_pattern"].values())
    assert sentinel not in done.stdout + done.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 5
    for path in files:
        assert sentinel.encode() not in path.read_bytes(), path
    home = Path(os.environ["PREFECT_HOME"])
    database = b"".join(p.read_bytes() for p in (home / "prefect.db", home / "prefect.db-wal") if p.exists())
    assert str(out).encode() in database  # the run is recorded there (its parameters)
    assert b"Finished in state Completed()" in database  # and its logs
    assert database.count(sentinel.encode()) == 0

    capsys.readouterr()
    status = flows.cli.main(["extract", "--base", str(planted_pair[0]), "--finetuned", str(planted_pair[1]),
                             "--config", str(config_path), "--out", str(tmp_path / "adapter")])
    stdout, stderr = capsys.readouterr()
    assert status == 0, stderr[-3000:]
    assert "Adapter:" in stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_atomic_writes_leave_no_temporary_files(planted_pair, tmp_path):
    """No temporary file is left, and every output has the permissions of a normally created file (0o666 less the
    umask), safetensors files included (their writer used to keep the temporary file's 0o600)."""
    import os

    analyze_checkpoints(*planted_pair, tmp_path)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == []
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}


def test_interrupted_write_keeps_the_previous_layer_file(planted_pair, tmp_path, monkeypatch):
    """A crash while a layer file is being written leaves the previous complete file, never a partial one."""

    analyze_checkpoints(*planted_pair, tmp_path)
    path = tmp_path / "analysis_outputs" / "svd" / "raw_data" / "layers" / "model.layers.0.safetensors"
    before = path.read_bytes()

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr("lora_ranks.analysis.layout.save_file", crash_midway)  # the layer files' writer
    with pytest.raises(KeyboardInterrupt):
        analyze_checkpoints(*planted_pair, tmp_path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_plot_and_raw_data_paths_do_not_collide(planted_pair, tmp_path):
    config = analyze_checkpoints(*planted_pair, tmp_path)
    spectra = load_spectra(spectra_files(tmp_path / "analysis_outputs" / "svd"))
    layout = OutputLayout(tmp_path)
    plots, raw = write_plots(layout, config, spectra), write_raw_data(layout, config, spectra)
    assert not set(plots) & set(raw)  # the report task merges them into one dict
    assert sorted(Path(p).name for p in plots.values()) == ["cumulative_energy.png", "rank_heatmap.png", "singular_values.png"]


def test_interrupted_adapter_save_keeps_the_previous_adapter(planted_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from lora_ranks.model import DynamicLoRAConfig, create_peft_model_from_config, save_adapter

    config = analyze_checkpoints(*planted_pair, tmp_path / "an")
    dyn = DynamicLoRAConfig(config)
    model = create_peft_model_from_config(AutoModelForCausalLM.from_pretrained(planted_pair[0]), dyn)
    target = save_adapter(model, tmp_path / "adapter", dyn)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash_midway(path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "adapter_model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("killed while saving")

    model.save_pretrained = crash_midway
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path / "adapter", dyn)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


@pytest.mark.parametrize("crash_at,survivor", [("write", "old"), ("old-aside", "old"), ("between-renames", "new"),
                                               ("cleanup", "new")])
def test_atomic_folder_survives_a_crash_at_every_step(tmp_path, monkeypatch, crash_at, survivor):
    """Checkpoint and adapter folders: a crash at any step leaves the complete old or the complete new folder, and
    the next write of it recovers it, leaving nothing else behind."""
    import os

    from lora_ranks import _io
    from lora_ranks.checkpoints import CheckpointError, resolve_model_path

    target = tmp_path / "adapter"
    with _io.atomic_folder(target) as staging:
        (staging / "weights").write_text("old")
    renames, real_rename, real_rmtree = [], os.rename, _io.shutil.rmtree

    def rename(src, dst):
        renames.append(dst)
        if (crash_at, len(renames)) in (("old-aside", 1), ("between-renames", 2)):
            raise KeyboardInterrupt(f"killed at {crash_at}")
        real_rename(src, dst)

    def rmtree(path, **kwargs):
        if crash_at == "cleanup":
            raise KeyboardInterrupt("killed while deleting the old folder")
        real_rmtree(path, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(_io.shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        with _io.atomic_folder(target) as staging:
            (staging / "weights").write_text("new")
            if crash_at == "write":
                raise KeyboardInterrupt("killed while writing")
    monkeypatch.undo()
    # At this instant a complete folder exists: under the target name, or (between the renames) both beside it.
    contents = {p.name: (p / "weights").read_text() for p in tmp_path.iterdir() if (p / "weights").is_file()}
    assert survivor in contents.values()
    if crash_at == "between-renames":  # opening the missing folder names the complete copy and moves nothing
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(CheckpointError, match=r"a write of it was interrupted, and its complete new copy is .*"
                                                  r"\.adapter\.lora-ranks-[0-9a-f]+\.new"):
            resolve_model_path(target)
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    _io.recover_folder(target)  # what the next write of it does first
    assert (target / "weights").read_text() == survivor
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
