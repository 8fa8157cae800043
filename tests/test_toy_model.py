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
