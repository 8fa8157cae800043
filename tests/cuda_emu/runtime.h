// Host emulation of the CUDA execution model: every CUDA thread of a block is a fiber
// (ucontext) on one OS thread; __syncthreads / __syncwarp / __shfl_xor_sync are barriers
// checked for divergence (deadlock = error), launch configs checked against CUDA's limits.
#pragma once
#include <ucontext.h>
#include <math.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct EmuIdx { unsigned x, y, z; };
extern EmuIdx threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return (float)f; }
inline __half __float2half_rn(float x) { _Float16 f = (_Float16)x; __half h; std::memcpy(&h.bits, &f, 2); return h; }
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = uint32_t(b.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u; std::memcpy(&u, &x, 4); __nv_bfloat16 b;
  if (std::isnan(x)) { b.bits = 0x7fc0; return b; }
  u += 0x7fffu + ((u >> 16) & 1u); b.bits = uint16_t(u >> 16); return b;
}
#define CUDART_INF_F (std::numeric_limits<float>::infinity())
#define CUDART_NAN_F (std::numeric_limits<float>::quiet_NaN())
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }

float* emu_dynsmem();
__attribute__((noinline)) void __syncthreads();
__attribute__((noinline)) void __syncwarp(unsigned mask = 0xffffffffu);
__attribute__((noinline)) float __shfl_xor_sync(unsigned mask, float v, int o);

void emu_run(dim3 grid, dim3 block, size_t smem, std::function<void()> body);
template <class F>
void emu_launch(F f, dim3 grid, dim3 block, size_t smem = 0, int stream = 0) {
  (void)stream;
  emu_run(grid, block, smem, std::function<void()>(f));
}
void emu_check_launch();  // C10_CUDA_KERNEL_LAUNCH_CHECK: a failed launch has already raised
