"""Generation with KV cache, padding, several images, video: against eager references."""

import pytest
import torch
from support import attach_mixed, check_steps_against_eager, record_steps, twin_models

import headgain
from headgain.testing.synthetic import draw_image, qwen_vl_inputs


def _pair(backend="sdpa", **kw):
    return twin_models("qwen2_5_vl", backend, **kw)


def _images_inputs(**kw):
    return qwen_vl_inputs(
        [draw_image(seed=1), [draw_image(seed=2), draw_image(seed=3)]],
        ["What is red?", "Which shapes?"],
        max_pixels=112 * 112,
        **kw,
    )


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("video", [0, 2])
def test_generate_every_step_matches_eager_reference(backend, video):
    model, ref = _pair(backend)
    inputs = _images_inputs(video_frames=video)
    steps, _ = check_steps_against_eager(model, ref, inputs, attach_mixed(model, inputs), new=4)
    assert any((g > 1).any() for _, g in steps)


def test_sampling_with_cache_records_every_step():
    model, _ = _pair()
    inputs = _images_inputs()
    handle = attach_mixed(model, inputs)
    steps, hook = record_steps(model, handle)
    torch.manual_seed(0)
    with torch.no_grad():
        seq = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=True, top_k=50)
    hook.remove()
    assert seq.shape[1] == inputs["input_ids"].shape[1] + 5 and len(steps) == 5


def test_left_padding_gives_each_sample_its_own_ratios():
    model, _ = _pair()
    questions = ["What colour is the big circle?", "Why?"]
    images = [draw_image(seed=4), draw_image(seed=5)]
    batch = qwen_vl_inputs(images, questions, max_pixels=112 * 112)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left padded"
    handle = headgain.attach(model, cfg=dict(l_perc=1, l_reas=2, tau_perc=0.5, tau_reas=0.3))
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    batched = handle.last_ratios
    for i in range(2):
        alone = qwen_vl_inputs([images[i]], [questions[i]], max_pixels=112 * 112)
        with torch.no_grad():
            model.generate(**alone, max_new_tokens=2, do_sample=False)
        torch.testing.assert_close(handle.last_ratios[:, 0], batched[:, i], atol=1e-4, rtol=1e-4)


def test_second_prompt_does_not_see_first_prompt_visual_positions():
    model, _ = _pair()
    first = qwen_vl_inputs(
        [[draw_image(seed=1), draw_image(seed=2)]], ["Describe both pictures in detail."], max_pixels=112 * 112
    )
    second = qwen_vl_inputs([draw_image(seed=3)], ["Hi"], max_pixels=56 * 56)
    cfg = dict(l_perc=1, l_reas=2, tau_perc=0.5, tau_reas=0.3)
    handle = headgain.attach(model, cfg=cfg)
    with torch.no_grad():
        model.generate(**first, max_new_tokens=3, do_sample=False)
        model.generate(**second, max_new_tokens=3, do_sample=False)
    after_first = handle.last_ratios
    handle.detach()
    fresh = headgain.attach(model, cfg=cfg)
    with torch.no_grad():
        model.generate(**second, max_new_tokens=3, do_sample=False)
    assert torch.equal(after_first, fresh.last_ratios)


def test_generate_without_cache_treats_each_step_as_a_full_pass():
    model, _ = _pair()
    inputs = _images_inputs()
    handle = attach_mixed(model, inputs)
    with torch.no_grad():
        seq = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
        last_step = handle.last_ratios
        full = dict(
            inputs,
            input_ids=seq[:, :-1],
            attention_mask=torch.nn.functional.pad(inputs["attention_mask"], (0, 2), value=1),
            mm_token_type_ids=torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, 2), value=0),  # 0: text
        )
        model(**full, use_cache=False)
    torch.testing.assert_close(handle.last_ratios, last_step, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_sliding_window_cache_aligns_visual_keys(backend):
    import transformers as tf
    from support import token_inputs

    from headgain.testing.tiny import tiny_config

    config = tiny_config("gemma3")
    config.text_config.sliding_window = 6
    config.text_config.layer_types = ["sliding_attention", "full_attention"] * 2
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(config, attn_implementation=backend).eval()
    ref = tf.AutoModelForImageTextToText.from_config(config, attn_implementation="eager").eval()
    ref.load_state_dict(model.state_dict())
    inputs = token_inputs(batch_lengths=(14, 14), image_span=(7, 11))
    _, out = check_steps_against_eager(model, ref, inputs, attach_mixed(model, inputs), new=3)
    widths = {a.shape[-1] for a in out.attentions[-1]}
    assert len(widths) == 2, "sliding layers must see fewer keys than full layers"


def test_static_cache_gives_the_dynamic_cache_ratios():
    model, _ = _pair()
    inputs = _images_inputs()
    handle = attach_mixed(model, inputs)
    runs = []
    for extra in ({}, {"cache_implementation": "static"}):
        steps, hook = record_steps(model, handle)
        with torch.no_grad():
            seq = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, **extra)
        hook.remove()
        runs.append((seq, steps))
    assert torch.equal(runs[0][0], runs[1][0])
    for (r0, g0), (r1, g1) in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(r0, r1, atol=2e-5, rtol=1e-4)
        assert torch.equal(g0, g1)
