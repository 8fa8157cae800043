// headgain's compiled ops: the op schemas (the only TORCH_LIBRARY block) and their CPU
// implementations. The CUDA implementations live in cuda/headgain_cuda.cu.
//
// Every op matches the pure-PyTorch reference in headgain/reference.py. CPU kernels run
// in parallel over batch x heads (at::parallel_for) with contiguous inner loops written
// as 16 independent lanes, which the compiler turns into SIMD code; on x86-64 Linux the
// hot loops are built for AVX-512, AVX2 and baseline x86-64 and picked at load time. The
// scores of ratio_from_qk also have hand-written AVX-512 and AVX512-BF16 kernels, chosen
// at run time by CPU feature (HG_X86_KERNELS).

#include <Python.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "headgain.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// Kernels for x86-64 instructions past the build's baseline, chosen at run time by CPU feature.
#define HG_X86_KERNELS 1
#include <immintrin.h>
#endif

#ifndef HEADGAIN_WITH_CUDA
#define HEADGAIN_WITH_CUDA 0  // setup.py defines it as 1 when it compiles the CUDA kernels
#endif

// `import headgain._C` loads this library, which registers torch.ops.headgain.*; the
// Python module holds one constant, `with_cuda` (whether the CUDA kernels were built).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddIntConstant(m, "with_cuda", HEADGAIN_WITH_CUDA) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define HG_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HG_SIMD
#endif

namespace headgain {

// ------------------------------------------------------------------ argument checks

namespace {

constexpr int kLanes = 16;  // independent accumulators per reduction (one AVX-512 vector)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

bool is_reduced_or_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool is_reduced_or_float_or_double(at::ScalarType t) { return is_reduced_or_float(t) || t == at::kDouble; }

void check_tensor(bool ok, const char* name, const at::Tensor& t, const char* expected) {
  TORCH_CHECK(ok, "headgain: ", name, " must be ", expected, ", got shape ", t.sizes(), " dtype ", t.scalar_type());
}

void check_same_device(const at::Tensor& a, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(a.device() == ref.device(), "headgain: ", name, " is on ", a.device(), " but ", ref_name, " is on ",
              ref.device());
}

}  // namespace

void check_ratio_from_probs(const at::Tensor& probs, const at::Tensor& visual, const at::Tensor& query_weights) {
  check_tensor(probs.dim() == 4 && is_reduced_or_float(probs.scalar_type()), "probs", probs,
               "(B, H, Nq, Nk) float32/bfloat16/float16");
  const auto b = probs.size(0), nq = probs.size(2), nk = probs.size(3);
  check_tensor(visual.dim() == 2 && visual.size(0) == b && visual.size(1) == nk && visual.scalar_type() == at::kBool,
               "visual", visual, "(B, Nk) bool matching probs");
  check_tensor(query_weights.dim() == 2 && query_weights.size(0) == b && query_weights.size(1) == nq &&
                   query_weights.scalar_type() == at::kFloat,
               "query_weights", query_weights, "(B, Nq) float32 matching probs");
  check_same_device(visual, "visual", probs, "probs");
  check_same_device(query_weights, "query_weights", probs, "probs");
}

void check_ratio_from_qk(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                         const at::Tensor& visual, const at::Tensor& row_weights) {
  check_tensor(q.dim() == 4 && is_reduced_or_float(q.scalar_type()), "q", q, "(B, H, R, D) float32/bfloat16/float16");
  const auto b = q.size(0), h = q.size(1), r = q.size(2), d = q.size(3);
  check_tensor(k.dim() == 4 && k.size(0) == b && k.size(3) == d && k.scalar_type() == q.scalar_type() &&
                   k.size(1) > 0 && h % k.size(1) == 0,
               "k", k, "(B, Hkv, Nk, D) with H % Hkv == 0 and q's dtype");
  const auto nk = k.size(2);
  if (mask.has_value()) {
    const auto& m = *mask;
    check_tensor(m.dim() == 3 && m.size(0) == b && m.size(1) == r && m.size(2) == nk &&
                     (m.scalar_type() == at::kBool || is_reduced_or_float_or_double(m.scalar_type())),
                 "mask", m, "None or (B, R, Nk) bool/float64/float32/bfloat16/float16");
    check_same_device(m, "mask", q, "q");
  }
  check_tensor(visual.dim() == 2 && visual.size(0) == b && visual.size(1) == nk && visual.scalar_type() == at::kBool,
               "visual", visual, "(B, Nk) bool matching k");
  check_tensor(row_weights.dim() == 2 && row_weights.size(0) == b && row_weights.size(1) == r &&
                   row_weights.scalar_type() == at::kFloat,
               "row_weights", row_weights, "(B, R) float32 matching q");
  check_same_device(k, "k", q, "q");
  check_same_device(visual, "visual", q, "q");
  check_same_device(row_weights, "row_weights", q, "q");
}

void check_head_gains(const at::Tensor& ratios, const at::Tensor& has_visual) {
  check_tensor(ratios.dim() == 2 && ratios.scalar_type() == at::kFloat, "ratios", ratios, "(B, H) float32");
  check_tensor(has_visual.dim() == 1 && has_visual.size(0) == ratios.size(0) && has_visual.scalar_type() == at::kBool,
               "has_visual", has_visual, "(B,) bool matching ratios");
  check_same_device(has_visual, "has_visual", ratios, "ratios");
}

void check_scale_heads(const at::Tensor& out, const at::Tensor& gains) {
  const auto t = out.scalar_type();
  check_tensor(out.dim() == 4 && is_reduced_or_float_or_double(t), "out", out,
               "(B, N, H, D) float32/bfloat16/float16/float64");
  check_tensor(gains.dim() == 2 && gains.size(0) == out.size(0) && gains.size(1) == out.size(2) &&
                   (gains.scalar_type() == at::kFloat || gains.scalar_type() == at::kDouble),
               "gains", gains, "(B, H) float32 matching out");
  check_same_device(gains, "gains", out, "out");
}

void check_scale_heads_inplace(const at::Tensor& out, const at::Tensor& gains) {
  check_scale_heads(out, gains);
  at::assert_no_internal_overlap(out);
}

// ------------------------------------------------------------------ SIMD building blocks

namespace {

typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));  // GCC/Clang vector extension
typedef float Lanes8 __attribute__((vector_size(8 * sizeof(float))));
typedef float Lanes4 __attribute__((vector_size(4 * sizeof(float))));

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

