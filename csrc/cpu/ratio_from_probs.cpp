// ratio_from_probs on CPU: the weighted visual share of each head's attention
// probabilities, in parallel over batch x heads.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "../headgain.h"
#include "simd.h"

namespace headgain {

namespace {

// sum_i float(x[i]) * m[i] over a contiguous span.
template <typename T>
HG_SIMD float masked_sum(const T* x, const float* m, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int t = 0; t < kLanes; ++t) acc[t] += static_cast<float>(x[i + t]) * m[i + t];
  for (int t = 0; i < n; ++i, ++t) acc[t] += static_cast<float>(x[i]) * m[i];
  float s = 0.f;
  for (int t = 0; t < kLanes; ++t) s += acc[t];
  return s;
}

at::Tensor ratio_from_probs_cpu(const at::Tensor& probs, const at::Tensor& visual, const at::Tensor& query_weights) {
  check_ratio_from_probs(probs, visual, query_weights);
  const int64_t B = probs.size(0), H = probs.size(1), Nq = probs.size(2), Nk = probs.size(3);
  auto out = at::empty({B, H}, probs.options().dtype(at::kFloat));  // every element is written below
  if (out.numel() == 0 || Nq == 0 || Nk == 0) return out.zero_();
  const std::vector<float> vis = visual_floats(visual);  // (B, Nk) 0/1
  const auto w = query_weights.contiguous();
  const float* vp = vis.data();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto st = probs.strides();
  HG_DISPATCH_ATTN_TYPES(probs.scalar_type(), "ratio_from_probs", [&] {
    const scalar_t* pp = probs.const_data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> row(st[3] == 1 ? 0 : Nk);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        float acc = 0.f;
        for (int64_t q = 0; q < Nq; ++q) {
          const float wq = wp[b * Nq + q];
          if (wq == 0.f) continue;
          const scalar_t* p = pp + b * st[0] + h * st[1] + q * st[2];
          float s;
          if (st[3] == 1) {
            s = masked_sum(p, vp + b * Nk, Nk);
          } else {
            load_float(p, st[3], row.data(), Nk);
            s = masked_sum(row.data(), vp + b * Nk, Nk);
          }
          acc += wq * s;
        }
        op[bh] = acc;
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(headgain, CPU, m) { m.impl("ratio_from_probs", &ratio_from_probs_cpu); }

}  // namespace headgain
