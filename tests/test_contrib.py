"""Contribution maps: gradients against finite differences, normalisations, ranking,
identity of gates at one, frozen weights and state restoration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import headgain
from headgain.analysis.contrib import _extend, _step_losses, normalize_importance, rank_heads
from headgain.testing.synthetic import draw_image, qwen_vl_inputs
from headgain.testing.tiny import tiny_model

SMALL = dict(layers=2, hidden=64, heads=4, kv_heads=2)
ANSWER = [70, 71, 72]
# layer 0 heads all perception (S_v >= 0.05) with a gain far from one
CFG = headgain.HeadGainConfig(l_perc=0, l_reas=1, tau_perc=0.05, tau_reas=0.0, g_perc=1.5, g_reas=1.3)


pytestmark = pytest.mark.usefixtures("one_thread_quiet")


def _model(dtype=torch.float32, attn="sdpa", **kw):
    return tiny_model("qwen2_5_vl", attn_implementation=attn, dtype=dtype, **(kw or SMALL))


def _inputs(dtype=torch.float32, seed=1):
    batch = qwen_vl_inputs([draw_image(seed=seed)], ["What is red?"], max_pixels=56 * 56)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


def _finite_difference(model, inputs, answer, cfg, eps=2.0**-10):
    """Central differences of the mean step loss in every head's gate: (L, H) float64."""
    handle = headgain.attach(model, cfg=cfg or headgain.HeadGainConfig(l_perc=0, l_reas=0))
    handle.enabled = cfg is not None
    num_layers, num_heads = handle.num_layers, handle.num_heads
    a = torch.tensor(answer)
    fd = np.zeros((num_layers, num_heads))
    try:
        with torch.no_grad():
            for layer in range(num_layers):
                for head in range(num_heads):
                    values = []
                    for sign in (1.0, -1.0):
                        g = torch.ones(num_layers, num_heads)
                        g[layer, head] += sign * eps
                        with handle.gates(g):
                            if cfg is None:
                                losses = _step_losses(model, inputs, a, len(answer))
                            else:  # one pass per step, as contribution_map does with a cfg
                                losses = [_step_losses(model, inputs, a[: t + 1], 1)[0] for t in range(len(answer))]
                        values.append(float(torch.stack(losses).double().mean()))
                    fd[layer, head] = (values[0] - values[1]) / (2 * eps)
    finally:
        handle.detach()
    return fd


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_signed_equals_central_difference_float64(attn):
    model = _model(torch.float64, attn)
    inputs = _inputs(torch.float64)
    cm = headgain.contribution_map(model, inputs, ANSWER)
    fd = _finite_difference(model, inputs, ANSWER, None)
    scale = np.abs(fd).max()
    assert scale > 1e-3
    # the head scaling rounds head outputs to float32 once, so agreement is ~1e-4 relative
    np.testing.assert_allclose(cm.signed, fd, atol=1e-3 * scale, rtol=0)
    assert cm.signed.dtype == np.float32 and cm.signed.shape == (2, 4)


def test_rescaled_signed_equals_central_difference_float64():
    model = _model(torch.float64)
    inputs = _inputs(torch.float64)
    cm = headgain.contribution_map(model, inputs, ANSWER[:2], cfg=CFG)
    fd = _finite_difference(model, inputs, ANSWER[:2], CFG)
    np.testing.assert_allclose(cm.signed, fd, atol=1e-3 * np.abs(fd).max(), rtol=0)


def test_signed_equals_central_difference_float32():
    model = _model()
    inputs = _inputs()
    cm = headgain.contribution_map(model, inputs, ANSWER)
    fd = _finite_difference(model, inputs, ANSWER, None, eps=2.0**-7)
    np.testing.assert_allclose(cm.signed, fd, atol=2e-2 * np.abs(fd).max(), rtol=0)


