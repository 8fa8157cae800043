"""Per-arm metrics, paired comparisons against vanilla, and the run's report files.

`summarize` turns the records of every arm (one per sample, in sample order) into the
``summary.json`` object::

    {"benchmark": str, "n": int,
     "arms": {"vanilla": {metric: value, ...}, "<config>": {...}},
     "intervals": {arm: {metric: [lo, hi]}},          # each arm's own 95% bootstrap interval
     "comparisons": [{"arm", "metric", "delta", "ci95": [lo, hi], "p_value", "fixed", "broken"}],
     "bootstrap": {"reps": int, "seed": int, "unit": "sample" | "set"}}

``delta`` is the arm's metric minus vanilla's; ``ci95`` a paired bootstrap interval of it;
``p_value`` the exact McNemar test of per-sample correctness, given for the per-sample
accuracies (``accuracy``, ``aAcc``) and null for the other metrics; ``fixed`` / ``broken``
count samples vanilla got wrong and the arm right, and the reverse. HallusionBench
resamples whole question sets (its fAcc and qAcc group questions).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from . import metrics
from .sample import Sample
from .stats import mcnemar, paired_bootstrap

__all__ = ["summarize", "metric_functions", "write_markdown", "plot_summary", "save_json"]

#: Metrics compared against vanilla with a McNemar test (per-sample right/wrong).
PER_SAMPLE = ("accuracy", "aAcc")


def _is_hallusion(samples: Sequence[Sample]) -> bool:
    keys = ("set_id", "figure_id", "question_id", "subcategory")
    return all(s.answer_type == "yes_no" and all(s.meta.get(k) is not None for k in keys) for s in samples)


def metric_functions(
    samples: Sequence[Sample], records: Sequence[Mapping], synonyms: Mapping[str, str] | None = None
) -> dict[str, Callable[[np.ndarray], float]]:
    """The benchmark's scalar metrics of one arm, each as ``fn(indices) -> float`` over the
    samples at ``indices`` (int array, repeats allowed), so bootstrap resamples reuse them.

    Always ``accuracy``; ``weighted_f1`` over the multiple-choice samples; ``f1``,
    ``precision``, ``recall``, ``yes_ratio`` over the yes/no samples; ``aAcc``, ``fAcc``,
    ``qAcc`` for HallusionBench; ``chair_s``, ``chair_i`` over samples whose meta holds
    ground-truth ``objects`` (object names are those of ``objects``, of the optional
    ``meta["vocabulary"]`` and of ``synonyms``). A metric whose samples are absent from a resample is NaN.
    """
    n = len(samples)
    correct = np.array([bool(r["correct"]) for r in records])
    pred = [r["answer"] for r in records]
    fns: dict[str, Callable[[np.ndarray], float]] = {"accuracy": lambda idx: float(correct[idx].mean())}
    kinds = np.array([s.answer_type for s in samples])

    def subset(kind: str, idx: np.ndarray) -> np.ndarray:
        return idx[kinds[idx] == kind]

    if (kinds == "choice").any():

        def wf1(idx):
            idx = subset("choice", idx)
            return metrics.weighted_f1([pred[i] for i in idx], [samples[i].answer for i in idx]) if len(idx) else np.nan

        fns["weighted_f1"] = wf1
    if (kinds == "yes_no").any():

        def binary(name):
            def fn(idx):
                idx = subset("yes_no", idx)
                if not len(idx):
                    return np.nan
                return metrics.binary([pred[i] for i in idx], [samples[i].answer == "yes" for i in idx])[name]

            return fn

        for name in ("f1", "precision", "recall", "yes_ratio"):
            fns[name] = binary(name)
    if n and _is_hallusion(samples):
        rows = [dict(s.meta, correct=bool(c)) for s, c in zip(samples, correct)]
        for name in ("aAcc", "fAcc", "qAcc"):
            fns[name] = lambda idx, name=name: metrics.hallusion([rows[i] for i in idx])[name]
    captioned = np.array([s.meta.get("objects") is not None for s in samples])
    if captioned.any():
        table = dict(synonyms or {})
        for s in samples:  # the objects of the images, and those a caption could name
            for o in [*(s.meta.get("objects") or ()), *(s.meta.get("vocabulary") or ())]:
                table.setdefault(str(o).lower(), str(o))

        def chair(name):
            def fn(idx):
                idx = idx[captioned[idx]]
                if not len(idx):
                    return np.nan
                texts = [str(records[i]["answer"] or "") for i in idx]
                return metrics.chair(texts, [samples[i].meta["objects"] for i in idx], table)[name]

            return fn

        fns["chair_s"], fns["chair_i"] = chair("chair_s"), chair("chair_i")
    return fns


def summarize(
    benchmark: str,
    samples: Sequence[Sample],
    arms: Mapping[str, Sequence[Mapping]],
    reps: int = 1000,
    seed: int = 0,
    synonyms: Mapping[str, str] | None = None,
) -> dict:
    """The summary object (see the module docstring) of ``arms``: arm name -> its records in
    sample order (``answer``, ``correct``), the first arm being the baseline ("vanilla")."""
    n = len(samples)
    if n == 0:
        raise ValueError("no samples to summarize")
    names = list(arms)
    fns = {arm: metric_functions(samples, arms[arm], synonyms) for arm in names}
    everything = np.arange(n)
    hallusion = _is_hallusion(samples)
    clusters = [(s.meta["category"], s.meta["subcategory"], s.meta["set_id"]) for s in samples] if hallusion else None
    boot = dict(n=n, reps=reps, seed=seed, clusters=clusters)
    out: dict = {"benchmark": benchmark, "n": n, "arms": {}, "intervals": {}, "comparisons": []}
    for arm in names:
        values = {m: _round(fn(everything)) for m, fn in fns[arm].items()}
        values["parsed"] = _round(sum(r["answer"] is not None for r in arms[arm]) / n)
        categories = [s.category for s in samples]
        if any(c is not None for c in categories):
            correct = [bool(r["correct"]) for r in arms[arm]]
            values["accuracy_by_category"] = {
                c: _round(v) for c, v in metrics.by_category(categories, metrics.accuracy, correct).items()
            }
        out["arms"][arm] = values
        out["intervals"][arm] = {m: [_round(v) for v in paired_bootstrap(fn, **boot)] for m, fn in fns[arm].items()}
    base = names[0]
    base_correct = [bool(r["correct"]) for r in arms[base]]
    for arm in names[1:]:
        p, fixed, broken = mcnemar(base_correct, [bool(r["correct"]) for r in arms[arm]])
        for m in fns[arm]:
            a, b = fns[arm][m], fns[base][m]
            lo, hi = paired_bootstrap(lambda idx, a=a, b=b: a(idx) - b(idx), **boot)
            out["comparisons"].append(
                {
                    "arm": arm,
                    "metric": m,
                    "delta": _round(a(everything) - b(everything)),
                    "ci95": [_round(lo), _round(hi)],
                    "p_value": _round(p) if m in PER_SAMPLE else None,
                    "fixed": fixed,
                    "broken": broken,
                }
            )
    out["bootstrap"] = {"reps": reps, "seed": seed, "unit": "set" if hallusion else "sample"}
    return out


def _round(x: float) -> float:
    return float(round(float(x), 6))


def _scalar_metrics(summary: Mapping) -> list[str]:
    first = next(iter(summary["arms"].values()))
    return [m for m, v in first.items() if isinstance(v, float) and m != "parsed"]


def plot_summary(summary: Mapping, path: str) -> str:
    """Bars of every scalar metric per arm, with each arm's 95% bootstrap interval as error
    bars; saved as PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = _scalar_metrics(summary)
    arms = list(summary["arms"])
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) * max(1, len(arms) / 2) + 1.5), 3.8))
    x = np.arange(len(names))
    for k, arm in enumerate(arms):
        values = np.array([summary["arms"][arm][m] for m in names])
        ci = np.array([summary["intervals"][arm][m] for m in names]).T
        err = np.clip(np.stack([values - ci[0], ci[1] - values]), 0, None)
        ax.bar(x + (k - (len(arms) - 1) / 2) * width, values, width, yerr=err, capsize=3, label=arm)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("value (error bars: 95% bootstrap interval)")
    ax.set_title(f"{summary['benchmark']}: n = {summary['n']}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_markdown(summary: Mapping, path: str, chart: str | None = None, timing: Mapping | None = None) -> str:
    """``summary.md``: the metric table (value and 95% interval per arm, seconds per
    sample), accuracy per category, the comparisons against vanilla and the chart (a
    relative link)."""
    arms = list(summary["arms"])
    names = _scalar_metrics(summary)
    lines = [f"# {summary['benchmark']} (n = {summary['n']})", ""]
    lines += ["| metric | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for m in names:
        cells = [
            f"{summary['arms'][a][m]:.4f} [{summary['intervals'][a][m][0]:.4f}, {summary['intervals'][a][m][1]:.4f}]"
            for a in arms
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("| parsed | " + " | ".join(f"{summary['arms'][a]['parsed']:.4f}" for a in arms) + " |")
    if timing:
        lines.append("| seconds / sample | " + " | ".join(f"{timing.get(a, float('nan')):.4f}" for a in arms) + " |")
    by_category = [summary["arms"][a].get("accuracy_by_category") for a in arms]
    if all(by_category):
        lines += ["", "## Accuracy per category", "", "| category | " + " | ".join(arms) + " |"]
        lines.append("|---" * (len(arms) + 1) + "|")
        for c in by_category[0]:
            lines.append(f"| {c} | " + " | ".join(f"{cats[c]:.4f}" for cats in by_category) + " |")
    if summary["comparisons"]:
        lines += ["", f"## Against {arms[0]} (paired bootstrap 95% interval; exact McNemar test)", ""]
        lines += ["| arm | metric | delta | 95% interval | p | fixed | broken |", "|---|---|---|---|---|---|---|"]
        for c in summary["comparisons"]:
            p = "" if c["p_value"] is None else f"{c['p_value']:.4g}"
            lines.append(
                f"| {c['arm']} | {c['metric']} | {c['delta']:+.4f} | [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] "
                f"| {p} | {c['fixed']} | {c['broken']} |"
            )
    if chart:
        lines += ["", f"![metrics per arm]({os.path.relpath(chart, os.path.dirname(os.path.abspath(path)))})"]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def save_json(obj: Mapping, path: str) -> str:
    """``obj`` as indented JSON at ``path``, keys in insertion order (arms: vanilla first)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    return path
