// The A-SKD loss over all maps on the CPU, one op call per direction (the contract: askd/ops/cosine_distill.py).
//
// Tasks are (map, sample) rows, run in parallel; each row's dot(t,s), |t|^2, |s|^2 is an `omp simd`
// reduction in acc (float, double for double). The loss is then summed over the stats in a fixed order, so
// it does not depend on the thread count. Backward writes each student row once. No map is copied unless
// it is not contiguous.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../checks.h"

namespace askd {
namespace {

using at::Tensor;

constexpr double kEps = 1e-8;  // the cosine's clamp, as torch.nn.functional.cosine_similarity

std::vector<Tensor> contiguous(at::TensorList maps) {
  std::vector<Tensor> out;
  out.reserve(maps.size());
  for (const auto& m : maps) out.push_back(m.contiguous());
  return out;
}

// cos and the norm product n = |t||s| of one stats row (dot, |t|^2, |s|^2)
template <typename acc_t>
inline acc_t cosine(const acc_t* st, acc_t* n) {
  *n = std::sqrt(st[1]) * std::sqrt(st[2]);
  return st[0] / std::max(*n, static_cast<acc_t>(kEps));
}

// (dot(t,s), |t|^2, |s|^2) of one row of D values
template <typename scalar_t, typename acc_t>
void row_stats(const scalar_t* t, const scalar_t* s, int64_t D, acc_t* out) {
  acc_t dot = 0, tt = 0, ss = 0;
#pragma omp simd reduction(+ : dot, tt, ss)
  for (int64_t d = 0; d < D; ++d) {
    const acc_t tv = static_cast<acc_t>(t[d]), sv = static_cast<acc_t>(s[d]);
    dot += tv * sv;
    tt += tv * tv;
    ss += sv * sv;
  }
  out[0] = dot, out[1] = tt, out[2] = ss;
}

// ds = ct * t + cs * s for one row
template <typename scalar_t, typename acc_t>
void row_grad(const scalar_t* t, const scalar_t* s, scalar_t* ds, int64_t D, acc_t ct, acc_t cs) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d)
    ds[d] = static_cast<scalar_t>(ct * static_cast<acc_t>(t[d]) + cs * static_cast<acc_t>(s[d]));
}

std::tuple<Tensor, Tensor> cosine_distill_forward_cpu(at::TensorList teacher_in, at::TensorList student_in,
                                                      double scale) {
  constexpr const char* op = "askd::cosine_distill_forward";
  check_distill_maps(teacher_in, student_in, op);
  TORCH_CHECK(student_in[0].device().is_cpu(), op, ": maps must be CPU tensors here, got ",
              student_in[0].device().str());
  const auto teacher = contiguous(teacher_in), student = contiguous(student_in);
  const int64_t M = static_cast<int64_t>(student.size()), B = student[0].size(0);
  const auto acc = student[0].options().dtype(acc_type(student[0].scalar_type()));
  Tensor stats = at::empty({M, B, 3}, acc);
  Tensor loss = at::empty({}, acc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student[0].scalar_type(), "cosine_distill_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* st = stats.mutable_data_ptr<acc_t>();
    at::parallel_for(0, M * B, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t j = i / B, b = i % B, D = student[j].numel() / B;
        const scalar_t* t = teacher[j].const_data_ptr<scalar_t>() + b * D;
        const scalar_t* s = student[j].const_data_ptr<scalar_t>() + b * D;
        row_stats(t, s, D, st + 3 * i);
      }
    });
    acc_t total = 0;
    for (int64_t j = 0; j < M; ++j) {
      acc_t per_map = 0, n;
      for (int64_t b = 0; b < B; ++b) per_map += acc_t(1) - cosine(st + 3 * (j * B + b), &n);
      total += per_map / static_cast<acc_t>(B);
    }
    loss.fill_(static_cast<acc_t>(scale) * total);
  });
  return {loss, stats};
}

std::vector<Tensor> cosine_distill_backward_cpu(const Tensor& grad, at::TensorList teacher_in,
                                                at::TensorList student_in, const Tensor& stats_in, double scale) {
  constexpr const char* op = "askd::cosine_distill_backward";
  check_distill_maps(teacher_in, student_in, op);
  TORCH_CHECK(student_in[0].device().is_cpu(), op, ": maps must be CPU tensors here, got ",
              student_in[0].device().str());
  const auto teacher = contiguous(teacher_in), student = contiguous(student_in);
  const int64_t M = static_cast<int64_t>(student.size()), B = student[0].size(0);
  const auto acc_dtype = acc_type(student[0].scalar_type());
  check_shape(stats_in, {M, B, 3}, op, "stats");
  check_dtype(stats_in, acc_dtype, op, "stats");
  TORCH_CHECK(grad.numel() == 1, op, ": grad must hold one value (the loss is a scalar), got shape ",
              shape_str(grad.sizes()));
  const Tensor stats = stats_in.contiguous();
  const double g = grad.item<double>();
  std::vector<Tensor> out;
  out.reserve(M);
  for (const auto& s : student) out.push_back(at::empty_like(s));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student[0].scalar_type(), "cosine_distill_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* st = stats.const_data_ptr<acc_t>();
    const acc_t coef = static_cast<acc_t>(-g * scale / static_cast<double>(B));
    at::parallel_for(0, M * B, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t j = i / B, b = i % B, D = student[j].numel() / B;
        const scalar_t* t = teacher[j].const_data_ptr<scalar_t>() + b * D;
        const scalar_t* s = student[j].const_data_ptr<scalar_t>() + b * D;
        scalar_t* ds = out[j].mutable_data_ptr<scalar_t>() + b * D;
        acc_t n;
        cosine(st + 3 * i, &n);
        // d cos / d s = t/n - dot/(n |s|^2) s above the clamp, t/eps below it (the clamp has no gradient)
        const bool big = n > static_cast<acc_t>(kEps);
        const acc_t ct = coef / (big ? n : static_cast<acc_t>(kEps));
        const acc_t cs = big ? -coef * st[3 * i] / (n * st[3 * i + 2]) : acc_t(0);
        row_grad(t, s, ds, D, ct, cs);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace askd

TORCH_LIBRARY_IMPL(askd, CPU, m) {
  m.impl("cosine_distill_forward", &askd::cosine_distill_forward_cpu);
  m.impl("cosine_distill_backward", &askd::cosine_distill_backward_cpu);
}
