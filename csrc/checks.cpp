// The argument checks of headgain's ops (declared in headgain.h), shared by the CPU
// (cpu/*.cpp) and CUDA (cuda/headgain_cuda.cu) implementations.

#include <ATen/MemoryOverlap.h>

#include "headgain.h"

namespace headgain {

namespace {

bool is_reduced_or_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool is_reduced_or_float_or_double(at::ScalarType t) { return is_reduced_or_float(t) || t == at::kDouble; }

void check_tensor(bool ok, const char* name, const at::Tensor& t, const char* expected) {
  TORCH_CHECK(ok, "headgain: ", name, " must be ", expected, ", got shape ", t.sizes(), " dtype ", t.scalar_type());
}

void check_same_device(const at::Tensor& a, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(a.device() == ref.device(), "headgain: ", name, " is on ", a.device(), " but ", ref_name, " is on ",
              ref.device());
}

}  // namespace

void check_ratio_from_probs(const at::Tensor& probs, const at::Tensor& visual, const at::Tensor& query_weights) {
  check_tensor(probs.dim() == 4 && is_reduced_or_float(probs.scalar_type()), "probs", probs,
               "(B, H, Nq, Nk) float32/bfloat16/float16");
  const auto b = probs.size(0), nq = probs.size(2), nk = probs.size(3);
  check_tensor(visual.dim() == 2 && visual.size(0) == b && visual.size(1) == nk && visual.scalar_type() == at::kBool,
               "visual", visual, "(B, Nk) bool matching probs");
  check_tensor(query_weights.dim() == 2 && query_weights.size(0) == b && query_weights.size(1) == nq &&
                   query_weights.scalar_type() == at::kFloat,
               "query_weights", query_weights, "(B, Nq) float32 matching probs");
  check_same_device(visual, "visual", probs, "probs");
  check_same_device(query_weights, "query_weights", probs, "probs");
}

void check_ratio_from_qk(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                         const at::Tensor& visual, const at::Tensor& row_weights) {
  check_tensor(q.dim() == 4 && is_reduced_or_float(q.scalar_type()), "q", q, "(B, H, R, D) float32/bfloat16/float16");
  const auto b = q.size(0), h = q.size(1), r = q.size(2), d = q.size(3);
  check_tensor(k.dim() == 4 && k.size(0) == b && k.size(3) == d && k.scalar_type() == q.scalar_type() &&
                   k.size(1) > 0 && h % k.size(1) == 0,
               "k", k, "(B, Hkv, Nk, D) with H % Hkv == 0 and q's dtype");
  const auto nk = k.size(2);
  if (mask.has_value()) {
    const auto& m = *mask;
    check_tensor(m.dim() == 3 && m.size(0) == b && m.size(1) == r && m.size(2) == nk &&
                     (m.scalar_type() == at::kBool || is_reduced_or_float_or_double(m.scalar_type())),
                 "mask", m, "None or (B, R, Nk) bool/float64/float32/bfloat16/float16");
    check_same_device(m, "mask", q, "q");
  }
  check_tensor(visual.dim() == 2 && visual.size(0) == b && visual.size(1) == nk && visual.scalar_type() == at::kBool,
               "visual", visual, "(B, Nk) bool matching k");
  check_tensor(row_weights.dim() == 2 && row_weights.size(0) == b && row_weights.size(1) == r &&
                   row_weights.scalar_type() == at::kFloat,
               "row_weights", row_weights, "(B, R) float32 matching q");
  check_same_device(k, "k", q, "q");
  check_same_device(visual, "visual", q, "q");
  check_same_device(row_weights, "row_weights", q, "q");
}

void check_ratio_from_blocks(const at::Tensor& q, const at::Tensor& key_blocks, const at::Tensor& block_table,
                             const at::Tensor& lengths, const at::Tensor& visual, int64_t window) {
  check_tensor(q.dim() == 3 && is_reduced_or_float(q.scalar_type()), "q", q,
               "(R, H, D) float32/bfloat16/float16 (one query row per request)");
  const auto r = q.size(0), h = q.size(1), d = q.size(2);
  check_tensor(key_blocks.dim() == 4 && key_blocks.size(3) == d && key_blocks.scalar_type() == q.scalar_type() &&
                   key_blocks.size(1) > 0 && h % key_blocks.size(1) == 0 && key_blocks.size(2) > 0,
               "key_blocks", key_blocks, "(num_blocks, Hkv, block_size, D) with H % Hkv == 0 and q's dtype");
  check_tensor(block_table.dim() == 2 && block_table.size(0) == r &&
                   (block_table.scalar_type() == at::kInt || block_table.scalar_type() == at::kLong),
               "block_table", block_table, "(R, max_blocks) int32/int64 matching q");
  check_tensor(lengths.dim() == 1 && lengths.size(0) == r && lengths.scalar_type() == at::kLong, "lengths", lengths,
               "(R,) int64 matching q");
  check_tensor(visual.dim() == 2 && visual.size(0) == r && visual.scalar_type() == at::kBool, "visual", visual,
               "(R, L) bool matching q");
  TORCH_CHECK(window >= 0, "headgain: window must be 0 (every key) or a positive number of keys, got ", window);
  check_same_device(key_blocks, "key_blocks", q, "q");
  check_same_device(block_table, "block_table", q, "q");
  check_same_device(lengths, "lengths", q, "q");
  check_same_device(visual, "visual", q, "q");
}

void check_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, const at::Tensor& visual) {
  check_tensor(q.dim() == 4 && q.size(2) == 1 && is_reduced_or_float(q.scalar_type()), "q", q,
               "(B, H, 1, D) float32/bfloat16/float16 (one decoding step)");
  const auto b = q.size(0), h = q.size(1), d = q.size(3);
  check_tensor(k.dim() == 4 && k.size(0) == b && k.size(3) == d && k.scalar_type() == q.scalar_type() &&
                   k.size(1) > 0 && h % k.size(1) == 0,
               "k", k, "(B, Hkv, Nk, D) with H % Hkv == 0 and q's dtype");
  const auto nk = k.size(2);
  check_tensor(v.dim() == 4 && v.size(0) == b && v.size(1) == k.size(1) && v.size(2) == nk &&
                   v.scalar_type() == q.scalar_type(),
               "v", v, "(B, Hkv, Nk, Dv) matching k, of q's dtype");
  if (mask.has_value()) {
    const auto& m = *mask;
    check_tensor(m.dim() == 3 && m.size(0) == b && m.size(1) == 1 && m.size(2) == nk &&
                     (m.scalar_type() == at::kBool || is_reduced_or_float_or_double(m.scalar_type())),
                 "mask", m, "None or (B, 1, Nk) bool/float64/float32/bfloat16/float16");
    check_same_device(m, "mask", q, "q");
  }
  check_tensor(visual.dim() == 2 && visual.size(0) == b && visual.size(1) == nk && visual.scalar_type() == at::kBool,
               "visual", visual, "(B, Nk) bool matching k");
  check_same_device(k, "k", q, "q");
  check_same_device(v, "v", q, "q");
  check_same_device(visual, "visual", q, "q");
}

