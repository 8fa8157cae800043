"""headgain on ``transformers`` models: through the attention interface, per attached model.

``transformers`` attention modules look their attention function up by
``self.config._attn_implementation`` in ``ALL_ATTENTION_FUNCTIONS``. headgain registers,
once per backend, a stateless dispatcher under ``headgain_<backend>`` (with the backend's
mask function under the same name), and gives each decoder attention module of the
attached model its own shallow copy of the decoder config that names it. No config object
is changed, so the vision and audio towers, other models that share the config object,
and the model's mask creation keep their backend. The dispatcher finds the layer's
`Handle` through an attribute of the module, runs the original backend unchanged, reads
S_v, and scales each head's output (B, N, H, D) before the module's output projection.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..core import ops
from ..core.archmap import ArchMap
from ..core.decoder import (
    ResolvedDecoder,
    attribute_path,
    entry_paths,
    head_layout,
    match_layers,
    visual_token_ids,
)
from ..core.errors import ArchError, HeadGainError
from ..core.readout import layer_ratios

__all__ = ["resolve", "TransformersAdapter", "PREFIX"]

PREFIX = "headgain_"  # registered names are PREFIX + the wrapped backend's name
_SITE = "_headgain_site"  # attribute of each attached attention module
_FUNCTIONS_READING_CONFIG = ("sdpa", "eager")  # backends called with the module itself (others get a view)


# ---------------------------------------------------------------------- resolution
def resolve(model: nn.Module, arch: ArchMap) -> ResolvedDecoder:
    """The checked decoder of a ``transformers`` model under ``arch``."""
    config = model.config
    _refuse_layouts(model, config)
    text_config = _text_config(config, arch)
    found = match_layers(model, arch)
    for _, name, module in found:
        if getattr(module, "config", None) is not text_config:
            raise ArchError(
                f"module {name} ({type(module).__name__}) does not use the decoder config; headgain needs the "
                "decoder's attention modules, which read config._attn_implementation (check ArchMap.attention "
                "and ArchMap.text_config)"
            )
    expected = getattr(text_config, "num_hidden_layers", None)
    if isinstance(expected, int) and expected != len(found):
        raise ArchError(
            f"attention path {arch.attention!r} matched {len(found)} modules but the decoder has {expected} layers"
        )
    num_heads = _config_int(text_config, arch.num_heads, "num_heads", required=True)
    head_dim = _config_int(text_config, arch.head_dim, "head_dim", required=False)
    layers, head_dim = head_layout(arch, found, num_heads, head_dim)
    backend = text_config._attn_implementation or "eager"
    if backend.startswith(PREFIX):
        raise HeadGainError("headgain is already attached to this model's decoder; detach that handle first")
    if backend == "flex_attention" or backend.startswith("paged"):
        raise HeadGainError(
            f"attention implementation {backend!r} is not supported; load the model with attn_implementation='sdpa', "
            "'eager' or a flash attention backend"
        )
    if backend != "eager" and backend not in ALL_ATTENTION_FUNCTIONS:
        raise HeadGainError(
            f"attention implementation {backend!r} is not registered in transformers' AttentionInterface"
        )
    for layer in layers:
        _backend_function(layer.module, backend)  # eager needs the modeling file's function: check now
    entries = tuple(p for p in entry_paths(arch) if p == "" or _has_submodule(model, p))
    return ResolvedDecoder(
        tuple(layers),
        num_heads,
        head_dim,
        visual_token_ids(config, arch, text_config),
        "transformers",
        backend,
        text_config,
        entries,
    )


def _refuse_layouts(model: nn.Module, config) -> None:
    """Layouts without image tokens in the decoder's self-attention: a reason and a remedy."""
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ArchError(
            f"{name} is an encoder-decoder model: the image tokens sit in the encoder's input and the decoder that "
            "generates reads them only through cross-attention, where the paper's S_v (the share of self-attention "
            "on image tokens) is not defined. Use a decoder-only VLM whose decoder holds the image tokens in its "
            "sequence (qwen2_5_vl, llava, gemma3, ...)"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "cross_attention_layers", None):
        raise ArchError(
            f"{name}'s decoder reads the image through cross-attention layers {list(text.cross_attention_layers)}, so "
            "its self-attention never sees image tokens and S_v is zero for every head. Use a VLM whose decoder "
            "holds the image tokens in its sequence (qwen2_5_vl, llava, gemma3, ...)"
        )


