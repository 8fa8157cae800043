"""Tiny random-weight models of every registered architecture, built from configs.

Used by the tests and the CPU benchmarks: nothing is downloaded (the demo and the command
line use the trained toy model of `headgain.toy`). Visual placeholder ids are fixed
(`IMAGE_ID`, `VIDEO_ID`) so inputs can be written by hand.
"""

from __future__ import annotations

import torch
import transformers as tf
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

__all__ = [
    "ARCHS",
    "BYTE_MODEL",
    "IMAGE_ID",
    "REQUIRES",
    "VIDEO_ID",
    "VOCAB",
    "byte_model",
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


def _merged_vision(hidden: int, vision_hidden: int, patch_size: int = 14, **extra) -> dict:
    """A one-block vision tower of the Qwen2.5-VL / Qwen3-VL / GLM-4V kind (2 x 2 patch merge)."""
    return dict(
        depth=1,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=2,
        out_hidden_size=hidden,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        **extra,
    )


def _qwen3_vision(hidden: int, vision_hidden: int) -> dict:
    return _merged_vision(hidden, vision_hidden, 16, deepstack_visual_indexes=[0], num_position_embeddings=64)


def _glm_ids() -> dict:
    return dict(
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        image_start_token_id=VISION_START_ID,
        image_end_token_id=VISION_END_ID,
        video_start_token_id=VISION_START_ID,
        video_end_token_id=VISION_END_ID,
    )


def _moe(hidden: int) -> dict:
    """DeepSeek-style routed experts: 4 experts of width hidden / 2, 2 per token, 1 shared."""
    return dict(moe_intermediate_size=hidden // 2, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)


def _deepseek_v3(layers: int, hidden: int, heads: int) -> dict:
    """A DeepSeek-V3 decoder: multi-head latent attention (value width 16) and routed experts."""
    return dict(
        _moe(hidden),
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
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


def _vq() -> dict:
    """A one-stage VQ image tokenizer (Chameleon, Janus)."""
    return dict(
        embed_dim=8,
        num_embeddings=16,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1],
        num_res_blocks=1,
        attn_resolutions=[],
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
            vision_config=_merged_vision(hidden, vision_hidden, window_size=56, fullatt_block_indexes=[0]),
            **_qwen_ids(),
        )
    if model_type == "qwen3_vl":
        rope = dict(_mrope(hidden, heads), mrope_interleaved=True)
        return tf.Qwen3VLConfig(
            text_config=dict(txt, head_dim=hidden // heads, rope_parameters=rope),
            vision_config=_qwen3_vision(hidden, vision_hidden),
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
    if model_type in ("glm4v", "glm4v_moe"):
        moe = model_type == "glm4v_moe"
        rope = dict(_mrope(hidden, heads), partial_rotary_factor=1.0)
        text = dict(txt, rope_parameters=rope)
        if moe:
            text.update(_moe(hidden), first_k_dense_replace=1, n_group=1, topk_group=1)
        vision = _merged_vision(hidden, vision_hidden, image_size=28)
        config = tf.Glm4vMoeConfig if moe else tf.Glm4vConfig
        return config(text_config=text, vision_config=vision, **_glm_ids())
    if model_type == "qwen3_vl_moe":
        rope = dict(_mrope(hidden, heads), mrope_interleaved=True)
        return tf.Qwen3VLMoeConfig(
            text_config=dict(
                txt,
                head_dim=hidden // heads,
                rope_parameters=rope,
                moe_intermediate_size=hidden // 2,
                num_experts=4,
                num_experts_per_tok=2,
            ),
            vision_config=_qwen3_vision(hidden, vision_hidden),
            **_qwen_ids(),
        )
    if model_type == "paligemma":
        return tf.PaliGemmaConfig(
            text_config=tf.GemmaConfig(**txt, head_dim=hidden // heads),
            vision_config=_siglip(),
            image_token_index=IMAGE_ID,
            projection_dim=hidden,
        )
    if model_type in ("aya_vision", "cohere2_vision"):
        text = tf.Cohere2Config(
            **txt, sliding_window=64, layer_types=["sliding_attention", "full_attention"] * (layers // 2)
        )
        config = tf.AyaVisionConfig if model_type == "aya_vision" else tf.Cohere2VisionConfig
        extra = {"alignment_intermediate_size": hidden} if model_type == "cohere2_vision" else {}
        return config(text_config=text, vision_config=_siglip(), image_token_id=IMAGE_ID, downsample_factor=1, **extra)
    if model_type == "llama4":
        text = dict(
            txt,
            head_dim=hidden // heads,
            intermediate_size_mlp=2 * hidden,
            num_local_experts=2,
            interleave_moe_layer_step=2,
            no_rope_layer_interval=2,
            attention_chunk_size=8,
        )
        vision = dict(
            _vision_dict(),
            vision_output_dim=vision_hidden,
            projector_input_dim=hidden,
            projector_output_dim=hidden,
            pixel_shuffle_ratio=0.5,
        )
        return tf.Llama4Config(text_config=text, vision_config=vision, image_token_index=IMAGE_ID)
    if model_type == "llama4_text":
        return _tiny_config("llama4", layers, hidden, heads, kv_heads, vision_hidden).text_config
    if model_type == "phi4_multimodal":
        vision = dict(_vision_dict(), image_token_id=IMAGE_ID)
        audio = dict(
            hidden_size=32,
            intermediate_size=64,
            num_blocks=1,
            num_attention_heads=2,
            ext_pw_out_channel=32,
            depthwise_separable_out_channel=32,
            nemo_conv_channels=32,
            audio_token_id=VIDEO_ID,
        )
        return tf.Phi4MultimodalConfig(**txt, vision_config=vision, audio_config=audio)
    if model_type == "chameleon":
        return tf.ChameleonConfig(**txt, vq_config=_vq(), vocabulary_map={"<image>": IMAGE_ID})
    if model_type == "emu3":
        vq = dict(
            codebook_size=16,
            embed_dim=4,
            latent_channels=4,
            base_channels=32,
            channel_multiplier=[1],
            num_res_blocks=1,
            attn_resolutions=[],
            hidden_size=32,
            num_attention_heads=1,
        )
        return tf.Emu3Config(text_config=tf.Emu3TextConfig(**txt), vq_config=vq, vocabulary_map={"<image>": IMAGE_ID})
    if model_type == "janus":
        vision = dict(_vision_dict(), projection_dim=hidden, depth=1, num_image_tokens=4)
        vq = dict(_vq(), num_patches=2, projection_dim=hidden, image_token_embed_dim=hidden, num_hidden_layers=1)
        return tf.JanusConfig(
            text_config=tf.LlamaConfig(**txt), vision_config=vision, vq_config=vq, image_token_id=IMAGE_ID
        )
    if model_type == "fuyu":
        text = dict(txt, num_key_value_heads=heads, hidden_act="relu2", qk_layernorm=True)
        return tf.FuyuConfig(text_config=text, image_size=28, patch_size=14, image_token_id=IMAGE_ID)
    if model_type == "llava_next_video":
        return tf.LlavaNextVideoConfig(
            text_config=tf.LlamaConfig(**txt),
            vision_config=_clip(),
            image_token_index=IMAGE_ID,
            video_token_index=VIDEO_ID,
            image_grid_pinpoints=[[28, 28]],
        )
    if model_type == "vipllava":
        return tf.VipLlavaConfig(
            text_config=tf.LlamaConfig(**txt),
            vision_config=_clip(),
            image_token_index=IMAGE_ID,
            vision_feature_layers=[-1],
        )
    if model_type == "video_llava":
        return tf.VideoLlavaConfig(
            text_config=tf.LlamaConfig(**txt),
            vision_config=_clip(),
            image_token_index=IMAGE_ID,
            video_token_index=VIDEO_ID,
            image_seq_length=4,
            video_seq_length=32,
        )
    if model_type == "idefics2":
        perceiver = dict(
            hidden_size=hidden,
            resampler_n_latents=4,
            resampler_depth=1,
            resampler_n_heads=2,
            resampler_head_dim=16,
            num_key_value_heads=1,
        )
        return tf.Idefics2Config(
            text_config=tf.MistralConfig(**txt),
            vision_config=_vision_dict(),
            perceiver_config=perceiver,
            image_token_id=IMAGE_ID,
        )
    if model_type in ("glm46v", "glm_ocr"):
        rope = dict(_mrope(hidden, heads), partial_rotary_factor=1.0)
        vision = _merged_vision(hidden, vision_hidden, image_size=28)
        config = tf.Glm46VConfig if model_type == "glm46v" else tf.GlmOcrConfig
        return config(text_config=dict(txt, rope_parameters=rope), vision_config=vision, **_glm_ids())
    if model_type == "lighton_ocr":
        vision = dict(_vision_dict(), head_dim=16, model_type="pixtral")
        return tf.LightOnOcrConfig(
            text_config=dict(txt, model_type="qwen3", head_dim=hidden // heads),
            vision_config=vision,
            image_token_id=IMAGE_ID,
            spatial_merge_size=1,
        )
    if model_type in ("deepseek_vl", "deepseek_vl_hybrid"):
        extra = {}
        if model_type == "deepseek_vl_hybrid":
            extra["high_res_vision_config"] = dict(
                hidden_size=32,
                output_channels=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=16,
                window_size=2,
                global_attn_indexes=[0],
                mlp_dim=64,
            )
        config = tf.DeepseekVLConfig if model_type == "deepseek_vl" else tf.DeepseekVLHybridConfig
        return config(text_config=tf.LlamaConfig(**txt), vision_config=_siglip(), image_token_id=IMAGE_ID, **extra)
    if model_type == "paddleocr_vl":
        text = dict(txt, head_dim=hidden // heads, rope_parameters=_mrope(hidden, heads))
        vision = dict(_vision_dict(), spatial_merge_size=2)
        return tf.PaddleOCRVLConfig(text_config=text, vision_config=vision, **_qwen_ids())
    if model_type == "video_llama_3":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=14)
        return tf.VideoLlama3Config(
            text_config=dict(txt, model_type="qwen2"),
            vision_config=vision,
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
        )
    if model_type == "aria":
        text = tf.AriaTextConfig(**txt, moe_num_experts=2, moe_topk=1, moe_num_shared_experts=1)
        vision = dict(_vision_dict(), model_type="idefics3_vision")
        return tf.AriaConfig(
            text_config=text, vision_config=vision, image_token_index=IMAGE_ID, projector_patch_to_query_dict={4: 4}
        )
    if model_type == "shieldgemma2":
        return tf.ShieldGemma2Config(
            text_config=tf.Gemma3TextConfig(**txt, head_dim=hidden // heads, sliding_window=64),
            vision_config=_siglip(),
            mm_tokens_per_image=4,
            image_token_index=IMAGE_ID,
            boi_token_index=VISION_START_ID,
            eoi_token_index=VISION_END_ID,
        )
    if model_type == "granite_docling":
        vision = dict(_vision_dict(), image_size=56, out_hidden_size=hidden, scale_factor=2)
        return tf.GraniteDoclingConfig(text_config=txt, vision_config=vision, image_token_id=IMAGE_ID, pad_token_id=0)
    if model_type == "hunyuan_vl":
        vision = dict(
            _vision_dict(),
            out_hidden_size=hidden,
            text_hidden_size=hidden,
            spatial_merge_size=2,
            max_vit_seq_len=64,
            max_image_size=64,
            min_image_size=32,
        )
        text = dict(txt, head_dim=hidden // heads, rope_parameters=_mrope(hidden, heads))
        return tf.HunYuanVLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_ID)
    if model_type == "cosmos3_omni":
        rope = dict(_mrope(hidden, heads), mrope_interleaved=True)
        return tf.Cosmos3OmniConfig(
            text_config=dict(txt, head_dim=hidden // heads, rope_parameters=rope),
            vision_config=_qwen3_vision(hidden, vision_hidden),
            **_qwen_ids(),
        )
    if model_type == "exaone4_5":
        vision = dict(
            _qwen3_vision(hidden, vision_hidden),
            patch_size=14,
            window_size=56,
            fullatt_block_indexes=[0],
            num_key_value_heads=2,
            deepstack_visual_indexes=None,
            num_position_embeddings=None,
        )
        text = tf.Exaone4Config(
            **txt, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * (layers // 2)
        )
        return tf.Exaone4_5_Config(
            text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID
        )
    if model_type == "ernie4_5_vl_moe":
        text = dict(
            txt,
            # sections ordered (h, w, t), with h = w
            rope_parameters=dict(_mrope(hidden, heads), mrope_section=_mrope(hidden, heads)["mrope_section"][::-1]),
            moe_intermediate_size=[hidden // 2, hidden // 2],
            moe_k=2,
            moe_num_experts=4,
            moe_num_shared_experts=1,
        )
        vision = dict(depth=1, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2)
        return tf.Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision, **_glm_ids())
    if model_type == "hyperclovax_vision_v2":
        vision = _tiny_config("qwen2_5_vl", layers, hidden, heads, kv_heads, vision_hidden).vision_config.to_dict()
        return tf.HyperCLOVAXVisionV2Config(
            text_config=dict(txt, model_type="hyperclovax"),
            vision_config=dict(vision, model_type="qwen2_5_vl_vision"),
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
        )
    if model_type == "fast_vlm":
        vision = dict(
            model_type="timm_wrapper",
            architecture="fastvit_mci3",
            do_pooling=True,
            global_pool="avg",
            hidden_size=128,
            model_args=dict(inference_mode=True, layers=(1, 1, 1, 1, 1), embed_dims=(8, 16, 32, 64, 64)),
        )
        return tf.FastVlmConfig(text_config=tf.Qwen2Config(**txt), vision_config=vision, image_token_index=IMAGE_ID)
    if model_type == "molmo2":
        vision = dict(_vision_dict(), num_key_value_heads=2, head_dim=16, image_size=[28, 28])
        adapter = dict(
            vision_feature_layer=[-1],
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=64,
            text_hidden_size=hidden,
        )
        text = dict(txt, head_dim=hidden // heads, additional_vocab_size=8)
        return tf.Molmo2Config(text_config=text, vision_config=vision, adapter_config=adapter, image_patch_id=IMAGE_ID)
    if model_type == "granite4_vision":
        return tf.Granite4VisionConfig(
            text_config=txt,
            vision_config=dict(_vision_dict(), hidden_size=64, model_type="clip_vision_model"),  # Q-Former: 64 per head
            qformer_config=dict(num_hidden_layers=1, intermediate_size=64, use_qformer_text_input=False),
            image_token_index=IMAGE_ID,
            image_grid_pinpoints=[[28, 28]],
            downsample_rate="1/2",
            deepstack_layer_map=[[-1, 0]],
            spatial_target_layers=[0, 1, 2, 3],
        )
    if model_type == "deepseek_v3":
        return tf.DeepseekV3Config(**_deepseek_v3(layers, hidden, heads))
    if model_type == "gemma3n_text":
        return tf.Gemma3nTextConfig(
            **txt,
            head_dim=hidden // heads,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2),
            num_kv_shared_layers=layers // 2,
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8,
            altup_num_inputs=2,
            laurel_rank=4,
        )
    if model_type == "perception_lm":
        vision = dict(
            model_type="timm_wrapper",
            architecture="vit_pe_core_tiny_patch16_384",
            model_args=dict(embed_dim=vision_hidden, depth=1, num_heads=2, img_size=32, ref_feat_shape=(2, 2)),
        )
        return tf.PerceptionLMConfig(
            text_config=tf.LlamaConfig(**txt), vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID
        )
    if model_type == "gemma3n":
        text = _tiny_config("gemma3n_text", layers, hidden, heads, kv_heads, vision_hidden)
        vision = dict(model_args={"channel_multiplier": 0.125})  # timm's MobileNetV5 encoder, 16M parameters
        audio = dict(
            hidden_size=32, conf_num_attention_heads=2, conf_num_hidden_layers=1, sscp_conv_channel_size=[8, 8]
        )
        return tf.Gemma3nConfig(
            text_config=text,
            vision_config=vision,
            audio_config=audio,
            vision_soft_tokens_per_image=4,
            image_token_id=IMAGE_ID,
            audio_token_id=VIDEO_ID,
        )
    if model_type in ("qwen2_5_omni_thinker", "qwen3_omni_moe_thinker"):
        audio = dict(
            num_mel_bins=8,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            d_model=32,
            output_dim=hidden,
            max_source_positions=64,
        )
        audio_id = VISION_END_ID + 1
        if model_type == "qwen3_omni_moe_thinker":
            text = dict(
                txt,
                head_dim=hidden // heads,
                rope_parameters=dict(_mrope(hidden, heads), mrope_interleaved=True),
                moe_intermediate_size=hidden // 2,
                num_experts=4,
                num_experts_per_tok=2,
            )
            return tf.Qwen3OmniMoeThinkerConfig(
                text_config=text,
                vision_config=_qwen3_vision(hidden, vision_hidden),
                audio_config=dict(audio, downsample_hidden_size=8),
                image_token_id=IMAGE_ID,
                video_token_id=VIDEO_ID,
                audio_token_id=audio_id,
                vision_start_token_id=VISION_START_ID,  # read by its rope index, though not a field of its config
            )
        vision = dict(
            _qwen3_vision(hidden, vision_hidden),
            patch_size=14,
            window_size=56,
            fullatt_block_indexes=[0],
            deepstack_visual_indexes=None,
            num_position_embeddings=None,
        )
        return tf.Qwen2_5OmniThinkerConfig(
            text_config=dict(txt, rope_parameters=_mrope(hidden, heads)),
            vision_config=vision,
            audio_config=audio,
            image_token_index=IMAGE_ID,
            video_token_index=VIDEO_ID,
            audio_token_index=audio_id,
            vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
        )
    if model_type == "kimi_k25":
        vision = dict(
            num_hidden_layers=1,
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_attention_heads=2,
            pos_emb_height=8,
            pos_emb_width=8,
        )
        return tf.Kimi_K25Config(
            text_config=_deepseek_v3(layers, hidden, heads),
            vision_config=vision,
            projection_hidden_size=vision_hidden,
            **_qwen_ids(),
        )
    if model_type == "ovis2":
        vision = dict(_vision_dict(), vocab_size=64, num_visual_indicator_tokens=2)
        return tf.Ovis2Config(
            text_config=tf.Qwen2Config(**txt),
            vision_config=vision,
            image_token_id=IMAGE_ID,
            visual_indicator_token_ids=[VISION_START_ID, VISION_END_ID],
            vocab_size=VOCAB,
            hidden_size=hidden,
        )
    raise ValueError(f"no tiny config for model_type {model_type!r}; known: {', '.join(ARCHS)}")


#: the model types with a tiny config that the installed transformers knows
ARCHS = tuple(
    model_type
    for model_type in (
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
        "glm4v",
        "glm4v_moe",
        "qwen3_vl_moe",
        "paligemma",
        "aya_vision",
        "cohere2_vision",
        "llama4",
        "llama4_text",
        "phi4_multimodal",
        "chameleon",
        "emu3",
        "janus",
        "fuyu",
        "kimi_k25",
        "ovis2",
        "qwen2_5_omni_thinker",
        "qwen3_omni_moe_thinker",
        "llava_next_video",
        "vipllava",
        "video_llava",
        "idefics2",
        "glm46v",
        "glm_ocr",
        "lighton_ocr",
        "deepseek_vl",
        "deepseek_vl_hybrid",
        "paddleocr_vl",
        "video_llama_3",
        "aria",
        "shieldgemma2",
        "granite_docling",
        "hunyuan_vl",
        "cosmos3_omni",
        "exaone4_5",
        "ernie4_5_vl_moe",
        "hyperclovax_vision_v2",
        "molmo2",
        "granite4_vision",
        "gemma3n_text",
        "gemma3n",
        "perception_lm",
        "fast_vlm",
    )
    if model_type in CONFIG_MAPPING_NAMES
)

#: model_type -> the package its vision tower needs beyond transformers (timm builds these towers)
REQUIRES = {"gemma3n": "timm", "perception_lm": "timm", "fast_vlm": "timm"}


_CAUSAL_LM = (
    "deepseek_v3",
    "gemma3n_text",
    "llama4_text",
    "phi4_multimodal",
)  # not image-text-to-text models in transformers


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
    auto = tf.AutoModelForCausalLM if model_type in _CAUSAL_LM else tf.AutoModelForImageTextToText
    model = auto.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


#: A random-weight Qwen2.5-VL for byte-level prompts (`headgain.testing.synthetic`): deep
#: enough for the paper's presets (l_perc = 7), initialised with a wide range so heads differ
#: in how much they look at the image. `headgain eval` runs it without a `--model` (answers
#: are noise: the run shows the machinery), and its tests use it.
BYTE_MODEL = dict(layers=12, hidden=256, heads=8, kv_heads=2, vision_hidden=64, init_std=0.1)


def byte_model(attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """The model of `BYTE_MODEL`, random weights, eval mode."""
    return tiny_model("qwen2_5_vl", attn_implementation, dtype=dtype, **BYTE_MODEL)
