"""Keys in vLLM's paged KV cache, in the layouts headgain knows: a view of one layer's key
blocks, which `headgain.core.ops.ratio_from_blocks` reads in place for the requests of a step
read at i*, or one request's keys copied out (passes read at several rows).

vLLM stores each layer's keys and values in blocks of ``block_size`` tokens; a request's
blocks are listed, in token order, by its row of the step's block table (attention
metadata, in the model runner's batch order). The layout inside the cache belongs to the
attention backend, so headgain never assumes one: `find_layout` tries each layout below on
keys the attention layer has just written and keeps the first that gives them back exactly.
Where none does (another backend, a quantised cache), headgain keeps its own copy of the
keys instead (`headgain.vllm.requests.RequestState.write_keys`).

Layouts (the key half of one layer's cache tensor):

* ``cpu``: vLLM's CPU attention with its portable kernels: ``(num_blocks, Hkv, block_size,
  2 * D)`` holding, per block and KV head, the keys as a (D, block_size) array (element
  (d, t) at d * block_size + t), then the values.
* ``nhd``: the layout of vLLM's FlashAttention backend: ``(2, num_blocks, block_size, Hkv,
  D)``, keys first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core import reference

__all__ = ["Layout", "LAYOUTS", "find_layout", "block_rows"]


@dataclass(frozen=True)
class Layout:
    """How to read keys from one layer's cache tensor.

    Attributes:
        name: for messages ("cpu", "nhd").
        blocks: ``blocks(cache, num_kv_heads, head_dim) -> (num_blocks, Hkv, block_size, D)``
            view of the keys in ``cache`` (no copy; strides as the layout stores them), or
            None when ``cache`` does not have this layout's shape. `headgain.core.ops.ratio_from_blocks`
            reads it through a block table.
    """

    name: str
    blocks: Callable[[torch.Tensor, int, int], torch.Tensor | None]

    def keys(
        self, cache: torch.Tensor, row: torch.Tensor, length: int, num_kv_heads: int, head_dim: int, start: int = 0
    ) -> torch.Tensor | None:
        """(1, Hkv, length - start, D) keys of tokens [start, length) of the request whose
        block-table row is ``row`` (a copy), or None when ``cache`` does not have this layout's
        shape. (A sliding-window layer reads from the window's start: vLLM may have freed the
        blocks before it.)"""
        blocks = self.blocks(cache, num_kv_heads, head_dim)
        if blocks is None:
            return None
        skip = start // blocks.shape[2] * blocks.shape[2]  # tokens of the blocks before start's
        held = torch.tensor([length - skip])  # on the CPU: no wait for the GPU to read it back
        keys, _ = reference.gather_blocks(blocks, row[None, skip // blocks.shape[2] :], held)
        return keys[:, :, start - skip :]


def _blocks_cpu(cache, num_kv_heads, head_dim):
    if cache.dim() != 4:
        return None
    num_blocks, hkv, block_size, width = cache.shape
    if hkv != num_kv_heads or width != 2 * head_dim:
        return None
    return cache.view(num_blocks, hkv, 2, head_dim, block_size)[:, :, 0].transpose(2, 3)


def _blocks_nhd(cache, num_kv_heads, head_dim):
    if cache.dim() != 5 or cache.shape[0] != 2:
        return None
    _, _, _, hkv, d = cache.shape
    if hkv != num_kv_heads or d != head_dim:
        return None
    return cache[0].transpose(1, 2)


LAYOUTS = (Layout("cpu", _blocks_cpu), Layout("nhd", _blocks_nhd))


def find_layout(cache: torch.Tensor, row: torch.Tensor, start: int, written: torch.Tensor) -> Layout | None:
    """The layout in `LAYOUTS` whose read gives back exactly ``written``, the (n, Hkv, D) keys
    of tokens [start, start + n) the layer has just stored for the request at block-table row
    ``row``; None when no layout does."""
    n, hkv, d = written.shape
    for layout in LAYOUTS:
        try:
            keys = layout.keys(cache, row, start + n, hkv, d, start)
        except (RuntimeError, IndexError):  # a view or an index this cache's shape does not allow
            continue
        if keys is not None and keys.dtype == written.dtype and torch.equal(keys[0].transpose(0, 1), written):
            return layout
    return None


def block_rows(module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cache tensor, (num_requests, max_blocks) block table) of a vLLM ``Attention`` module
    at the current step, or None when the step's metadata or the cache is not there."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, dict):
        metadata = metadata.get(module.layer_name)
    table = getattr(metadata, "block_table", None)
    cache = module.kv_cache[0] if isinstance(module.kv_cache, list) else module.kv_cache
    if table is None or not isinstance(table, torch.Tensor) or cache.numel() == 0:
        return None
    return cache, table
