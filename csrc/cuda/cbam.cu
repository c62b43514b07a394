// CUDA kernels of askd::cbam_forward and askd::cbam_backward. The contract (every output, the gradient
// formulas) is written out in PyTorch in askd/ops/cbam.py; DESIGN.md section 4 describes the passes.
//
// x is NCHW- or channels_last-contiguous; P = H*W. Every reduction runs in one of two shapes:
//  * rows:    the reduced index is contiguous in memory (NCHW over P, NHWC over C): a warp or a block per row;
//  * columns: the reduced index is strided and the kept index contiguous (NHWC over P, NCHW over C): each
//             thread owns one kept index and walks the reduced one, so a warp's loads are coalesced.
// Maps, gates and statistics are acc (float, or double for double x); x*g_c is recomputed, never stored.
// Reductions use fixed orders (no atomics), so results are reproducible run to run.

#define ASKD_MINIMAL_ATEN
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/le.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../checks.h"
#include "reduce.cuh"

namespace askd::cuda {
namespace {

constexpr int kThreads = 256;  // 1-D blocks
constexpr int kColY = 16;      // column kernel: blockDim (32, kColY)

// ---------------------------------------------------------------------------------------------------------
// (sum, max, argmax) reductions

// A running reduction: the sum, and (when kArg) the max and its first index. NaN ranks above everything,
// as in torch.max; ties go to the smaller index.
template <typename acc_t>
struct Stat {
  acc_t sum;
  acc_t max;
  int idx;
};

template <typename acc_t>
__device__ __forceinline__ Stat<acc_t> stat_init() {
  return {acc_t(0), -std::numeric_limits<acc_t>::infinity(), std::numeric_limits<int>::max()};
}

// does (v, i) replace the running (m, mi) as max?
template <typename acc_t>
__device__ __forceinline__ bool beats(acc_t v, int i, acc_t m, int mi) {
  const bool v_nan = v != v, m_nan = m != m;
  if (v_nan || m_nan) return v_nan && (!m_nan || i < mi);
  return v > m || (v == m && i < mi);
}

template <bool kArg, typename acc_t>
__device__ __forceinline__ void merge(Stat<acc_t>& s, acc_t sum, acc_t mx, int idx) {
  s.sum += sum;
  if constexpr (kArg) {
    if (beats(mx, idx, s.max, s.idx)) {
      s.max = mx;
      s.idx = idx;
    }
  }
}

// tree over the 32 lanes; lane 0 ends with the warp's result
template <bool kArg, typename acc_t>
__device__ __forceinline__ void warp_merge(Stat<acc_t>& s) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const acc_t sum = __shfl_down_sync(kFullMask, s.sum, off);
    acc_t mx = s.max;
    int idx = s.idx;
    if constexpr (kArg) {
      mx = __shfl_down_sync(kFullMask, s.max, off);
      idx = __shfl_down_sync(kFullMask, s.idx, off);
    }
    merge<kArg>(s, sum, mx, idx);
  }
}

