"""Layer x head heat maps saved as PNG (matplotlib, Agg backend, no display needed).

Rows are 0-based decoder layers (layer 0 at the top), columns are heads. Each picture
has a title, axis labels and a colour bar (or a legend for the class map) and stays
readable at 28 layers x 28 heads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..core.rules import HeadClass

__all__ = ["plot_ratio", "plot_classes", "plot_contribution", "plot_overview"]

#: Colour of each head class, indexed by its `HeadClass` code.
CLASS_COLORS = {HeadClass.NEUTRAL: "#e6e6e6", HeadClass.PERCEPTION: "#f28e2b", HeadClass.REASONING: "#4e79a7"}
LAYER_LABEL, HEAD_LABEL = "decoder layer (0-based)", "head"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _size(num_layers: int, num_heads: int, panels: int = 1) -> tuple[float, float]:
    cell = 0.26 if max(num_layers, num_heads) > 12 else 0.42
    width = panels * (num_heads * cell + 1.9) + 0.4
    height = num_layers * cell + 1.7
    return max(width, 4.2 * panels), max(height, 3.4)


def _ticks(ax, num_layers: int, num_heads: int) -> None:
    def positions(n):
        step = 1 if n <= 32 else int(np.ceil(n / 28))
        return np.arange(0, n, step)

    small = 7 if max(num_layers, num_heads) > 12 else 9
    xs, ys = positions(num_heads), positions(num_layers)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(i) for i in xs], fontsize=small, rotation=90 if num_heads > 12 else 0)
    ax.set_yticks(ys)
    ax.set_yticklabels([str(i) for i in ys], fontsize=small)
    ax.set_xlabel(HEAD_LABEL)
    ax.set_ylabel(LAYER_LABEL)


def _bounds(ax, cfg, num_layers: int) -> None:
    """Dashed lines below layer l_perc and above layer l_reas."""
    if cfg is None:
        return
    if cfg.l_perc < num_layers - 1:
        ax.axhline(cfg.l_perc + 0.5, color="#d62728", lw=1.2, ls="--", label=f"l_perc = {cfg.l_perc}")
    if cfg.l_reas > 0:
        ax.axhline(cfg.l_reas - 0.5, color="#1f77b4", lw=1.2, ls=":", label=f"l_reas = {cfg.l_reas}")


def _save(fig, path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _draw_ratio(fig, ax, mean: np.ndarray, title: str, cfg=None) -> None:
    low, high = float(np.nanmin(mean)), float(np.nanmax(mean))
    if high - low < 1e-3:  # a flat map: widen the scale so the colours stay meaningful
        low, high = max(0.0, low - 5e-4), min(1.0, high + 5e-4)
    im = ax.imshow(mean, cmap="viridis", vmin=low, vmax=high, aspect="auto", interpolation="nearest")
    _ticks(ax, *mean.shape)
    _bounds(ax, cfg, mean.shape[0])
    notes = []
    if cfg is not None and cfg.l_perc < mean.shape[0] - 1:
        notes.append(f"red dashed: below l_perc={cfg.l_perc}")
    if cfg is not None and cfg.l_reas > 0:
        notes.append(f"blue dotted: above l_reas={cfg.l_reas}")
    ax.set_title(title + ("\n" + "; ".join(notes) if notes else ""), fontsize=10)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("S_v: share of attention on image tokens", fontsize=8)


def _draw_classes(fig, ax, classes: np.ndarray, title: str, cfg=None) -> None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colors = [CLASS_COLORS[c] for c in HeadClass]
    ax.imshow(
        classes, cmap=ListedColormap(colors), vmin=-0.5, vmax=len(colors) - 0.5, aspect="auto", interpolation="nearest"
    )
    ax.set_xticks(np.arange(-0.5, classes.shape[1], 1), minor=True)
    ax.set_yticks(np.arange(-0.5, classes.shape[0], 1), minor=True)
    ax.grid(which="minor", color="white", lw=0.5)
    ax.tick_params(which="minor", length=0)
    _ticks(ax, *classes.shape)
    total = classes.size
    handles = [
        Patch(
            facecolor=CLASS_COLORS[c], edgecolor="#555555", label=f"{c.label}: {int((classes == c).sum())} of {total}"
        )
        for c in (HeadClass.PERCEPTION, HeadClass.REASONING, HeadClass.NEUTRAL)
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    if cfg is not None:
        title = f"{title}\nl_perc={cfg.l_perc}, tau_perc={cfg.tau_perc}; l_reas={cfg.l_reas}, tau_reas={cfg.tau_reas}"
    ax.set_title(title, fontsize=10)


def plot_ratio(values, path: str, title: str | None = None, cfg=None) -> str:
    """Heat map of the visual ratio S_v per head.

    Args:
        values: a `headgain.Census` (its mean is drawn) or an (L, H) array.
        cfg: when given, its layer bounds are drawn as dashed lines.
    """
    mean = np.asarray(values.mean if hasattr(values, "samples") else values, dtype=np.float32)
    n = getattr(values, "num_samples", None)
    title = title or ("mean visual attention ratio S_v" + (f" ({n} samples)" if n is not None else ""))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_size(*mean.shape))
    _draw_ratio(fig, ax, mean, title, cfg)
    return _save(fig, path)


def plot_classes(classes, path: str, title: str | None = None, cfg=None) -> str:
    """Class map: perception / reasoning / neutral heads in three colours, with a legend.

    Args:
        classes: (L, H) int array (0 neutral, 1 perception, 2 reasoning), for example
            ``census.classes(cfg)``.
        cfg: when given, its thresholds are shown in the title.
    """
    classes = np.asarray(classes, dtype=np.int8)
    plt = _pyplot()
    w, h = _size(*classes.shape)
    fig, ax = plt.subplots(figsize=(w + 1.2, h))
    _draw_classes(fig, ax, classes, title or "head classes", cfg)
    return _save(fig, path)


def plot_contribution(maps: Sequence, path: str, title: str | None = None, signed: bool = False) -> str:
    """Contribution maps side by side (for example vanilla beside rescaled), one colour scale.

    Args:
        maps: `headgain.ContributionMap` objects of the same model.
        signed: draw S = dL/dg (blue: amplifying the head lowers the loss) instead of
            the normalised importance.
    """
    maps = list(maps)
    if not maps:
        raise ValueError("plot_contribution needs at least one ContributionMap")
    values = [np.asarray(m.signed if signed else m.importance, dtype=np.float32) for m in maps]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(maps), figsize=_size(*values[0].shape, panels=len(maps)), squeeze=False)
    axes = axes[0]
    if signed:
        top = max(float(np.abs(v).max()) for v in values) or 1e-6
        kw = dict(cmap="RdBu_r", vmin=-top, vmax=top)
        label = "S = dL/dg (negative: head supports the target)"
    else:
        top = max(float(v.max()) for v in values) or 1e-6
        kw = dict(cmap="magma", vmin=0.0, vmax=top)
        label = f"importance |S|, normalised per {'layer' if maps[0].normalize == 'layer' else 'map'}"
    im = None
    for ax, m, v in zip(axes, maps, values):
        im = ax.imshow(v, aspect="auto", interpolation="nearest", **kw)
        _ticks(ax, *v.shape)
        loss = float(np.mean(m.losses)) if m.losses else float("nan")
        ax.set_title(f"{m.label}: {len(m.targets)} target token(s), mean loss {loss:.3f}", fontsize=9)
    bar = fig.colorbar(im, ax=list(axes), fraction=0.046 / len(maps) ** 0.5, pad=0.02)
    bar.set_label(label, fontsize=8)
    fig.suptitle(title or "head contribution map (gradient of -log P(target) w.r.t. head gates)", fontsize=10)
    return _save(fig, path)


def plot_overview(census, path: str, cfg, contributions: Sequence = (), title: str | None = None) -> str:
    """One figure: mean S_v, the class map under ``cfg`` and any contribution maps (one colour scale)."""
    mean = census.mean
    classes = census.classes(cfg)
    panels = 2 + len(contributions)
    plt = _pyplot()
    w, h = _size(*mean.shape, panels=panels)
    fig, axes = plt.subplots(1, panels, figsize=(w + 1.5, h + 0.3), layout="constrained", squeeze=False)
    axes = axes[0]
    _draw_ratio(fig, axes[0], mean, f"mean S_v ({census.num_samples} samples)", cfg)
    _draw_classes(fig, axes[1], classes, "head classes", cfg)
    if contributions:
        top = max(float(m.importance.max()) for m in contributions) or 1e-6
        im = None
        for ax, m in zip(axes[2:], contributions):
            im = ax.imshow(m.importance, cmap="magma", vmin=0.0, vmax=top, aspect="auto", interpolation="nearest")
            _ticks(ax, *m.importance.shape)
            ax.set_title(f"contribution map, {m.label}", fontsize=10)
        bar = fig.colorbar(im, ax=list(axes[2:]), fraction=0.046, pad=0.02)
        bar.set_label(f"importance |S|, normalised per {contributions[0].normalize}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)
