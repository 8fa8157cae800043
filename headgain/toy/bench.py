"""Built-in benchmarks on drawn scenes, generated on the fly (deterministic per seed).

Names (`BENCHMARKS`): ``toy:exist``, ``toy:exist-popular``, ``toy:exist-adversarial``
(POPE's three negative samplings), ``toy:colour``, ``toy:count``, ``toy:position`` and
``toy:caption`` (CHAIR: ``meta["objects"]`` lists the objects in the picture,
``meta["vocabulary"]`` every object a caption can name).

`samples` gives ``headgain.eval`` samples; the reasoning text the toy model expects
before its answer is in ``meta["reasoning"]``, and `prompt` builds the model's prompt
from it (``headgain eval`` uses it with the toy model).
"""

from __future__ import annotations

from ..eval.sample import Sample
from .model import chat_prompt
from .scenes import COLOURS, DEFAULT_REASONING, HELDOUT, KINDS, TASKS, make_qa, make_scene, reasoning_text

__all__ = ["BENCHMARKS", "samples", "prompt", "scene_seed"]

BENCHMARKS = tuple(f"toy:{t}" for t in TASKS)
_LETTERS = "ABCDEFGHIJ"
_TYPES = {"exist": "yes_no", "colour": "choice", "count": "number", "position": "choice", "caption": "text"}
#: Scene seeds of two benchmark seeds lie this far apart.
_STRIDE = 1_000_003


def scene_seed(seed: int, i: int) -> int:
    """The scene seed of sample ``i`` of benchmark seed ``seed``: ``HELDOUT + seed * 1_000_003 + i``
    (training draws its scenes below `HELDOUT`)."""
    return HELDOUT + seed * _STRIDE + i


def samples(name: str, seed: int = 0, limit: int = 100, reasoning: int = DEFAULT_REASONING) -> list[Sample]:
    """``limit`` samples of benchmark ``name`` (``"toy:count"``, ...) on the scenes
    `scene_seed` ``(seed, 0 .. limit - 1)``, with ``reasoning`` words of reasoning text in
    their meta. Seeds 0 and up never meet training scenes (nor each other below a million
    samples)."""
    task = name.removeprefix("toy:")
    if name not in BENCHMARKS:
        raise ValueError(f"unknown toy benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if seed < 0:
        raise ValueError(f"toy benchmark seed {seed} must be >= 0 (negative seeds reach training scenes)")
    out = []
    for i in range(limit):
        scene = make_scene(scene_seed(seed, i), task)
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
            "background": scene.background,
            **qa.meta,
        }
        if task == "caption":
            meta["vocabulary"] = [f"{c} {k}" for k in KINDS for c in COLOURS]
        else:  # CHAIR is computed where meta holds "objects": captions only
            meta["scene_objects"] = [o.name for o in scene.objects]
        out.append(Sample(f"{task}-{scene.seed}", [scene.image], qa.question, options, answer, kind, meta))
    return out


def prompt(processor, sample: Sample) -> str:
    """The toy model's prompt for ``sample``: the picture and the question, the assistant turn
    opened with ``meta["reasoning"]`` (`headgain.toy.model.chat_prompt`)."""
    return chat_prompt(processor, sample.question, sample.meta.get("reasoning", ""))
