"""Built-in benchmarks on drawn scenes, generated on the fly (deterministic per seed).

Names (`BENCHMARKS`): ``toy:exist``, ``toy:exist-popular``, ``toy:exist-adversarial``
(POPE's three negative samplings), ``toy:colour``, ``toy:count``, ``toy:position`` and
``toy:caption`` (CHAIR: ``meta["objects"]`` lists the objects in the picture).

Each sample has the fields of ``headgain.eval``'s ``Sample``: id, images, question,
options (letter -> text), answer (a letter for ``choice``), answer_type and meta. The
reasoning text the toy model expects before its answer is in ``meta["reasoning"]``
(`headgain.toy.model.messages` builds the prompt from it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .scenes import COLOURS, DEFAULT_REASONING, HELDOUT, KINDS, TASKS, make_qa, make_scene, reasoning_text

__all__ = ["BENCHMARKS", "ToySample", "samples"]

BENCHMARKS = tuple(f"toy:{t}" for t in TASKS)
_LETTERS = "ABCDEFGHIJ"
_TYPES = {"exist": "yes_no", "colour": "choice", "count": "number", "position": "choice", "caption": "text"}


@dataclass
class ToySample:
    """One question about one drawn scene (the fields of ``headgain.eval.Sample``)."""

    id: str
    images: list = field(default_factory=list)
    question: str = ""
    options: dict[str, str] = field(default_factory=dict)
    answer: str = ""
    answer_type: str = "text"
    meta: dict[str, Any] = field(default_factory=dict)


def samples(name: str, seed: int = 0, limit: int = 100, reasoning: int = DEFAULT_REASONING) -> list[ToySample]:
    """``limit`` samples of benchmark ``name`` (``"toy:count"``, ...) on the scenes of seeds
    ``HELDOUT + seed * 1_000_003 + i`` (never drawn in training), with ``reasoning`` words of
    reasoning text in their meta."""
    task = name.removeprefix("toy:")
    if name not in BENCHMARKS:
        raise ValueError(f"unknown toy benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    out = []
    for i in range(limit):
        scene = make_scene(HELDOUT + seed * 1_000_003 + i, task)
        qa = make_qa(scene, task)
        kind = _TYPES[task.split("-")[0]]
        options, answer = {}, qa.answer
        if kind == "choice":
            options = dict(zip(_LETTERS, qa.options))
            answer = _LETTERS[qa.options.index(qa.answer)]
        meta = {
            "benchmark": name,
            "task": task,
            "category": task,
            "seed": scene.seed,
            "answer_text": qa.answer,
            "reasoning": reasoning_text(reasoning, qa.about, scene.seed),
            "objects": [o.name for o in scene.objects],
            "background": scene.background,
            **qa.meta,
        }
        if task == "caption":
            meta["vocabulary"] = [f"{c} {k}" for k in KINDS for c in COLOURS]
        out.append(ToySample(f"{task}-{scene.seed}", [scene.image], qa.question, options, answer, kind, meta))
    return out
