"""Identity, detach, errors, config, dtypes and query modes of the core API."""

import json
import re
import warnings

import pytest
import torch
from support import reference_ratios, token_inputs, twin_models, visual_of
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import headgain
from headgain import ArchMap, HeadGainConfig
from headgain.testing.tiny import IMAGE_ID, tiny_model

CFG = dict(l_perc=1, l_reas=2, tau_perc=0.3, tau_reas=0.29, g_perc=1.5, g_reas=1.7)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_disabled_and_unit_gains_are_bitwise_identity(backend):
    model = tiny_model("qwen2_5_vl", backend)
    inputs = token_inputs()
    before = _logits(model, inputs)
    handle = headgain.attach(model, cfg=CFG)
    assert not torch.equal(_logits(model, inputs), before), "the config must change the output"
    handle.enabled = False
    assert torch.equal(_logits(model, inputs), before)
    assert handle.last_ratios is not None and torch.equal(handle.last_gains, torch.ones_like(handle.last_gains))
    handle.enabled = True
    handle.cfg = dict(CFG, g_perc=1.0, g_reas=1.0)
    assert torch.equal(_logits(model, inputs), before)


def test_detach_restores_everything_and_reattach_works():
    model = tiny_model("llava", "sdpa")
    inputs = token_inputs()
    before = _logits(model, inputs)
    hooks = _hook_count(model)
    text_config = model.config.text_config
    attention = [layer.self_attn for layer in model.model.language_model.layers]
    handle = headgain.attach(model, cfg=CFG)
    name = attention[0].config._attn_implementation
    assert name == "headgain_sdpa" and name in ALL_ATTENTION_FUNCTIONS and name in ALL_MASK_ATTENTION_FUNCTIONS
    assert text_config._attn_implementation == "sdpa", "no config object may change"
    assert all(a.config is attention[0].config and a.config is not text_config for a in attention)
    assert headgain.handle_of(model) is handle and "generate" in model.__dict__
    with pytest.raises(headgain.HeadGainError, match="already attached"):
        headgain.attach(model, cfg=CFG)
    _logits(model, inputs)
    handle.detach()
    handle.detach()  # idempotent
    assert all(a.config is text_config and "_headgain_site" not in a.__dict__ for a in attention)
    assert _hook_count(model) == hooks and not hasattr(model, "_headgain_handle") and "generate" not in model.__dict__
    assert headgain.handle_of(model) is None
    assert torch.equal(_logits(model, inputs), before)
    with headgain.attach(model, cfg=CFG) as again:
        assert not torch.equal(_logits(model, inputs), before)
    assert not again.attached
    assert torch.equal(_logits(model, inputs), before)


def test_vision_tower_untouched():
    model = tiny_model("qwen2_5_vl", "sdpa")
    vision_impl = model.config.vision_config._attn_implementation
    with headgain.attach(model, cfg=CFG):
        assert model.config.vision_config._attn_implementation == vision_impl


def test_sample_without_visual_tokens_is_untouched_and_warned_once():
    model = tiny_model("qwen2_5_vl", "sdpa")
    inputs = token_inputs()
    inputs["input_ids"][1][inputs["input_ids"][1] == IMAGE_ID] = 5
    handle = headgain.attach(model, cfg=CFG)
    with pytest.warns(RuntimeWarning, match="no visual tokens"):
        _logits(model, inputs)
    gains = handle.last_gains
    assert torch.equal(gains[:, 1], torch.ones_like(gains[:, 1])) and (gains[:, 0] != 1).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _logits(model, inputs)


def test_set_visual_mask_for_inputs_embeds():
    model = tiny_model("qwen2_5_vl", "sdpa")
    inputs = token_inputs()
    visual = visual_of(inputs["input_ids"], inputs["attention_mask"])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    by_ids = headgain.attach(model, cfg=CFG)
    _logits(model, inputs)
    expected = by_ids.last_ratios
    by_ids.detach()
    handle = headgain.attach(model, cfg=CFG)
    handle.set_visual_mask(visual)
    _logits(model, {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]})
    torch.testing.assert_close(handle.last_ratios, expected, atol=1e-6, rtol=1e-5)
    handle.set_visual_mask(visual[:, :-1])
    with pytest.raises(headgain.HeadGainError, match=r"visual mask has shape \(2, 13\) but the prompt is \(2, 14\)"):
        _logits(model, {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]})
    with pytest.raises(headgain.HeadGainError, match="must be 2-D"):
        handle.set_visual_mask(visual[0])
    with pytest.raises(headgain.HeadGainError, match="bool or hold only 0 and 1"):
        handle.set_visual_mask(visual.float() * 0.5)


