// The A-SKD loss over all maps on the CPU, one op call per direction (the contract: askd/ops/cosine_distill.py).
//
// Tasks are (map, sample) rows, run in parallel; each row's dot(t,s), |t|^2, |s|^2 is an `omp simd`
// reduction in acc (float, double for double). The loss is then summed over the stats in a fixed order, so
// it does not depend on the thread count. Backward writes each student row once; forward_grad writes it in
// the forward pass instead, right after the row's statistics. No map is copied unless it is not contiguous.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "simd.h"

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

// cos and the norm product n = |t||s| of one stats row (dot, |t|^2, |s|^2); the clamp keeps a NaN n, as
// torch.clamp_min does
template <typename acc_t>
inline acc_t cosine(const acc_t* st, acc_t* n) {
  *n = std::sqrt(st[1]) * std::sqrt(st[2]);
  const acc_t eps = static_cast<acc_t>(kEps);
  return st[0] / (*n < eps ? eps : *n);
}

// (dot(t,s), |t|^2, |s|^2) of one row of D values
template <typename scalar_t, typename acc_t>
ASKD_CPU_CLONES void row_stats(const scalar_t* t, const scalar_t* s, int64_t D, acc_t* out) {
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
ASKD_CPU_CLONES void row_grad(const scalar_t* t, const scalar_t* s, scalar_t* ds, int64_t D, acc_t ct, acc_t cs) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d)
    ds[d] = static_cast<scalar_t>(ct * static_cast<acc_t>(t[d]) + cs * static_cast<acc_t>(s[d]));
}

// d loss / d s of row i for upstream gradient g: ds = ct * t + cs * s
template <typename acc_t>
inline void grad_coefficients(const acc_t* st, double g, double weight, int64_t B, acc_t* ct, acc_t* cs) {
  const acc_t coef = static_cast<acc_t>(-g * weight / static_cast<double>(B));
  acc_t n;
  cosine(st, &n);
  // d cos / d s = t/n - dot/(n |s|^2) s above the clamp, t/eps below it (the clamp has no gradient). A NaN n
  // (a NaN anywhere in the row) takes the first branch, so the whole row's gradient is NaN, as in PyTorch
  const bool big = !(n <= static_cast<acc_t>(kEps));
  *ct = coef / (big ? n : static_cast<acc_t>(kEps));
  *cs = big ? -coef * st[0] / (n * st[2]) : acc_t(0);
}

// weight * sum_j mean_b (1 - cos), summed in a fixed order
template <typename acc_t>
acc_t loss_from_stats(const acc_t* st, int64_t M, int64_t B, double weight) {
  acc_t total = 0;
  for (int64_t j = 0; j < M; ++j) {
    acc_t per_map = 0, n;
    for (int64_t b = 0; b < B; ++b) per_map += acc_t(1) - cosine(st + 3 * (j * B + b), &n);
    total += per_map / static_cast<acc_t>(B);
  }
  return static_cast<acc_t>(weight) * total;
}

// Forward over all (map, sample) rows; with `grads` non-empty, each row's gradient is written right after its
// statistics, while the row is still in cache.
std::tuple<Tensor, Tensor> forward_rows(const std::vector<Tensor>& teacher, const std::vector<Tensor>& student,
                                        double weight, std::vector<Tensor>& grads) {
  const int64_t M = static_cast<int64_t>(student.size()), B = student[0].size(0);
  const auto acc = student[0].options().dtype(acc_type(student[0].scalar_type()));
  Tensor stats = at::empty({M, B, 3}, acc);
  Tensor loss = at::empty({}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student[0].scalar_type(), "cosine_distill_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* st = stats.mutable_data_ptr<acc_t>();
    at::parallel_for(0, M * B, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        // sample-major task order: a thread's contiguous range then spans every map, so the big stage-1 maps
        // do not all land on one thread
        const int64_t b = i / M, j = i % M, r = j * B + b, D = student[j].numel() / B;
        const scalar_t* t = teacher[j].const_data_ptr<scalar_t>() + b * D;
        const scalar_t* s = student[j].const_data_ptr<scalar_t>() + b * D;
        row_stats(t, s, D, st + 3 * r);
        if (!grads.empty()) {
          acc_t ct, cs;
          grad_coefficients(st + 3 * r, 1.0, weight, B, &ct, &cs);
          row_grad(t, s, grads[j].mutable_data_ptr<scalar_t>() + b * D, D, ct, cs);
        }
      }
    });
    loss.fill_(loss_from_stats(st, M, B, weight));
  });
  return {loss, stats};
}

std::tuple<Tensor, Tensor> cosine_distill_forward_cpu(at::TensorList teacher_in, at::TensorList student_in,
                                                      double weight) {
  constexpr const char* op = "askd::cosine_distill_forward";
  check_distill_maps(teacher_in, student_in, op);
  TORCH_CHECK(student_in[0].device().is_cpu(), op, ": maps must be CPU tensors here, got ",
              student_in[0].device().str());
  std::vector<Tensor> no_grads;
  return forward_rows(contiguous(teacher_in), contiguous(student_in), weight, no_grads);
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> cosine_distill_forward_grad_cpu(at::TensorList teacher_in,
                                                                               at::TensorList student_in,
                                                                               double weight) {
  constexpr const char* op = "askd::cosine_distill_forward_grad";
  check_distill_maps(teacher_in, student_in, op);
  TORCH_CHECK(student_in[0].device().is_cpu(), op, ": maps must be CPU tensors here, got ",
              student_in[0].device().str());
  const auto student = contiguous(student_in);
  std::vector<Tensor> grads;
  grads.reserve(student.size());
  for (const auto& s : student) grads.push_back(at::empty_like(s));
  auto [loss, stats] = forward_rows(contiguous(teacher_in), student, weight, grads);
  return {loss, stats, grads};
}

std::vector<Tensor> cosine_distill_backward_cpu(const Tensor& grad, at::TensorList teacher_in,
                                                at::TensorList student_in, const Tensor& stats_in, double weight) {
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
    at::parallel_for(0, M * B, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        // sample-major task order: a thread's contiguous range then spans every map, so the big stage-1 maps
        // do not all land on one thread
        const int64_t b = i / M, j = i % M, r = j * B + b, D = student[j].numel() / B;
        const scalar_t* t = teacher[j].const_data_ptr<scalar_t>() + b * D;
        const scalar_t* s = student[j].const_data_ptr<scalar_t>() + b * D;
        scalar_t* ds = out[j].mutable_data_ptr<scalar_t>() + b * D;
        acc_t ct, cs;
        grad_coefficients(st + 3 * r, g, weight, B, &ct, &cs);
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
  m.impl("cosine_distill_forward_grad", &askd::cosine_distill_forward_grad_cpu);
}
