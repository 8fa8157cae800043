// scale_heads and scale_heads_ on CPU: each head's slice of the attention output times its
// gain, in parallel over batch x positions.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "../headgain.h"
#include "simd.h"

namespace headgain {

namespace {

// dst[i] = T(acc_t(src[i]) * g), rounded once.
template <typename T, typename Acc>
HG_SIMD void scale_span(const T* src, T* dst, int64_t n, Acc g) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<Acc>(src[i]) * g);
}

// dst[b, n, h, :] = src[b, n, h, :] * gains[b, h]; heads whose gain is exactly 1 are left
// untouched when skip_identity (the in-place op), copied otherwise.
void scale_heads_into(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& gains, bool skip_identity) {
  const int64_t B = src.size(0), N = src.size(1), H = src.size(2), D = src.size(3);
  if (src.numel() == 0) return;
  const auto ss = src.strides(), ds = dst.strides();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "scale_heads", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto g = gains.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* gp = g.template const_data_ptr<acc_t>();
    if (skip_identity && std::all_of(gp, gp + B * H, [](acc_t x) { return x == acc_t(1); })) return;
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    scalar_t* dp = dst.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * D));
    at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t bn = begin; bn < end; ++bn) {
        const int64_t b = bn / N, n = bn % N;
        for (int64_t h = 0; h < H; ++h) {
          const acc_t gv = gp[b * H + h];
          if (skip_identity && gv == acc_t(1)) continue;
          const scalar_t* s = sp + b * ss[0] + n * ss[1] + h * ss[2];
          scalar_t* d = dp + b * ds[0] + n * ds[1] + h * ds[2];
          if (ss[3] == 1 && ds[3] == 1) {
            scale_span(s, d, D, gv);
          } else {
            for (int64_t i = 0; i < D; ++i) d[i * ds[3]] = static_cast<scalar_t>(static_cast<acc_t>(s[i * ss[3]]) * gv);
          }
        }
      }
    });
  });
}

void scale_heads_inplace_cpu(const at::Tensor& out, const at::Tensor& gains) {
  check_scale_heads_inplace(out, gains);
  scale_heads_into(out, out, gains, /*skip_identity=*/true);
}

at::Tensor scale_heads_cpu(const at::Tensor& out, const at::Tensor& gains) {
  check_scale_heads(out, gains);
  auto result = at::empty_like(out);
  scale_heads_into(out, result, gains, /*skip_identity=*/false);
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(headgain, CPU, m) {
  m.impl("scale_heads_", &scale_heads_inplace_cpu);
  m.impl("scale_heads", &scale_heads_cpu);
}

}  // namespace headgain
