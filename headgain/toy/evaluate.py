"""Measure a saved toy model on held-out scenes and record it in its ``metrics.json``.

    python -m headgain.toy.evaluate [--weights DIR] [--scenes 300] [--sweep 0 16 64 128 256]

The weights are read back from ``DIR`` as they are shipped (bfloat16, computed in
float32). ``heldout``: accuracy of every task at the default reasoning length;
``reasoning_sweep``: accuracy of the existence, colour and count tasks against the
number of reasoning words before the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from . import WEIGHTS, load
from .model import heldout
from .scenes import DEFAULT_REASONING, HELDOUT, TASKS

__all__ = ["SWEEP_TASKS", "record", "main"]

#: Tasks measured against the reasoning length.
SWEEP_TASKS = ("exist", "exist-popular", "exist-adversarial", "colour", "count")


def record(path: str, scenes: int, sweep: tuple[int, ...] = (), sweep_scenes: int = 200, log=print) -> dict:
    """Evaluate the weights in ``path`` and merge the results into ``path/metrics.json``;
    returns the merged record."""
    model, processor = load(path=path)
    metrics_path = os.path.join(path, "metrics.json")
    metrics = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
    start = time.time()
    tasks = heldout(model, processor, scenes)
    metrics["heldout"] = {"reasoning": DEFAULT_REASONING, "first_seed": HELDOUT, "scenes": scenes, "tasks": tasks}
    log(
        "held-out: "
        + ", ".join(f"{t} {m['accuracy']:.3f}" for t, m in tasks.items())
        + f" ({time.time() - start:.0f} s)"
    )
    if sweep:
        metrics["reasoning_sweep"] = {"scenes": sweep_scenes, "accuracy": {}}
        for words in sweep:
            acc = heldout(model, processor, sweep_scenes, reasoning=words, tasks=SWEEP_TASKS)
            metrics["reasoning_sweep"]["accuracy"][str(words)] = {t: m["accuracy"] for t, m in acc.items()}
            log(f"reasoning {words} words: " + ", ".join(f"{t} {m['accuracy']:.3f}" for t, m in acc.items()))
    with open(metrics_path, "w") as f:
        json.dump(metrics, f, indent=1, sort_keys=True)
    return metrics


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=WEIGHTS, help="toy model folder (default: the shipped weights)")
    p.add_argument("--scenes", type=int, default=300, help=f"held-out scenes per task ({', '.join(TASKS)})")
    p.add_argument("--sweep", type=int, nargs="*", default=[], help="reasoning lengths (words) to measure")
    p.add_argument("--sweep-scenes", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    record(args.weights, args.scenes, tuple(args.sweep), args.sweep_scenes, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
