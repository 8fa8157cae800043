"""ratio_from_blocks: S_v of one query row per request, read through a block table from a paged
key cache in the two layouts servers use (key index innermost, as vLLM's CPU cache; head dim
innermost, as FlashAttention's), against softmax probabilities computed here from the keys
before they were paged."""

import pytest
import torch
from support import DEVICES
from torch.library import opcheck

from headgain.core import ops, reference

pytestmark = pytest.mark.skipif(not ops.extension_available("cpu"), reason="the compiled extension is not built")


def _paged(keys: list[torch.Tensor], block_size: int, layout: str, seed: int = 0):
    """Each request's (Hkv, n, D) keys stored in shuffled blocks of a cache with spare blocks:
    ((NB, Hkv, BS, D) view of the cache, (R, MB) int32 block table, the cache tensor)."""
    g = torch.Generator().manual_seed(seed)
    hkv, _, d = keys[0].shape
    need = [-(-k.shape[1] // block_size) for k in keys]
    nb = sum(need) + 3
    ids = torch.randperm(nb, generator=g)
    table = torch.zeros(len(keys), max(need) + 1, dtype=torch.int32)
    if layout == "dmajor":  # (NB, Hkv, 2, D, BS): keys of a block and head as (D, BS), then values
        cache = torch.randn(nb, hkv, 2, d, block_size, generator=g).to(keys[0].dtype)
    else:  # (2, NB, BS, Hkv, D): keys first
        cache = torch.randn(2, nb, block_size, hkv, d, generator=g).to(keys[0].dtype)
    blocks = _blocks(cache, layout)
    used = 0
    for r, k in enumerate(keys):
        for b in range(need[r]):
            block = int(ids[used])
            used += 1
            table[r, b] = block
            part = k[:, b * block_size : (b + 1) * block_size]
            blocks[block, :, : part.shape[1]] = part
    return blocks, table, cache


def _blocks(cache: torch.Tensor, layout: str) -> torch.Tensor:
    """The (NB, Hkv, BS, D) view of the keys in ``cache``."""
    return cache[:, :, 0].permute(0, 1, 3, 2) if layout == "dmajor" else cache[0].permute(0, 2, 1, 3)


def _explicit(q, keys, visual, scaling, softcap, window):
    """(R, H) S_v from float64 softmax probabilities over each request's window of keys."""
    r, h, _ = q.shape
    out = torch.zeros(r, h)
    for i, k in enumerate(keys):
        n, group = k.shape[1], h // k.shape[0]
        start = max(0, n - window) if window else 0
        for head in range(h):
            s = (k[head // group, start:].double() @ q[i, head].double()) * scaling
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            p = torch.softmax(s, 0)
            out[i, head] = p[visual[i, start:n]].sum().float()
    return out


def _case(lengths, h, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lengths), h, d, generator=g).to(dtype)
    keys = [(2 * torch.randn(hkv, n, d, generator=g)).to(dtype) for n in lengths]
    visual = torch.rand(len(lengths), max(lengths) + 5, generator=g) < 0.4
    return q, keys, visual


TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-5, torch.float16: 2e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["dmajor", "nhd"])
@pytest.mark.parametrize(
    "lengths, block_size, window",
    [((1, 16, 17, 40), 16, 0), ((33, 7), 16, 10), ((2500, 300), 128, 0), ((2500, 130), 128, 1500)],
    ids=["short", "window", "spans", "spans-window"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_explicit_probabilities(dtype, layout, lengths, block_size, window, device):
    q, keys, visual = _case(lengths, 8, 2, 64, dtype)
    blocks, table, cache = _paged(keys, block_size, layout)
    assert (blocks.stride(2) == 1) == (layout == "dmajor")
    lens = torch.tensor(lengths)
    if device != "cpu":  # the whole cache moved there, read through the same view
        blocks = _blocks(cache.to(device), layout)
    on = [t.to(device) for t in (q, table, lens, visual)]
    got = ops.ratio_from_blocks(on[0], blocks, on[1], on[2], on[3], 0.125, window=window)
    assert got.device.type == device
    got = got.cpu()
    want = _explicit(q, keys, visual, 0.125, 0.0, window)
    assert got.dtype == torch.float32 and got.shape == (len(lengths), 8)
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=1e-4)
    # the gathering path other devices take, and the float64 reference, agree
    torch.testing.assert_close(
        reference.ratio_from_blocks(q, blocks, table, lens, visual, 0.125, window=window), want, atol=1e-4, rtol=1e-3
    )


@pytest.mark.parametrize("device", DEVICES)
def test_softcap_and_int64_table(device):
    q, keys, visual = _case((50, 3), 4, 4, 32, torch.float32, seed=1)
    blocks, table, cache = _paged(keys, 16, "dmajor", seed=1)
    if device != "cpu":
        blocks = _blocks(cache.to(device), "dmajor")
    on = [t.to(device) for t in (q, table.long(), torch.tensor([50, 3]), visual)]
    got = ops.ratio_from_blocks(on[0], blocks, on[1], on[2], on[3], 0.5, softcap=4.0)
    torch.testing.assert_close(got.cpu(), _explicit(q, keys, visual, 0.5, 4.0, 0), atol=2e-6, rtol=1e-5)


def large_group_case(dtype=torch.float32):
    """A query group of 12 heads per KV head, more than CUDA and the CPU's element-major kernels
    score a key against at once (8): (q, keys, visual, lengths)."""
    q, keys, visual = _case((300, 45), 24, 2, 64, dtype, seed=2)
    return q, keys, visual, torch.tensor([300, 45])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["dmajor", "nhd"])
@pytest.mark.parametrize("device", DEVICES)
def test_large_query_group(layout, device, dtype):
    q, keys, visual, lengths = large_group_case(dtype)
    _, table, cache = _paged(keys, 16, layout)
    on = [t.to(device) for t in (q, table, lengths, visual)]
    got = ops.ratio_from_blocks(on[0], _blocks(cache.to(device), layout), on[1], on[2], on[3], 0.125)
    torch.testing.assert_close(got.cpu(), _explicit(q, keys, visual, 0.125, 0.0, 0), atol=TOL[dtype], rtol=1e-4)


def test_bad_arguments_say_what_is_wrong():
    q, keys, visual = _case((20, 9), 4, 2, 32, torch.float32)
    blocks, table, _ = _paged(keys, 16, "dmajor")
    lens = torch.tensor([20, 9])
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 0 must be between 1 and"):
        ops.ratio_from_blocks(q, blocks, table, torch.tensor([20, 0]), visual, 0.1)
    with pytest.raises(RuntimeError, match=r"lengths\[0\] = 49 must be between 1 and the keys"):
        ops.ratio_from_blocks(q, blocks, table, torch.tensor([49, 9]), visual, 0.1)
    bad = table.clone()
    bad[0, 1] = blocks.shape[0]
    with pytest.raises(RuntimeError, match=r"block_table\[0, 1\] = \d+ is not a block of key_blocks"):
        ops.ratio_from_blocks(q, blocks, bad, lens, visual, 0.1)
    with pytest.raises(RuntimeError, match="window must be 0"):
        ops.ratio_from_blocks(q, blocks, table, lens, visual, 0.1, window=-1)
    with pytest.raises(RuntimeError, match="lengths must be"):
        ops.ratio_from_blocks(q, blocks, table, lens.int(), visual, 0.1)
    with pytest.raises(RuntimeError, match="key_blocks must be"):
        ops.ratio_from_blocks(q, blocks[..., :16], table, lens, visual, 0.1)


def test_opcheck():
    q, keys, visual = _case((20, 9), 4, 2, 32, torch.float32)
    blocks, table, _ = _paged(keys, 16, "nhd")
    for window in (0, 5):
        args = (q, blocks, table, torch.tensor([20, 9]), visual, 0.1, 0.0, window)
        opcheck(torch.ops.headgain.ratio_from_blocks.default, args)
