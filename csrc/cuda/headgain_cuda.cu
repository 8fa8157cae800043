// CUDA implementations of headgain's ops: the argument checks (shared with the CPU code,
// ../checks.cpp), launch wrappers on the current stream, and the CUDA registration. The
// kernels are in headgain_kernels.cuh (templates) and headgain_kernels.cu; the op schemas
// in ../headgain.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../headgain.h"
#include "headgain_kernels.cuh"

namespace headgain {
namespace {

namespace hk = kernels;

// torch's element types as the CUDA types the kernels use (same layout).
template <typename T>
struct DeviceType {
  using type = T;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
const typename DeviceType<T>::type* device_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename DeviceType<T>::type*>(t.const_data_ptr<T>());
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A grid's x size, checked against CUDA's limit (2^31 - 1 blocks) instead of truncated.
unsigned int grid_x(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "headgain: ", op, " would launch ", blocks,
              " blocks on CUDA, more than the 2^31 - 1 a grid allows; split the batch");
  return static_cast<unsigned int>(blocks);
}

// Key splits per (row, head) block so that the grid fills the GPU about twice, each split
// keeping at least min_keys keys.
int key_splits(int64_t blocks, int64_t num_keys, int64_t min_keys) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t most = std::max<int64_t>(1, num_keys / min_keys);
  return static_cast<int>(std::clamp<int64_t>(ceil_div(2 * sms, std::max<int64_t>(blocks, 1)), 1, std::min<int64_t>(most, 1024)));
}

at::Tensor ratio_from_probs_cuda(const at::Tensor& probs, const at::Tensor& visual, const at::Tensor& query_weights) {
  check_ratio_from_probs(probs, visual, query_weights);
  const c10::cuda::CUDAGuard guard(probs.device());
  const int64_t B = probs.size(0), H = probs.size(1), Nq = probs.size(2), Nk = probs.size(3);
  auto out = at::empty({B, H}, probs.options().dtype(at::kFloat));  // every element is written by sum_splits
  if (out.numel() == 0 || Nq == 0 || Nk == 0) return out.zero_();
  const auto vis = visual.contiguous();
  const auto w = query_weights.contiguous();
  const int splits = key_splits(B * H, Nk, 1024);
  auto partial = at::empty({B * H, splits}, out.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  HG_DISPATCH_ATTN_TYPES(probs.scalar_type(), "ratio_from_probs_cuda", [&] {
    hk::ratio_from_probs_kernel<<<dim3(grid_x(B * H, "ratio_from_probs"), splits), hk::kThreads, 0, stream>>>(
        device_ptr<scalar_t>(probs), vis.const_data_ptr<bool>(), w.const_data_ptr<float>(), H, Nq, Nk,
        probs.stride(0), probs.stride(1), probs.stride(2), probs.stride(3), partial.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  hk::sum_splits_kernel<<<ceil_div(B * H, hk::kThreads), hk::kThreads, 0, stream>>>(
      partial.const_data_ptr<float>(), B * H, splits, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Whether a kernel can read the rows of a (., ., N, D) tensor n elements at a time (Pack<T, n>):
// unit stride along D, D a multiple of n, the data and every row aligned to n elements.
bool rows_in_packs(const at::Tensor& t, int64_t n) {
  const int64_t bytes = n * t.element_size();
  if (t.size(3) % n != 0 || t.stride(3) != 1 || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes != 0)
    return false;
  for (int64_t d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % n != 0) return false;
  }
  return true;
}

// Key rows read 16 bytes at a time (dot_rows' packs).
bool wide_rows(const at::Tensor& keys) { return rows_in_packs(keys, 16 / keys.element_size()); }

// Passes of ratio_from_qk_group_kernel over a KV head's G * R query rows, p.pass rows each.
int64_t group_passes(const hk::QkShape& p) { return ceil_div(p.group * p.R, p.pass); }

// The softmax statistics of S_v per query row and key split, into `partial` for
// ratio_from_qk_combine_kernel: ratio_from_qk_group_kernel over `groups` (sample, KV head)
// pairs of G * R query rows each, their keys (DenseKeys or PagedKeys of element type T) read 16
// bytes at a time when `wide` (wide_rows).
template <typename T, typename M, typename Keys>
void launch_group(const at::Tensor& q, const Keys& keys, bool wide, const M* mask, const at::Tensor& visual,
                  const float* row_weights, const hk::QkShape& shape, int64_t groups, int splits, hk::Stats* partial) {
  const int64_t passes = group_passes(shape);
  TORCH_CHECK(passes <= 65535, "headgain: ratio_from_qk on CUDA takes up to ", 65535 * shape.pass,
              " query rows per KV head (heads per KV head x rows) at head dim ", shape.D, ", got ",
              shape.group * shape.R);
  const dim3 grid(grid_x(groups, "ratio_from_qk"), splits, static_cast<unsigned int>(passes));
  const size_t shared = hk::group_shared_bytes(shape.pass, shape.D, sizeof(T));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (wide) {
    hk::ratio_from_qk_group_kernel<T, M, Keys, true><<<grid, hk::kThreads, shared, stream>>>(
        reinterpret_cast<const T*>(q.const_data_ptr()), keys, mask, visual.const_data_ptr<bool>(), row_weights, shape,
        partial);
  } else {
    hk::ratio_from_qk_group_kernel<T, M, Keys, false><<<grid, hk::kThreads, shared, stream>>>(
        reinterpret_cast<const T*>(q.const_data_ptr()), keys, mask, visual.const_data_ptr<bool>(), row_weights, shape,
        partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Query rows per pass of ratio_from_qk_group_kernel at head dim D and element size `bytes`:
// as many as the default 48 KiB of shared memory holds, up to kRowsPerPass; an error where not
// even one fits (head dims over 12288).
int64_t rows_per_pass(int64_t D, int64_t bytes, const char* op) {
  const int64_t rows = std::min<int64_t>(hk::kRowsPerPass, 48 * 1024 / hk::group_shared_bytes(1, D, bytes));
  TORCH_CHECK(rows >= 1, "headgain: ", op, " on CUDA keeps a query row in shared memory and takes head dims up to ",
              48 * 1024 / sizeof(float), ", got ", D);
  return rows;
}

at::Tensor ratio_from_qk_cuda(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                              const at::Tensor& visual, const at::Tensor& row_weights, double scaling,
                              double softcap) {
  check_ratio_from_qk(q, k, mask, visual, row_weights);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  auto out = at::empty({B, H}, q.options().dtype(at::kFloat));  // every element is written by the combine kernel
  if (out.numel() == 0 || R == 0 || Nk == 0) return out.zero_();  // no keys: no visual share
  const auto vis = visual.contiguous();
  const auto w = row_weights.contiguous();
  hk::QkShape shape{H, R, D, H / Hkv, rows_per_pass(D, q.element_size(), "ratio_from_qk"),
                    q.stride(0), q.stride(1), q.stride(2), q.stride(3), k.stride(3), 0, 0, 0,
                    static_cast<float>(scaling), static_cast<float>(softcap)};
  if (mask.has_value()) {
    shape.m0 = mask->stride(0);
    shape.m1 = mask->stride(1);
    shape.m2 = mask->stride(2);
  }
  const int splits = key_splits(B * Hkv * group_passes(shape), Nk, 256);
  // (B*H*R, splits) statistics of three floats each
  auto partial = at::empty({B * H * R, splits, 3}, out.options());
  auto* stats = reinterpret_cast<hk::Stats*>(partial.data_ptr<float>());
  const bool wide = wide_rows(k);
  HG_DISPATCH_ATTN_TYPES(q.scalar_type(), "ratio_from_qk_cuda", [&] {
    using DT = typename DeviceType<scalar_t>::type;
    const hk::DenseKeys<DT> keys{device_ptr<scalar_t>(k), k.stride(0), k.stride(1), k.stride(2), Nk};
    const float* weights = w.const_data_ptr<float>();
    if (!mask.has_value()) {
      launch_group<DT, bool>(q, keys, wide, nullptr, vis, weights, shape, B * Hkv, splits, stats);
    } else if (mask->scalar_type() == at::kBool) {
      launch_group<DT, bool>(q, keys, wide, mask->const_data_ptr<bool>(), vis, weights, shape, B * Hkv, splits, stats);
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask->scalar_type(), "ratio_from_qk_cuda_mask", [&] {
        launch_group<DT>(q, keys, wide, device_ptr<scalar_t>(*mask), vis, weights, shape, B * Hkv, splits, stats);
      });
    }
  });
  hk::ratio_from_qk_combine_kernel<<<ceil_div(B * H, hk::kThreads), hk::kThreads, 0,
                                     c10::cuda::getCurrentCUDAStream()>>>(stats, w.const_data_ptr<float>(), B * H, H,
                                                                         R, splits, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor ratio_from_blocks_cuda(const at::Tensor& q, const at::Tensor& key_blocks, const at::Tensor& block_table,
                                  const at::Tensor& lengths, const at::Tensor& visual, double scaling, double softcap,
                                  int64_t window) {
  check_ratio_from_blocks(q, key_blocks, block_table, lengths, visual, window);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t R = q.size(0), H = q.size(1), D = q.size(2), Hkv = key_blocks.size(1), L = visual.size(1);
  auto out = at::empty({R, H}, q.options().dtype(at::kFloat));  // every element is written by the combine kernel
  if (out.numel() == 0) return out;
  const auto table = block_table.contiguous();  // int32 (vLLM's) or int64, read as it is
  const auto lens = lengths.contiguous();
  const auto vis = visual.contiguous();
  // one query row per request: q (R, H, D) read as (R, H, 1, D)
  const hk::QkShape shape{H, 1, D, H / Hkv, rows_per_pass(D, q.element_size(), "ratio_from_blocks"), q.stride(0),
                          q.stride(1), 0, q.stride(2), key_blocks.stride(3), 0, 0, 0, static_cast<float>(scaling),
                          static_cast<float>(softcap)};
  const int splits = key_splits(R * Hkv * group_passes(shape), L, 256);  // L bounds every request's keys
  auto partial = at::empty({R * H, splits, 3}, out.options());
  auto* stats = reinterpret_cast<hk::Stats*>(partial.data_ptr<float>());
  const bool wide = wide_rows(key_blocks);
  HG_DISPATCH_ATTN_TYPES(q.scalar_type(), "ratio_from_blocks_cuda", [&] {
    using DT = typename DeviceType<scalar_t>::type;
    const auto launch = [&](auto index) {
      using I = decltype(index);
      const hk::PagedKeys<DT, I> keys{device_ptr<scalar_t>(key_blocks), key_blocks.stride(0), key_blocks.stride(1),
                                      key_blocks.stride(2), key_blocks.size(0), key_blocks.size(2),
                                      table.const_data_ptr<I>(), table.size(1), lens.const_data_ptr<int64_t>(),
                                      window, L};
      // no mask; row weights null: all 1
      launch_group<DT, bool>(q, keys, wide, nullptr, vis, nullptr, shape, R * Hkv, splits, stats);
    };
    if (table.scalar_type() == at::kInt) launch(int32_t{});
    else launch(int64_t{});
  });
  const auto stream = c10::cuda::getCurrentCUDAStream();
  hk::ratio_from_qk_combine_kernel<<<ceil_div(R * H, hk::kThreads), hk::kThreads, 0, stream>>>(
      stats, static_cast<const float*>(nullptr), R * H, H, 1, splits, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename T, typename M>
void launch_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const M* mask,
                             const at::Tensor& visual, const hk::DecodeShape& shape, bool wide, int splits,
                             hk::Stats* stats, float* partial) {
  using DT = typename DeviceType<T>::type;
  const dim3 grid(grid_x(q.size(0) * shape.Hkv, "decode_attention"), splits,
                  static_cast<unsigned int>(ceil_div(shape.group, shape.pass)));
  const size_t shared = hk::decode_shared_bytes(shape.pass, shape.D, sizeof(DT));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (wide) {
    hk::decode_attention_kernel<DT, M, true><<<grid, hk::kThreads, shared, stream>>>(
        device_ptr<T>(q), device_ptr<T>(k), device_ptr<T>(v), mask, visual.const_data_ptr<bool>(), shape, stats,
        partial);
  } else {
    hk::decode_attention_kernel<DT, M, false><<<grid, hk::kThreads, shared, stream>>>(
        device_ptr<T>(q), device_ptr<T>(k), device_ptr<T>(v), mask, visual.const_data_ptr<bool>(), shape, stats,
        partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                                         const at::Tensor& visual, double scaling, double softcap) {
  check_decode_attention(q, k, v, mask, visual);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Dv = v.size(3), Hkv = k.size(1), Nk = k.size(2);
  auto out = at::empty({B, 1, H, Dv}, q.options());
  auto ratios = at::empty({B, H}, q.options().dtype(at::kFloat));
  if (B * H == 0) return {out, ratios};
  if (Nk == 0) return {out.zero_(), ratios.zero_()};  // no keys: no output, no visual share (as ratio_from_qk)
  TORCH_CHECK(D <= hk::kMaxHeadDim && Dv <= hk::kMaxHeadDim,
              "headgain: decode_attention on CUDA takes head dims up to ", hk::kMaxHeadDim, ", got D=", D, ", Dv=", Dv);
  const int64_t G = H / Hkv;
  int64_t value_threads = 1;  // a power of 2 that divides kThreads, kValueDims elements each covering Dv
  while (value_threads * hk::kValueDims < Dv) value_threads *= 2;
  const auto vis = visual.contiguous();
  hk::DecodeShape shape{H, Hkv, Nk, D, Dv, G, std::min<int64_t>(G, hk::kRowsPerPass), value_threads,
                        q.stride(0), q.stride(1), q.stride(3),
                        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
                        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
                        0, 0, static_cast<float>(scaling), static_cast<float>(softcap)};
  if (mask.has_value()) {
    shape.m0 = mask->stride(0);
    shape.m2 = mask->stride(2);
  }
  const bool wide = wide_rows(k) && rows_in_packs(v, hk::kValueDims);
  const int splits = key_splits(B * Hkv * ceil_div(G, shape.pass), Nk, 256);
  auto stats_t = at::empty({B * H, splits, 3}, ratios.options());  // (max, sum, visual sum) per split
  auto partial = at::empty({B * H, splits, Dv}, ratios.options());
  auto* stats = reinterpret_cast<hk::Stats*>(stats_t.data_ptr<float>());
  HG_DISPATCH_ATTN_TYPES(q.scalar_type(), "decode_attention_cuda", [&] {
    using T = scalar_t;
    float* part = partial.data_ptr<float>();
    if (!mask.has_value()) {
      launch_decode_attention<T, bool>(q, k, v, nullptr, vis, shape, wide, splits, stats, part);
    } else if (mask->scalar_type() == at::kBool) {
      launch_decode_attention<T, bool>(q, k, v, mask->const_data_ptr<bool>(), vis, shape, wide, splits, stats, part);
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask->scalar_type(), "decode_attention_cuda_mask", [&] {
        launch_decode_attention<T>(q, k, v, device_ptr<scalar_t>(*mask), vis, shape, wide, splits, stats, part);
      });
    }
    const int threads = static_cast<int>(std::clamp<int64_t>(ceil_div(Dv, 32) * 32, 32, hk::kThreads));
    hk::decode_attention_combine_kernel<<<grid_x(B * H, "decode_attention"), threads, 0,
                                          c10::cuda::getCurrentCUDAStream()>>>(
        stats, partial.const_data_ptr<float>(), Dv, splits,
        reinterpret_cast<typename DeviceType<T>::type*>(out.data_ptr<T>()), ratios.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, ratios};
}

at::Tensor head_gains_cuda(const at::Tensor& ratios, const at::Tensor& has_visual, double tau_perc, double tau_reas,
                           double g_perc, double g_reas, double g_neutral) {
  check_head_gains(ratios, has_visual);
  const c10::cuda::CUDAGuard guard(ratios.device());
  const auto r = ratios.contiguous();
  const auto hv = has_visual.contiguous();
  auto out = at::empty_like(r);
  const int64_t n = r.numel();
  if (n == 0) return out;
  hk::head_gains_kernel<<<ceil_div(n, hk::kThreads), hk::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      r.const_data_ptr<float>(), hv.const_data_ptr<bool>(), n, r.size(1), static_cast<float>(tau_perc),
      static_cast<float>(tau_reas), static_cast<float>(g_perc), static_cast<float>(g_reas),
      static_cast<float>(g_neutral), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// dst = src * gains per head (see hk::scale_heads_kernel).
void scale_heads_cuda_into(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& gains, bool skip_identity) {
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t B = src.size(0), N = src.size(1), H = src.size(2), D = src.size(3);
  const int64_t rows = B * N * H;
  if (rows == 0 || D == 0) return;
  const hk::ScaleShape shape{N, H, D, src.stride(0), src.stride(1), src.stride(2), src.stride(3),
                             dst.stride(0), dst.stride(1), dst.stride(2), dst.stride(3)};
  const int dx = static_cast<int>(std::min<int64_t>(128, ceil_div(D, 32) * 32)), dy = 256 / dx;
  const int64_t grid = std::min<int64_t>(ceil_div(rows, dy), 65535);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "scale_heads_cuda", [&] {
    using T = typename DeviceType<scalar_t>::type;
    using acc_t = typename hk::Convert<T>::acc;
    const auto g = gains.to(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat).contiguous();
    hk::scale_heads_kernel<T><<<grid, dim3(dx, dy), 0, c10::cuda::getCurrentCUDAStream()>>>(
        device_ptr<scalar_t>(src), reinterpret_cast<T*>(dst.data_ptr<scalar_t>()), g.const_data_ptr<acc_t>(), rows,
        shape, skip_identity);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scale_heads_inplace_cuda(const at::Tensor& out, const at::Tensor& gains) {
  check_scale_heads_inplace(out, gains);
  scale_heads_cuda_into(out, out, gains, /*skip_identity=*/true);
}

at::Tensor scale_heads_cuda(const at::Tensor& out, const at::Tensor& gains) {
  check_scale_heads(out, gains);
  auto result = at::empty_like(out);
  scale_heads_cuda_into(out, result, gains, /*skip_identity=*/false);
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(headgain, CUDA, m) {
  m.impl("ratio_from_probs", &ratio_from_probs_cuda);
  m.impl("ratio_from_qk", &ratio_from_qk_cuda);
  m.impl("ratio_from_blocks", &ratio_from_blocks_cuda);
  m.impl("decode_attention", &decode_attention_cuda);
  m.impl("head_gains", &head_gains_cuda);
  m.impl("scale_heads_", &scale_heads_inplace_cuda);
  m.impl("scale_heads", &scale_heads_cuda);
}

}  // namespace headgain