// Rows: row r = (b, n) of N kept indices per sample holds L contiguous elements at r*L. kTPR threads per row:
// a warp (8 rows per 256-thread block) for short rows, the whole block for long ones. Grid: ceil(B*N / rows per
// block) blocks of 256 threads. Each thread walks i = lane, lane + kTPR, ...; then a warp tree, then (block per
// row) a shared-memory step over the 8 warps.
template <int kTPR, bool kArg, typename acc_t, typename Load, typename Store>
__global__ void __launch_bounds__(kThreads)
    row_reduce_kernel(int64_t rows, int64_t N, int64_t L, Load load, Store store) {
  static_assert(kTPR == kWarp || kTPR == kThreads, "a warp or a block per row");
  constexpr int kRowsPerBlock = kThreads / kTPR;
  const int lane = threadIdx.x % kTPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kTPR;
  const int64_t b = row / N, n = row % N;
  Stat<acc_t> s = stat_init<acc_t>();
  if (row < rows) {
    const int64_t base = row * L;
    for (int64_t i = lane; i < L; i += kTPR) {
      const acc_t v = load(base + i, b, i, n);
      merge<kArg>(s, v, v, static_cast<int>(i));
    }
  }
  warp_merge<kArg>(s);
  if constexpr (kTPR == kThreads) {
    constexpr int kWarps = kThreads / kWarp;
    __shared__ acc_t part_sum[kWarps], part_max[kWarps];
    __shared__ int part_idx[kWarps];
    const int warp = threadIdx.x / kWarp;
    if (threadIdx.x % kWarp == 0) {
      part_sum[warp] = s.sum;
      part_max[warp] = s.max;
      part_idx[warp] = s.idx;
    }
    __syncthreads();
    if (warp == 0) {
      s = stat_init<acc_t>();
      if (lane < kWarps) {
        s.sum = part_sum[lane];
        s.max = part_max[lane];
        s.idx = part_idx[lane];
      }
      warp_merge<kArg>(s);
    }
  }
  if (lane == 0 && row < rows) store(b, n, s);
}

// Columns: sample b is an (L, N) matrix at b*L*N; column n is reduced over i. Block (32, kColY): threadIdx.x owns
// column n (32 consecutive n: coalesced loads), threadIdx.y walks i = y, y + kColY, ...; thread y = 0 then merges
// the kColY partials in order. Grid: (ceil(N/32), min(B, 65535)), samples grid-strided over blockIdx.y.
template <bool kArg, typename acc_t, typename Load, typename Store>
__global__ void __launch_bounds__(kWarp* kColY)
    col_reduce_kernel(int64_t B, int64_t N, int64_t L, Load load, Store store) {
  __shared__ acc_t part_sum[kColY][kWarp], part_max[kColY][kWarp];
  __shared__ int part_idx[kColY][kWarp];
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    Stat<acc_t> s = stat_init<acc_t>();
    if (n < N) {
      for (int64_t i = threadIdx.y; i < L; i += kColY) {
        const acc_t v = load((b * L + i) * N + n, b, i, n);
        merge<kArg>(s, v, v, static_cast<int>(i));
      }
    }
    part_sum[threadIdx.y][threadIdx.x] = s.sum;
    part_max[threadIdx.y][threadIdx.x] = s.max;
    part_idx[threadIdx.y][threadIdx.x] = s.idx;
    __syncthreads();
    if (threadIdx.y == 0 && n < N) {
      for (int y = 1; y < kColY; ++y) {
        merge<kArg>(s, part_sum[y][threadIdx.x], part_max[y][threadIdx.x], part_idx[y][threadIdx.x]);
      }
      store(b, n, s);
    }
    __syncthreads();
  }
}

// Loads: the value of one element, given its flat offset, sample b, reduced index i and kept index n.

// pass 1: x itself
template <typename scalar_t, typename acc_t>
struct LoadX {
  const scalar_t* x;
  __device__ __forceinline__ acc_t operator()(int64_t off, int64_t, int64_t, int64_t) const {
    return static_cast<acc_t>(x[off]);
  }
};

// pass 3: x * g_c, reduced over c = i (L = C)
template <typename scalar_t, typename acc_t>
struct LoadXGate {
  const scalar_t* x;
  const acc_t* gc;  // (B, C)
  int64_t C;
  __device__ __forceinline__ acc_t operator()(int64_t off, int64_t b, int64_t i, int64_t) const {
    return static_cast<acc_t>(x[off]) * gc[b * C + i];
  }
};

// B1: dy * x * g_c, reduced over c = i (L = C)
template <typename scalar_t, typename acc_t>
struct LoadDyXGate {
  const scalar_t* dy;
  const scalar_t* x;
  const acc_t* gc;  // (B, C)
  int64_t C;
  __device__ __forceinline__ acc_t operator()(int64_t off, int64_t b, int64_t i, int64_t) const {
    return static_cast<acc_t>(dy[off]) * static_cast<acc_t>(x[off]) * gc[b * C + i];
  }
};

