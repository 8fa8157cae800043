"""Contribution maps (paper appendix H.1): how much each decoder head drives one prediction.

A gate g(l) in R^H, initialised to ones with ``requires_grad``, multiplies every head's
output at headgain's rescaling site (before the output projection). For a target token
t* at decoding step tau the loss is L = -log P(y_tau = t* | x, y_<tau); the signed
sensitivity is S(l, h) = dL / dg(l, h) (negative: amplifying the head helps) and the
importance is I = |S|, normalised per layer (Eq. 40) or over the whole stack (Eq. 41)
and ranked by argsort, descending (Eq. 42).

Model weights are never changed: their ``requires_grad`` flags are switched off for the
computation and restored afterwards, and gates at one leave every output bit for bit
as it was.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.config import HeadGainConfig
from ..core.errors import HeadGainError
from ..core.handle import borrowed

__all__ = ["ContributionMap", "contribution_map", "NORMALIZATIONS"]

NORMALIZATIONS = ("layer", "global")


@dataclass
class ContributionMap:
    """Per-head contributions to one or several next-token predictions.

    Attributes:
        signed: (L, H) float32, S = dL/dg averaged over the target steps (negative: the
            head supports the target token).
        magnitude: (L, H) float32, |S| averaged over the target steps (not normalised).
        importance: (L, H) float32, ``magnitude`` normalised per layer (each row sums to
            one, Eq. 40) or over all heads (the whole map sums to one, Eq. 41).
        ranking: (layer, head) pairs, 0-based, by descending ``importance`` (Eq. 42).
        steps: (T, L, H) float32, S of each target step.
        targets: the T target token ids.
        losses: the T losses -log P(target) (nats).
        normalize: "layer" or "global".
        show_signed: whether `plot` draws ``signed`` (True) or ``importance`` (False).
        cfg: the config whose rescaling was applied, or None for the vanilla model.
    """

    signed: np.ndarray
    magnitude: np.ndarray
    importance: np.ndarray
    ranking: list[tuple[int, int]]
    steps: np.ndarray
    targets: list[int]
    losses: list[float]
    normalize: str = "layer"
    show_signed: bool = False
    cfg: HeadGainConfig | None = None

    @property
    def num_layers(self) -> int:
        return int(self.signed.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.signed.shape[1])

    @property
    def label(self) -> str:
        return "vanilla" if self.cfg is None else "rescaled"

    def top(self, k: int = 10) -> list[tuple[int, int]]:
        """The ``k`` most important (layer, head) pairs."""
        return self.ranking[:k]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.label,
            "normalize": self.normalize,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "targets": list(self.targets),
            "losses": list(self.losses),
            "signed": self.signed.tolist(),
            "importance": self.importance.tolist(),
            "ranking": [list(p) for p in self.ranking],
            "cfg": None if self.cfg is None else self.cfg.to_dict(),
        }

    def to_json(self, path: str | None = None) -> str:
        """The map as JSON (signed and importance as L x H lists); also written to ``path``."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    def plot(self, path: str, title: str | None = None, other: ContributionMap | None = None) -> str:
        """Save a layer x head heat map as PNG (beside ``other``, for example the rescaled map)."""
        from .plots import plot_contribution

        maps = [self] if other is None else [self, other]
        return plot_contribution(maps, path, title=title, signed=self.show_signed)

    def __repr__(self) -> str:
        return (
            f"ContributionMap({self.label}, layers={self.num_layers}, heads={self.num_heads}, "
            f"steps={len(self.targets)}, "
            f"normalize={self.normalize!r}, top={self.ranking[:3]})"
        )


