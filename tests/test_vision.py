"""Qwen2.5-VL through the fine-tune stage: image records, placeholder expansion, masking, frozen vision tower."""

import json

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
    out = tokenize_record(record, tokenizer, image_processor=processor, base_dir=data.parent)
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
        tokenize_record(record, tokenizer)
    with pytest.raises(DataError, match="does not exist"):
        tokenize_record(record, tokenizer, image_processor=load_image_processor(base), base_dir=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"images": [], "messages": record["messages"]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: 'images' must be a non-empty list"):
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
    assert all(n.startswith("model.language_model.layers.") for n in config["target_modules"])
