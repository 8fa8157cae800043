"""headgain's compiled ops (``torch.ops.headgain.*``), one typed wrapper each.

The ops are implemented in ``csrc/`` (CPU and, where built, CUDA). When the extension
is not importable, each wrapper runs the pure-PyTorch reference of
`headgain.reference` instead and a warning says so once. Shapes and dtypes are those
documented in `headgain.reference`.
"""

from __future__ import annotations

import warnings

import torch

from . import reference

__all__ = [
    "extension_available",
    "extension_error",
    "ratio_from_probs",
    "ratio_from_qk",
    "head_gains",
    "scale_heads",
    "scale_heads_",
]

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.headgain)

    _EXT_ERROR: str | None = None
except (ImportError, OSError) as _e:  # the build is optional at import time; .ci/run insists on it
    _EXT_ERROR = str(_e)

_warned = False


def extension_available() -> bool:
    """True when the compiled ``headgain._C`` ops are loaded."""
    return _EXT_ERROR is None


def extension_error() -> str | None:
    """Why the extension did not load (None when it did)."""
    return _EXT_ERROR


def _fallback() -> bool:
    global _warned
    if _EXT_ERROR is None:
        return False
    if not _warned:
        _warned = True
        warnings.warn(
            f"headgain's compiled extension is not available ({_EXT_ERROR}); using the slower PyTorch reference. "
            "Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return True


def ratio_from_probs(probs: torch.Tensor, visual: torch.Tensor, query_weights: torch.Tensor) -> torch.Tensor:
    """(B, H, Nq, Nk) probabilities, (B, Nk) bool visual keys, (B, Nq) float32 row weights -> (B, H) float32."""
    if _fallback():
        return reference.ratio_from_probs(probs, visual, query_weights)
    return torch.ops.headgain.ratio_from_probs(probs, visual, query_weights)


def ratio_from_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    visual: torch.Tensor,
    row_weights: torch.Tensor,
    scaling: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """(B, H, R, D) query rows, (B, Hkv, Nk, D) keys, optional (B, R, Nk) bool/additive mask,
    (B, Nk) bool visual keys, (B, R) float32 row weights -> (B, H) float32."""
    if _fallback():
        return reference.ratio_from_qk(q, k, mask, visual, row_weights, scaling, softcap)
    return torch.ops.headgain.ratio_from_qk(q, k, mask, visual, row_weights, float(scaling), float(softcap))


def head_gains(
    ratios: torch.Tensor,
    has_visual: torch.Tensor,
    tau_perc: float,
    tau_reas: float,
    g_perc: float,
    g_reas: float,
    g_neutral: float,
) -> torch.Tensor:
    """(B, H) float32 ratios, (B,) bool -> (B, H) float32 gains of one layer."""
    if _fallback():
        return reference.head_gains(ratios, has_visual, tau_perc, tau_reas, g_perc, g_reas, g_neutral)
    return torch.ops.headgain.head_gains(ratios, has_visual, tau_perc, tau_reas, g_perc, g_reas, g_neutral)


def scale_heads(out: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """(B, N, H, D) head outputs times (B, H) float32 gains, out of place, differentiable in both."""
    if _fallback():
        return reference.scale_heads(out, gains)
    return torch.ops.headgain.scale_heads(out, gains)


def scale_heads_(out: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """(B, N, H, D) head outputs times (B, H) float32 gains, in place; returns ``out``."""
    if _fallback():
        out.copy_(reference.scale_heads(out, gains))
        return out
    torch.ops.headgain.scale_heads_(out, gains)
    return out


if _EXT_ERROR is None:

    @torch.library.register_fake("headgain::ratio_from_probs")
    def _(probs, visual, query_weights):
        torch._check(probs.dim() == 4, lambda: f"probs must be (B, H, Nq, Nk), got {tuple(probs.shape)}")
        return probs.new_empty(probs.shape[:2], dtype=torch.float32)

    @torch.library.register_fake("headgain::ratio_from_qk")
    def _(q, k, mask, visual, row_weights, scaling, softcap):
        torch._check(q.dim() == 4, lambda: f"q must be (B, H, R, D), got {tuple(q.shape)}")
        return q.new_empty(q.shape[:2], dtype=torch.float32)

    @torch.library.register_fake("headgain::head_gains")
    def _(ratios, has_visual, tau_perc, tau_reas, g_perc, g_reas, g_neutral):
        return torch.empty_like(ratios, dtype=torch.float32)

    @torch.library.register_fake("headgain::scale_heads")
    def _(out, gains):
        return torch.empty_like(out)

    @torch.library.register_fake("headgain::scale_heads_")
    def _(out, gains):
        return None

    def _scale_setup(ctx, inputs, output):
        out, gains = inputs
        ctx.save_for_backward(out, gains)

    def _scale_backward(ctx, grad):
        out, gains = ctx.saved_tensors
        grad_out = torch.ops.headgain.scale_heads(grad, gains) if ctx.needs_input_grad[0] else None
        grad_gains = None
        if ctx.needs_input_grad[1]:
            grad_gains = torch.einsum("bnhd,bnhd->bh", grad.float(), out.float()).to(gains.dtype)
        return grad_out, grad_gains

    torch.library.register_autograd("headgain::scale_heads", _scale_backward, setup_context=_scale_setup)
