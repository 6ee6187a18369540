"""Qwen2.5-VL through the fine-tune stage: image records, placeholder expansion, masking, frozen vision tower."""

import json
import re

import pytest
import torch
from safetensors import safe_open

from lora_ranks.analysis import analyze_checkpoints
from lora_ranks.data import IGNORE_INDEX, DataError, collate, load_records, tokenize_record
from lora_ranks.finetune import FinetuneSettings, run_preliminary_finetune
from lora_ranks.loading import load_image_processor, load_model
from lora_ranks.ranks import AllocationSettings
from lora_ranks.synthetic import build_tiny_qwen25_vl, write_synthetic_vl_dataset


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    base = build_tiny_qwen25_vl(root / "base")
    data = write_synthetic_vl_dataset(root / "data", 16)
    return base, data


def test_image_placeholders_expand_and_only_the_answer_is_trained(vl):
    base, data = vl
    _, tokenizer = load_model(base)
    processor = load_image_processor(base)
    record = load_records(data)[0]
    out = tokenize_record(record, tokenizer, 256, image_processor=processor, base_dir=data.parent)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert tuple(out["image_grid_thw"].tolist()[0]) == (1, 4, 4)
    assert out["input_ids"].count(pad) == 16 // 2**2  # t*h*w / merge_size^2 placeholders for one 56x56 image
    assert out["pixel_values"].shape[0] == 16
    trained = [t for t, label in zip(out["input_ids"], out["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == record["messages"][-1]["content"] + "<|im_end|>\n<|endoftext|>"
    batch = collate([out, out], tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 32 and batch["image_grid_thw"].shape == (2, 3)


def test_vision_records_need_images_and_a_processor(vl, tmp_path):
    base, data = vl
    _, tokenizer = load_model(base)
    record = load_records(data)[0]
    with pytest.raises(DataError, match="no image processor"):
        tokenize_record(record, tokenizer, 256)
    with pytest.raises(DataError, match="does not exist"):
        tokenize_record(record, tokenizer, 256, image_processor=load_image_processor(base), base_dir=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"images": [], "messages": record["messages"]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: 'images' must be a non-empty list"):
        load_records(bad)
    # Image paths are checked when the records load (before any model is built), with file:line.
    (tmp_path / "text.png").write_text("not an image")
    lines = [{"images": ["missing.png"], "messages": record["messages"]},
             {"images": ["text.png"], "messages": record["messages"]}]
    for i, line in enumerate(lines):
        bad.write_text(json.dumps(record | {"images": [str(data.parent / record["images"][0])]}) + "\n" + json.dumps(line) + "\n")
        with pytest.raises(DataError, match=r"bad\.jsonl:2: .*" + ("does not exist" if i == 0 else "not a readable image")):
            load_records(bad)


def test_vl_finetune_learns_keeps_vision_frozen_and_analyzes(vl, tmp_path):
    base, data = vl
    result = run_preliminary_finetune(base, data, tmp_path / "ft", FinetuneSettings(
        subset_ratio=1.0, max_steps=15, epochs=100, batch_size=8, learning_rate=3e-3), progress=False)
    assert sum(result.losses[-3:]) < 0.8 * sum(result.losses[:3])

    def tensors(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as h:
            return {k: h.get_tensor(k) for k in h.keys()}

    before, after = tensors(base), tensors(tmp_path / "ft" / "finetuned")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))  # frozen tower
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    assert (tmp_path / "ft" / "finetuned" / "preprocessor_config.json").is_file()
    config = analyze_checkpoints(result.pretrained_dir, result.finetuned_dir, tmp_path / "an",
                                 settings=AllocationSettings(min_rank=2, max_rank=16))
    assert all(n.startswith("model.language_model.layers.") for n in config.target_modules)


def test_dynamic_lora_trains_on_image_records_and_plain_peft_loads_it(vl, tmp_path):
    """`train` reads image records as the fine-tune stage does (the processor saved with the VL model); the adapter
    loads with plain PEFT onto the VL model and changes its outputs on an image record."""
    from lora_ranks.settings import LoRATrainingSettings
    from lora_ranks.train import train_dynamic_lora

    base, data = vl
    analyze_checkpoints(base, base, tmp_path / "an", settings=AllocationSettings(min_rank=2, max_rank=8))  # min ranks
    result = train_dynamic_lora(base, tmp_path / "an" / "configs" / "lora_rank_config.json", data, tmp_path / "train",
                                LoRATrainingSettings(max_steps=3, batch_size=4, learning_rate=1e-2, init="cold"),
                                progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert _adapter_changes_image_logits(base, data, result.adapter_dir)


@pytest.mark.slow
def test_the_vl_path_through_the_cli_as_a_user_types_it(vl, tmp_path, prefect_harness, capsys):
    """finetune -> analyze -> train -> extract -> export on the tiny Qwen2.5-VL and its image records; the exported
    adapter loads with plain PEFT onto the VL model and changes its outputs on an image record."""
    from flows.cli import main

    base, data = vl
    ft, an, tr = tmp_path / "ft", tmp_path / "an", tmp_path / "train"
    config = an / "configs" / "lora_rank_config.json"
    finetuned = ft / "saved_models" / "preliminary_finetune" / "finetuned"
    for argv in (["finetune", "--model", base, "--data", data, "--out", ft, "--subset-ratio", "1", "--steps", "10",
                  "--lr", "3e-3"],
                 ["analyze", "--base", base, "--finetuned", finetuned, "--out", an, "--data", data,
                  "--subset-ratio", "1", "--min-rank", "2", "--max-rank", "8"],
                 ["train", "--model", base, "--lora-config", config, "--data", data, "--out", tr, "--steps", "5"],
                 ["extract", "--base", base, "--finetuned", finetuned, "--config", config,
                  "--out", tmp_path / "extracted"],
                 ["export", tr / "adapter", "--out", tmp_path / "uniform"]):
        assert main([str(a) for a in argv]) == 0, (argv[0], capsys.readouterr().err)
    metrics = json.loads((tr / "training_metrics.json").read_text())
    assert metrics["init_from"] is not None  # warm-started from the analysis' fine-tuned VL model
    assert all(n.startswith("model.language_model.") for n in json.loads(config.read_text())["target_modules"])
    assert _adapter_changes_image_logits(base, data, tmp_path / "uniform")


@pytest.mark.slow
def test_vl_demo_runs_the_whole_pipeline(tmp_path, prefect_harness, capsys):
    from flows.cli import main

    assert main(["demo", "--vl", "--out", str(tmp_path)]) == 0, capsys.readouterr().err
    assert "Adapter:" in capsys.readouterr().out
    assert (tmp_path / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "configs" / "lora_rank_config.json").is_file()


def test_vision_and_text_mismatches_fail_before_prefect_starts(vl, tmp_path, capsys):
    """An image record for a text-only model, a VL rank config on a text model and the reverse: one line each,
    exit status 2, from the CLI's preflight (nothing is trained, no flow runs)."""
    from flows.cli import main
    from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset

    base, data = vl
    text = build_tiny_qwen3(tmp_path / "text")
    text_data = write_synthetic_dataset(tmp_path / "text.jsonl", 4)
    analyze_checkpoints(base, base, tmp_path / "vl-an", settings=AllocationSettings(min_rank=2, max_rank=8))
    analyze_checkpoints(text, text, tmp_path / "text-an", settings=AllocationSettings(min_rank=2, max_rank=8))
    vl_config = tmp_path / "vl-an" / "configs" / "lora_rank_config.json"
    text_config = tmp_path / "text-an" / "configs" / "lora_rank_config.json"
    cases = [(text, text_config, data, r"vl\.jsonl \(for .*text\) has 'images' but the model has no image processor"),
             (text, vl_config, text_data, "model.language_model.layers.0"),
             (base, text_config, data, "model.layers.0")]
    capsys.readouterr()  # the builders' progress bars
    for i, (model, config, records, message) in enumerate(cases):
        argv = ["train", "--model", model, "--lora-config", config, "--data", records, "--out", tmp_path / f"o{i}"]
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lora-ranks: error:") and "\n" not in err and "Prefect" not in err, err
        assert re.search(message, err), err
        assert not (tmp_path / f"o{i}").exists()


def test_quantized_dynamic_lora_on_the_vl_model(vl, tmp_path):
    """4-bit and 8-bit bases train on image records as text models do, and count parameters as the float model."""
    from lora_ranks.settings import LoRATrainingSettings
    from lora_ranks.train import train_dynamic_lora

    base, data = vl
    analyze_checkpoints(base, base, tmp_path / "an", settings=AllocationSettings(min_rank=2, max_rank=8))
    config = tmp_path / "an" / "configs" / "lora_rank_config.json"
    counts = set()
    for quantization in (None, "4bit", "8bit"):
        result = train_dynamic_lora(base, config, data, tmp_path / str(quantization), LoRATrainingSettings(
            max_steps=2, batch_size=4, init="cold", quantization=quantization), progress=False)
        assert all(torch.isfinite(torch.tensor(result.losses)))
        counts.add((result.trainable_parameters, result.total_parameters))
    assert len(counts) == 1


def _adapter_changes_image_logits(base, data, adapter_dir) -> bool:
    """Plain PEFT loads the adapter onto the VL model, and it moves the logits of the first image record."""
    from peft import PeftModel

    model, tokenizer = load_model(base, dtype=torch.float32)
    example = tokenize_record(load_records(data)[0], tokenizer, 256, image_processor=load_image_processor(base),
                              base_dir=data.parent)
    batch = collate([example], tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    with torch.no_grad():
        before = model.eval()(**inputs).logits
        after = PeftModel.from_pretrained(model, str(adapter_dir)).eval()(**inputs).logits
    return bool((after - before).abs().max() > 1e-4 * before.abs().max())