// B2: dxc * x with dxc = dy*g_s + dpooled0/C + [c == idx_s]*dpooled1, reduced over p = i (L = P), kept c = n
template <typename scalar_t, typename acc_t>
struct LoadDxcX {
  const scalar_t* dy;
  const scalar_t* x;
  const acc_t* gs;       // (B, P)
  const acc_t* dpooled;  // (B, 2, P)
  const int* idx_s;      // (B, P)
  int64_t C, P;
  __device__ __forceinline__ acc_t operator()(int64_t off, int64_t b, int64_t i, int64_t n) const {
    const int64_t bp = b * P + i;
    const acc_t* dp = dpooled + b * 2 * P;
    acc_t dxc = static_cast<acc_t>(dy[off]) * gs[bp] + dp[i] / static_cast<acc_t>(C);
    if (idx_s[bp] == n) dxc += dp[P + i];
    return dxc * static_cast<acc_t>(x[off]);
  }
};

// passes 1 and 3: mean and max into out (B, 2, N), argmax into idx (B, N)
template <typename acc_t>
struct StorePool {
  acc_t* out;
  int* idx;
  int64_t N, L;
  __device__ __forceinline__ void operator()(int64_t b, int64_t n, const Stat<acc_t>& s) const {
    out[b * 2 * N + n] = s.sum / static_cast<acc_t>(L);
    out[b * 2 * N + N + n] = s.max;
    idx[b * N + n] = s.idx;
  }
};

// B1 and B2: the gate's pre-activation gradient, ga = da + sum * g * (1 - g), all (B, N)
template <typename acc_t>
struct StoreGateGrad {
  acc_t* ga;
  const acc_t* da;
  const acc_t* g;
  int64_t N;
  __device__ __forceinline__ void operator()(int64_t b, int64_t n, const Stat<acc_t>& s) const {
    const int64_t at = b * N + n;
    ga[at] = da[at] + s.sum * g[at] * (acc_t(1) - g[at]);
  }
};


// Runs one reduction: `rows` when the reduced index is contiguous in memory, else `columns`. B samples, N kept
// indices per sample, L reduced elements each. Row kernel: a warp per row below 1024 elements, else a block.
template <bool kArg, typename acc_t, typename Load, typename Store>
void launch_reduce(bool rows, int64_t B, int64_t N, int64_t L, const Load& load, const Store& store,
                   cudaStream_t stream) {
  if (rows) {
    const int64_t n_rows = B * N;
    if (L >= 1024) {
      row_reduce_kernel<kThreads, kArg, acc_t>
          <<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(n_rows, N, L, load, store);
    } else {
      constexpr int kRowsPerBlock = kThreads / kWarp;
      const auto blocks = static_cast<unsigned>((n_rows + kRowsPerBlock - 1) / kRowsPerBlock);
      row_reduce_kernel<kWarp, kArg, acc_t><<<blocks, kThreads, 0, stream>>>(n_rows, N, L, load, store);
    }
  } else {
    const dim3 block(kWarp, kColY);
    const dim3 grid(static_cast<unsigned>((N + kWarp - 1) / kWarp), static_cast<unsigned>(B < 65535 ? B : 65535));
    col_reduce_kernel<kArg, acc_t><<<grid, block, 0, stream>>>(B, N, L, load, store);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------------
// the k x k spatial conv on (B, 2, H, W), zero padding k/2: tiny, direct, exact in acc and deterministic

// a_s[b, h, w] = sum_{ci, kh, kw} ws[ci, kh, kw] * pooled[b, ci, h + kh - k/2, w + kw - k/2].
// Grid-stride over the B*P outputs, one per thread, 2*k*k multiply-adds each.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    spatial_conv_kernel(const acc_t* pooled, const acc_t* ws, acc_t* out, int64_t B, int64_t H, int64_t W, int k) {
  const int64_t P = H * W, total = B * P;
  const int pad = k / 2;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = o / P, p = o % P, h = p / W, w = p % W;
    acc_t sum = 0;
    for (int ci = 0; ci < 2; ++ci) {
      const acc_t* in = pooled + (b * 2 + ci) * P;
      for (int kh = 0; kh < k; ++kh) {
        const int64_t ih = h + kh - pad;
        if (ih < 0 || ih >= H) continue;
        for (int kw = 0; kw < k; ++kw) {
          const int64_t iw = w + kw - pad;
          if (iw >= 0 && iw < W) sum += ws[(ci * k + kh) * k + kw] * in[ih * W + iw];
        }
      }
    }
    out[o] = sum;
  }
}

