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
