"""Head census: the visual attention ratio S_v of every decoder head over a set of samples.

`census` runs the model once per batch (one prefill pass, headgain disabled so outputs
are unchanged) and keeps S_v(l, h) of every sample that holds visual tokens. The
resulting `Census` gives per-head statistics, the share of samples in which each head
would be selected under a config, and `Census.suggest`, which picks thresholds that
select a target share of heads (the paper's sweet spot is about 6.4%).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from ..core.config import HeadGainConfig
from ..core.handle import borrowed
from ..core.rules import CLASS_NAMES, HeadClass, classify

__all__ = ["Census", "Suggestion", "census"]


@dataclass
class Suggestion:
    """What `Census.suggest` chose and why.

    Attributes:
        cfg: the suggested config.
        target_fraction: the share of heads asked for (over all L x H heads, averaged
            over the samples).
        achieved_fraction: the share ``cfg`` selects on the census samples.
        perception_fraction, reasoning_fraction: its two parts.
        report: the reasoning in a few lines of text.
    """

    cfg: HeadGainConfig
    target_fraction: float
    achieved_fraction: float
    perception_fraction: float
    reasoning_fraction: float
    report: str


@dataclass
class Census:
    """S_v of every (layer, head) over the census samples.

    Attributes:
        samples: (N, L, H) float32, S_v of each sample that holds visual tokens.
        skipped: how many samples held no visual token (left out of every statistic).
        query: the query rule S_v was read with ("last" or "mean_text").
        last_suggestion: the `Suggestion` of the latest `suggest` call (None before).
    """

    samples: np.ndarray
    skipped: int = 0
    query: str = "last"
    seconds: float = 0.0
    last_suggestion: Suggestion | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ statistics
    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.samples.shape[1])

    @property
    def num_heads(self) -> int:
        return int(self.samples.shape[2])

    def _need_samples(self) -> None:
        if self.num_samples == 0:
            raise ValueError(
                f"the census holds no sample with visual tokens ({self.skipped} skipped); pass inputs with images"
            )

    @property
    def mean(self) -> np.ndarray:
        """(L, H) float32 mean S_v over the samples."""
        self._need_samples()
        return self.samples.mean(0, dtype=np.float64).astype(np.float32)

    @property
    def std(self) -> np.ndarray:
        """(L, H) float32 standard deviation of S_v over the samples (population, ddof=0)."""
        self._need_samples()
        return self.samples.std(0, dtype=np.float64).astype(np.float32)

    def quantiles(self, q: float | Sequence[float]) -> np.ndarray:
        """S_v quantiles per head: (L, H) float32 for a scalar ``q``, (len(q), L, H) for a sequence."""
        self._need_samples()
        return np.quantile(self.samples.astype(np.float64), q, axis=0).astype(np.float32)

    def class_fractions(self, cfg: HeadGainConfig | str | Mapping[str, Any] | None) -> dict[str, np.ndarray]:
        """Per class, (L, H) float32: the share of samples in which each head falls in that class."""
        cfg = self._cfg(cfg)
        self._need_samples()
        classes = classify(self.samples, cfg)
        return {name: (classes == k).mean(0).astype(np.float32) for k, name in enumerate(CLASS_NAMES)}

    def selected_fraction(self, cfg: HeadGainConfig | str | Mapping[str, Any] | None) -> np.ndarray:
        """(L, H) float32: the share of samples in which each head is a perception or reasoning head."""
        fr = self.class_fractions(cfg)
        return fr["perception"] + fr["reasoning"]

    def selected_share(self, cfg: HeadGainConfig | str | Mapping[str, Any] | None) -> float:
        """The share of all heads ``cfg`` selects, averaged over the samples (0..1)."""
        return float(self.selected_fraction(cfg).mean())

    def classes(self, cfg: HeadGainConfig | str | Mapping[str, Any] | None) -> np.ndarray:
        """(L, H) int8: the class each head takes in at least half of the samples (else neutral)."""
        return self._majority(self.class_fractions(cfg))

    def static_gains(self, cfg: HeadGainConfig | str | Mapping[str, Any] | None, min_share: float = 0.5) -> np.ndarray:
        """(L, H) float32 gain table for `headgain.fold_gains`: each head gets the gain of
        its class under ``cfg`` where it takes that class in at least ``min_share`` of the
        samples, else the neutral gain.

        This freezes the per-token selection of the method into one head set for every
        input: a zero-cost approximation, to be checked on held-out data.
        """
        if not 0.0 < min_share <= 1.0:
            raise ValueError(f"min_share={min_share!r} must be in (0, 1]")
        cfg = self._cfg(cfg)
        classes = self._majority(self.class_fractions(cfg), min_share)
        gains = cfg.class_gains()
        table = np.full(classes.shape, gains["neutral"], dtype=np.float32)
        table[classes == HeadClass.PERCEPTION] = gains["perception"]
        table[classes == HeadClass.REASONING] = gains["reasoning"]
        return table

    @staticmethod
    def _majority(fractions: dict[str, np.ndarray], share: float = 0.5) -> np.ndarray:
        out = np.full(fractions["perception"].shape, int(HeadClass.NEUTRAL), dtype=np.int8)
        out[fractions["reasoning"] >= share] = HeadClass.REASONING
        out[fractions["perception"] >= share] = HeadClass.PERCEPTION
        return out

    def _cfg(self, cfg) -> HeadGainConfig:
        cfg = HeadGainConfig.coerce(cfg)
        cfg.check_layers(self.num_layers)
        return cfg

    # ------------------------------------------------------------------ suggestion
    def suggest(
        self,
        target_fraction: float = 0.064,
        base: HeadGainConfig | str | Mapping[str, Any] | None = None,
        perception_share: float = 0.5,
        keep_layers: bool = False,
    ) -> HeadGainConfig:
        """A config that selects about ``target_fraction`` of all heads on these samples.

        Layer bounds: those of ``base`` when ``keep_layers`` (and they fit), else the
        paper's Qwen2.5-VL-7B bounds (l_perc = 7, l_reas = 3 of 28 layers) scaled to this
        depth. Thresholds: ``tau_perc`` is the S_v value that the top
        ``perception_share`` of the budget reaches among the heads of layers
        0..l_perc, and ``tau_reas`` the value the bottom rest reaches among the heads
        of layers l_reas..L-1 (quantiles over all census samples). Gains and the
        strategy come from ``base`` (default preset when None).

        Returns:
            The `HeadGainConfig`; the details and a short text report are kept in
            ``self.last_suggestion`` (a `Suggestion`).
        """
        if not 0.0 < target_fraction < 1.0:
            raise ValueError(f"target_fraction={target_fraction!r} must be in (0, 1)")
        if not 0.0 <= perception_share <= 1.0:
            raise ValueError(f"perception_share={perception_share!r} must be in [0, 1]")
        self._need_samples()
        base_cfg = HeadGainConfig.coerce(base)
        n_layers, n_heads = self.num_layers, self.num_heads
        lines = []
        if keep_layers and base_cfg.l_perc < n_layers and base_cfg.l_reas < n_layers:
            l_perc, l_reas = base_cfg.l_perc, base_cfg.l_reas
            lines.append(f"layer bounds kept from the base config: l_perc={l_perc}, l_reas={l_reas}")
        else:
            l_perc = min(n_layers - 1, max(0, round(n_layers * 8 / 28) - 1))
            l_reas = min(n_layers - 1, round(n_layers * 3 / 28))
            lines.append(
                f"layer bounds scaled from the paper's 28-layer setting (l_perc=7, l_reas=3) to {n_layers} layers: "
                f"l_perc={l_perc}, l_reas={l_reas}"
            )
        total = n_layers * n_heads
        perc_vals = np.sort(self.samples[:, : l_perc + 1, :].reshape(-1))[::-1]  # descending
        reas_vals = np.sort(self.samples[:, l_reas:, :].reshape(-1))  # ascending
        want_perc = target_fraction * perception_share * total * self.num_samples
        want_reas = target_fraction * (1 - perception_share) * total * self.num_samples
        k_perc = int(min(len(perc_vals), max(1, round(want_perc))))
        k_reas = int(min(len(reas_vals), max(1, round(want_reas))))
        tau_perc = round(float(np.floor(float(perc_vals[k_perc - 1]) * 1e4)) / 1e4, 4) if want_perc > 0 else 1.0
        tau_reas = round(float(np.ceil(float(reas_vals[k_reas - 1]) * 1e4)) / 1e4, 4) if want_reas > 0 else 0.0
        tau_perc, tau_reas = min(max(tau_perc, 0.0), 1.0), min(max(tau_reas, 0.0), 1.0)
        if tau_reas >= tau_perc:
            mid = round((tau_reas + tau_perc) / 2, 4)
            tau_reas, tau_perc = max(0.0, mid - 1e-4), min(1.0, mid + 1e-4)
            if tau_reas >= tau_perc:  # both at an end of [0, 1]
                tau_reas, tau_perc = (0.0, 1e-4) if mid <= 0.5 else (1.0 - 1e-4, 1.0)
            lines.append(
                "the S_v values of the two layer ranges overlap (the model does not separate its heads by visual "
                f"attention at this budget); thresholds moved apart to tau_reas={tau_reas}, tau_perc={tau_perc}"
            )
        cfg = base_cfg.replace(l_perc=l_perc, l_reas=l_reas, tau_perc=tau_perc, tau_reas=tau_reas)
        fr = self.class_fractions(cfg)
        perc, reas = float(fr["perception"].mean()), float(fr["reasoning"].mean())
        achieved = perc + reas
        lines.append(
            f"tau_perc={tau_perc}: S_v >= tau_perc in layers 0..{l_perc} selects {perc:.1%} of all heads per sample "
            f"(about {perc * total:.1f} of {total})"
        )
        lines.append(
            f"tau_reas={tau_reas}: S_v <= tau_reas in layers {l_reas}..{n_layers - 1} selects {reas:.1%} "
            f"(about {reas * total:.1f} of {total})"
        )
        lines.append(
            f"selected {achieved:.1%} of heads for a target of {target_fraction:.1%} over {self.num_samples} samples; "
            f"gains g_perc={cfg.g_perc}, g_reas={cfg.g_reas} ({cfg.strategy}) kept from the base config"
        )
        self.last_suggestion = Suggestion(cfg, float(target_fraction), achieved, perc, reas, "\n".join(lines))
        return cfg

    # ------------------------------------------------------------------ output
    def to_dict(self, cfg: HeadGainConfig | str | Mapping[str, Any] | None = None, samples: bool = False) -> dict:
        """Statistics as plain lists (L x H); with ``cfg``, the selected share and classes under it."""
        d: dict[str, Any] = {
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_samples": self.num_samples,
            "skipped": self.skipped,
            "query": self.query,
            "layer_indexing": "0-based decoder layers",
        }
        if self.num_samples:
            qs = (0.05, 0.25, 0.5, 0.75, 0.95)
            d["mean"] = _round(self.mean)
            d["std"] = _round(self.std)
            d["quantiles"] = {str(q): _round(v) for q, v in zip(qs, self.quantiles(qs))}
            if cfg is not None:
                cfg = self._cfg(cfg)
                fr = self.class_fractions(cfg)
                d["cfg"] = cfg.to_dict()
                d["selected_fraction"] = _round(fr["perception"] + fr["reasoning"])
                d["perception_fraction"] = _round(fr["perception"])
                d["reasoning_fraction"] = _round(fr["reasoning"])
                d["selected_share"] = float((fr["perception"] + fr["reasoning"]).mean())
                d["classes"] = self._majority(fr).tolist()
        if samples:
            d["samples"] = _round(self.samples)
        return d

    def to_json(self, path: str | None = None, cfg=None, samples: bool = False) -> str:
        """`to_dict` as JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(cfg, samples), indent=1)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    def save(self, path: str, cfg=None, samples: bool = False) -> str:
        """Write `to_json` to ``path``; returns the path."""
        self.to_json(path, cfg, samples)
        return path

    def __repr__(self) -> str:
        return (
            f"Census(samples={self.num_samples}, skipped={self.skipped}, layers={self.num_layers}, "
            f"heads={self.num_heads}, query={self.query!r})"
        )


