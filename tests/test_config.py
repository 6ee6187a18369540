"""The rank config: round trip, schema validation, atomic writes, and PEFT honouring every rank."""

import json

import pytest
import torch

from lora_ranks.analysis import analyze_checkpoints
from lora_ranks.config import AlphaPolicy, RankConfigError, anchored_key, load_rank_config, save_rank_config
from lora_ranks.ranks import AllocationSettings


@pytest.fixture(scope="module")
def config_and_path(planted_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("cfg")
    settings = AllocationSettings(energy_threshold=0.99, min_rank=2, max_rank=16, smoothing="none")
    config = analyze_checkpoints(*planted_pair, out, settings=settings)
    return config, out / "configs" / "lora_rank_config.json"


def test_round_trip_and_content(config_and_path):
    config, path = config_and_path
    assert load_rank_config(path) == config
    assert config["schema_version"] == 1
    assert set(config["layer_ranks"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name, meta in config["analysis_metadata"]["modules"].items():
        assert config["rank_pattern"][anchored_key(name)] == meta["final_rank"]
        assert 2 <= meta["final_rank"] <= 16
        assert config["alpha_pattern"][anchored_key(name)] == 2 * meta["final_rank"]
        assert 0.0 < meta["energy_retained"] <= 1.0 + 1e-12
    trainable = sum(m["final_rank"] * sum(m["shape"]) for m in config["analysis_metadata"]["modules"].values())
    assert config["trainable_parameters"] == trainable
    assert config["compression_ratio"] == pytest.approx(trainable / config["base_parameters"])
    ident = config["analysis_metadata"]["checkpoints"]
    assert len(ident["pretrained"]["content_fingerprint"]) == 64
    assert ident["pretrained"]["content_fingerprint"] != ident["finetuned"]["content_fingerprint"]


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(schema_version=2), "schema_version"),
    (lambda c: c.pop("rank_pattern"), "rank_pattern"),
    (lambda c: c["rank_pattern"].update({next(iter(c["rank_pattern"])): 0}), "positive"),
    (lambda c: c["rank_pattern"].update({"^model\\.nope": 4}), "not an anchored target"),
    (lambda c: c["rank_pattern"].pop(next(iter(c["rank_pattern"]))), "no rank for target"),
    (lambda c: c.update(target_modules=[]), "non-empty"),
    (lambda c: c.update(compression_ratio=-1), "compression_ratio"),
])
def test_schema_violations_are_named(config_and_path, tmp_path, edit, match):
    config = json.loads(json.dumps(config_and_path[0]))
    edit(config)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    with pytest.raises(RankConfigError, match=match):
        load_rank_config(path)


def test_invalid_json_and_missing_file(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(RankConfigError, match="not valid JSON"):
        load_rank_config(tmp_path / "x.json")
    with pytest.raises(RankConfigError, match="does not exist"):
        load_rank_config(tmp_path / "missing.json")


def test_failed_write_keeps_the_previous_file(config_and_path, tmp_path):
    config, _ = config_and_path
    path = tmp_path / "lora_rank_config.json"
    save_rank_config(path, config)
    before = path.read_bytes()
    broken = json.loads(json.dumps(config))
    broken["compression_ratio"] = float("nan")  # refused by validation before anything is written
    with pytest.raises(RankConfigError):
        save_rank_config(path, broken)
    unserializable = json.loads(json.dumps(config))
    unserializable["analysis_metadata"]["x"] = object()  # fails while serializing
    with pytest.raises(TypeError):
        save_rank_config(path, unserializable)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lora_rank_config.json"]  # no temp files left


def test_rslora_policy():
    policy = AlphaPolicy(policy="rslora", scale=2.0)
    assert policy.alpha(4) == policy.alpha(64) == 16
    with pytest.raises(ValueError, match="policy"):
        AlphaPolicy(policy="sqrt")


def test_peft_builds_exactly_the_configured_ranks(config_and_path, planted_pair):
    """The contract: PEFT's rank_pattern matching gives every module exactly its configured rank."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config, _ = config_and_path
    assert len(set(config["rank_pattern"].values())) > 1  # heterogeneous, or the test proves little
    model = AutoModelForCausalLM.from_pretrained(planted_pair[0])
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=config["target_modules"], rank_pattern=config["rank_pattern"],
                      alpha_pattern=config["alpha_pattern"])
    peft_model = get_peft_model(model, lora)
    seen = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            seen[name.removeprefix("base_model.model.")] = module.lora_A["default"].weight.shape[0]
    expected = {n: m["final_rank"] for n, m in config["analysis_metadata"]["modules"].items()}
    assert seen == expected
    with torch.no_grad():
        peft_model(torch.tensor([[1, 2, 3]]))
