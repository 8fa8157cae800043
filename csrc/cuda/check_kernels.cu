// Compile and link check of headgain's CUDA kernels, free of torch. It instantiates every
// kernel template of headgain_kernels.cuh for every element type the launch wrappers use,
// and launches each kernel defined in headgain_kernels.cu, so that linking the two files
// fails where a declaration in the header does not match its definition. Built by
// .ci/nvcc_check (which tests/test_cuda_compile.py runs) and never run; not part of the
// extension (setup.py skips csrc/cuda/check_*.cu).
#include "headgain_kernels.cuh"

namespace hk = headgain::kernels;

template <typename T>
void instantiate_per_element_type() {
  (void)&hk::ratio_from_probs_kernel<T>;
  (void)&hk::ratio_from_qk_group_kernel<T, bool, hk::DenseKeys<T>, true>;
  (void)&hk::ratio_from_qk_group_kernel<T, bool, hk::DenseKeys<T>, false>;
  (void)&hk::ratio_from_qk_group_kernel<T, float, hk::DenseKeys<T>, true>;
  (void)&hk::ratio_from_qk_group_kernel<T, double, hk::DenseKeys<T>, true>;
  (void)&hk::ratio_from_qk_group_kernel<T, __half, hk::DenseKeys<T>, true>;
  (void)&hk::ratio_from_qk_group_kernel<T, __nv_bfloat16, hk::DenseKeys<T>, false>;
  (void)&hk::ratio_from_qk_group_kernel<T, bool, hk::PagedKeys<T, int32_t>, true>;  // ratio_from_blocks
  (void)&hk::ratio_from_qk_group_kernel<T, bool, hk::PagedKeys<T, int64_t>, false>;
  (void)&hk::decode_attention_kernel<T, bool, true>;
  (void)&hk::decode_attention_kernel<T, bool, false>;
  (void)&hk::decode_attention_kernel<T, float, true>;
  (void)&hk::decode_attention_kernel<T, double, false>;
  (void)&hk::decode_attention_kernel<T, __half, true>;
  (void)&hk::decode_attention_kernel<T, __nv_bfloat16, false>;
  (void)&hk::decode_attention_combine_kernel<T>;
  (void)&hk::scale_heads_kernel<T>;
}

void instantiate_all() {
  instantiate_per_element_type<float>();
  instantiate_per_element_type<__half>();
  instantiate_per_element_type<__nv_bfloat16>();
  (void)&hk::scale_heads_kernel<double>;
}

// The launches reference the kernels of headgain_kernels.cu, which the link must resolve.
void launch_defined_elsewhere() {
  hk::sum_splits_kernel<<<1, 1>>>(nullptr, 0, 1, nullptr);
  hk::ratio_from_qk_combine_kernel<<<1, 1>>>(nullptr, nullptr, 0, 1, 1, 1, nullptr);
  hk::head_gains_kernel<<<1, 1>>>(nullptr, nullptr, 0, 1, 0.f, 0.f, 1.f, 1.f, 1.f, nullptr);
}
