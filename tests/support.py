"""Independent references for the tests: eager attention probabilities and a plain
forward pre-hook on each output projection, written without headgain's code paths."""

from __future__ import annotations

import pytest
import torch
import transformers

from headgain.core import ops
from headgain.core.decoder import match_layers
from headgain.core.errors import ArchError
from headgain.core.registry import registered_archs, resolve
from headgain.testing.tiny import IMAGE_ID, VIDEO_ID, tiny_model


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU available"
    if not ops.extension_available("cuda"):
        return "headgain was built without its CUDA kernels (no CUDA torch or toolkit at build time)"
    return None


#: the devices the compiled ops are tested on: CPU, and CUDA where a GPU and the CUDA kernels are
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(_cuda_skip_reason() is not None, reason=str(_cuda_skip_reason()))],
    ),
]

#: model types whose decoder older transformers keep elsewhere (the registered path is the current one)
MOVED = {"qwen2_5_omni_thinker": "model.layers.*.self_attn", "qwen3_omni_moe_thinker": "model.layers.*.self_attn"}


def skip_moved_decoder(model, model_type):
    """Skip when ``model_type``'s decoder is not at its registered path in this transformers."""
    if model_type in MOVED:
        try:
            match_layers(model, registered_archs()[model_type])
        except ArchError:
            pytest.skip(f"transformers {transformers.__version__} keeps this decoder at {MOVED[model_type]}")


def token_inputs(batch_lengths=(14, 10), image_span=(3, 8), seed=0, vocab=290):
    """Left-padded input_ids with IMAGE_ID at ``image_span`` of each unpadded prompt."""
    g = torch.Generator().manual_seed(seed)
    n = max(batch_lengths)
    ids = torch.zeros(len(batch_lengths), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(batch_lengths):
        row = torch.randint(4, vocab, (length,), generator=g)
        row[image_span[0] : image_span[1]] = IMAGE_ID
        ids[i, n - length :] = row
        mask[i, n - length :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def visual_of(input_ids, attention_mask=None, ids=(IMAGE_ID, VIDEO_ID)):
    vis = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in ids:
        vis |= input_ids == i
    if attention_mask is not None:
        vis &= attention_mask.bool()
    return vis


def reference_ratios(attentions, visual, istar=None):
    """(L, B, H) float32: sum over visual keys of eager probabilities at row i*.

    attentions: per layer (B, H, Nq, Nk); visual: (B, Nk) bool (already aligned to keys);
    istar: (B,) row index, default the last row.
    """
    out = []
    for a in attentions:
        b, h, nq, nk = a.shape
        rows = a[torch.arange(b), :, (istar if istar is not None else torch.full((b,), nq - 1))]  # (B, H, Nk)
        out.append((rows.float() * visual[:, None, -nk:].float()).sum(-1))
    return torch.stack(out)


def attach_gain_hooks(model, gains_per_call, arch_map=None):
    """Scale each head's o_proj input by gains[l] (B, H): a plain pre-hook per layer.

    gains_per_call: a list; each top-level call of ``model`` pops the next (L, B, H) tensor.
    Returns a remove() callable.
    """
    decoder = resolve(model, arch_map)
    heads = decoder.num_heads
    current = {}
    handles = [model.register_forward_pre_hook(lambda m, a: current.__setitem__("g", gains_per_call.pop(0)))]

    def make(layer):
        def hook(mod, args):
            (x,) = args
            b, n, width = x.shape
            g = current["g"][layer].to(x.device)
            return ((x.view(b, n, heads, width // heads).float() * g[:, None, :, None]).to(x.dtype).view(b, n, width),)

        return hook

    for position, layer in enumerate(decoder.layers):
        handles.append(layer.o_proj.register_forward_pre_hook(make(position)))
    return lambda: [h.remove() for h in handles]


def twin_models(model_type, backend="sdpa", **kw):
    """A ``backend`` model and an eager reference with identical weights (``kw`` go to tiny_model)."""
    a = tiny_model(model_type, backend, **kw)
    b = tiny_model(model_type, "eager", **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def attach_mixed(model, inputs, visual_mask=None):
    """Attach headgain with a config whose thresholds split this input's measured ratios
    (measured with headgain disabled), so that every head class occurs."""
    import headgain

    handle = headgain.attach(model, cfg=dict(l_perc=0, l_reas=1, tau_perc=0.9, tau_reas=0.1))
    if visual_mask is not None:
        handle.set_visual_mask(visual_mask, keep=True)
    handle.enabled = False
    with torch.no_grad():
        model(**inputs)
    handle.cfg = mixed_cfg(handle.last_ratios, handle.num_layers)
    handle.enabled = True
    return handle


def _gap_threshold(values, share):
    """A threshold between two neighbouring sorted values near quantile ``share``, so
    tiny numeric differences between backends cannot move a head across it."""
    v = values.flatten().sort().values
    i = min(max(int(share * len(v)), 1), len(v) - 1)
    return float(v[i - 1] + v[i]) / 2


def mixed_cfg(ratios, num_layers):
    """A config whose thresholds split the measured ratios, so every class occurs."""
    import headgain

    tau_perc = _gap_threshold(ratios[: max(1, num_layers // 2)], 0.5)
    tau_reas = min(_gap_threshold(ratios[num_layers // 2 :], 0.4), tau_perc - 1e-4)
    return headgain.HeadGainConfig(
        l_perc=num_layers // 2,
        l_reas=max(1, num_layers // 2 - 1),
        tau_perc=tau_perc,
        tau_reas=max(tau_reas, 0.0),
        g_perc=1.5,
        g_reas=1.7,
    )


def record_steps(model, handle):
    """Collect (ratios, gains) after each call of ``model``; returns the list and the hook."""
    steps = []
    hook = model.register_forward_hook(lambda m, a, o: steps.append((handle.last_ratios, handle.last_gains)))
    return steps, hook


def check_steps_against_eager(model, ref, inputs, handle, new):
    """Generate greedily with ``model`` (attached), replay with the unattached eager ``ref``
    applying each step's reported gains, and compare every step's ratios to the
    probabilities ``ref`` returns for that same step (cached keys included). The visual
    placeholder ids are never generated: the new tokens are text."""
    greedy = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, suppress_tokens=[IMAGE_ID, VIDEO_ID])
    steps, hook = record_steps(model, handle)
    with torch.no_grad():
        seq = model.generate(**inputs, **greedy)
    hook.remove()
    assert len(steps) == new
    remove = attach_gain_hooks(ref, [g for _, g in steps])
    with torch.no_grad():
        out = ref.generate(**inputs, **greedy, output_attentions=True, return_dict_in_generate=True)
    remove()
    assert torch.equal(out.sequences, seq)
    prompt_visual = visual_of(inputs["input_ids"], inputs["attention_mask"])
    assert prompt_visual.sum(1).min() > 0
    for step, (ratios, _) in enumerate(steps):
        expected = reference_ratios(out.attentions[step], torch.nn.functional.pad(prompt_visual, (0, step)))
        torch.testing.assert_close(ratios, expected, atol=2e-5, rtol=1e-4)
    return steps, out
