"""The architecture maps headgain ships, keyed by ``transformers``' ``model_type``.

Pure data: each entry says where the language decoder's attention modules are, their
output projection, and which config attributes hold the visual placeholder token ids.
`headgain.core.registry` registers every entry at import.
"""

from __future__ import annotations

from ..core.registry import ArchMap

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
    "deepseek_v3": ArchMap("model.layers.*.self_attn", head_dim="v_head_dim", visual_token_ids=()),
    "kimi_vl": ArchMap(
        "language_model.model.layers.*.self_attn",
        head_dim="v_head_dim",
        visual_token_ids=("media_placeholder_token_id",),
        notes=_KIMI_NOTES,
    ),
}
