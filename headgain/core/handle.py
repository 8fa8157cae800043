"""`attach` and `Handle`: install headgain on a model, run it, and take it off exactly.

headgain registers one attention function per attached model in ``transformers``'
``AttentionInterface`` under a fresh name that wraps the backend the decoder already
uses (eager, sdpa, flash), and points only the decoder's config at it. The wrapper
calls the original backend unchanged, reads S_v for each head, and scales each head's
output (B, N, H, D) in place before the module applies its output projection.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import warnings
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import ops
from .readout import ForwardState, layer_ratios
from .config import HeadGainConfig
from .errors import ArchError, HeadGainError
from .registry import ArchMap, get_arch, resolve_layers

__all__ = ["attach", "borrowed", "Handle", "HeadGainError"]

_VISION_WORDS = ("vision", "visual", "image_encoder", "vit")  # module-name prefixes of vision towers
_names = itertools.count(1)


def attach(
    model: nn.Module,
    arch_map: ArchMap | str | None = None,
    cfg: HeadGainConfig | str | Mapping[str, Any] | None = None,
) -> "Handle":
    """Attach functional-head rescaling to ``model``'s language decoder.

    Args:
        model: a ``transformers`` model (for example ``Qwen2_5_VLForConditionalGeneration``);
            call this model (``model(...)`` or ``model.generate(...)``) afterwards.
        arch_map: an `ArchMap`, the name of a registered one, or None to look it up by
            ``model.config.model_type``.
        cfg: a `HeadGainConfig`, a preset name, a dict of fields, or None (preset
            ``ocean-r1-7b``).

    Returns:
        A `Handle`; ``handle.detach()`` (or leaving its ``with`` block) restores the model.

    Everything is validated before the model is touched: on error the model is unchanged.
    """
    cfg = HeadGainConfig.coerce(cfg)
    arch = get_arch(model, arch_map)
    if getattr(model, "_headgain_handle", None) is not None:
        raise HeadGainError("headgain is already attached to this model; call handle.detach() before attaching again")
    layers = resolve_layers(model, arch)
    text_config = _text_config(model, arch)
    _check_decoder_modules(model, arch, layers, text_config)
    num_heads = _num_heads(arch, text_config)
    head_dim = _check_heads(arch, layers, text_config, num_heads)
    cfg.check_layers(len(layers))
    impl = text_config._attn_implementation or "eager"
    if impl == "flex_attention" or impl.startswith("paged"):
        raise HeadGainError(
            f"attention implementation {impl!r} is not supported; load the model with attn_implementation='sdpa', "
            "'eager' or a flash attention backend"
        )
    if impl not in ALL_ATTENTION_FUNCTIONS and impl != "eager":
        raise HeadGainError(f"attention implementation {impl!r} is not registered in transformers' AttentionInterface")
    originals = [_original_function(module, impl) for _, module in layers]
    visual_ids = _visual_ids(model, arch, text_config)
    return Handle(model, arch, cfg, layers, text_config, impl, originals, visual_ids, num_heads, head_dim)


@contextlib.contextmanager
def borrowed(model: nn.Module, arch_map=None, cfg: HeadGainConfig | None = None, enabled: bool = True) -> Iterator["Handle"]:
    """The model's handle, or a temporary attachment when it has none, for one block.

    ``cfg`` (when given) and ``enabled`` are set for the block; on exit a temporary handle
    is detached and an existing one gets its own config and state back, even on error.
    """
    handle = getattr(model, "_headgain_handle", None)
    temporary = handle is None
    if temporary:
        # layer bounds of 0 fit a decoder of any depth
        handle = attach(model, arch_map, cfg if cfg is not None else HeadGainConfig(l_perc=0, l_reas=0))
    saved = handle.cfg, handle.enabled
    try:
        if cfg is not None and not temporary:  # a temporary handle was attached with it
            handle.cfg = cfg
        handle.enabled = enabled
        yield handle
    finally:
        if temporary:
            handle.detach()
        else:
            handle.cfg, handle.enabled = saved


class Handle:
    """A live attachment of headgain to one model.

    Attributes read after a forward pass (prefill or one decoding step):
        last_ratios: (L, B, H) float32 on the CPU, S_v of every head at i*.
        last_gains: (L, B, H) float32 on the CPU, the gains applied.
    """

    def __init__(self, model, arch, cfg, layers, text_config, impl, originals, visual_ids, num_heads, head_dim):
        self.model = model
        self.arch = arch
        self.num_layers = len(layers)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.layer_names = [name for name, _ in layers]
        self._layer_of = {id(module): i for i, (_, module) in enumerate(layers)}
        self._modules = [module for _, module in layers]
        self._originals = originals
        self._text_config = text_config
        self._impl = impl
        self._visual_ids = torch.tensor(sorted(visual_ids), dtype=torch.long) if visual_ids else None
        self._visual_ids_by_device: dict = {}
        self._user_mask: torch.Tensor | None = None
        self._state: ForwardState | None = None
        self._live = False
        self._calls = 0
        self._ratios: list[torch.Tensor | None] = [None] * self.num_layers
        self._gains: list[torch.Tensor | None] = [None] * self.num_layers
        self._warned_no_visual = False
        self.enabled = True
        self._gates: list[torch.Tensor] | None = None
        self._set_cfg(cfg)

        self._name = f"headgain{next(_names)}_{impl}"
        ALL_ATTENTION_FUNCTIONS.register(self._name, self._attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(self._name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
        text_config._attn_implementation = self._name
        self._hooks = [
            model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            model.register_forward_hook(self._post_forward, always_call=True),
        ]
        model._headgain_handle = self
        self.attached = True

    # ------------------------------------------------------------------ public API
    @property
    def cfg(self) -> HeadGainConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, value) -> None:
        self._set_cfg(HeadGainConfig.coerce(value))

    @property
    def last_ratios(self) -> torch.Tensor | None:
        """(L, B, H) float32 on the CPU: S_v at i* in the most recent forward pass (None before any)."""
        return self._stacked(self._ratios)

    @property
    def last_gains(self) -> torch.Tensor | None:
        """(L, B, H) float32 on the CPU: gains applied in the most recent forward pass (None before any)."""
        return self._stacked(self._gains)

    @property
    def last_has_visual(self) -> torch.Tensor | None:
        """(B,) bool on the CPU: which samples of the most recent forward pass hold visual tokens."""
        return None if self._state is None else self._state.has_visual.cpu()

    def set_visual_mask(self, mask: torch.Tensor | None) -> None:
        """Mark visual positions by hand, for inputs without visual token ids (``inputs_embeds``).

        Args:
            mask: (B, N) bool (or 0/1 integers) over the prompt of the next forward passes
                that start a new prompt; it must match their batch size and length. Tokens
                added while decoding are text unless their ids are visual ids. None clears
                it and goes back to token ids.
        """
        if mask is None:
            self._user_mask = None
            return
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask)
        if mask.dim() != 2:
            raise HeadGainError(f"visual mask must be 2-D (batch, sequence), got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
                raise HeadGainError(f"visual mask must be bool or hold only 0 and 1, got dtype {mask.dtype}")
            mask = mask.bool()
        self._user_mask = mask

    def detach(self) -> None:
        """Restore the model exactly as it was before `attach`; calling it again does nothing."""
        if not self.attached:
            return
        for hook in self._hooks:
            hook.remove()
        self._text_config._attn_implementation = self._impl
        ALL_ATTENTION_FUNCTIONS._global_mapping.pop(self._name, None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(self._name, None)
        if getattr(self.model, "_headgain_handle", None) is self:
            del self.model._headgain_handle
        self._state = None
        self.attached = False

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (
            f"Handle({state}, {type(self.model).__name__}, layers={self.num_layers}, heads={self.num_heads}, "
            f"backend={self._impl!r}, enabled={self.enabled}, cfg={self._cfg})"
        )

    # ------------------------------------------------------------------ internals
    def _set_cfg(self, cfg: HeadGainConfig) -> None:
        cfg.check_layers(self.num_layers)
        gains = cfg.class_gains()
        self._layer_params = [
            (
                cfg.tau_perc if layer <= cfg.l_perc else 2.0,
                cfg.tau_reas if layer >= cfg.l_reas else -1.0,
                gains["perception"],
                gains["reasoning"],
                gains["neutral"],
            )
            for layer in range(self.num_layers)
        ]
        self._cfg = cfg

    @staticmethod
    def _stacked(items: list) -> torch.Tensor | None:
        if any(t is None for t in items):
            return None
        return torch.stack(items).float().cpu()

    def _ids_on(self, device: torch.device) -> torch.Tensor:
        ids = self._visual_ids_by_device.get(device)
        if ids is None:
            ids = self._visual_ids_by_device[device] = self._visual_ids.to(device)
        return ids

    def _pre_forward(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        source = input_ids if input_ids is not None else embeds
        if source is None:
            raise HeadGainError("headgain needs input_ids or inputs_embeds in the model call")
        batch, length = source.shape[:2]
        device = source.device
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        new_prompt = past == 0
        previous = None
        if not new_prompt:
            previous = self._state.visual if self._state is not None else None
            if previous is None or previous.shape != (batch, past):
                seen = "nothing" if previous is None else f"{tuple(previous.shape)} (batch, tokens)"
                raise HeadGainError(
                    f"the cache holds {past} tokens for a batch of {batch}, but headgain saw {seen} for this prompt; "
                    "run the whole prompt through the attached model (attach before the prefill)"
                )
        if new_prompt and self._user_mask is not None:
            if tuple(self._user_mask.shape) != (batch, length):
                raise HeadGainError(
                    f"visual mask has shape {tuple(self._user_mask.shape)} but the prompt is {(batch, length)} "
                    "(batch, sequence); call handle.set_visual_mask with a mask for this input, or "
                    "set_visual_mask(None) to detect visual tokens from their ids"
                )
            current = self._user_mask.to(device)
        elif input_ids is not None and self._visual_ids is not None:
            current = torch.isin(input_ids, self._ids_on(device))
        else:
            current = torch.zeros((batch, length), dtype=torch.bool, device=device)
        mask = kwargs.get("attention_mask")
        valid = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            valid = mask[:, -length:].to(device=device, dtype=torch.bool)
        self._state = ForwardState.build(current, valid, previous, self._cfg.query)
        if new_prompt and not self._warned_no_visual and not bool(self._state.has_visual.all()):
            self._warned_no_visual = True
            warnings.warn(
                "headgain found no visual tokens in at least one sample; those samples are left untouched (gain 1). "
                "Pass images through the processor, or mark visual positions with handle.set_visual_mask(mask).",
                RuntimeWarning,
                stacklevel=2,
            )
        self._calls = 0
        self._live = True

    def _post_forward(self, module, args, output):
        self._live = False
        if output is not None and self._calls != self.num_layers:  # None: the forward raised
            raise HeadGainError(
                f"only {self._calls} of {self.num_layers} decoder layers went through transformers' attention "
                f"interface in this call of {type(self.model).__name__}; headgain cannot act on attention modules "
                "that call their kernels directly (remote code may need a transformers-native port)"
            )

    def _attention(self, module, query, key, value, attention_mask, **kwargs):
        layer = self._layer_of.get(id(module))
        if layer is None:
            return _original_function(module, self._impl)(module, query, key, value, attention_mask, **kwargs)
        out, weights = self._originals[layer](module, query, key, value, attention_mask, **kwargs)
        if not self._live or self._state is None:
            raise HeadGainError(
                f"decoder layer {layer} ran outside a call of the attached {type(self.model).__name__}; "
                "call the model headgain was attached to, not one of its submodules"
            )
        state = self._state
        self._calls += 1
        if query.shape[2] != state.num_queries:
            raise HeadGainError(
                f"decoder layer {layer} received {query.shape[2]} query positions but the model call had "
                f"{state.num_queries}; headgain supports one attention call per layer over the whole input"
            )
        with torch.no_grad():
            ratios = layer_ratios(state, module, query, key, attention_mask, weights, kwargs)
            if self.enabled:
                gains = ops.head_gains(ratios, state.has_visual, *self._layer_params[layer])
            else:
                gains = torch.ones_like(ratios)
        self._ratios[layer] = ratios
        heads = out.view(out.shape[0], out.shape[1], self.num_heads, -1) if out.dim() == 3 else out
        if self._gates is not None:
            heads = ops.scale_heads(heads, gains * self._gates[layer])
            out = heads.view(out.shape)
        elif self.enabled:
            if torch.is_grad_enabled() and heads.requires_grad:
                out = ops.scale_heads(heads, gains).view(out.shape)
            else:
                ops.scale_heads_(heads, gains)
        self._gains[layer] = gains
        return out, weights


# ---------------------------------------------------------------------- validation helpers
def _text_config(model, arch: ArchMap):
    config = getattr(model, "config", None)
    if config is None:
        raise ArchError(f"{type(model).__name__} has no .config; headgain attaches to transformers models")
    if arch.text_config:
        text = getattr(config, arch.text_config, None)
        if text is None:
            raise ArchError(f"model.config has no attribute {arch.text_config!r} (ArchMap.text_config)")
        return text
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_decoder_modules(model, arch: ArchMap, layers, text_config) -> None:
    names = [name for name, _ in layers]
    in_vision = [n for n in names if any(part.startswith(_VISION_WORDS) for part in n.lower().split("."))]
    if len(in_vision) == len(names):
        raise ArchError(
            f"attention path {arch.attention!r} matches vision-tower modules only ({names[0]}, ...); point it at the "
            "language decoder, for example 'model.language_model.layers.*.self_attn'"
        )
    for name, module in layers:
        if getattr(module, "config", None) is not text_config:
            raise ArchError(
                f"module {name} ({type(module).__name__}) does not use the decoder config; headgain needs the "
                "decoder's attention modules, which read config._attn_implementation (check ArchMap.attention "
                "and ArchMap.text_config)"
            )
    expected = getattr(text_config, "num_hidden_layers", None)
    if expected is not None and expected != len(layers):
        raise ArchError(
            f"attention path {arch.attention!r} matched {len(layers)} modules but the decoder has {expected} layers"
        )


def _num_heads(arch: ArchMap, text_config) -> int:
    value = getattr(text_config, arch.num_heads, None)
    if not isinstance(value, int) or value <= 0:
        raise ArchError(f"decoder config has no positive integer {arch.num_heads!r} (ArchMap.num_heads), got {value!r}")
    return value


def _check_heads(arch: ArchMap, layers, text_config, num_heads: int) -> int:
    head_dim = getattr(text_config, arch.head_dim, None)
    for name, module in layers:
        proj = getattr(module, arch.o_proj, None)
        width = getattr(proj, "in_features", None)
        if width is None:
            raise ArchError(f"module {name} has no linear {arch.o_proj!r} (ArchMap.o_proj) with in_features")
        if width % num_heads != 0 or (head_dim is not None and head_dim * num_heads != width):
            detail = f" x head_dim {head_dim}" if head_dim is not None else ""
            raise ArchError(
                f"{num_heads} heads{detail} do not divide {name}.{arch.o_proj} input width {width}; check "
                f"ArchMap.num_heads ({arch.num_heads!r}) and ArchMap.head_dim ({arch.head_dim!r})"
            )
    return head_dim if head_dim is not None else width // num_heads


def _original_function(module: nn.Module, impl: str):
    if impl != "eager":
        return ALL_ATTENTION_FUNCTIONS[impl]
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise HeadGainError(
            f"{type(module).__name__} is set to eager attention but its modeling module defines no "
            "eager_attention_forward; load the model with attn_implementation='sdpa'"
        )
    return fn


def _visual_ids(model, arch: ArchMap, text_config) -> list[int]:
    ids = []
    for name in arch.visual_token_ids:
        for config in (model.config, text_config):
            value = getattr(config, name, None)
            if value is None and name.endswith("_id"):
                value = getattr(config, name[:-3] + "_index", None)
            if isinstance(value, int):
                ids.append(value)
                break
    if arch.visual_token_ids and not ids:
        raise ArchError(
            f"none of the visual token id attributes {list(arch.visual_token_ids)} (ArchMap.visual_token_ids) is set "
            "on model.config; name the right attributes, or use visual_token_ids=() with handle.set_visual_mask"
        )
    return sorted(set(ids))
