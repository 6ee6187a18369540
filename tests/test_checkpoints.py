"""Checkpoint pairs: lazy reads, planted-spectrum correctness, sharding, dtypes, names, bad inputs."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_ranks.analysis import analyze_checkpoints
from lora_ranks.checkpoints import Checkpoint, CheckpointError, CheckpointPair, TargetSpec
from lora_ranks.settings import AllocationSettings, AnalysisSettings
from lora_ranks.synthetic import write_planted_pair
from tests.helpers import tiny_qwen25_vl


def _stored(folder):
    """Every tensor of a (single-file or sharded) safetensors folder, as stored."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _reference_raw_ranks(base, ft, tau):
    """Raw energy ranks from a float64 full SVD of the stored tensors (the exact reference)."""
    a, b = _stored(base), _stored(ft)
    ranks = {}
    for key in a:
        if key.endswith("proj.weight") and a[key].ndim == 2:
            s = torch.linalg.svdvals(b[key].double() - a[key].double())
            cum = torch.cumsum(s**2, 0) / torch.sum(s**2)
            ranks[key[: -len(".weight")]] = int(torch.nonzero(cum >= tau * (1 - 1e-12))[0]) + 1
    return ranks


@pytest.mark.parametrize("tau", [0.8, 0.9, 0.99])
def test_raw_ranks_equal_float64_reference(planted_pair, tmp_path, tau):
    base, ft = planted_pair
    settings = AllocationSettings(energy_threshold=tau, min_rank=1, max_rank=64, smoothing="none")
    config = analyze_checkpoints(base, ft, tmp_path, settings=settings)
    got = {n: m.raw_rank for n, m in config.modules.items()}
    assert got == _reference_raw_ranks(base, ft, tau)
    assert len(got) == 14


def test_sharded_and_single_file_give_identical_configs(tmp_path):
    single = write_planted_pair(tmp_path / "s_base", tmp_path / "s_ft", planted_rank=(4, 9))
    sharded = write_planted_pair(tmp_path / "m_base", tmp_path / "m_ft", planted_rank=(4, 9), max_shard_size="60KB")
    assert (sharded[0] / "model.safetensors.index.json").is_file()
    assert len(list(sharded[0].glob("*.safetensors"))) > 1
    a = analyze_checkpoints(*single, tmp_path / "a")
    b = analyze_checkpoints(*sharded, tmp_path / "b")
    assert a.rank_pattern == b.rank_pattern
    def strip(c):
        return {n: m.model_dump(exclude={"svd_seconds"}) for n, m in c.modules.items()}
    assert strip(a) == strip(b)



