// The score pipeline shared by the CPU kernels that read attention from queries and keys
// (ratio_from_qk.cpp, ratio_from_blocks.cpp, decode_attention.cpp): q.k scores of a block
// of keys, scaling, softcap and mask biases, exponentials and running softmax statistics.
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

// The lane sums of four 8-lane vectors at once, into out[0..3] (lane_totals4 of 8 lanes).
__attribute__((always_inline)) inline void lane_totals4_8(const Lanes8& a0, const Lanes8& a1, const Lanes8& a2,
                                                          const Lanes8& a3, float* out) {
  const Lanes8 b01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 8, 9, 10, 11) +
                     __builtin_shufflevector(a0, a1, 4, 5, 6, 7, 12, 13, 14, 15);
  const Lanes8 b23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 8, 9, 10, 11) +
                     __builtin_shufflevector(a2, a3, 4, 5, 6, 7, 12, 13, 14, 15);
  // lanes 2u, 2u + 1 hold partial sums of a_u
  const Lanes8 c = __builtin_shufflevector(b01, b23, 0, 1, 4, 5, 8, 9, 12, 13) +
                   __builtin_shufflevector(b01, b23, 2, 3, 6, 7, 10, 11, 14, 15);
  const Lanes8 e = __builtin_shufflevector(c, c, 0, 2, 4, 6, 0, 2, 4, 6) + __builtin_shufflevector(c, c, 1, 3, 5, 7, 1, 3, 5, 7);
  for (int u = 0; u < 4; ++u) out[u] = e[u];
}

// The scores of RT float query rows (row stride d) against 2 float keys (key stride ks),
// into out[row * n + t], on 8-lane vectors: the RT x 2 accumulators, the 2 keys and a query
// vector fit in the 16 registers of AVX2 (a wider tile spills there; CPUs with AVX-512 take
// score_keys_avx512). RT is even; d is a multiple of 8.
template <int RT>
__attribute__((always_inline)) inline void score_tile(const float* q, int64_t d, const float* k, int64_t ks,
                                                      float* out, int64_t n) {
  static_assert(RT % 2 == 0, "rows come in pairs");
  Lanes8 acc[RT][2] = {};
  for (int64_t i = 0; i < d; i += 8) {
    Lanes8 y0, y1;
    std::memcpy(&y0, k + i, sizeof y0);
    std::memcpy(&y1, k + ks + i, sizeof y1);
    for (int r = 0; r < RT; ++r) {
      Lanes8 x;
      std::memcpy(&x, q + r * d + i, sizeof x);
      acc[r][0] += x * y0;
      acc[r][1] += x * y1;
    }
  }
  for (int r = 0; r < RT; r += 2) {
    float t[4];
    lane_totals4_8(acc[r][0], acc[r][1], acc[r + 1][0], acc[r + 1][1], t);
    out[r * n] = t[0];
    out[r * n + 1] = t[1];
    out[(r + 1) * n] = t[2];
    out[(r + 1) * n + 1] = t[3];
  }
}

// out[row * n + j] = dot(q[row], key j) for n keys (element strides key_stride between keys,
// elem_stride within one) and `rows` float query rows of width d, 4 (or 2) rows x 2 keys at
// a time. float32 keys with unit elem_stride are read in place; other keys are widened to
// float once each, into kf (at least 2 * d floats).
template <typename T>
HG_SIMD void score_keys(const float* q, int64_t rows, const T* k, int64_t key_stride, int64_t elem_stride, int64_t n,
                        int64_t d, float* kf, float* out) {
  const bool in_place = std::is_same_v<T, float> && elem_stride == 1;
  int64_t j = 0;
  const int64_t paired = rows - rows % 2;
  if (d % 8 == 0) {
    for (; j + 2 <= n; j += 2) {
      const float* kt = kf;
      int64_t kts = d;
      if (in_place) {
        kt = reinterpret_cast<const float*>(k + j * key_stride);
        kts = key_stride;
      } else {
        for (int t = 0; t < 2; ++t) widen_row(k + (j + t) * key_stride, elem_stride, kf + t * d, d);
      }
      int64_t r = 0;
      for (; r + 4 <= paired; r += 4) score_tile<4>(q + r * d, d, kt, kts, out + r * n + j, n);
      if (r < paired) score_tile<2>(q + r * d, d, kt, kts, out + r * n + j, n);
      if (paired < rows)
        for (int t = 0; t < 2; ++t) out[paired * n + j + t] = dot(q + paired * d, kt + t * kts, d);
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

// (sum_j exp(s[j] - m), sum_j exp(s[j] - m) * vis[j]) for finite m (the ratio kernels' sums;
// decode_attention keeps its own).
[[maybe_unused]] HG_SIMD void exp_sums(const float* s, const float* vis, int64_t n, float m, float* sum, float* vsum) {
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
