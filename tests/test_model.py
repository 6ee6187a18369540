"""PEFT integration: exact heterogeneous ranks, validation, save/load, quantization, extraction, hot swap."""

import json
from pathlib import Path

import pytest
import torch

from lora_ranks.analysis import analyze_checkpoints
from lora_ranks.config import RankConfigError, anchored_key, load_rank_config
from lora_ranks.extract import extract_lora
from lora_ranks.model import (
    DynamicLoRAConfig,
    DynamicLoRAError,
    create_model_with_dynamic_lora,
    create_peft_model_from_config,
    load_peft_checkpoint,
    lora_ranks_of,
    save_adapter,
    validate_peft_model,
)
from lora_ranks.ranks import AllocationSettings
from lora_ranks.reports import ExtractionReport
from lora_ranks.spectra import truncated_svd_factors

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 8, 200, 11]])


@pytest.fixture(scope="module")
def rank_config_path(planted_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("rc")
    analyze_checkpoints(*planted_pair, out, settings=AllocationSettings(energy_threshold=0.99, min_rank=2, max_rank=16,
                                                                         smoothing="none"))
    path = out / "configs" / "lora_rank_config.json"
    assert len(set(json.loads(path.read_text())["rank_pattern"].values())) > 1  # heterogeneous
    return path


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def test_every_module_gets_exactly_its_rank(planted_pair, rank_config_path):
    model, tokenizer = create_model_with_dynamic_lora(planted_pair[0], rank_config_path)
    config = DynamicLoRAConfig.from_file(rank_config_path)
    assert lora_ranks_of(model) == config.ranks  # every lora_A shape, nothing extra
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shapes = {n: m.shape for n, m in config.rank_config.modules.items()}
    assert trainable == config.predicted_parameters(shapes) == config.rank_config.trainable_parameters
    base_total = sum(p.numel() for p in model.parameters()) - trainable
    assert trainable / base_total == pytest.approx(config.rank_config.compression_ratio)
    lora_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    assert lora_bytes == 4 * trainable  # float32 adapters on CPU: bytes are predictable from the config


def test_validation_lists_wrong_and_extra_adapters(planted_pair, rank_config_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = DynamicLoRAConfig.from_file(rank_config_path)
    first = config.target_modules[0]
    # A plain suffix pattern, the classic mistake: one rank (5) for every q_proj and o_proj, nothing else.
    wrong = get_peft_model(AutoModelForCausalLM.from_pretrained(planted_pair[0]),
                           LoraConfig(r=5, target_modules=["q_proj", "o_proj"], alpha_pattern={}))
    with pytest.raises(DynamicLoRAError) as err:
        validate_peft_model(wrong, config)
    text = str(err.value)
    assert f"{first}: rank 5 but the config asks for {config.ranks[first]}" in text
    assert "model.layers.0.mlp.up_proj: no LoRA adapter" in text


def _with_module(raw: dict, name: str, rank: int = 4) -> dict:
    """Config content with one more target (a copy of the first module's record, at ``rank``)."""
    raw["target_modules"].append(name)
    raw["rank_pattern"][anchored_key(name)] = rank
    record = dict(next(iter(raw["analysis_metadata"]["modules"].values())))
    raw["analysis_metadata"]["modules"][name] = {**record, "final_rank": rank}
    return raw


def test_config_key_matching_nothing_raises(planted_pair, rank_config_path):
    from transformers import AutoModelForCausalLM

    raw = _with_module(json.loads(rank_config_path.read_text()), "model.layers.7.self_attn.q_proj")
    with pytest.raises(RankConfigError, match=r"model\.layers\.7\.self_attn\.q_proj: no such module"):
        create_peft_model_from_config(AutoModelForCausalLM.from_pretrained(planted_pair[0]), DynamicLoRAConfig(raw))


def test_lm_head_is_never_targeted(rank_config_path):
    raw = _with_module(json.loads(rank_config_path.read_text()), "lm_head")
    with pytest.raises(RankConfigError, match="lm_head"):
        DynamicLoRAConfig(raw)


def test_save_and_load_reproduce_logits_exactly(planted_pair, rank_config_path, tmp_path):
    model, _ = create_model_with_dynamic_lora(planted_pair[0], rank_config_path)
    with torch.no_grad():  # non-zero adapters, so the check is not trivially the base model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    model.eval()
    expected = _logits(model)
    save_adapter(model, tmp_path / "adapter", DynamicLoRAConfig.from_file(rank_config_path))
    loaded, _ = load_peft_checkpoint(planted_pair[0], tmp_path / "adapter")
    loaded.eval()
    assert torch.equal(_logits(loaded), expected)
    assert lora_ranks_of(loaded) == DynamicLoRAConfig.from_file(rank_config_path).ranks


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_model_builds_and_trains_a_step(planted_pair, rank_config_path, quantization):
    model, _ = create_model_with_dynamic_lora(planted_pair[0], rank_config_path, quantization=quantization)
    assert lora_ranks_of(model) == DynamicLoRAConfig.from_file(rank_config_path).ranks
    quantized = [type(m).__name__ for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    assert quantized, "no bitsandbytes layer in the model"
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    loss = model(input_ids=TOKENS, labels=TOKENS).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def test_full_rank_extraction_reproduces_the_finetuned_model(planted_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    # A config with every module at full rank (min(d_out, d_in)).
    analyze_checkpoints(*planted_pair, tmp_path / "full", settings=AllocationSettings(
        min_rank=64, max_rank=64, smoothing="none"))  # bounds clip to min(d_out, d_in): full rank everywhere
    full_config = tmp_path / "full" / "configs" / "lora_rank_config.json"
    raw = json.loads(full_config.read_text())
    for name, meta in raw["analysis_metadata"]["modules"].items():
        assert raw["rank_pattern"][anchored_key(name)] == min(meta["shape"])
    report = extract_lora(*planted_pair, full_config, tmp_path / "adapter")
    assert report.max_relative_error < 1e-6
    model, _ = load_peft_checkpoint(planted_pair[0], tmp_path / "adapter")
    model.eval()
    finetuned = AutoModelForCausalLM.from_pretrained(planted_pair[1]).eval()
    torch.testing.assert_close(_logits(model), _logits(finetuned), rtol=1e-4, atol=1e-4)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged), _logits(finetuned), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,rank", [((48, 20), 5), ((20, 48), 7), ((32, 32), 32)])
def test_truncated_svd_factors_are_optimal(shape, rank):
    torch.manual_seed(1)
    delta = torch.randn(*shape, dtype=torch.float64)
    scale = 2.0
    lora_a, lora_b, rel = truncated_svd_factors(delta, rank, scale)
    assert lora_a.shape == (rank, shape[1]) and lora_b.shape == (shape[0], rank)
    s = torch.linalg.svdvals(delta)
    optimal = float(torch.sqrt(torch.sum(s[rank:] ** 2) / torch.sum(s**2)))  # Eckart-Young
    # float32 subspace: the error is second order in its angle; the closed form sqrt(total - kept) has a
    # round-off floor of ~sqrt(1e-16) = 1e-8 where the optimum is 0.
    assert rel == pytest.approx(optimal, abs=1e-7)
    approx = scale * lora_b.double() @ lora_a.double()
    achieved = float(torch.linalg.vector_norm(delta - approx) / torch.linalg.vector_norm(delta))
    assert achieved == pytest.approx(optimal, abs=1e-6)  # float32 factors


def test_extraction_report_errors_match_the_spectrum(planted_pair, rank_config_path, tmp_path):
    report = extract_lora(*planted_pair, rank_config_path, tmp_path / "adapter")
    config = json.loads(rank_config_path.read_text())
    for name, entry in report.modules.items():
        kept = config["analysis_metadata"]["modules"][name]["energy_retained"]
        assert entry.relative_error == pytest.approx((1 - kept) ** 0.5, abs=1e-6)
    saved = json.loads((tmp_path / "adapter" / "extraction_report.json").read_text())
    assert ExtractionReport.model_validate(saved) == report  # the file is the typed report


def test_hot_swap_between_adapters(planted_pair, rank_config_path, tmp_path):
    extract_lora(*planted_pair, rank_config_path, tmp_path / "extracted")
    model, _ = load_peft_checkpoint(planted_pair[0], tmp_path / "extracted", adapter_name="extracted")
    other = DynamicLoRAConfig.from_file(rank_config_path).to_peft_config(init_lora_weights=False)  # random B != 0
    model.add_adapter("random", other)
    model.eval()
    model.set_adapter("extracted")
    first = _logits(model)
    model.set_adapter("random")
    second = _logits(model)
    assert not torch.allclose(first, second)
    model.set_adapter("extracted")
    assert torch.equal(_logits(model), first)
    with model.disable_adapter():
        base = _logits(model)
    assert not torch.allclose(base, first)


def test_warm_start_from_extracted_adapter(planted_pair, rank_config_path, tmp_path):
    """Initialising a trainable dynamic-rank LoRA from the delta's singular vectors (instead of B = 0)."""
    extract_lora(*planted_pair, rank_config_path, tmp_path / "extracted")
    model, _ = load_peft_checkpoint(planted_pair[0], tmp_path / "extracted", is_trainable=True)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_B" in n)
    fresh, _ = create_model_with_dynamic_lora(planted_pair[0], rank_config_path)
    assert not torch.allclose(_logits(model.eval()), _logits(fresh.eval()))  # starts at base + dW_r, not base


def test_qwen25_vl_gets_exact_ranks_with_and_without_the_vision_tower(tmp_path):
    from lora_ranks.synthetic import synthetic_records, train_tokenizer
    from tests.helpers import tiny_qwen25_vl

    model = tiny_qwen25_vl()
    tokenizer = train_tokenizer([json.dumps(r) for r in synthetic_records(5)])
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ft")
    settings = AllocationSettings(energy_threshold=0.9, min_rank=2, max_rank=16, smoothing="none")

    from lora_ranks.settings import AnalysisSettings

    for include_vision, n_modules in ((False, 14), (True, 24)):
        out = tmp_path / f"vision-{include_vision}"
        analyze_checkpoints(tmp_path / "base", tmp_path / "ft", out, settings=settings,
                            analysis=AnalysisSettings(include_vision=include_vision))
        path = out / "configs" / "lora_rank_config.json"
        peft_model, _ = create_model_with_dynamic_lora(tmp_path / "base", path)
        ranks = lora_ranks_of(peft_model)
        assert ranks == DynamicLoRAConfig.from_file(path).ranks and len(ranks) == n_modules
        assert any(n.startswith("model.visual.") for n in ranks) == include_vision
        assert all(n.startswith(("model.language_model.layers.", "model.visual.blocks.")) for n in ranks)


def test_extraction_refuses_checkpoints_the_config_was_not_made_for(rank_config_path, tmp_path):
    from lora_ranks.synthetic import write_planted_pair

    other = write_planted_pair(tmp_path / "b", tmp_path / "f", num_layers=1, hidden_size=32, num_heads=2,
                               num_kv_heads=1, intermediate_size=64)
    with pytest.raises(RankConfigError) as err:
        extract_lora(*other, rank_config_path, tmp_path / "adapter")
    assert "model.layers.1.self_attn.q_proj: tensor 'model.layers.1.self_attn.q_proj.weight' is missing" in str(err.value)
    assert "has shape (32, 32)" in str(err.value)
    assert not (tmp_path / "adapter").exists()


def test_extraction_of_a_config_without_weight_keys_maps_names(planted_pair, rank_config_path, tmp_path):
    """Configs written before weight_key was recorded still extract (through the model's name mapping)."""
    raw = json.loads(rank_config_path.read_text())
    for meta in raw["analysis_metadata"]["modules"].values():
        meta.pop("weight_key")
    old = tmp_path / "old.json"
    old.write_text(json.dumps(raw))
    assert extract_lora(*planted_pair, old, tmp_path / "a").modules == \
        extract_lora(*planted_pair, rank_config_path, tmp_path / "b").modules


def test_warm_start_source_follows_the_rank_config(tmp_path):
    """init warm: an explicit folder wins, else the config's recorded fine-tuned model; without one that exists, warm
    is refused (issue 29: never silently cold); cold: none, and an explicit folder with init cold is refused."""
    from lora_ranks.errors import LoraRanksError
    from lora_ranks.train import warm_start_source

    finetuned = tmp_path / "ft"
    finetuned.mkdir()
    config = load_rank_config(Path(__file__).parent / "fixtures" / "rank_config_schema1_budget.json")
    recorded = config.checkpoints.model_dump()
    config = config.replace(analysis_metadata={"checkpoints": {**recorded, "finetuned": {
        **recorded["finetuned"], "path": str(finetuned)}}})
    assert warm_start_source(config, None, "warm") == finetuned
    assert warm_start_source(config, tmp_path / "other", "warm") == tmp_path / "other"
    assert warm_start_source(config, None, "cold") is None
    finetuned.rmdir()
    with pytest.raises(LoraRanksError, match="no longer exists: give it with --warm-start-from"):
        warm_start_source(config, None, "warm")  # the recorded model is gone: refused, never silently cold
    assert warm_start_source(config, None, "cold") is None
    without_pair = config.replace(analysis_metadata={"checkpoints": None})
    with pytest.raises(LoraRanksError, match="records no fine-tuned model"):
        warm_start_source(without_pair, None, "warm")
    with pytest.raises(LoraRanksError, match="init is 'cold'"):
        warm_start_source(config, tmp_path / "other", "cold")


@pytest.fixture(scope="module")
def trainable_base(tmp_path_factory):
    """A tiny Qwen3 with a tokenizer, training records and a (min-rank) rank config for it."""
    from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset

    root = tmp_path_factory.mktemp("trainable")
    base = build_tiny_qwen3(root / "base")
    analyze_checkpoints(base, base, root / "an", settings=AllocationSettings(min_rank=2, max_rank=8))
    return base, root / "an" / "configs" / "lora_rank_config.json", write_synthetic_dataset(root / "data.jsonl", 8)


def test_training_counts_parameters_as_peft_does_also_when_quantized(trainable_base, tmp_path):
    """A packed 4-bit weight holds two parameters per stored element: the logged total is the model's parameter
    count whatever the quantization (PEFT's get_nb_trainable_parameters)."""
    from lora_ranks.settings import LoRATrainingSettings
    from lora_ranks.train import train_dynamic_lora

    counts = {}
    for quantization in (None, "4bit", "8bit"):
        result = train_dynamic_lora(*trainable_base[:2], trainable_base[2], tmp_path / str(quantization),
                                    LoRATrainingSettings(max_steps=1, batch_size=2, init="cold", quantization=quantization),
                                    progress=False)
        counts[quantization] = (result.trainable_parameters, result.total_parameters)
    assert counts["4bit"] == counts["8bit"] == counts[None]
    assert counts[None][0] == json.loads(trainable_base[1].read_text())["trainable_parameters"]
    # Issue 13: the 4-bit adapter records its quantization, and a merged export says it merged into full precision.
    from lora_ranks.export import export_merged

    assert json.loads((tmp_path / "4bit" / "adapter" / "lora_ranks_adapter.json").read_text())["quantization"] == "4bit"
    assert "4bit-quantized base" in export_merged(tmp_path / "4bit" / "adapter", tmp_path / "merged").note
