"""The architecture maps headgain ships, keyed by ``transformers``' ``model_type``.

Pure data: each entry says where the language decoder's attention modules are, their
output projection, and which config attributes hold the visual placeholder token ids.
`headgain.core.registry` registers every entry of `BUILTIN` at import; `UNSUPPORTED` names
the layouts headgain refuses, with the reason and what to do instead.
"""

from __future__ import annotations

from ..core.archmap import ArchMap

_KIMI_NOTES = (
    "Kimi-VL (moonshotai/Kimi-VL-A3B-*) is remote code (trust_remote_code=True): "
    "KimiVLForConditionalGeneration keeps its DeepSeek-V3 decoder at language_model.model.layers.*.self_attn "
    "(multi-head latent attention, value width v_head_dim) and its MoonViT tower at vision_tower; the image "
    "placeholder id is config.media_placeholder_token_id. Its attention must go through transformers' "
    "attention interface; remote code that calls its own kernels directly is reported at the first forward pass."
)

_LM = "model.language_model.layers.*.self_attn"
BUILTIN: dict[str, ArchMap] = {
    "qwen2_vl": ArchMap(_LM),
    "qwen2_5_vl": ArchMap(_LM),
    "qwen3_vl": ArchMap(_LM),
    "llava": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "llava_next": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "llava_onevision": ArchMap(_LM),
    "gemma3": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "idefics3": ArchMap("model.text_model.layers.*.self_attn", visual_token_ids=("image_token_id",)),
    "smolvlm": ArchMap("model.text_model.layers.*.self_attn", visual_token_ids=("image_token_id",)),
    "mistral3": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "internvl": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "glm4v": ArchMap(_LM),
    "glm4v_moe": ArchMap(_LM),
    "qwen3_vl_moe": ArchMap(_LM),
    "paligemma": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "aya_vision": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "cohere2_vision": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "llama4": ArchMap("language_model.model.layers.*.self_attn", visual_token_ids=("image_token_id",)),
    "phi4_multimodal": ArchMap("model.layers.*.self_attn", visual_token_ids=("vision_config.image_token_id",)),
    "chameleon": ArchMap("model.layers.*.self_attn", visual_token_ids=("image_token_id",)),
    "emu3": ArchMap("model.text_model.layers.*.self_attn", visual_token_ids=("image_token_id",)),
    "janus": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "fuyu": ArchMap(_LM, o_proj="dense", visual_token_ids=("image_token_id",)),
    "kimi_k25": ArchMap(_LM, head_dim="v_head_dim"),
    "ovis2": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "gemma3n": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "perception_lm": ArchMap(_LM),
    "qwen2_5_omni_thinker": ArchMap(_LM),
    "qwen3_omni_moe_thinker": ArchMap(_LM),
    "llava_next_video": ArchMap(_LM),
    "vipllava": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "video_llava": ArchMap(_LM),
    "idefics2": ArchMap("model.text_model.layers.*.self_attn", visual_token_ids=("image_token_id",)),
    "glm46v": ArchMap(_LM),
    "glm_ocr": ArchMap(_LM),
    "lighton_ocr": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "deepseek_vl": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "deepseek_vl_hybrid": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "paddleocr_vl": ArchMap(_LM),
    "video_llama_3": ArchMap(_LM),
    "aria": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "shieldgemma2": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "granite_docling": ArchMap("model.text_model.layers.*.self_attn", visual_token_ids=("image_token_id",)),
    "hunyuan_vl": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "cosmos3_omni": ArchMap(_LM),
    "exaone4_5": ArchMap(_LM),
    "ernie4_5_vl_moe": ArchMap(_LM),
    "hyperclovax_vision_v2": ArchMap(_LM),
    "fast_vlm": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "molmo2": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "granite4_vision": ArchMap(_LM, visual_token_ids=("image_token_id",)),
    "deepseek_v3": ArchMap("model.layers.*.self_attn", head_dim="v_head_dim", visual_token_ids=()),
    "llama4_text": ArchMap("model.layers.*.self_attn", visual_token_ids=()),
    "gemma3n_text": ArchMap("model.layers.*.self_attn", visual_token_ids=()),
    "kimi_vl": ArchMap(
        "language_model.model.layers.*.self_attn",
        head_dim="v_head_dim",
        visual_token_ids=("media_placeholder_token_id",),
        notes=_KIMI_NOTES,
    ),
}

