"""Images as benchmarks store them, decoded to RGB ``PIL.Image.Image``."""

from __future__ import annotations

import ast
import base64
import binascii
import io
import os
from collections.abc import Sequence

from PIL import Image, UnidentifiedImageError

__all__ = ["decode_image", "split_image_list", "LazyImages"]


def split_image_list(value: str) -> list[str]:
    """The entries of a VLMEvalKit multi-image field (a Python list literal of base64 strings
    or paths), or ``[value]`` for a single entry."""
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            items = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return [value]
        if isinstance(items, list) and all(isinstance(i, str) for i in items):
            return items
    return [value]


def decode_image(value, base_dir: str | None = None, where: str = "") -> Image.Image:
    """An RGB image from a PIL image, raw bytes, a ``{"bytes": ..., "path": ...}`` dict
    (Hugging Face's undecoded Image feature), a base64 string, or a path (relative paths are
    taken from ``base_dir``). ``where`` names the sample in error messages."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            return decode_image(bytes(value["bytes"]), base_dir, where)
        if value.get("path"):
            return decode_image(str(value["path"]), base_dir, where)
        raise ValueError(f"{where}: image entry holds neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(value)) as img:
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{where}: image bytes are not an image ({e})") from None
    if isinstance(value, str):
        path = value if base_dir is None or os.path.isabs(value) else os.path.join(base_dir, value)
        if len(value) < 1024 and os.path.isfile(path):
            try:
                with Image.open(path) as img:
                    return img.convert("RGB")
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"{where}: {path} is not an image ({e})") from None
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: image {value[:80]!r} is neither a file nor base64 data") from None
        return decode_image(raw, base_dir, where)
    raise ValueError(f"{where}: cannot read an image from a {type(value).__name__}")


class LazyImages(Sequence):
    """A sample's images, decoded to RGB on each access and never kept decoded, so a whole
    benchmark stays in memory as its compressed sources (base64 text, file paths, bytes).

    Args:
        sources: per image anything `decode_image` reads.
        base_dir: folder that relative paths are taken from.
        where: names the sample in error messages.
    """

    def __init__(self, sources: Sequence, base_dir: str | None = None, where: str = ""):
        self.sources, self.base_dir, self.where = list(sources), base_dir, where

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [decode_image(v, self.base_dir, self.where) for v in self.sources[index]]
        return decode_image(self.sources[index], self.base_dir, self.where)

    def check(self) -> None:
        """Raise `ValueError` (naming the sample) unless every source opens as an image;
        reads headers only."""
        for value in self.sources:
            if isinstance(value, Image.Image):
                continue
            if isinstance(value, dict):
                value = value.get("bytes") or value.get("path")
            if isinstance(value, str):
                path = value if self.base_dir is None or os.path.isabs(value) else os.path.join(self.base_dir, value)
                if len(value) < 1024 and os.path.isfile(path):
                    value = path
                else:
                    try:
                        value = io.BytesIO(base64.b64decode(value, validate=True))
                    except (binascii.Error, ValueError):
                        raise ValueError(
                            f"{self.where}: image {value[:80]!r} is neither a file nor base64 data"
                        ) from None
            elif isinstance(value, (bytes, bytearray)):
                value = io.BytesIO(value)
            try:
                with Image.open(value):
                    pass
            except (UnidentifiedImageError, OSError, TypeError) as e:
                raise ValueError(f"{self.where}: not an image ({e})") from None
