"""Head census: per-sample S_v, statistics, selection shares, suggestions, output."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

import headgain
from headgain.analysis.census import Census
from headgain.core.rules import HeadClass, classify
from headgain.testing.synthetic import draw_image, qwen_vl_inputs
from headgain.testing.tiny import tiny_model

MODEL = dict(layers=4, hidden=64, heads=4, kv_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread_quiet")


@pytest.fixture
def model():
    return tiny_model("qwen2_5_vl", **MODEL)


SPECS = [  # two single images, and a left-padded pair with one text-only sample
    ([1], ["What is red?"], 56 * 56),
    ([2], ["Count the shapes."], 112 * 112),
    ([3, None], ["Where is it?", "no image here"], 56 * 56),
]


def _batches():
    return [
        qwen_vl_inputs([None if s is None else draw_image(seed=s) for s in seeds], questions, max_pixels=mp)
        for seeds, questions, mp in SPECS
    ]


def _one_by_one(model):
    """S_v of each visual sample run alone (no padding) through an attached handle: (N, L, H)."""
    rows = []
    with headgain.attach(model, cfg=headgain.HeadGainConfig(l_perc=0, l_reas=0)) as handle:
        handle.enabled = False
        for seeds, questions, mp in SPECS:
            for seed, question in zip(seeds, questions):
                if seed is None:
                    continue
                with torch.no_grad():
                    model(**qwen_vl_inputs([draw_image(seed=seed)], [question], max_pixels=mp))
                rows.append(handle.last_ratios[:, 0].numpy())
    return np.stack(rows)


def test_census_records_each_visual_sample(model):
    batches = _batches()
    with torch.no_grad():
        before = [model(**b).logits for b in batches]
    result = headgain.census(model, batches, progress=False)
    assert isinstance(result, Census)
    assert result.samples.shape == (3, 4, 4) and result.samples.dtype == np.float32
    assert result.skipped == 1 and result.num_samples == 3
    np.testing.assert_allclose(result.samples, _one_by_one(model), atol=2e-5)
    assert result.mean.shape == (4, 4) and result.mean.dtype == np.float32
    np.testing.assert_allclose(result.mean, result.samples.mean(0), atol=1e-6)
    np.testing.assert_allclose(result.std, result.samples.std(0), atol=1e-6)
    assert getattr(model, "_headgain_handle", None) is None
    with torch.no_grad():
        for b, logits in zip(batches, before):
            assert torch.equal(model(**b).logits, logits)


def test_census_uses_existing_handle_disabled_and_restores_it(model):
    batches = _batches()[:2]
    cfg = headgain.HeadGainConfig(l_perc=1, l_reas=2, tau_perc=0.1, tau_reas=0.05)
    with headgain.attach(model, cfg=cfg) as handle:
        with torch.no_grad():
            rescaled = model(**batches[0]).logits
        result = headgain.census(model, batches, query="mean_text", progress=False)
        assert handle.enabled and handle.cfg == cfg
        with torch.no_grad():
            assert torch.equal(model(**batches[0]).logits, rescaled)
    plain = headgain.census(model, batches, progress=False)
    assert result.query == "mean_text" and not np.allclose(result.samples, plain.samples)


def test_quantiles_and_selection(model):
    result = headgain.census(model, _batches(), progress=False)
    q = result.quantiles([0.0, 0.5, 1.0])
    assert q.shape == (3, 4, 4)
    np.testing.assert_allclose(q[1], np.median(result.samples, 0), atol=1e-6)
    np.testing.assert_allclose(result.quantiles(1.0), result.samples.max(0), atol=1e-6)
    tau = float(np.median(result.samples))
    cfg = headgain.HeadGainConfig(l_perc=1, l_reas=2, tau_perc=tau, tau_reas=tau - 0.01)
    layer = np.arange(4)[None, :, None]
    perc = (layer <= 1) & (result.samples >= tau)
    reas = (layer >= 2) & (result.samples <= tau - 0.01)
    fr = result.selected_fraction(cfg)
    assert fr.shape == (4, 4) and fr.dtype == np.float32
    np.testing.assert_allclose(fr, (perc | reas).mean(0), atol=1e-6)
    assert result.selected_share(cfg) == pytest.approx((perc | reas).mean(), abs=1e-6)
    classes = result.classes(cfg)
    assert set(np.unique(classes)) <= set(HeadClass)
    with pytest.raises(headgain.ConfigError, match="outside the model"):
        result.selected_fraction(headgain.HeadGainConfig())  # l_perc=7 on 4 layers


def test_classify_rule():
    ratios = np.array([[0.5, 0.0, 0.2], [0.5, 0.0, 0.2], [0.5, 0.0, 0.2]], dtype=np.float32)
    cfg = headgain.HeadGainConfig(l_perc=1, l_reas=1, tau_perc=0.3, tau_reas=0.01)
    expected = [[1, 0, 0], [1, 2, 0], [0, 2, 0]]
    np.testing.assert_array_equal(classify(ratios, cfg), expected)
    np.testing.assert_array_equal(classify(ratios[None], cfg)[0], expected)


def _synthetic(layers=28, heads=28, n=40, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0.45, 0.02, layers)[:, None] * rng.uniform(0.3, 1.6, (1, heads))
    return Census(np.clip(base[None] * np.exp(rng.normal(0, 0.2, (n, layers, heads))), 0, 1).astype(np.float32))


@pytest.mark.parametrize("target", [0.02, 0.064, 0.18])
def test_suggest_reaches_target(target):
    c = _synthetic()
    cfg = c.suggest(target)
    assert isinstance(cfg, headgain.HeadGainConfig)
    s = c.last_suggestion
    assert s.cfg == cfg and s.target_fraction == target
    assert s.achieved_fraction == pytest.approx(c.selected_share(cfg), abs=1e-6)
    assert abs(s.achieved_fraction - target) < 0.2 * target
    assert cfg.tau_reas < cfg.tau_perc and (cfg.l_perc, cfg.l_reas) == (7, 3)
    assert cfg.g_perc == headgain.presets["ocean-r1-7b"].g_perc
    assert "tau_perc" in s.report and f"{target:.1%}" in s.report


def test_suggest_keeps_layers_and_gains():
    c = _synthetic(layers=12, heads=6)
    base = headgain.HeadGainConfig(l_perc=4, l_reas=6, g_perc=1.1, g_reas=1.2)
    cfg = c.suggest(0.1, base=base, keep_layers=True, perception_share=1.0)
    assert (cfg.l_perc, cfg.l_reas, cfg.g_perc, cfg.g_reas) == (4, 6, 1.1, 1.2)
    assert c.last_suggestion.reasoning_fraction < 0.01
    assert c.suggest(0.1, base=base).l_perc == 2  # scaled from 7 of 28


def test_suggest_on_model_census(model):
    result = headgain.census(model, _batches(), progress=False)
    cfg = result.suggest(0.125)
    cfg.check_layers(4)
    assert 0 < result.last_suggestion.achieved_fraction <= 0.5


def test_json_save_and_progress(model, tmp_path):
    stream = io.StringIO()
    result = headgain.census(model, _batches(), progress=True, stream=stream)
    assert "census [" in stream.getvalue() and "3/3 batches" in stream.getvalue()
    cfg = headgain.HeadGainConfig(l_perc=1, l_reas=2)
    path = result.save(str(tmp_path / "c.json"), cfg=cfg)
    d = json.loads(open(path).read())
    assert np.array(d["mean"]).shape == (4, 4) and np.array(d["std"]).shape == (4, 4)
    assert np.array(d["quantiles"]["0.5"]).shape == (4, 4)
    assert np.array(d["selected_fraction"]).shape == (4, 4) and np.array(d["classes"]).shape == (4, 4)
    assert d["num_samples"] == 3 and d["skipped"] == 1 and d["cfg"]["l_perc"] == 1
    assert "samples" not in d
    assert np.array(json.loads(result.to_json(samples=True))["samples"]).shape == (3, 4, 4)
    # without a length the bar counts batches
    stream = io.StringIO()
    headgain.census(model, iter(_batches()[:1]), progress=True, stream=stream)
    assert "1 batches" in stream.getvalue()


def test_empty_census_raises(model):
    text_only = qwen_vl_inputs([None], ["no image"])
    result = headgain.census(model, [text_only], progress=False)
    assert result.num_samples == 0 and result.skipped == 1
    with pytest.raises(ValueError, match="no sample with visual tokens"):
        _ = result.mean
