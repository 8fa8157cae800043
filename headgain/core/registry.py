"""Architecture maps: where a model's language-decoder attention lives, keyed by ``model_type``.

Module paths are dotted names with ``*`` standing for one integer index, for example
``model.language_model.layers.*.self_attn``; a path matches a module name exactly
(anchored), never a prefix, so a decoder path cannot reach into a vision tower.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

from .errors import ArchError

__all__ = ["ArchMap", "ArchError", "register_arch", "get_arch", "registered_archs", "resolve_layers"]


@dataclass(frozen=True)
class ArchMap:
    """Where headgain finds the language decoder's attention in one architecture.

    Attributes:
        attention: glob path of the decoder's attention modules, ``*`` = layer index.
            Each matched module must call ``transformers``' attention interface
            (``ALL_ATTENTION_FUNCTIONS``) with queries (B, Hq, N, D) and keys
            (B, Hkv, Nk, D), as every ``transformers`` decoder does.
        o_proj: name of the output projection inside each attention module; its input
            is the concatenation of the head outputs, (B, N, H * D_v).
        text_config: attribute of ``model.config`` holding the decoder's config
            (``""``: ``model.config.get_text_config()``).
        num_heads: attribute of the decoder config giving the query-head count H.
        head_dim: attribute of the decoder config giving the per-head width of the
            values D_v; when absent from the config, ``o_proj.in_features / H``.
        visual_token_ids: attributes of ``model.config`` (or of the decoder config)
            holding the token ids of visual placeholders (image, video). Empty: the
            model gives no ids and the visual mask must be set with
            ``Handle.set_visual_mask``.
        notes: free text shown in the docs (for example where a remote-code model
            keeps its modules).
    """

    attention: str
    o_proj: str = "o_proj"
    text_config: str = ""
    num_heads: str = "num_attention_heads"
    head_dim: str = "head_dim"
    visual_token_ids: tuple[str, ...] = ("image_token_id", "video_token_id")
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "visual_token_ids", tuple(self.visual_token_ids))
        if not isinstance(self.attention, str) or not self.attention:
            raise ArchError("ArchMap.attention must be a non-empty dotted module path such as 'model.layers.*.self_attn'")
        if self.attention.count("*") != 1:
            raise ArchError(
                f"ArchMap.attention={self.attention!r} must hold exactly one '*' standing for the layer index"
            )
        bad = [p for p in self.attention.split(".") if p != "*" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*|\d+", p)]
        if bad:
            raise ArchError(f"ArchMap.attention={self.attention!r} has invalid path component(s) {bad}")


_REGISTRY: dict[str, ArchMap] = {}


def register_arch(model_type: str, arch_map: ArchMap, *, overwrite: bool = False) -> None:
    """Register ``arch_map`` for ``model_type`` (the ``model.config.model_type`` string)."""
    if not isinstance(arch_map, ArchMap):
        raise ArchError(f"register_arch expects an ArchMap, got {type(arch_map).__name__}")
    if model_type in _REGISTRY and not overwrite:
        raise ArchError(f"model_type {model_type!r} is already registered; pass overwrite=True to replace its map")
    _REGISTRY[model_type] = arch_map


def registered_archs() -> dict[str, ArchMap]:
    """A copy of the registry, ``model_type -> ArchMap``."""
    return dict(_REGISTRY)


def get_arch(model, arch_map: ArchMap | str | None) -> ArchMap:
    """Resolve the ``arch_map`` argument of `headgain.attach`."""
    if isinstance(arch_map, ArchMap):
        return arch_map
    if arch_map is None:
        key = getattr(getattr(model, "config", None), "model_type", None)
        if key not in _REGISTRY:
            raise ArchError(
                f"no architecture map registered for model_type {key!r}; registered: {', '.join(sorted(_REGISTRY))}. "
                "Pass arch_map=headgain.ArchMap(attention='<path>.layers.*.self_attn', ...) or register one with "
                "headgain.register_arch"
            )
        return _REGISTRY[key]
    if isinstance(arch_map, str):
        if arch_map not in _REGISTRY:
            raise ArchError(f"unknown architecture map {arch_map!r}; registered: {', '.join(sorted(_REGISTRY))}")
        return _REGISTRY[arch_map]
    raise ArchError(f"arch_map must be an ArchMap, a registered name or None, got {type(arch_map).__name__}")


def resolve_layers(model: nn.Module, arch: ArchMap) -> list[tuple[str, nn.Module]]:
    """The decoder attention modules matched by ``arch.attention``, ordered by layer index.

    Raises `ArchError` naming the closest module names when nothing matches.
    """
    pattern = re.compile("^" + re.escape(arch.attention).replace(r"\*", r"(\d+)") + "$")
    found = []
    names = []
    for name, module in model.named_modules():
        names.append(name)
        m = pattern.match(name)
        if m:
            found.append((int(m.group(1)), name, module))
    if not found:
        probe = arch.attention.replace("*", "0")
        close = difflib.get_close_matches(probe, names, n=5, cutoff=0.5)
        hint = f" Closest module names: {', '.join(close)}." if close else ""
        raise ArchError(f"attention path {arch.attention!r} matches no module of {type(model).__name__}.{hint}")
    found.sort(key=lambda t: t[0])
    indices = [i for i, _, _ in found]
    if indices != list(range(len(found))):
        raise ArchError(f"attention path {arch.attention!r} matched layer indices {indices}; expected 0..{len(found) - 1}")
    return [(name, module) for _, name, module in found]


from ..adapters.hf_archs import BUILTIN  # noqa: E402  (the table needs ArchMap, defined above)

for _key, _map in BUILTIN.items():
    register_arch(_key, _map)
