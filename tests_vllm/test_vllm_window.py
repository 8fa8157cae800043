"""headgain's vLLM plugin on a decoder whose layers attend to a sliding window: S_v, gains
and greedy tokens equal to transformers + headgain (eager attention) while the window has
left the prompt's first blocks behind (earlier keys read from vLLM's paged cache from the
window's start)."""

import os
import platform

import pytest
import torch
import transformers as tf

import headgain

pytest.importorskip("vllm", reason="vLLM is installed in its own venv: make test-vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process

from conftest import generate, start_engine, step_records  # noqa: E402

import headgain.vllm as hv  # noqa: E402
from headgain.testing.checkpoints import qwen2_checkpoint  # noqa: E402

WINDOW, VISUAL, NEW = 16, 20, 8
ARCH = headgain.ArchMap("model.layers.*.self_attn", visual_token_ids=(VISUAL,))
CFG = {"l_perc": 1, "tau_perc": 0.3, "g_perc": 2.0, "l_reas": 2, "tau_reas": 0.2, "g_reas": 2.5}
# 81 tokens, the visual ones inside the last window (blocks of 32: the first two are behind it)
PROMPT = [1] + list(range(30, 100)) + [VISUAL] * 8 + [101, 102]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2-window"))
    qwen2_checkpoint(path, 4, 4, 2, 32, sliding_window=WINDOW)
    return path


def test_sliding_window_layers_match_transformers(checkpoint):
    env = {hv.ENV_ENABLE: "1", hv.ENV_RECORD: "4", hv.ENV_ARCH_MAP: ARCH.to_json()}
    llm = start_engine(checkpoint, env, block_size=32)
    assert llm.apply_model(lambda m: [layer.sliding_window for layer in hv.attachment_of(m).decoder.layers]) == [
        [WINDOW] * 4
    ]
    tokens, _, (request_id,) = generate(llm, [{"prompt_token_ids": PROMPT}], [CFG], NEW)
    steps = step_records(llm, request_id)
    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32)
    cache, sequence = tf.DynamicCache(config=model.config), list(PROMPT)
    with headgain.attach(model.eval(), ARCH, CFG) as handle, torch.no_grad():
        for past, n, ratios, gains in steps:
            ids = torch.tensor([sequence[past : past + n]])
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            sequence.append(int(logits[0, -1].argmax()))
            torch.testing.assert_close(ratios, handle.last_ratios[:, 0], atol=2e-6, rtol=0)
            assert torch.equal(gains, handle.last_gains[:, 0])
    assert tokens[0] == sequence[len(PROMPT) :]
    if platform.machine() == "x86_64":  # earlier keys came from vLLM's cache, not headgain's copy
        assert llm.apply_model(lambda m: hv.attachment_of(m).key_source) == ["paged cpu"]
    assert all(bool((r > 0.01).any()) for _, _, r, _ in steps)  # the visual tokens are in the window
    assert any(bool((g != 1).any()) for _, _, _, g in steps)
