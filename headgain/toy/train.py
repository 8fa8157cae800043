"""Train the toy model from a seed on drawn scenes (CPU is enough).

    python -m headgain.toy.train --seed 0 --out DIR [--steps N] [--batch B] [--lr LR]

Each training row is one picture and 1-3 questions about it (a short dialogue); the loss
is the cross-entropy of the answers (and the ``<|im_end|>`` after them), plus ``--aux``
times an auxiliary loss on the vision tower (`VisionProbe`): each merged visual token
covers one grid cell of the scene, and a linear probe (dropped after training) reads the
colour and the kind of the object in that cell (or none) from it. The probe stands in
for the pretrained vision encoder of a real VLM: without it the tower learns colours
slowly and shapes hardly at all within the budget, and the decoder falls back on answer
priors (existence at chance). A curriculum (`CURRICULUM`) starts with few objects per scene. Scene seeds
come from ``--seed``; held-out scenes use seeds from `HELDOUT` upwards, which training never
draws. Every ``--eval-every`` steps a quick held-out accuracy is logged and the weights are
saved to ``DIR`` (bfloat16 safetensors, the processor and ``metrics.json``); at the end the
saved weights are read back and their held-out accuracy is recorded
(`headgain.toy.evaluate.record`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import torch
import transformers as tf

from .evaluate import record
from .model import TOY, heldout, toy_config, train_batch
from .processor import build_processor
from .scenes import COLOURS, GRID, HELDOUT, KINDS, Scene, make_qa, make_scene

__all__ = [
    "TASK_WEIGHTS",
    "CURRICULUM",
    "curriculum",
    "sample_dialogue",
    "cell_targets",
    "VisionProbe",
    "train",
    "save",
    "main",
]

#: How often each task is asked in training.
TASK_WEIGHTS = {
    "exist": 0.12,
    "exist-popular": 0.12,
    "exist-adversarial": 0.18,
    "colour": 0.15,
    "count": 0.15,
    "position": 0.08,
    "caption": 0.2,
}
#: Curriculum: (fraction of the steps, most objects per scene until then); full scenes after.
CURRICULUM = ((0.04, 1), (0.1, 2), (0.2, 3))


def _reasoning_words(rng: random.Random, long: bool) -> int:
    """Mostly short reasoning (the default length and below); ``long`` allows up to 64 words."""
    r = rng.random()
    if r < 0.25:
        return 0
    if r < 0.8 or not long:
        return rng.randint(1, 20)
    return rng.randint(21, 64)


def curriculum(step: int, steps: int) -> int:
    """The most objects per scene at ``step`` of ``steps`` (see `CURRICULUM`)."""
    for fraction, most in CURRICULUM:
        if step < fraction * steps:
            return most
    return 9


def _fits(scene: Scene, task: str) -> bool:
    if task == "colour":
        kinds = [o.kind for o in scene.objects]
        return any(kinds.count(k) == 1 for k in kinds)
    if task == "position":
        return len(scene.objects) >= 2
    return True


def sample_dialogue(rng: random.Random, most: int = 9) -> tuple[Scene, list]:
    """A training row: a scene of at most ``most`` objects drawn for a task and 1-3 questions
    about it, each with its reasoning length and seed (see
    `headgain.toy.model.messages`)."""
    tasks, weights = list(TASK_WEIGHTS), list(TASK_WEIGHTS.values())
    first = rng.choices(tasks, weights)[0]
    while first == "position" and most < 2:
        first = rng.choices(tasks, weights)[0]
    scene = make_scene(rng.randrange(HELDOUT), first, max_objects=most)
    turns = []
    count = rng.randint(1, 3)
    for k in range(count):
        task = first if k == 0 else rng.choices(tasks, weights)[0]
        if not _fits(scene, task):
            continue
        qa = make_qa(scene, task, seed=scene.seed * 4 + k)
        turns.append((qa, _reasoning_words(rng, long=count == 1), rng.randrange(HELDOUT)))
    return scene, turns


def cell_targets(scenes: list[Scene]) -> torch.Tensor:
    """Per scene and grid cell (raster order, the order of the merged visual tokens) the colour
    and kind indices of the object there, ``len(COLOURS)`` / ``len(KINDS)`` where none:
    int64 ``(len(scenes) * GRID**2, 2)``."""
    out = torch.tensor([len(COLOURS), len(KINDS)]).repeat(len(scenes) * GRID * GRID, 1)
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            out[i * GRID * GRID + o.cell[0] * GRID + o.cell[1]] = torch.tensor(
                [COLOURS.index(o.colour), KINDS.index(o.kind)]
            )
    return out


class VisionProbe(torch.nn.Module):
    """A linear read-out of colour and kind (each with a "none" class) from the merged visual
    tokens, hooked on the vision tower of ``model``; `loss` is its cross-entropy on the
    tokens of the last forward pass."""

    def __init__(self, model):
        super().__init__()
        hidden = model.config.text_config.hidden_size
        self.colour = torch.nn.Linear(hidden, len(COLOURS) + 1)
        self.kind = torch.nn.Linear(hidden, len(KINDS) + 1)
        self.tokens: torch.Tensor | None = None
        model.model.visual.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.tokens = output.pooler_output  # float32 (images * GRID**2, hidden), raster order

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of colour plus kind against ``targets`` (`cell_targets`)."""
        ce = torch.nn.functional.cross_entropy
        return ce(self.colour(self.tokens), targets[:, 0]) + ce(self.kind(self.tokens), targets[:, 1])