def _text_config(config, arch: ArchMap):
    if arch.text_config:
        text = attribute_path(config, arch.text_config)
        if text is None:
            raise ArchError(f"model.config has no attribute path {arch.text_config!r} (ArchMap.text_config)")
        return text
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _config_int(text_config, field, what: str, required: bool) -> int | None:
    if field is None or isinstance(field, int):
        return field
    try:
        value = getattr(text_config, field, None)
    except RuntimeError:  # a per-layer attribute of a heterogeneous config (transformers' per_layer_config)
        value = None
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ArchError(f"decoder config has no positive integer {field!r} (ArchMap.{what}), got {value!r}")
    return value


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _backend_function(module: nn.Module, backend: str):
    """The attention function ``module`` would call under ``backend``."""
    if backend != "eager":
        return ALL_ATTENTION_FUNCTIONS[backend]
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise HeadGainError(
            f"{type(module).__name__} is set to eager attention but its modeling module defines no "
            "eager_attention_forward; load the model with attn_implementation='sdpa'"
        )
    return fn


# ---------------------------------------------------------------------- the dispatcher
def _register(backend: str) -> str:
    """Register (once) the dispatcher for ``backend``; returns its name."""

    name = PREFIX + backend
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        ALL_ATTENTION_FUNCTIONS.register(name, functools.partial(_dispatch, backend))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping and backend in ALL_MASK_ATTENTION_FUNCTIONS:
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[backend])
    return name


def _dispatch(backend: str, module, query, key, value, attention_mask, **kwargs):
    """The attention function of every attached decoder layer (stateless: the layer's
    handle is found through the module)."""
    site = module.__dict__.get(_SITE)
    if site is None:  # a module that reached a routed config without being attached: run the backend as is
        return _backend_function(module, backend)(module, query, key, value, attention_mask, **kwargs)
    return site.handle._adapter.attend(site.handle, site.position, module, query, key, value, attention_mask, kwargs)


class _Site:
    """What an attached attention module knows: its handle and its position in the decoder."""

    __slots__ = ("handle", "position")

    def __init__(self, handle, position: int):
        self.handle, self.position = handle, position

    def __getstate__(self):
        return self.handle, self.position

    def __setstate__(self, state):
        self.handle, self.position = state


class _ConfigView:
    """The attention module as backends that read ``module.config._attn_implementation``
    (flash attention picks its kernel by it) must see it: every attribute is the module's,
    except ``config``, which is the decoder's own config."""

    __slots__ = ("_module", "config")

    def __init__(self, module: nn.Module, config):
        self._module, self.config = module, config

    def __getattr__(self, name):
        return getattr(self._module, name)


class _Generate:
    """``model.generate`` while headgain is attached: remembers the prompt's ``input_ids`` in
    the calling thread, for models whose generate passes only embeddings on to a submodule
    (BLIP-2, InstructBLIP)."""

    def __init__(self, handle, model: nn.Module, previous):
        self.handle, self.model, self.previous = handle, model, previous

    @property
    def __wrapped__(self):  # inspect.signature(model.generate) shows the real signature
        return self.previous if self.previous is not None else type(self.model).generate

    @property
    def __doc__(self):
        return self.__wrapped__.__doc__

    def __call__(self, *args, **kwargs):
        try:
            ids = (
                inspect.signature(self.__wrapped__).bind_partial(self.model, *args, **kwargs).arguments.get("input_ids")
            )
        except TypeError:  # let generate report its own argument error
            ids = None
        local = self.handle._local
        saved, local.prompt_ids = local.prompt_ids, ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
        try:
            if self.previous is not None:
                return self.previous(*args, **kwargs)
            return type(self.model).generate(self.model, *args, **kwargs)
        finally:
            local.prompt_ids = saved


