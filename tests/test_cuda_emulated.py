"""headgain's CUDA kernels and launch code executed on the CPU by an emulation of CUDA's
execution model (tests/emulated_cuda.py): the cases the CUDA tests give the ops on a GPU,
against the PyTorch reference (and the explicit softmax of test_fused_decode), with as many key
splits as an H200 gives them and with one split and a thousand. This checks indexing,
barriers, launch configurations and numerics wherever no GPU is at hand; it is no GPU run
(no data races, no timing), which `make gpu-check` remains."""

import sys

import pytest
import test_fused_decode as F
import test_ops as T
import test_ratio_from_blocks as P
import torch

from headgain.core import reference

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulation's fibers need Linux")


@pytest.fixture(scope="module")
def cuda():
    from emulated_cuda import load
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        pytest.skip("building the emulation needs ninja (pip install ninja; make test installs it)")
    return load()


# (dtype, multiprocessors of the emulated device, which set the kernels' key splits): every
# dtype as on an H200, float32 also with one split and with a thousand
SETTINGS = [(dtype, 132) for dtype in T.DTYPES] + [(torch.float32, 1), (torch.float32, 5000)]


def _ids(setting) -> str:
    return f"{str(setting[0]).split('.')[-1]}-{setting[1]}SMs"


@pytest.fixture(params=SETTINGS, ids=_ids)
def setting(request, monkeypatch):
    dtype, multiprocessors = request.param
    monkeypatch.setenv("HEADGAIN_EMU_SMS", str(multiprocessors))
    return dtype


def test_ratio_ops(cuda, setting):
    dtype = setting
    for name, args in T.sample_ratio_from_probs("cpu", dtype):
        torch.testing.assert_close(
            cuda.ratio_from_probs(*args), reference.ratio_from_probs(*args), **T._tol(dtype), msg=name
        )
    for name, args in T.sample_ratio_from_qk("cpu", dtype):
        got = cuda.ratio_from_qk(*args)
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, reference.ratio_from_qk(*args), **T._tol(dtype), msg=name)


def test_ratio_from_qk_head_dim_limit(cuda):
    q, k = torch.randn(1, 2, 1, 12296), torch.randn(1, 1, 3, 12296)
    args = (None, torch.tensor([[True, False, True]]), torch.ones(1, 1), 0.01, 0.0)
    with pytest.raises(RuntimeError, match="head dims up to 12288, got 12296"):
        cuda.ratio_from_qk(q, k, *args)
    got = cuda.ratio_from_qk(q[..., :12288], k[..., :12288], *args)  # one query row per pass
    torch.testing.assert_close(got, reference.ratio_from_qk(q[..., :12288], k[..., :12288], *args))


@pytest.mark.parametrize("op", sorted(T.NON_FINITE_CASES))
def test_non_finite_inputs_give_nan(cuda, op):
    args, nan = T.NON_FINITE_CASES[op]("cpu")
    got = getattr(cuda, op)(*args)
    assert torch.equal(got.isnan(), nan)
    torch.testing.assert_close(got[~nan], getattr(reference, op)(*args)[~nan])


@pytest.mark.parametrize("dtype", T.FLOAT_DTYPES)
def test_gains_and_scaling(cuda, dtype):
    for name, args in T.sample_head_gains("cpu"):
        assert torch.equal(cuda.head_gains(*args), reference.head_gains(*args)), name
    for name, (out, gains) in T.sample_scale_heads("cpu", dtype):
        expected = reference.scale_heads(out, gains)
        if dtype == torch.float64:
            expected = (out.double() * gains[:, None, :, None].double()).to(dtype)
        assert torch.equal(cuda.scale_heads(out, gains), expected), name
        in_place = out.clone()
        cuda.scale_heads_(in_place, gains)
        assert torch.equal(in_place, expected), name
        cuda.scale_heads_(out, torch.ones_like(gains))
        assert torch.equal(out, out.clone()), name


# test_fused_decode's shapes with fewer keys (each emulated thread switch costs microseconds),
# still several key splits apart
SHAPES = [(b, h, hkv, min(nk, 300), d, dv) for b, h, hkv, nk, d, dv in F.SHAPES]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_attention(cuda, shape, setting):
    dtype = setting
    for mask_kind in ("none", "bool", "additive"):
        q, k, v, visual, mask = F._case(*shape, dtype)
        if mask_kind == "none":
            mask = None
        elif mask_kind == "additive":
            mask = torch.where(mask, 0.0, -1e9).to(dtype)
        scaling = shape[4] ** -0.5
        out, ratios = cuda.decode_attention(q, k, v, mask, visual, scaling, 0.0)
        want_out, want_ratios = reference.decode_attention(q, k, v, mask, visual, scaling)
        torch.testing.assert_close(out.float(), want_out.float(), atol=F.TOL[dtype], rtol=F.TOL[dtype], msg=mask_kind)
        torch.testing.assert_close(ratios, want_ratios, atol=2e-6, rtol=1e-5, msg=mask_kind)


