// Building blocks of headgain's CPU kernels: 16-lane float vectors (a GCC/Clang vector
// extension, lowered to whatever SIMD the compiling function targets), their sums, dot
// products and widening loads to float32.
//
// Contiguous inner loops are written as kLanes independent lanes, which the compiler turns
// into SIMD code. On x86-64 Linux the hot loops are HG_SIMD functions: built by GCC for
// AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and baseline x86-64, and picked once at load time
// through an ifunc.
//
// Rule for HG_SIMD: a cloned function has internal linkage (an anonymous namespace) in the
// .cpp file that calls it. GCC emits an ifunc resolver in every file that calls a
// target_clones declaration, pointing at clones that are local to the defining file, so a
// cloned function declared in a header links or fails depending on the link order. Code
// shared between files is either always_inline (inlined into each caller and compiled for
// the caller's target, as below) or a plain function that calls a cloned one (load_float).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// GCC only: Clang does not clone function templates (llvm/llvm-project#116501), so a Clang
// build runs the portable loops at the build's baseline (the x86 kernels of ratio_from_qk
// are still chosen at run time).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define HG_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HG_SIMD
#endif

namespace headgain {

inline constexpr int kLanes = 16;  // independent accumulators per reduction (one AVX-512 vector)
inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));  // GCC/Clang vector extension
typedef float Lanes8 __attribute__((vector_size(8 * sizeof(float))));
typedef float Lanes4 __attribute__((vector_size(4 * sizeof(float))));

static_assert(kLanes == 16, "lane_total assumes 16 lanes");

// Vectors are passed by reference and results stored to memory: Clang refuses a 16-float
// vector argument or return value between functions of different targets (its ABI
// depends on AVX-512), even where the call is inlined.

// Sum of the lanes as a tree of vector adds (16 -> 8 -> 4 -> 1).
__attribute__((always_inline)) inline float lane_total(const Lanes& v) {
  const Lanes8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Lanes4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// The lane sums of four vectors at once, into out[0..3]: each halving step folds two
// vectors into one, so four sums cost about as much as one lane_total.
__attribute__((always_inline)) inline void lane_totals4(const Lanes& a0, const Lanes& a1, const Lanes& a2,
                                                        const Lanes& a3, float* out) {
  const Lanes b01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const Lanes b23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  // lanes 4u..4u+3 hold partial sums of a_u
  const Lanes c = __builtin_shufflevector(b01, b23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                  __builtin_shufflevector(b01, b23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const Lanes d = __builtin_shufflevector(c, c, 0, 1, 4, 5, 8, 9, 12, 13, 0, 1, 4, 5, 8, 9, 12, 13) +
                  __builtin_shufflevector(c, c, 2, 3, 6, 7, 10, 11, 14, 15, 2, 3, 6, 7, 10, 11, 14, 15);
  const Lanes e = __builtin_shufflevector(d, d, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6) +
                  __builtin_shufflevector(d, d, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7);
  for (int u = 0; u < 4; ++u) out[u] = e[u];
}

__attribute__((always_inline)) inline float dot(const float* a, const float* b, int64_t d) {
  Lanes acc = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    Lanes x, y;
    std::memcpy(&x, a + i, sizeof x);
    std::memcpy(&y, b + i, sizeof y);
    acc += x * y;
  }
  float s = lane_total(acc);
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

// dst[i] = float(src[i * stride]) for one row of d elements.
template <typename T>
__attribute__((always_inline)) inline void widen_row(const T* src, int64_t stride, float* dst, int64_t d) {
  if (stride == 1) {
    for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i * stride]);
  }
}

// bfloat16 is the top half of a float32: widen 16 at a time with a shift.
template <>
__attribute__((always_inline)) inline void widen_row<c10::BFloat16>(const c10::BFloat16* src, int64_t stride,
                                                                     float* dst, int64_t d) {
  typedef uint16_t Half16 __attribute__((vector_size(16 * sizeof(uint16_t))));
  typedef uint32_t Word16 __attribute__((vector_size(16 * sizeof(uint32_t))));
  int64_t i = 0;
  if (stride == 1) {
    for (; i + 16 <= d; i += 16) {
      Half16 h;
      std::memcpy(&h, src + i, sizeof h);
      const Word16 w = __builtin_convertvector(h, Word16) << 16;
      std::memcpy(dst + i, &w, sizeof w);
    }
  }
  for (; i < d; ++i) dst[i] = static_cast<float>(src[i * stride]);
}

// widen_row for callers outside the cloned kernels, itself run as a SIMD-cloned function
// (simd.cpp). T is uint8_t (bool), float, double, c10::Half or c10::BFloat16.
template <typename T>
void load_float(const T* src, int64_t stride, float* dst, int64_t n);

// A (B, Nk) bool mask as contiguous 0/1 floats, for the vectorised sums.
std::vector<float> visual_floats(const at::Tensor& visual);

}  // namespace headgain