def save(model, processor, out: str, metrics: dict) -> None:
    """Weights (bfloat16 safetensors), config, processor and ``metrics.json`` into ``out``."""
    os.makedirs(out, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)
    processor.save_pretrained(out)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, sort_keys=True)


def _lr(step: int, steps: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _tokens(row: tuple[Scene, list]) -> int:
    """About how many tokens a training row takes (its words and the template's)."""
    return sum(words + len(qa.question.split()) + len(qa.answer.split()) + 8 for qa, words, _ in row[1])


def _backward(model, probe: VisionProbe, processor, rows: list, parts: int, aux_weight: float) -> tuple[float, float]:
    """Accumulate the gradient of the answer loss plus ``aux_weight`` times the probe's loss on
    ``rows``, run as ``parts`` micro-batches of rows of similar lengths (less padding), each
    weighted as in one batch (answer tokens, pictures); returns (answer loss, probe loss)."""
    rows = sorted(rows, key=_tokens)
    chunks = [rows[i * len(rows) // parts : (i + 1) * len(rows) // parts] for i in range(parts)]
    batches = [train_batch(processor, chunk) for chunk in chunks if chunk]
    answers = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    loss = aux = 0.0
    for chunk, batch, n in zip([c for c in chunks if c], batches, answers):
        part_loss = model(**batch).loss * (n / sum(answers))
        part_aux = probe.loss(cell_targets([scene for scene, _ in chunk])) * (len(chunk) / len(rows))
        (part_loss + aux_weight * part_aux).backward()
        loss, aux = loss + part_loss.item(), aux + part_aux.item()
    return loss, aux


def train(args, log=print) -> tuple[torch.nn.Module, object, list[float]]:
    """Train per ``args`` (see `main`); returns (model, processor, the answer loss of every step)."""
    torch.manual_seed(args.seed)
    rng = random.Random(f"train-{args.seed}")
    processor = build_processor()
    model = tf.Qwen2_5_VLForConditionalGeneration._from_config(
        toy_config(processor), attn_implementation="sdpa", dtype=torch.float32
    )
    params = sum(p.numel() for p in model.parameters())
    log(f"toy model: {params / 1e6:.2f} M parameters, {TOY}")
    probe = VisionProbe(model)
    opt = torch.optim.AdamW(
        [*model.parameters(), *probe.parameters()], lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01
    )
    losses: list[float] = []  # answer loss per step (the probe's apart)
    aux_losses: list[float] = []
    start = time.time()
    metrics = {"args": vars(args), "parameters": params, "sizes": TOY}
    for step in range(args.steps):
        model.train()
        rows = [sample_dialogue(rng, curriculum(step, args.steps)) for _ in range(args.batch)]
        for group in opt.param_groups:
            group["lr"] = _lr(step, args.steps, args.warmup, args.lr)
        opt.zero_grad(set_to_none=True)
        loss, aux = _backward(model, probe, processor, rows, args.parts, args.aux)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss)
        aux_losses.append(aux)
        if (step + 1) % args.log_every == 0:
            recent, recent_aux = losses[-args.log_every :], aux_losses[-args.log_every :]
            lr = _lr(step, args.steps, args.warmup, args.lr)
            log(
                f"step {step + 1} loss {sum(recent) / len(recent):.4f} probe {sum(recent_aux) / len(recent_aux):.4f}"
                f" lr {lr:.2e} {time.time() - start:.0f} s"
            )
        if args.out and args.eval_every and (step + 1) % args.eval_every == 0:
            quick = heldout(model, processor, 64, tasks=("exist", "exist-adversarial", "colour", "count", "position"))
            log(
                f"step {step + 1} held-out (64 scenes): "
                + ", ".join(f"{t} {m['accuracy']:.2f}" for t, m in quick.items())
            )
            save(model, processor, args.out, dict(metrics, steps_done=step + 1, seconds=time.time() - start))
    metrics.update(steps_done=args.steps, seconds=time.time() - start, final_loss=losses[-1] if losses else None)
    if args.out:
        save(model, processor, args.out, metrics)
        if args.eval_scenes:
            record(args.out, args.eval_scenes, log=log)
    return model, processor, losses


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m headgain.toy.train``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the weights, processor and metrics.json")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--parts", type=int, default=4, help="micro-batches per step, rows of similar lengths together")
    p.add_argument("--aux", type=float, default=1.0, help="weight of the vision probe's loss (0: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-scenes", type=int, default=300, help="held-out scenes per task at the end (0: none)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    train(args, log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
