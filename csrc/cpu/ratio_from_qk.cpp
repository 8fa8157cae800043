// ratio_from_qk on CPU: the visual share of each head's softmax attention, from q and k
// (scores and running softmax statistics; the probabilities are never stored), in parallel
// over batch x KV heads x key chunks. The portable score kernel is here; the x86 ones,
// chosen at run time, are in ratio_from_qk_x86.cpp.

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

}  // namespace

TORCH_LIBRARY_IMPL(headgain, CPU, m) { m.impl("ratio_from_qk", &ratio_from_qk_cpu); }

}  // namespace headgain
