"""Folded gains served by unmodified vLLM (CPU build, its own venv: `make test-vllm`).

A fixed (layers, heads) table is folded into a decoder's output projections with
`headgain.fold_gains` and saved; vLLM loads the folded checkpoint and must generate the same
greedy tokens as ``transformers`` running the original weights with the same table applied
by plain hooks at the ``o_proj`` inputs.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as tf

import headgain
from headgain.testing.checkpoints import qwen2_checkpoint

pytest.importorskip("vllm", reason="vLLM is installed in its own venv: make test-vllm")

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS, HEADS, KV_HEADS, HEAD_DIM = 4, 4, 2, 32  # head dim 32: the smallest vLLM's CPU attention takes
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]]
NEW = 8
ARCH = headgain.ArchMap("model.layers.*.self_attn", visual_token_ids=())


def _hf_tokens(model, table=None) -> list[list[int]]:
    """Greedy tokens from transformers, with ``table`` applied by pre-hooks at each o_proj input."""
    hooks = []
    if table is not None:
        for layer, attn in enumerate(model.model.layers):

            def scale(module, args, row=table[layer]):
                (x,) = args
                b, n, _ = x.shape
                return ((x.view(b, n, HEADS, HEAD_DIM) * row[None, None, :, None]).view(b, n, -1),)

            hooks.append(attn.self_attn.o_proj.register_forward_pre_hook(scale))
    try:
        out = []
        with torch.no_grad():
            for prompt in PROMPTS:
                ids = torch.tensor([prompt])
                gen = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
                out.append(gen[0, len(prompt) :].tolist())
        return out
    finally:
        for h in hooks:
            h.remove()


def _vllm_tokens(checkpoint: str, tmp_path) -> list[list[int]]:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    out = tmp_path / "tokens.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "serve_folded.py"), checkpoint, str(prompts), str(NEW), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_vllm_serves_folded_gains_like_hooks(tmp_path):
    original = str(tmp_path / "original")
    folded_dir = str(tmp_path / "folded")
    model = qwen2_checkpoint(original, LAYERS, HEADS, KV_HEADS, HEAD_DIM)
    table = torch.ones(LAYERS, HEADS)
    table[0, 1], table[1, 3], table[2, 0], table[3, 2] = 1.6, 0.5, 1.8, 1.4

    vanilla = _hf_tokens(model)
    hooked = _hf_tokens(model, table)
    assert hooked != vanilla, "the table must change the greedy tokens, or the comparison shows nothing"

    folded = headgain.fold_gains(model, table, ARCH)
    model.save_pretrained(folded_dir)
    tf.AutoTokenizer.from_pretrained(original).save_pretrained(folded_dir)
    assert tf.AutoConfig.from_pretrained(folded_dir).headgain_folded_gains == table.tolist()
    folded.unfold()

    assert _vllm_tokens(original, tmp_path) == vanilla
    assert _vllm_tokens(folded_dir, tmp_path) == hooked
