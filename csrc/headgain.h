// Argument checks shared by the CPU (cpu/*.cpp) and CUDA (cuda/headgain_cuda.cu)
// implementations of the headgain ops, defined in checks.cpp. Each check names the
// argument, its shape and its dtype, so a wrong call fails with the same message on every
// device.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <optional>

// Dispatch over the attention dtypes the ratio ops accept: float32, float16, bfloat16.
#define HG_DISPATCH_ATTN_TYPES(TYPE, NAME, ...)                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)       \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace headgain {

// probs (B, H, Nq, Nk) fp32/bf16/fp16, visual (B, Nk) bool, query_weights (B, Nq) fp32.
void check_ratio_from_probs(const at::Tensor& probs, const at::Tensor& visual, const at::Tensor& query_weights);

// q (B, H, R, D), k (B, Hkv, Nk, D) of one dtype (fp32/bf16/fp16) with H % Hkv == 0,
// mask None or (B, R, Nk) bool/floating, visual (B, Nk) bool, row_weights (B, R) fp32.
void check_ratio_from_qk(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                         const at::Tensor& visual, const at::Tensor& row_weights);

// q (R, H, D), key_blocks (NB, Hkv, BS, D) of q's dtype (fp32/bf16/fp16) with H % Hkv == 0,
// block_table (R, MB) int32/int64, lengths (R,) int64, visual (R, L) bool, window >= 0.
// The values of block_table and lengths are checked by the kernels that read them.
void check_ratio_from_blocks(const at::Tensor& q, const at::Tensor& key_blocks, const at::Tensor& block_table,
                             const at::Tensor& lengths, const at::Tensor& visual, int64_t window);

// q (B, H, 1, D), k (B, Hkv, Nk, D) and v (B, Hkv, Nk, Dv) of one dtype (fp32/bf16/fp16)
// with H % Hkv == 0, mask None or (B, 1, Nk) bool/floating, visual (B, Nk) bool.
void check_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, const at::Tensor& visual);

// ratios (B, H) fp32, has_visual (B,) bool.
void check_head_gains(const at::Tensor& ratios, const at::Tensor& has_visual);

// out (B, N, H, D) floating, gains (B, H) fp32 (fp64 accepted for gradient checks).
void check_scale_heads(const at::Tensor& out, const at::Tensor& gains);

// check_scale_heads for the in-place op, which also refuses an out whose elements overlap
// (an expanded, stride-0 out would be scaled more than once).
void check_scale_heads_inplace(const at::Tensor& out, const at::Tensor& gains);

}  // namespace headgain
