// CUDA kernels of askd::cosine_distill_forward and askd::cosine_distill_backward. The contract is written out in
// PyTorch in askd/ops/cosine_distill.py: map j of M maps is B rows of D_j values; per (j, b) the statistics
// (dot(t,s), |t|^2, |s|^2) in acc, cos = dot / max(|t||s|, 1e-8), loss = weight * sum_j mean_b (1 - cos).
//
// All maps go in one launch (the multi-tensor-apply pattern): a table of {teacher, student, grad, D} per map,
// passed by value as a kernel argument when it fits (up to kArgMaps maps, under the 4 KiB parameter limit), else
// copied to the device with one non-blocking H2D copy from pinned memory on the current stream. Maps are never
// concatenated. Every sum runs in a fixed order (no atomics), so results are reproducible run to run.

#define ASKD_MINIMAL_ATEN
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "reduce.cuh"

namespace askd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kArgMaps = 96;  // 96 * 32 bytes = 3 KiB of table in the kernel's parameters
constexpr int kMaxMaps = 65535;  // maps run over gridDim.y

// One map pair: teacher and student rows (B rows of d values each, contiguous), and the student gradient
// (backward only).
struct MapEntry {
  const void* t;
  const void* s;
  void* ds;
  int64_t d;
};

// the table passed by value in the kernel's parameter space
struct ArgTable {
  MapEntry e[kArgMaps];
  __device__ __forceinline__ const MapEntry& operator[](int64_t j) const { return e[j]; }
};

// the table in device memory, for more than kArgMaps maps
struct PtrTable {
  const MapEntry* e;
  __device__ __forceinline__ const MapEntry& operator[](int64_t j) const { return e[j]; }
};

template <typename acc_t>
__device__ __forceinline__ acc_t eps() {
  return static_cast<acc_t>(1e-8);
}

// Grid (B, M), 256 threads: block (b, j) reduces row b of map j to (dot, |t|^2, |s|^2) in acc (each thread a
// strided share, then a fixed-order block sum) and writes stats[j, b, :].
template <typename scalar_t, typename acc_t, typename Table>
__global__ void __launch_bounds__(kThreads) distill_stats_kernel(const Table table, int64_t B, acc_t* stats) {
  const int64_t b = blockIdx.x, j = blockIdx.y;
  const MapEntry e = table[j];
  const scalar_t* t = static_cast<const scalar_t*>(e.t) + b * e.d;
  const scalar_t* s = static_cast<const scalar_t*>(e.s) + b * e.d;
  acc_t v[3] = {acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t i = threadIdx.x; i < e.d; i += kThreads) {
    const acc_t tv = static_cast<acc_t>(t[i]), sv = static_cast<acc_t>(s[i]);
    v[0] += tv * sv;
    v[1] += tv * tv;
    v[2] += sv * sv;
  }
  block_sum<kThreads>(v);
  if (threadIdx.x == 0) {
    acc_t* out = stats + (j * B + b) * 3;
    out[0] = v[0];
    out[1] = v[1];
    out[2] = v[2];
  }
}

// One block of 256 threads: loss = weight * (sum_{j,b} (1 - cos[j,b])) / B from the (M*B, 3) statistics, a
// fixed-order sum (deterministic). Equals weight * sum_j mean_b (1 - cos) since every map has the same B.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    distill_loss_kernel(const acc_t* stats, int64_t rows, int64_t B, double weight, acc_t* loss) {
  acc_t v[1] = {acc_t(0)};
  for (int64_t r = threadIdx.x; r < rows; r += kThreads) {
    const acc_t* st = stats + r * 3;
    const acc_t n = dev_sqrt(st[1]) * dev_sqrt(st[2]);
    v[0] += acc_t(1) - st[0] / clamp_min(n, eps<acc_t>());
  }
  block_sum<kThreads>(v);
  if (threadIdx.x == 0) *loss = static_cast<acc_t>(weight) * (v[0] / static_cast<acc_t>(B));
}

