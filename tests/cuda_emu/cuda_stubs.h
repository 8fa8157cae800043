// What headgain_cuda.cu takes from the CUDA runtime and c10::cuda, for the emulation: one
// device, one stream, and the multiprocessor count of an H200 (HEADGAIN_EMU_SMS overrides its
// 132, which sets how many key splits the kernels get).
#pragma once
#include <c10/core/Device.h>

#include <cstdlib>

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

enum { cudaDevAttrMultiProcessorCount = 16 };

inline int cudaDeviceGetAttribute(int* value, int, int) {
  const char* sms = std::getenv("HEADGAIN_EMU_SMS");
  *value = sms ? std::atoi(sms) : 132;
  return 0;
}
