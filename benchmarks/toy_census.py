"""Head census of the toy model on its benchmarks: where the high-S_v and low-S_v heads are,
and a config suggested from them (the toy's 8 layers x 8 heads; the paper presets select
too many heads there).

    python benchmarks/toy_census.py --seed 1 --limit 100 --out DIR [--weights DIR] [--target 0.064]

For each toy benchmark (``--tasks``), ``--limit`` samples of scene seed ``--seed`` (use a
dev seed, not the one you report on) are prompted as ``headgain eval`` prompts them, and
S_v of every head is read at the prompt's last token (`headgain.analysis.census`). Writes
``census.json`` (all samples; mean, quantiles, classes under the suggested config),
``by_task.json`` (mean S_v per layer and task), ``visual_ratio.png``, ``classes.png`` and
``suggested_config.json``, and prints a per-layer table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from headgain import HeadGainConfig
from headgain.analysis import plots
from headgain.analysis.census import Census, census
from headgain.eval.model import Prompter
from headgain.toy import WEIGHTS, load
from headgain.toy.bench import prompt, samples

TASKS = ("exist", "exist-popular", "exist-adversarial", "colour", "count", "position", "caption")


def task_census(model, processor, task: str, seed: int, limit: int, batch: int = 16) -> Census:
    """S_v of every head on ``limit`` samples of ``toy:<task>`` (scene seed ``seed``)."""
    items = samples(f"toy:{task}", seed=seed, limit=limit)
    prompter = Prompter(model, processor, prompt=prompt)
    batches = [prompter.inputs(items[i : i + batch]) for i in range(0, len(items), batch)]
    return census(model, batches, progress=False)


def layer_table(result: Census) -> list[str]:
    """Markdown rows per layer: mean S_v, and the heads of highest and lowest mean S_v."""
    mean = result.mean
    rows = ["| layer | mean S_v | highest head (S_v) | lowest head (S_v) |", "|---:|---:|---|---|"]
    for layer, values in enumerate(mean):
        hi, lo = int(values.argmax()), int(values.argmin())
        rows.append(f"| {layer} | {values.mean():.3f} | {hi} ({values[hi]:.3f}) | {lo} ({values[lo]:.3f}) |")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=WEIGHTS, help="toy model folder (default: the shipped weights)")
    p.add_argument("--seed", type=int, default=1, help="scene seed of the samples (default 1, a dev seed)")
    p.add_argument("--limit", type=int, default=100, help="samples per task (default 100)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--target", type=float, default=0.064, help="share of heads the suggested config selects")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, processor = load(path=args.weights)
    per_task = {t: task_census(model, processor, t, args.seed, args.limit) for t in args.tasks}
    result = Census(np.concatenate([c.samples for c in per_task.values()]), sum(c.skipped for c in per_task.values()))
    base = HeadGainConfig()  # gains and strategy of the default preset
    suggested = result.suggest(args.target, base=base)
    os.makedirs(args.out, exist_ok=True)
    result.save(os.path.join(args.out, "census.json"), cfg=suggested)
    suggested.to_json(os.path.join(args.out, "suggested_config.json"))
    by_task = {t: [round(float(v), 4) for v in c.mean.mean(1)] for t, c in per_task.items()}
    with open(os.path.join(args.out, "by_task.json"), "w") as f:
        json.dump({"seed": args.seed, "limit": args.limit, "mean_by_layer": by_task}, f, indent=1)
    plots.plot_ratio(result, os.path.join(args.out, "visual_ratio.png"), cfg=suggested)
    plots.plot_classes(
        result.classes(suggested),
        os.path.join(args.out, "classes.png"),
        title=f"toy model: head classes under the suggested config (target {args.target:.1%})",
        cfg=suggested,
    )
    print(f"{result.num_samples} samples ({', '.join(args.tasks)}; scene seed {args.seed})")
    print("\n".join(layer_table(result)))
    print("mean S_v per layer and task:")
    for task, values in by_task.items():
        print(f"  {task:18s} " + " ".join(f"{v:.3f}" for v in values))
    print("suggested config:\n  " + result.last_suggestion.report.replace("\n", "\n  "))
    print(suggested.to_json())


if __name__ == "__main__":
    main()
