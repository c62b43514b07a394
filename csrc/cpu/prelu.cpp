// PReLU's backward on the CPU, one weight per channel of a 4-D x (the contract: askd/ops/prelu.py).
//
// One pass reads x and g and writes dx = g * (x > 0 ? 1 : w_c); the same pass adds up each task's share of
// dw_c = sum g * (x > 0 ? 0 : x) in acc (float, double for double), and the tasks' partials are summed in task
// order afterwards (in double), so dw does not depend on the thread count. (aten writes a full-size weight
// gradient and reduces it in a second pass, in a scalar loop that branches on the sign of x.) NCHW: a task is
// one (b, c) plane, `omp simd` reductions over its H*W values. channels_last: a task is a fixed block of pixels
// (rows of C channels), accumulated per channel; the block size depends on C only, so the partials, too, do not
// depend on the thread count. The loops are branch-free so that they vectorise (see `select`).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "simd.h"

namespace askd {
namespace {

using at::Tensor;

constexpr int64_t kTaskValues = 16384;  // values per channels_last task (64 KB of fp32 x), at most kBlock pixels
constexpr int64_t kBlock = 256;         // values (NCHW) or pixels (channels_last) one accumulator adds up in turn

// c ? a : b as bit masks. Written as the conditional, with b a product, the loops below do not vectorise: GCC will
// not compute a floating-point operation the branch skips (it might trap, -ftrapping-math) in order to if-convert
// it, and it rewrites even g * (c ? 1 : w) into that form.
template <typename T>
ASKD_INLINE T select(bool c, T a, T b) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  const Bits mask = Bits(0) - static_cast<Bits>(c);  // all ones where c
  return std::bit_cast<T>((std::bit_cast<Bits>(a) & mask) | (std::bit_cast<Bits>(b) & ~mask));
}

// How the loops read a dtype into acc and write it back: a plain conversion, except for bfloat16, which goes
// through its bits, since c10's conversion branches on NaN and would keep the loops from vectorising. The values
// are c10's: the upper half of a float, rounded to nearest even, NaN stored as 0x7FC0.
template <typename scalar_t>
struct Io {
  using raw_t = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  static ASKD_INLINE acc_t load(raw_t v) { return static_cast<acc_t>(v); }
  static ASKD_INLINE raw_t store(acc_t v) { return static_cast<raw_t>(v); }
};

template <>
struct Io<c10::BFloat16> {
  using raw_t = uint16_t;
  using acc_t = float;
  static ASKD_INLINE float load(uint16_t v) { return std::bit_cast<float>(static_cast<uint32_t>(v) << 16); }
  static ASKD_INLINE uint16_t store(float v) {
    const uint32_t u = std::bit_cast<uint32_t>(v);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
  }
};

// One (b, c) plane of n values with slope w: writes dx, returns the plane's sum of g * (x > 0 ? 0 : x). The
// comparison is aten's: x == 0 and a NaN x take the slope (a NaN x then gives a NaN dw), and where x > 0 nothing
// is added, even for an infinite or NaN g. The sum has two levels, `omp simd` reductions over blocks of kBlock
// values and a sum of the block sums, so its float32 rounding error grows with n / kBlock, not with n / lanes.
template <typename scalar_t, typename raw_t = typename Io<scalar_t>::raw_t, typename acc_t = typename Io<scalar_t>::acc_t>
ASKD_CPU_CLONES acc_t plane_backward(const raw_t* x, const raw_t* g, raw_t* dx, int64_t n, acc_t w) {
  using io = Io<scalar_t>;
  acc_t total = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = std::min(n, i0 + kBlock);
    acc_t dw = 0;
#pragma omp simd reduction(+ : dw)
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t xv = io::load(x[i]), gv = io::load(g[i]);
      const bool pos = xv > acc_t(0);
      dx[i] = io::store(select(pos, gv, w * gv));
      dw += select(pos, acc_t(0), gv * xv);
    }
    total += dw;
  }
  return total;
}