static_assert(kLanes == 16, "lane_total assumes 16 lanes");

// Sum of the lanes as a tree of vector adds (16 -> 8 -> 4 -> 1).
__attribute__((always_inline)) inline float lane_total(Lanes v) {
  const Lanes8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Lanes4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// The lane sums of four vectors at once, in lanes 0..3 of the result: each halving step
// folds two vectors into one, so four sums cost about as much as one lane_total.
__attribute__((always_inline)) inline Lanes lane_totals4(Lanes a0, Lanes a1, Lanes a2, Lanes a3) {
  const Lanes b01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const Lanes b23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  // lanes 4u..4u+3 hold partial sums of a_u
  const Lanes c = __builtin_shufflevector(b01, b23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                  __builtin_shufflevector(b01, b23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const Lanes d = __builtin_shufflevector(c, c, 0, 1, 4, 5, 8, 9, 12, 13, 0, 1, 4, 5, 8, 9, 12, 13) +
                  __builtin_shufflevector(c, c, 2, 3, 6, 7, 10, 11, 14, 15, 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(d, d, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6) +
         __builtin_shufflevector(d, d, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7);
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

// widen_row as a SIMD-cloned function, for callers outside the cloned kernels.
template <typename T>
HG_SIMD void load_float(const T* src, int64_t stride, float* dst, int64_t n) {
  widen_row(src, stride, dst, n);
}

// A (B, Nk) bool mask as contiguous 0/1 floats, for the vectorised sums.
std::vector<float> visual_floats(const at::Tensor& visual) {
  const auto v = visual.contiguous();
  std::vector<float> out(v.numel());
  load_float(reinterpret_cast<const uint8_t*>(v.const_data_ptr<bool>()), 1, out.data(), v.numel());
  return out;
}

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
    const Lanes t = lane_totals4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    for (int u = 0; u < 4; ++u) out[r * n + u] = t[u];
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

#ifdef HG_X86_KERNELS
// bfloat16 scores with the AVX512-BF16 dot-product instruction (vdpbf16ps: 32 bfloat16
// products per instruction, summed in float32), chosen at run time where the CPU has it.
// The products of two bfloat16 values are exact in float32, so only the order of the
// float32 sums differs from score_keys.
#define HG_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

bool cpu_has_bf16_dot() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

// RT query rows (row stride d) against KT keys (key stride ks), bfloat16 bits, d a
// multiple of 32; out[r * n + t] = score of row r and key t.
template <int RT, int KT>
HG_BF16_TARGET __attribute__((always_inline)) inline void dot_tile_bf16(const uint16_t* q, int64_t d,
                                                                         const uint16_t* k, int64_t ks, float* out,
                                                                         int64_t n) {
  __m512 acc[RT][KT];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < KT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 32) {
    __m512bh y[KT];
    for (int t = 0; t < KT; ++t) y[t] = (__m512bh)_mm512_loadu_si512(k + t * ks + i);
    for (int r = 0; r < RT; ++r) {
      const __m512bh x = (__m512bh)_mm512_loadu_si512(q + r * d + i);
      for (int t = 0; t < KT; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], x, y[t]);
    }
  }
  for (int r = 0; r < RT; ++r) {
    if constexpr (KT == 4) {
      const Lanes t = lane_totals4((Lanes)acc[r][0], (Lanes)acc[r][1], (Lanes)acc[r][2], (Lanes)acc[r][3]);
      for (int u = 0; u < 4; ++u) out[r * n + u] = t[u];
    } else {
      for (int t = 0; t < KT; ++t) out[r * n + t] = lane_total((Lanes)acc[r][t]);
    }
  }
}

template <int KT>
HG_BF16_TARGET __attribute__((always_inline)) inline void dot_rows_bf16(const uint16_t* q, int64_t rows, int64_t d,
                                                                         const uint16_t* k, int64_t ks, float* out,
                                                                         int64_t n) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) dot_tile_bf16<4, KT>(q + r * d, d, k, ks, out + r * n, n);
  switch (rows - r) {
    case 3: dot_tile_bf16<3, KT>(q + r * d, d, k, ks, out + r * n, n); break;
    case 2: dot_tile_bf16<2, KT>(q + r * d, d, k, ks, out + r * n, n); break;
    case 1: dot_tile_bf16<1, KT>(q + r * d, d, k, ks, out + r * n, n); break;
    default: break;
  }
}

bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

#define HG_AVX512_TARGET __attribute__((target("avx512f")))

// 16 consecutive key elements as float32, converted in registers.
HG_AVX512_TARGET __attribute__((always_inline)) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
HG_AVX512_TARGET __attribute__((always_inline)) inline __m512 load16(const c10::Half* p) {
  return _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
HG_AVX512_TARGET __attribute__((always_inline)) inline __m512 load16(const c10::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));  // bfloat16 is the top half of a float32
}

