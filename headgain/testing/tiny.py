"""Tiny random-weight models of every registered architecture, built from configs.

Used by the tests and the CPU benchmarks: nothing is downloaded (the demo and the command
line use the trained toy model of `headgain.toy`). Visual placeholder ids are fixed
(`IMAGE_ID`, `VIDEO_ID`) so inputs can be written by hand.
"""

from __future__ import annotations

import torch
import transformers as tf

__all__ = [
    "ARCHS",
    "IMAGE_ID",
    "VIDEO_ID",
    "VOCAB",
    "tiny_config",
    "tiny_model",
    "text_config_kwargs",
]

VOCAB = 320
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 300, 301, 302, 303


def text_config_kwargs(layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2, **extra) -> dict:
    """Decoder fields shared by the tiny configs."""
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )


def _mrope(hidden: int, heads: int) -> dict:
    half = hidden // heads // 2
    t = half - 2 * (half // 3)
    return {"rope_type": "default", "mrope_section": [t, half // 3, half // 3], "rope_theta": 10000.0}


def _qwen_ids() -> dict:
    return dict(
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )


def _clip(**kw):
    return tf.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        **kw,
    )


def _siglip():
    return tf.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )


def _vision_dict() -> dict:
    return dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )


def tiny_config(
    model_type: str,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vision_hidden: int = 32,
    init_std: float | None = None,
):
    """A `transformers` config of ``model_type`` with a small decoder (``layers`` x ``heads``).

    ``init_std`` sets the weights' initialiser range (``initializer_range``): larger values
    give peakier attention, so heads differ more in how much they look at the image.
    """
    config = _tiny_config(model_type, layers, hidden, heads, kv_heads, vision_hidden)
    if init_std is not None:
        config.initializer_range = init_std
        config.get_text_config().initializer_range = init_std
    return config


def _tiny_config(model_type, layers, hidden, heads, kv_heads, vision_hidden):
    txt = text_config_kwargs(layers, hidden, heads, kv_heads)
    if model_type == "qwen2_vl":
        return tf.Qwen2VLConfig(
            text_config=dict(txt, rope_parameters=_mrope(hidden, heads)),
            vision_config=dict(
                depth=1,
                embed_dim=vision_hidden,
                hidden_size=hidden,
                num_heads=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            **_qwen_ids(),
        )
    if model_type == "qwen2_5_vl":
        return tf.Qwen2_5_VLConfig(
            text_config=dict(txt, rope_parameters=_mrope(hidden, heads)),
            vision_config=dict(
                depth=1,
                hidden_size=vision_hidden,
                intermediate_size=2 * vision_hidden,
                num_heads=2,
                out_hidden_size=hidden,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=56,
                fullatt_block_indexes=[0],
            ),
            **_qwen_ids(),
        )
    if model_type == "qwen3_vl":
        rope = dict(_mrope(hidden, heads), mrope_interleaved=True)
        return tf.Qwen3VLConfig(
            text_config=dict(txt, head_dim=hidden // heads, rope_parameters=rope),
            vision_config=dict(
                depth=1,
                hidden_size=vision_hidden,
                intermediate_size=2 * vision_hidden,
                num_heads=2,
                out_hidden_size=hidden,
                patch_size=16,
                spatial_merge_size=2,
                temporal_patch_size=2,
                deepstack_visual_indexes=[0],
                num_position_embeddings=64,
            ),
            **_qwen_ids(),
        )
    if model_type == "llava":
        return tf.LlavaConfig(text_config=tf.LlamaConfig(**txt), vision_config=_clip(), image_token_id=IMAGE_ID)
    if model_type == "llava_next":
        return tf.LlavaNextConfig(
            text_config=tf.LlamaConfig(**txt),
            vision_config=_clip(),
            image_token_id=IMAGE_ID,
            image_grid_pinpoints=[[28, 28]],
        )
    if model_type == "llava_onevision":
        return tf.LlavaOnevisionConfig(
            text_config=tf.Qwen2Config(**txt),
            vision_config=_siglip(),
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            image_grid_pinpoints=[[28, 28]],
        )
    if model_type == "gemma3":
        return tf.Gemma3Config(
            text_config=tf.Gemma3TextConfig(**txt, head_dim=hidden // heads, sliding_window=64),
            vision_config=_siglip(),
            mm_tokens_per_image=4,
            image_token_id=IMAGE_ID,
            boi_token_id=VISION_START_ID,
            eoi_token_id=VISION_END_ID,
        )
    if model_type == "idefics3":
        return tf.Idefics3Config(
            text_config=tf.LlamaConfig(**txt), vision_config=_vision_dict(), image_token_id=IMAGE_ID, scale_factor=1
        )
    if model_type == "smolvlm":
        return tf.SmolVLMConfig(
            text_config=tf.LlamaConfig(**txt), vision_config=_vision_dict(), image_token_id=IMAGE_ID, scale_factor=1
        )
    if model_type == "mistral3":
        return tf.Mistral3Config(
            text_config=tf.MistralConfig(**txt, head_dim=hidden // heads),
            vision_config=tf.PixtralVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
                head_dim=16,
            ),
            image_token_id=IMAGE_ID,
            spatial_merge_size=1,
        )
    if model_type == "internvl":
        vision = dict(_vision_dict(), image_size=[28, 28], patch_size=[14, 14])
        return tf.InternVLConfig(
            text_config=tf.Qwen2Config(**txt), vision_config=vision, image_token_id=IMAGE_ID, downsample_ratio=0.5
        )
    if model_type == "deepseek_v3":
        return tf.DeepseekV3Config(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            moe_intermediate_size=hidden // 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_group=1,
            topk_group=1,
            max_position_embeddings=4096,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    raise ValueError(f"no tiny config for model_type {model_type!r}; known: {', '.join(ARCHS)}")


ARCHS = (
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "llava",
    "llava_next",
    "llava_onevision",
    "gemma3",
    "idefics3",
    "smolvlm",
    "mistral3",
    "internvl",
    "deepseek_v3",
)


def tiny_model(
    model_type: str,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **config_kwargs,
):
    """A random-weight model of ``model_type`` in eval mode (seeded, so two calls give equal weights)."""
    config = tiny_config(model_type, **config_kwargs)
    torch.manual_seed(seed)
    auto = tf.AutoModelForCausalLM if model_type == "deepseek_v3" else tf.AutoModelForImageTextToText
    model = auto.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()