// Grid (B, M), 256 threads: block (b, j) writes row b of d student j, elementwise in acc:
//   n = |t||s| > eps or NaN:  ds = -grad*weight/B * (t / n - dot / (n |s|^2) * s)
//   otherwise:                ds = -grad*weight/B * t / eps
template <typename scalar_t, typename acc_t, typename Table>
__global__ void __launch_bounds__(kThreads)
    distill_grad_kernel(const Table table, int64_t B, const acc_t* stats, const acc_t* grad, double weight) {
  const int64_t b = blockIdx.x, j = blockIdx.y;
  const MapEntry e = table[j];
  const scalar_t* t = static_cast<const scalar_t*>(e.t) + b * e.d;
  const scalar_t* s = static_cast<const scalar_t*>(e.s) + b * e.d;
  scalar_t* ds = static_cast<scalar_t*>(e.ds) + b * e.d;
  const acc_t* st = stats + (j * B + b) * 3;
  const acc_t dot = st[0], ss = st[2];
  const acc_t n = dev_sqrt(st[1]) * dev_sqrt(ss);
  const acc_t coef = -grad[0] * static_cast<acc_t>(weight) / static_cast<acc_t>(B);
  // a NaN n (a NaN anywhere in the row) takes the first branch: the whole row's gradient is NaN, as in PyTorch
  const bool big = !(n <= eps<acc_t>());
  // n > eps makes |s| > 0: no clamp on n |s|^2 (one at eps was wrong for a small |s|, n |s|^2 < eps)
  const acc_t ratio = big ? dot / (n * ss) : acc_t(0);
  for (int64_t i = threadIdx.x; i < e.d; i += kThreads) {
    const acc_t tv = static_cast<acc_t>(t[i]);
    const acc_t dcos = big ? tv / n - ratio * static_cast<acc_t>(s[i]) : tv / eps<acc_t>();
    ds[i] = static_cast<scalar_t>(coef * dcos);
  }
}

// Calls launch(table) with the map table as a kernel argument (ArgTable) when it fits, else as a device copy
// (PtrTable) made by one non-blocking H2D copy from pinned memory on the current stream. The caching host
// allocator keeps the pinned block until that copy has run; the device copy lives until the kernel is enqueued,
// and the caching device allocator reuses it only for later work on the same stream.
template <typename Launch>
void with_table(const std::vector<MapEntry>& entries, const at::Device& device, const Launch& launch) {
  if (entries.size() <= static_cast<size_t>(kArgMaps)) {
    ArgTable table{};
    std::copy(entries.begin(), entries.end(), table.e);
    launch(table);
    return;
  }
  const auto bytes = static_cast<int64_t>(entries.size() * sizeof(MapEntry));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), entries.data(), static_cast<size_t>(bytes));
  const at::Tensor dev = host.to(device, /*non_blocking=*/true);
  launch(PtrTable{static_cast<const MapEntry*>(dev.data_ptr())});
}

// teacher and student, contiguous (copies only where a map is not), with the table entries
std::vector<MapEntry> table_of(const std::vector<at::Tensor>& ts, const std::vector<at::Tensor>& ss, int64_t B,
                               const std::vector<at::Tensor>* grads) {
  std::vector<MapEntry> entries(ts.size());
  for (size_t j = 0; j < ts.size(); ++j) {
    entries[j] = {ts[j].data_ptr(), ss[j].data_ptr(), grads ? (*grads)[j].data_ptr() : nullptr, ss[j].numel() / B};
  }
  return entries;
}

std::vector<at::Tensor> contiguous(at::TensorList maps) {
  std::vector<at::Tensor> out;
  out.reserve(maps.size());
  for (const auto& m : maps) out.push_back(m.contiguous());
  return out;
}

void check_cuda_maps(at::TensorList teacher, at::TensorList student, const char* op) {
  check_distill_maps(teacher, student, op);
  TORCH_CHECK(student[0].is_cuda(), op, ": maps must be CUDA tensors, got ones on ", student[0].device().str());
  TORCH_CHECK(static_cast<int64_t>(student.size()) <= kMaxMaps, op, ": at most ", kMaxMaps, " maps, got ",
              student.size());
  TORCH_CHECK(student[0].size(0) <= std::numeric_limits<int>::max(), op, ": batch too large for the grid, got ",
              student[0].size(0));
}

