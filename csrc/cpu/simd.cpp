// The SIMD building blocks that are plain functions (see simd.h): load_float, a widening
// load run as an HG_SIMD clone, and visual_floats.

#include "simd.h"

namespace headgain {

namespace {

template <typename T>
HG_SIMD void widen_cloned(const T* src, int64_t stride, float* dst, int64_t n) {
  widen_row(src, stride, dst, n);
}

}  // namespace

template <typename T>
void load_float(const T* src, int64_t stride, float* dst, int64_t n) {
  widen_cloned(src, stride, dst, n);
}

template void load_float<uint8_t>(const uint8_t*, int64_t, float*, int64_t);
template void load_float<float>(const float*, int64_t, float*, int64_t);
template void load_float<double>(const double*, int64_t, float*, int64_t);
template void load_float<c10::Half>(const c10::Half*, int64_t, float*, int64_t);
template void load_float<c10::BFloat16>(const c10::BFloat16*, int64_t, float*, int64_t);

std::vector<float> visual_floats(const at::Tensor& visual) {
  const auto v = visual.contiguous();
  std::vector<float> out(v.numel());
  load_float(reinterpret_cast<const uint8_t*>(v.const_data_ptr<bool>()), 1, out.data(), v.numel());
  return out;
}

}  // namespace headgain