def test_decoding_continues_a_cache_filled_before_attaching():
    """A cache prefilled without headgain is continued once the mask of its tokens is given:
    the decoding step equals the one of a handle that saw the prefill with its gains off;
    without the mask the step is refused (before any layer runs) with the call that fixes it."""
    from transformers import DynamicCache

    model = tiny_model("qwen2_5_vl", "sdpa")
    inputs = token_inputs()
    visual = visual_of(inputs["input_ids"], inputs["attention_mask"])
    step = {
        "input_ids": torch.full((2, 1), 7),
        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1),
        "use_cache": True,
    }

    def prefill():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(**inputs, past_key_values=cache, use_cache=True)
        return cache

    with headgain.attach(model, cfg=CFG) as handle:
        handle.enabled = False  # the prefill stays vanilla: its cache is the one below
        cache = prefill()
        handle.enabled = True
        with torch.no_grad():
            want = model(**step, past_key_values=cache).logits
        want_ratios = handle.last_ratios
    cache = prefill()
    with headgain.attach(model, cfg=CFG) as handle, torch.no_grad():
        with pytest.raises(headgain.HeadGainError, match=re.escape("set_visual_mask(mask of shape (2, 14))")):
            model(**step, past_key_values=cache)
        assert cache.get_seq_length() == 14
        handle.set_visual_mask(visual)
        got = model(**step, past_key_values=cache).logits
        torch.testing.assert_close(handle.last_ratios, want_ratios, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():
        vanilla = model(**step, past_key_values=prefill()).logits
    assert bool((want_ratios > 0).any()) and not torch.allclose(got, vanilla, atol=1e-4)  # the gains acted


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model, ref = twin_models("qwen2_5_vl", dtype=dtype)
    inputs = token_inputs()
    handle = headgain.attach(model, cfg=dict(CFG, g_perc=1.0, g_reas=1.0))
    _logits(model, inputs)
    assert handle.last_ratios.dtype == torch.float32
    with torch.no_grad():
        out = ref(**inputs, output_attentions=True)
    expected = reference_ratios(out.attentions, visual_of(inputs["input_ids"], inputs["attention_mask"]))
    torch.testing.assert_close(handle.last_ratios, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_mean_text_query_matches_eager_reference(backend):
    model, ref = twin_models("llava", backend)
    inputs = token_inputs()
    handle = headgain.attach(model, cfg=dict(CFG, g_perc=1.0, g_reas=1.0, query="mean_text"))
    _logits(model, inputs)
    with torch.no_grad():
        out = ref(**inputs, output_attentions=True)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    visual = visual_of(ids, mask)
    text = mask & ~visual
    expected = []
    for attn in out.attentions:  # (B, H, N, N)
        per_row = (attn * visual[:, None, None, :].float()).sum(-1)  # (B, H, N)
        expected.append((per_row * text[:, None, :]).sum(-1) / text.sum(-1, keepdim=True))
    torch.testing.assert_close(handle.last_ratios, torch.stack(expected), atol=2e-5, rtol=1e-4)


def test_cfg_is_live_and_validated_against_the_model():
    model = tiny_model("qwen2_5_vl", "sdpa")
    handle = headgain.attach(model, cfg=CFG)
    with pytest.raises(headgain.ConfigError, match="l_perc=7 outside the model: its decoder has 4 layers"):
        handle.cfg = "ocean-r1-7b"
    handle.cfg = dict(CFG, tau_perc=1.0, tau_reas=0.0)
    _logits(model, token_inputs())
    assert torch.equal(handle.last_gains, torch.ones_like(handle.last_gains))
    handle.detach()
    with pytest.raises(headgain.ConfigError, match="outside the model"):
        headgain.attach(model)  # the default preset needs 8 layers
    assert model.model.language_model.layers[0].self_attn.config is model.config.text_config


def test_default_preset_on_a_model_deep_enough():
    model = tiny_model("qwen2_5_vl", "sdpa", layers=8)
    with headgain.attach(model) as handle:
        assert handle.cfg == headgain.presets["ocean-r1-7b"]


# ---------------------------------------------------------------------- errors
def test_unknown_model_type_lists_registered():
    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=50)
    )
    with pytest.raises(
        headgain.ArchError, match=r"no architecture map registered for model_type 'llama'; registered: .*qwen2_5_vl"
    ):
        headgain.attach(model, cfg=dict(CFG, l_reas=1))
    with headgain.attach(model, ArchMap("model.layers.*.self_attn", visual_token_ids=()), dict(CFG, l_reas=1)):
        pass


