"""headgain on a plain PyTorch model (no transformers): read at its SDPA calls, scaled at
its output projections, against probabilities computed here from the queries and keys."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import headgain
from headgain import ArchMap

DIM, HEADS = 32, 4
CFG = dict(l_perc=0, l_reas=1, tau_perc=0.3, tau_reas=0.2, g_perc=1.5, g_reas=1.7)


class Attention(nn.Module):
    """Research-style attention: projections, one SDPA call, an output projection ``proj``."""

    def __init__(self, kv_heads: int = HEADS):
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = HEADS, kv_heads, DIM // HEADS
        self.q = nn.Linear(DIM, DIM)
        self.kv = nn.Linear(DIM, 2 * kv_heads * self.head_dim)
        self.proj = nn.Linear(DIM, DIM)
        self.captured = None

    def forward(self, x, attn_mask=None):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        self.captured = (q.detach().clone(), k.detach().clone())
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=self.kv_heads != self.num_heads
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, kv_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attn = Attention(kv_heads)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.norm(x), attn_mask)
        return x + self.mlp(x)


class TinyDecoder(nn.Module):
    """A 3-block decoder over embeddings (B, N, DIM), or over token ids when ``vocab`` is set."""

    def __init__(self, layers: int = 3, kv_heads: int = HEADS, vocab: int | None = None, checkpointed: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, DIM) if vocab else None
        self.blocks = nn.ModuleList(Block(kv_heads) for _ in range(layers))
        self.head = nn.Linear(DIM, 11)
        self.checkpointed = checkpointed
        for p in self.parameters():  # peaky attention, so heads differ in what they look at
            p.data.mul_(3.0)

    def forward(self, x, attn_mask=None):
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks:
            if self.checkpointed:
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
        return self.head(x)


def plain_map(**kw) -> ArchMap:
    return ArchMap(**{"attention": "blocks.*.attn", "o_proj": "proj", "num_heads": HEADS, "visual_token_ids": (), **kw})


def _visual(batch=2, length=9):
    visual = torch.zeros(batch, length, dtype=torch.bool)
    visual[0, 1:5] = True
    visual[1, 3:8] = True
    return visual


def _reference_ratios(model, visual, attn_mask=None):
    """(L, B, H): softmax of the captured q k^T (with the mask SDPA got) at the last row, summed over visual keys."""
    out = []
    for block in model.blocks:
        q, k = block.attn.captured
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, H, N, N)
        n = scores.shape[-1]
        if attn_mask is None:
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        elif attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
        probs = scores.softmax(-1)[:, :, -1]  # (B, H, N) row i* = the last position
        out.append((probs * visual[:, None, :].float()).sum(-1))
    return torch.stack(out)


def _masks(kind, batch=2, length=9):
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    if kind == "causal":
        return None
    if kind == "bool":
        mask = causal[None, None].expand(batch, 1, length, length).clone()
        mask[1, :, :, 0] = False  # sample 1 may not look at its first position
        return mask
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])[:, None, None]
    distance = (torch.arange(length)[None, :] - torch.arange(length)[:, None]).float()
    return torch.where(causal, slopes * distance, float("-inf"))[None]  # (1, H, N, N) ALiBi biases per head


def _gain_hooks(model, gains):
    """Scale each head's slice of every proj input by gains[l] (B, H): plain pre-hooks."""

    def make(layer):
        def hook(module, args):
            x = args[0]
            b, n, w = x.shape
            return ((x.view(b, n, HEADS, w // HEADS) * gains[layer][:, None, :, None]).view(b, n, w),)

        return hook

    handles = [block.attn.proj.register_forward_pre_hook(make(i)) for i, block in enumerate(model.blocks)]
    return lambda: [h.remove() for h in handles]


@pytest.mark.parametrize("kv_heads", [HEADS, 2])
@pytest.mark.parametrize("mask", ["causal", "bool", "alibi"])
def test_ratios_and_outputs_match_references(mask, kv_heads):
    model, reference = TinyDecoder(kv_heads=kv_heads), TinyDecoder(kv_heads=kv_heads)
    x, attn_mask, visual = torch.randn(2, 9, DIM), _masks(mask), _visual()
    with torch.no_grad():
        vanilla = model(x, attn_mask)
    handle = headgain.attach(model, plain_map(), CFG)
    handle.set_visual_mask(visual)
    with torch.no_grad():
        out = model(x, attn_mask)
    expected = _reference_ratios(model, visual, attn_mask)
    torch.testing.assert_close(handle.last_ratios, expected, atol=1e-5, rtol=1e-4)
    gains = handle.last_gains
    assert (gains > 1).any() and (gains == 1).any(), "the config must select some heads and leave others"
    remove = _gain_hooks(reference, gains)
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x, attn_mask), atol=1e-5, rtol=1e-5)
    remove()
    handle.detach()
    with torch.no_grad():
        assert torch.equal(model(x, attn_mask), vanilla)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_integer_visual_ids_read_from_token_inputs():
    model = TinyDecoder(vocab=40)
    ids = torch.randint(0, 30, (2, 9))
    ids[0, 2:6] = 37
    ids[1, 4:7] = 37
    handle = headgain.attach(model, plain_map(visual_token_ids=(37,)), CFG)
    with torch.no_grad():
        model(ids)
    torch.testing.assert_close(handle.last_ratios, _reference_ratios(model, ids == 37), atol=1e-5, rtol=1e-4)


def test_without_visual_positions_nothing_changes_and_a_warning_says_why():
    model = TinyDecoder()
    x = torch.randn(2, 9, DIM)
    with torch.no_grad():
        vanilla = model(x)
    handle = headgain.attach(model, plain_map(), CFG)
    with pytest.warns(RuntimeWarning, match="no visual tokens"), torch.no_grad():
        assert torch.equal(model(x), vanilla)
    assert torch.equal(handle.last_gains, torch.ones_like(handle.last_gains))


def test_checkpointed_blocks_get_the_gradients_of_the_plain_backward():
    def grads(checkpointed):
        model = TinyDecoder(checkpointed=checkpointed).train()
        handle = headgain.attach(model, plain_map(), CFG)
        handle.set_visual_mask(_visual())
        model(torch.randn(2, 9, DIM, generator=torch.Generator().manual_seed(1))).square().mean().backward()
        assert (handle.last_gains > 1).any()
        return {n: p.grad for n, p in model.named_parameters()}

    expected, got = grads(False), grads(True)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_plain_model_errors():
    model = TinyDecoder()
    with pytest.raises(
        headgain.ArchError, match="not a transformers model, so headgain cannot look its architecture up"
    ):
        headgain.attach(model, cfg=CFG)
    with pytest.raises(headgain.ArchError, match="ArchMap.num_heads gives 8 heads but blocks.0.attn.num_heads = 4"):
        headgain.attach(model, ArchMap("blocks.*.attn", o_proj="proj", num_heads=8, visual_token_ids=()), CFG)
    with pytest.raises(headgain.ArchError, match="has no linear 'out' .*ArchMap.o_proj"):
        headgain.attach(model, ArchMap("blocks.*.attn", o_proj="out", num_heads=4, visual_token_ids=()), CFG)
    with pytest.raises(headgain.ArchError, match="no config to read \\['image_id'\\]"):
        headgain.attach(
            model, ArchMap("blocks.*.attn", o_proj="proj", num_heads=4, visual_token_ids=("image_id",)), CFG
        )
    with headgain.attach(
        model, ArchMap("blocks.*.attn", o_proj="proj", num_heads="num_heads", visual_token_ids=()), CFG
    ) as h:
        assert h.num_heads == HEADS  # a string names an attribute of the attention module
    handle = headgain.attach(model, plain_map(), CFG)
    handle.set_visual_mask(_visual(length=7))
    with pytest.raises(headgain.HeadGainError, match=r"visual mask has shape \(2, 7\) but the prompt is \(2, 9\)"):
        model(torch.randn(2, 9, DIM))
    with pytest.raises(headgain.HeadGainError, match="ran outside a call of the attached TinyDecoder"):
        model.blocks[0](torch.randn(2, 9, DIM))
    handle.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 9, DIM))


def test_import_headgain_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, headgain; assert 'transformers' not in sys.modules, 'transformers was imported'; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
