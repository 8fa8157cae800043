"""Folded gains: a fixed (layers, heads) gain table multiplied into the output projections.

Scaling head h's output O_h by g before the output projection W_O is the same as scaling
the columns of W_O that read head h: ``Concat(g_h O_h) W_O^T = Concat(O_h) (W_O diag(g))^T``
(the bias is untouched). A model with folded gains runs in any engine (vLLM, SGLang, TGI,
ONNX) at zero cost, with a fixed head set instead of the per-token selection of `attach`.
The table is also written to ``model.config.headgain_folded_gains`` (when the model has a
config), so ``save_pretrained`` keeps it beside the folded weights and `unfold_gains` can
undo it after ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .archmap import ArchMap
from .decoder import ResolvedDecoder
from .errors import HeadGainError
from .registry import is_transformers_model, resolve

__all__ = ["fold_gains", "unfold_gains", "FoldedGains", "CONFIG_KEY"]

CONFIG_KEY = "headgain_folded_gains"


class FoldedGains:
    """The result of `fold_gains`: ``unfold()`` restores the original weights exactly (the
    columns it changed were kept), where `unfold_gains` can only divide (up to rounding).

    Attributes:
        table: (L, H) float32 on the CPU, the gains folded in.
        folded: whether the gains are in the weights now.
    """

    def __init__(self, model: nn.Module, decoder: ResolvedDecoder, table: torch.Tensor, saved: list):
        self.model, self.decoder, self.table = model, decoder, table
        self._saved = saved  # per layer: (column indices, their original values)
        self.folded = True

    def unfold(self) -> None:
        """Put the original columns back, bit for bit; calling it again does nothing."""
        if not self.folded:
            return
        with torch.no_grad():
            for layer, (columns, values) in zip(self.decoder.layers, self._saved):
                if columns is not None:
                    layer.o_proj.weight[:, columns] = values.to(layer.o_proj.weight.device)
        _forget_table(self.model)
        self.folded = False

    def __repr__(self) -> str:
        changed = int((self.table != 1).sum())
        return f"FoldedGains({'folded' if self.folded else 'unfolded'}, {changed} of {self.table.numel()} heads != 1)"


def fold_gains(model: nn.Module, gains, arch_map: ArchMap | str | None = None) -> FoldedGains:
    """Multiply each decoder head's ``o_proj`` input columns by its gain.

    Args:
        model: a ``transformers`` model or a plain PyTorch model (then ``arch_map`` names
            its attention modules).
        gains: (L, H) gains (tensor, array or nested lists), L decoder layers x H heads, each
            finite and > 0; heads with gain 1 are left untouched. `Census.static_gains`
            makes one from a census.
        arch_map: as in `headgain.attach`.

    Returns:
        A `FoldedGains` whose ``unfold()`` restores the weights exactly.
    """
    decoder = resolve(model, arch_map)
    table = _table(gains, decoder)
    if _stored_table(model) is not None:
        raise HeadGainError(
            f"this model already holds folded gains (model.config.{CONFIG_KEY}); unfold them first "
            "(headgain.unfold_gains(model)) or fold the product of both tables once"
        )
    d = decoder.head_dim
    saved = []
    with torch.no_grad():
        for layer, row in zip(decoder.layers, table):
            weight = layer.o_proj.weight
            changed = torch.nonzero(row != 1).flatten()
            if changed.numel() == 0:
                saved.append((None, None))
                continue
            columns = (changed[:, None] * d + torch.arange(d)[None]).flatten().to(weight.device)
            saved.append((columns, weight[:, columns].detach().cpu().clone()))
            scale = row.repeat_interleave(d).to(device=weight.device)[columns]
            weight[:, columns] = (weight[:, columns].float() * scale).to(weight.dtype)
    _store_table(model, table)
    return FoldedGains(model, decoder, table, saved)


def unfold_gains(model: nn.Module, arch_map: ArchMap | str | None = None) -> torch.Tensor:
    """Divide the folded gains back out of a model (for example one reloaded with
    ``from_pretrained``), up to rounding; returns the (L, H) table that was folded."""
    stored = _stored_table(model)
    if stored is None:
        raise HeadGainError(
            f"this model holds no folded gains (no model.config.{CONFIG_KEY}); nothing to unfold. A model folded "
            "without a config keeps its table only in the FoldedGains that fold_gains returned: call its unfold()"
        )
    decoder = resolve(model, arch_map)
    table = _table(stored, decoder)
    d = decoder.head_dim
    with torch.no_grad():
        for layer, row in zip(decoder.layers, table):
            weight = layer.o_proj.weight
            scale = row.repeat_interleave(d).to(device=weight.device)
            weight.copy_((weight.float() / scale).to(weight.dtype))
    _forget_table(model)
    return table


def _table(gains, decoder: ResolvedDecoder) -> torch.Tensor:
    try:
        table = torch.as_tensor(gains, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError) as e:
        raise HeadGainError(f"gains must be an (L, H) table of numbers: {e}") from None
    expected = (decoder.num_layers, decoder.num_heads)
    if tuple(table.shape) != expected:
        raise HeadGainError(
            f"gains have shape {tuple(table.shape)} but the decoder has {expected[0]} layers x {expected[1]} heads"
        )
    if not bool(torch.isfinite(table).all()) or not bool((table > 0).all()):
        raise HeadGainError("gains must be finite and > 0 (1 leaves a head as it is)")
    for layer in decoder.layers:
        weight = getattr(layer.o_proj, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise HeadGainError(
                f"{layer.name}'s output projection has no floating-point weight (quantized?); fold gains into the "
                "unquantized model, then quantize"
            )
    return table


def _stored_table(model: nn.Module):
    if is_transformers_model(model):
        return getattr(model.config, CONFIG_KEY, None)
    return model.__dict__.get("_" + CONFIG_KEY)


def _store_table(model: nn.Module, table: torch.Tensor) -> None:
    rows: Sequence = table.tolist()
    if is_transformers_model(model):
        setattr(model.config, CONFIG_KEY, rows)
    else:
        model.__dict__["_" + CONFIG_KEY] = rows


def _forget_table(model: nn.Module) -> None:
    if is_transformers_model(model) and hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    model.__dict__.pop("_" + CONFIG_KEY, None)
