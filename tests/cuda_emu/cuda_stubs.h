// What headgain_cuda.cu takes from the CUDA runtime and c10::cuda, for the emulation: one
// device, one stream, device attributes of an H200 (HEADGAIN_EMU_SMS overrides its 132
// multiprocessors, which sets how many key splits the kernels get), and the opt-in to more
// than 48 KiB of dynamic shared memory (up to the H200's 227 KiB) for the next launch.
#pragma once
#include <c10/core/Device.h>

#include <cstdlib>
#include <stdexcept>

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline int getCurrentCUDAStream() { return 0; }
inline int current_device() { return 0; }
}  // namespace cuda
}  // namespace c10

#define C10_CUDA_CHECK(x) (void)(x)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() emu_check_launch()

enum { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
constexpr int kEmuOptinShared = 227 * 1024;

inline int cudaDeviceGetAttribute(int* value, int attr, int) {
  if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) {
    *value = kEmuOptinShared;
  } else {
    const char* sms = std::getenv("HEADGAIN_EMU_SMS");
    *value = sms ? std::atoi(sms) : 132;
  }
  return 0;
}

template <class F>
int cudaFuncSetAttribute(F, int attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value > kEmuOptinShared) throw std::runtime_error("EMU: opt-in above the device's 227 KiB");
    emu_smem_optin = value;
  }
  return 0;
}