// score_tile with the keys read as T and converted in registers: RT float query rows (row
// stride d) against 4 keys (key stride ks), d a multiple of 16.
template <typename T, int RT>
HG_AVX512_TARGET __attribute__((always_inline)) inline void score_tile_avx512(const float* q, int64_t d, const T* k,
                                                                               int64_t ks, float* out, int64_t n) {
  __m512 acc[RT][4];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < 4; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 16) {
    __m512 y[4];
    for (int t = 0; t < 4; ++t) y[t] = load16(k + t * ks + i);
    for (int r = 0; r < RT; ++r) {
      const __m512 x = _mm512_loadu_ps(q + r * d + i);
      for (int t = 0; t < 4; ++t) acc[r][t] = _mm512_fmadd_ps(x, y[t], acc[r][t]);
    }
  }
  for (int r = 0; r < RT; ++r) {
    const Lanes t = lane_totals4((Lanes)acc[r][0], (Lanes)acc[r][1], (Lanes)acc[r][2], (Lanes)acc[r][3]);
    for (int u = 0; u < 4; ++u) out[r * n + u] = t[u];
  }
}

// score_keys on AVX-512 for keys with unit element stride and d % 16 == 0: the keys are
// converted to float32 in registers, never written back (4 keys x 4 rows per tile).
template <typename T>
HG_AVX512_TARGET void score_keys_avx512(const float* q, int64_t rows, const T* k, int64_t key_stride, int64_t n,
                                        int64_t d, float* kf, float* out) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* kj = k + j * key_stride;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) score_tile_avx512<T, 4>(q + r * d, d, kj, key_stride, out + r * n + j, n);
    const float* qr = q + r * d;
    float* o = out + r * n + j;
    switch (rows - r) {
      case 3: score_tile_avx512<T, 3>(qr, d, kj, key_stride, o, n); break;
      case 2: score_tile_avx512<T, 2>(qr, d, kj, key_stride, o, n); break;
      case 1: score_tile_avx512<T, 1>(qr, d, kj, key_stride, o, n); break;
      default: break;
    }
  }
  for (; j < n; ++j) {
    widen_row(k + j * key_stride, 1, kf, d);
    for (int64_t row = 0; row < rows; ++row) out[row * n + j] = dot(q + row * d, kf, d);
  }
}