// `rows` pixels of C channels each: writes dx, adds each channel's g * (x > 0 ? 0 : x) into dw (C values).
template <typename scalar_t, typename raw_t = typename Io<scalar_t>::raw_t, typename acc_t = typename Io<scalar_t>::acc_t>
ASKD_CPU_CLONES void rows_backward(const raw_t* x, const raw_t* g, raw_t* dx, int64_t rows, int64_t C,
                                   const acc_t* w, acc_t* dw) {
  using io = Io<scalar_t>;
  for (int64_t r = 0; r < rows; ++r) {
    const raw_t *xr = x + r * C, *gr = g + r * C;
    raw_t* dxr = dx + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t xv = io::load(xr[c]), gv = io::load(gr[c]);
      const bool pos = xv > acc_t(0);
      dxr[c] = io::store(select(pos, gv, w[c] * gv));
      dw[c] += select(pos, acc_t(0), gv * xv);
    }
  }
}

std::tuple<Tensor, Tensor> prelu_backward_cpu(const Tensor& grad_in, const Tensor& x_in, const Tensor& weight) {
  constexpr const char* op = "askd::prelu_backward";
  check_prelu_inputs(grad_in, x_in, weight, op);
  TORCH_CHECK(x_in.device().is_cpu(), op, ": x must be a CPU tensor here, got ", x_in.device().str());
  // dx takes x's layout (channels_last or NCHW, as askd.numerics.memory_format); g is brought to the same
  const bool nhwc = x_in.is_contiguous(at::MemoryFormat::ChannelsLast) && !x_in.is_contiguous();
  const auto layout = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const Tensor x = x_in.contiguous(layout), g = grad_in.contiguous(layout);
  Tensor dx = at::empty(x.sizes(), x.options().memory_format(layout));
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto acc_dtype = acc_type(x.scalar_type());
  const Tensor w = weight.to(acc_dtype).contiguous();
  Tensor dw = at::zeros({C}, w.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "prelu_backward", [&] {
    using raw_t = typename Io<scalar_t>::raw_t;
    using acc_t = typename Io<scalar_t>::acc_t;
    const auto* xp = reinterpret_cast<const raw_t*>(x.const_data_ptr<scalar_t>());
    const auto* gp = reinterpret_cast<const raw_t*>(g.const_data_ptr<scalar_t>());
    auto* dxp = reinterpret_cast<raw_t*>(dx.mutable_data_ptr<scalar_t>());
    const acc_t* wp = w.const_data_ptr<acc_t>();
    Tensor partial;  // (tasks, C): each task's weight gradient
    if (!nhwc) {
      partial = at::empty({B, C}, w.options());
      acc_t* pp = partial.mutable_data_ptr<acc_t>();
      const int64_t grain = std::max<int64_t>(1, kTaskValues / std::max<int64_t>(HW, 1));
      at::parallel_for(0, B * C, grain, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
          pp[p] = plane_backward<scalar_t>(xp + p * HW, gp + p * HW, dxp + p * HW, HW, wp[p % C]);
      });
    } else {
      const int64_t pixels = B * HW, rows = std::clamp<int64_t>(kTaskValues / C, 1, kBlock);
      const int64_t tasks = (pixels + rows - 1) / rows;
      partial = at::zeros({tasks, C}, w.options());
      acc_t* pp = partial.mutable_data_ptr<acc_t>();
      at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r0 = t * rows, o = r0 * C;
          rows_backward<scalar_t>(xp + o, gp + o, dxp + o, std::min(rows, pixels - r0), C, wp, pp + t * C);
        }
      });
    }
    // the partials summed in task order, in double (a few thousand tasks at most in IR-50): the same dw for any
    // thread count
    const int64_t tasks = partial.size(0);
    const acc_t* pp = partial.const_data_ptr<acc_t>();
    double* dwp = dw.mutable_data_ptr<double>();
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t c = 0; c < C; ++c) dwp[c] += static_cast<double>(pp[t * C + c]);
  });
  return {dx, dw.to(weight.scalar_type())};
}

}  // namespace
}  // namespace askd

TORCH_LIBRARY_IMPL(askd, CPU, m) { m.impl("prelu_backward", &askd::prelu_backward_cpu); }
