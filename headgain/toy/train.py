"""Train the toy model from a seed on drawn scenes (CPU is enough).

    python -m headgain.toy.train --seed 0 --out DIR [--steps N] [--batch B] [--lr LR]

Each training row is one question, then its picture (``--turns`` > 1: more questions about
it after the answer, a short dialogue); the loss is the cross-entropy of the answers (and
the ``<|im_end|>`` after them), averaged per answer and then over the answers (a yes/no
weighs as much as a caption, whose many words would otherwise drown it), plus ``--aux``
times auxiliary losses of linear probes that are dropped after training (`VisionProbe`).
Each merged visual token covers one grid cell of the scene; the probes read from it the
colour and the kind of the object in that cell (or none, against the decoder's own word
embeddings) and the cell's place, and, from the decoder's middle layer at the same token,
whether that object is the one the question asks about (`match_targets`; the question
comes before the picture). The first stand in for the pretrained vision encoder of a real
VLM, the last for its long training. The probes read the visual tokens magnified and a
norm term keeps them at a word's scale (`VisionProbe.loss`): read at their own scale they
grew to a hundred times a word embedding's norm, and the decoder, whose layers could no
longer change them, answered existence at chance. Even so, answers stay at chance for
the first ~800 steps and then rise (the log shows it). A curriculum (`CURRICULUM`) starts
with few objects per scene. Scene seeds come from ``--seed``; held-out scenes use seeds
from `HELDOUT` upwards, which training never draws.
Every ``--eval-every`` steps a quick held-out accuracy is logged and the weights are saved
to ``DIR`` (bfloat16 safetensors, the processor and ``metrics.json``); at the end the
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
from .scenes import COLOURS, GRID, HELDOUT, KINDS, QA, Scene, make_qa, make_scene, plural

__all__ = [
    "TASK_WEIGHTS",
    "CURRICULUM",
    "PROBE_SCALE",
    "curriculum",
    "sample_dialogue",
    "cell_targets",
    "VisionProbe",
    "match_targets",
    "answer_ids",
    "answer_loss_sum",
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
#: How much the vision probes magnify the visual tokens they read (`VisionProbe.loss`).
PROBE_SCALE = 20.0
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


def sample_dialogue(rng: random.Random, most: int = 9, most_turns: int = 1) -> tuple[Scene, list]:
    """A training row: a scene of at most ``most`` objects drawn for a task and 1 to
    ``most_turns`` questions about it (the first before the picture, the others after the
    answers), each with its reasoning length and seed (see
    `headgain.toy.model.messages`)."""
    tasks, weights = list(TASK_WEIGHTS), list(TASK_WEIGHTS.values())
    first = rng.choices(tasks, weights)[0]
    while first == "position" and most < 2:
        first = rng.choices(tasks, weights)[0]
    scene = make_scene(rng.randrange(HELDOUT), first, max_objects=most)
    turns = []
    count = rng.randint(1, most_turns)
    for k in range(count):
        task = first if k == 0 else rng.choices(tasks, weights)[0]
        if not _fits(scene, task):
            continue
        qa = make_qa(scene, task, seed=scene.seed * 4 + k)
        turns.append((qa, _reasoning_words(rng, long=count == 1), rng.randrange(HELDOUT)))
    return scene, turns


def cell_targets(scenes: list[Scene]) -> torch.Tensor:
    """Per scene and grid cell (raster order, the order of the merged visual tokens) the colour
    and kind indices of the object there (``len(COLOURS)`` / ``len(KINDS)`` where none), the
    cell's row and its column: int64 ``(len(scenes) * GRID**2, 4)``."""
    cells = torch.tensor([[len(COLOURS), len(KINDS), r, c] for r in range(GRID) for c in range(GRID)])
    out = cells.repeat(len(scenes), 1)
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            out[i * GRID * GRID + o.cell[0] * GRID + o.cell[1], :2] = torch.tensor(
                [COLOURS.index(o.colour), KINDS.index(o.kind)]
            )
    return out


def match_targets(scene: Scene, qa: QA) -> list[int]:
    """Per grid cell (raster order) whether its object is the one ``qa`` asks about: 1 (the
    named object, the kind of a colour or count question, the first object of a position
    question), 2 (the second object of a position question) or 0; all -100 (no target) for
    a caption."""
    words = qa.question.split()
    if qa.task == "caption":
        return [-100] * GRID * GRID
    if qa.task == "position":
        first, second = " ".join(words[2:4]), " ".join(words[-3:-1])
        match = {o.cell: 1 if o.name == first else 2 if o.name == second else 0 for o in scene.objects}
    elif qa.task.startswith("exist"):
        match = {o.cell: int(o.name == qa.about) for o in scene.objects}
    else:  # colour: the kind named; count: its plural
        match = {o.cell: int(qa.about in (o.kind, plural(o.kind))) for o in scene.objects}
    return [match.get((r, c), 0) for r in range(GRID) for c in range(GRID)]


