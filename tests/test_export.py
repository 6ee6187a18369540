"""Export: uniform-rank and merged adapters are exact through plain PEFT / transformers (no project code on the
loading side), the serving rules of vLLM and llama.cpp mis-scale the heterogeneous originals and not the exports,
and bad adapters are refused with the module or value named, nothing written."""

import json
import shutil

import pytest
import torch
from pydantic import ValidationError

from lora_ranks.analysis import analyze_checkpoints
from lora_ranks.export import (
    AdapterError,
    export_merged,
    export_uniform,
    read_adapter,
    served_scales,
    serving_problems,
)
from lora_ranks.extract import extract_lora
from lora_ranks.ranks import AllocationSettings
from lora_ranks.settings import SERVING_RANKS, AlphaPolicy, ExportSettings

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 8, 200, 11, 64, 2]])
EXACT = 1e-5  # float32: max |logit difference| relative to max |logit|


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _peft_logits(base_dir, adapter_dir, tokens=TOKENS):
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(base_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(tokens).logits


def _served_logits(base_dir, adapter_dir, server, tokens=TOKENS):
    """Logits as ``server`` computes them: W + s B A with the server's scale s and each tensor at its own shape."""
    adapter = read_adapter(adapter_dir)
    model = _base(base_dir)
    layers = dict(model.named_modules())
    with torch.no_grad():
        for name, scale in served_scales(adapter, server).items():
            m = adapter.modules[name]
            layers[name].weight += scale * (m.lora_B.double() @ m.lora_A.double()).float()
        return model(tokens).logits


@pytest.fixture(scope="module")
def adapters(planted_pair, tmp_path_factory):
    """Extracted adapters of the planted pair with heterogeneous ranks: the constant and the rslora alpha policy."""
    out = {}
    for policy in ("constant", "rslora"):
        root = tmp_path_factory.mktemp(policy)
        analyze_checkpoints(*planted_pair, root, settings=AllocationSettings(energy_threshold=0.99, min_rank=2, max_rank=16,
                                                                             smoothing="none"),
                            alpha_policy=AlphaPolicy(policy=policy))
        extract_lora(*planted_pair, root / "configs" / "lora_rank_config.json", root / "adapter")
        out[policy] = root / "adapter"
    ranks = read_adapter(out["constant"]).ranks
    by_kind = {}
    for name, r in ranks.items():
        by_kind.setdefault(name.rsplit(".", 1)[-1], set()).add(r)
    assert any(len(v) > 1 for v in by_kind.values()), "needs ranks that differ across layers of one module type"
    return out


@pytest.fixture(scope="module")
def hand_made(planted_pair, tmp_path_factory):
    """A PEFT adapter written by PEFT itself: rank and alpha patterns, rsLoRA, random A and B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                        rank_pattern={"model.layers.0.self_attn.q_proj": 2, "layers.1.self_attn.q_proj": 7},
                        alpha_pattern={"model.layers.1.mlp.down_proj": 11}, init_lora_weights=False)
    model = get_peft_model(_base(planted_pair[0]), config)
    out = tmp_path_factory.mktemp("hand") / "adapter"
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("which", ["constant", "rslora", "hand"])
def test_uniform_export_is_exact_through_plain_peft(which, adapters, hand_made, planted_pair, tmp_path):
    source = hand_made if which == "hand" else adapters[which]
    report = export_uniform(source, tmp_path / "uniform")
    config = json.loads((tmp_path / "uniform" / "adapter_config.json").read_text())
    assert report.rank == min(r for r in SERVING_RANKS if r >= max(read_adapter(source).ranks.values()))
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["rank_pattern"], config["alpha_pattern"]) == \
        (report.rank, report.rank, False, {}, {})
    assert set(read_adapter(tmp_path / "uniform").ranks.values()) == {report.rank}
    assert report.bytes_after > report.bytes_before
    base = _base(planted_pair[0])
    with torch.no_grad():
        base_logits = base(TOKENS).logits
    original, exported = _peft_logits(planted_pair[0], source), _peft_logits(planted_pair[0], tmp_path / "uniform")
    assert _rel(original, base_logits) > 1e-3  # the adapter matters, so equality below means something
    assert _rel(exported, original) <= EXACT


def test_serving_rules_mis_scale_the_originals_and_not_the_exports(adapters, hand_made, planted_pair, tmp_path):
    """vLLM's global scale breaks rsLoRA adapters; llama.cpp's alpha / own rank breaks the constant policy wherever
    r_i differs from r; both read the uniform export exactly."""
    cases = [("vLLM", adapters["rslora"]), ("vLLM", hand_made), ("llama.cpp", adapters["constant"]),
             ("llama.cpp", hand_made)]
    for i, (server, source) in enumerate(cases):
        peft_logits = _peft_logits(planted_pair[0], source)
        assert server in serving_problems(read_adapter(source))
        assert _rel(_served_logits(planted_pair[0], source, server), peft_logits) > 1e-3, (server, source)
        export_uniform(source, tmp_path / f"u{i}")
        assert serving_problems(read_adapter(tmp_path / f"u{i}")) == {}
        assert _rel(_served_logits(planted_pair[0], tmp_path / f"u{i}", server), peft_logits) <= EXACT, (server, source)
    # vLLM reads the constant policy right (alpha_i / r_i is the same everywhere); SGLang and LoRAX do not.
    problems = serving_problems(read_adapter(adapters["constant"]))
    assert "vLLM" not in problems and {"SGLang", "LoRAX / TGI", "llama.cpp"} <= set(problems)


def test_explicit_serving_rank_and_its_refusals(adapters, tmp_path):
    assert export_uniform(adapters["constant"], tmp_path / "u32", rank=32).rank == 32
    largest = max(read_adapter(adapters["constant"]).ranks.values())
    with pytest.raises(AdapterError, match=f"--rank 1 is below the largest module rank {largest}"):
        export_uniform(adapters["constant"], tmp_path / "u8", rank=1)
    with pytest.raises(ValidationError, match="rank=12 is not a serving rank"):
        ExportSettings(rank=12)
    assert not (tmp_path / "u8").exists()


def test_merged_export_matches_the_unmerged_model_and_is_sharded_like_the_base(adapters, planted_pair, tmp_path):
    base_dir = tmp_path / "sharded-base"
    _base(planted_pair[0]).save_pretrained(str(base_dir), max_shard_size="300KB")
    for f in planted_pair[0].iterdir():
        if f.suffix != ".safetensors" and not (base_dir / f.name).exists() and f.name != "model.safetensors.index.json":
            shutil.copy2(f, base_dir / f.name)
    from lora_ranks.synthetic import train_tokenizer

    train_tokenizer(["a tokenizer the merged folder must carry"], vocab_size=300).save_pretrained(str(base_dir))
    shards = sorted(base_dir.glob("*.safetensors"))
    assert len(shards) > 1
    report = export_merged(adapters["rslora"], tmp_path / "merged", base=base_dir)
    merged = sorted((tmp_path / "merged").glob("*.safetensors"))
    assert len(merged) > 1 and max(p.stat().st_size for p in merged) <= max(p.stat().st_size for p in shards)
    assert (tmp_path / "merged" / "tokenizer.json").is_file() and report.note is None
    with torch.no_grad():
        merged_logits = _base(tmp_path / "merged")(TOKENS).logits
    assert _rel(merged_logits, _peft_logits(base_dir, adapters["rslora"])) <= EXACT


def test_a_qwen25_vl_language_model_adapter_exports_exactly(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    from tests.helpers import tiny_qwen25_vl

    torch.manual_seed(0)
    tiny_qwen25_vl().save_pretrained(str(tmp_path / "vl"))
    load = lambda path: Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()  # noqa: E731
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|down_proj)", init_lora_weights=False,
                        rank_pattern={"model.language_model.layers.1.self_attn.q_proj": 6}, use_rslora=True)
    get_peft_model(load(tmp_path / "vl"), config).save_pretrained(str(tmp_path / "adapter"))
    tokens = torch.tensor([[3, 9, 27, 81, 100, 12]])

    def logits(model):
        with torch.no_grad():
            return model(input_ids=tokens).logits

    original = logits(PeftModel.from_pretrained(load(tmp_path / "vl"), str(tmp_path / "adapter")))
    assert _rel(original, logits(load(tmp_path / "vl"))) > 1e-3
    export_uniform(tmp_path / "adapter", tmp_path / "uniform")
    assert _rel(logits(PeftModel.from_pretrained(load(tmp_path / "vl"), str(tmp_path / "uniform"))), original) <= EXACT
    export_merged(tmp_path / "adapter", tmp_path / "merged")
    assert _rel(logits(load(tmp_path / "merged")), original) <= EXACT


def test_saved_adapters_say_which_servers_would_mis_serve_them(adapters, tmp_path):
    readme = (adapters["constant"] / "README.md").read_text()
    assert "llama.cpp" in readme and "SGLang" in readme and "lora-ranks export" in str(readme)
    assert str(adapters["constant"].resolve()) in readme  # the final folder, not the staging one
    export_uniform(adapters["constant"], tmp_path / "u")
    assert not (tmp_path / "u" / "README.md").exists()


def test_bad_adapters_are_refused_with_the_problem_named_and_nothing_written(adapters, planted_pair, tmp_path):
    from tests.helpers import tiny_qwen25_vl

    def refused(folder, match, **kw):
        with pytest.raises(AdapterError, match=match):
            (export_merged if "base" in kw else export_uniform)(folder, tmp_path / "out", **kw)
        assert not (tmp_path / "out").exists()

    refused(tmp_path / "missing", "no such adapter folder")
    bad = tmp_path / "bad"
    shutil.copytree(adapters["constant"], bad)
    (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    refused(bad, r"no adapter_model.safetensors \(weights found: adapter_model.bin")
    (bad / "adapter_model.bin").rename(bad / "adapter_model.safetensors")
    config = json.loads((bad / "adapter_config.json").read_text())
    key = next(iter(config["rank_pattern"]))
    config["rank_pattern"][key] += 1
    (bad / "adapter_config.json").write_text(json.dumps(config))
    refused(bad, "weights have rank .* but adapter_config.json gives rank")
    (bad / "adapter_config.json").unlink()
    refused(bad, "has no adapter_config.json")
    tiny_qwen25_vl().save_pretrained(str(tmp_path / "other-base"))
    refused(adapters["constant"], r"does not fit the base model: none of its \d+ modules .* is a linear module of the base",
            base=tmp_path / "other-base")
    from lora_ranks.synthetic import build_tiny_qwen3

    build_tiny_qwen3(tmp_path / "narrow-base", hidden_size=32, intermediate_size=88)  # same names, other shapes
    refused(adapters["constant"], r"model.layers.0.mlp.down_proj: adapter is 64x176 but the base's weight is 32x88",
            base=tmp_path / "narrow-base")


def test_cli_export_and_its_one_line_errors(adapters, tmp_path, capsys):
    from flows.cli import main

    assert main(["export", str(adapters["constant"]), "--out", str(tmp_path / "u")]) == 0
    assert "global scale 1" in capsys.readouterr().out
    assert main(["export", str(adapters["constant"]), "--out", str(tmp_path / "v"), "--rank", "12"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-ranks: error:") and "12" in err and "\n" not in err
    assert main(["export", str(adapters["constant"]), "--out", str(tmp_path / "v"), "--rank", "1"]) == 2
    assert "below the largest module rank" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_an_adapter_trained_on_a_quantized_base_merges_into_the_full_precision_weights(adapters, planted_pair, tmp_path):
    """The merged model is W + s B A with the unquantized W (what a server of the merged model needs), and the
    report says the quantized training model differed from it by the quantization error."""
    source = tmp_path / "qlora"
    shutil.copytree(adapters["constant"], source)
    (source / "lora_ranks_adapter.json").write_text(json.dumps({"made_by": "train", "quantization": "4bit"}))
    report = export_merged(source, tmp_path / "merged", base=planted_pair[0])
    assert "4bit-quantized base" in report.note and "full-precision" in report.note
    with torch.no_grad():
        merged = _base(tmp_path / "merged")(TOKENS).logits
    assert _rel(merged, _peft_logits(planted_pair[0], source)) <= EXACT
