"""headgain's dynamic vLLM plugin on a vision-language model with real images.

A tiny random-weight Idefics3 (Llama decoder, vision tower, pixel shuffle; written by
`headgain.testing.checkpoints.idefics3_checkpoint`) is served by vLLM's CPU build, in this
process, with PIL images given as ``multi_modal_data``. vLLM runs the image through its own
processor and vision tower and expands ``<image>`` into the placeholder tokens; the plugin
resolves the model through its arch map ``idefics3`` and flags as visual the tokens whose id
is the config's ``image_token_id``. The reference is ``transformers`` (eager attention) on
the same checkpoint, processor and pictures, with `headgain.attach` and the registered
transformers arch map ``idefics3``:

- requests without a config: vLLM's greedy tokens are ``transformers``' (vanilla);
- with a config that changes them: the same tokens, and at every step (the prefill and each
  decoding step) S_v of every head within 2e-6 of ``transformers``' attention
  probabilities, and the same gains;
- a request without an image has no visual tokens: the plugin warns and leaves it vanilla.
"""

import contextlib
import os

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

import headgain

pytest.importorskip("vllm", reason="vLLM is installed in its own venv: make test-vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process

from conftest import generate, start_engine, step_records  # noqa: E402

import headgain.vllm as hv  # noqa: E402
from headgain.testing.checkpoints import idefics3_checkpoint  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM, IMAGE_SIZE = 4, 4, 2, 32, 56  # 4 <image> tokens per picture
NEW = 6
CFG = {"l_perc": 1, "tau_perc": 0.3, "g_perc": 2.0, "l_reas": 2, "tau_reas": 0.2, "g_reas": 2.5}
OTHER = {"l_perc": 0, "tau_perc": 0.1, "g_perc": 1.8, "l_reas": 3, "tau_reas": 0.05, "g_reas": 1.5}


def _picture(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


PICTURES = [_picture(0, 56, 56), _picture(1, 80, 48)]  # the processor resizes both to 56 x 56
PROMPTS = [("<s> w5 <image> w6 w7", 0), ("<s> <image> w10 w11 w12 w13", 1), ("<s> w20 w21 <image> w22", 0)]
TEXT_ONLY = "<s> w30 w31 w32 w33"


def _request(prompt: str, picture: int | None) -> dict:
    if picture is None:
        return {"prompt": prompt}
    return {"prompt": prompt, "multi_modal_data": {"image": PICTURES[picture]}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("idefics3"))
    idefics3_checkpoint(path, LAYERS, HEADS, KV_HEADS, HEAD_DIM, IMAGE_SIZE)
    return path


@pytest.fixture(scope="module")
def served(checkpoint):
    """One engine with the plugin (requests without a config are vanilla, bit for bit)."""
    env = {hv.ENV_ENABLE: "1", hv.ENV_RECORD: "16"}
    return start_engine(checkpoint, env, max_model_len=256, max_num_seqs=4, limit_mm_per_prompt={"image": 1})


@pytest.fixture(scope="module")
def by_placeholders(checkpoint):
    """The plugin with an arch map that names no visual token id: visual positions can only
    come from the requests' multimodal placeholders."""
    arch = headgain.ArchMap("model.text_model.layers.*.self_attn", visual_token_ids=())
    env = {hv.ENV_ENABLE: "1", hv.ENV_RECORD: "16", hv.ENV_ARCH_MAP: arch.to_json()}
    return start_engine(checkpoint, env, max_model_len=256, max_num_seqs=4, limit_mm_per_prompt={"image": 1})


@pytest.fixture(scope="module")
def reference(checkpoint):
    model = tf.AutoModelForImageTextToText.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32)
    return model.eval(), tf.AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def plain(served):
    """vLLM's (tokens, logprobs) of `PROMPTS` without a config."""
    return generate(served, [_request(*p) for p in PROMPTS], [...] * len(PROMPTS), NEW)[:2]


def _transformers(reference, prompt: str, picture: int | None, cfg):
    """Greedy tokens, prompt length, and S_v and gains of every step (with ``cfg``; None:
    vanilla) from ``transformers`` with eager attention."""
    model, processor = reference
    images = None if picture is None else [[PICTURES[picture]]]
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    extra = {k: inputs[k] for k in ("pixel_values", "pixel_attention_mask") if k in inputs}
    ids, cache = inputs["input_ids"], tf.DynamicCache(config=model.config)
    tokens, ratios, gains = [], [], []
    attached = contextlib.nullcontext() if cfg is None else headgain.attach(model, "idefics3", cfg)
    with attached as handle, torch.no_grad():
        for _ in range(NEW):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, **extra).logits
            if handle is not None:
                ratios.append(handle.last_ratios[:, 0])
                gains.append(handle.last_gains[:, 0])
            tokens.append(int(logits[0, -1].argmax()))
            ids, extra = torch.tensor([[tokens[-1]]]), {}
    return tokens, inputs["input_ids"].shape[1], ratios, gains


