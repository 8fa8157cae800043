"""Per-forward visual bookkeeping and the visual-ratio read-out at one attention call.

`ForwardState` is built once per forward pass (prefill or one decoding step) from the
model's inputs; every decoder layer then reads S_v for its heads with
`layer_ratios`, either from the attention probabilities (eager) or by recomputing only
the i* row(s) from queries and keys (sdpa, flash and other fused kernels).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from . import ops
from .rules import LayerRule

__all__ = ["ForwardState", "layer_ratios", "layer_gains"]


@dataclass
class ForwardState:
    """What every layer of one forward pass shares.

    Attributes:
        visual: (B, T) bool, True at visual positions of the whole sequence so far
            (cached prompt + this pass); padding is never visual.
        num_queries: Nq, the number of positions in this pass.
        istar: (B,) int64, index of the last real token of each sample within this pass.
        query_weights: (B, Nq) float32 weights of the query rows (one-hot at i*, or
            uniform over the text rows for ``query="mean_text"``).
        rows: "last" or "mean_text", which rows the fused path recomputes.
        has_visual: (B,) bool, whether a sample holds any visual token.
        row_index: (B,) int64 i*, the one row the fused path gathers from the queries and
            the mask, or None when it takes every row as it is (``mean_text``, or a
            decoding step whose single row is i*).
        row_weights: (B, R) float32 weights of the rows the fused path recomputes.
    """

    visual: torch.Tensor
    num_queries: int
    istar: torch.Tensor
    query_weights: torch.Tensor
    rows: str
    has_visual: torch.Tensor
    row_index: torch.Tensor | None
    row_weights: torch.Tensor
    _key_visual: dict = field(default_factory=dict)
    _masks: dict = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        current_visual: torch.Tensor,
        valid: torch.Tensor | None,
        previous_visual: torch.Tensor | None,
        query: str,
    ) -> ForwardState:
        """Args:
        current_visual: (B, Nq) bool visual positions of this pass.
        valid: (B, Nq) bool real (non-padding) positions of this pass, or None (all real).
        previous_visual: (B, T_past) bool from the earlier passes of this prompt, or None.
        query: "last" or "mean_text".
        """
        b, nq = current_visual.shape
        device = current_visual.device
        if valid is not None:
            current_visual = current_visual & valid
        if nq == 1:  # a decoding step: its one row is i*, of weight 1 in either query mode
            istar = torch.zeros((b,), dtype=torch.long, device=device)
            weights = torch.ones((b, 1), device=device)
        else:
            if valid is not None:
                istar = (nq - 1) - torch.argmax(valid.flip(1).to(torch.int8), dim=1)
            else:
                istar = torch.full((b,), nq - 1, dtype=torch.long, device=device)
            one_hot = torch.nn.functional.one_hot(istar, nq).to(torch.float32)
            if query == "mean_text":
                text = ~current_visual if valid is None else valid & ~current_visual
                count = text.sum(1, keepdim=True)
                weights = torch.where(count > 0, text.float() / count.clamp(min=1), one_hot)
            else:
                weights = one_hot
        gather = query == "last" and nq > 1
        row_weights = weights.new_ones((b, 1)) if gather else weights
        visual = current_visual if previous_visual is None else torch.cat([previous_visual, current_visual], 1)
        return cls(visual, nq, istar, weights, query, visual.any(1), istar if gather else None, row_weights)

    def key_visual(self, num_keys: int) -> torch.Tensor:
        """(B, Nk) bool: visual flags of the keys a layer sees.

        Dynamic and sliding-window caches hold the last Nk positions; a static cache holds
        Nk >= T slots whose tail is empty.
        """
        got = self._key_visual.get(num_keys)
        if got is None:
            t = self.visual.shape[1]
            if num_keys <= t:
                got = self.visual[:, t - num_keys :]
            else:
                got = torch.nn.functional.pad(self.visual, (0, num_keys - t), value=False)
            self._key_visual[num_keys] = got
        return got

    def decode_mask(self, attention_mask: torch.Tensor, num_keys: int) -> torch.Tensor:
        """(B, 1, Nk) view of a (B or 1, 1, 1, Nk) decoding-step mask, for `ops.decode_attention`
        (made once per mask and pass: every layer of a step gets the same mask)."""
        key = ("decode", id(attention_mask), num_keys)
        got = self._masks.get(key)
        if got is None:
            rows = attention_mask[:, 0].expand(self.visual.shape[0], 1, num_keys)
            got = self._masks[key] = (attention_mask, rows)  # the mask stays alive while its id is a key
        return got[1]

    def mask_rows(self, attention_mask: torch.Tensor | None, num_keys: int, sliding_window: int | None):
        """(B, R, Nk) bool or additive rows of the mask for the recomputed query rows, or None."""
        key = (id(attention_mask), num_keys, sliding_window)
        if key in self._masks:
            return self._masks[key][1]
        b = self.visual.shape[0]
        if attention_mask is not None and attention_mask.dim() == 4:
            rows = attention_mask[:, 0].expand(b, -1, -1)[..., -num_keys:]
            if self.row_index is not None:
                rows = rows.gather(1, self.row_index[:, None, None].expand(b, 1, rows.shape[-1]))
        else:
            rows = self._causal_rows(attention_mask, num_keys, sliding_window)
        # keep the mask object alive while its id is a cache key
        self._masks[key] = (attention_mask, rows)
        return rows

    def _causal_rows(self, padding: torch.Tensor | None, num_keys: int, sliding_window: int | None) -> torch.Tensor:
        t = self.visual.shape[1]
        device = self.visual.device
        offset = t - num_keys if num_keys <= t else 0
        key_pos = torch.arange(num_keys, device=device) + offset  # (Nk,)
        if self.rows == "last":
            q_pos = (t - self.num_queries + self.istar)[:, None]  # (B, 1)
        else:
            q_pos = (t - self.num_queries + torch.arange(self.num_queries, device=device))[None].expand(
                len(self.istar), -1
            )
        allowed = key_pos[None, None, :] <= q_pos[:, :, None]
        allowed = allowed & (key_pos < t)[None, None, :]
        if sliding_window:
            allowed = allowed & (key_pos[None, None, :] > q_pos[:, :, None] - sliding_window)
        if padding is not None and padding.dim() == 2:
            allowed = allowed & padding[:, None, -num_keys:].to(torch.bool)
        return allowed


def layer_ratios(
    state: ForwardState,
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scaling: float,
    mask_rows: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """S_v of every head of one layer: (B, H) float32.

    Args:
        query: (B, H, Nq, D) queries as given to the attention function.
        key: (B, Hkv, Nk, D) keys after the cache update.
        scaling: the factor the backend multiplies q.k by.
        mask_rows: None (every key allowed), (B, R, Nk) rows of the mask for the rows
            the state recomputes (bool, True = attend, or additive float), or
            (B, H, R, Nk) when the mask differs between heads.
        weights: the probabilities (B, H, Nq, Nk) when the backend returned them; then
            S_v is read from them and nothing is recomputed.
        softcap: when > 0, scores become softcap * tanh(s / softcap) (Gemma 2 style).
    """
    num_keys = key.shape[2]
    visual = state.key_visual(num_keys)
    if weights is not None and weights.dim() == 4 and weights.shape[-1] == num_keys:
        return ops.ratio_from_probs(weights, visual, state.query_weights)
    b, h, _, d = query.shape
    index = state.row_index
    rows = query if index is None else query.gather(2, index[:, None, None, None].expand(b, h, 1, d))
    if mask_rows is not None and mask_rows.dim() == 4:
        return _per_head_mask_ratios(rows, key, mask_rows, visual, state.row_weights, scaling, softcap)
    return ops.ratio_from_qk(rows, key, mask_rows, visual, state.row_weights, float(scaling), float(softcap))


def _per_head_mask_ratios(rows, key, mask_rows, visual, row_weights, scaling, softcap) -> torch.Tensor:
    """`ops.ratio_from_qk` for a mask that differs between heads (ALiBi-style biases):
    every head becomes a sample of its own, with its own mask rows."""
    b, h, r, d = rows.shape
    nk = key.shape[2]
    keys = key.repeat_interleave(h // key.shape[1], dim=1).reshape(b * h, 1, nk, d)
    masks = mask_rows.expand(b, h, r, nk).reshape(b * h, r, nk)
    ratios = ops.ratio_from_qk(
        rows.reshape(b * h, 1, r, d),
        keys,
        masks,
        visual.repeat_interleave(h, dim=0),
        row_weights.repeat_interleave(h, dim=0),
        float(scaling),
        float(softcap),
    )
    return ratios.view(b, h)


def layer_gains(ratios: torch.Tensor, has_visual: torch.Tensor, rule: LayerRule) -> torch.Tensor:
    """(B, H) float32 gains of one layer from its (B, H) float32 ratios and (B,) bool
    ``has_visual``, by ``rule`` (for the random-heads control, head h gets the gain the rule
    gives head ``rule.order[h]``)."""
    gains = ops.head_gains(
        ratios,
        has_visual,
        rule.perception_threshold,
        rule.reasoning_threshold,
        rule.perception_gain,
        rule.reasoning_gain,
        rule.neutral_gain,
    )
    if rule.order is not None:
        gains = gains.index_select(1, _order_index(rule.order, gains.device))
    return gains


@functools.lru_cache(maxsize=4096)
def _order_index(order: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(H,) int64 ``order`` on ``device``, made once (a tensor made from a list at every layer
    and step would be a host-to-device copy each time on a GPU)."""
    return torch.tensor(order, dtype=torch.long, device=device)
