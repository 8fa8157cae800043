"""headgain's compiled ops (``torch.ops.headgain.*``), one typed wrapper each.

The ops are implemented in ``csrc/`` (CPU and, where built, CUDA). When the extension
is not importable, or has no kernels for a tensor's device (a CPU-only build given CUDA
tensors, or devices such as MPS), each wrapper runs the pure-PyTorch reference of
`headgain.core.reference` instead and a warning says so once per device type. Shapes and
dtypes are those documented in `headgain.core.reference`.
"""

from __future__ import annotations

import warnings

import torch

from . import reference

__all__ = [
    "extension_available",
    "extension_error",
    "extension_parallel",
    "ratio_from_probs",
    "ratio_from_qk",
    "ratio_from_blocks",
    "decode_attention",
    "head_gains",
    "scale_heads",
    "scale_heads_",
]

try:
    from .. import _C  # loading the library registers torch.ops.headgain

    _EXT_ERROR: str | None = None
    if not (hasattr(_C, "with_cuda") and hasattr(_C, "parallel")):
        _EXT_ERROR = "headgain._C comes from an older build of headgain: rebuild it"
except (ImportError, OSError) as _e:  # the build is optional at import time; .ci/run insists on it
    _EXT_ERROR = str(_e)
# device types with compiled kernels ("meta": the fake implementations below)
_KERNEL_DEVICES = (
    frozenset() if _EXT_ERROR is not None else frozenset({"cpu", "meta"} | ({"cuda"} if _C.with_cuda else set()))
)

_warned: set[str] = set()  # device types whose fallback warning was given


def extension_available(device: str | torch.device = "cpu") -> bool:
    """True when the compiled ``headgain._C`` ops are loaded with kernels for ``device``'s
    type: "cpu" whenever the extension loaded, "cuda" when it was built with its CUDA
    kernels (a CUDA build of torch and a CUDA toolkit at install time)."""
    return torch.device(device).type in _KERNEL_DEVICES


def extension_parallel() -> bool:
    """True when the compiled CPU kernels spread their work over torch's intra-op threads
    (``torch.get_num_threads()``); False when the extension did not load or was compiled
    without the threading torch uses (its loops then run on one thread)."""
    return _EXT_ERROR is None and bool(_C.parallel)


def extension_error() -> str | None:
    """Why the extension did not load (None when it did)."""
    return _EXT_ERROR


def _fallback(device: torch.device) -> bool:
    """Whether ops on ``device`` run the PyTorch reference (warning once per device type)."""
    kind = device.type
    if kind in _KERNEL_DEVICES:
        return False
    if kind not in _warned:
        _warned.add(kind)
        if _EXT_ERROR is not None:
            why = f"headgain's compiled extension is not available ({_EXT_ERROR})"
            fix = "Build it with `pip install --no-build-isolation -e .`."
        elif kind == "cuda":
            why = "headgain's compiled extension was built without its CUDA kernels"
            fix = (
                "Rebuild it where torch is a CUDA build and a CUDA toolkit is found: "
                "`pip install --no-build-isolation -e .` (HEADGAIN_FORCE_CUDA=1 to insist)."
            )
        else:
            why = f"headgain has no compiled kernels for {kind} tensors"
            fix = "Its kernels cover CPU and CUDA."
        warnings.warn(f"{why}; {kind} tensors use the slower PyTorch reference. {fix}", RuntimeWarning, stacklevel=3)
    return True


