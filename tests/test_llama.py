"""Llama-architecture models end to end (SmolLM2's family: grouped-query attention, tied embeddings), on a tiny
LlamaConfig model built offline: a brief fine-tune, the Fisher analysis, training, extraction, both exports and the
check."""


import pytest
import torch

from lora_ranks.analysis import analyze_checkpoints
from lora_ranks.config import load_rank_config
from lora_ranks.settings import (
    AllocationSettings,
    CheckSettings,
    CurvatureSettings,
    FinetuneSettings,
    LoRATrainingSettings,
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama (2 layers, hidden 48, 6 query / 2 key-value heads, tied embeddings), its brief fine-tune on the
    synthetic records, and the Fisher analysis of the pair."""
    from lora_ranks.finetune import run_preliminary_finetune
    from lora_ranks.synthetic import write_synthetic_dataset
    from tests.helpers import tiny_llama

    root = tmp_path_factory.mktemp("llama")
    model, tokenizer = tiny_llama()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    data = write_synthetic_dataset(root / "data.jsonl", 12, fmt="mixed")
    subset = FinetuneSettings(max_steps=8, learning_rate=3e-3, subset_ratio=0.5, batch_size=4,
                              gradient_checkpointing=False)
    pair = run_preliminary_finetune(root / "base", data, root / "ft", subset, progress=False)
    config = analyze_checkpoints(pair.pretrained_dir, pair.finetuned_dir, root / "analysis",
                                 settings=AllocationSettings(min_rank=1, max_rank=8, smoothing="none"),
                                 curvature=CurvatureSettings(spectrum="fisher", min_calibration_tokens=32),
                                 calibration_data=data, subset=subset)
    return root, pair, data, config


def test_the_analysis_names_llama_modules_and_gqa_shapes(llama):
    _, _, _, config = llama
    shapes = {name.split(".", 3)[-1]: record.shape for name, record in config.modules.items() if ".layers.0." in name}
    assert shapes == {"self_attn.q_proj": (48, 48), "self_attn.k_proj": (16, 48), "self_attn.v_proj": (16, 48),
                      "self_attn.o_proj": (48, 48), "mlp.gate_proj": (128, 48), "mlp.up_proj": (128, 48),
                      "mlp.down_proj": (48, 128)}
    assert config.spectrum_kind == "fisher" and config.analysis_metadata.curvature.has_factors
    assert not any(name.endswith(("lm_head", "embed_tokens")) for name in config.modules)


def test_train_extract_and_both_exports_keep_the_tied_head(llama, tmp_path):
    """The merged export loads in plain transformers, keeps the head tied to the embedding, and matches base +
    adapter within 1e-5 relative (float32); the uniform export is the same function."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_ranks.export import export_merged, export_uniform
    from lora_ranks.extract import extract_lora
    from lora_ranks.train import train_dynamic_lora

    root, pair, data, _ = llama
    config_path = root / "analysis" / "configs" / "lora_rank_config.json"
    extracted = extract_lora(pair.pretrained_dir, pair.finetuned_dir, config_path, tmp_path / "warm")
    assert extracted.truncation == "curvature"  # the Fisher-weighted truncation the ranks were chosen by
    trained = train_dynamic_lora(pair.pretrained_dir, config_path, data, tmp_path / "train",
                                 LoRATrainingSettings(max_steps=3, batch_size=4, learning_rate=1e-2,
                                                      gradient_checkpointing=False),
                                 init_from=tmp_path / "warm", progress=False)
    export_merged(trained.adapter_dir, tmp_path / "merged", base=pair.pretrained_dir)
    export_uniform(trained.adapter_dir, tmp_path / "uniform")
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        assert merged.config.tie_word_embeddings
        assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
        base_embedding = AutoModelForCausalLM.from_pretrained(pair.pretrained_dir).model.embed_tokens.weight
        assert torch.equal(merged.model.embed_tokens.weight, base_embedding)  # the head is the base's, not new
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pair.pretrained_dir,
                                                                                   dtype=torch.float32),
                                              trained.adapter_dir)(ids).logits
        uniform = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pair.pretrained_dir,
                                                                                 dtype=torch.float32),
                                            str(tmp_path / "uniform"))(ids).logits
        base = AutoModelForCausalLM.from_pretrained(pair.pretrained_dir, dtype=torch.float32)(ids).logits
        got = merged(ids).logits
    assert float((got - reference).norm() / reference.norm()) < 1e-5
    assert float((uniform - reference).norm() / reference.norm()) < 1e-5
    assert float((reference - base).norm() / base.norm()) > 1e-3  # the adapter moves the model: not a vacuous match


def test_check_measures_a_llama_config(llama):
    from lora_ranks.check import check_rank_config

    root, pair, _, _ = llama
    report = check_rank_config(pair.pretrained_dir, str(root / "analysis" / "configs" / "lora_rank_config.json"),
                               CheckSettings(batch=1, seq_len=16, latency_repeats=3, device="cpu"),
                               LoRATrainingSettings(gradient_checkpointing=False))
    config = load_rank_config(root / "analysis" / "configs" / "lora_rank_config.json")
    assert report.predicted.adapter_parameters == config.trainable_parameters
    assert report.ok and report.inference.impossible is None
    assert all(step.impossible is None for step in report.training_step.values())


def test_a_head_untied_by_storage_is_retied_exactly_and_a_changed_one_refused(tmp_path):
    """PEFT unties the config when the head and the embedding sit in different storage after a merge; equal values
    are re-tied (exact), different ones refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_ranks.export import AdapterError, _keep_tied_embeddings

    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # same values, own storage
    model.config.tie_word_embeddings = False  # what PEFT's merge does then
    _keep_tied_embeddings(model, True, tmp_path)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 1.0)
    with pytest.raises(AdapterError, match="ties its output head to its input embedding, but after merging"):
        _keep_tied_embeddings(model, True, tmp_path)


def test_models_loaded_from_many_threads_keep_their_tied_heads(tmp_path):
    """Prefect's thread-pool runner loads models concurrently; transformers' from_pretrained unties weights
    process-wide while it runs, so overlapping loads used to leave tying disabled for good (every later tied model
    got a random head). Loads are serialized: every model comes back tied and the class method is intact."""
    import threading

    from transformers import PreTrainedModel

    from lora_ranks.loading import load_model
    from tests.helpers import tiny_llama

    model, tokenizer = tiny_llama(records=20, intermediate_size=32)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    original, start, tied, errors = PreTrainedModel.tie_weights, threading.Barrier(6), [], []

    def load_some():
        try:
            start.wait()
            for _ in range(4):
                model, _ = load_model(tmp_path)
                tied.append(model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
        except Exception as exc:  # surfaced below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=load_some) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(tied) == 24 and all(tied)
    assert PreTrainedModel.tie_weights is original