// dpooled[b, ci, h, w] = sum_{kh, kw} ws[ci, kh, kw] * ga_s[b, h - kh + k/2, w - kw + k/2] (the conv's input
// gradient). Grid-stride over the B*2*P outputs, one per thread.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    spatial_conv_input_grad_kernel(const acc_t* ga, const acc_t* ws, acc_t* dpooled, int64_t B, int64_t H, int64_t W,
                                   int k) {
  const int64_t P = H * W, total = B * 2 * P;
  const int pad = k / 2;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t bc = o / P, p = o % P, h = p / W, w = p % W;
    const int64_t b = bc / 2;
    const int ci = static_cast<int>(bc % 2);
    const acc_t* g = ga + b * P;
    acc_t sum = 0;
    for (int kh = 0; kh < k; ++kh) {
      const int64_t oh = h - kh + pad;
      if (oh < 0 || oh >= H) continue;
      for (int kw = 0; kw < k; ++kw) {
        const int64_t ow = w - kw + pad;
        if (ow >= 0 && ow < W) sum += ws[(ci * k + kh) * k + kw] * g[oh * W + ow];
      }
    }
    dpooled[o] = sum;
  }
}

// dws[ci, kh, kw] = sum_{b, h, w} ga_s[b, h, w] * pooled[b, ci, h + kh - k/2, w + kw - k/2]. Grid: one 256-thread
// block per weight (2*k*k blocks), each thread a strided share of the B*P terms, then a fixed-order block sum.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    spatial_conv_weight_grad_kernel(const acc_t* ga, const acc_t* pooled, acc_t* dws, int64_t B, int64_t H, int64_t W,
                                    int k) {
  const int64_t P = H * W, total = B * P;
  const int pad = k / 2;
  const int q = blockIdx.x, ci = q / (k * k), kh = (q / k) % k, kw = q % k;
  acc_t sum[1] = {acc_t(0)};
  for (int64_t o = threadIdx.x; o < total; o += kThreads) {
    const int64_t b = o / P, p = o % P, h = p / W + kh - pad, w = p % W + kw - pad;
    if (h >= 0 && h < H && w >= 0 && w < W) sum[0] += ga[o] * pooled[(b * 2 + ci) * P + h * W + w];
  }
  block_sum<kThreads>(sum);
  if (threadIdx.x == 0) dws[q] = sum[0];
}

// ---------------------------------------------------------------------------------------------------------
// elementwise passes over x's layout: a flat index i splits into (b, c, p) by the layout

template <bool kChannelsLast>
__device__ __forceinline__ void split_index(int64_t i, int64_t C, int64_t P, int64_t& bc, int64_t& bp, int64_t& c,
                                            int64_t& p) {
  if constexpr (kChannelsLast) {
    c = i % C;
    bp = i / C;
    p = bp % P;
    bc = (bp / P) * C + c;
  } else {
    p = i % P;
    bc = i / P;
    c = bc % C;
    bp = (bc / C) * P + p;
  }
}

// pass 5: y = (x * g_c) * g_s. Grid-stride over numel, one element per thread per step; acc math, one store.
template <bool kChannelsLast, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    apply_gates_kernel(const scalar_t* x, const acc_t* gc, const acc_t* gs, scalar_t* y, int64_t numel, int64_t C,
                       int64_t P) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t bc, bp, c, p;
    split_index<kChannelsLast>(i, C, P, bc, bp, c, p);
    y[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * gc[bc] * gs[bp]);
  }
}