def test_arch_map_errors_leave_the_model_untouched():
    model = tiny_model("qwen2_5_vl", "sdpa")
    with pytest.raises(
        headgain.ArchError, match=r"matches no module .*Closest module names: model.language_model.layers.0.self_attn"
    ):
        headgain.attach(model, ArchMap("model.language_model.layer.*.self_attn"), CFG)
    with pytest.raises(headgain.ArchError, match="vision-tower modules only"):
        headgain.attach(model, ArchMap("model.visual.blocks.*.attn"), CFG)
    model.config.text_config.odd_heads = 3
    with pytest.raises(
        headgain.ArchError,
        match=r"ArchMap.num_heads gives 3 heads but model.language_model.layers.0.self_attn.num_heads = 4",
    ):
        headgain.attach(model, ArchMap("model.language_model.layers.*.self_attn", num_heads="odd_heads"), CFG)
    model.config.text_config.odd_dim = 7
    with pytest.raises(headgain.ArchError, match="4 heads x head_dim 7 do not divide .*o_proj input width 64"):
        headgain.attach(model, ArchMap("model.language_model.layers.*.self_attn", head_dim="odd_dim"), CFG)
    with pytest.raises(headgain.ArchError, match="exactly one"):
        ArchMap("model.language_model.layers.self_attn")
    with pytest.raises(headgain.ArchError, match="unknown architecture map 'nope'"):
        headgain.attach(model, "nope", CFG)
    with pytest.raises(headgain.ArchError, match="visual token id attributes"):
        headgain.attach(
            model, ArchMap("model.language_model.layers.*.self_attn", visual_token_ids=("no_such_id",)), CFG
        )
    attn = model.model.language_model.layers[0].self_attn
    assert attn.config is model.config.text_config and not hasattr(model, "_headgain_handle")
    with pytest.raises(headgain.ArchError, match="already registered"):
        headgain.register_arch("qwen2_5_vl", ArchMap("model.layers.*.self_attn"))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(tau_perc=1.5), r"tau_perc=1.5 must be a number in \[0, 1\]"),
        (dict(tau_reas=0.5, tau_perc=0.2), "tau_reas=0.5 must be below tau_perc=0.2"),
        (dict(g_perc=0.0), "g_perc=0.0 must be a number with 0 < g_perc <= 10"),
        (dict(g_reas=-1), "g_reas=-1 must be a number with 0 < g_reas <= 10"),
        (dict(g_perc=1e6), "g_perc=1000000.0 must be a number with 0 < g_perc <= 10 .*overflow float16"),
        (dict(alpha=float("inf")), "alpha=inf must be a number with 0 < alpha <= 10"),
        (dict(l_perc=-1), "l_perc=-1 must be a non-negative integer"),
        (dict(l_reas=1.5), "l_reas=1.5 must be a non-negative integer"),
        (dict(strategy="boost"), "strategy='boost' is not one of enhance, attenuate, bipolar, mixed"),
        (dict(query="first"), "query='first' is not one of last, mean_text"),
        (dict(beta=1.2), "beta=1.2 must be a number with 0 < beta < 1"),
        (dict(strategy="mixed", enhance_classes=["neutral"]), "needs disjoint"),
        (dict(enhance_classes=["heads"]), "enhance_classes holds"),
        (dict(shuffle_seed=-2), "shuffle_seed=-2 must be None or a non-negative integer"),
    ],
)
def test_invalid_config_values(fields, message):
    with pytest.raises(headgain.ConfigError, match=message):
        HeadGainConfig(**fields)