// score_keys for bfloat16 rows q (rows, d) and keys with unit element stride, d % 32 == 0.
HG_BF16_TARGET void score_keys_bf16(const uint16_t* q, int64_t rows, const uint16_t* k, int64_t key_stride, int64_t n,
                                    int64_t d, float* out) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) dot_rows_bf16<4>(q, rows, d, k + j * key_stride, key_stride, out + j, n);
  for (; j < n; ++j) dot_rows_bf16<1>(q, rows, d, k + j * key_stride, key_stride, out + j, n);
}
#endif

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

// dst[i] = T(acc_t(src[i]) * g), rounded once.
template <typename T, typename Acc>
HG_SIMD void scale_span(const T* src, T* dst, int64_t n, Acc g) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<Acc>(src[i]) * g);
}

// ------------------------------------------------------------------ ratio_from_probs

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

// ------------------------------------------------------------------ ratio_from_qk

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

constexpr int64_t kKeyBlock = 1024;  // keys scored at a time (a task holds its scores for this many keys)

at::Tensor ratio_from_qk_cpu(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                             const at::Tensor& visual, const at::Tensor& row_weights, double scaling,
                             double softcap) {
  check_ratio_from_qk(q, k, mask, visual, row_weights);
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2), G = H / Hkv;
  auto out = at::empty({B, H}, q.options().dtype(at::kFloat));  // every element is written below
  if (out.numel() == 0 || R == 0 || Nk == 0) return out.zero_();  // no keys: no visual share

  const std::vector<float> vis = visual_floats(visual);  // (B, Nk) 0/1
  const auto w = row_weights.contiguous();
  const float* vp = vis.data();
  const float* wp = w.data_ptr<float>();
  std::vector<std::vector<int64_t>> rows(B);  // rows of positive weight, per sample (the rest are skipped)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < R; ++r)
      if (wp[b * R + r] > 0.f) rows[b].push_back(r);

  MaskView mv;
  if (mask.has_value()) {
    mv = {mask->const_data_ptr(), mask->scalar_type(), mask->stride(0), mask->stride(1), mask->stride(2)};
  }
  // Keys are split into chunks so that there are enough tasks for every thread; each
  // task keeps running statistics per (row, head) and the chunks are merged at the end.
  const int64_t blocks = std::max<int64_t>(1, (Nk + kKeyBlock - 1) / kKeyBlock);
  const int64_t want = (4 * at::get_num_threads() + B * Hkv - 1) / (B * Hkv);
  const int64_t chunks = std::clamp<int64_t>(want, 1, blocks);
  const int64_t chunk_len = (blocks + chunks - 1) / chunks * kKeyBlock;
  std::vector<SoftmaxStats> stats(B * H * R * chunks);
  const float fscale = static_cast<float>(scaling), fcap = static_cast<float>(softcap);
  const auto qs = q.strides(), ks = k.strides();

  // Each task scores a block of keys against every query row of its KV group straight from
  // the key cache (no float copy of it is made; O(kKeyBlock) scores per row at a time), with
  // the first kernel that applies: bfloat16 with AVX512-BF16 dot products
  // (score_keys_bf16), keys converted in AVX-512 registers (score_keys_avx512), or portable
  // vector code that widens each key once (score_keys).
#ifdef HG_X86_KERNELS
  const bool unit_d = k.stride(3) == 1;
  const bool bf16_dot = q.scalar_type() == at::kBFloat16 && unit_d && D % 32 == 0 && cpu_has_bf16_dot();
  const bool avx512 = !bf16_dot && unit_d && D % 16 == 0 && cpu_has_avx512();
#else
  constexpr bool bf16_dot = false;
