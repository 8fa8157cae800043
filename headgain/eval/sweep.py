"""Tuning a config on a dev split and reporting it on the held-out rest.

`candidates` spans a grid (or random draws) of layer bounds, thresholds and gains around
a base config, for each asked strategy. `sweep` ranks them on the dev samples with
successive halving (all candidates on a small share of dev, the best 1/eta go on to eta
times more samples, ...), then runs vanilla and the winner on the held-out samples,
which no choice has seen.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..core.config import HeadGainConfig
from .extract import Judge
from .runner import VANILLA, Evaluator, evaluate
from .sample import Sample
from .summary import metric_functions, save_json

__all__ = ["candidates", "split_dev", "sweep", "selected_shares"]

LAYER_SHIFTS = (-2, 0, 2)
TAU_SCALES = (0.8, 1.0, 1.25)
GAIN_SCALES = (0.5, 1.0, 1.5)


def _clip_layer(value: int, num_layers: int) -> int:
    return min(max(value, 0), num_layers - 1)


def _gain(g: float, scale: float) -> float:
    return round(1.0 + (g - 1.0) * scale, 3)


def candidates(
    base: HeadGainConfig,
    num_layers: int,
    search: str = "grid",
    trials: int = 16,
    seed: int = 0,
    strategies: Sequence[str] = ("enhance",),
) -> dict[str, HeadGainConfig]:
    """Configs around ``base``, by name (``<strategy>-lp<l_perc>-lr<l_reas>-tp<tau_perc>-gp<g_perc>-gr<g_reas>``).

    grid: every combination of a shift of both layer bounds (`LAYER_SHIFTS`, clipped to
    the decoder's ``num_layers``), a scale of ``tau_perc`` (`TAU_SCALES`) and a scale of
    both gains' distance from 1 (`GAIN_SCALES`), per strategy. random: ``trials`` draws
    per strategy, layer bounds within 3 of the base's, ``tau_perc`` in [0.5, 1.5] times
    the base's and gains at 0 to 2 times their distance from 1, seeded by ``seed``.
    Duplicates (from clipping) are dropped; configs that do not validate are skipped.
    """
    if search not in ("grid", "random"):
        raise ValueError(f"search must be 'grid' or 'random', got {search!r}")
    points: list[tuple[int, float, float]] = []
    if search == "grid":
        points = [(s, t, g) for s in LAYER_SHIFTS for t in TAU_SCALES for g in GAIN_SCALES]
    else:
        rng = random.Random(seed)
        points = [(rng.randint(-3, 3), rng.uniform(0.5, 1.5), rng.uniform(0.0, 2.0)) for _ in range(trials)]
    out: dict[str, HeadGainConfig] = {}
    for strategy in strategies:
        for shift, tau_scale, gain_scale in points:
            try:
                cfg = base.replace(
                    strategy=strategy,
                    l_perc=_clip_layer(base.l_perc + shift, num_layers),
                    l_reas=_clip_layer(base.l_reas + shift, num_layers),
                    tau_perc=round(min(1.0, base.tau_perc * tau_scale), 3),
                    g_perc=_gain(base.g_perc, gain_scale),
                    g_reas=_gain(base.g_reas, gain_scale),
                )
            except ValueError:
                continue
            name = f"{strategy}-lp{cfg.l_perc}-lr{cfg.l_reas}-tp{cfg.tau_perc:g}-gp{cfg.g_perc:g}-gr{cfg.g_reas:g}"
            out.setdefault(name, cfg)
    return out


def split_dev(samples: Sequence[Sample], frac: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """``(dev, held_out)``: a seeded random ``frac`` of the samples and the rest (both keep
    the file order)."""
    if not 0.0 < frac < 1.0:
        raise ValueError(f"dev fraction {frac} must be between 0 and 1")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(frac * len(samples)))
    if cut >= len(samples):
        raise ValueError(f"{len(samples)} samples leave none held out at dev fraction {frac}")
    dev = set(order[:cut])
    return [s for i, s in enumerate(samples) if i in dev], [s for i, s in enumerate(samples) if i not in dev]


def selected_shares(evaluator: Evaluator, samples: Sequence[Sample], configs: Mapping[str, HeadGainConfig], batch: int):
    """Per config, the share of all heads it selects, averaged over ``samples`` (S_v from
    one vanilla prefill per sample, `headgain.census`)."""
    from ..analysis.census import census

    batches = [evaluator.prompter.inputs(samples[i : i + batch]) for i in range(0, len(samples), batch)]
    result = census(evaluator.model, batches, evaluator.arch_map, progress=False)
    if result.num_samples == 0:
        return {name: float("nan") for name in configs}
    return {name: round(result.selected_share(cfg), 6) for name, cfg in configs.items()}


def sweep(
    evaluator: Evaluator,
    dev: Sequence[Sample],
    held_out: Sequence[Sample],
    configs: Mapping[str, HeadGainConfig],
    out: str,
    benchmark: str,
    *,
    metric: str = "accuracy",
    eta: int = 2,
    min_samples: int = 4,
    max_new_tokens: int = 64,
    batch: int = 4,
    seed: int = 0,
    reps: int = 1000,
    judge: Judge | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Choose the best of ``configs`` on ``dev`` by ``metric`` and report it on ``held_out``.

    Successive halving: rung 0 runs every config (and vanilla) on the first
    ``max(min_samples, len(dev) / eta**k)`` dev samples (in a seeded random order), where
    k makes the last rung use all of dev; each rung keeps the best ``ceil(len / eta)``
    configs (ties: the earlier name in ``configs``) and grows the sample count eta times.
    ``judge`` (``judge(text, sample) -> answer or None``) reads what no extraction rule
    can, on dev and held-out samples alike. Records go to ``out/dev`` (resumable; a
    config's records on a smaller rung are reused on larger ones); the held-out run
    (vanilla and the winner) goes to ``out/held_out`` with its summary.

    Returns the ``sweep.json`` object (also written to ``out``): the dev and held-out
    sample counts, the rung sizes, vanilla's dev score per rung, every config with its
    fields, selected-head share and dev score per rung it ran, the chosen config, and the
    held-out summary.
    """
    if not dev or not held_out:
        raise ValueError(f"need dev and held-out samples, got {len(dev)} and {len(held_out)}")
    overlap = {s.id for s in dev} & {s.id for s in held_out}
    if overlap:
        raise ValueError(f"dev and held-out samples share ids {sorted(overlap)[:5]}")
    if eta < 2:
        raise ValueError(f"eta must be at least 2, got {eta}")
    available = metric_functions(dev, [{"answer": None, "correct": False}] * len(dev))  # names depend on the samples
    if metric not in available:
        raise ValueError(f"metric {metric!r} is not computed for {benchmark}; available: {', '.join(available)}")
    say = log or (lambda _line: None)
    dev = list(dev)
    random.Random(seed).shuffle(dev)  # rung prefixes mix categories even when the file is sorted by one
    rungs = max(1, math.ceil(math.log(max(1, len(configs)), eta)) + 1)
    sizes = [min(len(dev), max(min_samples, math.ceil(len(dev) / eta ** (rungs - 1 - r)))) for r in range(rungs)]
    shares = selected_shares(evaluator, dev, configs, batch)
    alive = list(configs)
    scores: dict[str, list[float]] = {name: [] for name in configs}
    vanilla_scores: list[float] = []
    for rung, size in enumerate(sizes):
        subset = list(dev[:size])
        arms = {VANILLA: None, **{name: configs[name] for name in alive}}
        records = evaluator.run(
            subset,
            arms,
            os.path.join(out, "dev"),
            benchmark,
            max_new_tokens=max_new_tokens,
            batch=batch,
            judge=judge,
        )
        everything = np.arange(size)
        for arm in arms:
            score = float(metric_functions(subset, records[arm])[metric](everything))
            (vanilla_scores if arm == VANILLA else scores[arm]).append(round(score, 6))
        ranked = sorted(alive, key=lambda name: (-scores[name][-1], list(configs).index(name)))
        say(
            f"rung {rung}: {len(alive)} configs on {size} dev samples; vanilla {metric} {vanilla_scores[-1]:.4f}, "
            f"best {ranked[0]} {scores[ranked[0]][-1]:.4f}"
        )
        if rung < len(sizes) - 1:
            alive = ranked[: max(1, math.ceil(len(alive) / eta))]
        else:
            alive = ranked[:1]
    chosen = alive[0]
    say(f"chosen on dev: {chosen}; running vanilla and it on {len(held_out)} held-out samples")
    summary = evaluate(
        evaluator,
        held_out,
        {chosen: configs[chosen]},
        os.path.join(out, "held_out"),
        benchmark,
        max_new_tokens=max_new_tokens,
        batch=batch,
        seed=seed,
        reps=reps,
        judge=judge,
        progress=False,
    )
    result = {
        "benchmark": benchmark,
        "metric": metric,
        "n_dev": len(dev),
        "n_held_out": len(held_out),
        "rung_sizes": sizes,
        "vanilla_dev": vanilla_scores,
        "configs": {
            name: {"cfg": cfg.to_dict(), "selected_share": shares[name], "dev": scores[name]}
            for name, cfg in configs.items()
        },
        "chosen": chosen,
        "held_out": summary,
    }
    save_json(result, os.path.join(out, "sweep.json"))
    return result