def normalize_importance(magnitude: np.ndarray, normalize: str) -> np.ndarray:
    """Eq. 40 ("layer": each row sums to one) or Eq. 41 ("global": all entries sum to one).

    A row (or map) whose magnitudes are all zero stays zero.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
    mag = np.asarray(magnitude, dtype=np.float64)
    total = mag.sum(axis=1, keepdims=True) if normalize == "layer" else mag.sum(keepdims=True)
    out = np.divide(mag, total, out=np.zeros_like(mag), where=total > 0)
    return out.astype(np.float32)


def rank_heads(importance: np.ndarray) -> list[tuple[int, int]]:
    """(layer, head) pairs by descending importance (ties: lower layer, then lower head first)."""
    imp = np.asarray(importance)
    order = np.argsort(-imp.reshape(-1), kind="stable")
    h = imp.shape[1]
    return [(int(i // h), int(i % h)) for i in order]


def contribution_map(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    targets: int | Sequence[int] | torch.Tensor | None = None,
    normalize: str = "layer",
    signed: bool = False,
    arch_map=None,
    cfg: HeadGainConfig | str | Mapping[str, Any] | None = None,
    *,
    n_tokens: int = 8,
) -> ContributionMap:
    """Gradient of -log P(target) with respect to one gate per decoder head (appendix H.1).

    Args:
        model: a ``transformers`` vision-language model; headgain need not be attached
            (a temporary attachment is made and removed), and when it is, its handle is
            used and its state (``enabled``, ``cfg``) restored afterwards.
        inputs: processor outputs for ONE prompt (batch size 1): ``input_ids`` (1, N)
            and the model's other inputs (``attention_mask``, ``pixel_values``, ...).
        targets: an int: the token id expected right after the prompt (one step); a
            sequence of ids (or 1-D tensor): an answer, teacher forced, one step per
            token, aggregated as the mean of S and the mean of |S| over the steps; None:
            the model's own greedy continuation of ``n_tokens`` tokens (stopping after
            an end-of-sequence token), produced with the same model (vanilla or
            rescaled) as the map.
        normalize: "layer" (Eq. 40) or "global" (Eq. 41).
        signed: whether `ContributionMap.plot` draws the signed map (S) instead of the
            importance; ``.signed`` is always filled.
        arch_map: the architecture map for a temporary attachment.
        cfg: None for the vanilla model (gains of one), or a config (a preset name or a
            dict) whose rescaling is applied while the gradients are taken ("Ours").
        n_tokens: length of the greedy continuation when ``targets`` is None.

    Returns:
        A `ContributionMap` (arrays float32 on the CPU, L decoder layers x H heads).

    Each step tau is one forward pass over the prompt and the first tau answer tokens,
    so with a ``cfg`` the gains are those headgain computes for that pass (S_v read at
    its last token); gains of one (vanilla) make one pass serve every step.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens!r} must be a positive integer")
    inputs = dict(inputs)
    prompt = inputs.get("input_ids")
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
        raise HeadGainError("contribution_map needs inputs['input_ids'] of shape (1, N)")
    if prompt.shape[0] != 1:
        raise HeadGainError(
            f"contribution_map takes one prompt at a time, got a batch of {prompt.shape[0]}; pass one sample's inputs"
        )
    if cfg is not None:
        cfg = HeadGainConfig.coerce(cfg)

    with borrowed(model, arch_map, cfg, enabled=cfg is not None) as handle, _frozen(model):
        answer = _resolve_targets(model, inputs, targets, n_tokens)
        if not answer:
            raise HeadGainError("no target tokens: pass a token id, a non-empty answer, or targets=None")
        device = prompt.device
        answer_t = torch.tensor(answer, dtype=torch.long, device=device)
        steps, losses = [], []
        with handle.gates() as gates:
            if cfg is None:
                step_losses = _step_losses(model, inputs, answer_t, len(answer))
                for i, loss in enumerate(step_losses):
                    grads = torch.autograd.grad(loss, gates, retain_graph=i + 1 < len(step_losses), allow_unused=True)
                    steps.append(_stack(grads, gates))
                    losses.append(float(loss.detach()))
            else:
                for tau in range(len(answer)):
                    loss = _step_losses(model, inputs, answer_t[: tau + 1], 1)[0]
                    grads = torch.autograd.grad(loss, gates, allow_unused=True)
                    steps.append(_stack(grads, gates))
                    losses.append(float(loss.detach()))

    per_step = torch.stack(steps).double().numpy()  # (T, L, H)
    magnitude = np.abs(per_step).mean(0)
    importance = normalize_importance(magnitude, normalize)
    return ContributionMap(
        signed=per_step.mean(0).astype(np.float32),
        magnitude=magnitude.astype(np.float32),
        importance=importance,
        ranking=rank_heads(importance),
        steps=per_step.astype(np.float32),
        targets=[int(t) for t in answer],
        losses=losses,
        normalize=normalize,
        show_signed=bool(signed),
        cfg=cfg,
    )