#: model_type -> why headgain refuses it and what to do instead.
UNSUPPORTED: dict[str, str] = {
    "mllama": (
        "Llama 3.2 Vision reads the image through cross-attention layers, so its self-attention never sees image "
        "tokens and S_v (the share of self-attention on image tokens) is zero for every head. Use a VLM whose "
        "decoder holds the image tokens in its sequence (qwen2_5_vl, llava, gemma3, ...)"
    ),
    "lfm2_vl": (
        "LFM2-VL's decoder interleaves short-convolution layers with attention layers; headgain reads and scales "
        "every decoder layer's attention heads and does not support such hybrid decoders. Use a model whose decoder "
        "layers are all attention layers"
    ),
    "florence2": (
        "Florence-2 is an encoder-decoder: the image tokens sit in the encoder's input and the decoder that generates "
        "reads them only through cross-attention, which the paper's S_v does not define. Use a decoder-only VLM"
    ),
}
_HYBRID = (
    "{model}'s decoder interleaves {other} layers with attention layers; headgain reads and scales every decoder "
    "layer's attention heads and does not support such hybrid decoders. Use a model whose decoder layers are all "
    "attention layers"
)
_ENCODER_DECODER = (
    "{model} is an encoder-decoder: the image sits in the encoder's input and the decoder that generates reads it "
    "only through cross-attention, which the paper's S_v does not define. Use a decoder-only VLM"
)
UNSUPPORTED.update(
    {
        "qwen3_5": _HYBRID.format(model="Qwen3.5", other="Gated DeltaNet (linear attention)"),
        "qwen3_5_moe": _HYBRID.format(model="Qwen3.5-MoE", other="Gated DeltaNet (linear attention)"),
        "qwen4_exp": _HYBRID.format(model="Qwen4-Exp", other="Gated DeltaNet (linear attention)"),
        "glm5_next": _HYBRID.format(model="GLM-5-Next", other="linear attention"),
        "minicpmv4_6": _HYBRID.format(
            model="MiniCPM-V 4.6 (a Qwen3.5 decoder)", other="Gated DeltaNet (linear attention)"
        ),
        "minicpmv4_7": _HYBRID.format(
            model="MiniCPM-V 4.7 (a Qwen3.5 decoder)", other="Gated DeltaNet (linear attention)"
        ),
        "minicpm_ocr": _HYBRID.format(
            model="MiniCPM-OCR (a Qwen3.5 decoder)", other="Gated DeltaNet (linear attention)"
        ),
        "lfm3_vl": _HYBRID.format(model="LFM3-VL", other="short-convolution"),
        "nemotron_h_omni": _HYBRID.format(model="Nemotron-H Omni", other="Mamba-2 (state-space) and MLP-only"),
        "idefics": (
            "IDEFICS (v1) reads the image through gated cross-attention layers, so its self-attention never sees "
            "image features and S_v (the share of self-attention on image tokens) says nothing about the image. Use a "
            "VLM whose decoder holds the image tokens in its sequence (idefics2, idefics3, qwen2_5_vl, llava, ...)"
        ),
        "blip": _ENCODER_DECODER.format(model="BLIP (captioning)"),
        "pix2struct": _ENCODER_DECODER.format(model="Pix2Struct"),
        "udop": _ENCODER_DECODER.format(model="UDOP"),
        "t5gemma2": _ENCODER_DECODER.format(model="T5Gemma 2"),
        "vision-encoder-decoder": _ENCODER_DECODER.format(model="VisionEncoderDecoderModel"),
    }
)
_OMNI = (
    "'s top model has no forward of its own: its generate() runs the thinker (a decoder-only VLM that reads "
    "images, video and audio) and then the talker, which turns the thinker's hidden states into speech. Use "
    "model.thinker: headgain.attach(model.thinker, cfg=...) (registered as {thinker})"
)
UNSUPPORTED.update(
    {
        "qwen2_5_omni": "Qwen2.5-Omni" + _OMNI.format(thinker="qwen2_5_omni_thinker"),
        "qwen3_omni_moe": "Qwen3-Omni" + _OMNI.format(thinker="qwen3_omni_moe_thinker"),
    }
)

#: Models whose generate() runs a submodule's generate on embeddings (the top model's
#: forward is never called): headgain starts passes at their decoder module and takes the
#: visual positions from the input_ids given to the attached model's generate().
_OPT_IN_LM = "language_model.model.decoder.layers.*.self_attn"
BUILTIN.update(
    {
        "blip-2": ArchMap(_OPT_IN_LM, o_proj="out_proj", head_dim=None, visual_token_ids=("image_token_id",)),
        "instructblip": ArchMap(_OPT_IN_LM, o_proj="out_proj", head_dim=None, visual_token_ids=("image_token_id",)),
    }
)
