"""Layouts headgain cannot act on are refused before the model is touched, with a reason and
what to do instead, whether they are found by model_type or from an explicit ArchMap."""

import pytest
import torch
import transformers as tf
from support import skip_moved_decoder, token_inputs
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import headgain
from headgain import ArchMap
from headgain.testing.tiny import text_config_kwargs, tiny_config

CFG = dict(l_perc=0, l_reas=0)


def _skip_unknown(model_type):
    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"{model_type} is not in transformers {tf.__version__}")


def _mllama():
    text = dict(text_config_kwargs(layers=3), cross_attention_layers=[1])
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_global_layers=1,
        attention_heads=2,
        image_size=28,
        patch_size=14,
        vision_output_dim=64,
        intermediate_layers_indices=[0],
    )
    return tf.AutoModelForImageTextToText.from_config(tf.MllamaConfig(text_config=text, vision_config=vision))


def _lfm2_vl():
    text = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["conv", "full_attention", "conv"],
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=14)
    return tf.AutoModelForImageTextToText.from_config(tf.Lfm2VlConfig(text_config=text, vision_config=vision))


def _florence2():
    text = dict(
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=320,
        max_position_embeddings=64,
    )
    vision = dict(
        depths=(1, 1),
        patch_size=(7, 3),
        patch_stride=(4, 2),
        patch_padding=(3, 1),
        patch_prenorm=(False, True),
        embed_dim=(16, 32),
        num_heads=(2, 2),
        num_groups=(2, 2),
        window_size=4,
        projection_dim=32,
    )
    return tf.AutoModelForImageTextToText.from_config(tf.Florence2Config(text_config=text, vision_config=vision))


def _qwen3_5():
    text = dict(
        text_config_kwargs(layers=2),
        head_dim=16,
        layer_types=["linear_attention", "full_attention"],
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
    )
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    return tf.AutoModelForImageTextToText.from_config(tf.Qwen3_5Config(text_config=text, vision_config=vision))


def _t5gemma2():
    text = dict(text_config_kwargs(layers=2), head_dim=16, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=14)
    config = tf.T5Gemma2Config(
        encoder=dict(text_config=text, vision_config=vision, mm_tokens_per_image=4), decoder=text
    )
    return tf.AutoModelForImageTextToText.from_config(config)


def _idefics():
    vision = dict(embed_dim=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    config = tf.IdeficsConfig(**text_config_kwargs(layers=2), vision_config=vision)
    return tf.AutoModelForImageTextToText.from_config(config)


LAYOUTS = {
    "mllama": (_mllama, "model.language_model.layers.*.self_attn", "cross-attention layers"),
    "lfm2_vl": (_lfm2_vl, "model.language_model.layers.*.self_attn", "(interleaves short-convolution|not layers)"),
    "florence2": (_florence2, "model.language_model.decoder.layers.*.self_attn", "encoder-decoder"),
    "qwen3_5": (_qwen3_5, "model.language_model.layers.*.self_attn", "(interleaves Gated DeltaNet|not layers)"),
    "t5gemma2": (_t5gemma2, "model.decoder.layers.*.self_attn", "encoder-decoder"),
}
#: refused by model_type only: an explicit ArchMap is the user's own decision
BY_TYPE = {"idefics": (_idefics, "gated cross-attention layers")}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_unsupported_layouts_are_refused_with_a_reason_and_a_remedy(name):
    _skip_unknown(name)
    make, path, reason = LAYOUTS[name]
    model = make()
    assert model.config.model_type == name
    with pytest.raises(headgain.ArchError, match=f"model_type '{name}' is not supported: .*{reason}.*Use a"):
        headgain.attach(model, cfg=CFG)
    with pytest.raises(headgain.ArchError, match=reason) as refused:  # found from the layout itself
        headgain.attach(model, ArchMap(path), CFG)
    assert "use" in str(refused.value).lower()
    assert headgain.handle_of(model) is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", sorted(BY_TYPE))
def test_unsupported_model_types_are_refused_with_a_reason_and_a_remedy(name):
    _skip_unknown(name)
    make, reason = BY_TYPE[name]
    model = make()
    assert model.config.model_type == name
    with pytest.raises(headgain.ArchError, match=f"model_type '{name}' is not supported: .*{reason}.*Use a"):
        headgain.attach(model, cfg=CFG)
    assert headgain.handle_of(model) is None


def test_layers_of_different_head_widths_are_refused():
    """Gemma 4's full-attention layers have wider heads than its sliding layers; its config
    keeps head_dim per layer, and reading the global value raises (a RuntimeError)."""
    _skip_unknown("gemma4")
    text = dict(
        text_config_kwargs(),
        head_dim=16,
        global_head_dim=32,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        vocab_size_per_layer_input=320,
        hidden_size_per_layer_input=8,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=14,
        position_embedding_size=64,
    )
    config = tf.Gemma4Config(text_config=text, vision_config=vision, audio_config=None)
    with pytest.raises(RuntimeError):
        assert config.text_config.head_dim is None  # never reached: reading it raises
    model = tf.AutoModelForImageTextToText.from_config(config)
    with pytest.raises(headgain.ArchError, match=r"different widths \[64, 128\].*one head width"):
        headgain.attach(model, ArchMap("model.language_model.layers.*.self_attn"), CFG)
    assert headgain.handle_of(model) is None


@pytest.mark.parametrize(
    "top, thinker", [("Qwen2_5OmniConfig", "qwen2_5_omni_thinker"), ("Qwen3OmniMoeConfig", "qwen3_omni_moe_thinker")]
)
def test_omni_models_are_refused_and_their_thinker_is_attached(top, thinker):
    _skip_unknown(thinker)
    config = getattr(tf, top)(thinker_config=tiny_config(thinker).to_dict(), enable_audio_output=False)
    model = tf.AutoModelForMultimodalLM.from_config(config).eval()
    with pytest.raises(headgain.ArchError, match=f"no forward of its own.*Use model.thinker.*{thinker}"):
        headgain.attach(model, cfg=CFG)
    assert headgain.handle_of(model) is None
    skip_moved_decoder(model.thinker, thinker)
    handle = headgain.attach(model.thinker, cfg=CFG)
    with torch.no_grad():
        model.thinker(**token_inputs())
    assert handle.last_ratios.shape == (4, 2, 4) and (handle.last_ratios > 0).all()
    handle.detach()
