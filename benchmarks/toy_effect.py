"""What rescaling does to the toy model: census, a sweep tuned on dev scenes, and vanilla vs
the tuned config vs as many randomly placed heads on held-out scenes, with intervals.

    python benchmarks/toy_effect.py --out DIR [--weights DIR] [--limit 500] [--sweep-limit 300]

Steps (scene seeds never used in training; each step's own seed):

1. census (`benchmarks/toy_census.py`) on dev seed 1: S_v of every head on every toy
   benchmark, and a config selecting about 6.4% of heads (``DIR/census``);
2. ``headgain sweep`` around that config on ``toy:exist-adversarial``: tuned on seed 1,
   reported on seed 2 (``DIR/sweep``);
3. ``headgain eval`` on seed 3 of every toy benchmark: vanilla, the tuned config, and the
   same config with ``shuffle_seed`` (its gains on as many heads per layer, at random
   places: the control) (``DIR/eval-<task>``);
4. ``DIR/effect.md``: one table of every benchmark's metrics and paired differences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import toy_census
from headgain import HeadGainConfig
from headgain.cli import main as cli
from headgain.toy import WEIGHTS

TASKS = ("exist", "exist-popular", "exist-adversarial", "colour", "count", "position", "caption")
#: The metric reported per benchmark (CHAIR_i for captions: lower is better).
METRICS = {"caption": ("chair_i", "chair_s", "accuracy")}


def _run(argv: list[str]) -> None:
    start = time.time()
    print("$ headgain " + " ".join(argv), flush=True)
    if cli(argv) != 0:
        raise SystemExit(f"headgain {argv[0]} failed")
    print(f"({time.time() - start:.0f} s)", flush=True)


def table(out: str) -> list[str]:
    """Markdown rows: per benchmark and metric, vanilla, tuned and control values and the
    paired differences with their 95% intervals and McNemar p-values."""
    rows = [
        "| benchmark | metric | vanilla | tuned | control | tuned - vanilla [95% CI] (p) "
        "| control - vanilla [95% CI] (p) |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for task in TASKS:
        path = os.path.join(out, f"eval-{task}", "summary.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            summary = json.load(f)
        arms = summary["arms"]
        for metric in METRICS.get(task, ("accuracy",)):
            cells = []
            for arm in ("tuned", "control"):
                c = next(c for c in summary["comparisons"] if c["arm"] == arm and c["metric"] == metric)
                p = "" if c["p_value"] is None else f" (p {c['p_value']:.2g})"
                cells.append(f"{c['delta']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]{p}")
            values = " | ".join(f"{arms[a][metric]:.3f}" for a in ("vanilla", "tuned", "control"))
            rows.append(f"| toy:{task} (n {summary['n']}) | {metric} | {values} | {' | '.join(cells)} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--weights", default=WEIGHTS, help="toy model folder (default: the shipped weights)")
    p.add_argument("--census-limit", type=int, default=100, help="census samples per benchmark (seed 1)")
    p.add_argument("--sweep-limit", type=int, default=300, help="dev and held-out samples of the sweep")
    p.add_argument("--limit", type=int, default=500, help="held-out samples per benchmark (seed 3)")
    p.add_argument("--caption-limit", type=int, default=200, help="held-out caption samples (seed 3)")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the control's random heads")
    p.add_argument(
        "--reasoning", type=int, default=16, help="words of reasoning text before the answers (sweep and eval)"
    )
    args = p.parse_args(argv)
    model = [] if args.weights == WEIGHTS else ["--model", args.weights]
    common = [*model, "--device", "cpu", "--batch", "16", "--max-new-tokens", "40", "--no-progress"]
    common += ["--reasoning", str(args.reasoning)]
    census_dir = os.path.join(args.out, "census")
    toy_census.main(["--weights", args.weights, "--seed", "1", "--limit", str(args.census_limit), "--out", census_dir])
    sweep_dir = os.path.join(args.out, "sweep")
    _run(
        ["sweep", "--bench", "toy:exist-adversarial", "--dev-split", "1", "--split", "2"]
        + ["--limit", str(args.sweep_limit), "--config", os.path.join(census_dir, "suggested_config.json")]
        + ["--out", sweep_dir, *[a for a in common if a != "--no-progress"]]
    )
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        result = json.load(f)
    tuned = HeadGainConfig.from_dict(result["configs"][result["chosen"]]["cfg"])
    configs = {"tuned": tuned, "control": tuned.replace(shuffle_seed=args.shuffle_seed)}
    for name, cfg in configs.items():
        cfg.to_json(os.path.join(args.out, f"{name}.json"))
    for task in TASKS:
        limit = args.caption_limit if task == "caption" else args.limit
        _run(
            ["eval", "--bench", f"toy:{task}", "--seed", "3", "--limit", str(limit), "--reps", "1000"]
            + ["--configs", *(os.path.join(args.out, f"{n}.json") for n in configs)]
            + ["--out", os.path.join(args.out, f"eval-{task}"), *common]
        )
    lines = [f"tuned config ({result['chosen']}): `{tuned.to_json().replace(chr(10), ' ')}`", "", *table(args.out)]
    with open(os.path.join(args.out, "effect.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