def ratio_from_probs(probs: torch.Tensor, visual: torch.Tensor, query_weights: torch.Tensor) -> torch.Tensor:
    """(B, H, Nq, Nk) probabilities, (B, Nk) bool visual keys, (B, Nq) float32 row weights -> (B, H) float32.

    Rows of weight 0 are not read; a NaN or Inf anywhere in a row that is read gives NaN for its
    head, visual key or not. float64 inputs (analysis only) run the PyTorch reference."""
    if probs.dtype == torch.float64 or _fallback(probs.device):
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
    (B, Nk) bool visual keys, (B, R) float32 row weights (rows of weight <= 0 skipped) -> (B, H) float32.

    float64 inputs (analysis only) run the PyTorch reference."""
    if q.dtype == torch.float64 or _fallback(q.device):
        return reference.ratio_from_qk(q, k, mask, visual, row_weights, scaling, softcap)
    return torch.ops.headgain.ratio_from_qk(q, k, mask, visual, row_weights, float(scaling), float(softcap))


def ratio_from_blocks(
    q: torch.Tensor,
    key_blocks: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    visual: torch.Tensor,
    scaling: float,
    softcap: float = 0.0,
    window: int = 0,
) -> torch.Tensor:
    """(R, H, D) query rows (one per request), (NB, Hkv, BS, D) key blocks of a paged cache (any
    strides), (R, MB) int32/int64 block table (each request's blocks in token order), (R,) int64
    lengths, (R, L) bool visual keys -> (R, H) float32 S_v of each row over its keys
    [max(0, length - window), length) (window 0: all of them).

    The kernels read the keys where they lie. A length outside [1, keys the table and
    ``visual`` hold] or a block id outside the cache raises on CPU; on CUDA (where checking
    would wait for the GPU) it makes that request's S_v NaN. float64 inputs (analysis only)
    run the PyTorch reference."""
    if q.dtype == torch.float64 or _fallback(q.device):
        return reference.ratio_from_blocks(q, key_blocks, block_table, lengths, visual, scaling, softcap, window)
    return torch.ops.headgain.ratio_from_blocks(
        q, key_blocks, block_table, lengths, visual, float(scaling), float(softcap), int(window)
    )


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    visual: torch.Tensor,
    scaling: float,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step in one pass over the keys: (B, H, 1, D) queries, (B, Hkv, Nk, D) keys,
    (B, Hkv, Nk, Dv) values, optional (B, 1, Nk) bool/additive mask, (B, Nk) bool visual keys ->
    ((B, 1, H, Dv) attention output in q's dtype, (B, H) float32 S_v).

    float64 inputs (analysis only) run the PyTorch reference."""
    if q.dtype == torch.float64 or _fallback(q.device):
        return reference.decode_attention(q, k, v, mask, visual, scaling, softcap)
    return torch.ops.headgain.decode_attention(q, k, v, mask, visual, float(scaling), float(softcap))


def head_gains(
    ratios: torch.Tensor,
    has_visual: torch.Tensor,
    tau_perc: float,
    tau_reas: float,
    g_perc: float,
    g_reas: float,
    g_neutral: float,
) -> torch.Tensor:
    """(B, H) float32 ratios, (B,) bool -> (B, H) float32 gains of one layer, by the thresholds and
    gains of one `headgain.core.rules.LayerRule` (+inf / -inf thresholds: the class is absent)."""
    if _fallback(ratios.device):
        return reference.head_gains(ratios, has_visual, tau_perc, tau_reas, g_perc, g_reas, g_neutral)
    return torch.ops.headgain.head_gains(ratios, has_visual, tau_perc, tau_reas, g_perc, g_reas, g_neutral)


def scale_heads(out: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """(B, N, H, D) head outputs (any float dtype, any strides) times (B, H) float32 gains, out of
    place, differentiable in both; rounded once to ``out``'s dtype (float64 ``out`` with float64
    gains is computed in float64, for gradient checks)."""
    if _fallback(out.device):
        return reference.scale_heads(out, gains)
    return torch.ops.headgain.scale_heads(out, gains)


def scale_heads_(out: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """(B, N, H, D) head outputs times (B, H) float32 gains, in place; returns ``out``. Heads whose
    gain is exactly 1 are not touched (all-ones gains leave ``out`` bitwise unchanged)."""
    if _fallback(out.device):
        out.copy_(reference.scale_heads(out, gains))
        return out
    torch.ops.headgain.scale_heads_(out, gains)
    return out


_ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_shape(t: torch.Tensor, name: str, shape: tuple, dtypes: tuple) -> None:
    """Fake-tensor twin of the C++ argument checks: ``shape`` entries of None match any size."""
    torch._check(
        t.dim() == len(shape) and all(s is None or t.shape[i] == s for i, s in enumerate(shape)),
        lambda: f"headgain: {name} must have shape {shape} (None = any), got {tuple(t.shape)}",
    )
    torch._check(t.dtype in dtypes, lambda: f"headgain: {name} must be one of {dtypes}, got {t.dtype}")


if _EXT_ERROR is None:

    @torch.library.register_fake("headgain::ratio_from_probs")
    def _(probs, visual, query_weights):
        _check_shape(probs, "probs", (None,) * 4, _ATTN_DTYPES)
        b, _, nq, nk = probs.shape
        _check_shape(visual, "visual", (b, nk), (torch.bool,))
        _check_shape(query_weights, "query_weights", (b, nq), (torch.float32,))
        return probs.new_empty(probs.shape[:2], dtype=torch.float32)

    @torch.library.register_fake("headgain::ratio_from_qk")
    def _(q, k, mask, visual, row_weights, scaling, softcap):
        _check_shape(q, "q", (None,) * 4, _ATTN_DTYPES)
        b, h, r, d = q.shape
        _check_shape(k, "k", (b, None, None, d), (q.dtype,))
        torch._check(h % k.shape[1] == 0, lambda: f"headgain: H={h} must be a multiple of Hkv={k.shape[1]}")
        nk = k.shape[2]
        if mask is not None:
            _check_shape(mask, "mask", (b, r, nk), (torch.bool, torch.float64) + _ATTN_DTYPES)
        _check_shape(visual, "visual", (b, nk), (torch.bool,))
        _check_shape(row_weights, "row_weights", (b, r), (torch.float32,))
        return q.new_empty((b, h), dtype=torch.float32)

    @torch.library.register_fake("headgain::ratio_from_blocks")
    def _(q, key_blocks, block_table, lengths, visual, scaling, softcap, window):
        _check_shape(q, "q", (None,) * 3, _ATTN_DTYPES)
        r, h, d = q.shape
        _check_shape(key_blocks, "key_blocks", (None, None, None, d), (q.dtype,))
        torch._check(
            h % key_blocks.shape[1] == 0, lambda: f"headgain: H={h} must be a multiple of Hkv={key_blocks.shape[1]}"
        )
        _check_shape(block_table, "block_table", (r, None), (torch.int32, torch.int64))
        _check_shape(lengths, "lengths", (r,), (torch.int64,))
        _check_shape(visual, "visual", (r, None), (torch.bool,))
        torch._check(window >= 0, lambda: f"headgain: window must be 0 or positive, got {window}")
        return q.new_empty((r, h), dtype=torch.float32)

    @torch.library.register_fake("headgain::decode_attention")
    def _(q, k, v, mask, visual, scaling, softcap):
        _check_shape(q, "q", (None, None, 1, None), _ATTN_DTYPES)
        b, h, _, d = q.shape
        _check_shape(k, "k", (b, None, None, d), (q.dtype,))
        torch._check(h % k.shape[1] == 0, lambda: f"headgain: H={h} must be a multiple of Hkv={k.shape[1]}")
        hkv, nk = k.shape[1], k.shape[2]
        _check_shape(v, "v", (b, hkv, nk, None), (q.dtype,))
        if mask is not None:
            _check_shape(mask, "mask", (b, 1, nk), (torch.bool, torch.float64) + _ATTN_DTYPES)
        _check_shape(visual, "visual", (b, nk), (torch.bool,))
        return q.new_empty((b, 1, h, v.shape[3])), q.new_empty((b, h), dtype=torch.float32)

    @torch.library.register_fake("headgain::head_gains")
    def _(ratios, has_visual, tau_perc, tau_reas, g_perc, g_reas, g_neutral):
        _check_shape(ratios, "ratios", (None, None), (torch.float32,))
        _check_shape(has_visual, "has_visual", (ratios.shape[0],), (torch.bool,))
        return torch.empty_like(ratios, memory_format=torch.contiguous_format)

    def _check_scale(out, gains):
        _check_shape(out, "out", (None,) * 4, (torch.float64,) + _ATTN_DTYPES)
        _check_shape(gains, "gains", (out.shape[0], out.shape[2]), (torch.float32, torch.float64))

    @torch.library.register_fake("headgain::scale_heads")
    def _(out, gains):
        _check_scale(out, gains)
        return torch.empty_like(out)

    @torch.library.register_fake("headgain::scale_heads_")
    def _(out, gains):
        _check_scale(out, gains)
        return None

    def _scale_setup(ctx, inputs, output):
        out, gains = inputs
        ctx.save_for_backward(out, gains)

    def _scale_backward(ctx, grad):
        out, gains = ctx.saved_tensors
        grad_out = torch.ops.headgain.scale_heads(grad, gains) if ctx.needs_input_grad[0] else None
        grad_gains = None
        if ctx.needs_input_grad[1]:
            acc = torch.promote_types(torch.promote_types(grad.dtype, out.dtype), torch.float32)
            grad_gains = torch.einsum("bnhd,bnhd->bh", grad.to(acc), out.to(acc)).to(gains.dtype)
        return grad_out, grad_gains

    torch.library.register_autograd("headgain::scale_heads", _scale_backward, setup_context=_scale_setup)