def test_vanilla_tokens_match_transformers(reference, plain):
    tokens, _ = plain
    for (prompt, picture), got in zip(PROMPTS, tokens):
        assert got == _transformers(reference, prompt, picture, None)[0]
    assert len({tuple(t) for t in tokens}) == len(PROMPTS)  # the pictures and words make a difference


def test_sv_gains_and_tokens_match_transformers(served, reference, plain):
    image_id = reference[0].config.image_token_id
    # the configured requests in one batch with a vanilla one
    requests = [_request(*p) for p in PROMPTS] + [_request(*PROMPTS[0])]
    tokens, logprobs, ids = generate(served, requests, [CFG] * len(PROMPTS) + [...], NEW)
    assert tokens[-1] == plain[0][0] and logprobs[-1] == plain[1][0]  # untouched: bit-identical
    assert tokens[:-1] != plain[0], "the config must change the greedy tokens, or the comparison shows nothing"
    for (prompt, picture), got, request_id in zip(PROMPTS, tokens, ids):
        want, length, ratios, gains = _transformers(reference, prompt, picture, CFG)
        assert got == want
        steps = step_records(served, request_id)
        # the prompt as vLLM expanded it: as long as the processor's, with <image> as placeholders
        assert [(past, n) for past, n, _, _ in steps] == [(0, length)] + [(length + i, 1) for i in range(NEW - 1)]
        for (_, _, r, g), ref_r, ref_g in zip(steps, ratios, gains):
            assert r.shape == (LAYERS, HEADS)
            torch.testing.assert_close(r, ref_r, atol=2e-6, rtol=0)
            assert torch.equal(g, ref_g)
        # S_v is a real share: the placeholder tokens hold part of the attention, not none or all
        assert all(bool(((r > 0.01) & (r < 0.99)).any()) for _, _, r, _ in steps)
        assert any(bool((g != 1).any()) for _, _, _, g in steps)
    assert image_id == served.get_tokenizer().convert_tokens_to_ids("<image>")


def test_request_without_image_is_left_vanilla_with_a_warning(served):
    vanilla, vanilla_logprobs, _ = generate(served, [_request(TEXT_ONLY, None)], [...], NEW)
    with pytest.warns(RuntimeWarning, match="found no visual tokens"):
        tokens, logprobs, (request_id,) = generate(served, [_request(TEXT_ONLY, None)], [CFG], NEW)
    assert tokens == vanilla and logprobs == vanilla_logprobs
    steps = step_records(served, request_id)
    assert len(steps) == NEW
    assert all(bool((r == 0).all()) and bool((g == 1).all()) for _, _, r, g in steps)


def test_visual_positions_come_from_the_requests_placeholders(by_placeholders, reference):
    """Two configs in one batch, visual positions from vLLM's placeholders alone: the same S_v,
    gains and tokens as transformers, whose reference flags the image token id."""
    configs = [CFG, OTHER, CFG]
    tokens, _, ids = generate(by_placeholders, [_request(*p) for p in PROMPTS], configs, NEW)
    for (prompt, picture), cfg, got, request_id in zip(PROMPTS, configs, tokens, ids):
        want, length, ratios, gains = _transformers(reference, prompt, picture, cfg)
        assert got == want
        steps = step_records(by_placeholders, request_id)
        assert len(steps) == len(ratios) == NEW
        for (_, _, r, g), ref_r, ref_g in zip(steps, ratios, gains):
            torch.testing.assert_close(r, ref_r, atol=2e-6, rtol=0)
            assert torch.equal(g, ref_g)
        assert all(bool(((r > 0.01) & (r < 0.99)).any()) for _, _, r, _ in steps)
