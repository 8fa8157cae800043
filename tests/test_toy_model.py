"""The shipped toy model: it loads, reproduces its recorded held-out accuracy, and the
training script's first steps lower the loss."""

from __future__ import annotations

import math

import pytest
import torch

from headgain.toy import load, metrics
from headgain.toy.model import TOY, accuracy
from headgain.toy.scenes import HELDOUT
from headgain.toy.train import parser, train

#: Held-out scenes per task here (the record used more: these are its first ones).
SCENES = 160


@pytest.fixture(scope="module")
def toy():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load()
    torch.set_num_threads(threads)


def test_load_gives_the_recorded_architecture(toy):
    model, processor = toy
    text = model.config.text_config
    assert model.config.model_type == "qwen2_5_vl" and not model.training
    assert (text.num_hidden_layers, text.num_attention_heads, text.hidden_size) == (
        TOY["layers"],
        TOY["heads"],
        TOY["hidden"],
    )
    assert text.vocab_size == len(processor.tokenizer)
    assert metrics()["sizes"] == TOY


@pytest.mark.parametrize("task", ["exist", "exist-popular", "exist-adversarial", "colour", "count"])
def test_shipped_weights_reproduce_the_recorded_accuracy(toy, task):
    model, processor = toy
    record = metrics()["heldout"]
    assert record["first_seed"] == HELDOUT and record["scenes"] >= SCENES
    expected = record["tasks"][task]["accuracy"]
    correct, total = accuracy(model, processor, task, range(HELDOUT, HELDOUT + SCENES), record["reasoning"])
    # a subset of the recorded scenes: within 3 binomial standard deviations (and one scene)
    tolerance = 3 * math.sqrt(max(expected * (1 - expected), 0.01) / total) + 1 / total
    assert abs(correct / total - expected) <= tolerance, (task, correct / total, expected)


def test_first_training_steps_lower_the_loss():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = parser().parse_args(["--steps", "12", "--batch", "6", "--warmup", "3", "--eval-every", "0"])
        _, _, losses = train(args, log=lambda msg: None)
    finally:
        torch.set_num_threads(threads)
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses


def test_answer_loss_weighs_every_answer_alike():
    import random

    from headgain.toy.model import train_batch
    from headgain.toy.processor import build_processor
    from headgain.toy.train import answer_loss_sum, sample_dialogue

    rows = [sample_dialogue(random.Random(1), 9, most_turns=3) for _ in range(5)]
    labels = train_batch(build_processor(), rows)["labels"]
    logits = torch.randn(*labels.shape, 100, generator=torch.Generator().manual_seed(0))
    # written here: walk each row, close an answer at the first position without a target
    total, answers = 0.0, 0
    for row in range(labels.shape[0]):
        run = []
        for j in range(1, labels.shape[1] + 1):
            if j < labels.shape[1] and labels[row, j] != -100:
                run.append(float(torch.nn.functional.cross_entropy(logits[row, j - 1], labels[row, j])))
            elif run:
                total, answers, run = total + sum(run) / len(run), answers + 1, []
    assert answers >= len(rows) and answers == sum(len(turns) for _, turns in rows)
    assert float(answer_loss_sum(logits, labels)) == pytest.approx(total, rel=1e-5)


def test_cell_targets_follow_the_objects():
    from headgain.toy.scenes import COLOURS, GRID, KINDS, make_scene
    from headgain.toy.train import cell_targets

    scenes = [make_scene(s, "count") for s in (3, 4)]
    targets = cell_targets(scenes)
    assert targets.shape == (2 * GRID * GRID, 4)
    for i, scene in enumerate(scenes):
        where = {o.cell: o for o in scene.objects}
        for r in range(GRID):
            for c in range(GRID):
                o = where.get((r, c))
                want = [len(COLOURS), len(KINDS)] if o is None else [COLOURS.index(o.colour), KINDS.index(o.kind)]
                assert targets[i * GRID * GRID + r * GRID + c].tolist() == [*want, r, c]


@pytest.mark.parametrize("task", ["exist-adversarial", "colour", "count", "position", "caption"])
def test_match_targets_mark_the_objects_asked_about(task):
    from headgain.toy.scenes import GRID, make_qa, make_scene, plural
    from headgain.toy.train import match_targets

    for seed in range(8):
        scene = make_scene(seed, task)
        qa = make_qa(scene, task)
        targets = match_targets(scene, qa)
        assert len(targets) == GRID * GRID
        if task == "caption":
            assert set(targets) == {-100}
            continue
        cells = {o.cell: o for o in scene.objects}
        for i, t in enumerate(targets):
            o = cells.get(divmod(i, GRID))
            if o is None:
                assert t == 0
            elif task == "position":  # "is the <a> left or right of the <b> ?"
                assert t == (
                    1
                    if f"the {o.name} " in qa.question.split(" or ")[0]
                    else 2
                    if qa.question.endswith(f"the {o.name} ?")
                    else 0
                )
            elif task == "exist-adversarial":
                assert t == int(f"a {o.name} in" in qa.question)
            else:
                assert t == int(f" {o.kind} " in qa.question or f" {plural(o.kind)} " in qa.question)
        if qa.answer not in ("no", "0"):
            assert 1 in targets
