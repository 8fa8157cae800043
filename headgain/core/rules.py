"""The head-class rule, in one place: which heads are perception, reasoning or neutral heads.

Layer indices are 0-based decoder layer indices (the ``layer_idx`` that ``transformers``
gives each decoder layer). With S_v(l, h) the share of attention that head h of layer l
puts on visual tokens, head h of layer l is

* a perception head when ``l <= l_perc`` and ``S_v >= tau_perc``;
* a reasoning head when ``l >= l_reas`` and ``S_v <= tau_reas``;
* a neutral head otherwise.

``tau_reas < tau_perc`` (checked by `HeadGainConfig`) keeps the two classes disjoint. The
config, the handle, the census, the plots and the ops' reference all classify through
this module.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .config import HeadGainConfig

__all__ = [
    "HeadClass",
    "CLASS_NAMES",
    "LayerRule",
    "head_order",
    "layer_rules",
    "classify",
    "classify_tensor",
    "selected_heads",
]


class HeadClass(enum.IntEnum):
    """The class of one head; the values are the codes `classify` returns."""

    NEUTRAL = 0
    PERCEPTION = 1
    REASONING = 2

    @property
    def label(self) -> str:
        """The class name used in configs and reports: "neutral", "perception", "reasoning"."""
        return self.name.lower()


#: Class names in the order of their codes: CLASS_NAMES[HeadClass.PERCEPTION] == "perception".
CLASS_NAMES: tuple[str, ...] = tuple(c.label for c in HeadClass)


@dataclass(frozen=True)
class LayerRule:
    """How one decoder layer classifies and scales its heads under one config.

    Attributes:
        layer: 0-based decoder layer index.
        perception_threshold: S_v >= this marks a perception head; +inf when the layer
            lies above ``l_perc`` (it holds no perception head).
        reasoning_threshold: S_v <= this marks a reasoning head; -inf when the layer
            lies below ``l_reas``.
        perception_gain, reasoning_gain, neutral_gain: the gain each class receives
            (from the config's strategy).
        order: None for the method; for the random-heads control (``shuffle_seed``) a
            permutation of the layer's heads: head h receives the gain the rule gives head
            ``order[h]``.
    """

    layer: int
    perception_threshold: float
    reasoning_threshold: float
    perception_gain: float
    reasoning_gain: float
    neutral_gain: float
    order: tuple[int, ...] | None = None

    @property
    def gain_of(self) -> dict[HeadClass, float]:
        return {
            HeadClass.NEUTRAL: self.neutral_gain,
            HeadClass.PERCEPTION: self.perception_gain,
            HeadClass.REASONING: self.reasoning_gain,
        }


def head_order(seed: int, layer: int, num_heads: int) -> tuple[int, ...]:
    """The random-heads control's permutation of the ``num_heads`` heads of decoder layer
    ``layer`` under ``shuffle_seed`` ``seed`` (deterministic)."""
    return tuple(random.Random(f"headgain-shuffle-{seed}-{layer}").sample(range(num_heads), num_heads))


def layer_rules(
    cfg: HeadGainConfig, layer_indices: Sequence[int], num_heads: int | None = None
) -> tuple[LayerRule, ...]:
    """One `LayerRule` per decoder layer in ``layer_indices`` (0-based decoder layer indices);
    ``num_heads`` is needed for a config with ``shuffle_seed`` (see `head_order`)."""
    gains = cfg.class_gains()
    if cfg.shuffle_seed is not None and num_heads is None:
        raise ValueError("a config with shuffle_seed needs num_heads to permute the heads")
    return tuple(
        LayerRule(
            layer=int(layer),
            perception_threshold=cfg.tau_perc if layer <= cfg.l_perc else math.inf,
            reasoning_threshold=cfg.tau_reas if layer >= cfg.l_reas else -math.inf,
            perception_gain=gains["perception"],
            reasoning_gain=gains["reasoning"],
            neutral_gain=gains["neutral"],
            order=None if cfg.shuffle_seed is None else head_order(cfg.shuffle_seed, int(layer), num_heads),
        )
        for layer in layer_indices
    )


def classify_tensor(ratios: torch.Tensor, perception_threshold, reasoning_threshold) -> torch.Tensor:
    """Class codes (`HeadClass` values, int8) of S_v values under one pair of thresholds.

    Args:
        ratios: any shape, floating.
        perception_threshold, reasoning_threshold: floats, or tensors broadcastable to
            ``ratios`` (one value per layer, for example).
    """
    out = torch.zeros(ratios.shape, dtype=torch.int8, device=ratios.device)
    out = torch.where(ratios <= reasoning_threshold, int(HeadClass.REASONING), out)
    return torch.where(ratios >= perception_threshold, int(HeadClass.PERCEPTION), out).to(torch.int8)


def classify(ratios, cfg: HeadGainConfig, layer_indices: Sequence[int] | None = None) -> np.ndarray:
    """Head classes of (..., L, H) S_v values under ``cfg``.

    Args:
        ratios: (..., L, H) numpy array or tensor of S_v of samples that hold visual tokens.
        cfg: the config whose thresholds and layer bounds apply.
        layer_indices: the decoder layer index of each of the L rows (default 0..L-1).

    Returns:
        (..., L, H) int8 numpy array of `HeadClass` codes.
    """
    r = torch.as_tensor(np.asarray(ratios, dtype=np.float64))
    layers = range(r.shape[-2]) if layer_indices is None else layer_indices
    rules = layer_rules(cfg, layers, r.shape[-1])
    perc = torch.tensor([rule.perception_threshold for rule in rules], dtype=torch.float64)[:, None]
    reas = torch.tensor([rule.reasoning_threshold for rule in rules], dtype=torch.float64)[:, None]
    out = classify_tensor(r, perc, reas)
    if cfg.shuffle_seed is not None:  # the random-heads control: the classes of the heads rescaled
        index = torch.tensor([rule.order for rule in rules]).expand(out.shape)
        out = out.gather(-1, index)
    return out.numpy()


def selected_heads(classes) -> list[tuple[list[int], list[int]]]:
    """(perception heads, reasoning heads) of every layer of (L, H) class codes."""
    rows = np.asarray(classes)
    return [
        (
            [int(h) for h in np.flatnonzero(row == HeadClass.PERCEPTION)],
            [int(h) for h in np.flatnonzero(row == HeadClass.REASONING)],
        )
        for row in rows
    ]
