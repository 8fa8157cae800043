// decode_attention on CPU: one decoding step's attention output and the visual share of
// each head, in one pass over the keys and values (split-K with an online softmax).
//
// A task holds one sample, one KV head and one span of keys: it scores a block of keys
// against the whole query group of that KV head (each key read once for the group), turns
// the scores into exp(score - running max) in place, adds them up (all keys and visual
// keys) and accumulates probability-weighted values, rescaling what it holds whenever the
// running max grows. The spans are merged at the end, like flash-decoding.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../headgain.h"
#include "ratio_from_qk_x86.h"
#include "scores.h"
#include "simd.h"

namespace headgain {

namespace {

constexpr int64_t kBlock = 256;  // keys per block: the group's probabilities of a block stay in L1

// s[j] = exp(s[j] - m) in place; returns their sum and visual sum through sum / vsum.
HG_SIMD void exp_in_place(float* __restrict__ s, const float* __restrict__ vis, int64_t n, float m, float* sum,
                          float* vsum) {
  float a[kLanes] = {}, v[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int t = 0; t < kLanes; ++t) {
      const float e = exp_nonpositive(s[j + t] - m);
      s[j + t] = e;
      a[t] += e;
      v[t] += e * vis[j + t];
    }
  for (int t = 0; j < n; ++j, ++t) {
    const float e = exp_nonpositive(s[j] - m);
    s[j] = e;
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

// accumulate_values (below) four values at a time, while they last: returns how many were
// added. With dv a multiple of the vector width W (8 or 16 floats), four values are added per
// pass over a row's accumulator: the accumulator and the four values stay in registers
// (16-lane vectors on AVX-512, 8-lane ones where there are only AVX2's 16 registers).
template <typename W, typename T>
__attribute__((always_inline)) inline int64_t accumulate_values_by4(const float* p, const uint8_t* live, int64_t rows,
                                                                    int64_t n, const T* v, int64_t key_stride,
                                                                    int64_t elem_stride, int64_t dv, float* vf,
                                                                    float* acc) {
  constexpr int64_t width = sizeof(W) / sizeof(float);
  const bool in_place = std::is_same_v<T, float> && elem_stride == 1;
  int64_t j = 0;
  if (dv % width != 0) return j;
  for (; j + 4 <= n; j += 4) {
    const float* vt[4];
    for (int t = 0; t < 4; ++t) {
      if (in_place) {
        vt[t] = reinterpret_cast<const float*>(v + (j + t) * key_stride);
      } else {
        widen_row(v + (j + t) * key_stride, elem_stride, vf + t * dv, dv);
        vt[t] = vf + t * dv;
      }
    }
    for (int64_t i = 0; i < rows; ++i) {
      const float* pi = p + i * n + j;
      if (!live[i] || (pi[0] == 0.f && pi[1] == 0.f && pi[2] == 0.f && pi[3] == 0.f)) continue;
      float* a = acc + i * dv;
      for (int64_t e = 0; e < dv; e += width) {
        W x, y0, y1, y2, y3;
        std::memcpy(&x, a + e, sizeof x);
        std::memcpy(&y0, vt[0] + e, sizeof y0);
        std::memcpy(&y1, vt[1] + e, sizeof y1);
        std::memcpy(&y2, vt[2] + e, sizeof y2);
        std::memcpy(&y3, vt[3] + e, sizeof y3);
        x += (pi[0] * y0 + pi[1] * y1) + (pi[2] * y2 + pi[3] * y3);
        std::memcpy(a + e, &x, sizeof x);
      }
    }
  }
  return j;
}

// acc[i] += sum_j p[i * n + j] * value j, for the `rows` rows i with live[i], over n values
// of width dv (key_stride elements apart, elem_stride within one). float32 values with unit
// elem_stride are read in place; others are widened once each into vf (4 * dv floats).
// `wide`: 16-lane vectors (AVX-512), else 8-lane ones.
template <typename T>
HG_SIMD void accumulate_values(const float* p, const uint8_t* live, int64_t rows, int64_t n, const T* v,
                               int64_t key_stride, int64_t elem_stride, int64_t dv, float* vf, float* acc, bool wide) {
  const bool in_place = std::is_same_v<T, float> && elem_stride == 1;
  int64_t j = wide ? accumulate_values_by4<Lanes>(p, live, rows, n, v, key_stride, elem_stride, dv, vf, acc)
                   : accumulate_values_by4<Lanes8>(p, live, rows, n, v, key_stride, elem_stride, dv, vf, acc);
  for (; j < n; ++j) {
    const float* vj = vf;
    if (in_place) {
      vj = reinterpret_cast<const float*>(v + j * key_stride);
    } else {
      widen_row(v + j * key_stride, elem_stride, vf, dv);
    }
    for (int64_t i = 0; i < rows; ++i) {
      const float w = p[i * n + j];
      if (!live[i] || w == 0.f) continue;
      float* __restrict__ a = acc + i * dv;
      for (int64_t e = 0; e < dv; ++e) a[e] += w * vj[e];
    }
  }
}

// a[e] *= c for e < n.
HG_SIMD void scale_row(float* a, int64_t n, float c) {
  for (int64_t e = 0; e < n; ++e) a[e] *= c;
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                                        const at::Tensor& visual, double scaling, double softcap) {
  check_decode_attention(q, k, v, mask, visual);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Dv = v.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2), G = H / Hkv;
  auto out = at::empty({B, 1, H, Dv}, q.options());
  auto ratios = at::empty({B, H}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && ratios.numel() == 0) return {out, ratios};
  if (Nk == 0) return {out.zero_(), ratios.zero_()};  // no keys: no output, no visual share (as ratio_from_qk)

  const std::vector<float> vis = visual_floats(visual);  // (B, Nk) 0/1
  const float* vp = vis.data();
  MaskView mv;
  if (mask.has_value()) {
    mv = {mask->const_data_ptr(), mask->scalar_type(), mask->stride(0), mask->stride(1), mask->stride(2)};
  }
  // Spans of whole blocks, enough tasks for every thread (as in ratio_from_qk).
  const int64_t blocks = std::max<int64_t>(1, (Nk + kBlock - 1) / kBlock);
  const int64_t want = (4 * at::get_num_threads() + B * Hkv - 1) / (B * Hkv);
  const int64_t spans = std::clamp<int64_t>(want, 1, blocks);
  const int64_t span_len = (blocks + spans - 1) / spans * kBlock;
  // per (b, h, span): running max, sum, visual sum and the unnormalised output row
  std::vector<SoftmaxStats> stats(B * H * spans);
  std::vector<float> partial(B * H * spans * Dv, 0.f);
  const float fscale = static_cast<float>(scaling), fcap = static_cast<float>(softcap);
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides();

#ifdef HG_X86_KERNELS
  const bool unit_d = k.stride(3) == 1;
  const bool bf16_dot = q.scalar_type() == at::kBFloat16 && unit_d && D % 32 == 0 && cpu_has_bf16_dot();
  const bool avx512 = !bf16_dot && unit_d && D % 16 == 0 && cpu_has_avx512();
  const bool wide = cpu_has_avx512();
#else
  constexpr bool bf16_dot = false;
  constexpr bool wide = false;
#endif

  HG_DISPATCH_ATTN_TYPES(q.scalar_type(), "decode_attention", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* vptr = v.const_data_ptr<scalar_t>();
    at::parallel_for(0, B * Hkv * spans, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> bias(kBlock), qf(G * D), kf(4 * D), vf(4 * Dv), block(G * kBlock);
      std::vector<uint16_t> qb(bf16_dot ? G * D : 0);
      std::vector<uint8_t> live(G);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task % spans, bg = task / spans, b = bg / Hkv, g = bg % Hkv;
        for (int64_t i = 0; i < G; ++i) {
          const scalar_t* src = qp + b * qs[0] + (g * G + i) * qs[1];
          if (bf16_dot) {
            for (int64_t e = 0; e < D; ++e) std::memcpy(&qb[i * D + e], src + e * qs[3], sizeof(uint16_t));
          } else {
            load_float(src, qs[3], &qf[i * D], D);
          }
        }
        SoftmaxStats* st = &stats[(b * H + g * G) * spans + c];  // head g * G + i at st[i * spans]
        float* acc = &partial[((b * H + g * G) * spans + c) * Dv];  // head i at acc[i * spans * Dv]
        std::vector<float> group_acc(G * Dv, 0.f);
        const int64_t j_end = std::min(Nk, (c + 1) * span_len);
        for (int64_t j0 = c * span_len; j0 < j_end; j0 += kBlock) {
          const int64_t n = std::min(kBlock, j_end - j0);
          const scalar_t* kj = kp + b * ks[0] + g * ks[1] + j0 * ks[2];
#ifdef HG_X86_KERNELS
          if (bf16_dot)
            score_keys_bf16(qb.data(), G, reinterpret_cast<const uint16_t*>(kj), ks[2], n, D, block.data());
          else if (avx512)
            score_keys_avx512(qf.data(), G, kj, ks[2], n, D, kf.data(), block.data());
          else
#endif
            score_keys(qf.data(), G, kj, ks[2], ks[3], n, D, kf.data(), block.data());
          if (mv.data != nullptr) mv.load(b, 0, j0, n, bias.data());
          bool any = false;
          for (int64_t i = 0; i < G; ++i) {
            float* si = block.data() + i * n;
            const float m = finish_scores(si, bias.data(), n, fscale, fcap);
            live[i] = m != kNegInf;
            if (!live[i]) continue;
            any = true;
            SoftmaxStats& s = st[i * spans];
            const float nm = std::max(s.max, m);
            if (s.max != kNegInf && nm > s.max) {  // the running max grew: rescale what is held
              const float a = std::exp(s.max - nm);
              s.sum *= a;
              s.vis *= a;
              scale_row(group_acc.data() + i * Dv, Dv, a);
            }
            s.max = nm;
            float sum, vsum;
            exp_in_place(si, vp + b * Nk + j0, n, nm, &sum, &vsum);
            s.sum += sum;
            s.vis += vsum;
          }
          if (any) {
            accumulate_values(block.data(), live.data(), G, n, vptr + b * vs[0] + g * vs[1] + j0 * vs[2], vs[2], vs[3],
                              Dv, vf.data(), group_acc.data(), wide);
          }
        }
        for (int64_t i = 0; i < G; ++i) std::memcpy(acc + i * spans * Dv, &group_acc[i * Dv], Dv * sizeof(float));
      }
    });

    // Merge the spans of every (b, h): rescale each to the common max and normalise.
    scalar_t* op = out.data_ptr<scalar_t>();
    float* rp = ratios.data_ptr<float>();
    at::parallel_for(0, B * H, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> row(Dv);
      for (int64_t bh = begin; bh < end; ++bh) {
        float m = kNegInf;
        for (int64_t c = 0; c < spans; ++c) m = std::max(m, stats[bh * spans + c].max);
        std::fill(row.begin(), row.end(), 0.f);
        float sum = 0.f, vsum = 0.f;
        if (m != kNegInf) {
          for (int64_t c = 0; c < spans; ++c) {
            const SoftmaxStats& s = stats[bh * spans + c];
            if (s.max == kNegInf) continue;
            const float a = std::exp(s.max - m);
            sum += s.sum * a;
            vsum += s.vis * a;
            const float* pc = &partial[(bh * spans + c) * Dv];
            for (int64_t e = 0; e < Dv; ++e) row[e] += a * pc[e];
          }
        }
        // A row with every key masked has no distribution: output 0, visual share NaN (0/0,
        // as ratio_from_qk).
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        for (int64_t e = 0; e < Dv; ++e) op[bh * Dv + e] = static_cast<scalar_t>(row[e] * inv);
        rp[bh] = vsum / sum;
      }
    });
  });
  return {out, ratios};
}

}  // namespace

TORCH_LIBRARY_IMPL(headgain, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace headgain
