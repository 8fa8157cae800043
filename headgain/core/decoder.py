"""`ResolvedDecoder`: one value that says everything headgain needs to know about the
language decoder of one model, built from an `ArchMap` by `headgain.core.registry.resolve`.

The adapters (``transformers`` or plain PyTorch) fill in what depends on the kind of model
(head counts from a config or from the map, visual ids, the attention backend); the
matching of module paths and the checks of the output projections are shared here.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

from .archmap import ArchMap
from .errors import ArchError

__all__ = [
    "DecoderLayer",
    "ResolvedDecoder",
    "match_layers",
    "attribute_path",
    "head_layout",
    "entry_paths",
    "visual_token_ids",
]

_VISION_WORDS = ("vision", "visual", "image_encoder", "vit")  # module-name prefixes of vision towers
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")  # head counts attention modules keep


@dataclass(frozen=True, eq=False)
class DecoderLayer:
    """One decoder layer's attention, as headgain reaches it.

    Attributes:
        index: 0-based decoder layer index (what ``l_perc`` / ``l_reas`` compare against).
        name: module path of the attention module.
        module: the attention module.
        o_proj: its output projection (``nn.Linear``; input (B, N, H * D_v)).
    """

    index: int
    name: str
    module: nn.Module
    o_proj: nn.Module


@dataclass(frozen=True, eq=False)
class ResolvedDecoder:
    """The language decoder of one model, resolved and checked.

    Attributes:
        layers: one `DecoderLayer` per decoder layer, in layer order.
        num_heads: H, query heads per layer.
        head_dim: D_v, the width of one head's output at the ``o_proj`` input.
        visual_ids: token ids of visual placeholders (empty: visual positions come from
            ``Handle.set_visual_mask``).
        kind: "transformers" or "torch" (a plain PyTorch model read at its
            ``scaled_dot_product_attention`` calls).
        backend: the attention implementation the decoder runs ("sdpa", "eager",
            "flash_attention_2", ... for ``transformers``; "sdpa" for plain models).
        text_config: the decoder's ``transformers`` config (None for plain models).
        entries: module paths whose calls start a forward pass ("" = the model itself):
            the model, and the module that runs the decoder layers.
    """

    layers: tuple[DecoderLayer, ...]
    num_heads: int
    head_dim: int
    visual_ids: tuple[int, ...]
    kind: str
    backend: str
    text_config: object | None
    entries: tuple[str, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def match_layers(model: nn.Module, arch: ArchMap) -> list[tuple[int, str, nn.Module]]:
    """(layer index, name, module) of every module ``arch.attention`` matches, by layer index.

    Raises `ArchError` naming the closest module names when nothing matches, when only
    vision-tower modules match, and when the matched indices are not 0..L-1 (a decoder
    whose layers are not all attention layers).
    """
    pattern = re.compile("^" + re.escape(arch.attention).replace(r"\*", r"(\d+)") + "$")
    found, names = [], []
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
    in_vision = [n for _, n, _ in found if any(p.startswith(_VISION_WORDS) for p in n.lower().split("."))]
    if len(in_vision) == len(found):
        raise ArchError(
            f"attention path {arch.attention!r} matches vision-tower modules only ({found[0][1]}, ...); point it at "
            "the language decoder, for example 'model.language_model.layers.*.self_attn'"
        )
    indices = [i for i, _, _ in found]
    if indices != list(range(len(found))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise ArchError(
            f"attention path {arch.attention!r} matched decoder layers {indices}, but not layers {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}: some decoder layers hold no attention module at this path (a "
            "decoder that mixes attention with convolution or recurrent layers). headgain reads and scales every "
            "decoder layer's attention heads and does not support such hybrid decoders; use a model whose decoder "
            "layers are all attention layers"
        )
    return found


def attribute_path(obj: object, path: str):
    """``obj.a.b.c`` for ``path`` "a.b.c" (None when a link is missing)."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def head_layout(arch: ArchMap, found, num_heads: int, head_dim: int | None) -> tuple[list[DecoderLayer], int]:
    """The `DecoderLayer`s of ``found`` and D_v, after checking every output projection.

    Checks that each module has a linear ``arch.o_proj`` whose input width is
    ``num_heads * head_dim`` (or a multiple of ``num_heads`` when ``head_dim`` is None),
    that this width is the same in every layer, and that head counts the module itself
    keeps (``num_heads``, ``num_attention_heads``, ``n_heads``) agree with ``num_heads``.
    """
    layers = []
    width = None
    for index, name, module in found:
        proj = attribute_path(module, arch.o_proj)
        width = getattr(proj, "in_features", None)
        if not isinstance(proj, nn.Module) or not isinstance(width, int):
            raise ArchError(
                f"module {name} ({type(module).__name__}) has no linear {arch.o_proj!r} (ArchMap.o_proj) with "
                "in_features; name the output projection that takes the concatenated head outputs"
            )
        for attr in _HEAD_ATTRS:
            own = getattr(module, attr, None)
            if isinstance(own, int) and not isinstance(own, bool) and own != num_heads:
                raise ArchError(
                    f"ArchMap.num_heads gives {num_heads} heads but {name}.{attr} = {own}; give the number of query "
                    f"heads ({own}?) in ArchMap.num_heads"
                )
        if width % num_heads != 0 or (head_dim is not None and head_dim * num_heads != width):
            detail = f" x head_dim {head_dim}" if head_dim is not None else ""
            raise ArchError(
                f"{num_heads} heads{detail} do not divide {name}.{arch.o_proj} input width {width}; check "
                f"ArchMap.num_heads ({arch.num_heads!r}) and ArchMap.head_dim ({arch.head_dim!r})"
            )
        layers.append(DecoderLayer(index, name, module, proj))
    widths = sorted({layer.o_proj.in_features for layer in layers})
    if len(widths) > 1:
        raise ArchError(
            f"the output projections {arch.o_proj!r} of {arch.attention!r} take inputs of different widths {widths}: "
            "the decoder's layers have different head widths, and headgain needs one head width for every layer"
        )
    return layers, head_dim if head_dim is not None else width // num_heads


def entry_paths(arch: ArchMap) -> tuple[str, ...]:
    """The model ("") and the module that owns the layer list, e.g. "model.language_model"
    for "model.language_model.layers.*.self_attn"."""
    prefix = arch.attention.split("*")[0].rstrip(".")
    owner = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    return ("",) if owner == "" else ("", owner)


def visual_token_ids(config, arch: ArchMap, text_config) -> tuple[int, ...]:
    """The sorted visual token ids ``arch.visual_token_ids`` names, read from a model's config
    (attribute paths are tried on ``config``, then on the decoder's ``text_config``)."""
    ids = []
    for entry in arch.visual_token_ids:
        if isinstance(entry, int):
            ids.append(entry)
            continue
        for source in (config, text_config):
            value = attribute_path(source, entry)
            if value is None and entry.endswith("_id"):
                value = attribute_path(source, entry[:-3] + "_index")
            if isinstance(value, int) and not isinstance(value, bool):
                ids.append(value)
                break
    if arch.visual_token_ids and not ids:
        raise ArchError(
            f"none of the visual token id attributes {list(arch.visual_token_ids)} (ArchMap.visual_token_ids) is set "
            "on model.config; name the right attributes (dotted paths such as 'vision_config.image_token_id' work), "
            "or use visual_token_ids=() with handle.set_visual_mask"
        )
    return tuple(sorted(set(ids)))
