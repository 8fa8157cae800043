// The CUDA kernels that are not templates, declared (and documented) in
// headgain_kernels.cuh and defined here once: torch-free like the header, compiled into the
// extension and by .ci/nvcc_check.
#include "headgain_kernels.cuh"

namespace headgain {
namespace kernels {

__global__ void sum_splits_kernel(const float* __restrict__ partial, int64_t n, int splits, float* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  float acc = 0.f;
  for (int s = 0; s < splits; ++s) acc += partial[i * splits + s];
  out[i] = acc;
}

__global__ void ratio_from_qk_combine_kernel(const Stats* __restrict__ partial, const float* __restrict__ row_weights,
                                             int64_t BH, int64_t H, int64_t R, int splits, float* __restrict__ out) {
  const int64_t bh = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (bh >= BH) return;
  const int64_t b = bh / H;
  float acc = 0.f;
  for (int64_t r = 0; r < R; ++r) {
    const float w = row_weight(row_weights, b * R + r);
    if (!(w > 0.f)) continue;
    Stats total = empty_stats();
    for (int s = 0; s < splits; ++s) total = merge(total, partial[(bh * R + r) * splits + s]);
    acc += w * (total.vis / total.sum);
  }
  out[bh] = acc;
}

__global__ void head_gains_kernel(const float* __restrict__ ratios, const bool* __restrict__ has_visual, int64_t n,
                                  int64_t H, float tau_perc, float tau_reas, float g_perc, float g_reas,
                                  float g_neutral, float* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const float x = ratios[i];
  out[i] = !has_visual[i / H] ? 1.f : x >= tau_perc ? g_perc : x <= tau_reas ? g_reas : g_neutral;
}

}  // namespace kernels
}  // namespace headgain
