// head_gains on CPU: the gain of each head from its visual-attention ratio.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../headgain.h"

namespace headgain {

namespace {

at::Tensor head_gains_cpu(const at::Tensor& ratios, const at::Tensor& has_visual, double tau_perc, double tau_reas,
                          double g_perc, double g_reas, double g_neutral) {
  check_head_gains(ratios, has_visual);
  const int64_t B = ratios.size(0), H = ratios.size(1);
  auto out = at::empty({B, H}, ratios.options());
  const auto r = ratios.contiguous();
  const auto hv = has_visual.contiguous();
  const float* rp = r.data_ptr<float>();
  const bool* hp = hv.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float tp = static_cast<float>(tau_perc), tr = static_cast<float>(tau_reas);
  const float gp = static_cast<float>(g_perc), gr = static_cast<float>(g_reas), gn = static_cast<float>(g_neutral);
  for (int64_t i = 0; i < B * H; ++i) {
    const float x = rp[i];
    op[i] = !hp[i / H] ? 1.f : x >= tp ? gp : x <= tr ? gr : gn;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(headgain, CPU, m) { m.impl("head_gains", &head_gains_cpu); }

}  // namespace headgain
