"""Drawn scenes and the questions asked about them (deterministic per seed).

A scene is a square picture split into a 4 x 4 grid of cells, one cell per visual token
of the toy model (28 x 28 pixels: 2 x 2 patches of 14 pixels, merged); each object (a
shape of one kind and one colour) sits inside its own cell with some jitter, on a plain
or textured light background. Kinds and colours are drawn with skewed frequencies, so some objects
are "popular" (POPE's popular negatives ask about them).

Questions (``TASKS``):

- ``exist``, ``exist-popular``, ``exist-adversarial``: "is there a red circle in the
  image ?" -> yes / no; the negatives follow POPE's random, popular and adversarial
  sampling (adversarial: an absent object that shares its colour or its kind with an
  object in the picture).
- ``colour``: "what colour is the square ?" (the kind occurs once) -> a colour.
- ``count``: "how many circles are there ?" -> a digit (0 to 5; scenes hold up to 7 objects).
- ``position``: "is the red circle left or right of the blue square ?" -> left / right
  (or above / below).
- ``caption``: "describe the image ." -> "a red circle , a blue square and a green cross ."
  (objects in reading order).

Every answer comes after a reasoning text (``reasoning_text``) of a settable number of
words between ``<think>`` and ``</think>``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "KINDS",
    "TASKS",
    "IMAGE_SIZE",
    "GRID",
    "DEFAULT_REASONING",
    "HELDOUT",
    "Obj",
    "Scene",
    "QA",
    "draw_scene",
    "make_scene",
    "make_qa",
    "reasoning_text",
    "vocabulary",
    "plural",
]

#: Picture side in pixels (8 x 8 patches of 14 pixels, 16 visual tokens after the 2 x 2 merge).
IMAGE_SIZE = 112
#: Words of reasoning text before the answer, unless told otherwise.
DEFAULT_REASONING = 16
#: First seed of the held-out scenes: training draws its scene seeds below it.
HELDOUT = 2**31

KINDS = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
# skewed frequencies: circles and red objects are the most common ("popular")
_KIND_WEIGHTS = (0.34, 0.24, 0.18, 0.14, 0.10)
_COLOUR_WEIGHTS = (0.28, 0.22, 0.17, 0.14, 0.11, 0.08)
_RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 170),
    "orange": (245, 125, 0),
}
_DIGITS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
TASKS = ("exist", "exist-popular", "exist-adversarial", "colour", "count", "position", "caption")
#: Cells per side: one cell per merged visual token (``IMAGE_SIZE / 28``).
GRID = 4

# filler of the reasoning text; {obj} is the object the question is about
_FILLER = (
    "let me look at the image carefully .",
    "i need to check each shape one by one .",
    "the question asks about the {obj} .",
    "first i scan the picture from left to right .",
    "then i compare the shapes and their colours .",
    "i should not guess and answer only what i see .",
    "so i think about the {obj} again .",
    "now i am ready to give the answer .",
)


def plural(kind: str) -> str:
    """The plural of a kind name ("crosses", "circles")."""
    return kind + ("es" if kind.endswith("s") else "s")


@dataclass(frozen=True)
class Obj:
    """One object: kind, colour, grid cell (row, col) and its centre and radius in pixels."""

    kind: str
    colour: str
    cell: tuple[int, int]
    centre: tuple[int, int]
    radius: int

    @property
    def name(self) -> str:
        """ "red circle"."""
        return f"{self.colour} {self.kind}"


@dataclass
class Scene:
    """A drawn scene: its objects (in reading order), background and picture."""

    seed: int
    objects: list[Obj]
    background: str
    image: Image.Image = field(repr=False)

    def names(self) -> set[str]:
        """The set of object names present ("red circle", ...)."""
        return {o.name for o in self.objects}


@dataclass
class QA:
    """A question about a scene: the question, its options (choice tasks), the answer and the
    reasoning-text subject ``about`` (an object or kind name)."""

    task: str
    question: str
    answer: str
    options: list[str]
    about: str
    meta: dict = field(default_factory=dict)


def _weighted(rng: random.Random, items, weights):
    return rng.choices(items, weights=weights, k=1)[0]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: int, cy: int, r: int, fill) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        s = int(r * 0.85)
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif kind == "cross":
        w = max(3, r // 3)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")


def _background(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    base = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), base)
    style = rng.choice(("plain", "plain", "stripes", "dots", "checks"))
    draw = ImageDraw.Draw(img)
    ink = tuple(max(0, c - rng.randint(15, 35)) for c in base)
    step = rng.randint(6, 12)
    if style == "stripes":
        for x in range(-size, size, step):
            draw.line([(x, 0), (x + size, size)], fill=ink, width=2)
    elif style == "dots":
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.point([(x, y), (x + 1, y), (x, y + 1), (x + 1, y + 1)], fill=ink)
    elif style == "checks":
        for y in range(0, size, step):
            for x in range((y // step) % 2 * step, size, 2 * step):
                draw.rectangle([x, y, x + step - 1, y + step - 1], fill=ink)
    return img, style


def draw_scene(objects: list[Obj], seed: int, size: int = IMAGE_SIZE) -> tuple[Image.Image, str]:
    """The picture of ``objects`` on a background chosen by ``seed``; returns (image, background style)."""
    rng = random.Random(f"background-{seed}")
    img, style = _background(rng, size)
    draw = ImageDraw.Draw(img)
    for o in objects:
        _draw_shape(draw, o.kind, o.centre[0], o.centre[1], o.radius, _RGB[o.colour])
    return img, style


def _place(rng: random.Random, specs: list[tuple[str, str]], size: int) -> list[Obj]:
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], len(specs))
    step = size / GRID
    objects = []
    for (kind, colour), (row, col) in zip(specs, cells):
        radius = rng.randint(int(step * 0.28), int(step * 0.4))
        slack = max(0, int(step / 2 - radius) - 1)  # the object stays inside its cell
        cx = int((col + 0.5) * step) + rng.randint(-slack, slack)
        cy = int((row + 0.5) * step) + rng.randint(-slack, slack)
        objects.append(Obj(kind, colour, (row, col), (cx, cy), radius))
    return sorted(objects, key=lambda o: o.cell)


def _random_spec(rng: random.Random) -> tuple[str, str]:
    return _weighted(rng, KINDS, _KIND_WEIGHTS), _weighted(rng, COLOURS, _COLOUR_WEIGHTS)


def make_scene(seed: int, task: str = "exist", size: int = IMAGE_SIZE, max_objects: int = 9) -> Scene:
    """A scene for ``task`` (counting scenes hold more objects), deterministic per (seed, task).

    Objects of a scene are distinct as (kind, colour) pairs except in counting scenes; in
    ``colour`` scenes each kind occurs once. ``max_objects`` caps their number (the training
    curriculum starts with few objects; ``position`` needs two).
    """
    rng = random.Random(f"scene-{task}-{seed}")
    if task == "count":
        kind = _weighted(rng, KINDS, _KIND_WEIGHTS)
        specs = [(kind, _weighted(rng, COLOURS, _COLOUR_WEIGHTS)) for _ in range(rng.randint(0, min(5, max_objects)))]
        others = [k for k in KINDS if k != kind]
        for _ in range(rng.randint(0 if specs else 1, min(3, 7 - len(specs), max(1, max_objects - len(specs))))):
            specs.append((rng.choice(others), _weighted(rng, COLOURS, _COLOUR_WEIGHTS)))
        rng.shuffle(specs)
    else:
        n = min(
            rng.randint(2 if task in ("position", "colour") else 1, 4), max(max_objects, 2 if task == "position" else 1)
        )
        specs = []
        while len(specs) < n:
            spec = _random_spec(rng)
            # colour questions name a kind: their scenes hold each kind once
            if spec not in specs and not (task == "colour" and spec[0] in {k for k, _ in specs}):
                specs.append(spec)
    objects = _place(rng, specs, size)
    image, style = draw_scene(objects, seed, size)
    return Scene(seed, objects, style, image)


def _all_names() -> list[str]:
    return [f"{c} {k}" for k in KINDS for c in COLOURS]


def _popularity() -> list[str]:
    """Object names, most frequent first."""
    freq = {f"{c} {k}": wk * wc for k, wk in zip(KINDS, _KIND_WEIGHTS) for c, wc in zip(COLOURS, _COLOUR_WEIGHTS)}
    return sorted(freq, key=lambda n: -freq[n])


def _negative(rng: random.Random, scene: Scene, sampling: str) -> str:
    present = scene.names()
    absent = [n for n in _all_names() if n not in present]
    if sampling == "popular":
        pool = [n for n in _popularity() if n not in present][:6]
    elif sampling == "adversarial":
        kinds = {o.kind for o in scene.objects}
        colours = {o.colour for o in scene.objects}
        pool = [n for n in absent if n.split()[1] in kinds or n.split()[0] in colours]
    else:
        pool = absent
    return rng.choice(pool or absent)


def reasoning_text(words: int, about: str, seed: int) -> str:
    """``words`` words of reasoning (filler sentences that name ``about``), deterministic per seed."""
    rng = random.Random(f"reasoning-{seed}")
    out: list[str] = []
    while len(out) < words:
        out.extend(rng.choice(_FILLER).format(obj=about).split())
    return " ".join(out[:words])


def make_qa(scene: Scene, task: str, seed: int | None = None) -> QA:
    """A question of ``task`` about ``scene`` (deterministic per scene seed and task).

    ``scene`` must come from ``make_scene(seed, task)`` for ``count`` (more objects) and
    ``colour`` / ``position`` (at least two objects).
    """
    rng = random.Random(f"qa-{task}-{scene.seed if seed is None else seed}")
    objs = scene.objects
    if task.startswith("exist"):
        sampling = {"exist": "random", "exist-popular": "popular", "exist-adversarial": "adversarial"}[task]
        if rng.random() < 0.5:
            name, answer = rng.choice(objs).name, "yes"
        else:
            name, answer = _negative(rng, scene, sampling), "no"
        return QA(task, f"is there a {name} in the image ?", answer, ["yes", "no"], name, {"sampling": sampling})
    if task == "colour":
        kinds = [o.kind for o in objs]
        unique = [o for o in objs if kinds.count(o.kind) == 1]
        if not unique:
            raise ValueError(f"scene {scene.seed} has no kind that occurs once: no colour question")
        obj = rng.choice(unique)
        return QA(task, f"what colour is the {obj.kind} ?", obj.colour, list(COLOURS), obj.kind)
    if task == "count":
        kinds = [o.kind for o in objs]
        kind = max(KINDS, key=kinds.count) if rng.random() < 0.8 else rng.choice(KINDS)
        n = kinds.count(kind)
        return QA(task, f"how many {plural(kind)} are there ?", _DIGITS[n], list(_DIGITS[:8]), plural(kind))
    if task == "position":
        a, b = rng.sample(objs, 2)
        (ra, ca), (rb, cb) = a.cell, b.cell
        horizontal = ca != cb and (ra == rb or rng.random() < 0.5)
        if horizontal:
            options, answer = ["left", "right"], "left" if ca < cb else "right"
        else:
            options, answer = ["above", "below"], "above" if ra < rb else "below"
        question = f"is the {a.name} {options[0]} or {options[1]} of the {b.name} ?"
        return QA(task, question, answer, options, a.name)
    if task == "caption":
        names = [f"a {o.name}" for o in objs]
        text = names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]
        return QA(task, "describe the image .", text + " .", [], "shapes", {"objects": [o.name for o in objs]})
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def vocabulary() -> list[str]:
    """Every word a question, a reasoning text or an answer can hold, sorted."""
    words = {"is", "there", "a", "in", "the", "image", "?", "yes", "no", "what", "colour", "how", "many", "are"}
    words |= {"left", "right", "above", "below", "or", "of", "describe", ".", ",", "and", "shapes"}
    words |= set(KINDS) | set(COLOURS) | {plural(k) for k in KINDS} | set(_DIGITS)
    for sentence in _FILLER:
        words |= set(sentence.replace("{obj}", "").split())
    return sorted(words)
