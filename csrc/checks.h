// Precondition checks shared by the CPU and CUDA kernels of the askd ops (header-only, so nvcc sees them too).
//
// Every message names the op, the tensor, what was expected and what came: a Python caller gets a
// RuntimeError it can act on instead of a crash or a silently wrong answer.

#pragma once

// ASKD_MINIMAL_ATEN (set by the CUDA sources): only the Tensor class, not every operator's declaration; the
// including file then names the per-operator headers it uses, which keeps nvcc builds fast.
#ifdef ASKD_MINIMAL_ATEN
#include <ATen/core/Tensor.h>
#else
#include <ATen/ATen.h>
#endif

#include <string>
#include <vector>

namespace askd {

inline std::string shape_str(at::IntArrayRef shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? "," : "") + std::to_string(shape[i]);
  return out + ")";
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK(t.sizes().equals(expected), op, ": ", name, " must have shape ", shape_str(expected), ", got ",
              shape_str(t.sizes()));
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " must be ", at::toString(expected), ", got ",
              at::toString(t.scalar_type()));
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device().str(), " but x is on ",
              ref.device().str());
}

inline bool is_kernel_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf;
}

// acc: the dtype maps and statistics are kept in (float64 for float64 inputs, else float32)
inline at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// x (B,C,H,W) float, B >= 0, C, H, W > 0; w1 (R,C), w2 (C,R), ws (2,k,k) float on x's device, k in {3,7}.
inline void check_cbam_inputs(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& ws,
                              const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be (B,C,H,W), got shape ", shape_str(x.sizes()));
  TORCH_CHECK(is_kernel_float(x.scalar_type()), op, ": x must be float32, float64, bfloat16 or float16, got ",
              at::toString(x.scalar_type()));
  // B = 0 is an empty batch (empty outputs, as in PyTorch); an empty C, H or W has no max to pool
  TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, op, ": x must have C, H and W > 0, got shape ",
              shape_str(x.sizes()));
  const int64_t C = x.size(1);
  TORCH_CHECK(w1.dim() == 2 && w1.size(0) >= 1, op, ": w1 must be (R,", C, "), got ", shape_str(w1.sizes()));
  const int64_t R = w1.size(0);
  check_shape(w1, {R, C}, op, "w1");
  check_shape(w2, {C, R}, op, "w2");
  TORCH_CHECK(ws.dim() == 3 && (ws.size(2) == 3 || ws.size(2) == 7), op, ": ws must be (2,3,3) or (2,7,7), got ",
              shape_str(ws.sizes()));
  check_shape(ws, {2, ws.size(2), ws.size(2)}, op, "ws");
  for (auto [t, name] : {std::pair{&w1, "w1"}, {&w2, "w2"}, {&ws, "ws"}}) {
    check_device(*t, x, op, name);
    TORCH_CHECK(is_kernel_float(t->scalar_type()), op, ": ", name, " must be floating point, got ",
                at::toString(t->scalar_type()));
  }
}

// The tensors cbam_forward saved, checked against x before cbam_backward trusts their shapes and dtypes.
inline void check_cbam_saved(const at::Tensor& x, const at::Tensor& a_c, const at::Tensor& a_s,
                             const at::Tensor& chan, const at::Tensor& idx_c, const at::Tensor& pooled,
                             const at::Tensor& idx_s, const char* op) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto acc = acc_type(x.scalar_type());
  const std::vector<std::tuple<const at::Tensor*, const char*, std::vector<int64_t>, at::ScalarType>> expected = {
      {&a_c, "a_c", {B, C}, acc},           {&a_s, "a_s", {B, 1, H, W}, acc},
      {&chan, "chan", {B, 2, C}, acc},      {&idx_c, "idx_c", {B, C}, at::kInt},
      {&pooled, "pooled", {B, 2, H, W}, acc}, {&idx_s, "idx_s", {B, H, W}, at::kInt}};
  for (const auto& [t, name, shape, dtype] : expected) {
    check_shape(*t, shape, op, name);
    check_dtype(*t, dtype, op, name);
    check_device(*t, x, op, name);
  }
}

// teacher and student: M > 0 maps each, map j of the same shape (B, ...) in both lists, B > 0, one float dtype,
// one device.
inline void check_distill_maps(at::TensorList teacher, at::TensorList student, const char* op) {
  TORCH_CHECK(!student.empty() && teacher.size() == student.size(), op,
              ": need as many teacher as student maps (> 0), got ", teacher.size(), " and ", student.size());
  const auto& first = student[0];
  TORCH_CHECK(first.dim() >= 2, op, ": student map 0 must be (B, ...), got shape ", shape_str(first.sizes()));
  // the loss is a mean over the batch: undefined for an empty one (askd.ops.cosine_distill.check_maps says why)
  TORCH_CHECK(first.size(0) > 0, op, ": the distillation loss needs at least one sample, got batch size 0");
  TORCH_CHECK(is_kernel_float(first.scalar_type()), op, ": maps must be float32, float64, bfloat16 or float16, got ",
              at::toString(first.scalar_type()));
  for (size_t j = 0; j < student.size(); ++j) {
    const auto &t = teacher[j], &s = student[j];
    TORCH_CHECK(t.sizes().equals(s.sizes()), op, ": map ", j, ": teacher shape ", shape_str(t.sizes()),
                " != student shape ", shape_str(s.sizes()));
    TORCH_CHECK(s.dim() >= 2 && s.size(0) == first.size(0), op, ": map ", j, ": expected shape (B=", first.size(0),
                ", ...), got ", shape_str(s.sizes()));
    TORCH_CHECK(t.scalar_type() == first.scalar_type() && s.scalar_type() == first.scalar_type(), op, ": map ", j,
                ": all maps must share one dtype (", at::toString(first.scalar_type()), "), got teacher ",
                at::toString(t.scalar_type()), " and student ", at::toString(s.scalar_type()));
    TORCH_CHECK(t.device() == first.device() && s.device() == first.device(), op, ": map ", j,
                ": all maps must be on ", first.device().str(), ", got teacher on ", t.device().str(),
                " and student on ", s.device().str());
  }
}

// PReLU's backward: x (B,C,H,W) float with C > 0 (B, H, W may be 0), weight (C,) and grad (B,C,H,W), both of x's
// dtype and on x's device.
inline void check_prelu_inputs(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                               const char* op) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) > 0, op, ": x must be (B,C,H,W) with C > 0, got shape ",
              shape_str(x.sizes()));
  TORCH_CHECK(is_kernel_float(x.scalar_type()), op, ": x must be float32, float64, bfloat16 or float16, got ",
              at::toString(x.scalar_type()));
  check_shape(weight, {x.size(1)}, op, "weight");
  check_shape(grad, x.sizes(), op, "grad");
  check_dtype(weight, x.scalar_type(), op, "weight");
  check_dtype(grad, x.scalar_type(), op, "grad");
  check_device(weight, x, op, "weight");
  check_device(grad, x, op, "grad");
}

}  // namespace askd