class VisionProbe(torch.nn.Module):
    """A linear read-out of colour and kind (each with a "none" class) and of the cell's row
    and column from the merged visual tokens, hooked on the vision tower of ``model``;
    `loss` is its cross-entropy on the tokens of the last forward pass. (The row and column
    put each token's place into its content: the decoder's rotary positions hardly tell
    the 4 x 4 tokens apart, their height and width use its lowest frequencies.)"""

    def __init__(self, model, processor):
        super().__init__()
        hidden = model.config.text_config.hidden_size
        self.embed = [model.get_input_embeddings()]  # a list: the model's, not a parameter of the probe
        ids = processor.tokenizer.convert_tokens_to_ids
        self.words = [torch.tensor(ids(list(COLOURS))), torch.tensor(ids(list(KINDS)))]
        self.none = torch.nn.Linear(hidden, 2)  # the "no object here" logit of colour and of kind
        self.place = torch.nn.ModuleList(torch.nn.Linear(hidden, GRID) for _ in range(2))
        self.match = torch.nn.Linear(hidden, 3)  # on the decoder's middle layer (`match_loss`)
        self.image_id = model.config.image_token_id
        self.layer = model.config.text_config.num_hidden_layers // 2
        self.tokens: torch.Tensor | None = None
        model.model.visual.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.tokens = output.pooler_output  # float32 (images * GRID**2, hidden), raster order

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        """Sum of the cross-entropies of colour, kind, row and column against ``targets``
        (`cell_targets`), plus the squared log-ratio of each token's norm to the mean norm of
        the word embeddings. Colour and kind are read against the decoder's own embeddings
        of the colour and kind words, so a token shows its object as the words that name it;
        the probes read the tokens magnified `PROBE_SCALE` times and the norm term holds them
        at the scale of a word, so that the decoder's layers can still change them (read at
        their own scale, the tokens grew to a hundred times a word's norm, and the question
        could not reach them)."""
        ce = torch.nn.functional.cross_entropy
        tokens = self.tokens
        embed = self.embed[0].weight
        word = embed.norm(dim=-1).mean().detach()
        out = ((tokens.norm(dim=-1) / word).log() ** 2).mean()
        seen = tokens * PROBE_SCALE
        none = self.none(seen)
        for i, words in enumerate(self.words):
            logits = torch.cat([seen @ embed[words].T, none[:, i : i + 1]], 1)
            out = out + ce(logits, targets[:, i])
        return out + sum(ce(head(seen), targets[:, 2 + i]) for i, head in enumerate(self.place))

    def match_loss(self, hidden_states: tuple, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of `match_targets` (``targets``, int64 (B * GRID**2,)) read linearly
        from the decoder's middle layer at the picture's tokens: they learn to tell whether
        they hold the object the question (placed before the picture) asks about."""
        states = hidden_states[self.layer][input_ids == self.image_id]  # (B * GRID**2, hidden)
        return torch.nn.functional.cross_entropy(self.match(states), targets, ignore_index=-100)


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


def answer_ids(labels: torch.Tensor) -> torch.Tensor:
    """Which answer each target of ``labels`` (B, N) belongs to: (B, N) int64, the number of
    the run of targets (an answer and its ``<|im_end|>``) counted over the batch, -1 where
    there is no target."""
    target = labels != -100
    start = target & ~torch.nn.functional.pad(target[:, :-1], (1, 0))
    return torch.where(target, start.flatten().cumsum(0).view_as(labels) - 1, -1)


def answer_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the answers of ``labels`` (B, N) of each answer's mean cross-entropy under
    ``logits`` (B, N, V) (token j predicted at j - 1), so that a one-word answer weighs as
    much as a caption."""
    labels = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
    ids = answer_ids(labels)
    keep = ids >= 0
    n = int(ids.max()) + 1
    sums = torch.zeros(n, dtype=ce.dtype).index_add(0, ids[keep], ce[keep])
    return (sums / torch.bincount(ids[keep], minlength=n)).sum()


def _backward(model, probe: VisionProbe, processor, rows: list, parts: int, aux_weight: float) -> tuple[float, float]:
    """Accumulate the gradient of the answer loss (the mean over answers of each answer's mean
    cross-entropy) plus ``aux_weight`` times the probe's loss on ``rows``, run as ``parts``
    micro-batches of rows of similar lengths (less padding), each weighted as in one batch;
    returns (answer loss, probe loss)."""
    rows = sorted(rows, key=_tokens)
    chunks = [rows[i * len(rows) // parts : (i + 1) * len(rows) // parts] for i in range(parts)]
    chunks = [c for c in chunks if c]
    batches = [train_batch(processor, chunk) for chunk in chunks]
    answers = sum(int(answer_ids(b["labels"][:, 1:]).max()) + 1 for b in batches)
    loss = aux = 0.0
    for chunk, batch in zip(chunks, batches):
        labels = batch.pop("labels")
        out = model(**batch, output_hidden_states=True)
        part_loss = answer_loss_sum(out.logits, labels) / answers
        matches = torch.tensor([m for scene, turns in chunk for m in match_targets(scene, turns[0][0])])
        part_aux = probe.loss(cell_targets([scene for scene, _ in chunk]))
        part_aux = (part_aux + probe.match_loss(out.hidden_states, batch["input_ids"], matches)) * (
            len(chunk) / len(rows)
        )
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
    probe = VisionProbe(model, processor)
    opt = torch.optim.AdamW(
        [*model.parameters(), *probe.parameters()], lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01
    )
    losses: list[float] = []  # answer loss per step (the probe's apart)
    aux_losses: list[float] = []
    start = time.time()
    metrics = {"args": vars(args), "parameters": params, "sizes": TOY}
    for step in range(args.steps):
        model.train()
        rows = [sample_dialogue(rng, curriculum(step, args.steps), args.turns) for _ in range(args.batch)]
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
    p.add_argument("--steps", type=int, default=2600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--turns", type=int, default=1, help="most questions per picture in a training row")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--parts", type=int, default=4, help="micro-batches per step, rows of similar lengths together")
    p.add_argument("--aux", type=float, default=1.0, help="weight of the vision probe's loss (0: none)")
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
