"""Folded gains: a fixed head table in the output projections, against plain o_proj hooks."""

import numpy as np
import pytest
import torch
import transformers as tf
from support import attach_gain_hooks, token_inputs

import headgain
from headgain.analysis.census import Census
from headgain.testing.tiny import tiny_model


def _table(layers, heads, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.ones(layers, heads)
    table[torch.rand(layers, heads, generator=g) < 0.3] = 1.3
    table[0, 0], table[-1, -1] = 1.5, 0.8
    return table


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "deepseek_v3"])
def test_folded_logits_equal_hooked_gains_and_unfold_is_exact(model_type):
    model, reference = tiny_model(model_type), tiny_model(model_type)
    inputs = token_inputs()
    decoder = headgain.core.registry.resolve(model)
    table = _table(decoder.num_layers, decoder.num_heads)
    weights = {n: p.clone() for n, p in model.state_dict().items()}
    vanilla = _logits(model, inputs)
    folded = headgain.fold_gains(model, table)
    out = _logits(model, inputs)
    remove = attach_gain_hooks(reference, [table[:, None, :].expand(-1, 2, -1)])
    expected = _logits(reference, inputs)
    remove()
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(out, vanilla, atol=1e-3)
    assert model.config.headgain_folded_gains == table.tolist()
    folded.unfold()
    assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items()), "unfold restores bit for bit"
    assert not hasattr(model.config, "headgain_folded_gains")
    assert torch.equal(_logits(model, inputs), vanilla)


def test_save_pretrained_keeps_folded_gains(tmp_path):
    model = tiny_model("llava")
    inputs = token_inputs()
    vanilla = _logits(model, inputs)
    table = _table(4, 4, seed=3)
    headgain.fold_gains(model, table)
    folded = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = tf.AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert torch.equal(_logits(loaded, inputs), folded)
    assert loaded.config.headgain_folded_gains == table.tolist()
    back = headgain.unfold_gains(loaded)
    assert torch.equal(back, table)
    torch.testing.assert_close(_logits(loaded, inputs), vanilla, atol=2e-5, rtol=1e-5)
    with pytest.raises(headgain.HeadGainError, match="holds no folded gains"):
        headgain.unfold_gains(loaded)


def test_folded_gains_compose_with_attach():
    model = tiny_model("llava")
    inputs = token_inputs()
    headgain.fold_gains(model, _table(4, 4))
    folded = _logits(model, inputs)
    cfg = dict(l_perc=1, l_reas=2, tau_perc=0.3, tau_reas=0.29)
    with headgain.attach(model, cfg=cfg) as handle:
        assert not torch.equal(_logits(model, inputs), folded), "dynamic gains act on top of the folded ones"
        handle.enabled = False
        assert torch.equal(_logits(model, inputs), folded)
    assert torch.equal(_logits(model, inputs), folded)


def test_fold_gains_refuses_bad_tables():
    model = tiny_model("llava")
    with pytest.raises(
        headgain.HeadGainError, match=r"gains have shape \(3, 4\) but the decoder has 4 layers x 4 heads"
    ):
        headgain.fold_gains(model, torch.ones(3, 4))
    with pytest.raises(headgain.HeadGainError, match="finite and > 0"):
        headgain.fold_gains(model, torch.zeros(4, 4))
    headgain.fold_gains(model, torch.ones(4, 4) * 1.1)
    with pytest.raises(headgain.HeadGainError, match="already holds folded gains"):
        headgain.fold_gains(model, torch.ones(4, 4))


def test_census_static_gains():
    rng = np.random.default_rng(0)
    samples = rng.uniform(0.0, 0.2, size=(10, 4, 3)).astype(np.float32)
    samples[:8, 0, 1] = 0.9  # a perception head in 8 of 10 samples
    samples[:4, 3, 2] = 0.0  # a reasoning head in 4 of 10 samples only
    samples[:, 3, 0] = 0.001  # a reasoning head in every sample
    cfg = headgain.HeadGainConfig(l_perc=1, l_reas=2, tau_perc=0.5, tau_reas=0.005, g_perc=1.2, g_reas=1.4)
    table = Census(samples).static_gains(cfg)
    expected = np.ones((4, 3), dtype=np.float32)
    expected[0, 1], expected[3, 0] = 1.2, 1.4
    np.testing.assert_array_equal(table, expected)
    looser = Census(samples).static_gains(cfg, min_share=0.4)
    assert looser[3, 2] == pytest.approx(1.4)
    bipolar = Census(samples).static_gains(cfg.replace(strategy="bipolar", beta=0.9))
    assert bipolar[1, 1] == pytest.approx(0.9) and bipolar[0, 1] == pytest.approx(1.2)