def test_config_json_round_trip_presets_and_coercion(tmp_path):
    cfg = HeadGainConfig(strategy="mixed", alpha=1.3, beta=0.7, attenuate_classes=("neutral",), query="mean_text")
    assert HeadGainConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "cfg.json"
    cfg.to_json(str(path))
    assert HeadGainConfig.from_json(str(path)) == cfg
    assert json.loads(path.read_text())["alpha"] == 1.3
    assert set(headgain.presets) == {"kimi-vl-a3b-thinking", "ocean-r1-7b", "r1-onevision", "toy"}
    kimi = HeadGainConfig.from_preset("kimi-vl-a3b-thinking")
    assert (kimi.l_reas, kimi.tau_reas, kimi.g_reas, kimi.l_perc, kimi.tau_perc, kimi.g_perc) == (
        5,
        0.01,
        1.40,
        10,
        0.27,
        1.20,
    )
    with pytest.raises(headgain.ConfigError, match="unknown preset 'gpt'; available presets"):
        HeadGainConfig.from_preset("gpt")
    with pytest.raises(headgain.ConfigError, match=r"unknown HeadGainConfig field\(s\) \['gain'\]"):
        HeadGainConfig.coerce({"gain": 2})
    with pytest.raises(headgain.ConfigError, match="not valid JSON"):
        HeadGainConfig.from_json("{nope")


@pytest.mark.parametrize(
    "fields, expected",
    [
        (dict(strategy="enhance"), {"perception": 1.2, "reasoning": 1.4, "neutral": 1.0}),
        (dict(strategy="attenuate", beta=0.5), {"perception": 1.0, "reasoning": 1.0, "neutral": 0.5}),
        (dict(strategy="bipolar", beta=0.5), {"perception": 1.2, "reasoning": 1.4, "neutral": 0.5}),
        (dict(strategy="bipolar", beta=0.5, alpha=1.1), {"perception": 1.1, "reasoning": 1.1, "neutral": 0.5}),
        (
            dict(strategy="mixed", beta=0.5, enhance_classes=["perception"], attenuate_classes=["reasoning"]),
            {"perception": 1.2, "reasoning": 0.5, "neutral": 1.0},
        ),
    ],
)
def test_strategies_assign_the_documented_gains(fields, expected):
    cfg = HeadGainConfig(g_perc=1.2, g_reas=1.4, **fields)
    assert cfg.class_gains() == expected


def test_strategy_gains_reach_the_heads():
    model = tiny_model("qwen2_5_vl", "sdpa")
    handle = headgain.attach(model, cfg=dict(CFG, strategy="bipolar", beta=0.5))
    _logits(model, token_inputs())
    ratios, gains = handle.last_ratios, handle.last_gains
    layers = torch.arange(handle.num_layers)[:, None, None]
    perc = (layers <= 1) & (ratios >= 0.3)
    reas = (layers >= 2) & (ratios <= 0.29) & ~perc
    expected = torch.where(perc, 1.5, torch.where(reas, 1.7, 0.5))
    assert torch.equal(gains, expected)


def _rule_gains(ratios, cfg):
    """(L, B, H) enhance-strategy gains of ``ratios`` (L, B, H), written from method.md."""
    layers = torch.arange(ratios.shape[0])[:, None, None]
    perc = (layers <= cfg.l_perc) & (ratios >= cfg.tau_perc)
    reas = (layers >= cfg.l_reas) & (ratios <= cfg.tau_reas) & ~perc
    return torch.where(perc, cfg.g_perc, torch.where(reas, cfg.g_reas, 1.0))


def test_shuffled_control_rescales_as_many_heads_elsewhere():
    model = tiny_model("qwen2_5_vl", "sdpa")
    # thresholds inside the tiny model's S_v (0.35-0.36 on sample 0): some heads of a layer are selected
    cfg = HeadGainConfig(**dict(CFG, tau_perc=0.357, tau_reas=0.356, shuffle_seed=3))
    handle = headgain.attach(model, cfg=cfg)
    inputs = token_inputs()
    control = _logits(model, inputs)
    ratios, gains = handle.last_ratios, handle.last_gains
    method = _rule_gains(ratios, cfg)  # what the method would give these S_v
    picked = (method[:, 0] != 1).sum(-1)  # per layer, sample 0: some heads, not all
    assert ((picked > 0) & (picked < handle.num_heads)).all(), picked
    for layer in range(handle.num_layers):
        order = list(headgain.core.rules.head_order(3, layer, handle.num_heads))
        assert sorted(order) == list(range(handle.num_heads))
        assert torch.equal(gains[layer], method[layer][:, order])
    assert torch.equal((gains != 1).sum(-1), (method != 1).sum(-1)) and not torch.equal(gains, method)
    handle.cfg = cfg.replace(shuffle_seed=None)
    assert not torch.equal(_logits(model, inputs), control)
    assert torch.equal(handle.last_gains, _rule_gains(handle.last_ratios, cfg))
    classes = headgain.core.rules.classify(ratios.transpose(0, 1), cfg)
    assert ((classes != 0) == (gains.transpose(0, 1) != 1).numpy()).all()
    assert HeadGainConfig.from_json(cfg.to_json()) == cfg


