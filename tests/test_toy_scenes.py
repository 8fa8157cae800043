"""Drawn scenes, their questions and the toy benchmarks: deterministic per seed and consistent
with what is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from headgain.eval.sample import Sample
from headgain.toy.bench import BENCHMARKS, samples
from headgain.toy.scenes import (
    _RGB,
    COLOURS,
    GRID,
    HELDOUT,
    IMAGE_SIZE,
    KINDS,
    TASKS,
    make_qa,
    make_scene,
    reasoning_text,
)

SEEDS = range(40)


@pytest.mark.parametrize("task", TASKS)
def test_scene_and_question_are_deterministic_per_seed(task):
    a, b = make_scene(3, task), make_scene(3, task)
    assert a.objects == b.objects and a.background == b.background
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert make_qa(a, task) == make_qa(b, task)
    others = [make_scene(s, task) for s in range(4, 10)]
    assert any(o.objects != a.objects for o in others)


def test_pictures_are_square_rgb_and_show_their_objects():
    scene = make_scene(11, "exist")
    assert scene.image.mode == "RGB" and scene.image.size == (IMAGE_SIZE, IMAGE_SIZE)
    pixels = np.asarray(scene.image)
    for obj in scene.objects:
        x, y = obj.centre
        if obj.kind != "triangle":  # a triangle's centre lies on its edge region only for small radii
            assert tuple(pixels[y, x]) != tuple(pixels[0, 0]), obj


@pytest.mark.parametrize("task", ["exist", "count"])
def test_each_object_lies_inside_its_cell_of_one_visual_token(task):
    cell = IMAGE_SIZE // GRID
    assert cell == 28  # 2 x 2 patches of 14 pixels: one merged visual token per cell
    for seed in range(12):
        scene = make_scene(seed, task)
        pixels = np.asarray(scene.image).astype(int)
        for obj in scene.objects:
            ink = (pixels == np.array(_RGB[obj.colour])).all(-1)
            own = np.zeros_like(ink)  # the cells of the objects of this colour
            for r, c in (o.cell for o in scene.objects if o.colour == obj.colour):
                own[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = True
            row, col = obj.cell
            assert ink[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell].sum() >= 30, (seed, obj)
            assert not ink[~own].any(), (seed, obj)


def test_existence_answers_follow_the_objects_and_the_sampling():
    kinds = {"exist": 0, "exist-popular": 0, "exist-adversarial": 0}
    for task in kinds:
        for seed in SEEDS:
            scene = make_scene(seed, task)
            qa = make_qa(scene, task)
            name = qa.question.removeprefix("is there a ").removesuffix(" in the image ?")
            assert (name in scene.names()) == (qa.answer == "yes")
            if task == "exist-adversarial" and qa.answer == "no":
                colour, kind = name.split()
                assert any(o.colour == colour or o.kind == kind for o in scene.objects)
            kinds[task] += qa.answer == "yes"
    assert all(5 < yes < 35 for yes in kinds.values()), kinds


def test_colour_count_and_position_answers_are_right():
    for seed in SEEDS:
        scene = make_scene(seed, "colour")
        qa = make_qa(scene, "colour")
        kind = qa.question.split()[-2]
        assert [o.colour for o in scene.objects if o.kind == kind] == [qa.answer]
        scene = make_scene(seed, "count")
        qa = make_qa(scene, "count")
        kind = qa.about.removesuffix("es" if qa.about.endswith("sses") else "s")
        assert int(qa.answer) == sum(o.kind == kind for o in scene.objects)
        scene = make_scene(seed, "position")
        qa = make_qa(scene, "position")
        words = qa.question.split()
        a = next(o for o in scene.objects if o.name == " ".join(words[2:4]))
        b = next(o for o in scene.objects if o.name == " ".join(words[-3:-1]))
        axis = 1 if qa.options == ["left", "right"] else 0
        before = a.cell[axis] < b.cell[axis]
        assert qa.answer == qa.options[0 if before else 1] and a.cell[axis] != b.cell[axis]


def test_reasoning_text_has_the_asked_length():
    for words in (0, 1, 16, 200):
        text = reasoning_text(words, "red circle", seed=5)
        assert len(text.split()) == words
    assert reasoning_text(30, "red circle", 5) == reasoning_text(30, "red circle", 5)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmarks_give_eval_samples(name):
    first, again = samples(name, seed=2, limit=6), samples(name, seed=2, limit=6)
    assert [s.id for s in first] == [s.id for s in again] and len({s.id for s in first}) == 6
    assert all(isinstance(s, Sample) for s in first)
    for s in first:
        assert s.answer_type in {"choice", "number", "yes_no", "text"}
        assert len(s.images) == 1 and s.meta["seed"] >= HELDOUT and s.meta["benchmark"] == name
        if s.answer_type == "choice":
            assert s.options[s.answer] == s.meta["answer_text"]
        if name == "toy:caption":
            assert all(o in s.answer for o in s.meta["objects"])
            assert len(s.meta["vocabulary"]) == len(KINDS) * len(COLOURS)
    assert samples(name, seed=3, limit=6)[0].id != first[0].id


def test_unknown_benchmark_is_refused():
    with pytest.raises(ValueError, match="toy:exist"):
        samples("toy:nothing")