@pytest.mark.parametrize("plan", [(1, 2), (3, 1)], ids=["one-at-a-time", "side-by-side"])
def test_side_by_side_spectra_equal_one_at_a_time(planted_pair, tmp_path, monkeypatch, plan):
    """A layer's matrices computed concurrently (threads, one BLAS thread each) give the same ranks and, to
    round-off (1e-12 relative), the same spectra as one matrix at a time, in module order."""
    import lora_ranks.analysis.layer as layer
    from lora_ranks.analysis import load_spectra, spectra_files

    reference = analyze_checkpoints(*planted_pair, tmp_path / "ref")
    monkeypatch.setattr(layer, "parallel_plan", lambda jobs, device: plan)
    config = analyze_checkpoints(*planted_pair, tmp_path / "run")
    assert config.rank_pattern == reference.rank_pattern
    ours, ref = (load_spectra(spectra_files(tmp_path / d / "analysis_outputs" / "svd")) for d in ("run", "ref"))
    assert list(ours) == list(ref)
    for name in ref:
        np.testing.assert_allclose(ours[name].singular_values, ref[name].singular_values, rtol=1e-12,
                                   atol=1e-12 * ref[name].singular_values[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_delta_by_blocks_is_exact(tmp_path, monkeypatch, dtype):
    """The delta is built in place by blocks of rows; with blocks of 2-3 rows it still equals
    dtype(fine-tuned) - dtype(base) of the stored bf16 tensors bit for bit, and never writes into them."""
    import lora_ranks.checkpoints.pair as checkpoints

    base, ft = write_planted_pair(tmp_path / "base", tmp_path / "ft", planted_rank=(5,), dtype="bfloat16")
    monkeypatch.setattr(checkpoints, "_DELTA_BLOCK_ELEMENTS", 150)  # 2 rows of a 64-wide matrix per block
    pair = CheckpointPair(base, ft)
    stored_base, stored_ft = _stored(base), _stored(ft)
    for module in pair.modules():
        got = pair.delta(module, dtype=dtype)
        want = stored_ft[module.weight_key].to(dtype) - stored_base[module.weight_key].to(dtype)
        assert got.dtype == dtype and torch.equal(got, want), module.name
        assert torch.equal(pair.base.get(module.weight_key), stored_base[module.weight_key])

def test_bf16_pair_matches_reference_of_stored_tensors(tmp_path):
    base, ft = write_planted_pair(tmp_path / "base", tmp_path / "ft", planted_rank=(5, 12), dtype="bfloat16", noise=1e-2)
    assert _stored(base)["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    settings = AllocationSettings(energy_threshold=0.9, min_rank=1, max_rank=64, smoothing="none")
    config = analyze_checkpoints(base, ft, tmp_path / "out", settings=settings)
    got = {n: m.raw_rank for n, m in config.modules.items()}
    assert got == _reference_raw_ranks(base, ft, 0.9)


def test_delta_is_float32_and_exact(planted_pair):
    pair = CheckpointPair(*planted_pair)
    module = pair.modules()[0]
    delta = pair.delta(module)
    assert delta.dtype == torch.float32 and tuple(delta.shape) == module.shape
    a, b = _stored(planted_pair[0]), _stored(planted_pair[1])
    torch.testing.assert_close(delta, b[module.weight_key] - a[module.weight_key], rtol=0, atol=0)


def test_modules_are_ordered_and_typed(planted_pair):
    modules = CheckpointPair(*planted_pair).modules()
    assert [m.module_type for m in modules[:7]] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert [m.depth for m in modules] == [0] * 7 + [1] * 7
    only_mlp = CheckpointPair(*planted_pair).modules(TargetSpec(target_regex=r".*\.mlp\.(up|down)_proj"))
    assert {m.module_type for m in only_mlp} == {"up_proj", "down_proj"}


def _copy_pair(planted_pair, tmp_path):
    base = shutil.copytree(planted_pair[0], tmp_path / "base")
    ft = shutil.copytree(planted_pair[1], tmp_path / "ft")
    return base, ft


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    tensors = _stored(folder)
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_shape_mismatch_names_the_tensor(planted_pair, tmp_path):
    base, ft = _copy_pair(planted_pair, tmp_path)
    _rewrite(ft, lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape"):
        CheckpointPair(base, ft).modules()


def test_missing_tensor_is_named(planted_pair, tmp_path):
    base, ft = _copy_pair(planted_pair, tmp_path)
    _rewrite(ft, lambda t: t.pop("model.layers.0.self_attn.v_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.v_proj\.weight.*missing"):
        CheckpointPair(base, ft).modules()


def test_architecture_mismatch_is_named(planted_pair, tmp_path):
    base, ft = _copy_pair(planted_pair, tmp_path)
    cfg = json.loads((ft / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (ft / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        CheckpointPair(base, ft)


def test_nan_weight_is_named(planted_pair, tmp_path):
    base, ft = _copy_pair(planted_pair, tmp_path)

    def poison(t):
        t["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")

    _rewrite(ft, poison)
    pair = CheckpointPair(base, ft)
    module = next(m for m in pair.modules() if m.name.endswith("layers.0.mlp.down_proj"))
    with pytest.raises(CheckpointError, match=r"down_proj\.weight.*NaN"):
        pair.delta(module)


def test_truncated_safetensors_is_refused(planted_pair, tmp_path):
    base, ft = _copy_pair(planted_pair, tmp_path)
    path = ft / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Checkpoint(ft)


def test_pickle_checkpoints_are_refused_by_default(planted_pair, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(planted_pair[0] / "config.json", folder / "config.json")
    torch.save(_stored(planted_pair[0]), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint(folder)
    opened = Checkpoint(folder, allow_pickle=True)  # explicit opt-in loads with weights_only=True
    assert opened.get("model.layers.0.self_attn.q_proj.weight").shape == (64, 64)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint(tmp_path / "empty")


def test_qwen25_vl_names_match_the_loaded_model(tmp_path):
    """On disk `model.layers.N` / `visual.blocks.N`; loaded `model.language_model.layers.N` / `model.visual...`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = tiny_qwen25_vl()
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ft")
    disk = _stored(tmp_path / "base")
    assert "model.layers.0.self_attn.q_proj.weight" in disk and "visual.blocks.0.attn.qkv.weight" in disk

    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "base")
    linear_names = {n for n, m in loaded.named_modules() if isinstance(m, torch.nn.Linear)}
    pair = CheckpointPair(tmp_path / "base", tmp_path / "ft")

    text_only = pair.modules()
    assert len(text_only) == 14
    assert all(m.name.startswith("model.language_model.layers.") for m in text_only)
    assert {m.name for m in text_only} <= linear_names

    with_vision = pair.modules(TargetSpec(include_vision=True))
    vision = [m for m in with_vision if m.module_type.startswith("visual.")]
    assert len(vision) == 10  # 2 blocks x (qkv, proj, gate, up, down)
    assert all(m.name.startswith("model.visual.blocks.") for m in vision)
    assert {m.name for m in with_vision} <= linear_names
    assert "model.visual.blocks.1.attn.qkv" in {m.name for m in vision}


def test_saved_deltas_are_exact(planted_pair, tmp_path):
    analyze_checkpoints(*planted_pair, tmp_path, analysis=AnalysisSettings(save_deltas=True))
    files = sorted((tmp_path / "analysis_outputs" / "svd" / "delta_weights").glob("*.safetensors"))
    assert [f.name for f in files] == ["model.layers.0.safetensors", "model.layers.1.safetensors"]
    a, b = _stored(planted_pair[0]), _stored(planted_pair[1])
    with safe_open(str(files[1]), "pt") as h:
        saved = h.get_tensor("model.layers.1.mlp.down_proj")
    torch.testing.assert_close(saved, b["model.layers.1.mlp.down_proj.weight"] - a["model.layers.1.mlp.down_proj.weight"],
                               rtol=0, atol=0)


def test_saved_singular_vectors_give_the_truncated_svd_at_any_rank(planted_pair, tmp_path):
    analyze_checkpoints(*planted_pair, tmp_path, analysis=AnalysisSettings(save_vectors=True),
                        settings=AllocationSettings(min_rank=1, max_rank=20, smoothing="none"))
    path = tmp_path / "analysis_outputs" / "svd" / "singular_vectors" / "model.layers.0.safetensors"
    pair = CheckpointPair(*planted_pair)
    module = next(m for m in pair.modules() if m.name == "model.layers.0.mlp.gate_proj")
    delta = pair.delta(module).double()
    s = torch.linalg.svdvals(delta)
    with safe_open(str(path), "pt") as h:
        lora_a, lora_b = h.get_tensor(f"{module.name}.A").double(), h.get_tensor(f"{module.name}.B").double()
    assert lora_a.shape == (21, 64) and lora_b.shape == (176, 21)  # top_k = max_rank + 1
    for r in (1, 5, 21):
        err = torch.linalg.vector_norm(delta - lora_b[:, :r] @ lora_a[:r]) / torch.linalg.vector_norm(delta)
        optimal = torch.sqrt(torch.sum(s[r:] ** 2) / torch.sum(s**2))
        assert float(err) == pytest.approx(float(optimal), abs=1e-6)
