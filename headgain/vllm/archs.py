"""Where vLLM's model classes keep their language decoder's attention, and `resolve`.

The maps are `ArchMap`s keyed by the Hugging Face ``model_type`` of the checkpoint, with
vLLM's module paths. Each matched module must hold an ``attn`` (vLLM's ``Attention``,
called with the packed queries and keys after rotary embedding) and the ``o_proj`` that
takes its output. Head counts come from the ``Attention`` module itself: they are the
heads of this tensor-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.archmap import ArchMap
from ..core.decoder import attribute_path, match_layers, visual_token_ids
from ..core.errors import ArchError

__all__ = ["VLLM_ARCHS", "VllmLayer", "VllmDecoder", "resolve"]

_VL = "language_model.model.layers.*.self_attn"
_IDEFICS3 = ArchMap("model.text_model.layers.*.self_attn", visual_token_ids=("image_token_id",))

#: vLLM module paths by Hugging Face ``model_type``. Text-only decoders have no visual
#: token ids: give them with ``HEADGAIN_ARCH_MAP`` (integer ``visual_token_ids``).
VLLM_ARCHS: dict[str, ArchMap] = {
    "qwen2": ArchMap("model.layers.*.self_attn", visual_token_ids=()),
    "qwen2_vl": ArchMap(_VL),
    "qwen2_5_vl": ArchMap(_VL),
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,  # vLLM's SmolVLM is its Idefics3 model with SmolVLM's processor
}


@dataclass(frozen=True, eq=False)
class VllmLayer:
    """One decoder layer's attention in a vLLM model.

    Attributes:
        index: 0-based decoder layer index.
        name: module path of the attention block (``...layers.3.self_attn``).
        attn: its vLLM ``Attention`` module (inputs (T, H * D) queries, (T, Hkv * D) keys).
        o_proj: the projection whose input (T, H * D_v) holds the head outputs.
        scale: the factor vLLM multiplies q.k by.
        sliding_window: the layer's window, or None.
        softcap: the layer's logit soft cap (0: none).
    """

    index: int
    name: str
    attn: nn.Module
    o_proj: nn.Module
    scale: float
    sliding_window: int | None
    softcap: float


@dataclass(frozen=True, eq=False)
class VllmDecoder:
    """The decoder of one vLLM model as headgain reaches it: this tensor-parallel rank's
    heads, ``num_heads`` of them starting at head ``first_head`` of the whole model."""

    layers: tuple[VllmLayer, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    visual_ids: tuple[int, ...]
    first_head: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def resolve(model: nn.Module, hf_config, arch: ArchMap | None, rank: int = 0) -> VllmDecoder:
    """The checked decoder of vLLM ``model`` (``hf_config``: the checkpoint's config) under
    ``arch``, or the registry's map for ``hf_config.model_type`` when ``arch`` is None;
    ``rank``: the tensor-parallel rank holding ``model`` (its heads are the rank-th slice)."""
    model_type = getattr(hf_config, "model_type", None)
    if arch is None:
        if model_type not in VLLM_ARCHS:
            raise ArchError(
                f"headgain has no vLLM arch map for model_type {model_type!r} ({type(model).__name__}); known: "
                f"{', '.join(sorted(VLLM_ARCHS))}. Give one with HEADGAIN_ARCH_MAP (an ArchMap as JSON, with vLLM's "
                "module paths)"
            )
        arch = VLLM_ARCHS[model_type]
    found = match_layers(model, arch)
    layers, shapes = [], set()
    for index, name, module in found:
        attn = getattr(module, "attn", None)
        proj = attribute_path(module, arch.o_proj)
        heads = [getattr(attn, a, None) for a in ("num_heads", "num_kv_heads", "head_size", "head_size_v")]
        impl = getattr(attn, "impl", None)
        if not all(isinstance(v, int) for v in heads) or impl is None or not isinstance(proj, nn.Module):
            raise ArchError(
                f"module {name} ({type(module).__name__}) has no vLLM Attention 'attn' with an impl and no "
                f"{arch.o_proj!r} beside it; headgain's vLLM plugin needs both (ArchMap.attention, ArchMap.o_proj)"
            )
        if getattr(impl, "alibi_slopes", None) is not None or getattr(impl, "sinks", None) is not None:
            raise ArchError(f"{name} uses ALiBi slopes or attention sinks, which headgain's vLLM plugin does not read")
        shapes.add(tuple(heads))
        window = getattr(attn, "sliding_window", None)
        layers.append(
            VllmLayer(
                index,
                name,
                attn,
                proj,
                float(impl.scale),
                int(window) if window else None,
                float(getattr(impl, "logits_soft_cap", 0) or 0),
            )
        )
    if len(shapes) != 1:
        raise ArchError(f"the attention layers of {arch.attention!r} have different head layouts {sorted(shapes)}")
    num_heads, num_kv_heads, head_dim, head_dim_v = shapes.pop()
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    expected = getattr(text_config, "num_hidden_layers", None)
    if isinstance(expected, int) and expected != len(layers):
        raise ArchError(
            f"attention path {arch.attention!r} matched {len(layers)} modules but the decoder has {expected} layers "
            "(pipeline parallelism is not supported)"
        )
    return VllmDecoder(
        tuple(layers),
        num_heads,
        num_kv_heads,
        head_dim,
        head_dim_v,
        visual_token_ids(hf_config, arch, text_config),
        rank * num_heads,
    )
