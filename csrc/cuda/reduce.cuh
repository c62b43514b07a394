// Small device helpers shared by the askd CUDA kernels: the accumulation type and fixed-order (deterministic)
// warp and block sums. Header-only; included by csrc/cuda/*.cu.

#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

namespace askd::cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// acc: double for double inputs, else float (matches askd::acc_type in checks.h)
template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// clamp_min that keeps NaN (as torch.clamp_min does): v < lo is false for NaN, so NaN passes through
template <typename T>
__device__ __forceinline__ T clamp_min(T v, T lo) {
  return v < lo ? lo : v;
}

template <typename T>
__device__ __forceinline__ T dev_sqrt(T v) {
  if constexpr (std::is_same_v<T, double>) {
    return ::sqrt(v);
  } else {
    return ::sqrtf(v);
  }
}

// Sums kN values over a warp by shuffles; the total lands in lane 0 (the other lanes hold partial sums).
template <int kN, typename T>
__device__ __forceinline__ void warp_sum(T (&v)[kN]) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
#pragma unroll
    for (int k = 0; k < kN; ++k) v[k] += __shfl_down_sync(kFullMask, v[k], off);
  }
}

// Sums kN values over a 1-D block of kBlock threads (a multiple of 32); the totals land in thread 0.
// Every thread of the block must call it; it ends with a barrier, so it may be called again at once.
template <int kBlock, int kN, typename T>
__device__ __forceinline__ void block_sum(T (&v)[kN]) {
  static_assert(kBlock % kWarp == 0 && kBlock <= kWarp * kWarp, "block must be whole warps, at most 1024 threads");
  constexpr int kWarps = kBlock / kWarp;
  __shared__ T part[kWarps][kN];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  warp_sum(v);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kN; ++k) part[warp][k] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < kN; ++k) v[k] = lane < kWarps ? part[lane][k] : T(0);
    warp_sum(v);
  }
  __syncthreads();
}

// How many blocks a grid-stride loop over n items with kBlock threads gets: enough to fill the device, capped.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

}  // namespace askd::cuda