def test_answer_map_is_mean_of_step_maps():
    """Teacher forcing: step t of an answer equals a one-token map after prompt + answer[:t]."""
    model = _model()
    inputs = _inputs()
    whole = headgain.contribution_map(model, inputs, ANSWER)
    steps = [
        headgain.contribution_map(model, _extend(inputs, torch.tensor(ANSWER[:t])) if t else inputs, ANSWER[t])
        for t in range(len(ANSWER))
    ]
    np.testing.assert_allclose(whole.steps, np.stack([s.signed for s in steps]), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(whole.signed, np.mean([s.signed for s in steps], 0), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(whole.magnitude, np.mean([np.abs(s.signed) for s in steps], 0), atol=1e-5, rtol=1e-4)
    assert whole.losses == pytest.approx([s.losses[0] for s in steps], rel=1e-5)


def test_normalisations_and_ranking():
    model = _model()
    inputs = _inputs()
    layer = headgain.contribution_map(model, inputs, ANSWER, normalize="layer")
    glob = headgain.contribution_map(model, inputs, ANSWER, normalize="global")
    np.testing.assert_allclose(layer.importance.sum(1), 1.0, atol=1e-6)
    assert glob.importance.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(layer.magnitude, glob.magnitude)
    np.testing.assert_allclose(glob.importance, glob.magnitude / glob.magnitude.sum(), rtol=1e-6)
    for m in (layer, glob):
        order = np.argsort(-m.importance.reshape(-1), kind="stable")
        assert m.ranking == [(int(i) // m.num_heads, int(i) % m.num_heads) for i in order]
        values = [m.importance[layer, h] for layer, h in m.ranking]
        assert values == sorted(values, reverse=True)
        assert len(set(m.ranking)) == m.num_layers * m.num_heads


def test_normalize_helpers():
    mag = np.array([[1.0, 3.0], [0.0, 0.0]])
    np.testing.assert_allclose(normalize_importance(mag, "layer"), [[0.25, 0.75], [0, 0]])
    np.testing.assert_allclose(normalize_importance(mag, "global"), [[0.25, 0.75], [0, 0]])
    assert rank_heads(np.array([[0.1, 0.5], [0.5, 0.2]])) == [(0, 1), (1, 0), (1, 1), (0, 0)]
    with pytest.raises(ValueError, match="normalize"):
        normalize_importance(mag, "row")


@pytest.mark.parametrize("enabled", [False, True])
def test_gates_at_one_change_nothing(enabled):
    model = _model()
    inputs = _inputs()
    with headgain.attach(model, cfg=CFG) as handle:
        handle.enabled = enabled
        with torch.no_grad():
            plain = model(**inputs).logits
        with handle.gates() as gates, torch.no_grad():
            gated_logits = model(**inputs).logits
        assert len(gates) == 2 and gates[0].shape == (4,) and gates[0].requires_grad
        assert handle._gates is None
    assert torch.equal(plain, gated_logits)


def test_weights_frozen_and_untouched():
    model = _model()
    inputs = _inputs()
    params = dict(model.named_parameters())
    before = {k: p.detach().clone() for k, p in params.items()}
    names = list(params)
    for i, name in enumerate(names):  # a mix of trainable and frozen parameters
        params[name].requires_grad_(i % 2 == 0)
    headgain.contribution_map(model, inputs, ANSWER, cfg=CFG)
    headgain.contribution_map(model, inputs, None, n_tokens=2)
    for i, name in enumerate(names):
        p = params[name]
        assert torch.equal(p, before[name]), name
        assert p.requires_grad == (i % 2 == 0), name
        assert p.grad is None, name
    assert getattr(model, "_headgain_handle", None) is None


def test_rescaled_map_differs_from_vanilla():
    model = _model()
    inputs = _inputs()
    vanilla = headgain.contribution_map(model, inputs, ANSWER)
    rescaled = headgain.contribution_map(model, inputs, ANSWER, cfg=CFG)
    assert rescaled.cfg == CFG and vanilla.cfg is None
    assert not np.allclose(vanilla.signed, rescaled.signed, atol=1e-6)
    assert vanilla.losses != rescaled.losses


def test_existing_handle_is_used_and_restored():
    model = _model()
    inputs = _inputs()
    other = CFG.replace(g_perc=1.2)
    handle = headgain.attach(model, cfg=other)
    try:
        with torch.no_grad():
            before = model(**inputs).logits
        cm = headgain.contribution_map(model, inputs, ANSWER[0], cfg=CFG)
        assert cm.cfg == CFG
        headgain.contribution_map(model, inputs, ANSWER[0])
        assert model._headgain_handle is handle and handle.attached
        assert handle.enabled and handle.cfg == other and handle._gates is None
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, before)
    finally:
        handle.detach()


def test_greedy_targets_follow_generate():
    model = _model()
    inputs = _inputs()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    cm = headgain.contribution_map(model, inputs, None, n_tokens=3)
    assert cm.targets == expected[: len(cm.targets)] and 1 <= len(cm.targets) <= 3
    assert cm.steps.shape == (len(cm.targets), 2, 4)


def test_target_forms_and_errors():
    model = _model()
    inputs = _inputs()
    a = headgain.contribution_map(model, inputs, 70)
    b = headgain.contribution_map(model, inputs, [70])
    c = headgain.contribution_map(model, inputs, torch.tensor(70))
    np.testing.assert_array_equal(a.signed, b.signed)
    np.testing.assert_array_equal(a.signed, c.signed)
    assert len(a.losses) == 1 and a.losses[0] > 0
    batch2 = qwen_vl_inputs([draw_image(seed=1), draw_image(seed=2)], ["a", "b"], max_pixels=56 * 56)
    with pytest.raises(headgain.HeadGainError, match="one prompt"):
        headgain.contribution_map(model, batch2, 70)
    with pytest.raises(headgain.HeadGainError, match="token ids"):
        headgain.contribution_map(model, inputs, ["red"])
    with pytest.raises(ValueError, match="normalize"):
        headgain.contribution_map(model, inputs, 70, normalize="rows")


def test_plot_and_json(tmp_path):
    model = _model()
    inputs = _inputs()
    vanilla = headgain.contribution_map(model, inputs, ANSWER, signed=True)
    rescaled = headgain.contribution_map(model, inputs, ANSWER, cfg=CFG)
    for path in (
        vanilla.plot(str(tmp_path / "v.png")),
        vanilla.plot(str(tmp_path / "vr.png"), other=rescaled),
        rescaled.plot(str(tmp_path / "r.png")),
    ):
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 200
    import json

    d = json.loads(rescaled.to_json())
    assert np.array(d["signed"]).shape == (2, 4) and d["model"] == "rescaled" and d["cfg"]["g_perc"] == 1.5
