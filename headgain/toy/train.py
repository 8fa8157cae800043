"""Train the toy model from a seed on drawn scenes (CPU is enough).

    python -m headgain.toy.train --seed 0 --out DIR [--steps N] [--batch B] [--lr LR]

Each training row is one picture and 1-3 questions about it (a short dialogue); the loss
is the cross-entropy of the answers (and the ``<|im_end|>`` after them) only. A curriculum
(`CURRICULUM`) starts with one large object per scene and short reasoning texts, so that
the vision tower learns colours and kinds before the model has to tell objects apart. Scene seeds
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
from .scenes import HELDOUT, Scene, make_qa, make_scene

__all__ = ["TASK_WEIGHTS", "CURRICULUM", "curriculum", "sample_dialogue", "train", "save", "main"]

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
#: Curriculum: (fraction of the steps, most objects per scene until then, zoom of a single
#: object); full scenes after.
CURRICULUM = ((0.12, 1, 2.5), (0.3, 2, 1.0), (0.4, 3, 1.0))


def _reasoning_words(rng: random.Random, long: bool, short: bool = False) -> int:
    """Mostly short reasoning (the default length and below); ``long`` allows up to 64 words,
    ``short`` (early in the curriculum) at most 8."""
    r = rng.random()
    if r < 0.25:
        return 0
    if short:
        return rng.randint(1, 8)
    if r < 0.8 or not long:
        return rng.randint(1, 20)
    return rng.randint(21, 64)


def curriculum(step: int, steps: int) -> tuple[int, float]:
    """(most objects per scene, zoom of a single object) at ``step`` of ``steps`` (see `CURRICULUM`)."""
    for fraction, most, zoom in CURRICULUM:
        if step < fraction * steps:
            return most, zoom
    return 9, 1.0


def _fits(scene: Scene, task: str) -> bool:
    if task == "colour":
        kinds = [o.kind for o in scene.objects]
        return any(kinds.count(k) == 1 for k in kinds)
    if task == "position":
        return len(scene.objects) >= 2
    return True


def sample_dialogue(rng: random.Random, most: int = 9, zoom: float = 1.0) -> tuple[Scene, list]:
    """A training row: a scene of at most ``most`` objects (a single one enlarged by ``zoom``)
    drawn for a task and 1-3 questions about it, each with its reasoning length and seed (see
    `headgain.toy.model.messages`)."""
    tasks, weights = list(TASK_WEIGHTS), list(TASK_WEIGHTS.values())
    first = rng.choices(tasks, weights)[0]
    while first == "position" and most < 2:
        first = rng.choices(tasks, weights)[0]
    scene = make_scene(rng.randrange(HELDOUT), first, max_objects=most, zoom=zoom)
    turns = []
    count = rng.randint(1, 3)
    for k in range(count):
        task = first if k == 0 else rng.choices(tasks, weights)[0]
        if not _fits(scene, task):
            continue
        qa = make_qa(scene, task, seed=scene.seed * 4 + k)
        turns.append((qa, _reasoning_words(rng, long=count == 1, short=most < 9), rng.randrange(HELDOUT)))
    return scene, turns


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


def train(args, log=print) -> tuple[torch.nn.Module, object, list[float]]:
    """Train per ``args`` (see `main`); returns (model, processor, the loss of every step)."""
    torch.manual_seed(args.seed)
    rng = random.Random(f"train-{args.seed}")
    processor = build_processor()
    model = tf.Qwen2_5_VLForConditionalGeneration._from_config(
        toy_config(processor), attn_implementation="sdpa", dtype=torch.float32
    )
    params = sum(p.numel() for p in model.parameters())
    log(f"toy model: {params / 1e6:.2f} M parameters, {TOY}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    losses: list[float] = []
    start = time.time()
    metrics = {"args": vars(args), "parameters": params, "sizes": TOY}
    for step in range(args.steps):
        model.train()
        most, zoom = curriculum(step, args.steps)
        batch = train_batch(processor, [sample_dialogue(rng, most, zoom) for _ in range(args.batch)])
        for group in opt.param_groups:
            group["lr"] = _lr(step, args.steps, args.warmup, args.lr)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0:
            recent = losses[-args.log_every :]
            lr = _lr(step, args.steps, args.warmup, args.lr)
            log(f"step {step + 1} loss {sum(recent) / len(recent):.4f} lr {lr:.2e} {time.time() - start:.0f} s")
        if args.out and args.eval_every and (step + 1) % args.eval_every == 0:
            quick = heldout(model, processor, 64, tasks=("exist-adversarial", "colour", "count"))
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
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-scenes", type=int, default=300, help="held-out scenes per task at the end (0: none)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    train(args, log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
