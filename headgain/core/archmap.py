"""`ArchMap`: where one architecture keeps its language decoder's attention, as data.

Module paths are dotted names with ``*`` standing for one integer index, for example
``model.language_model.layers.*.self_attn``; a path matches a module name exactly
(anchored), never a prefix, so a decoder path cannot reach into a vision tower.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import jsonio
from .errors import ArchError

__all__ = ["ArchMap"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True)
class ArchMap:
    """Where headgain finds the language decoder's attention in one architecture.

    Attributes:
        attention: dotted path of the decoder's attention modules, ``*`` = the 0-based
            decoder layer index. In a ``transformers`` model each matched module must call
            ``transformers``' attention interface with queries (B, Hq, N, D) and keys
            (B, Hkv, Nk, D); in a plain PyTorch model it must compute attention with one
            ``torch.nn.functional.scaled_dot_product_attention`` call per forward.
        o_proj: dotted name of the output projection inside each attention module (a
            ``nn.Linear``); its input is the concatenation of the head outputs,
            (B, N, H * D_v).
        text_config: dotted attribute path from ``model.config`` to the decoder's config
            (``""``: ``model.config.get_text_config()``). Unused for plain PyTorch models.
        num_heads: the query-head count H: an attribute name of the decoder config, or an
            integer (plain PyTorch models, which have no config).
        head_dim: the per-head width of the values D_v: an attribute name of the decoder
            config, an integer, or None; when absent, ``o_proj.in_features / H``.
        visual_token_ids: the token ids of visual placeholders (image, video): dotted
            attribute paths from ``model.config`` (also tried on the decoder config), such
            as ``"image_token_id"`` or ``"vision_config.image_token_id"``, or integer ids.
            Empty: the model's inputs carry no visual ids and the visual positions are set
            with ``Handle.set_visual_mask``.
        notes: free text shown in the docs (for example where a remote-code model keeps
            its modules).
    """

    attention: str = field(metadata={"help": "dotted path of the attention modules, '*' = decoder layer index"})
    o_proj: str = field(default="o_proj", metadata={"help": "output projection inside each attention module"})
    text_config: str = field(default="", metadata={"help": "path from model.config to the decoder config"})
    num_heads: str | int = field(
        default="num_attention_heads", metadata={"help": "query heads: config attribute or int"}
    )
    head_dim: str | int | None = field(
        default="head_dim", metadata={"help": "value width per head: attribute, int or None"}
    )
    visual_token_ids: tuple[str | int, ...] = field(
        default=("image_token_id", "video_token_id"), metadata={"help": "config attribute paths or integer ids"}
    )
    notes: str = field(default="", metadata={"help": "free text for the docs"})

    def __post_init__(self) -> None:
        ids = self.visual_token_ids
        object.__setattr__(self, "visual_token_ids", (ids,) if isinstance(ids, (str, int)) else tuple(ids))
        errors = []
        if not isinstance(self.attention, str) or not self.attention:
            errors.append("attention must be a non-empty dotted module path such as 'model.layers.*.self_attn'")
        else:
            if self.attention.count("*") != 1:
                errors.append(f"attention={self.attention!r} must hold exactly one '*' standing for the layer index")
            bad = [p for p in self.attention.split(".") if p != "*" and not (_NAME.fullmatch(p) or p.isdigit())]
            if bad:
                errors.append(f"attention={self.attention!r} has invalid path component(s) {bad}")
        if not isinstance(self.o_proj, str) or not _DOTTED.fullmatch(self.o_proj):
            errors.append(f"o_proj={self.o_proj!r} must be a dotted attribute name such as 'o_proj'")
        if not isinstance(self.text_config, str) or (self.text_config and not _DOTTED.fullmatch(self.text_config)):
            errors.append(
                f"text_config={self.text_config!r} must be '' or a dotted attribute path such as 'text_config'"
            )
        if not _positive_int(self.num_heads) and not (
            isinstance(self.num_heads, str) and _NAME.fullmatch(self.num_heads)
        ):
            errors.append(f"num_heads={self.num_heads!r} must be a positive integer or a config attribute name")
        if (
            self.head_dim is not None
            and not _positive_int(self.head_dim)
            and not (isinstance(self.head_dim, str) and _NAME.fullmatch(self.head_dim))
        ):
            errors.append(f"head_dim={self.head_dim!r} must be None, a positive integer or a config attribute name")
        for value in self.visual_token_ids:
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0) and not (
                isinstance(value, str) and _DOTTED.fullmatch(value)
            ):
                errors.append(
                    f"visual_token_ids holds {value!r}; entries are config attribute paths such as "
                    "'image_token_id' or 'vision_config.image_token_id', or non-negative integer ids"
                )
        if not isinstance(self.notes, str):
            errors.append(f"notes must be text, got {type(self.notes).__name__}")
        if errors:
            raise ArchError("invalid ArchMap: " + "; ".join(errors))

    @property
    def needs_config(self) -> bool:
        """Whether some field names a config attribute (so the model must have a config)."""
        return (
            isinstance(self.num_heads, str)
            or isinstance(self.head_dim, str)
            or any(isinstance(v, str) for v in self.visual_token_ids)
        )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["visual_token_ids"] = list(self.visual_token_ids)
        return d

    def to_json(self, path: str | None = None) -> str:
        """The map as sorted JSON; also written to ``path`` when given."""
        return jsonio.write_text(self.to_dict(), path)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArchMap:
        if not isinstance(d, Mapping):
            raise ArchError(f"an ArchMap must be given as a JSON object / dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ArchError(f"unknown ArchMap field(s) {unknown}; known fields: {', '.join(sorted(known))}")
        if "attention" not in d:
            raise ArchError("an ArchMap needs 'attention', the dotted path of the decoder's attention modules")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, text_or_path: str) -> ArchMap:
        """Parse a JSON object, or read a ``.json`` file when given a path to one."""
        return cls.from_dict(jsonio.read_object(text_or_path, ArchError, "ArchMap"))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
