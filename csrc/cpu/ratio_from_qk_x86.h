// Score kernels of ratio_from_qk and ratio_from_blocks for x86-64 instructions past the build's baseline
// (ratio_from_qk_x86.cpp), chosen at run time by CPU feature: AVX-512 and AVX512-BF16.
// HG_X86_KERNELS is defined where they are built.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HG_X86_KERNELS 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#define HG_AVX512_TARGET __attribute__((target("avx512f")))
#define HG_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace headgain {

// Whether this CPU runs score_keys_avx512 (AVX-512F) and score_keys_bf16 (AVX512-BF16,
// AVX512-BW, AVX512-VL); checked once.
bool cpu_has_avx512();
bool cpu_has_bf16_dot();

// score_keys (scores.h) on AVX-512 for keys with unit element stride and
// d % 16 == 0: out[row * n + j] = dot(q[row], key j) for n keys (key_stride elements apart)
// and `rows` float query rows of width d, the keys converted to float32 in registers. kf
// holds d floats of scratch. T is float, c10::Half or c10::BFloat16.
template <typename T>
HG_AVX512_TARGET void score_keys_avx512(const float* q, int64_t rows, const T* k, int64_t key_stride, int64_t n,
                                        int64_t d, float* kf, float* out);

// The same for bfloat16 rows q (rows, d) and keys given as bfloat16 bits, d % 32 == 0,
// with the AVX512-BF16 dot-product instruction.
HG_BF16_TARGET void score_keys_bf16(const uint16_t* q, int64_t rows, const uint16_t* k, int64_t key_stride,
                                    int64_t n, int64_t d, float* out);

// ratio_from_blocks' scores for keys stored element-major (vLLM's CPU cache: element e of key
// t at k[e * es + t]) with the AVX512-BF16 dot-product instruction: out[row * n + t] =
// dot(q[row], key t) for n keys and `rows` query rows of even width d (row stride d), query and
// keys given as bfloat16 bits; 16 keys at a time, the last ones masked.
HG_BF16_TARGET void score_keys_dmajor_bf16(const uint16_t* q, int64_t rows, const uint16_t* k, int64_t es,
                                           int64_t n, int64_t d, float* out);

}  // namespace headgain

#endif
