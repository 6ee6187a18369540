"""The rank config: round trip, schema validation and migration, atomic writes, and PEFT honouring every rank."""

import json
from pathlib import Path

import pytest
import torch

from lora_ranks.analysis import analyze_checkpoints
from lora_ranks.config import (
    SCHEMA_VERSION,
    AlphaPolicy,
    RankConfig,
    RankConfigError,
    anchored_key,
    load_rank_config,
    parse_rank_config,
    save_rank_config,
)
from lora_ranks.ranks import AllocationSettings


@pytest.fixture(scope="module")
def config_and_path(planted_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("cfg")
    settings = AllocationSettings(energy_threshold=0.99, min_rank=2, max_rank=16, smoothing="none")
    config = analyze_checkpoints(*planted_pair, out, settings=settings)
    return config, out / "configs" / "lora_rank_config.json"


def test_round_trip_and_content(config_and_path):
    config, path = config_and_path
    assert isinstance(config, RankConfig) and load_rank_config(path) == config
    assert json.loads(path.read_text()) == config.to_dict()
    assert config.schema_version == SCHEMA_VERSION == 2
    assert set(config.layer_ranks) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name, meta in config.modules.items():
        assert config.rank_pattern[anchored_key(name)] == meta.final_rank == config.ranks[name]
        assert 2 <= meta.final_rank <= 16
        assert config.alpha_pattern[anchored_key(name)] == 2 * meta.final_rank == config.alpha_of(name)
        assert 0.0 < meta.energy_retained <= 1.0 + 1e-12
    trainable = sum(m.final_rank * sum(m.shape) for m in config.modules.values())
    assert config.trainable_parameters == trainable
    assert config.compression_ratio == pytest.approx(trainable / config.base_parameters)
    ident = config.checkpoints
    assert len(ident.pretrained.content_fingerprint) == 64
    assert ident.pretrained.content_fingerprint != ident.finetuned.content_fingerprint
    meta = config.analysis_metadata
    assert meta.n_modules == len(config.target_modules) and meta.mode == "energy_threshold"
    assert [m.name for m in config.module_refs()] == config.target_modules


def _first_module(c: dict) -> dict:
    return next(iter(c["analysis_metadata"]["modules"].values()))


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(schema_version=3), "schema_version 3 is newer than this release"),
    (lambda c: c.update(schema_version="2"), "schema_version must be 1 or 2, got '2'"),
    (lambda c: c.pop("rank_pattern"), "missing required key 'rank_pattern'"),
    (lambda c: c["rank_pattern"].update({next(iter(c["rank_pattern"])): 0}), "must be a positive number, got 0"),
    (lambda c: c["rank_pattern"].update({"^model\\.nope": 4}), "not an anchored target"),
    (lambda c: c["rank_pattern"].pop(next(iter(c["rank_pattern"]))), "no rank for target"),
    (lambda c: c.update(target_modules=[]), "target_modules: List should have at least 1 item"),
    (lambda c: c.update(compression_ratio=-1), "compression_ratio: Input should be greater than 0, got -1"),
    (lambda c: _first_module(c).update(shape=[4]), r"analysis_metadata.modules\['model.layers.0.self_attn.q_proj'\]"
                                                    r".shape: too few items"),
    (lambda c: _first_module(c).update(spectrum="hessian"), "spectrum: Input should be 'weight', 'input' or 'fisher'"),
    (lambda c: _first_module(c).update(final_rank=99), "final_rank 99 disagrees with rank_pattern"),
    (lambda c: c["analysis_metadata"].update(surprise=1), "analysis_metadata.surprise: Extra inputs are not permitted"),
    (lambda c: c["analysis_metadata"]["settings"].update(energy_threshold=2), "energy_threshold: Input should be less"),
    (lambda c: c["analysis_metadata"]["modules"].pop(next(iter(c["analysis_metadata"]["modules"]))),
     "has no record in analysis_metadata.modules"),
    (lambda c: c.update(peft_type="LORA", schema_version=None), "is a PEFT adapter's file"),
])
def test_schema_violations_are_named(config_and_path, tmp_path, edit, match):
    config = config_and_path[0].to_dict()
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
    broken = config.to_dict()
    broken["compression_ratio"] = float("nan")  # refused by validation before anything is written
    with pytest.raises(RankConfigError, match="compression_ratio"):
        save_rank_config(path, parse_rank_config(broken))
    with pytest.raises(TypeError, match="takes a RankConfig"):
        save_rank_config(path, config.to_dict())
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
    assert len(set(config.rank_pattern.values())) > 1  # heterogeneous, or the test proves little
    model = AutoModelForCausalLM.from_pretrained(planted_pair[0])
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=config.target_modules, rank_pattern=config.rank_pattern,
                      alpha_pattern=config.alpha_pattern)
    peft_model = get_peft_model(model, lora)
    seen = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            seen[name.removeprefix("base_model.model.")] = module.lora_A["default"].weight.shape[0]
    expected = config.ranks
    assert seen == expected
    with torch.no_grad():
        peft_model(torch.tensor([[1, 2, 3]]))


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["rank_config_schema1_demo.json", "rank_config_schema1_budget.json"])
def test_schema1_files_of_the_previous_release_migrate_on_load(name, tmp_path):
    """A schema-1 file written by release 0.2.0 loads as schema 2 with every value kept: written back, it differs
    from the original only in its version and in fields schema 1 did not have (written empty)."""
    old = json.loads((FIXTURES / name).read_text())
    config = load_rank_config(FIXTURES / name)
    assert old["schema_version"] == 1 and config.schema_version == 2
    new = config.to_dict()

    from lora_ranks.settings import CurvatureSettings

    # Settings added since: the loader fills their defaults, which change nothing a file records (the factor limit
    # only decides, at collection, which factors a new analysis forms; the factor files say which were).
    added_settings = {".analysis_metadata.curvature.settings.dense_factor_limit": CurvatureSettings().dense_factor_limit}

    def kept(a, b, where=""):
        """Every value of schema-1 ``b`` is in ``a``; keys only ``a`` has are empty (or settings at their default)."""
        if isinstance(b, dict):
            for key in set(a) | set(b):
                if f"{where}.{key}" in added_settings:
                    assert a[key] == added_settings[f"{where}.{key}"]
                elif key not in b:
                    assert a[key] in (None, {}, []), f"{where}.{key} is new but not empty: {a[key]!r}"
                else:
                    kept(a[key], b[key], f"{where}.{key}")
        else:
            assert a == b, f"{where}: {a!r} != {b!r}"

    kept({**new, "schema_version": 1}, old)
    assert config.allocation_settings == config.analysis_metadata.settings
    again = tmp_path / "again.json"
    save_rank_config(again, config)
    assert load_rank_config(again) == config  # a migrated config round-trips as schema 2


