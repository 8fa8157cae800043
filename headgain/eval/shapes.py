"""A built-in benchmark of drawn pictures (``--bench shapes``): runs anywhere, no files.

Each picture holds ``k`` discs of one colour on white. Questions cycle through three
kinds: the colour (multiple choice), the count (a number) and whether a colour is
present (yes/no). The answers are known by construction.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from .sample import Sample

__all__ = ["shapes", "COLORS"]

COLORS = ("red", "green", "blue", "yellow")


def _picture(color: str, count: int, size: int = 112) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    cell = size // 3
    for k in range(count):
        x, y = (k % 3) * cell, (k // 3) * cell
        draw.ellipse([x + 4, y + 4, x + cell - 4, y + cell - 4], fill=color, outline="black")
    return img


def shapes(n: int = 30, seed: int = 0) -> list[Sample]:
    """``n`` samples (ids ``shapes-0``...), the same for the same ``seed``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        color, count = rng.choice(COLORS), rng.randint(1, 6)
        image = _picture(color, count)
        kind = i % 3
        if kind == 0:
            options = dict(zip("ABCD", COLORS))
            letter = "ABCD"[COLORS.index(color)]
            out.append(
                Sample(
                    f"shapes-{i}",
                    [image],
                    "What colour are the discs?",
                    options,
                    letter,
                    "choice",
                    {"category": "colour"},
                )
            )
        elif kind == 1:
            out.append(
                Sample(
                    f"shapes-{i}", [image], "How many discs are there?", {}, str(count), "number", {"category": "count"}
                )
            )
        else:
            asked = rng.choice(COLORS)
            answer = "yes" if asked == color else "no"
            out.append(
                Sample(
                    f"shapes-{i}", [image], f"Is there a {asked} disc?", {}, answer, "yes_no", {"category": "presence"}
                )
            )
    return out