// B3: dx = dxc * g_c + dchan0 / P + [p == idx_c] * dchan1, with
// dxc = dy * g_s + dpooled0 / C + [c == idx_s] * dpooled1 recomputed. Grid-stride over numel; dx written once.
template <bool kChannelsLast, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    input_grad_kernel(const scalar_t* dy, const acc_t* gc, const acc_t* gs, const acc_t* dpooled,
                      const int* idx_s, const acc_t* dchan, const int* idx_c, scalar_t* dx, int64_t numel, int64_t C,
                      int64_t P) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t bc, bp, c, p;
    split_index<kChannelsLast>(i, C, P, bc, bp, c, p);
    const int64_t b = bp / P;
    const acc_t* dp = dpooled + b * 2 * P;
    acc_t dxc = static_cast<acc_t>(dy[i]) * gs[bp] + dp[p] / static_cast<acc_t>(C);
    if (idx_s[bp] == c) dxc += dp[P + p];
    const acc_t* dch = dchan + b * 2 * C;
    acc_t g = dxc * gc[bc] + dch[c] / static_cast<acc_t>(P);
    if (idx_c[bc] == p) g += dch[C + c];
    dx[i] = static_cast<scalar_t>(g);
  }
}

// ---------------------------------------------------------------------------------------------------------
// host side