std::tuple<at::Tensor, at::Tensor> cosine_distill_forward_cuda(at::TensorList teacher, at::TensorList student,
                                                               double weight) {
  constexpr const char* op = "askd::cosine_distill_forward";
  check_cuda_maps(teacher, student, op);
  const c10::cuda::CUDAGuard guard(student[0].device());
  const auto M = static_cast<int64_t>(student.size()), B = student[0].size(0);
  const auto dtype = student[0].scalar_type();
  const auto opts = student[0].options().dtype(acc_type(dtype));
  at::Tensor stats = at::empty({M, B, 3}, opts);
  at::Tensor loss = at::empty({}, opts);
  const std::vector<at::Tensor> ts = contiguous(teacher), ss = contiguous(student);
  const std::vector<MapEntry> entries = table_of(ts, ss, B, nullptr);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "askd_cosine_distill_forward", [&] {
    using acc_t = acc_of<scalar_t>;
    with_table(entries, student[0].device(), [&](const auto& table) {
      using Table = std::decay_t<decltype(table)>;
      distill_stats_kernel<scalar_t, acc_t, Table>
          <<<dim3(static_cast<unsigned>(B), static_cast<unsigned>(M)), kThreads, 0, stream>>>(table, B,
                                                                                             stats.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    distill_loss_kernel<acc_t><<<1, kThreads, 0, stream>>>(stats.data_ptr<acc_t>(), M * B, B, weight,
                                                           loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats};
}

std::vector<at::Tensor> cosine_distill_backward_cuda(const at::Tensor& grad_in, at::TensorList teacher,
                                                     at::TensorList student, const at::Tensor& stats_in,
                                                     double weight) {
  constexpr const char* op = "askd::cosine_distill_backward";
  check_cuda_maps(teacher, student, op);
  const auto M = static_cast<int64_t>(student.size()), B = student[0].size(0);
  const auto dtype = student[0].scalar_type();
  const auto acc = acc_type(dtype);
  TORCH_CHECK(grad_in.numel() == 1, op, ": grad must hold one value (the loss's gradient), got shape ",
              shape_str(grad_in.sizes()));
  check_shape(stats_in, {M, B, 3}, op, "stats");
  check_dtype(stats_in, acc, op, "stats");
  TORCH_CHECK(stats_in.device() == student[0].device(), op, ": stats is on ", stats_in.device().str(),
              " but the maps are on ", student[0].device().str());
  const c10::cuda::CUDAGuard guard(student[0].device());
  const std::vector<at::Tensor> ts = contiguous(teacher), ss = contiguous(student);
  std::vector<at::Tensor> grads;
  grads.reserve(ss.size());
  for (const auto& s : ss) grads.push_back(at::empty_like(s));
  const at::Tensor grad = grad_in.to(student[0].device(), acc).reshape({1}).contiguous();
  const at::Tensor stats = stats_in.contiguous();
  const std::vector<MapEntry> entries = table_of(ts, ss, B, &grads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "askd_cosine_distill_backward", [&] {
    using acc_t = acc_of<scalar_t>;
    with_table(entries, student[0].device(), [&](const auto& table) {
      using Table = std::decay_t<decltype(table)>;
      distill_grad_kernel<scalar_t, acc_t, Table>
          <<<dim3(static_cast<unsigned>(B), static_cast<unsigned>(M)), kThreads, 0, stream>>>(
              table, B, stats.data_ptr<acc_t>(), grad.data_ptr<acc_t>(), weight);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grads;
}

}  // namespace
}  // namespace askd::cuda

TORCH_LIBRARY_IMPL(askd, CUDA, m) {
  m.impl("cosine_distill_forward", &askd::cuda::cosine_distill_forward_cuda);
  m.impl("cosine_distill_backward", &askd::cuda::cosine_distill_backward_cuda);
}
