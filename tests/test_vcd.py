"""VCD baseline on a tiny real Qwen2.5-VL with synthetic images (no mocks)."""

import math

import pytest
import torch

from headgain.baselines import vcd
from headgain.testing.synthetic import draw_image, qwen_vl_inputs
from headgain.testing.tiny import tiny_model

PIXELS = 112 * 112


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2_5_vl", layers=2)


@pytest.fixture(scope="module")
def images():
    return [draw_image((112, 112), seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def batch(images):
    # the first prompt is the shortest, so it is left-padded in the batch
    return qwen_vl_inputs(images, ["x", "how many shapes are there?", "what colour is the circle"], max_pixels=PIXELS)


def test_noise_follows_the_forward_diffusion_formula():
    x = torch.randn(64, 1176, generator=torch.Generator().manual_seed(1))
    got = vcd.diffusion_noise(x, step=500, generator=torch.Generator().manual_seed(7))
    abar = 1.0
    for t in range(501):  # 0-based step 500 includes betas 0..500
        z = -6.0 + 12.0 * t / 999
        abar *= 1.0 - (1.0 / (1.0 + math.exp(-z)) * (5e-3 - 1e-5) + 1e-5)
    eps = torch.randn(64, 1176, generator=torch.Generator().manual_seed(7))
    want = math.sqrt(abar) * x + math.sqrt(1 - abar) * eps
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert 0.1 < abar < 0.9  # step 500 is a strong but partial distortion


def test_noise_keeps_dtype_and_rejects_bad_steps():
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert vcd.diffusion_noise(x, step=0).dtype == torch.bfloat16
    for bad in (-1, 1000, 2.5):
        with pytest.raises(ValueError, match="step"):
            vcd.diffusion_noise(x, step=bad)


def test_plausibility_cut_removes_exactly_the_implausible_tokens():
    torch.manual_seed(0)
    logit, l_cd = torch.randn(5, 40) * 3, torch.randn(5, 40)
    out = vcd.contrastive_logits(logit, l_cd, alpha=1.0, beta=0.1)
    p = logit.softmax(-1)
    removed = p < 0.1 * p.max(-1, keepdim=True).values
    assert removed.any() and (~removed).sum() > 5
    assert torch.equal(torch.isinf(out), removed)
    torch.testing.assert_close(out[~removed], (2 * logit - l_cd)[~removed])
    # beta 0 keeps everything; beta 1 keeps only the top token
    assert not torch.isinf(vcd.contrastive_logits(logit, l_cd, 1.0, 0.0)).any()
    assert torch.equal(
        (~torch.isinf(vcd.contrastive_logits(logit, l_cd, 1.0, 1.0))).sum(-1), torch.ones(5, dtype=torch.long)
    )


def test_alpha_zero_reproduces_greedy_generate(model, batch):
    want = model.generate(**batch, max_new_tokens=10, do_sample=False)
    got = vcd.generate(model, batch, alpha=0.0, max_new_tokens=10)
    assert torch.equal(got, want)
    want = model.generate(**batch, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    got = vcd.generate(model, batch, alpha=0.0, max_new_tokens=10, min_new_tokens=10)
    assert torch.equal(got, want)


def test_contrast_changes_the_output(model, batch):
    plain = vcd.generate(model, batch, alpha=0.0, max_new_tokens=10, min_new_tokens=10, seed=0)
    contrast = vcd.generate(model, batch, alpha=1.0, beta=0.0, max_new_tokens=10, min_new_tokens=10, seed=0)
    assert contrast.shape == plain.shape
    assert not torch.equal(contrast, plain)


def test_sampling_is_reproducible_with_a_seed(model, batch):
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=50, top_p=0.9, temperature=1.5)
    a = vcd.generate(model, batch, seed=3, **kw)
    b = vcd.generate(model, batch, seed=3, **kw)
    c = vcd.generate(model, batch, seed=4, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_left_padded_batch_matches_single_prompts(model, images, batch):
    n = batch["input_ids"].shape[1]
    assert batch["attention_mask"][0, 0] == 0  # the first prompt is padded
    questions = ["x", "how many shapes are there?", "what colour is the circle"]
    full = vcd.generate(model, batch, alpha=0.0, max_new_tokens=8, min_new_tokens=8)
    for i, q in enumerate(questions):
        one = qwen_vl_inputs([images[i]], [q], max_pixels=PIXELS)
        alone = vcd.generate(model, one, alpha=0.0, max_new_tokens=8, min_new_tokens=8)
        assert torch.equal(full[i, n:], alone[0, one["input_ids"].shape[1] :])
    # with the contrast on: the first prompt's patches come first, so it draws the same noise alone
    full = vcd.generate(model, batch, max_new_tokens=8, min_new_tokens=8, seed=5)
    one = qwen_vl_inputs([images[0]], [questions[0]], max_pixels=PIXELS)
    alone = vcd.generate(model, one, max_new_tokens=8, min_new_tokens=8, seed=5)
    assert torch.equal(full[0, n:], alone[0, one["input_ids"].shape[1] :])


def test_finished_samples_are_padded(model, batch):
    out = vcd.generate(model, batch, alpha=0.0, max_new_tokens=6)
    first = out[:, batch["input_ids"].shape[1]]
    # make the first generated token of sample 0 the EOS id: everything after it is padding
    out = vcd.generate(model, batch, alpha=0.0, max_new_tokens=6, eos_token_id=int(first[0]), pad_token_id=0)
    n = batch["input_ids"].shape[1]
    assert out[0, n] == first[0]
    assert bool((out[0, n + 1 :] == 0).all())


def test_rejects_inputs_without_images(model):
    inp = qwen_vl_inputs([None], ["no image"])
    with pytest.raises(ValueError, match="pixel_values"):
        vcd.generate(model, inp, max_new_tokens=2)
    with pytest.raises(ValueError, match="alpha"):
        vcd.contrastive_logits(torch.zeros(1, 3), torch.zeros(1, 3), alpha=-1)