class TransformersAdapter:
    """Installs and removes headgain on one ``transformers`` model (see the module docstring)."""

    route = "transformers' attention interface"
    bypass_hint = "Remote code that calls its attention kernels directly needs a transformers-native port."

    def __init__(self) -> None:
        self.original_config = None
        self.routed_config = None
        self.previous_generate = None

    def install(self, handle) -> None:
        decoder, model = handle.decoder, handle.model
        self.original_config = decoder.text_config
        routed = copy.copy(decoder.text_config)
        # set the field itself: the property's setter would also rename the shared sub-configs
        routed.__dict__["_attn_implementation_internal"] = _register(decoder.backend)
        self.routed_config = routed
        for position, layer in enumerate(decoder.layers):
            layer.module.config = routed
            setattr(layer.module, _SITE, _Site(handle, position))
        handle._watch([model.get_submodule(path) for path in decoder.entries])
        if callable(getattr(type(model), "generate", None)):
            self.previous_generate = model.__dict__.get("generate")
            model.generate = _Generate(handle, model, self.previous_generate)

    def uninstall(self, handle) -> None:
        model = handle.model
        for layer in handle.decoder.layers:
            if layer.module.__dict__.get("config") is self.routed_config:
                layer.module.config = self.original_config
            site = layer.module.__dict__.get(_SITE)
            if site is not None and site.handle is handle:
                delattr(layer.module, _SITE)
        if isinstance(model.__dict__.get("generate"), _Generate) and model.__dict__["generate"].handle is handle:
            if self.previous_generate is None:
                del model.generate
            else:
                model.generate = self.previous_generate

    def restore(self, handle) -> None:
        """After unpickling (possibly in a new process): make sure the dispatcher is registered."""
        if handle.attached:
            _register(handle.decoder.backend)

    def entry_names(self, handle) -> str:
        names = [type(handle.model).__name__] + [p for p in handle.decoder.entries if p]
        return " or ".join(names)

    def attend(self, handle, position: int, module, query, key, value, attention_mask, kwargs: dict):
        """Run one decoder layer's attention, read S_v, scale the heads: the user's backend
        followed by the read-out, or at decoding steps where `_fused_mask` allows, one
        fused pass over the keys and values."""
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        scaling = float(scaling)
        fused_mask = _fused_mask(handle, module, query, key, value, attention_mask, kwargs)
        if fused_mask is not _UNFUSED:
            held = []

            def fused_read(state):
                out, ratios = ops.decode_attention(
                    query, key, value, fused_mask, state.key_visual(key.shape[2]), scaling, 0.0
                )
                held.append(out)
                return ratios

            gains = handle._layer_gains(position, module, query, key, fused_read)
            if held:  # (B, 1, H, Dv), the layout the backend returns
                return handle._scale(position, held[0], gains), None
            out, weights = self._backend(handle, module, query, key, value, attention_mask, kwargs)
        else:
            out, weights = self._backend(handle, module, query, key, value, attention_mask, kwargs)
            num_keys, window = key.shape[2], kwargs.get("sliding_window")
            softcap = float(kwargs.get("softcap") or 0.0)
            gains = handle._layer_gains(
                position,
                module,
                query,
                key,
                lambda state: layer_ratios(
                    state,
                    query,
                    key,
                    scaling=scaling,
                    mask_rows=state.mask_rows(attention_mask, num_keys, window),
                    weights=weights,
                    softcap=softcap,
                ),
            )
        heads = out.view(out.shape[0], out.shape[1], handle.num_heads, -1) if out.dim() == 3 else out
        scaled = handle._scale(position, heads, gains)
        return (scaled.view(out.shape) if out.dim() == 3 else scaled), weights

    def _backend(self, handle, module, query, key, value, attention_mask, kwargs: dict):
        """The user's attention backend on this call: (output, probabilities or None)."""
        backend = handle.decoder.backend
        target = module if backend in _FUNCTIONS_READING_CONFIG else _ConfigView(module, self.original_config)
        return _backend_function(module, backend)(target, query, key, value, attention_mask, **kwargs)


_UNFUSED = object()
# Devices where attached models take the fused decoding step. The CUDA kernel of
# decode_attention compiles in CI but has not yet run on a GPU: models on CUDA keep their
# backend until `make gpu-check` has passed on one.
_FUSED_MODEL_DEVICES = ("cpu",)
# The widest heads the CUDA kernel of decode_attention takes (kMaxHeadDim in csrc/cuda);
# wider heads keep the backend there.
_CUDA_FUSED_MAX_HEAD_DIM = 256
# Keyword arguments the fused decoding step knows to leave the sdpa backend's result unchanged
# (any other one, such as position biases or attention sinks, keeps the backend).
_FUSABLE_KWARGS = frozenset(
    {
        "dropout",
        "scaling",
        "sliding_window",
        "is_causal",
        "position_ids",
        "cache_position",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
    }
)


def _fused_mask(handle, module, query, key, value, attention_mask, kwargs: dict):
    """The (B, 1, Nk) mask (or None) for `ops.decode_attention` when this attention call can be
    fused with the read-out, else `_UNFUSED`: a decoding step (one query row) of the sdpa backend
    on a device with the fused kernel, without autograd, dropout or softcap, with a mask shared
    by all heads that covers exactly the keys."""
    if not handle.fused or handle.decoder.backend != "sdpa" or query.shape[2] != 1:
        return _UNFUSED
    if query.device.type not in _FUSED_MODEL_DEVICES or not ops.extension_available(query.device):
        return _UNFUSED
    if query.device.type == "cuda" and max(query.shape[-1], value.shape[-1]) > _CUDA_FUSED_MAX_HEAD_DIM:
        return _UNFUSED
    if not query.dtype == key.dtype == value.dtype or query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return _UNFUSED
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return _UNFUSED
    if (module.training and kwargs.get("dropout", 0.0)) or kwargs.get("softcap") is not None:
        return _UNFUSED
    if any(v is not None for name, v in kwargs.items() if name not in _FUSABLE_KWARGS):
        return _UNFUSED
    if attention_mask is None:
        return None
    b, nk = query.shape[0], key.shape[2]
    m = attention_mask
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[2] != 1 or m.shape[3] != nk or m.shape[0] not in (1, b):
        return _UNFUSED
    state = handle._local.state
    if state is None or state.visual.shape[0] != b:
        return m[:, 0].expand(b, 1, nk)
    return state.decode_mask(m, nk)
