"""headgain on plain PyTorch models: read at ``scaled_dot_product_attention``, scale at ``o_proj``.

Research code computes attention with ``torch.nn.functional.scaled_dot_product_attention``
(SDPA). For each matched attention module, a forward pre-hook enters a
``TorchFunctionMode`` for the duration of the module's forward (modes are per thread).
The mode lets every call through unchanged, and at the module's SDPA call reads S_v from
the queries and keys SDPA receives, with its ``attn_mask`` or ``is_causal`` and ``scale``.
A forward pre-hook on the module's output projection then scales each head's slice of
its input (B, N, H * D). `Handle.detach` removes every hook: the model is as before.

i* is the last position of the sequence (pad prompts on the left). The visual positions
come from ``Handle.set_visual_mask`` or, when the `ArchMap` gives integer
``visual_token_ids``, from the token ids the model is called with.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.archmap import ArchMap
from ..core.decoder import ResolvedDecoder, head_layout, match_layers
from ..core.errors import ArchError, HeadGainError
from ..core.readout import layer_ratios

__all__ = ["resolve", "SDPAAdapter"]

_SDPA = torch.nn.functional.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def resolve(model: nn.Module, arch: ArchMap) -> ResolvedDecoder:
    """The checked decoder of a plain PyTorch model under ``arch``."""
    found = match_layers(model, arch)
    module = found[0][2]
    num_heads = arch.num_heads
    if isinstance(num_heads, str):
        num_heads = getattr(module, num_heads, None)
        if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
            raise ArchError(
                f"{type(model).__name__} is a plain PyTorch model (no transformers config) and its attention module "
                f"{found[0][1]} has no integer attribute {arch.num_heads!r}; give the number of query heads as an "
                "integer: ArchMap(..., num_heads=8)"
            )
    if isinstance(arch.head_dim, str) and arch.head_dim != "head_dim":
        raise ArchError(
            f"a plain PyTorch model has no config: give ArchMap.head_dim as an integer or None, not {arch.head_dim!r}"
        )
    head_dim = arch.head_dim if isinstance(arch.head_dim, int) else None
    names = [v for v in arch.visual_token_ids if isinstance(v, str)]
    if names and names != ["image_token_id", "video_token_id"]:  # the default names mean "no ids given" here
        raise ArchError(
            f"a plain PyTorch model has no config to read {names} from; give visual_token_ids as integer ids, or "
            "visual_token_ids=() and mark visual positions with handle.set_visual_mask(mask)"
        )
    layers, head_dim = head_layout(arch, found, num_heads, head_dim)
    ids = tuple(sorted({v for v in arch.visual_token_ids if isinstance(v, int)}))
    return ResolvedDecoder(tuple(layers), num_heads, head_dim, ids, "torch", "sdpa", None, ("",))


def _rows(attn_mask, is_causal: bool, num_queries: int, num_keys: int):
    """The mask rows of the rows a `ForwardState` recomputes, from SDPA's own mask arguments."""

    def rows(state):
        index = state.row_index
        b = state.visual.shape[0]
        if attn_mask is not None:
            m = attn_mask
            while m.dim() < 4:
                m = m.unsqueeze(0)
            m = m.expand(b, m.shape[1], num_queries, num_keys)
            if index is not None:
                m = m.gather(2, index[:, None, None, None].expand(b, m.shape[1], 1, num_keys))
            return m[:, 0] if m.shape[1] == 1 else m
        if not is_causal:
            return None
        # SDPA's causal mask is aligned to the top left: query i attends keys j <= i
        queries = index[:, None] if index is not None else torch.arange(num_queries, device=state.visual.device)[None]
        keys = torch.arange(num_keys, device=state.visual.device)
        return keys[None, None, :] <= queries[:, :, None]

    return rows