bool is_channels_last(const at::Tensor& x) {
  // as askd.ops.cbam.memory_format: channels_last only when not also plain contiguous
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

void check_sizes(const at::Tensor& x, const char* op) {
  const int64_t C = x.size(1), P = x.size(2) * x.size(3);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(C <= kIntMax && P <= kIntMax && x.size(0) * std::max(C, P) <= kIntMax, op,
              ": sizes too large for 32-bit indices and grids, got x of shape ", shape_str(x.sizes()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cbam_forward_cuda(
    const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& ws) {
  constexpr const char* op = "askd::cbam_forward";
  check_cbam_inputs(x_in, w1, w2, ws, op);
  TORCH_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x_in.device().str());
  check_sizes(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = is_channels_last(x_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W;
  const int k = static_cast<int>(ws.size(2));
  const auto acc = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  const at::Tensor w1f = w1.to(acc).contiguous(), w2f = w2.to(acc).contiguous(), wsf = ws.to(acc).contiguous();

  at::Tensor y = at::empty_like(x, x.options(), fmt);
  at::Tensor chan = at::empty({B, 2, C}, opts), idx_c = at::empty({B, C}, opts.dtype(at::kInt));
  at::Tensor pooled = at::empty({B, 2, H, W}, opts), idx_s = at::empty({B, H, W}, opts.dtype(at::kInt));
  at::Tensor a_s = at::empty({B, 1, H, W}, opts);
  if (B == 0) {
    // an empty batch: empty outputs, and no kernel launched on a zero-block grid
    return {y, at::empty({B, C}, opts), a_s, chan, idx_c, pooled, idx_s};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "askd_cbam_forward_pass1", [&] {
    using acc_t = acc_of<scalar_t>;
    // pass 1: chan = (mean, max) over P per (b, c), idx_c = argmax
    launch_reduce<true, acc_t>(!cl, B, C, P, LoadX<scalar_t, acc_t>{x.data_ptr<scalar_t>()},
                               StorePool<acc_t>{chan.data_ptr<acc_t>(), idx_c.data_ptr<int>(), C, P}, stream);
  });

  // pass 2: the channel MLP and its sigmoid, ATen in acc on (B, 2, C): a_c = w2 @ (relu(w1 @ avg) + relu(w1 @ max))
  // with autocast kept out: it would recast the matmuls to half precision, and the kernels read acc pointers
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor a_c = at::matmul(at::relu(at::matmul(chan, w1f.t())).sum(1), w2f.t()).contiguous();
  const at::Tensor gc = at::sigmoid(a_c).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "askd_cbam_forward_pass3", [&] {
    using acc_t = acc_of<scalar_t>;
    // pass 3: pooled = (mean, max) over C of x * g_c per (b, p), idx_s = argmax; x * g_c never stored
    launch_reduce<true, acc_t>(cl, B, P, C, LoadXGate<scalar_t, acc_t>{x.data_ptr<scalar_t>(), gc.data_ptr<acc_t>(), C},
                               StorePool<acc_t>{pooled.data_ptr<acc_t>(), idx_s.data_ptr<int>(), P, C}, stream);
    // pass 4: a_s = conv_k(pooled, ws)
    spatial_conv_kernel<acc_t><<<grid_for(B * P, kThreads), kThreads, 0, stream>>>(
        pooled.data_ptr<acc_t>(), wsf.data_ptr<acc_t>(), a_s.data_ptr<acc_t>(), B, H, W, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  const at::Tensor gs = at::sigmoid(a_s).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "askd_cbam_forward_pass5", [&] {
    using acc_t = acc_of<scalar_t>;
    // pass 5: y = x * g_c * g_s, read x once, write y once
    const int64_t numel = x.numel();
    const auto launch = [&](auto channels_last) {
      apply_gates_kernel<decltype(channels_last)::value, scalar_t, acc_t>
          <<<grid_for(numel, kThreads), kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), gc.data_ptr<acc_t>(),
                                                               gs.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), numel, C, P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (cl) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
  return {y, a_c, a_s, chan, idx_c, pooled, idx_s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cbam_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& da_c_in, const at::Tensor& da_s_in, const at::Tensor& x_in,
    const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& ws, const at::Tensor& a_c_in,
    const at::Tensor& a_s_in, const at::Tensor& chan_in, const at::Tensor& idx_c_in, const at::Tensor& pooled_in,
    const at::Tensor& idx_s_in) {
  constexpr const char* op = "askd::cbam_backward";
  check_cbam_inputs(x_in, w1, w2, ws, op);
  TORCH_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x_in.device().str());
  check_cbam_saved(x_in, a_c_in, a_s_in, chan_in, idx_c_in, pooled_in, idx_s_in, op);
  const int64_t B = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), P = H * W;
  check_shape(dy_in, x_in.sizes(), op, "dy");
  check_dtype(dy_in, x_in.scalar_type(), op, "dy");
  check_device(dy_in, x_in, op, "dy");
  check_shape(da_c_in, {B, C}, op, "da_c");
  check_device(da_c_in, x_in, op, "da_c");
  check_shape(da_s_in, {B, 1, H, W}, op, "da_s");
  check_device(da_s_in, x_in, op, "da_s");
  check_sizes(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  if (B == 0) {
    // an empty batch: empty dx, and weight gradients that sum over no samples; no kernel launched
    return {at::empty_like(x_in), at::zeros_like(w1), at::zeros_like(w2), at::zeros_like(ws)};
  }
  const bool cl = is_channels_last(x_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt), dy = dy_in.contiguous(fmt);
  const int k = static_cast<int>(ws.size(2));
  const auto acc = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  const at::Tensor w1f = w1.to(acc).contiguous(), w2f = w2.to(acc).contiguous(), wsf = ws.to(acc).contiguous();
  const at::Tensor da_c = da_c_in.to(acc).contiguous(), da_s = da_s_in.to(acc).contiguous();
  const at::Tensor chan = chan_in.contiguous(), idx_c = idx_c_in.contiguous(), pooled = pooled_in.contiguous();
  const at::Tensor idx_s = idx_s_in.contiguous();
  const at::Tensor gc = at::sigmoid(a_c_in).contiguous(), gs = at::sigmoid(a_s_in).contiguous();

  at::Tensor ga_s = at::empty({B, 1, H, W}, opts), dpooled = at::empty({B, 2, H, W}, opts);
  at::Tensor dws = at::empty({2, k, k}, opts), ga_c = at::empty({B, C}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "askd_cbam_backward_spatial", [&] {
    using acc_t = acc_of<scalar_t>;
    // B1: dg_s = sum_c dy * x * g_c per (b, p); ga_s = da_s + dg_s * g_s * (1 - g_s)
    launch_reduce<false, acc_t>(
        cl, B, P, C, LoadDyXGate<scalar_t, acc_t>{dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gc.data_ptr<acc_t>(), C},
        StoreGateGrad<acc_t>{ga_s.data_ptr<acc_t>(), da_s.data_ptr<acc_t>(), gs.data_ptr<acc_t>(), P}, stream);
    // the conv's backward: dpooled (input gradient) and dws (weight gradient)
    spatial_conv_input_grad_kernel<acc_t><<<grid_for(B * 2 * P, kThreads), kThreads, 0, stream>>>(
        ga_s.data_ptr<acc_t>(), wsf.data_ptr<acc_t>(), dpooled.data_ptr<acc_t>(), B, H, W, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    spatial_conv_weight_grad_kernel<acc_t><<<2 * k * k, kThreads, 0, stream>>>(
        ga_s.data_ptr<acc_t>(), pooled.data_ptr<acc_t>(), dws.data_ptr<acc_t>(), B, H, W, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // B2: dg_c = sum_p dxc * x per (b, c); ga_c = da_c + dg_c * g_c * (1 - g_c)
    launch_reduce<false, acc_t>(
        !cl, B, C, P,
        LoadDxcX<scalar_t, acc_t>{dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gs.data_ptr<acc_t>(),
                                  dpooled.data_ptr<acc_t>(), idx_s.data_ptr<int>(), C, P},
        StoreGateGrad<acc_t>{ga_c.data_ptr<acc_t>(), da_c.data_ptr<acc_t>(), gc.data_ptr<acc_t>(), C}, stream);
  });

  // the MLP's backward, ATen in acc (tiny): hidden (B, 2, R), dchan (B, 2, C); autocast would recast the matmuls
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor hidden = at::relu(at::matmul(chan, w1f.t()));
  const at::Tensor dw2 = at::matmul(ga_c.t(), hidden.sum(1));
  // ReLU's gradient as torch's threshold_backward: zero where hidden <= 0 even for a NaN upstream gradient
  const at::Tensor dhidden = at::where(at::le(hidden, 0), 0, at::matmul(ga_c, w2f).unsqueeze(1));
  const at::Tensor dw1 = at::matmul(dhidden.transpose(1, 2), chan).sum(0);
  const at::Tensor dchan = at::matmul(dhidden, w1f).contiguous();

  at::Tensor dx = at::empty_like(x, x.options(), fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "askd_cbam_backward_input", [&] {
    using acc_t = acc_of<scalar_t>;
    // B3: dx = dxc * g_c + dchan0 / P + [p == idx_c] * dchan1, written once
    const int64_t numel = x.numel();
    const auto launch = [&](auto channels_last) {
      input_grad_kernel<decltype(channels_last)::value, scalar_t, acc_t>
          <<<grid_for(numel, kThreads), kThreads, 0, stream>>>(
              dy.data_ptr<scalar_t>(), gc.data_ptr<acc_t>(), gs.data_ptr<acc_t>(), dpooled.data_ptr<acc_t>(), idx_s.data_ptr<int>(), dchan.data_ptr<acc_t>(), idx_c.data_ptr<int>(),
              dx.data_ptr<scalar_t>(), numel, C, P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (cl) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
  return {dx, dw1.to(w1.scalar_type()), dw2.to(w2.scalar_type()), dws.to(ws.scalar_type())};
}

}  // namespace
}  // namespace askd::cuda

TORCH_LIBRARY_IMPL(askd, CUDA, m) {
  m.impl("cbam_forward", &askd::cuda::cbam_forward_cuda);
  m.impl("cbam_backward", &askd::cuda::cbam_backward_cuda);
}
