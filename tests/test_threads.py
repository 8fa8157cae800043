"""The CPU kernels on torch's intra-op threads (at::parallel_for, OpenMP): at any thread count,
more threads than cores included, every op matches the PyTorch reference computed here. The
shapes are large enough that each kernel splits its work into many tasks (key spans, query
groups, requests), so a race or a wrong task partition shows as a wrong value."""

import pytest
import test_fused_decode as F
import test_ops as T
import test_ratio_from_blocks as P
import torch

from headgain.core import ops, reference


@pytest.fixture(params=[1, 2, 3, 8], ids=lambda n: f"{n}threads")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_the_kernels_use_the_threads_they_are_given(threads):
    assert torch.get_num_threads() == threads
    assert ops.extension_parallel() or not torch.backends.openmp.is_available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ratio_ops(threads, dtype):
    for name, args in T.sample_ratio_from_probs("cpu", dtype):
        torch.testing.assert_close(
            ops.ratio_from_probs(*args), reference.ratio_from_probs(*args), **T._tol(dtype), msg=name
        )
    for name, args in T.sample_ratio_from_qk("cpu", dtype):
        torch.testing.assert_close(ops.ratio_from_qk(*args), reference.ratio_from_qk(*args), **T._tol(dtype), msg=name)
    g = torch.Generator().manual_seed(threads)
    q = torch.randn(3, 8, 2, 64, generator=g).to(dtype)
    k = torch.randn(3, 2, 5000, 64, generator=g).to(dtype)
    mask = torch.rand(3, 2, 5000, generator=g) < 0.9
    visual = torch.rand(3, 5000, generator=g) < 0.3
    weights = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    args = (q, k, mask, visual, weights, 0.125)
    torch.testing.assert_close(ops.ratio_from_qk(*args), reference.ratio_from_qk(*args), **T._tol(dtype))


def test_decode_attention(threads):
    for b, h, hkv, nk in [(3, 8, 2, 5000), (1, 28, 4, 3000), (6, 4, 4, 700)]:
        q, k, v, visual, mask = F._case(b, h, hkv, nk, 64, 64, torch.float32, seed=threads)
        out, ratios = ops.decode_attention(q, k, v, mask, visual, 0.125)
        want_out, want_ratios = reference.decode_attention(q, k, v, mask, visual, 0.125)
        torch.testing.assert_close(out, want_out, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ratios, want_ratios, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["dmajor", "nhd"])
def test_ratio_from_blocks(threads, layout, dtype):
    lengths = (2500, 300, 1700, 9, 4000)
    q, keys, visual = P._case(lengths, 14, 2, 64, dtype, seed=threads)  # 7 query heads per KV head
    blocks, table, _ = P._paged(keys, 128, layout, seed=threads)
    for window in (0, 1000):
        got = ops.ratio_from_blocks(q, blocks, table, torch.tensor(lengths), visual, 0.125, window=window)
        want = P._explicit(q, keys, visual, 0.125, 0.0, window)
        torch.testing.assert_close(got, want, atol=P.TOL[dtype], rtol=1e-4)


def test_scale_heads(threads):
    g = torch.Generator().manual_seed(threads)
    out = torch.randn(4, 512, 8, 64, generator=g)
    gains = 0.5 + torch.rand(4, 8, generator=g)
    expected = reference.scale_heads(out, gains)
    assert torch.equal(ops.scale_heads(out, gains), expected)
    ops.scale_heads_(out, gains)
    assert torch.equal(out, expected)