void check_head_gains(const at::Tensor& ratios, const at::Tensor& has_visual) {
  check_tensor(ratios.dim() == 2 && ratios.scalar_type() == at::kFloat, "ratios", ratios, "(B, H) float32");
  check_tensor(has_visual.dim() == 1 && has_visual.size(0) == ratios.size(0) && has_visual.scalar_type() == at::kBool,
               "has_visual", has_visual, "(B,) bool matching ratios");
  check_same_device(has_visual, "has_visual", ratios, "ratios");
}

void check_scale_heads(const at::Tensor& out, const at::Tensor& gains) {
  const auto t = out.scalar_type();
  check_tensor(out.dim() == 4 && is_reduced_or_float_or_double(t), "out", out,
               "(B, N, H, D) float32/bfloat16/float16/float64");
  check_tensor(gains.dim() == 2 && gains.size(0) == out.size(0) && gains.size(1) == out.size(2) &&
                   (gains.scalar_type() == at::kFloat || gains.scalar_type() == at::kDouble),
               "gains", gains, "(B, H) float32 matching out");
  check_same_device(gains, "gains", out, "out");
}

void check_scale_heads_inplace(const at::Tensor& out, const at::Tensor& gains) {
  check_scale_heads(out, gains);
  at::assert_no_internal_overlap(out);
}

}  // namespace headgain
