// The x86-64 score kernels of ratio_from_qk and ratio_from_blocks (declared in
// ratio_from_qk_x86.h), built with per-function target attributes for AVX-512 and AVX512-BF16
// whatever the build's baseline; the ops call them only where the CPU has the instructions.

#include "ratio_from_qk_x86.h"

#ifdef HG_X86_KERNELS

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "simd.h"

namespace headgain {

bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

bool cpu_has_bf16_dot() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

namespace {

// ------------------------------------------------------------------ AVX-512

// 16 consecutive key elements as float32, converted in registers.
HG_AVX512_TARGET __attribute__((always_inline)) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
HG_AVX512_TARGET __attribute__((always_inline)) inline __m512 load16(const c10::Half* p) {
  return _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
HG_AVX512_TARGET __attribute__((always_inline)) inline __m512 load16(const c10::BFloat16* p) {
  // the zero-masked forms: GCC 12's unmasked ones warn of an uninitialised operand (false positive)
  const __m512i w = _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xffff, w, 16));  // bfloat16 is the top half of a float32
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
    lane_totals4((Lanes)acc[r][0], (Lanes)acc[r][1], (Lanes)acc[r][2], (Lanes)acc[r][3], out + r * n);
  }
}

// ------------------------------------------------------------------ AVX512-BF16

// bfloat16 scores with the AVX512-BF16 dot-product instruction (vdpbf16ps: 32 bfloat16
// products per instruction, summed in float32). The products of two bfloat16 values are
// exact in float32, so only the order of the float32 sums differs from score_keys.

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
      lane_totals4((Lanes)acc[r][0], (Lanes)acc[r][1], (Lanes)acc[r][2], (Lanes)acc[r][3], out + r * n);
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

// RT query rows (row stride d) against 16 * KT element-major keys (element e of key t at
// k[e * es + t]; only the keys of `keys` are read and written, 16 bits per tile of 16), d even:
// each pair of elements of 16 keys is interleaved into one vector of (element e, element e + 1)
// pairs, and each row's pair of query elements is broadcast against it.
template <int RT, int KT>
HG_BF16_TARGET __attribute__((always_inline)) inline void dmajor_tile_bf16(const uint16_t* q, int64_t d,
                                                                            const uint16_t* k, int64_t es,
                                                                            const __mmask16 (&keys)[KT], float* out,
                                                                            int64_t n) {
  // 16-bit lane 2t of the interleaved vector <- key t of the first row, 2t + 1 <- of the second
  alignas(64) static const uint16_t pairs[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i index = _mm512_load_si512(pairs);
  __m512 acc[RT][KT];
  for (int r = 0; r < RT; ++r)
    for (int u = 0; u < KT; ++u) acc[r][u] = _mm512_setzero_ps();
  for (int64_t e = 0; e < d; e += 2) {
    __m512bh kv[KT];
    for (int u = 0; u < KT; ++u) {
      const __m512i lo = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(keys[u], k + e * es + 16 * u));
      const __m512i hi = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(keys[u], k + (e + 1) * es + 16 * u));
      kv[u] = (__m512bh)_mm512_permutex2var_epi16(lo, index, hi);
    }
    for (int r = 0; r < RT; ++r) {
      uint32_t qe;  // query elements e and e + 1 of row r
      std::memcpy(&qe, q + r * d + e, sizeof qe);
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(qe));
      for (int u = 0; u < KT; ++u) acc[r][u] = _mm512_dpbf16_ps(acc[r][u], qv, kv[u]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int u = 0; u < KT; ++u) _mm512_mask_storeu_ps(out + r * n + 16 * u, keys[u], acc[r][u]);
}

// dmajor_tile_bf16 over `rows` query rows, up to 8 at a time.
template <int KT>
HG_BF16_TARGET __attribute__((always_inline)) inline void dmajor_rows_bf16(const uint16_t* q, int64_t rows, int64_t d,
                                                                            const uint16_t* k, int64_t es,
                                                                            const __mmask16 (&keys)[KT], float* out,
                                                                            int64_t n) {
  for (int64_t r = 0; r < rows; r += 8) {
    const uint16_t* qr = q + r * d;
    float* o = out + r * n;
    switch (std::min<int64_t>(8, rows - r)) {
      case 8: dmajor_tile_bf16<8, KT>(qr, d, k, es, keys, o, n); break;
      case 7: dmajor_tile_bf16<7, KT>(qr, d, k, es, keys, o, n); break;
      case 6: dmajor_tile_bf16<6, KT>(qr, d, k, es, keys, o, n); break;
      case 5: dmajor_tile_bf16<5, KT>(qr, d, k, es, keys, o, n); break;
      case 4: dmajor_tile_bf16<4, KT>(qr, d, k, es, keys, o, n); break;
      case 3: dmajor_tile_bf16<3, KT>(qr, d, k, es, keys, o, n); break;
      case 2: dmajor_tile_bf16<2, KT>(qr, d, k, es, keys, o, n); break;
      default: dmajor_tile_bf16<1, KT>(qr, d, k, es, keys, o, n); break;
    }
  }
}

}  // namespace

// 4 keys x 4 rows per tile; keys past the last multiple of 4 are widened into kf.
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

template void score_keys_avx512<float>(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*, float*);
template void score_keys_avx512<c10::Half>(const float*, int64_t, const c10::Half*, int64_t, int64_t, int64_t, float*,
                                           float*);
template void score_keys_avx512<c10::BFloat16>(const float*, int64_t, const c10::BFloat16*, int64_t, int64_t, int64_t,
                                               float*, float*);

HG_BF16_TARGET void score_keys_bf16(const uint16_t* q, int64_t rows, const uint16_t* k, int64_t key_stride, int64_t n,
                                    int64_t d, float* out) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) dot_rows_bf16<4>(q, rows, d, k + j * key_stride, key_stride, out + j, n);
  for (; j < n; ++j) dot_rows_bf16<1>(q, rows, d, k + j * key_stride, key_stride, out + j, n);
}

HG_BF16_TARGET void score_keys_dmajor_bf16(const uint16_t* q, int64_t rows, const uint16_t* k, int64_t es,
                                           int64_t n, int64_t d, float* out) {
  int64_t t = 0;
  for (; t + 32 <= n; t += 32) {  // two tiles of 16 keys at once: twice the independent sums per row
    const __mmask16 both[2] = {0xffff, 0xffff};
    dmajor_rows_bf16<2>(q, rows, d, k + t, es, both, out + t, n);
  }
  for (; t < n; t += 16) {  // the last keys, masked
    const __mmask16 keys[1] = {static_cast<__mmask16>(n - t >= 16 ? 0xffffu : (1u << (n - t)) - 1)};
    dmajor_rows_bf16<1>(q, rows, d, k + t, es, keys, out + t, n);
  }
}

}  // namespace headgain

#endif  // HG_X86_KERNELS
