"""The architecture registry: `ArchMap`s keyed by ``model.config.model_type``, and
`resolve`, which turns a model and its map into a checked `ResolvedDecoder`.

The maps headgain ships are data in `headgain.adapters.hf_archs`; layouts headgain cannot
act on are listed there too, each with the reason and what to do instead.
"""

from __future__ import annotations

import sys

from torch import nn

from .archmap import ArchMap
from .decoder import ResolvedDecoder
from .errors import ArchError

__all__ = ["ArchMap", "register_arch", "registered_archs", "get_arch", "resolve", "is_transformers_model"]

_REGISTRY: dict[str, ArchMap] = {}


def register_arch(model_type: str, arch_map: ArchMap, *, overwrite: bool = False) -> None:
    """Register ``arch_map`` for ``model_type`` (the ``model.config.model_type`` string)."""
    if not isinstance(model_type, str) or not model_type:
        raise ArchError(f"model_type must be a non-empty string, got {model_type!r}")
    if not isinstance(arch_map, ArchMap):
        raise ArchError(f"register_arch expects an ArchMap, got {type(arch_map).__name__}")
    if model_type in _REGISTRY and not overwrite:
        raise ArchError(f"model_type {model_type!r} is already registered; pass overwrite=True to replace its map")
    _REGISTRY[model_type] = arch_map


def registered_archs() -> dict[str, ArchMap]:
    """A copy of the registry, ``model_type -> ArchMap``."""
    return dict(_REGISTRY)


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` model (without importing ``transformers``)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def get_arch(model: nn.Module, arch_map: ArchMap | str | None) -> ArchMap:
    """The `ArchMap` for ``model``: ``arch_map`` itself, a registered name, or (None) the
    map registered for ``model.config.model_type``."""
    from ..adapters.hf_archs import UNSUPPORTED

    if isinstance(arch_map, ArchMap):
        return arch_map
    if isinstance(arch_map, str):
        if arch_map in UNSUPPORTED and arch_map not in _REGISTRY:
            raise ArchError(f"model_type {arch_map!r} is not supported: {UNSUPPORTED[arch_map]}")
        if arch_map not in _REGISTRY:
            raise ArchError(f"unknown architecture map {arch_map!r}; registered: {', '.join(sorted(_REGISTRY))}")
        return _REGISTRY[arch_map]
    if arch_map is not None:
        raise ArchError(f"arch_map must be an ArchMap, a registered name or None, got {type(arch_map).__name__}")
    config = getattr(model, "config", None)
    if config is None or not is_transformers_model(model):
        raise ArchError(
            f"{type(model).__name__} is not a transformers model, so headgain cannot look its architecture up; pass "
            "arch_map=headgain.ArchMap(attention='blocks.*.attn', o_proj='proj', num_heads=<H>, visual_token_ids=()) "
            "naming its attention modules, and mark visual positions with handle.set_visual_mask(mask)"
        )
    key = getattr(config, "model_type", None)
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key in UNSUPPORTED:
        raise ArchError(f"model_type {key!r} is not supported: {UNSUPPORTED[key]}")
    raise ArchError(
        f"no architecture map registered for model_type {key!r}; registered: {', '.join(sorted(_REGISTRY))}. "
        "Pass arch_map=headgain.ArchMap(attention='<path>.layers.*.self_attn', ...) or register one with "
        "headgain.register_arch"
    )


def resolve(model: nn.Module, arch_map: ArchMap | str | None = None) -> ResolvedDecoder:
    """The checked `ResolvedDecoder` of ``model`` under its map (see `get_arch`).

    ``transformers`` models go through `headgain.adapters.hf`, other modules through
    `headgain.adapters.sdpa` (attention computed with ``scaled_dot_product_attention``).
    Raises `ArchError` (with what to change) when the map does not fit; the model is
    never modified.
    """
    if not isinstance(model, nn.Module):
        raise ArchError(f"headgain attaches to a torch.nn.Module, got {type(model).__name__}")
    arch = get_arch(model, arch_map)
    if is_transformers_model(model):
        from ..adapters import hf

        return hf.resolve(model, arch)
    from ..adapters import sdpa

    return sdpa.resolve(model, arch)


def _register_builtins() -> None:
    from ..adapters.hf_archs import BUILTIN

    for key, arch in BUILTIN.items():
        register_arch(key, arch)


_register_builtins()