def test_oldest_schema1_keys_migrate():
    """Schema-1 files from before 0.2 kept the budget as budget_parameters / budget_fraction, and may carry metadata
    keys this release does not read: the first become ``budget``, the second are kept under ``legacy``."""
    old = json.loads((FIXTURES / "rank_config_schema1_budget.json").read_text())
    settings = old["analysis_metadata"]["settings"]
    settings["budget_parameters"] = settings.pop("budget")
    old["analysis_metadata"]["old_note"] = {"kept": True}
    config = parse_rank_config(old)
    assert config.allocation_settings.budget == 12000.0 and config.allocation_settings.rank_rule == "budget"
    assert config.analysis_metadata.legacy == {"old_note": {"kept": True}}


def test_schema1_keys_this_release_does_not_know_are_kept_under_legacy():
    """Unknown keys of the settings, the analysis settings and the module records are not dropped: they move to
    ``analysis_metadata.legacy``, under where they were (migrate's docstring)."""
    old = json.loads((FIXTURES / "rank_config_schema1_budget.json").read_text())
    meta = old["analysis_metadata"]
    meta["settings"]["old_knob"] = 3
    name = next(iter(meta["modules"]))
    meta["modules"][name]["old_score"] = 0.5
    meta["analysis"]["old_flag"] = True
    legacy = parse_rank_config(old).analysis_metadata.legacy
    assert legacy["settings"] == {"old_knob": 3} and legacy["modules"] == {name: {"old_score": 0.5}}
    assert legacy["analysis"] == {"old_flag": True}


def test_replace_validates():
    config = load_rank_config(FIXTURES / "rank_config_schema1_budget.json")
    changed = config.replace(analysis_metadata={"allocation": "uniform", "budget_rank": 2})
    assert changed.analysis_metadata.allocation == "uniform" and changed.ranks == config.ranks
    assert config.analysis_metadata.allocation is None  # frozen: the original is unchanged
    with pytest.raises(RankConfigError, match="compression_ratio"):
        config.replace(compression_ratio=0)


def test_schema_files_are_generated_from_the_model():
    """docs/lora_rank_config.schema.json and the field tables of docs/rank-config.md are what
    ``python -m lora_ranks.config_schema --write`` writes today (rerun it after changing the model)."""
    from lora_ranks.config_schema import BEGIN, DOC_FILE, END, SCHEMA_FILE, json_schema, markdown_tables

    assert SCHEMA_FILE.read_text() == json_schema()
    page = DOC_FILE.read_text()
    assert page.split(BEGIN, 1)[1].split(END, 1)[0].strip() == markdown_tables().strip()
    schema = json.loads(json_schema())
    assert set(schema["required"]) >= {"target_modules", "rank_pattern", "alpha_pattern", "analysis_metadata"}
