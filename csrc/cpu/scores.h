// The score pipeline shared by the CPU kernels that read attention from queries and keys
// (ratio_from_qk.cpp, decode_attention.cpp): q.k scores of a block of keys, scaling,
// softcap and mask biases, exponentials and running softmax statistics.
//
// Everything here has internal linkage (an anonymous namespace), so each .cpp that
// includes this header gets its own SIMD clones (see the HG_SIMD rule in simd.h).
#pragma once

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace headgain {
namespace {

// ------------------------------------------------------------------ scores

// The scores of RT float query rows (row stride d) against 4 float keys (key stride ks),
// into out[row * n + t]: RT x 4 independent accumulator chains hide the FMA latency, and
// each vector loaded is used RT or 4 times. d is a multiple of kLanes.
template <int RT>
__attribute__((always_inline)) inline void score_tile(const float* q, int64_t d, const float* k, int64_t ks,
                                                      float* out, int64_t n) {
  Lanes acc[RT][4] = {};
  for (int64_t i = 0; i < d; i += kLanes) {
    Lanes y[4];
    for (int t = 0; t < 4; ++t) std::memcpy(&y[t], k + t * ks + i, sizeof(Lanes));
    for (int r = 0; r < RT; ++r) {
      Lanes x;
      std::memcpy(&x, q + r * d + i, sizeof x);
      for (int t = 0; t < 4; ++t) acc[r][t] += x * y[t];
    }
  }
  for (int r = 0; r < RT; ++r) {
    lane_totals4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], out + r * n);
  }
}

// out[row * n + j] = dot(q[row], key j) for n keys (element strides key_stride between keys,
// elem_stride within one) and `rows` float query rows of width d, 4 rows x 4 keys at a
// time. float32 keys with unit elem_stride are read in place; other keys are widened to
// float once each, into kf (4 * d floats).
template <typename T>
HG_SIMD void score_keys(const float* q, int64_t rows, const T* k, int64_t key_stride, int64_t elem_stride, int64_t n,
                        int64_t d, float* kf, float* out) {
  const bool in_place = std::is_same_v<T, float> && elem_stride == 1;
  int64_t j = 0;
  if (d % kLanes == 0) {
    for (; j + 4 <= n; j += 4) {
      const float* kt = kf;
      int64_t kts = d;
      if (in_place) {
        kt = reinterpret_cast<const float*>(k + j * key_stride);
        kts = key_stride;
      } else {
        for (int t = 0; t < 4; ++t) widen_row(k + (j + t) * key_stride, elem_stride, kf + t * d, d);
      }
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) score_tile<4>(q + r * d, d, kt, kts, out + r * n + j, n);
      const float* qr = q + r * d;
      float* o = out + r * n + j;
      switch (rows - r) {
        case 3: score_tile<3>(qr, d, kt, kts, o, n); break;
        case 2: score_tile<2>(qr, d, kt, kts, o, n); break;
        case 1: score_tile<1>(qr, d, kt, kts, o, n); break;
        default: break;
      }
    }
  }
  for (; j < n; ++j) {
    widen_row(k + j * key_stride, elem_stride, kf, d);
    for (int64_t row = 0; row < rows; ++row) out[row * n + j] = dot(q + row * d, kf, d);
  }
}

// s[j] = s[j] * scaling (+ softcap) + bias[j]; returns max_j s[j].
HG_SIMD float finish_scores(float* __restrict__ s, const float* __restrict__ bias, int64_t n, float scaling, float softcap) {
  if (softcap > 0.f) {
    for (int64_t j = 0; j < n; ++j) s[j] = softcap * std::tanh(s[j] * scaling / softcap) + bias[j];
  } else {
    for (int64_t j = 0; j < n; ++j) s[j] = s[j] * scaling + bias[j];
  }
  // A max reduction is not vectorised by the compiler without fast-math: spell it out on
  // kLanes-wide vectors (a GCC/Clang vector extension; lowered to whatever SIMD the clone has).
  Lanes mx;
  for (int t = 0; t < kLanes; ++t) mx[t] = kNegInf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    Lanes x;
    std::memcpy(&x, s + j, sizeof x);
    mx = x > mx ? x : mx;
  }
  float m = kNegInf;
  for (int t = 0; t < kLanes; ++t) m = std::max(m, mx[t]);
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// exp(x) for x <= 0 to about 2 ulp (Cody-Waite reduction and a degree-6 polynomial),
// written without calls so that it vectorises; exactly 0 below -87.
inline float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.f ? 0.f : y * scale;
}

// (sum_j exp(s[j] - m), sum_j exp(s[j] - m) * vis[j]) for finite m.
HG_SIMD void exp_sums(const float* s, const float* vis, int64_t n, float m, float* sum, float* vsum) {
  float a[kLanes] = {}, v[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int t = 0; t < kLanes; ++t) {
      const float e = exp_nonpositive(s[j + t] - m);
      a[t] += e;
      v[t] += e * vis[j + t];
    }
  for (int t = 0; j < n; ++j, ++t) {
    const float e = exp_nonpositive(s[j] - m);
    a[t] += e;
    v[t] += e * vis[j];
  }
  float sa = 0.f, sv = 0.f;
  for (int t = 0; t < kLanes; ++t) {
    sa += a[t];
    sv += v[t];
  }
  *sum = sa;
  *vsum = sv;
}

// ------------------------------------------------------------------ masks and running statistics

// A (B, R, Nk) mask read as additive float biases (bool: 0 or -inf), any dtype/strides.
struct MaskView {
  const void* data = nullptr;
  at::ScalarType dtype = at::kBool;
  int64_t s0 = 0, s1 = 0, s2 = 0;

  // dst[j] = bias of key j0 + j of row r of sample b; data must be set.
  void load(int64_t b, int64_t r, int64_t j0, int64_t n, float* dst) const {
    const int64_t off = b * s0 + r * s1 + j0 * s2;
    if (dtype == at::kBool) {
      const bool* p = static_cast<const bool*>(data) + off;
      for (int64_t j = 0; j < n; ++j) dst[j] = p[j * s2] ? 0.f : kNegInf;
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ratio_from_qk_mask", [&] {
      load_float(static_cast<const scalar_t*>(data) + off, s2, dst, n);
    });
  }
};

// Running softmax statistics of one (row, head) over a span of keys: max score, sum of
// exp(score - max) and its visual part.
struct SoftmaxStats {
  float max = kNegInf, sum = 0.f, vis = 0.f;

  void merge(float m, float s, float v) {
    if (m == kNegInf) return;
    const float nm = std::max(max, m);
    const float a = max == kNegInf ? 0.f : std::exp(max - nm), c = std::exp(m - nm);
    sum = sum * a + s * c;
    vis = vis * a + v * c;
    max = nm;
  }
};

}  // namespace
}  // namespace headgain
