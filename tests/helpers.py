"""Small builders shared by tests."""


def tiny_qwen25_vl():
    """A randomly initialised Qwen2.5-VL: 2 text layers (hidden 64), 2 vision blocks (hidden 32)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        image_token_id=150, video_token_id=151, vision_start_token_id=152,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg)


def tiny_llama(records: int = 50, intermediate_size: int = 128, max_positions: int = 256, seed: int = 0):
    """(a randomly initialised Llama, its tokenizer): SmolLM2's family in miniature. 2 layers, hidden 48, 6 query
    and 2 key-value heads (grouped-query attention), tied embeddings; a byte-level BPE tokenizer trained offline on
    ``records`` synthetic records per task."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_ranks.synthetic import synthetic_records, train_tokenizer

    tokenizer = train_tokenizer([json.dumps(r) for r in synthetic_records(records, fmt="mixed")])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=intermediate_size,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer
