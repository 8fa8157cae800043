"""Pure-PyTorch reference of headgain's ops.

These functions define what the compiled ops in ``csrc/`` compute; tests compare the two,
and `headgain.core.ops` falls back to them when the extension is not built. Shapes:

* B batch, H (= Hq) query heads, Hkv key/value heads (H % Hkv == 0), D head width,
  Nq queries of the current pass, Nk keys, R selected query rows.
"""

from __future__ import annotations

import torch

from .rules import HeadClass, classify_tensor

__all__ = [
    "ratio_from_probs",
    "ratio_from_qk",
    "gather_blocks",
    "ratio_from_blocks",
    "decode_attention",
    "head_gains",
    "scale_heads",
]


def ratio_from_probs(probs: torch.Tensor, visual: torch.Tensor, query_weights: torch.Tensor) -> torch.Tensor:
    """Visual attention share read from attention probabilities.

    Args:
        probs: (B, H, Nq, Nk) float32/bfloat16/float16, post-softmax, any strides.
        visual: (B, Nk) bool, True where the key is a visual token.
        query_weights: (B, Nq) float32; row q of sample b counts with this weight
            (one-hot at i* for the paper's ratio, 1/|text| on text rows for the mean).

    Returns:
        (B, H) float32: ``sum_q w[b, q] * sum_{j visual} probs[b, h, q, j]``.
    """
    vis = torch.einsum("bhqk,bk->bhq", probs.float(), visual.float())
    return torch.einsum("bhq,bq->bh", vis, query_weights.float())


def ratio_from_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    visual: torch.Tensor,
    row_weights: torch.Tensor,
    scaling: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Visual attention share recomputed from query rows and keys (no probability matrix).

    Args:
        q: (B, H, R, D) the query rows whose attention is read.
        k: (B, Hkv, Nk, D) keys; query head h reads key head ``h // (H // Hkv)``.
        mask: None (every key allowed), or (B, R, Nk) bool (True = attend) or float
            (added to the scores; -inf or a large negative value = masked).
        visual: (B, Nk) bool.
        row_weights: (B, R) float32; rows with weight <= 0 are skipped (they may be fully masked).
        scaling: multiplies q.k; softcap: when > 0, scores become softcap * tanh(s / softcap).

    Returns:
        (B, H) float32 ``sum_r w[b, r] * sum_{j visual} softmax_j(scores[b, h, r, :])``.
    """
    b, h, r, d = q.shape
    hkv = k.shape[1]
    qg = q.float().reshape(b, hkv, h // hkv, r, d)
    scores = torch.einsum("bgird,bgkd->bgirk", qg, k.float()) * scaling
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.reshape(b, h, r, -1)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask[:, None], float("-inf"))
        else:
            scores = scores + mask[:, None].float()
    probs = torch.softmax(scores, dim=-1)
    vis = (probs * visual[:, None, None, :].float()).sum(-1)
    w = row_weights.float()
    vis = torch.where(w[:, None, :] > 0, vis, torch.zeros((), dtype=vis.dtype, device=vis.device))
    return torch.einsum("bhr,br->bh", vis, w)


def gather_blocks(
    key_blocks: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor, window: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys of R requests copied out of a paged cache.

    Args:
        key_blocks: (NB, Hkv, BS, D) blocks of BS keys (any strides: a view of the cache).
        block_table: (R, MB) int32/int64, each request's block ids in token order.
        lengths: (R,) int64, each request's number of keys.
        window: 0, or each request reads only its last ``window`` keys.

    Returns:
        ((R, Hkv, N, D) keys of positions [0, N), N = max(lengths); (R, N) bool, the keys each
        request reads: [max(0, length - window), length)).
    """
    hkv, bs = key_blocks.shape[1], key_blocks.shape[2]
    r, n = block_table.shape[0], int(lengths.max()) if lengths.numel() else 0
    nblocks = -(-n // bs)
    keys = key_blocks.index_select(0, block_table[:, :nblocks].long().flatten())  # (R * nblocks, Hkv, BS, D)
    keys = keys.view(r, nblocks, hkv, bs, -1).transpose(1, 2).reshape(r, hkv, nblocks * bs, -1)[:, :, :n]
    pos = torch.arange(n, device=lengths.device)[None]
    reads = pos < lengths[:, None]
    if window > 0:
        reads &= pos >= lengths[:, None] - window
    return keys, reads


def ratio_from_blocks(
    q: torch.Tensor,
    key_blocks: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    visual: torch.Tensor,
    scaling: float,
    softcap: float = 0.0,
    window: int = 0,
) -> torch.Tensor:
    """`ratio_from_qk` of one query row per request whose keys lie in a paged cache.

    Args:
        q: (R, H, D), each request's query row.
        key_blocks, block_table, lengths, window: as `gather_blocks`.
        visual: (R, L) bool, L >= max(lengths): each request's visual key positions.
        scaling, softcap: as `ratio_from_qk`.

    Returns:
        (R, H) float32.
    """
    keys, reads = gather_blocks(key_blocks, block_table, lengths, window)
    n = keys.shape[2]
    weights = torch.ones(q.shape[0], 1, device=q.device)
    return ratio_from_qk(q[:, :, None], keys, reads[:, None], visual[:, :n], weights, scaling, softcap)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    visual: torch.Tensor,
    scaling: float,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step's attention output and visual share per head.

    Args:
        q: (B, H, 1, D) the step's queries; k: (B, Hkv, Nk, D) and v: (B, Hkv, Nk, Dv) the
            keys and values after the cache update, of q's dtype; query head h reads KV
            head ``h // (H // Hkv)``.
        mask: None, or (B, 1, Nk) bool (True = attend) or float (added to the scores).
        visual: (B, Nk) bool; scaling, softcap: as in `ratio_from_qk`.

    Returns:
        out: (B, 1, H, Dv) in q's dtype, ``softmax(scores) @ v`` computed in float32 and
        rounded once (0 where every key is masked); ratios: (B, H) float32 S_v of the
        step's row (NaN where every key is masked).
    """
    b, h, _, d = q.shape
    hkv = k.shape[1]
    scores = torch.einsum("bgid,bgkd->bgik", q.float().reshape(b, hkv, h // hkv, d), k.float()) * scaling
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.reshape(b, h, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = torch.softmax(scores, dim=-1)  # NaN on fully masked rows
    ratios = (probs * visual[:, None, :].float()).sum(-1)
    out = torch.einsum("bgik,bgke->bgie", probs.reshape(b, hkv, h // hkv, -1), v.float())
    out = torch.nan_to_num(out.reshape(b, 1, h, -1), nan=0.0)
    return out.to(q.dtype), ratios


def head_gains(
    ratios: torch.Tensor,
    has_visual: torch.Tensor,
    tau_perc: float,
    tau_reas: float,
    g_perc: float,
    g_reas: float,
    g_neutral: float,
) -> torch.Tensor:
    """Per-head gains of one layer from its visual ratios (the rule of `headgain.core.rules`).

    Args:
        ratios: (B, H) float32 S_v.
        has_visual: (B,) bool; samples without visual tokens get gain 1 on every head.
        tau_perc: ``ratio >= tau_perc`` is a perception head (+inf where the layer holds
            none); tau_reas: ``ratio <= tau_reas`` is a reasoning head (-inf where the
            layer holds none). A `LayerRule` gives both.
        g_perc, g_reas, g_neutral: gains of the three classes.

    Returns:
        (B, H) float32 gains.
    """
    classes = classify_tensor(ratios, tau_perc, tau_reas)
    gains = torch.where(
        classes == HeadClass.PERCEPTION, g_perc, torch.where(classes == HeadClass.REASONING, g_reas, g_neutral)
    ).float()
    return torch.where(has_visual[:, None], gains, torch.ones((), dtype=gains.dtype, device=gains.device))


def scale_heads(out: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """``out * gains`` per head, out of place.

    Args:
        out: (B, N, H, D) head outputs, any float dtype.
        gains: (B, H) float32.

    Returns:
        (B, N, H, D) in ``out``'s dtype: ``out[b, n, h, :] * gains[b, h]``, multiplied
        in float32 (float64 for float64 outputs) and rounded once to ``out``'s dtype.
    """
    compute = torch.promote_types(out.dtype, torch.float32)
    return (out.to(compute) * gains[:, None, :, None].to(compute)).to(out.dtype)