# ---------------------------------------------------------------------- internals
def _stack(grads, gates) -> torch.Tensor:
    return torch.stack([torch.zeros_like(g) if d is None else d.detach() for d, g in zip(grads, gates)]).float().cpu()


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Switch off ``requires_grad`` on every parameter, restore the flags on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _resolve_targets(model, inputs: dict, targets, n_tokens: int) -> list[int]:
    if targets is None:
        return _greedy(model, inputs, n_tokens)
    if isinstance(targets, torch.Tensor):
        if targets.dim() == 0:
            return [int(targets)]
        if targets.dim() == 2 and targets.shape[0] == 1:
            targets = targets[0]
        if targets.dim() != 1:
            raise HeadGainError(f"targets tensor must be 0-D or 1-D (one answer), got shape {tuple(targets.shape)}")
        return [int(t) for t in targets.tolist()]
    if isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
        return [int(targets)]
    if isinstance(targets, Sequence) and not isinstance(targets, str):
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in targets):
            raise HeadGainError("targets must be token ids (integers); tokenize the answer first")
        return [int(t) for t in targets]
    raise HeadGainError(f"targets must be a token id, a list of token ids or None, got {type(targets).__name__}")


def _eos_ids(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None and hasattr(model.config, "get_text_config"):
        eos = getattr(model.config.get_text_config(), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _greedy(model, inputs: dict, n_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n_tokens, do_sample=False)
    sequences = out.sequences if hasattr(out, "sequences") else out
    new = sequences[0, inputs["input_ids"].shape[1] :].tolist()
    eos = _eos_ids(model)
    answer = []
    for t in new:
        answer.append(int(t))
        if t in eos:
            break
    return answer


def _extend(inputs: dict, answer: torch.Tensor) -> dict:
    """The inputs with ``answer`` (A,) appended to the prompt (teacher forcing)."""
    prompt = inputs["input_ids"]
    a = answer.shape[0]
    out = {}
    for key, value in inputs.items():
        if key == "input_ids":
            value = torch.cat([prompt, answer[None].to(prompt.device)], dim=1)
        elif key == "attention_mask" and isinstance(value, torch.Tensor) and value.dim() == 2:
            value = torch.cat([value, value.new_ones((value.shape[0], a))], dim=1)
        elif key in ("position_ids", "cache_position", "cache", "past_key_values"):
            raise HeadGainError(f"contribution_map builds {key} itself; leave it out of the inputs")
        elif isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == prompt.shape:
            # per-token type ids (mm_token_type_ids, token_type_ids): answer tokens are text (0)
            value = torch.cat([value, value.new_zeros((value.shape[0], a))], dim=1)
        out[key] = value
    return out


def _step_losses(model, inputs: dict, answer: torch.Tensor, count: int) -> list[torch.Tensor]:
    """-log P(answer[tau]) for the last ``count`` answer tokens, from one teacher-forced pass.

    The pass covers the prompt and ``answer[:-1]``; the logits at position N - 1 + tau
    predict ``answer[tau]``. Returns ``count`` scalar tensors (float32 or float64).
    """
    n = inputs["input_ids"].shape[1]
    fed = _extend(inputs, answer[:-1]) if answer.shape[0] > 1 else dict(inputs)
    out = model(**fed, use_cache=False)
    logits = out.logits[0]
    first = answer.shape[0] - count
    positions = torch.arange(n - 1 + first, n - 1 + answer.shape[0], device=logits.device)
    rows = logits[positions]
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()
    logp = torch.log_softmax(rows, dim=-1)
    wanted = answer[first:].to(logits.device)
    return [-logp[i, wanted[i]] for i in range(count)]
