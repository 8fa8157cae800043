// headgain's CUDA kernels: device code only, free of torch so that nvcc can compile it on
// any machine with a CUDA toolkit (.ci/nvcc_check does, in CI). The kernel templates are
// defined here and instantiated where they are launched; the other kernels are declared
// here and defined once, in headgain_kernels.cu. The launch wrappers and the op
// registration are in headgain_cuda.cu.
//
// Element types are float, double (scale_heads and masks only), __half and
// __nv_bfloat16; every reduction accumulates in float. Tensors are passed as a base
// pointer plus element strides, so any layout works without a copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

namespace headgain {
namespace kernels {

constexpr int kThreads = 256;  // threads per block of the reduction kernels
constexpr int kWarp = 32;

// Loads an element as its arithmetic type (double for double, float otherwise) and
// stores that type back with one rounding.
template <typename T>
struct Convert;
template <>
struct Convert<float> {
  using acc = float;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
template <>
struct Convert<double> {
  using acc = double;
  static __device__ __forceinline__ double load(double x) { return x; }
  static __device__ __forceinline__ double store(double x) { return x; }
};
template <>
struct Convert<__half> {
  using acc = float;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Convert<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// A mask element as an additive score bias: bool True = attend (0), False = -inf.
template <typename M>
__device__ __forceinline__ float mask_bias(M x) {
  return static_cast<float>(Convert<M>::load(x));
}
template <>
__device__ __forceinline__ float mask_bias<bool>(bool x) {
  return x ? 0.f : -CUDART_INF_F;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; the result is valid in thread 0. Call at most once per kernel.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float part[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / kWarp ? part[lane] : 0.f;
  return warp == 0 ? warp_sum(v) : v;
}

// Running softmax statistics over a span of keys: max score, sum of exp(score - max) and
// the part of that sum over visual keys.
struct Stats {
  float max, sum, vis;
};

__device__ __forceinline__ Stats empty_stats() { return {-CUDART_INF_F, 0.f, 0.f}; }

__device__ __forceinline__ Stats merge(Stats a, Stats b) {
  if (b.max == -CUDART_INF_F) return a;
  if (a.max == -CUDART_INF_F) return b;
  const float m = fmaxf(a.max, b.max), ea = expf(a.max - m), eb = expf(b.max - m);
  return {m, a.sum * ea + b.sum * eb, a.vis * ea + b.vis * eb};
}

// ---------------------------------------------------------------- ratio_from_probs

// grid (B*H, splits): block (bh, s) sums the visual probabilities of keys in split s over
// the rows of nonzero weight; partial[bh * splits + s] receives the weighted sum.
template <typename T>
__global__ void ratio_from_probs_kernel(const T* __restrict__ probs, const bool* __restrict__ visual,
                                        const float* __restrict__ weights, int64_t H, int64_t Nq, int64_t Nk,
                                        int64_t s0, int64_t s1, int64_t s2, int64_t s3, float* __restrict__ partial) {
  const int64_t bh = blockIdx.x, b = bh / H, h = bh % H;
  const int64_t per = (Nk + gridDim.y - 1) / gridDim.y;
  const int64_t j0 = blockIdx.y * per, j1 = min(Nk, j0 + per);
  const bool* vis = visual + b * Nk;
  float acc = 0.f;
  for (int64_t q = 0; q < Nq; ++q) {
    const float w = weights[b * Nq + q];
    if (w == 0.f) continue;
    const T* row = probs + b * s0 + h * s1 + q * s2;
    float s = 0.f;
    for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x)  // a NaN or Inf on any key gives NaN
      s += Convert<T>::load(row[j * s3]) * (vis[j] ? 1.f : 0.f);
    acc += w * s;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[bh * gridDim.y + blockIdx.y] = acc;
}

// out[i] = sum_s partial[i * splits + s], one thread per output.
__global__ void sum_splits_kernel(const float* __restrict__ partial, int64_t n, int splits, float* __restrict__ out);

// ---------------------------------------------------------------- ratio_from_qk

struct QkShape {
  int64_t H, R, D, group;   // group = H / Hkv
  int64_t pass;             // query rows per pass of ratio_from_qk_group_kernel (1..kRowsPerPass)
  int64_t q0, q1, q2, q3;   // element strides of the (B, H, R, D) query rows
  int64_t k3;               // element stride of a key row (the keys' other strides are in DenseKeys / PagedKeys)
  int64_t m0, m1, m2;       // element strides of the (B, R, Nk) mask
  float scaling, softcap;
};

// The weight of query row i: row_weights[i], or 1 where row_weights is null (ratio_from_blocks
// reads one row per request, each of weight 1).
__device__ __forceinline__ float row_weight(const float* __restrict__ row_weights, int64_t i) {
  return row_weights == nullptr ? 1.f : row_weights[i];
}

constexpr int kRowsPerPass = 8;  // the most query rows a thread scores each key against, in registers

// N elements loaded at once (16 bytes by default: what a thread reads of a key row at once
// where the row allows it).
template <typename T, int N = 16 / static_cast<int>(sizeof(T))>
struct alignas(N * sizeof(T)) Pack {
  static constexpr int n = N;
  T v[N];
};

// A head dim rounded up to whole packs of n elements: the width of a query row in shared memory.
__host__ __device__ inline int64_t padded_dim(int64_t D, int n) { return (D + n - 1) / n * n; }

// Dynamic shared memory of ratio_from_qk_group_kernel for element size `bytes`: the query rows
// of one pass of `rows`.
__host__ __device__ inline size_t group_shared_bytes(int64_t rows, int64_t D, int bytes) {
  return sizeof(float) * static_cast<size_t>(rows * padded_dim(D, 16 / bytes));
}

// Elements [d0, d0 + N) of a row: one load of N * sizeof(T) bytes when Wide (unit stride, the
// row aligned to that, its length D a multiple of N), else N loads `stride` apart, 0 from D on.
template <int N, bool Wide, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* row, int64_t d0, int64_t D, int64_t stride) {
  if constexpr (Wide) {
    return *reinterpret_cast<const Pack<T, N>*>(row + d0);
  } else {
    Pack<T, N> x;
#pragma unroll
    for (int t = 0; t < N; ++t) x.v[t] = d0 + t < D ? row[(d0 + t) * stride] : Convert<T>::store(0.f);
    return x;
  }
}

constexpr int kPacksPerStep = 2;  // packs of a key row a thread loads before it uses them: a 32-byte sector

// dot[i] = q_i . key for the first `rows` query rows in shared memory (qs: rows of Dp =
// padded_dim(D, Pack<T>::n) floats, zero from D on); the key row is read once, 16 bytes at a
// time when Wide (else element by element, `stride` apart). Adds to dot.
template <bool Wide, typename T>
__device__ __forceinline__ void dot_rows(const T* key, const float* qs, int rows, int64_t D, int64_t Dp,
                                         int64_t stride, float (&dot)[kRowsPerPass]) {
  constexpr int n = Pack<T>::n;
  for (int64_t d0 = 0; d0 < Dp; d0 += kPacksPerStep * n) {
    Pack<T> kp[kPacksPerStep];
#pragma unroll
    for (int u = 0; u < kPacksPerStep; ++u) {
      if (d0 + u * n < Dp) kp[u] = load_pack<n, Wide>(key, d0 + u * n, D, stride);
    }
#pragma unroll
    for (int u = 0; u < kPacksPerStep; ++u) {
      if (d0 + u * n >= Dp) break;
      float kv[n];
#pragma unroll
      for (int t = 0; t < n; ++t) kv[t] = Convert<T>::load(kp[u].v[t]);
#pragma unroll
      for (int i = 0; i < kRowsPerPass; ++i) {
        if (i >= rows) break;
#pragma unroll
        for (int c = 0; c < n; c += 4) {  // the query as 16-byte shared loads, the same address in every lane
          const Pack<float> qv = *reinterpret_cast<const Pack<float>*>(qs + i * Dp + d0 + u * n + c);
#pragma unroll
          for (int t = 0; t < 4; ++t) dot[i] += qv.v[t] * kv[c + t];
        }
      }
    }
  }
}

// Where ratio_from_qk_group_kernel finds the keys of sample b: (B, Hkv, Nk, D) keys with
// element strides k0, k1, k2 (k3 in QkShape), all Nk of them read.
template <typename T>
struct DenseKeys {
  const T* k;
  int64_t k0, k1, k2, Nk;
  __device__ __forceinline__ bool valid(int64_t) const { return true; }
  __device__ __forceinline__ int64_t first(int64_t) const { return 0; }
  __device__ __forceinline__ int64_t last(int64_t) const { return Nk; }
  __device__ __forceinline__ int64_t visual_row() const { return Nk; }  // (B, Nk) visual flags
  __device__ __forceinline__ const T* key(int64_t b, int64_t g, int64_t j) const { return k + b * k0 + g * k1 + j * k2; }
};

// The keys of sample b in a paged cache: (NB, Hkv, BS, D) blocks with element strides kb0,
// kb1, kb2 (kb3 in QkShape), sample b's blocks listed in order by row b of an (R, MB) int32 or
// int64 block table; keys [max(0, length - window), length) read (window 0: from the first).
// A length outside [1, min(MB * BS, L)] (`valid`) or a block id outside [0, NB) (`key`
// gives null) makes the sample's statistics NaN: the kernel cannot raise an error.
template <typename T, typename I>
struct PagedKeys {
  const T* blocks;
  int64_t kb0, kb1, kb2, NB, BS;
  const I* table;  // int32 (vLLM's) or int64
  int64_t MB;
  const int64_t* lengths;
  int64_t window, L;
  __device__ __forceinline__ bool valid(int64_t b) const {
    const int64_t n = lengths[b];
    return n >= 1 && n <= MB * BS && n <= L;
  }
  __device__ __forceinline__ int64_t last(int64_t b) const { return lengths[b]; }
  __device__ __forceinline__ int64_t first(int64_t b) const {
    return window > 0 ? max(static_cast<int64_t>(0), lengths[b] - window) : 0;
  }
  __device__ __forceinline__ int64_t visual_row() const { return L; }  // (R, L) visual flags
  __device__ __forceinline__ const T* key(int64_t b, int64_t g, int64_t j) const {
    const int64_t id = table[b * MB + j / BS];
    return id < 0 || id >= NB ? nullptr : blocks + id * kb0 + g * kb1 + (j % BS) * kb2;
  }
};

// S_v's softmax statistics with each key read once per KV head: grid (B*Hkv, splits, passes),
// kThreads threads, group_shared_bytes(p.pass, D, sizeof(T)) of dynamic shared memory.
// Block (bg, s, z) takes pass z of KV head g's query rows of positive weight (row i = gi * R + r
// over the group's G query heads gi; rows of weight <= 0 are skipped, row_weights null: every
// row, weight 1), up to p.pass of them, and keeps their query rows in shared memory. Each
// thread takes one key of split s of the sample's keys (`Keys`: DenseKeys or PagedKeys) at a
// time, reads it once (16-byte loads when Wide, kPacksPerStep of them in flight), scores it
// against every row of the pass and updates that row's running statistics, all in registers;
// the threads merge once, at the end, by warp shuffles and then through shared memory, into
// partial[((b*H + h) * R + r) * splits + s] for ratio_from_qk_combine_kernel. mask may be
// null (every key allowed). A NaN score makes its row's statistics NaN.
template <typename T, typename M, typename Keys, bool Wide>
__global__ void __launch_bounds__(kThreads, 2)
    ratio_from_qk_group_kernel(const T* __restrict__ q, Keys keys, const M* __restrict__ mask,
                               const bool* __restrict__ visual, const float* __restrict__ row_weights, QkShape p,
                               Stats* __restrict__ partial) {
  constexpr int n = Pack<T>::n;
  extern __shared__ __align__(16) float qs[];  // the pass's query rows, p.pass x padded_dim(D, n)
  __shared__ int64_t pass_rows[kRowsPerPass], mask_rows[kRowsPerPass];  // the rows, the offsets of their mask rows
  __shared__ int pass_count;
  __shared__ Stats warp_stats[kThreads / kWarp][kRowsPerPass];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int64_t G = p.group, Hkv = p.H / G, b = blockIdx.x / Hkv, g = blockIdx.x % Hkv, Dp = padded_dim(p.D, n);
  if (threadIdx.x == 0) {  // the rows of positive weight from the (z * p.pass)-th on
    int count = 0;
    int64_t seen = 0;
    for (int64_t row = 0; row < G * p.R && count < p.pass; ++row) {
      if (!(row_weight(row_weights, b * p.R + row % p.R) > 0.f)) continue;
      if (seen++ < static_cast<int64_t>(blockIdx.z) * p.pass) continue;
      mask_rows[count] = b * p.m0 + (row % p.R) * p.m1;
      pass_rows[count++] = row;
    }
    pass_count = count;
  }
  __syncthreads();
  const int rows = pass_count;
  if (rows == 0) return;  // the same in every thread: no barrier is left waiting
  for (int64_t i = threadIdx.x; i < rows * Dp; i += blockDim.x) {  // zero past D: the scalar loads' padding
    const int64_t row = pass_rows[i / Dp], d = i % Dp, gi = row / p.R, r = row % p.R;
    qs[i] = d < p.D ? Convert<T>::load(q[b * p.q0 + (g * G + gi) * p.q1 + r * p.q2 + d * p.q3]) : 0.f;
  }
  float mx[kRowsPerPass], sum[kRowsPerPass], vis_sum[kRowsPerPass];
#pragma unroll
  for (int i = 0; i < kRowsPerPass; ++i) {
    mx[i] = -CUDART_INF_F;
    sum[i] = vis_sum[i] = 0.f;
  }
  __syncthreads();

  const bool valid = keys.valid(b);  // the same in every thread of the block
  const int64_t first = valid ? keys.first(b) : 0, last = valid ? keys.last(b) : 0;
  const int64_t per = (last - first + gridDim.y - 1) / gridDim.y;
  const int64_t j0 = first + blockIdx.y * per, j1 = min(last, j0 + per);
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    const T* kj = keys.key(b, g, j);
    float dot[kRowsPerPass] = {};
    if (kj != nullptr) dot_rows<Wide>(kj, qs, rows, p.D, Dp, p.k3, dot);
    const float vis = visual[b * keys.visual_row() + j] ? 1.f : 0.f;
#pragma unroll
    for (int i = 0; i < kRowsPerPass; ++i) {
      if (i >= rows) break;
      float x = dot[i] * p.scaling;
      if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
      if (mask != nullptr) x += mask_bias(mask[mask_rows[i] + j * p.m2]);
      if (kj == nullptr || x != x) {  // a block the cache does not have, or a NaN: the row's statistics become NaN
        mx[i] = 0.f;
        sum[i] = vis_sum[i] = CUDART_NAN_F;
      } else if (x > mx[i]) {
        const float c = mx[i] == -CUDART_INF_F ? 0.f : expf(mx[i] - x);
        sum[i] = sum[i] * c + 1.f;
        vis_sum[i] = vis_sum[i] * c + vis;
        mx[i] = x;
      } else if (x != -CUDART_INF_F) {
        const float e = expf(x - mx[i]);
        sum[i] += e;
        vis_sum[i] += e * vis;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerPass; ++i) {
    if (i >= rows) break;  // the same in every thread: the shuffles see whole warps
    Stats st{mx[i], sum[i], vis_sum[i]};
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const Stats other{__shfl_xor_sync(0xffffffffu, st.max, o), __shfl_xor_sync(0xffffffffu, st.sum, o),
                        __shfl_xor_sync(0xffffffffu, st.vis, o)};
      st = merge(st, other);
    }
    if (lane == 0) warp_stats[warp][i] = st;
  }
  __syncthreads();
  if (threadIdx.x < rows) {
    Stats total = empty_stats();
    for (int w = 0; w < warps; ++w) total = merge(total, warp_stats[w][threadIdx.x]);
    if (!valid) total = Stats{0.f, CUDART_NAN_F, CUDART_NAN_F};  // the sample's ratio becomes NaN
    const int64_t row = pass_rows[threadIdx.x], gi = row / p.R, r = row % p.R;
    partial[((b * p.H + g * G + gi) * p.R + r) * gridDim.y + blockIdx.y] = total;
  }
}

// out[b, h] = sum_r w[b, r] * vis / sum over the merged splits (row_weights null: w = 1); one
// thread per (b, h).
// A fully masked row of nonzero weight gives NaN, as the reference's softmax does.
__global__ void ratio_from_qk_combine_kernel(const Stats* __restrict__ partial, const float* __restrict__ row_weights,
                                             int64_t BH, int64_t H, int64_t R, int splits, float* __restrict__ out);

// ---------------------------------------------------------------- decode_attention

constexpr int kMaxHeadDim = 256;  // the widest key and value rows decode_attention takes on CUDA
constexpr int kValueDims = 4;     // value elements a thread accumulates per key (one 8- or 16-byte load)

struct DecodeShape {
  int64_t H, Hkv, Nk, D, Dv, group;                     // group = H / Hkv
  int64_t pass;                                        // query heads per pass (1..kRowsPerPass)
  int64_t value_threads;                               // threads per key in the P.V product (a power of 2)
  int64_t q0, q1, q3, k0, k1, k2, k3, v0, v1, v2, v3;  // element strides (q's third dim has size 1)
  int64_t m0, m2;                                      // element strides of the (B, 1, Nk) mask
  float scaling, softcap;
};

// Dynamic shared memory of decode_attention_kernel for element size `bytes`: the query rows of a
// pass of `rows` heads, then a tile's probabilities, one per row and thread (kThreads >=
// kMaxHeadDim: at the end the same space holds the pass's output rows).
__host__ __device__ inline size_t decode_shared_bytes(int64_t rows, int64_t D, int bytes) {
  return sizeof(float) * static_cast<size_t>(rows * (padded_dim(D, 16 / bytes) + kThreads));
}

// One decoding step (one query row per head) of attention and S_v together: grid (B*Hkv,
// splits, passes), kThreads threads, decode_shared_bytes(p.pass, D, sizeof(T)) of dynamic
// shared memory. Block (bg, s, z) reads the keys and values of split s of KV head g of sample
// b once for the pass's query heads (pass z: heads z * p.pass on of the group), a tile of
// kThreads keys at a time:
//   1. each thread scores one key of the tile against every head of the pass (dot_rows; the
//      query rows in shared memory);
//   2. the tile's max per head (warp shuffles, then across warps) moves the running max;
//      each thread turns its scores into probabilities in shared memory and keeps its part of
//      the running sums (all and visual keys), all relative to the running max;
//   3. the P.V product: p.value_threads threads per key, each holding kValueDims value
//      elements (one load, Wide: unit stride and aligned), the block's threads in
//      kThreads / p.value_threads slices that take every slice-th key of the tile.
// At the end the sums are added over the block and the slices' outputs one slice after
// another, into stats[(b*H + h) * splits + s] and partial[((b*H + h) * splits + s) * Dv + e],
// relative to the split's max. mask may be null (every key allowed).
template <typename T, typename M, bool Wide>
__global__ void __launch_bounds__(kThreads, 2)
    decode_attention_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            const M* __restrict__ mask, const bool* __restrict__ visual, DecodeShape p,
                            Stats* __restrict__ stats, float* __restrict__ partial) {
  extern __shared__ __align__(16) float smem[];
  __shared__ float warp_part[kThreads / kWarp][kRowsPerPass][2];  // per warp and head: tile max; sums at the end
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int64_t G = p.group, b = blockIdx.x / p.Hkv, g = blockIdx.x % p.Hkv;
  const int64_t head0 = g * G + blockIdx.z * p.pass;  // the pass's first query head
  const int rows = static_cast<int>(min(p.pass, G - static_cast<int64_t>(blockIdx.z) * p.pass));
  const int64_t Dp = padded_dim(p.D, Pack<T>::n);
  float* qs = smem;                // rows x Dp: the pass's query rows, zero from D on
  float* probs = qs + rows * Dp;   // rows x kThreads: the tile's probabilities; at the end rows x Dv outputs
  for (int64_t i = threadIdx.x; i < rows * Dp; i += blockDim.x) {
    const int64_t d = i % Dp;
    qs[i] = d < p.D ? Convert<T>::load(q[b * p.q0 + (head0 + i / Dp) * p.q1 + d * p.q3]) : 0.f;
  }
  const int slices = blockDim.x / static_cast<int>(p.value_threads);
  const int slice = threadIdx.x / static_cast<int>(p.value_threads);
  const int64_t e0 = (threadIdx.x % p.value_threads) * kValueDims;  // this thread's value elements
  float acc[kRowsPerPass][kValueDims], run_max[kRowsPerPass], sum[kRowsPerPass], vis_sum[kRowsPerPass];
#pragma unroll
  for (int i = 0; i < kRowsPerPass; ++i) {
    run_max[i] = -CUDART_INF_F;  // the same in every thread
    sum[i] = vis_sum[i] = 0.f;   // this thread's keys only
#pragma unroll
    for (int e = 0; e < kValueDims; ++e) acc[i][e] = 0.f;
  }
  __syncthreads();

  const int64_t per = (p.Nk + gridDim.y - 1) / gridDim.y;
  const int64_t j0 = blockIdx.y * per, j1 = min(p.Nk, j0 + per);
  const T* kb = k + b * p.k0 + g * p.k1;
  const T* vb = v + b * p.v0 + g * p.v1;
  for (int64_t t0 = j0; t0 < j1; t0 += blockDim.x) {  // the same in every thread: the barriers below see them all
    const int64_t j = t0 + threadIdx.x;
    const int tile = static_cast<int>(min(static_cast<int64_t>(blockDim.x), j1 - t0));
    // 1. this thread's key against every head of the pass
    const float bias = j < j1 && mask != nullptr ? mask_bias(mask[b * p.m0 + j * p.m2]) : 0.f;
    const bool live = j < j1 && bias != -CUDART_INF_F;
    float x[kRowsPerPass] = {};
    if (live) dot_rows<Wide>(kb + j * p.k2, qs, rows, p.D, Dp, p.k3, x);
#pragma unroll
    for (int i = 0; i < kRowsPerPass; ++i) {
      if (i >= rows) break;  // the same in every thread: the shuffles see whole warps
      x[i] *= p.scaling;
      if (p.softcap > 0.f) x[i] = p.softcap * tanhf(x[i] / p.softcap);
      x[i] = live ? x[i] + bias : -CUDART_INF_F;
      float m = x[i];
      for (int o = kWarp / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      if (lane == 0) warp_part[warp][i][0] = m;
    }
    __syncthreads();
    // 2. the running max, this thread's probabilities and sums
    const float vis = live && visual[b * p.Nk + j] ? 1.f : 0.f;
#pragma unroll
    for (int i = 0; i < kRowsPerPass; ++i) {
      if (i >= rows) break;
      float m = run_max[i];
      for (int w = 0; w < warps; ++w) m = fmaxf(m, warp_part[w][i][0]);
      const float c = m == -CUDART_INF_F ? 1.f : expf(run_max[i] - m);  // rescales what came before
      const float pr = x[i] == -CUDART_INF_F ? 0.f : expf(x[i] - m);
      run_max[i] = m;
      probs[i * kThreads + threadIdx.x] = pr;
      sum[i] = sum[i] * c + pr;
      vis_sum[i] = vis_sum[i] * c + pr * vis;
#pragma unroll
      for (int e = 0; e < kValueDims; ++e) acc[i][e] *= c;
    }
    __syncthreads();
    // 3. this thread's value elements over its slice's keys of the tile
    if (e0 < p.Dv) {
      for (int t = slice; t < tile; t += slices) {
        const Pack<T, kValueDims> vp = load_pack<kValueDims, Wide>(vb + (t0 + t) * p.v2, e0, p.Dv, p.v3);
        float vf[kValueDims];
#pragma unroll
        for (int e = 0; e < kValueDims; ++e) vf[e] = Convert<T>::load(vp.v[e]);
#pragma unroll
        for (int i = 0; i < kRowsPerPass; ++i) {
          if (i >= rows) break;
          const float pr = probs[i * kThreads + t];
#pragma unroll
          for (int e = 0; e < kValueDims; ++e) acc[i][e] += pr * vf[e];
        }
      }
    }
    __syncthreads();  // the next tile overwrites the probabilities and the warps' maxima
  }

#pragma unroll
  for (int i = 0; i < kRowsPerPass; ++i) {
    if (i >= rows) break;
    const float s = warp_sum(sum[i]), vs = warp_sum(vis_sum[i]);
    if (lane == 0) warp_part[warp][i][0] = s, warp_part[warp][i][1] = vs;
  }
  for (int sl = 0; sl < slices; ++sl) {  // the slices' outputs into probs, one slice after another
    if (slice == sl && e0 < p.Dv) {
#pragma unroll
      for (int i = 0; i < kRowsPerPass; ++i) {
        if (i >= rows) break;
#pragma unroll
        for (int e = 0; e < kValueDims; ++e) {
          if (e0 + e >= p.Dv) break;
          float* o = probs + i * p.Dv + e0 + e;
          *o = sl == 0 ? acc[i][e] : *o + acc[i][e];
        }
      }
    }
    __syncthreads();
  }
  for (int64_t idx = threadIdx.x; idx < rows * p.Dv; idx += blockDim.x) {
    const int64_t i = idx / p.Dv, e = idx % p.Dv;
    partial[((b * p.H + head0 + i) * gridDim.y + blockIdx.y) * p.Dv + e] = probs[idx];
  }
  if (threadIdx.x == 0) {  // run_max is the same in every thread
#pragma unroll
    for (int i = 0; i < kRowsPerPass; ++i) {
      if (i >= rows) break;
      Stats total{run_max[i], 0.f, 0.f};
      for (int w = 0; w < warps; ++w) total.sum += warp_part[w][i][0], total.vis += warp_part[w][i][1];
      stats[(b * p.H + head0 + i) * gridDim.y + blockIdx.y] = total;
    }
  }
}

// grid B*H, threads over Dv: out[bh, :] (the (B, 1, H, Dv) output, contiguous) and
// ratios[bh] from the splits of decode_attention_kernel. A row with every key masked
// gives an output of 0 and a ratio of NaN (0/0), as on the CPU.
template <typename T>
__global__ void decode_attention_combine_kernel(const Stats* __restrict__ stats, const float* __restrict__ partial,
                                                int64_t Dv, int splits, T* __restrict__ out,
                                                float* __restrict__ ratios) {
  const int64_t bh = blockIdx.x;
  const Stats* sb = stats + bh * splits;
  float m = -CUDART_INF_F;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, sb[s].max);
  float sum = 0.f, vis = 0.f;
  for (int s = 0; s < splits && m != -CUDART_INF_F; ++s) {
    if (sb[s].max == -CUDART_INF_F) continue;
    const float a = expf(sb[s].max - m);
    sum += sb[s].sum * a;
    vis += sb[s].vis * a;
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int64_t e = threadIdx.x; e < Dv; e += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < splits && m != -CUDART_INF_F; ++s) {
      if (sb[s].max != -CUDART_INF_F) o += partial[(bh * splits + s) * Dv + e] * expf(sb[s].max - m);
    }
    out[bh * Dv + e] = Convert<T>::store(o * inv);
  }
  if (threadIdx.x == 0) ratios[bh] = vis / sum;
}

// ---------------------------------------------------------------- head_gains

// ratios (n = B*H) contiguous, has_visual (B,); perception wins ties.
__global__ void head_gains_kernel(const float* __restrict__ ratios, const bool* __restrict__ has_visual, int64_t n,
                                  int64_t H, float tau_perc, float tau_reas, float g_perc, float g_reas,
                                  float g_neutral, float* __restrict__ out);

// ---------------------------------------------------------------- scale_heads

struct ScaleShape {
  int64_t N, H, D;
  int64_t s0, s1, s2, s3;  // source strides (B, N, H, D)
  int64_t d0, d1, d2, d3;  // destination strides
};

// dst[b, n, h, :] = src[b, n, h, :] * gains[b, h] over rows = B*N*H head vectors;
// threadIdx.x walks D, threadIdx.y rows. With skip_identity heads of gain exactly 1 are
// not touched (the in-place op, src == dst).
template <typename T>
__global__ void scale_heads_kernel(const T* src, T* dst, const typename Convert<T>::acc* __restrict__ gains,
                                   int64_t rows, ScaleShape p, bool skip_identity) {
  using acc_t = typename Convert<T>::acc;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t h = row % p.H, bn = row / p.H, n = bn % p.N, b = bn / p.N;
    const acc_t g = gains[b * p.H + h];
    if (skip_identity && g == acc_t(1)) continue;
    const T* s = src + b * p.s0 + n * p.s1 + h * p.s2;
    T* d = dst + b * p.d0 + n * p.d1 + h * p.d2;
    for (int64_t i = threadIdx.x; i < p.D; i += blockDim.x) d[i * p.d3] = Convert<T>::store(Convert<T>::load(s[i * p.s3]) * g);
  }
}

}  // namespace kernels
}  // namespace headgain
