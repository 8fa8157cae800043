"""The compiled ops (``torch.ops.headgain.*``) against the pure-PyTorch reference.

Every test runs the real extension: without it the tests skip, or fail when
HEADGAIN_REQUIRE_EXTENSION=1 (as `make test` and CI set it). CUDA cases are marked
``cuda`` and skip with a reason where no GPU (or no CUDA build of the kernels) exists.
"""

from __future__ import annotations

import os

import pytest
import torch
from support import DEVICES
from torch.library import opcheck

from headgain.core import ops, reference

REQUIRE_EXTENSION = os.environ.get("HEADGAIN_REQUIRE_EXTENSION") == "1"
if not ops.extension_available() and not REQUIRE_EXTENSION:
    pytest.skip(f"headgain extension not built: {ops.extension_error()}", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def test_extension_is_loaded():
    assert ops.extension_available(), f"headgain extension not built: {ops.extension_error()}"


def test_cpu_kernels_use_torch_threads():
    """Where torch runs its intra-op threads on OpenMP (its Linux builds), the CPU kernels'
    at::parallel_for must too: compiled without OpenMP, ATen's header template runs every loop
    on one thread, silently (the build flag it sets is what the extension reports)."""
    if not torch.backends.openmp.is_available():
        pytest.skip(f"torch {torch.__version__} does not use OpenMP here")
    assert ops.extension_parallel(), "headgain._C was compiled without -fopenmp: its CPU kernels run on one thread"


def test_cuda_flag_matches_the_registered_kernels():
    """extension_available("cuda") (the build's own flag) against torch's dispatcher."""
    for op in ("ratio_from_probs", "ratio_from_qk", "head_gains", "scale_heads", "scale_heads_"):
        registered = torch._C._dispatch_has_kernel_for_dispatch_key(f"headgain::{op}", "CUDA")
        assert registered == ops.extension_available("cuda"), op
    assert ops.extension_available(torch.device("cpu")) and ops.extension_available("meta")


def test_devices_without_kernels_use_the_reference_and_warn_once(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())
    assert not ops._fallback(torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match="no compiled kernels for xpu tensors; xpu tensors use the slower"):
        assert ops._fallback(torch.device("xpu"))
    if not ops.extension_available("cuda"):
        with pytest.warns(RuntimeWarning, match="built without its CUDA kernels.*HEADGAIN_FORCE_CUDA=1"):
            assert ops._fallback(torch.device("cuda", 1))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops._fallback(torch.device("xpu"))  # warned once per device type


# ---------------------------------------------------------------------------- inputs


def _gen(device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def _rand(shape, dtype, device, g, scale=1.0):
    return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


def _visual(b, nk, device, g, empty_rows=()):
    vis = torch.rand((b, nk), generator=g, device=device) < 0.5
    for i in empty_rows:
        vis[i] = False
    return vis


def _one_hot(b, n, idx, device):
    w = torch.zeros((b, n), device=device)
    w[torch.arange(b, device=device), torch.as_tensor(idx, device=device)] = 1.0
    return w


def _probs(shape, dtype, device, g, layout="contiguous"):
    b, h, nq, nk = shape
    probs = (torch.randn(shape, generator=g, device=device) * 3).softmax(-1).to(dtype)
    if layout == "heads_last":  # (B, Nq, H, Nk) storage seen as (B, H, Nq, Nk)
        return torch.empty((b, nq, h, nk), dtype=dtype, device=device).transpose(1, 2).copy_(probs)
    if layout == "strided_keys":  # every other key of a wider tensor
        return torch.zeros((b, h, nq, 2 * nk), dtype=dtype, device=device)[..., ::2].copy_(probs)
    return probs


def sample_ratio_from_probs(device, dtype):
    """(name, (probs, visual, query_weights)) cases."""
    g = _gen(device)
    cases = []
    for name, (b, h, nq, nk), layout in [
        ("odd", (2, 7, 5, 33), "contiguous"),
        ("nk1", (3, 4, 2, 1), "contiguous"),
        ("qwen_heads", (2, 28, 3, 300), "contiguous"),
        ("heads_last", (2, 6, 4, 45), "heads_last"),
        ("strided_keys", (2, 5, 3, 40), "strided_keys"),
    ]:
        probs = _probs((b, h, nq, nk), dtype, device, g, layout)
        last = _one_hot(b, nq, [nq - 1 - (i % nq) for i in range(b)], device)
        mean = torch.rand((b, nq), generator=g, device=device) * (torch.rand((b, nq), generator=g, device=device) > 0.3)
        cases.append((f"{name}-onehot", (probs, _visual(b, nk, device, g, empty_rows=(0,)), last)))
        cases.append((f"{name}-mean", (probs, _visual(b, nk, device, g), mean)))
    return cases


def sample_ratio_from_qk(device, dtype):
    """(name, (q, k, mask, visual, row_weights, scaling, softcap)) cases."""
    g = _gen(device)
    cases = []
    for name, (b, h, hkv, r, nk, d), mask_kind, softcap in [
        ("nk1-mha", (2, 3, 3, 1, 1, 16), None, 0.0),
        ("gqa-odd", (2, 28, 4, 1, 300, 128), "bool", 0.0),
        ("gqa-long", (1, 28, 4, 2, 1100, 128), None, 0.0),
        ("h7-additive-bf16", (2, 7, 7, 3, 37, 24), torch.bfloat16, 0.0),
        ("additive-f32-softcap", (2, 8, 2, 2, 50, 40), torch.float32, 30.0),
        ("additive-f16", (3, 6, 3, 2, 19, 8), torch.float16, 0.0),
        # head dims the bfloat16 dot-product kernel does not take (it needs D % 32 == 0 and
        # unit stride along D), so on CPUs that have it these run the widening kernel
        ("d48-g5", (2, 10, 2, 1, 66, 48), "bool", 0.0),
        ("k-strided-d", (1, 14, 2, 2, 45, 64), None, 0.0),
        # CUDA reads key rows 16 bytes at a time where it can: not at a head dim of 38 (no whole
        # number of 16-byte packs in any dtype), nor in keys that start off a 16-byte boundary
        ("d38-narrow-loads", (2, 6, 2, 1, 75, 38), "bool", 0.0),
        ("k-offset", (2, 8, 2, 1, 60, 64), None, 0.0),
        # query groups of more rows than CUDA scores a key against at once (8): two passes
        ("g12-two-passes", (2, 24, 2, 1, 130, 64), "bool", 0.0),
        # heads so wide that CUDA's shared memory holds 6 query rows (float32) or fewer per pass
        ("d2048-narrow-passes", (1, 14, 2, 1, 40, 2048), None, 0.0),
    ]:
        q = _rand((b, r, h, d), dtype, device, g).transpose(1, 2)  # (B, H, R, D), non-contiguous
        k = _rand((b, hkv, nk, d), dtype, device, g)
        if name == "gqa-long":
            k = _rand((b, nk, hkv, d), dtype, device, g).transpose(1, 2)
        if name == "k-strided-d":
            k = _rand((b, hkv, d, nk), dtype, device, g).transpose(2, 3)
        if name == "k-offset":
            k = _rand((b * hkv * nk * d + 1,), dtype, device, g)[1:].view(b, hkv, nk, d)
        allowed = torch.rand((b, r, nk), generator=g, device=device) > 0.3
        allowed[..., 0] = True  # every weighted row keeps one key
        w = torch.rand((b, r), generator=g, device=device) + 0.1
        if r > 1:  # padded rows: weight 0 and fully masked
            w[0, 1] = 0.0
            allowed[0, 1] = False
        if mask_kind is None:
            mask = None
        elif mask_kind == "bool":
            mask = allowed
        else:
            neg = torch.finfo(mask_kind).min if mask_kind != torch.float32 else float("-inf")
            bias = torch.where(
                allowed, torch.randn((b, r, nk), generator=g, device=device), torch.tensor(neg, device=device)
            )
            mask = bias.to(mask_kind)
        scaling = d**-0.5
        cases.append(
            (name, (q, k, mask, _visual(b, nk, device, g, empty_rows=(b - 1,) if b > 1 else ()), w, scaling, softcap))
        )
    # a broadcast (stride 0) mask row, as models expand one padding mask over rows
    b, h, hkv, r, nk, d = 2, 4, 2, 3, 70, 32
    pad = torch.ones((b, 1, nk), dtype=torch.bool, device=device)
    pad[1, :, :20] = False
    q, k = _rand((b, h, r, d), dtype, device, g), _rand((b, hkv, nk, d), dtype, device, g)
    w = _one_hot(b, r, [r - 1, r - 2], device)
    cases.append(("expanded-mask", (q, k, pad.expand(b, r, nk), _visual(b, nk, device, g), w, 0.2, 0.0)))
    # rows of negative weight are skipped like rows of weight 0, even when fully masked
    q, k = _rand((2, 6, 2, 32), dtype, device, g), _rand((2, 3, 40, 32), dtype, device, g)
    allowed = torch.rand((2, 2, 40), generator=g, device=device) > 0.3
    allowed[..., 0] = True
    allowed[0, 0] = False
    w = torch.tensor([[-1.0, 0.5], [0.7, -0.2]], device=device)
    cases.append(("negative-weight", (q, k, allowed, _visual(2, 40, device, g), w, 0.2, 0.0)))
    # no keys at all: no visual share
    q, k = _rand((1, 4, 1, 16), dtype, device, g), _rand((1, 2, 0, 16), dtype, device, g)
    no_visual = torch.zeros((1, 0), dtype=torch.bool, device=device)
    cases.append(("no-keys", (q, k, None, no_visual, torch.ones((1, 1), device=device), 0.25, 0.0)))
    return cases


def sample_head_gains(device):
    g = _gen(device)
    ratios = torch.rand((3, 28), generator=g, device=device)
    ratios[0, :3] = torch.tensor([0.3, 0.1, 0.2])  # exact ties with the thresholds
    has_visual = torch.tensor([True, True, False], device=device)
    return [
        ("mixed", (ratios, has_visual, 0.3, 0.1, 1.2, 1.1, 1.0)),
        ("no-perception", (ratios, has_visual, 2.0, 0.05, 1.5, 0.9, 1.0)),
        (
            "h7",
            (
                torch.rand((2, 7), generator=g, device=device),
                torch.ones(2, dtype=torch.bool, device=device),
                0.5,
                0.5,
                2.0,
                0.5,
                1.0,
            ),
        ),
    ]


def _gains(b, h, device, g, ones_every=3):
    gains = torch.rand((b, h), generator=g, device=device) + 0.5
    gains.view(-1)[::ones_every] = 1.0
    return gains


def sample_scale_heads(device, dtype):
    """(name, (out, gains)) cases; out is (B, N, H, D), sometimes a non-contiguous view."""
    g = _gen(device)
    cases = []
    for name, (b, n, h, d) in [("odd", (2, 5, 7, 33)), ("decode", (3, 1, 28, 128)), ("d1", (2, 3, 4, 1))]:
        cases.append((name, (_rand((b, n, h, d), dtype, device, g), _gains(b, h, device, g))))
    b, n, h, d = 2, 6, 5, 16
    cases.append(("heads-first", (_rand((b, h, n, d), dtype, device, g).transpose(1, 2), _gains(b, h, device, g))))
    cases.append(("strided-d", (_rand((b, n, h, 2 * d), dtype, device, g)[..., ::2], _gains(b, h, device, g))))
    return cases


# ---------------------------------------------------------------------------- helpers


def _tol(dtype):
    return {"atol": 2e-5, "rtol": 1e-4} if dtype != torch.float64 else {"atol": 1e-10, "rtol": 1e-10}


def _ids(cases):
    return [c[0] for c in cases]


def _args(case):
    return case[1]


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ratio_from_probs_matches_reference(device, dtype):
    for name, args in sample_ratio_from_probs(device, dtype):
        got = ops.ratio_from_probs(*args)
        assert got.dtype == torch.float32 and got.shape == args[0].shape[:2]
        torch.testing.assert_close(got, reference.ratio_from_probs(*args), **_tol(dtype), msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_ratio_from_probs_skips_zero_weight_rows(device):
    g = _gen(device)
    probs = _probs((2, 4, 6, 21), torch.float32, device, g)
    visual, w = _visual(2, 21, device, g), _one_hot(2, 6, [5, 3], device)
    poisoned = probs.clone()
    poisoned[w[:, None, :, None].expand_as(probs) == 0] = float("nan")  # rows that must never be read
    torch.testing.assert_close(ops.ratio_from_probs(poisoned, visual, w), reference.ratio_from_probs(probs, visual, w))


def non_finite_probs_case(device):
    """Probabilities with a NaN and an Inf on non-visual keys of read rows: (args, where the
    result must be NaN). A value that cannot be a probability spoils its head's share, as in
    the reference, whether or not its key is visual."""
    g = _gen(device)
    probs = _probs((2, 3, 4, 40), torch.float32, device, g)
    visual, w = _visual(2, 40, device, g), _one_hot(2, 4, [3, 1], device)
    visual[0, 7] = visual[1, 30] = False
    probs[0, 1, 3, 7], probs[1, 2, 1, 30] = float("nan"), float("inf")
    nan = torch.zeros(2, 3, dtype=torch.bool, device=device)
    nan[0, 1] = nan[1, 2] = True
    return (probs, visual, w), nan


def non_finite_qk_case(device):
    """Keys with a NaN in a key of KV head 1 of sample 0 and in the last key of KV head 0 of
    sample 1: (args, where the result must be NaN). Every query head of a spoilt KV head reads
    the bad key, so its share is NaN, as in the reference; the other heads are not touched."""
    g = _gen(device)
    q, k = _rand((2, 6, 1, 32), torch.float32, device, g), _rand((2, 3, 50, 32), torch.float32, device, g)
    k[0, 1, 17, 5], k[1, 0, 49, 0] = float("nan"), float("nan")
    nan = torch.zeros(2, 6, dtype=torch.bool, device=device)
    nan[0, 2:4] = nan[1, 0:2] = True
    return (q, k, None, _visual(2, 50, device, g), torch.ones((2, 1), device=device), 0.2, 0.0), nan


NON_FINITE_CASES = {"ratio_from_probs": non_finite_probs_case, "ratio_from_qk": non_finite_qk_case}


@pytest.mark.parametrize("op", sorted(NON_FINITE_CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_inputs_give_nan(op, device):
    args, nan = NON_FINITE_CASES[op](device)
    got, want = getattr(ops, op)(*args), getattr(reference, op)(*args)
    assert torch.equal(got.isnan(), nan) and torch.equal(want.isnan(), nan)
    torch.testing.assert_close(got[~nan], want[~nan])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ratio_from_qk_matches_reference(device, dtype):
    for name, args in sample_ratio_from_qk(device, dtype):
        got = ops.ratio_from_qk(*args)
        assert got.dtype == torch.float32 and got.shape == args[0].shape[:2]
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, reference.ratio_from_qk(*args), **_tol(dtype), msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_ratio_from_qk_with_probs_agree(device):
    """The sdpa path (from q and k) and the eager path (from probabilities) give one ratio."""
    _, (q, k, mask, visual, w, scaling, softcap) = sample_ratio_from_qk(device, torch.float32)[1]
    g = q.shape[1] // k.shape[1]
    scores = torch.einsum("bhrd,bhkd->bhrk", q, k.repeat_interleave(g, dim=1)) * scaling
    probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    torch.testing.assert_close(
        ops.ratio_from_qk(q, k, mask, visual, w, scaling, softcap), ops.ratio_from_probs(probs, visual, w)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_head_gains_matches_reference(device):
    for name, args in sample_head_gains(device):
        torch.testing.assert_close(ops.head_gains(*args), reference.head_gains(*args), atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scale_heads_matches_reference(device, dtype):
    for name, (out, gains) in sample_scale_heads(device, dtype):
        expected = (out.double() * gains[:, None, :, None].double()).to(dtype)
        if dtype != torch.float64:
            expected = reference.scale_heads(out, gains)
        got = ops.scale_heads(out, gains)
        assert got.shape == out.shape and got.dtype == dtype
        torch.testing.assert_close(got, expected, atol=0, rtol=0, msg=name)
        inplace = out.clone()
        ops.scale_heads_(inplace, gains)
        torch.testing.assert_close(inplace, expected, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scale_heads_gain_one_is_bitwise_identity(device, dtype):
    for name, (out, gains) in sample_scale_heads(device, dtype):
        before = out.clone()
        ones = torch.ones_like(gains)
        ops.scale_heads_(out, ones)
        assert torch.equal(
            out.view(torch.uint8) if out.is_contiguous() else out.contiguous().view(torch.uint8),
            before.contiguous().view(torch.uint8),
        ), name
        assert torch.equal(ops.scale_heads(out, ones), before), name


@pytest.mark.parametrize("device", DEVICES)
def test_scale_heads_flat_view_in_place(device):
    """(B, N, H*D) projection input scaled through its (B, N, H, D) view."""
    g = _gen(device)
    flat = _rand((2, 3, 7 * 16), torch.bfloat16, device, g)
    gains = _gains(2, 7, device, g)
    expected = reference.scale_heads(flat.view(2, 3, 7, 16), gains).view(flat.shape)
    ops.scale_heads_(flat.view(2, 3, 7, 16), gains)
    assert torch.equal(flat, expected)


# ---------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: ops.ratio_from_probs(torch.rand(2, 3, 4), torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 3)),
            "probs",
        ),
        (
            lambda: ops.ratio_from_probs(torch.rand(2, 3, 4, 5), torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 4)),
            "visual",
        ),
        (
            lambda: ops.ratio_from_qk(
                torch.rand(1, 3, 1, 8),
                torch.rand(1, 2, 5, 8),
                None,
                torch.ones(1, 5, dtype=torch.bool),
                torch.ones(1, 1),
                1.0,
            ),
            "H % Hkv",
        ),
        (
            lambda: ops.head_gains(torch.rand(2, 3), torch.ones(3, dtype=torch.bool), 0.5, 0.1, 1.0, 1.0, 1.0),
            "has_visual",
        ),
        (lambda: ops.scale_heads_(torch.rand(2, 3, 4, 5), torch.ones(2, 5)), "gains"),
        (
            lambda: ops.scale_heads_(torch.rand(2, 1, 4, 5).expand(2, 3, 4, 5), torch.ones(2, 4)),
            "single memory location",
        ),
        (
            lambda: ops.scale_heads_(torch.zeros(2, 3, 4, 5, dtype=torch.float8_e4m3fn), torch.ones(2, 4)),
            "float32/bfloat16",
        ),
    ],
)
def test_bad_arguments_raise_with_the_argument_name(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ---------------------------------------------------------------------------- opcheck, compile, autograd


def _opcheck_cases(device):
    yield torch.ops.headgain.ratio_from_probs.default, _args(sample_ratio_from_probs(device, torch.bfloat16)[0])
    yield torch.ops.headgain.ratio_from_probs.default, _args(sample_ratio_from_probs(device, torch.float32)[6])
    for case in sample_ratio_from_qk(device, torch.float32)[2:4]:
        yield torch.ops.headgain.ratio_from_qk.default, _args(case)
    yield torch.ops.headgain.head_gains.default, _args(sample_head_gains(device)[0])
    for _, (out, gains) in sample_scale_heads(device, torch.float32)[:4]:
        yield torch.ops.headgain.scale_heads_.default, (out, gains)
        yield torch.ops.headgain.scale_heads.default, (out, gains)
    out, gains = _args(sample_scale_heads(device, torch.float64)[0])
    yield torch.ops.headgain.scale_heads.default, (out.requires_grad_(), gains.double().requires_grad_())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    _, (probs, visual, w) = sample_ratio_from_probs(device, torch.float32)[0]
    g = _gen(device)
    b, h = probs.shape[:2]
    heads = _rand((b, 3, h, 8), torch.float32, device, g)
    has_visual = torch.tensor([True, False], device=device)

    def layer(probs, visual, w, heads, has_visual):
        gains = ops.head_gains(ops.ratio_from_probs(probs, visual, w), has_visual, 0.6, 0.4, 1.3, 1.1, 1.0)
        ops.scale_heads_(heads, gains)
        return ops.scale_heads(heads, gains)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager_heads, compiled_heads = heads.clone(), heads.clone()
    expected = layer(probs, visual, w, eager_heads, has_visual)
    torch.testing.assert_close(compiled(probs, visual, w, compiled_heads, has_visual), expected)
    torch.testing.assert_close(compiled_heads, eager_heads)


@pytest.mark.parametrize("device", DEVICES)
def test_scale_heads_gradcheck(device):
    g = _gen(device)
    out = torch.randn((2, 3, 5, 4), generator=g, device=device, dtype=torch.float64, requires_grad=True)
    gains = (torch.rand((2, 5), generator=g, device=device, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(ops.scale_heads, (out, gains))


@pytest.mark.parametrize("device", DEVICES)
def test_scale_heads_grad_matches_reference_float32(device):
    g = _gen(device)
    out = torch.randn((2, 4, 7, 8), generator=g, device=device, requires_grad=True)
    gains = (torch.rand((2, 7), generator=g, device=device) + 0.5).requires_grad_()
    upstream = torch.randn((2, 4, 7, 8), generator=g, device=device)
    got = torch.autograd.grad(ops.scale_heads(out, gains), (out, gains), upstream)
    want = torch.autograd.grad(reference.scale_heads(out, gains), (out, gains), upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
