"""Attached models on a CUDA GPU: S_v against eager probabilities, logits against plain gain
hooks, and greedy decoding with gains of 1 against the vanilla model (skipped without a GPU)."""

import pytest
import torch
from support import attach_gain_hooks, attach_mixed, reference_ratios, token_inputs, twin_models, visual_of

import headgain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda(inputs):
    return {k: v.cuda() for k, v in inputs.items()}


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava", "gemma3"])
def test_ratios_and_logits_match_the_eager_reference(arch, backend):
    model, ref = twin_models(arch, backend)
    model, ref = model.cuda(), ref.cuda()
    inputs = _cuda(token_inputs())
    handle = attach_mixed(model, inputs)
    with torch.no_grad():
        logits = model(**inputs).logits
    ratios, gains = handle.last_ratios, handle.last_gains
    assert (gains > 1).any() and (gains == 1).any()
    remove = attach_gain_hooks(ref, [gains])
    with torch.no_grad():
        out = ref(**inputs, output_attentions=True)
    remove()
    expected = reference_ratios(out.attentions, visual_of(inputs["input_ids"], inputs["attention_mask"]))
    torch.testing.assert_close(ratios, expected.cpu(), atol=1e-4, rtol=1e-3)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[real], out.logits[real], atol=1e-4, rtol=1e-3)
    handle.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gains_of_one_give_the_vanilla_tokens(dtype):
    model, _ = twin_models("qwen2_5_vl", dtype=dtype)
    model = model.cuda()
    inputs = _cuda(token_inputs())
    with torch.no_grad():
        vanilla = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        with headgain.attach(model, cfg=dict(l_perc=1, l_reas=2, g_perc=1.0, g_reas=1.0)):
            tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens, vanilla)
