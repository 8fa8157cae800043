// Compile check of headgain's CUDA kernels, free of torch: instantiates every kernel for
// every element type the launch wrappers use. Built by .ci/nvcc_check and
// tests/test_cuda_compile.py with `nvcc -c`; not part of the extension (setup.py skips
// csrc/cuda/check_*.cu).
#include "headgain_kernels.cuh"

namespace hk = headgain::kernels;

template <typename T>
void instantiate_per_element_type() {
  (void)&hk::ratio_from_probs_kernel<T>;
  (void)&hk::ratio_from_qk_kernel<T, bool>;
  (void)&hk::ratio_from_qk_kernel<T, float>;
  (void)&hk::ratio_from_qk_kernel<T, double>;
  (void)&hk::ratio_from_qk_kernel<T, __half>;
  (void)&hk::ratio_from_qk_kernel<T, __nv_bfloat16>;
  (void)&hk::scale_heads_kernel<T>;
}

void instantiate_all() {
  instantiate_per_element_type<float>();
  instantiate_per_element_type<__half>();
  instantiate_per_element_type<__nv_bfloat16>();
  (void)&hk::scale_heads_kernel<double>;
  (void)&hk::sum_splits_kernel;
  (void)&hk::ratio_from_qk_combine_kernel;
  (void)&hk::head_gains_kernel;
}