class _Reader(TorchFunctionMode):
    """Active during one attention module's forward: reads S_v at its SDPA call."""

    def __init__(self, handle, position: int, module: nn.Module):
        super().__init__()
        self.handle, self.position, self.module = handle, position, module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is not _SDPA:
            return out
        bound = dict(zip(_SDPA_ARGS, args), **kwargs)
        query, key = bound["query"], bound["key"]
        if query.dim() != 4 or key.dim() != 4:
            raise HeadGainError(
                f"headgain reads scaled_dot_product_attention with 4-D queries and keys (batch, heads, sequence, "
                f"dim); {self.module.__class__.__name__} passed {tuple(query.shape)} and {tuple(key.shape)}"
            )
        if query.shape[1] != self.handle.num_heads:
            raise HeadGainError(
                f"the scaled_dot_product_attention call of decoder layer {self.position} has {query.shape[1]} query "
                f"heads but ArchMap.num_heads is {self.handle.num_heads}"
            )
        local = self.handle._local
        if local.owner is not None:
            self.handle._sized(query.shape[0], key.shape[2])
        scale = bound.get("scale")
        rows = _rows(bound.get("attn_mask"), bool(bound.get("is_causal", False)), query.shape[2], key.shape[2])
        scaling = float(scale if scale is not None else query.shape[-1] ** -0.5)
        gains = self.handle._layer_gains(
            self.position,
            self.module,
            query,
            key,
            lambda state: layer_ratios(state, query, key, scaling=scaling, mask_rows=rows(state)),
        )
        local.pending[self.position] = gains
        return out


class _Enter:
    """Forward pre-hook of an attention module: enter its `_Reader` (per thread)."""

    def __init__(self, handle, position: int):
        self.handle, self.position = handle, position

    def __call__(self, module, args):
        reader = _Reader(self.handle, self.position, module)
        self.handle._local.readers.setdefault(self.position, []).append(reader)
        reader.__enter__()


class _Exit:
    """Forward hook (always called) of an attention module: leave its `_Reader`."""

    def __init__(self, handle, position: int):
        self.handle, self.position = handle, position

    def __call__(self, module, args, output):
        local = self.handle._local
        stack = local.readers.get(self.position)
        if stack:
            stack.pop().__exit__(None, None, None)
        local.pending.pop(self.position, None)


class _ScaleInput:
    """Forward pre-hook of an output projection: scale each head's slice of its input."""

    def __init__(self, handle, position: int):
        self.handle, self.position = handle, position

    def __call__(self, module, args):
        local = self.handle._local
        if self.position not in local.pending:  # this forward made no SDPA call: the pass check reports it
            return None
        gains = local.pending.pop(self.position)
        x = args[0]
        h = self.handle.num_heads
        if x.dim() < 2 or x.shape[-1] != h * self.handle.head_dim:
            raise HeadGainError(
                f"the output projection of decoder layer {self.position} received shape {tuple(x.shape)}; headgain "
                f"expects (..., {h} heads x {self.handle.head_dim})"
            )
        if x.dim() != 3:
            raise HeadGainError(
                f"the output projection of decoder layer {self.position} received a {x.dim()}-D input; headgain "
                "scales a (batch, sequence, heads x dim) input"
            )
        heads = x.unflatten(-1, (h, self.handle.head_dim))
        scaled = self.handle._scale(self.position, heads, gains)
        return (scaled.flatten(-2),) + tuple(args[1:])


class SDPAAdapter:
    """Installs and removes headgain on one plain PyTorch model (see the module docstring)."""

    route = "torch.nn.functional.scaled_dot_product_attention"
    bypass_hint = "Each matched attention module must call scaled_dot_product_attention once per forward."

    def install(self, handle) -> None:
        for position, layer in enumerate(handle.decoder.layers):
            handle._add_hook(layer.module.register_forward_pre_hook(_Enter(handle, position)))
            handle._add_hook(layer.module.register_forward_hook(_Exit(handle, position), always_call=True))
            handle._add_hook(layer.o_proj.register_forward_pre_hook(_ScaleInput(handle, position)))
        handle._watch([handle.model])

    def uninstall(self, handle) -> None:
        """Nothing beyond the hooks, which the handle removes."""

    def restore(self, handle) -> None:
        """Nothing to register after unpickling."""

    def entry_names(self, handle) -> str:
        return type(handle.model).__name__
