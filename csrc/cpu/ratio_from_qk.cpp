// ratio_from_qk on CPU: the visual share of each head's softmax attention, from q and k
// (scores and running softmax statistics; the probabilities are never stored), in parallel
// over batch x KV heads x key chunks. The portable score kernel is in scores.h; the x86
// ones, chosen at run time, are in ratio_from_qk_x86.cpp.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../headgain.h"
#include "ratio_from_qk_x86.h"
#include "scores.h"
#include "simd.h"

namespace headgain {

namespace {

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

}  // namespace

TORCH_LIBRARY_IMPL(headgain, CPU, m) { m.impl("ratio_from_qk", &ratio_from_qk_cpu); }

}  // namespace headgain
