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