def test_flash_attention_where_installed():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (needs a CUDA GPU)")
    if not torch.cuda.is_available():
        pytest.skip("flash attention needs a CUDA GPU")
    model = tiny_model("qwen2_5_vl", "flash_attention_2", dtype=torch.bfloat16).cuda()
    ref = tiny_model("qwen2_5_vl", "eager", dtype=torch.bfloat16).cuda()
    ref.load_state_dict(model.state_dict())
    inputs = {k: v.cuda() for k, v in token_inputs().items()}
    handle = headgain.attach(model, cfg=dict(CFG, g_perc=1.0, g_reas=1.0))
    _logits(model, inputs)
    with torch.no_grad():
        out = ref(**inputs, output_attentions=True)
    expected = reference_ratios(out.attentions, visual_of(inputs["input_ids"], inputs["attention_mask"]))
    torch.testing.assert_close(handle.last_ratios, expected.cpu(), atol=2e-2, rtol=2e-2)


def test_attention_that_bypasses_the_interface_is_reported():
    model = tiny_model("llava", "sdpa")
    attn = model.model.language_model.layers[1].self_attn
    original = type(attn).forward

    def direct_kernel(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        b, n, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, n, -1, self.head_dim).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), None

    attn.forward = direct_kernel.__get__(attn)
    handle = headgain.attach(model, cfg=CFG)
    with pytest.raises(headgain.HeadGainError, match="only 3 of 4 decoder layers went through"):
        _logits(model, {"input_ids": token_inputs()["input_ids"]})
    handle.detach()
    assert type(attn).forward is original


def test_layer_call_outside_a_pass_is_reported():
    model = tiny_model("llava", "sdpa")
    headgain.attach(model, cfg=CFG)
    layer = model.model.language_model.layers[0]
    hidden = torch.randn(1, 5, model.config.text_config.hidden_size)
    positions = model.model.language_model.rotary_emb(hidden, torch.arange(5)[None])
    with pytest.raises(
        headgain.HeadGainError, match="ran outside a call of the attached LlavaForConditionalGeneration"
    ):
        layer(hidden, attention_mask=None, position_embeddings=positions)


def test_decoder_called_directly_starts_its_own_pass():
    model = tiny_model("llava", "sdpa")
    inputs = token_inputs()
    handle = headgain.attach(model, cfg=CFG)
    _logits(model, inputs)
    expected = handle.last_ratios
    model.model.language_model(**inputs)
    torch.testing.assert_close(handle.last_ratios, expected)


def test_arch_map_json_round_trip_and_validation(tmp_path):
    arch = ArchMap(
        "blocks.*.attn", o_proj="proj", num_heads=8, head_dim=None, visual_token_ids=(5, "vision_config.image_id")
    )
    assert ArchMap.from_json(arch.to_json()) == arch
    arch.to_json(str(tmp_path / "map.json"))
    assert ArchMap.from_json(str(tmp_path / "map.json")) == arch
    with pytest.raises(headgain.ArchError, match=r"unknown ArchMap field\(s\) \['layers'\]"):
        ArchMap.from_dict({"attention": "a.*.b", "layers": 3})
    with pytest.raises(headgain.ArchError, match="needs 'attention'"):
        ArchMap.from_dict({"o_proj": "proj"})
    with pytest.raises(headgain.ArchError, match="num_heads=0 must be a positive integer"):
        ArchMap("a.*.b", num_heads=0)
    with pytest.raises(headgain.ArchError, match="visual_token_ids holds -1"):
        ArchMap("a.*.b", visual_token_ids=(-1,))
    assert isinstance(headgain.ArchError("x"), headgain.HeadGainError)
    assert isinstance(headgain.ConfigError("x"), headgain.HeadGainError)
