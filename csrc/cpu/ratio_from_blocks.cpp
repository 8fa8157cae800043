// ratio_from_blocks on CPU: the visual share of each head's softmax attention for one query
// row per request, read straight from a paged key cache through a block table (a server's
// decoding step: no copy of the keys is made), in parallel over requests x KV heads x spans
// of cache blocks. Keys stored with the key index innermost (vLLM's CPU layout: per block
// and KV head a (D, block_size) array) are scored by score_keys_dmajor_bf16 (bfloat16 on CPUs
// with AVX512-BF16, ratio_from_qk_x86.cpp) or score_keys_dmajor; any other strides by
// score_keys (scores.h).

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../headgain.h"
#include "ratio_from_qk_x86.h"
#include "scores.h"
#include "simd.h"

namespace headgain {

namespace {

constexpr int64_t kSpanKeys = 1024;  // keys per task, about (whole cache blocks)

// W consecutive elements as a float32 vector V of W lanes.
template <typename V, int W, typename T>
__attribute__((always_inline)) inline V load_wide(const T* p) {
  V v;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // the top half of a float32
    typedef uint16_t Half8 __attribute__((vector_size(8 * sizeof(uint16_t))));
    typedef uint32_t Word8 __attribute__((vector_size(8 * sizeof(uint32_t))));
    typedef uint16_t Half16 __attribute__((vector_size(16 * sizeof(uint16_t))));
    typedef uint32_t Word16 __attribute__((vector_size(16 * sizeof(uint32_t))));
    using Half = std::conditional_t<W == 8, Half8, Half16>;
    using Word = std::conditional_t<W == 8, Word8, Word16>;
    Half h;
    std::memcpy(&h, p, sizeof h);
    const Word w = __builtin_convertvector(h, Word) << 16;
    std::memcpy(&v, &w, sizeof v);
  } else {
    for (int i = 0; i < W; ++i) v[i] = static_cast<float>(p[i]);
  }
  return v;
}

// W keys stored element-major (element e of key t at k[e * es + t]) against RT float query
// rows (row stride d): out[row * n + t] = dot(q[row], key t). Per element, one vector of keys
// and RT query elements are loaded for RT multiply-adds; the RT accumulators, the keys and a
// broadcast element stay in registers for RT <= 8 (W = 8 on AVX2's 16 registers, W = 16 on
// AVX-512's 32).
template <typename V, int W, typename T, int RT>
__attribute__((always_inline)) inline void dmajor_tile(const float* q, int64_t d, const T* k, int64_t es, float* out,
                                                       int64_t n) {
  V acc[RT] = {};
  for (int64_t e = 0; e < d; ++e) {
    const V kv = load_wide<V, W>(k + e * es);
    for (int r = 0; r < RT; ++r) acc[r] += q[r * d + e] * kv;
  }
  for (int r = 0; r < RT; ++r) std::memcpy(out + r * n, &acc[r], sizeof(V));
}

template <typename V, int W, typename T>
__attribute__((always_inline)) inline void dmajor_rows(const float* q, int64_t rows, int64_t d, const T* k,
                                                       int64_t es, float* out, int64_t n) {
  switch (rows) {
    case 1: return dmajor_tile<V, W, T, 1>(q, d, k, es, out, n);
    case 2: return dmajor_tile<V, W, T, 2>(q, d, k, es, out, n);
    case 3: return dmajor_tile<V, W, T, 3>(q, d, k, es, out, n);
    case 4: return dmajor_tile<V, W, T, 4>(q, d, k, es, out, n);
    case 5: return dmajor_tile<V, W, T, 5>(q, d, k, es, out, n);
    case 6: return dmajor_tile<V, W, T, 6>(q, d, k, es, out, n);
    case 7: return dmajor_tile<V, W, T, 7>(q, d, k, es, out, n);
    default: return dmajor_tile<V, W, T, 8>(q, d, k, es, out, n);
  }
}

// out[row * n + t] = dot(q[row], key t) for `rows` float query rows of width d and n keys
// stored element-major (vLLM's CPU cache: per block and KV head a (D, block_size) array),
// W keys x up to 8 rows at a time (W = 16 where `wide`: the CPU has AVX-512).
template <typename T>
HG_SIMD void score_keys_dmajor(const float* q, int64_t rows, const T* k, int64_t es, int64_t n, int64_t d,
                               float* out, bool wide) {
  int64_t t = 0;
  if (wide)
    for (; t + 16 <= n; t += 16)
      for (int64_t r = 0; r < rows; r += 8)
        dmajor_rows<Lanes, 16>(q + r * d, std::min<int64_t>(8, rows - r), d, k + t, es, out + r * n + t, n);
  for (; t + 8 <= n; t += 8)
    for (int64_t r = 0; r < rows; r += 8)
      dmajor_rows<Lanes8, 8>(q + r * d, std::min<int64_t>(8, rows - r), d, k + t, es, out + r * n + t, n);
  for (; t < n; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      float s = 0.f;
      for (int64_t e = 0; e < d; ++e) s += q[r * d + e] * static_cast<float>(k[e * es + t]);
      out[r * n + t] = s;
    }
}

at::Tensor ratio_from_blocks_cpu(const at::Tensor& q, const at::Tensor& key_blocks, const at::Tensor& block_table,
                                 const at::Tensor& lengths, const at::Tensor& visual, double scaling, double softcap,
                                 int64_t window) {
  check_ratio_from_blocks(q, key_blocks, block_table, lengths, visual, window);
  const int64_t R = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = key_blocks.size(0), Hkv = key_blocks.size(1), BS = key_blocks.size(2), G = H / Hkv;
  const int64_t MB = block_table.size(1), L = visual.size(1);
  auto out = at::empty({R, H}, q.options().dtype(at::kFloat));  // every element is written below
  if (out.numel() == 0) return out;

  const auto table = block_table.contiguous();  // int32 (vLLM's) or int64, read as it is
  const auto lens = lengths.contiguous();
  const int32_t* tp32 = table.scalar_type() == at::kInt ? table.const_data_ptr<int32_t>() : nullptr;
  const int64_t* tp64 = tp32 ? nullptr : table.const_data_ptr<int64_t>();
  const auto tp = [&](int64_t i) -> int64_t { return tp32 ? tp32[i] : tp64[i]; };
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  // each request's keys [first, last): the window's, of at most its block table and visual flags
  std::vector<int64_t> first(R), last(R);
  int64_t spans_max = 1;
  const int64_t span_blocks = std::max<int64_t>(1, kSpanKeys / BS);
  for (int64_t r = 0; r < R; ++r) {
    last[r] = lp[r];
    TORCH_CHECK(last[r] >= 1 && last[r] <= MB * BS && last[r] <= L, "headgain: lengths[", r, "] = ", last[r],
                " must be between 1 and the keys that block_table and visual hold (", std::min(MB * BS, L), ")");
    first[r] = window > 0 ? std::max<int64_t>(0, last[r] - window) : 0;
    for (int64_t blk = first[r] / BS; blk * BS < last[r]; ++blk)
      TORCH_CHECK(tp(r * MB + blk) >= 0 && tp(r * MB + blk) < NB, "headgain: block_table[", r, ", ", blk, "] = ",
                  tp(r * MB + blk), " is not a block of key_blocks (", NB, " blocks)");
    const int64_t blocks = (last[r] - 1) / BS - first[r] / BS + 1;
    spans_max = std::max(spans_max, (blocks + span_blocks - 1) / span_blocks);
  }
  const std::vector<float> vis = visual_floats(visual);  // (R, L) 0/1
  const float* vp = vis.data();
  std::vector<SoftmaxStats> stats(R * H * spans_max);
  const float fscale = static_cast<float>(scaling), fcap = static_cast<float>(softcap);
  const auto qs = q.strides(), ks = key_blocks.strides();
  const bool dmajor = ks[2] == 1 && ks[3] != 1;
#ifdef HG_X86_KERNELS
  const bool wide = cpu_has_avx512();
#else
  constexpr bool wide = false;
#endif

  HG_DISPATCH_ATTN_TYPES(q.scalar_type(), "ratio_from_blocks", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = key_blocks.const_data_ptr<scalar_t>();
#ifdef HG_X86_KERNELS
    // bfloat16 keys element-major: the AVX512-BF16 dot product, on the query's bfloat16 bits
    const bool bf16_dot = std::is_same_v<scalar_t, c10::BFloat16> && dmajor && D % 2 == 0 && cpu_has_bf16_dot();
#else
    constexpr bool bf16_dot = false;
#endif
    at::parallel_for(0, R * Hkv * spans_max, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(G * D), kf(2 * D), scores(G * BS), bias(BS, 0.f);
      std::vector<uint16_t> qb(bf16_dot ? G * D : 0);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t span = task % spans_max, rg = task / spans_max, r = rg / Hkv, g = rg % Hkv;
        const int64_t blk_begin = first[r] / BS + span * span_blocks;
        const int64_t blk_end = std::min((last[r] - 1) / BS + 1, blk_begin + span_blocks);
        if (blk_begin >= blk_end) continue;
        for (int64_t i = 0; i < G; ++i) {
          const scalar_t* qi = qp + r * qs[0] + (g * G + i) * qs[1];
          if (bf16_dot) {  // bfloat16 elements only: their bits as they are
            for (int64_t e = 0; e < D; ++e) std::memcpy(&qb[i * D + e], qi + e * qs[2], sizeof(uint16_t));
          } else {
            load_float(qi, qs[2], &qf[i * D], D);
          }
        }
        for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
          const int64_t j0 = std::max(first[r], blk * BS), n = std::min(last[r], (blk + 1) * BS) - j0;
          const scalar_t* kj = kp + tp(r * MB + blk) * ks[0] + g * ks[1] + (j0 - blk * BS) * ks[2];
#ifdef HG_X86_KERNELS
          if (bf16_dot)
            score_keys_dmajor_bf16(qb.data(), G, reinterpret_cast<const uint16_t*>(kj), ks[3], n, D, scores.data());
          else
#endif
          if (dmajor) score_keys_dmajor(qf.data(), G, kj, ks[3], n, D, scores.data(), wide);
          else score_keys(qf.data(), G, kj, ks[2], ks[3], n, D, kf.data(), scores.data());
          for (int64_t i = 0; i < G; ++i) {
            float* si = scores.data() + i * n;
            const float m = finish_scores(si, bias.data(), n, fscale, fcap);
            float sum, vsum;
            exp_sums(si, vp + r * L + j0, n, m, &sum, &vsum);
            stats[(r * H + g * G + i) * spans_max + span].merge(m, sum, vsum);
          }
        }
      }
    });
  });

  float* op = out.data_ptr<float>();
  for (int64_t rh = 0; rh < R * H; ++rh) {
    SoftmaxStats total;
    for (int64_t span = 0; span < spans_max; ++span) {
      const auto& st = stats[rh * spans_max + span];
      total.merge(st.max, st.sum, st.vis);
    }
    op[rh] = total.vis / total.sum;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(headgain, CPU, m) { m.impl("ratio_from_blocks", &ratio_from_blocks_cpu); }

}  // namespace headgain
