"""Reading keys from vLLM-style paged caches (no vLLM needed: the caches are written here,
token by token, at the slots a block table gives; tests_vllm/ checks the layout against
vLLM's own CPU cache)."""

import pytest
import torch

from headgain.core import ops
from headgain.vllm.paged import LAYOUTS, find_layout

HKV, D, BLOCK, BLOCKS = 2, 8, 4, 6
TABLE = torch.tensor([[3, 0, 5, 0], [1, 4, 0, 0]], dtype=torch.int32)  # request 0: blocks 3, 0, 5


def _cache(layout: str, keys: torch.Tensor, row: int) -> torch.Tensor:
    """A cache of ``layout`` holding (T, Hkv, D) ``keys`` for request ``row`` of `TABLE`; every
    other slot random."""
    g = torch.Generator().manual_seed(1)
    if layout == "cpu":
        cache = torch.randn(BLOCKS, HKV, BLOCK, 2 * D, generator=g)
    else:
        cache = torch.randn(2, BLOCKS, BLOCK, HKV, D, generator=g)
    _write(cache, layout, keys, row)
    return cache


def _write(cache: torch.Tensor, layout: str, keys: torch.Tensor, row: int) -> None:
    """Store (T, Hkv, D) ``keys`` in ``cache`` at the slots of request ``row`` of `TABLE`."""
    flat = cache.view(BLOCKS, HKV, 2 * BLOCK * D) if layout == "cpu" else None
    for t in range(keys.shape[0]):
        block, offset = int(TABLE[row, t // BLOCK]), t % BLOCK
        for h in range(HKV):
            for d in range(D):
                if layout == "cpu":  # keys of a block and head as a (D, BLOCK) array
                    flat[block, h, d * BLOCK + offset] = keys[t, h, d]
                else:
                    cache[0, block, offset, h, d] = keys[t, h, d]


@pytest.mark.parametrize("name", [layout.name for layout in LAYOUTS])
def test_each_layout_gives_back_the_keys_written_at_the_block_tables_slots(name):
    keys = torch.randn(10, HKV, D)  # 10 tokens: blocks 3, 0 and half of 5
    cache = _cache(name, keys, row=0)
    layout = find_layout(cache, TABLE[0], 7, keys[7:])  # the last 3 tokens, as a step writes them
    assert layout is not None and layout.name == name
    got = layout.keys(cache, TABLE[0], 10, HKV, D)
    assert got.shape == (1, HKV, 10, D)
    assert torch.equal(got[0].transpose(0, 1), keys)
    for start in (3, 4, 9):  # from inside the first block, at the second, inside the last
        got = layout.keys(cache, TABLE[0], 10, HKV, D, start)
        assert torch.equal(got[0].transpose(0, 1), keys[start:])


def test_no_layout_when_the_cache_does_not_hold_the_keys():
    keys = torch.randn(5, HKV, D)
    cache = _cache("cpu", keys, row=1)
    assert find_layout(cache, TABLE[0], 0, keys) is None  # another request's blocks
    assert find_layout(cache, TABLE[1], 0, keys + 1) is None  # other values
    assert find_layout(torch.zeros(3, 3), TABLE[1], 0, keys) is None  # a shape no layout has


@pytest.mark.parametrize("name", [layout.name for layout in LAYOUTS])
def test_s_v_read_in_place_through_the_block_table(name):
    """The layout's view of the key blocks, read by ratio_from_blocks for two requests at once
    (each with its own length, the second with a window), gives S_v of the keys written."""
    (layout,) = [layout for layout in LAYOUTS if layout.name == name]
    first, second = torch.randn(10, HKV, D), torch.randn(5, HKV, D)
    cache = _cache(name, first, row=0)
    _write(cache, name, second, row=1)
    blocks = layout.blocks(cache, HKV, D)
    assert blocks.shape == (BLOCKS, HKV, BLOCK, D) and blocks.data_ptr() == cache.data_ptr()  # a view
    q, visual = torch.randn(2, 2 * HKV, D), torch.rand(2, 10) < 0.5
    got = ops.ratio_from_blocks(q, blocks, TABLE, torch.tensor([10, 5]), visual, 0.3, window=3)
    for i, (keys, start) in enumerate([(first, 7), (second, 2)]):
        for h in range(2 * HKV):
            p = torch.softmax(keys[start:, h // 2].double() @ q[i, h].double() * 0.3, 0)
            torch.testing.assert_close(got[i, h].item(), p[visual[i, start : keys.shape[0]]].sum().item())
