"""The fused decoding step: attention output and S_v in one pass over the keys and values.

The op is checked against attention computed here from explicit softmax probabilities
(and against torch's scaled_dot_product_attention); the attached models against their own
backend: gains of 1 give the vanilla tokens, and fused and unfused steps agree.
"""

import pytest
import torch
from support import DEVICES, attach_mixed, token_inputs
from torch.library import opcheck

import headgain
from headgain.adapters import hf
from headgain.core import ops, reference
from headgain.testing.tiny import tiny_model

pytestmark = pytest.mark.skipif(not ops.extension_available("cpu"), reason="the compiled extension is not built")

TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _explicit(q, k, v, mask, visual, scaling, softcap=0.0):
    """Output (B, 1, H, Dv) float32 and S_v (B, H) from the probability matrix, per head."""
    b, h, _, _ = q.shape
    group = h // k.shape[1]
    out = torch.zeros(b, 1, h, v.shape[-1])
    ratios = torch.zeros(b, h)
    for i in range(b):
        for head in range(h):
            s = (k[i, head // group].double() @ q[i, head, 0].double()) * scaling
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            if mask is not None:
                s = s.masked_fill(~mask[i, 0], float("-inf")) if mask.dtype == torch.bool else s + mask[i, 0].double()
            p = torch.softmax(s, 0)
            out[i, 0, head] = (p[:, None] * v[i, head // group].double()).sum(0).float()
            ratios[i, head] = p[visual[i]].sum().float()
    return out, ratios


def _case(b, h, hkv, nk, d, dv, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=g).to(dtype)
    k = (2 * torch.randn(b, hkv, nk, d, generator=g)).to(dtype)
    v = torch.randn(b, hkv, nk, dv, generator=g).to(dtype)
    visual = torch.rand(b, nk, generator=g) < 0.4
    mask = torch.rand(b, 1, nk, generator=g) < 0.85
    mask[:, :, -1] = True  # the step's own key
    return tuple(t.to(device) for t in (q, k, v, visual, mask))


# (B, H, Hkv, Nk, D, Dv); the last two: query groups of 12 and 48 heads, which CUDA takes in
# passes of up to 8 heads (8 + 4, and 6 x 8)
SHAPES = [
    (2, 8, 2, 37, 64, 64),
    (1, 4, 4, 2100, 128, 128),
    (3, 16, 4, 1025, 32, 32),
    (2, 6, 2, 300, 24, 16),
    (2, 24, 2, 90, 32, 32),
    (1, 48, 1, 70, 128, 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_explicit_attention(shape, dtype, mask_kind, device):
    q, k, v, visual, mask = _case(*shape, dtype, device=device)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "additive":
        mask = torch.where(mask, 0.0, -1e9).to(dtype)
    scaling = shape[4] ** -0.5
    out, ratios = ops.decode_attention(q, k, v, mask, visual, scaling)
    want_out, want_ratios = _explicit(
        *(t.cpu() for t in (q, k, v)), mask if mask is None else mask.cpu(), visual.cpu(), scaling
    )
    assert out.device == q.device and ratios.device == q.device
    out, ratios = out.cpu(), ratios.cpu()
    assert out.dtype == dtype and out.shape == (shape[0], 1, shape[1], shape[5])
    assert ratios.dtype == torch.float32 and ratios.shape == shape[:2]
    torch.testing.assert_close(out.float(), want_out, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(ratios, want_ratios, atol=2e-6, rtol=1e-5)
    if shape[4] == shape[5]:  # torch's backend agrees too
        attn_mask = None if mask is None else mask[:, None]
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        torch.testing.assert_close(out, sdpa.transpose(1, 2).cpu(), atol=2 * TOL[dtype], rtol=2 * TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_softcap_strided_cache_and_fully_masked_rows(device):
    q, k, v, visual, mask = _case(2, 4, 2, 700, 32, 32, torch.float32)
    # keys and values as slices of a larger static cache, key-major storage (non-unit strides)
    big_k = torch.zeros(2, 1000, 2, 32)
    big_k[:, :700] = k.transpose(1, 2)
    big_v = torch.zeros(2, 1000, 2, 32)
    big_v[:, :700] = v.transpose(1, 2)
    ks, vs = big_k[:, :700].transpose(1, 2), big_v[:, :700].transpose(1, 2)
    assert not ks.is_contiguous()
    mask[1] = False  # every key of sample 1 masked
    on = [t.to(device) for t in (q, ks, vs, mask, visual)]
    out, ratios = (t.cpu() for t in ops.decode_attention(*on, 0.2, 5.0))
    want_out, want_ratios = _explicit(q, k, v, mask, visual, 0.2, softcap=5.0)
    torch.testing.assert_close(out[0], want_out[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ratios[0], want_ratios[0], atol=2e-6, rtol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and ratios[1].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_no_keys_give_no_output_and_no_visual_share(device):
    q, k, v = torch.randn(2, 4, 1, 16), torch.zeros(2, 2, 0, 16), torch.zeros(2, 2, 0, 8)
    visual = torch.zeros(2, 0, dtype=torch.bool)
    on = [t.to(device) for t in (q, k, v)]
    out, ratios = ops.decode_attention(*on, None, visual.to(device), 0.25)
    want_out, want_ratios = reference.decode_attention(q, k, v, None, visual, 0.25)
    assert torch.equal(out.cpu(), want_out) and torch.equal(out.cpu(), torch.zeros(2, 1, 4, 8))
    assert torch.equal(ratios.cpu(), want_ratios) and torch.equal(ratios.cpu(), torch.zeros(2, 4))


@pytest.mark.skipif(not (torch.cuda.is_available() and ops.extension_available("cuda")), reason="needs a CUDA GPU")
def test_cuda_head_width_limit_is_the_one_attached_models_respect():
    widest = hf._CUDA_FUSED_MAX_HEAD_DIM
    for d, fits in ((widest, True), (widest + 8, False)):
        q, k, v, visual, mask = _case(1, 2, 1, 20, d, d, torch.float32, device="cuda")
        if fits:
            ops.decode_attention(q, k, v, mask, visual, 0.1)
        else:
            with pytest.raises(RuntimeError, match=f"head dims up to {widest}"):
                ops.decode_attention(q, k, v, mask, visual, 0.1)


def test_bad_arguments_name_the_argument():
    q, k, v, visual, mask = _case(2, 4, 2, 30, 16, 16, torch.float32)
    with pytest.raises(RuntimeError, match="q must be"):
        ops.decode_attention(torch.cat([q, q], 2), k, v, mask, visual, 0.25)
    with pytest.raises(RuntimeError, match="v must be"):
        ops.decode_attention(q, k, v[:, :, :-1], mask, visual, 0.25)
    with pytest.raises(RuntimeError, match="mask must be"):
        ops.decode_attention(q, k, v, mask[:, :, :-1], visual, 0.25)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, k, v, visual, mask = _case(2, 4, 2, 40, 16, 8, torch.float32, device=device)
    opcheck(torch.ops.headgain.decode_attention.default, (q, k, v, mask, visual, 0.25, 0.0))
    opcheck(torch.ops.headgain.decode_attention.default, (q, k, v, None, visual, 0.25, 0.0))


# ------------------------------------------------------------------ attached models


def _ran_fused(fn) -> tuple[object, int]:
    """fn()'s result and how many times the compiled fused op ran in it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, sum(e.count for e in prof.key_averages() if e.key == "headgain::decode_attention")


def _on(device, model, inputs, monkeypatch):
    """``model`` and ``inputs`` moved to ``device``; on CUDA, attached models are let take the fused
    step there (they keep their backend on CUDA until these tests have passed on a GPU)."""
    if device == "cuda":
        monkeypatch.setattr(hf, "_FUSED_MODEL_DEVICES", ("cpu", "cuda"))
    return model.to(device), {k: v.to(device) for k, v in inputs.items()}


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False, **kw)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava", "gemma3", "mistral3"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("device", DEVICES)
def test_gains_of_one_give_the_vanilla_tokens(arch, cache, device, monkeypatch):
    # left-padded inputs: the decoding steps carry a padding mask
    model, inputs = _on(device, tiny_model(arch), token_inputs(), monkeypatch)
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    vanilla = _generate(model, inputs, **kw)
    with headgain.attach(model, cfg=dict(l_perc=1, l_reas=2, g_perc=1.0, g_reas=1.0)):
        tokens, fused_calls = _ran_fused(lambda: _generate(model, inputs, **kw))
    assert torch.equal(tokens, vanilla)
    layers, steps = model.config.get_text_config().num_hidden_layers, vanilla.shape[1] - inputs["input_ids"].shape[1]
    assert fused_calls == layers * (steps - 1), "every decoding step of every layer takes the fused kernel"


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "gemma3"])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_and_unfused_steps_agree(arch, device, monkeypatch):
    model, inputs = _on(device, tiny_model(arch), token_inputs(), monkeypatch)
    handle = attach_mixed(model, inputs)  # a config that selects some heads and leaves others
    results = []
    for fused in (True, False):
        handle.fused = fused
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            step = {"input_ids": out.logits[:, -1:].argmax(-1), "past_key_values": out.past_key_values}
            step["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(step["input_ids"])], 1)
            (logits, calls) = _ran_fused(lambda: model(**step).logits)  # noqa: B023
        ratios, gains = handle.last_ratios, handle.last_gains
        results.append((logits, ratios, gains, calls))
    (l1, r1, g1, c1), (l2, r2, g2, c2) = results
    assert c1 == handle.num_layers and c2 == 0
    assert (g1 != 1).any(), "the config scales some heads at the decoding step"
    torch.testing.assert_close(r1, r2, atol=1e-6, rtol=1e-5)
    assert torch.equal(g1, g2)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    handle.detach()


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_model_decodes_through_the_fused_kernel(device, monkeypatch):
    model, inputs = _on(device, tiny_model("qwen2_5_vl", dtype=torch.bfloat16), token_inputs(), monkeypatch)
    handle = attach_mixed(model, inputs)
    logits = {}
    for fused in (True, False):
        handle.fused = fused
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        logits[fused] = torch.stack(out.logits[1:]).float()
    torch.testing.assert_close(logits[True], logits[False], atol=0.05, rtol=0.05)
    handle.detach()


def test_fused_takes_bools_only():
    model = tiny_model("llava")
    with pytest.raises(headgain.HeadGainError, match="fused takes True or False"):
        headgain.attach(model, cfg=dict(l_perc=1, l_reas=2), fused="no")
    assert headgain.handle_of(model) is None
    handle = headgain.attach(model, cfg=dict(l_perc=1, l_reas=2), fused=False)
    assert handle.fused is False
    with pytest.raises(headgain.HeadGainError, match="handle.fused takes True or False"):
        handle.fused = 1
    handle.detach()


def test_training_keeps_the_backend():
    model = tiny_model("llava").train()
    inputs = token_inputs()
    handle = headgain.attach(model, cfg=dict(l_perc=1, l_reas=2))
    out = model(**inputs, use_cache=True)
    step = {"input_ids": inputs["input_ids"][:, -1:], "past_key_values": out.past_key_values}
    step["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(step["input_ids"])], 1)
    logits, calls = _ran_fused(lambda: model(**step).logits)
    assert calls == 0 and logits.requires_grad
    logits.sum().backward()
    handle.detach()


@pytest.mark.parametrize("device", DEVICES)
def test_binding_sliding_window_gives_the_vanilla_tokens(device, monkeypatch):
    import transformers as tf

    from headgain.testing.tiny import tiny_config

    config = tiny_config("gemma3")
    config.text_config.sliding_window = 6  # shorter than the prompt: sliding layers mask old keys at every step
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa").eval()
    model, inputs = _on(device, model, token_inputs(), monkeypatch)
    vanilla = _generate(model, inputs)
    with headgain.attach(model, cfg=dict(l_perc=1, l_reas=2, g_perc=1.0, g_reas=1.0)):
        tokens, fused_calls = _ran_fused(lambda: _generate(model, inputs))
    assert torch.equal(tokens, vanilla) and fused_calls > 0