def census(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    arch_map=None,
    query: str = "last",
    *,
    progress: bool | None = None,
    stream: TextIO | None = None,
) -> Census:
    """Record S_v of every decoder head for every sample of ``batches``.

    Args:
        model: a ``transformers`` vision-language model. If headgain is attached its
            handle is used (disabled for the census, then restored); otherwise a
            temporary attachment is made and removed.
        batches: an iterable of processor outputs (``input_ids`` (B, N), ``attention_mask``,
            ``pixel_values``, ...); each is run through one forward pass without gradients.
        query: which rows S_v is read from: "last" (the paper's i*, the last prompt
            token) or "mean_text".
        progress: show a progress bar on ``stream`` (default stderr); None shows it when
            the stream is a terminal.

    Returns:
        A `Census`. Samples without visual tokens are counted in ``skipped`` and left
        out. Model outputs are not changed (headgain is disabled while it runs).
    """
    stream = stream if stream is not None else sys.stderr
    if progress is None:
        progress = bool(getattr(stream, "isatty", lambda: False)())
    total = len(batches) if hasattr(batches, "__len__") else None
    bar = _Progress(total, stream) if progress else None
    rows: list[np.ndarray] = []
    skipped = 0
    start = time.perf_counter()
    with borrowed(model, arch_map, enabled=False) as handle:
        try:
            if handle.cfg.query != query:
                handle.cfg = handle.cfg.replace(query=query)
            device = _input_device(model)
            for batch in batches:
                batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in dict(batch).items()}
                with torch.no_grad():
                    model(**batch, use_cache=False)
                ratios = handle.last_ratios  # (L, B, H)
                has_visual = handle.last_has_visual.numpy()
                per_sample = ratios.permute(1, 0, 2).numpy()  # (B, L, H)
                rows.extend(per_sample[has_visual])
                skipped += int((~has_visual).sum())
                if bar:
                    bar.update(len(has_visual))
        finally:
            if bar:
                bar.close()
    shape = (0, handle.num_layers, handle.num_heads)
    samples = np.stack(rows).astype(np.float32) if rows else np.zeros(shape, dtype=np.float32)
    return Census(samples, skipped, query, time.perf_counter() - start)


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def _round(a: np.ndarray, digits: int = 6) -> list:
    return np.round(np.asarray(a, dtype=np.float64), digits).tolist()


class _Progress:
    """A one-line text progress bar: ``census [#######.....] 12/20 batches, 3 samples/s``."""

    def __init__(self, total: int | None, stream: TextIO, width: int = 28):
        self.total, self.stream, self.width = total, stream, width
        self.batches = self.samples = 0
        self.start = time.perf_counter()
        self._draw()

    def update(self, samples: int) -> None:
        self.batches += 1
        self.samples += samples
        self._draw()

    def _draw(self) -> None:
        rate = self.samples / max(time.perf_counter() - self.start, 1e-9)
        if self.total:
            done = int(self.width * self.batches / self.total)
            bar = "#" * done + "." * (self.width - done)
            text = f"\rcensus [{bar}] {self.batches}/{self.total} batches, {rate:.1f} samples/s"
        else:
            text = f"\rcensus {self.batches} batches, {self.samples} samples, {rate:.1f} samples/s"
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