def test_decode_attention_edges(cuda):
    # softcap, keys and values as slices of a larger cache, a sample with every key masked
    q, k, v, visual, mask = F._case(2, 4, 2, 700, 32, 32, torch.float32)
    big_k, big_v = torch.zeros(2, 1000, 2, 32), torch.zeros(2, 1000, 2, 32)
    big_k[:, :700], big_v[:, :700] = k.transpose(1, 2), v.transpose(1, 2)
    mask[1] = False
    keys, values = big_k[:, :700].transpose(1, 2), big_v[:, :700].transpose(1, 2)
    out, ratios = cuda.decode_attention(q, keys, values, mask, visual, 0.2, 5.0)
    want_out, want_ratios = F._explicit(q, k, v, mask, visual, 0.2, softcap=5.0)
    torch.testing.assert_close(out[0], want_out[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ratios[0], want_ratios[0], atol=2e-6, rtol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and ratios[1].isnan().all()
    # head widths up to the kernel's 256, keys wider than values
    for b, h, hkv, nk, d, dv in [(2, 4, 2, 300, 256, 256), (1, 4, 4, 200, 192, 128)]:
        q, k, v, visual, mask = F._case(b, h, hkv, nk, d, dv, torch.float32)
        out, ratios = cuda.decode_attention(q, k, v, mask, visual, d**-0.5, 0.0)
        want_out, want_ratios = reference.decode_attention(q, k, v, mask, visual, d**-0.5)
        torch.testing.assert_close(out, want_out, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ratios, want_ratios, atol=2e-6, rtol=1e-5)
    q, k, v, visual, _ = F._case(1, 2, 1, 20, 264, 264, torch.float32)
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        cuda.decode_attention(q, k, v, None, visual, 0.1, 0.0)
    # no keys: no output, no visual share
    empty_k, empty_v = torch.zeros(2, 2, 0, 32), torch.zeros(2, 2, 0, 16)
    no_visual = torch.zeros(2, 0, dtype=torch.bool)
    out, ratios = cuda.decode_attention(torch.randn(2, 4, 1, 32), empty_k, empty_v, None, no_visual, 0.2, 0.0)
    assert torch.equal(out, torch.zeros(2, 1, 4, 16)) and torch.equal(ratios, torch.zeros(2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_narrow_loads(cuda, dtype):
    """Keys and values the kernel reads element by element instead of in packs: widths that are
    no whole number of packs, keys strided along D, and rows off a pack boundary."""
    cases = {"narrow": F._case(2, 6, 2, 300, 20, 10, dtype)}
    q, k, v, visual, mask = F._case(1, 8, 2, 280, 32, 32, dtype, seed=1)
    cases["k-strided-d"] = (q, k.transpose(2, 3).contiguous().transpose(2, 3), v, visual, mask)
    flat = torch.cat([torch.zeros(1, dtype=dtype), v.flatten()])
    cases["v-offset"] = (q, k, flat[1:].view(v.shape), visual, mask)
    for name, (q, k, v, visual, mask) in cases.items():
        scaling = q.shape[-1] ** -0.5
        out, ratios = cuda.decode_attention(q, k, v, mask, visual, scaling, 0.0)
        want_out, want_ratios = reference.decode_attention(q, k, v, mask, visual, scaling)
        torch.testing.assert_close(out.float(), want_out.float(), atol=F.TOL[dtype], rtol=F.TOL[dtype], msg=name)
        torch.testing.assert_close(ratios, want_ratios, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("layout", ["dmajor", "nhd"])
def test_ratio_from_blocks(cuda, layout, setting):
    dtype = setting
    cases = [((1, 16, 17, 40), 16, 0, torch.int32), ((33, 7), 16, 10, torch.int64), ((700, 130), 64, 300, torch.int32)]
    for lengths, block_size, window, index in cases:
        q, keys, visual = P._case(lengths, 8, 2, 64, dtype)
        blocks, table, _ = P._paged(keys, block_size, layout)
        got = cuda.ratio_from_blocks(q, blocks, table.to(index), torch.tensor(lengths), visual, 0.125, 0.0, window)
        want = P._explicit(q, keys, visual, 0.125, 0.0, window)
        torch.testing.assert_close(got, want, atol=P.TOL[dtype], rtol=1e-4, msg=f"{lengths} {window}")


@pytest.mark.parametrize("layout", ["dmajor", "nhd"])
def test_ratio_from_blocks_large_query_group(cuda, layout):
    q, keys, visual, lengths = P.large_group_case()
    blocks, table, _ = P._paged(keys, 16, layout)
    got = cuda.ratio_from_blocks(q, blocks, table, lengths, visual, 0.125, 0.0, 0)
    torch.testing.assert_close(got, P._explicit(q, keys, visual, 0.125, 0.0, 0), atol=2e-6, rtol=1e-5)


def test_ratio_from_blocks_bad_values_give_nan(cuda):
    q, keys, visual = P._case((20, 9, 5), 4, 2, 32, torch.float32)
    blocks, table, _ = P._paged(keys, 16, "nhd")
    table[1, 0] = blocks.shape[0]  # request 1: a block the cache does not have
    got = cuda.ratio_from_blocks(q, blocks, table, torch.tensor([20, 9, 0]), visual, 0.2, 0.0, 0)  # request 2: no keys
    want = P._explicit(q[:1], keys[:1], visual[:1], 0.2, 0.0, 0)
    torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=1e-5)
    assert got[1:].isnan().all()