#endif

  HG_DISPATCH_ATTN_TYPES(q.scalar_type(), "ratio_from_qk", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    at::parallel_for(0, B * Hkv * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> bias(kKeyBlock), qf, kf(4 * D), block;  // bias stays 0 without a mask
      std::vector<uint16_t> qb;  // bf16_dot: the task's query rows as bfloat16 bits
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task % chunks, bg = task / chunks, b = bg / Hkv, g = bg % Hkv;
        const auto& active = rows[b];
        if (active.empty()) continue;
        const int64_t A = static_cast<int64_t>(active.size());
        // the task's query rows: row (a, i) = query head g * G + i
        block.resize(A * G * kKeyBlock);
        if (bf16_dot) qb.resize(A * G * D);
        else qf.resize(A * G * D);
        for (int64_t a = 0; a < A; ++a)
          for (int64_t i = 0; i < G; ++i) {
            const scalar_t* src = qp + b * qs[0] + (g * G + i) * qs[1] + active[a] * qs[2];
            if (bf16_dot) {
              for (int64_t e = 0; e < D; ++e) std::memcpy(&qb[(a * G + i) * D + e], src + e * qs[3], sizeof(uint16_t));
            } else {
              load_float(src, qs[3], &qf[(a * G + i) * D], D);
            }
          }
        const int64_t j_end = std::min(Nk, (c + 1) * chunk_len);
        for (int64_t j0 = c * chunk_len; j0 < j_end; j0 += kKeyBlock) {
          const int64_t n = std::min(kKeyBlock, j_end - j0);
          const scalar_t* kj = kp + b * ks[0] + g * ks[1] + j0 * ks[2];
#ifdef HG_X86_KERNELS
          if (bf16_dot)
            score_keys_bf16(qb.data(), A * G, reinterpret_cast<const uint16_t*>(kj), ks[2], n, D, block.data());
          else if (avx512)
            score_keys_avx512(qf.data(), A * G, kj, ks[2], n, D, kf.data(), block.data());
          else
#endif
            score_keys(qf.data(), A * G, kj, ks[2], ks[3], n, D, kf.data(), block.data());
          for (int64_t a = 0; a < A; ++a) {
            const int64_t r = active[a];
            if (mv.data != nullptr) mv.load(b, r, j0, n, bias.data());
            for (int64_t i = 0; i < G; ++i) {
              float* si = block.data() + (a * G + i) * n;
              const float m = finish_scores(si, bias.data(), n, fscale, fcap);
              if (m == kNegInf) continue;
              float sum, vsum;
              exp_sums(si, vp + b * Nk + j0, n, m, &sum, &vsum);
              stats[((b * H + g * G + i) * R + r) * chunks + c].merge(m, sum, vsum);
            }
          }
        }
      }
    });
  });

  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      float acc = 0.f;
      for (const int64_t r : rows[b]) {
        SoftmaxStats total;
        for (int64_t c = 0; c < chunks; ++c) {
          const auto& st = stats[(bh * R + r) * chunks + c];
          total.merge(st.max, st.sum, st.vis);
        }
        acc += wp[b * R + r] * (total.vis / total.sum);  // 0/0 = NaN for a fully masked row, as the reference
      }
      op[bh] = acc;
    }
  });
  return out;
}

// ------------------------------------------------------------------ head_gains

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

// ------------------------------------------------------------------ scale_heads

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

// ------------------------------------------------------------------ registration

TORCH_LIBRARY(headgain, m) {
  m.def("ratio_from_probs(Tensor probs, Tensor visual, Tensor query_weights) -> Tensor");
  m.def(
      "ratio_from_qk(Tensor q, Tensor k, Tensor? mask, Tensor visual, Tensor row_weights, float scaling, "
      "float softcap) -> Tensor");
  m.def(
      "head_gains(Tensor ratios, Tensor has_visual, float tau_perc, float tau_reas, float g_perc, float g_reas, "
      "float g_neutral) -> Tensor");
  m.def("scale_heads_(Tensor(a!) out, Tensor gains) -> ()");
  m.def("scale_heads(Tensor out, Tensor gains) -> Tensor");
}

TORCH_LIBRARY_IMPL(headgain, CPU, m) {
  m.impl("ratio_from_probs", &ratio_from_probs_cpu);
  m.impl("ratio_from_qk", &ratio_from_qk_cpu);
  m.impl("head_gains", &head_gains_cpu);
  m.impl("scale_heads_", &scale_heads_inplace_cpu);
  m.impl("scale_heads", &scale_heads_cpu);
}

}  // namespace headgain
