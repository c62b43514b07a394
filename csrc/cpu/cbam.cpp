// Fused CBAM forward and backward on the CPU (the contract and its formulas: askd/ops/cbam.py).
//
// CBAM never mixes samples, so one task runs every pass of one sample while that sample sits in the
// core's L2 (an IR-50 stage-1 sample is 0.8 MB in fp32): x is read from memory once per direction, the
// repeated passes hit the cache. Tasks are parallel over the batch. Loops run over the contiguous dimension
// (channels for channels_last, H*W for NCHW) as element-wise updates or `omp simd` reductions, so they
// vectorise without -ffast-math. Everything accumulates in acc (float, double for double); the channel
// refined map x * g_c is never stored: backward recomputes it. The batch-summed weight gradients are formed
// after the parallel loop from per-sample terms, so results do not depend on the thread count.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "simd.h"

namespace askd {
namespace {

using at::Tensor;

template <typename acc_t>
inline acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + std::exp(-v));
}

// One sample's feature map: element (c, p), p = h*W + w, lives at c*HW + p (NCHW) or p*C + c (channels_last).
struct Geom {
  int64_t C, H, W, HW, R, k;
};

// The tensors of the whole batch, as raw pointers (acc_t for maps and statistics).
template <typename scalar_t, typename acc_t>
struct Batch {
  const scalar_t* x;
  const acc_t *w1, *w2, *ws;  // (R,C), (C,R), (2,k,k) in acc
  acc_t *a_c, *chan, *a_s, *pooled;
  int32_t *idx_c, *idx_s;
};

// Does v, met later in the scan, replace the running maximum m? torch.max's order: NaN ranks above every
// number and the first NaN stays; among numbers the first maximum stays (strict >). !(v <= m) is "v > m or
// either is NaN", one unordered compare; m == m then keeps a NaN maximum. Both compile to vector compares
// (no -ffast-math), so the loops below stay vectorised.
template <typename acc_t>
ASKD_INLINE bool takes_max(acc_t v, acc_t m) {
  return !(v <= m) & (m == m);
}

// sum, max and first argmax of f(i) over i in [0, n), NaN winning as in torch.max. Lanes of kLanes independent
// running (sum, max, arg) vectorise without reassociating anything; the first index among the lanes holding the
// maximum (or a NaN) is then the first index overall, since each lane keeps its own first one. The tail runs in
// order after the lanes.
constexpr int64_t kLanes = 16;

template <typename acc_t, typename F>
ASKD_INLINE void sum_max_argmax(int64_t n, F f, acc_t* sum_out, acc_t* max_out, int32_t* arg_out) {
  acc_t s = 0, m = -std::numeric_limits<acc_t>::infinity();
  int32_t arg = 0;
  const int64_t full = n - n % kLanes;
  if (full > 0) {
    acc_t ls[kLanes], lm[kLanes];
    int32_t la[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) ls[l] = 0, lm[l] = m, la[l] = static_cast<int32_t>(l);
    for (int64_t i0 = 0; i0 < full; i0 += kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const acc_t v = f(i0 + l);
        ls[l] += v;
        const bool gt = takes_max(v, lm[l]);
        lm[l] = gt ? v : lm[l];
        la[l] = gt ? static_cast<int32_t>(i0 + l) : la[l];
      }
    }
    for (int64_t l = 0; l < kLanes; ++l) s += ls[l];  // in lane order: the sum's rounding stays fixed
    // The merge, branch-free (it runs once per pixel in channels_last spatial pooling, where a C of 64 makes
    // only 4 lane steps and a merge lane by lane, unpredictable compares included, cost more than the scan):
    // the winners are the NaN lanes if any, else the lanes equal to the largest; of those, the smallest index.
    // Lane l only ever holds indices i with i % kLanes == l, so the index names its lane.
    bool any_nan = false;
    for (int64_t l = 0; l < kLanes; ++l) any_nan |= lm[l] != lm[l];
    acc_t top = -std::numeric_limits<acc_t>::infinity();
    for (int64_t l = 0; l < kLanes; ++l) top = lm[l] > top ? lm[l] : top;
    int32_t first = std::numeric_limits<int32_t>::max();
    for (int64_t l = 0; l < kLanes; ++l) {
      const bool wins = any_nan ? lm[l] != lm[l] : lm[l] == top;
      first = wins && la[l] < first ? la[l] : first;
    }
    arg = first;
    m = lm[first % kLanes];
  }
  for (int64_t i = full; i < n; ++i) {
    const acc_t v = f(i);
    s += v;
    if (takes_max(v, m)) m = v, arg = static_cast<int32_t>(i);
  }
  *sum_out = s, *max_out = m, *arg_out = arg;
}

// relu(w1 @ v) for v (C) -> h (R); NaN passes, as through torch's relu
template <typename acc_t>
ASKD_INLINE void mlp_hidden(const acc_t* w1, const acc_t* v, acc_t* h, const Geom& g) {
  for (int64_t r = 0; r < g.R; ++r) {
    const acc_t* row = w1 + r * g.C;
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < g.C; ++c) s += row[c] * v[c];
    h[r] = s < 0 ? acc_t(0) : s;
  }
}

// a_s = conv_k(pooled) with zero padding k/2: one tap at a time over the rows and columns it reaches.
template <typename acc_t>
ASKD_INLINE void spatial_conv(const acc_t* ws, const acc_t* pooled, acc_t* a_s, const Geom& g) {
  const int64_t pad = g.k / 2;
  std::fill(a_s, a_s + g.HW, acc_t(0));
  for (int64_t ch = 0; ch < 2; ++ch) {
    for (int64_t ky = 0; ky < g.k; ++ky) {
      for (int64_t kx = 0; kx < g.k; ++kx) {
        const acc_t wv = ws[(ch * g.k + ky) * g.k + kx];
        const int64_t dy = ky - pad, dx = kx - pad;
        const int64_t h0 = std::max<int64_t>(0, -dy), h1 = std::min(g.H, g.H - dy);
        const int64_t w0 = std::max<int64_t>(0, -dx), w1 = std::min(g.W, g.W - dx);
        for (int64_t h = h0; h < h1; ++h) {
          const acc_t* src = pooled + ch * g.HW + (h + dy) * g.W + dx;
          acc_t* dst = a_s + h * g.W;
#pragma omp simd
          for (int64_t w = w0; w < w1; ++w) dst[w] += wv * src[w];
        }
      }
    }
  }
}

// The transpose of spatial_conv: dpooled (2,HW) from ga (HW); and this sample's dws term (2,k,k).
template <typename acc_t>
ASKD_INLINE void spatial_conv_backward(const acc_t* ws, const acc_t* pooled, const acc_t* ga, acc_t* dpooled, acc_t* dws,
                           const Geom& g) {
  const int64_t pad = g.k / 2;
  std::fill(dpooled, dpooled + 2 * g.HW, acc_t(0));
  for (int64_t ch = 0; ch < 2; ++ch) {
    for (int64_t ky = 0; ky < g.k; ++ky) {
      for (int64_t kx = 0; kx < g.k; ++kx) {
        const int64_t t = (ch * g.k + ky) * g.k + kx;
        const acc_t wv = ws[t];
        const int64_t dy = ky - pad, dx = kx - pad;
        const int64_t h0 = std::max<int64_t>(0, -dy), h1 = std::min(g.H, g.H - dy);
        const int64_t w0 = std::max<int64_t>(0, -dx), w1 = std::min(g.W, g.W - dx);
        acc_t dw = 0;
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t off = ch * g.HW + (h + dy) * g.W + dx;
          const acc_t* src = ga + h * g.W;
#pragma omp simd reduction(+ : dw)
          for (int64_t w = w0; w < w1; ++w) {
            dpooled[off + w] += wv * src[w];
            dw += pooled[off + w] * src[w];
          }
        }
        dws[t] = dw;
      }
    }
  }
}

// chan (2C) = [mean_p x, max_p x] and idx_c (C) = first argmax over p.
template <typename scalar_t, typename acc_t, bool CL>
ASKD_INLINE void channel_pool(const scalar_t* x, acc_t* chan, int32_t* idx, const Geom& g) {
  acc_t* sum = chan;
  acc_t* mx = chan + g.C;
  if constexpr (CL) {
    std::fill(sum, sum + g.C, acc_t(0));
    std::fill(mx, mx + g.C, -std::numeric_limits<acc_t>::infinity());
    std::fill(idx, idx + g.C, 0);
    for (int64_t p = 0; p < g.HW; ++p) {
      const scalar_t* row = x + p * g.C;
#pragma omp simd
      for (int64_t c = 0; c < g.C; ++c) {
        const acc_t v = static_cast<acc_t>(row[c]);
        sum[c] += v;
        const bool gt = takes_max(v, mx[c]);  // the first maximum (or NaN) wins
        mx[c] = gt ? v : mx[c];
        idx[c] = gt ? static_cast<int32_t>(p) : idx[c];
      }
    }
  } else {
    for (int64_t c = 0; c < g.C; ++c) {
      const scalar_t* row = x + c * g.HW;
      sum_max_argmax<acc_t>(g.HW, [row](int64_t p) { return static_cast<acc_t>(row[p]); }, sum + c, mx + c, idx + c);
    }
  }
  for (int64_t c = 0; c < g.C; ++c) sum[c] /= static_cast<acc_t>(g.HW);
}

// pooled (2,HW) = [mean_c x*gc, max_c x*gc] and idx (HW) = first argmax over c.
template <typename scalar_t, typename acc_t, bool CL>
ASKD_INLINE void spatial_pool(const scalar_t* x, const acc_t* gc, acc_t* pooled, int32_t* idx, const Geom& g) {
  acc_t* mean = pooled;
  acc_t* mx = pooled + g.HW;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(g.C);
  if constexpr (CL) {
    for (int64_t p = 0; p < g.HW; ++p) {
      const scalar_t* row = x + p * g.C;
      auto xc = [row, gc](int64_t c) { return static_cast<acc_t>(row[c]) * gc[c]; };
      sum_max_argmax<acc_t>(g.C, xc, mean + p, mx + p, idx + p);
      mean[p] *= inv_c;
    }
  } else {
    std::fill(mean, mean + g.HW, acc_t(0));
    std::fill(mx, mx + g.HW, -std::numeric_limits<acc_t>::infinity());
    std::fill(idx, idx + g.HW, 0);
    for (int64_t c = 0; c < g.C; ++c) {
      const scalar_t* row = x + c * g.HW;
      const acc_t gv = gc[c];
#pragma omp simd
      for (int64_t p = 0; p < g.HW; ++p) {
        const acc_t v = static_cast<acc_t>(row[p]) * gv;
        mean[p] += v;
        const bool gt = takes_max(v, mx[p]);
        mx[p] = gt ? v : mx[p];
        idx[p] = gt ? static_cast<int32_t>(c) : idx[p];
      }
    }
    for (int64_t p = 0; p < g.HW; ++p) mean[p] *= inv_c;
  }
}

template <typename scalar_t, typename acc_t, bool CL>
ASKD_CPU_CLONES void forward_sample(const Batch<scalar_t, acc_t>& t, scalar_t* y, int64_t b, const Geom& g, std::vector<acc_t>& buf) {
  const int64_t n = g.C * g.HW;
  const scalar_t* x = t.x + b * n;
  acc_t* chan = t.chan + b * 2 * g.C;
  acc_t* a_c = t.a_c + b * g.C;
  acc_t* pooled = t.pooled + b * 2 * g.HW;
  acc_t* a_s = t.a_s + b * g.HW;
  buf.resize(g.C + g.HW + 2 * g.R);
  acc_t *gc = buf.data(), *gs = gc + g.C, *h = gs + g.HW;

  channel_pool<scalar_t, acc_t, CL>(x, chan, t.idx_c + b * g.C, g);
  // a_c = w2 @ (relu(w1 @ avg) + relu(w1 @ max))
  mlp_hidden(t.w1, chan, h, g);
  mlp_hidden(t.w1, chan + g.C, h + g.R, g);
  for (int64_t r = 0; r < g.R; ++r) h[r] += h[g.R + r];
  for (int64_t c = 0; c < g.C; ++c) {
    const acc_t* row = t.w2 + c * g.R;
    acc_t s = 0;
    for (int64_t r = 0; r < g.R; ++r) s += row[r] * h[r];
    a_c[c] = s;
    gc[c] = sigmoid(s);
  }
  spatial_pool<scalar_t, acc_t, CL>(x, gc, pooled, t.idx_s + b * g.HW, g);
  spatial_conv(t.ws, pooled, a_s, g);
  for (int64_t p = 0; p < g.HW; ++p) gs[p] = sigmoid(a_s[p]);
  // y = (x * gc) * gs, the reference's order of rounding
  scalar_t* yb = y + b * n;
  if constexpr (CL) {
    for (int64_t p = 0; p < g.HW; ++p) {
      const scalar_t* xr = x + p * g.C;
      scalar_t* yr = yb + p * g.C;
      const acc_t gp = gs[p];
#pragma omp simd
      for (int64_t c = 0; c < g.C; ++c) yr[c] = static_cast<scalar_t>(static_cast<acc_t>(xr[c]) * gc[c] * gp);
    }
  } else {
    for (int64_t c = 0; c < g.C; ++c) {
      const scalar_t* xr = x + c * g.HW;
      scalar_t* yr = yb + c * g.HW;
      const acc_t gv = gc[c];
#pragma omp simd
      for (int64_t p = 0; p < g.HW; ++p) yr[p] = static_cast<scalar_t>(static_cast<acc_t>(xr[p]) * gv * gs[p]);
    }
  }
}

bool channels_last(const Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

Geom geometry(const Tensor& x, const Tensor& w1, const Tensor& ws) {
  return {x.size(1), x.size(2), x.size(3), x.size(2) * x.size(3), w1.size(0), ws.size(2)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cbam_forward_cpu(const Tensor& x_in,
                                                                                    const Tensor& w1,
                                                                                    const Tensor& w2,
                                                                                    const Tensor& ws) {
  constexpr const char* op = "askd::cbam_forward";
  check_cbam_inputs(x_in, w1, w2, ws, op);
  TORCH_CHECK(x_in.device().is_cpu(), op, ": x must be a CPU tensor here, got ", x_in.device().str());
  const bool cl = channels_last(x_in);
  const Tensor x = x_in.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const Geom g = geometry(x, w1, ws);
  const int64_t B = x.size(0);
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  Tensor y = at::empty_like(x);
  Tensor a_c = at::empty({B, g.C}, acc), a_s = at::empty({B, 1, g.H, g.W}, acc);
  Tensor chan = at::empty({B, 2, g.C}, acc), pooled = at::empty({B, 2, g.H, g.W}, acc);
  Tensor idx_c = at::empty({B, g.C}, x.options().dtype(at::kInt));
  Tensor idx_s = at::empty({B, g.H, g.W}, x.options().dtype(at::kInt));
  if (B == 0) return {y, a_c, a_s, chan, idx_c, pooled, idx_s};  // an empty batch: empty outputs, no work
  const Tensor w1a = w1.to(acc).contiguous(), w2a = w2.to(acc).contiguous(), wsa = ws.to(acc).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cbam_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Batch<scalar_t, acc_t> t{x.const_data_ptr<scalar_t>(), w1a.const_data_ptr<acc_t>(),
                                   w2a.const_data_ptr<acc_t>(),  wsa.const_data_ptr<acc_t>(),
                                   a_c.mutable_data_ptr<acc_t>(), chan.mutable_data_ptr<acc_t>(),
                                   a_s.mutable_data_ptr<acc_t>(), pooled.mutable_data_ptr<acc_t>(),
                                   idx_c.mutable_data_ptr<int32_t>(), idx_s.mutable_data_ptr<int32_t>()};
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> buf;
      for (int64_t b = b0; b < b1; ++b) {
        if (cl)
          forward_sample<scalar_t, acc_t, true>(t, yp, b, g, buf);
        else
          forward_sample<scalar_t, acc_t, false>(t, yp, b, g, buf);
      }
    });
  });
  return {y, a_c, a_s, chan, idx_c, pooled, idx_s};
}

// Per-sample terms the batch-summed weight gradients are built from after the parallel loop.
template <typename acc_t>
struct WeightTerms {
  acc_t *ga_c, *hsum, *dz, *dws;  // (B,C), (B,R) relu(w1 avg)+relu(w1 max), (B,2,R), (B,2,k,k)
};

template <typename scalar_t, typename acc_t, bool CL>
ASKD_CPU_CLONES void backward_sample(const Batch<scalar_t, acc_t>& t, const scalar_t* dy_all, const acc_t* da_c, const acc_t* da_s,
                     scalar_t* dx_all, const WeightTerms<acc_t>& wt, int64_t b, const Geom& g,
                     std::vector<acc_t>& buf) {
  const int64_t n = g.C * g.HW;
  const scalar_t *x = t.x + b * n, *dy = dy_all + b * n;
  scalar_t* dx = dx_all + b * n;
  const acc_t* chan = t.chan + b * 2 * g.C;
  const acc_t* pooled = t.pooled + b * 2 * g.HW;
  const int32_t *idx_c = t.idx_c + b * g.C, *idx_s = t.idx_s + b * g.HW;
  buf.resize(4 * g.C + 4 * g.HW + 2 * g.R);
  acc_t *gc = buf.data(), *dgc = gc + g.C, *dch = dgc + g.C;  // dch: (2,C) gradient of chan
  acc_t *gs = dch + 2 * g.C, *ga_s = gs + g.HW, *dpo = ga_s + g.HW;  // dpo: (2,HW) gradient of pooled
  acc_t* h = dpo + 2 * g.HW;                                         // (2,R) hidden after ReLU
  for (int64_t c = 0; c < g.C; ++c) gc[c] = sigmoid(t.a_c[b * g.C + c]);
  for (int64_t p = 0; p < g.HW; ++p) gs[p] = sigmoid(t.a_s[b * g.HW + p]);
  std::fill(dgc, dgc + g.C, acc_t(0));

  // B1: dg_s[p] = sum_c dy*x*gc (-> ga_s), and dgc[c] += sum_p dy*x*gs[p]
  if constexpr (CL) {
    for (int64_t p = 0; p < g.HW; ++p) {
      const scalar_t *xr = x + p * g.C, *dr = dy + p * g.C;
      const acc_t gp = gs[p];
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < g.C; ++c) {
        const acc_t prod = static_cast<acc_t>(dr[c]) * static_cast<acc_t>(xr[c]);
        s += prod * gc[c];
        dgc[c] += prod * gp;
      }
      ga_s[p] = s;
    }
  } else {
    std::fill(ga_s, ga_s + g.HW, acc_t(0));
    for (int64_t c = 0; c < g.C; ++c) {
      const scalar_t *xr = x + c * g.HW, *dr = dy + c * g.HW;
      const acc_t gv = gc[c];
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t p = 0; p < g.HW; ++p) {
        const acc_t prod = static_cast<acc_t>(dr[p]) * static_cast<acc_t>(xr[p]);
        ga_s[p] += prod * gv;
        s += prod * gs[p];
      }
      dgc[c] = s;
    }
  }
  for (int64_t p = 0; p < g.HW; ++p) ga_s[p] = da_s[b * g.HW + p] + ga_s[p] * gs[p] * (acc_t(1) - gs[p]);
  spatial_conv_backward(t.ws, pooled, ga_s, dpo, wt.dws + b * 2 * g.k * g.k, g);
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(g.C);
  for (int64_t p = 0; p < g.HW; ++p) dpo[p] *= inv_c;  // the mean's 1/C, folded in once

  // B2: dgc[c] += sum_p x * (dpooled_mean[p] + [c == idx_s[p]] * dpooled_max[p])
  if constexpr (CL) {
    for (int64_t p = 0; p < g.HW; ++p) {
      const scalar_t* xr = x + p * g.C;
      const acc_t d0 = dpo[p];
#pragma omp simd
      for (int64_t c = 0; c < g.C; ++c) dgc[c] += static_cast<acc_t>(xr[c]) * d0;
      dgc[idx_s[p]] += static_cast<acc_t>(xr[idx_s[p]]) * dpo[g.HW + p];
    }
  } else {
    for (int64_t c = 0; c < g.C; ++c) {
      const scalar_t* xr = x + c * g.HW;
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t p = 0; p < g.HW; ++p) s += static_cast<acc_t>(xr[p]) * dpo[p];
      dgc[c] += s;
    }
    for (int64_t p = 0; p < g.HW; ++p) dgc[idx_s[p]] += static_cast<acc_t>(x[idx_s[p] * g.HW + p]) * dpo[g.HW + p];
  }

  // MLP backward: ga_c -> d hidden -> d chan; keep the per-sample weight-gradient terms
  acc_t* ga_c = wt.ga_c + b * g.C;
  for (int64_t c = 0; c < g.C; ++c) ga_c[c] = da_c[b * g.C + c] + dgc[c] * gc[c] * (acc_t(1) - gc[c]);
  mlp_hidden(t.w1, chan, h, g);
  mlp_hidden(t.w1, chan + g.C, h + g.R, g);
  acc_t* dz = wt.dz + b * 2 * g.R;
  for (int64_t r = 0; r < g.R; ++r) {
    acc_t s = 0;
    for (int64_t c = 0; c < g.C; ++c) s += ga_c[c] * t.w2[c * g.R + r];
    wt.hsum[b * g.R + r] = h[r] + h[g.R + r];
    // relu's gradient as torch's threshold_backward: blocked only where h <= 0, so a NaN h passes it
    dz[r] = h[r] <= 0 ? acc_t(0) : s;
    dz[g.R + r] = h[g.R + r] <= 0 ? acc_t(0) : s;
  }
  std::fill(dch, dch + 2 * g.C, acc_t(0));
  for (int64_t r = 0; r < g.R; ++r) {
    const acc_t *w = t.w1 + r * g.C, za = dz[r], zm = dz[g.R + r];
#pragma omp simd
    for (int64_t c = 0; c < g.C; ++c) {
      dch[c] += za * w[c];
      dch[g.C + c] += zm * w[c];
    }
  }
  const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(g.HW);
  for (int64_t c = 0; c < g.C; ++c) dch[c] *= inv_hw;

  // B3: dx = (dy*gs + dpooled_mean + [c==idx_s] dpooled_max) * gc + dchan_mean + [p==idx_c] dchan_max
  if constexpr (CL) {
    for (int64_t p = 0; p < g.HW; ++p) {
      const scalar_t* dr = dy + p * g.C;
      scalar_t* out = dx + p * g.C;
      const acc_t gp = gs[p], d0 = dpo[p];
#pragma omp simd
      for (int64_t c = 0; c < g.C; ++c)
        out[c] = static_cast<scalar_t>((static_cast<acc_t>(dr[c]) * gp + d0) * gc[c] + dch[c]);
    }
  } else {
    for (int64_t c = 0; c < g.C; ++c) {
      const scalar_t* dr = dy + c * g.HW;
      scalar_t* out = dx + c * g.HW;
      const acc_t gv = gc[c], d1 = dch[c];
#pragma omp simd
      for (int64_t p = 0; p < g.HW; ++p)
        out[p] = static_cast<scalar_t>((static_cast<acc_t>(dr[p]) * gs[p] + dpo[p]) * gv + d1);
    }
  }
  // the two max-pool routes touch one element per pixel and per channel: recompute those elements whole,
  // in acc, so a low-precision dx is rounded once
  auto at = [&](int64_t c, int64_t p) { return CL ? p * g.C + c : c * g.HW + p; };
  auto element = [&](int64_t c, int64_t p) {
    acc_t v = static_cast<acc_t>(dy[at(c, p)]) * gs[p] + dpo[p];
    if (idx_s[p] == c) v += dpo[g.HW + p];
    v = v * gc[c] + dch[c];
    if (idx_c[c] == p) v += dch[g.C + c];
    dx[at(c, p)] = static_cast<scalar_t>(v);
  };
  for (int64_t p = 0; p < g.HW; ++p) element(idx_s[p], p);
  for (int64_t c = 0; c < g.C; ++c) element(c, idx_c[c]);
}

// The saved argmaxes index the gradient sums and dx here: one out of [0, n) (saved tensors that are not this
// forward's) would write outside them. One pass over the indices; the CUDA kernels compare indices, never index.
void check_index_range(const Tensor& idx, int64_t n, const char* op, const char* name, const char* what) {
  const auto [lo, hi] = at::aminmax(idx);
  const int64_t min = lo.item<int32_t>(), max = hi.item<int32_t>();
  TORCH_CHECK(min >= 0 && max < n, op, ": ", name, " must lie in [0, ", what, "=", n, "), got ", min, "..", max,
              " (the argmaxes cbam_forward saves)");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cbam_backward_cpu(
    const Tensor& dy_in, const Tensor& da_c_in, const Tensor& da_s_in, const Tensor& x_in, const Tensor& w1,
    const Tensor& w2, const Tensor& ws, const Tensor& a_c, const Tensor& a_s, const Tensor& chan,
    const Tensor& idx_c, const Tensor& pooled, const Tensor& idx_s) {
  constexpr const char* op = "askd::cbam_backward";
  check_cbam_inputs(x_in, w1, w2, ws, op);
  TORCH_CHECK(x_in.device().is_cpu(), op, ": x must be a CPU tensor here, got ", x_in.device().str());
  check_cbam_saved(x_in, a_c, a_s, chan, idx_c, pooled, idx_s, op);
  check_shape(dy_in, x_in.sizes(), op, "dy");
  check_dtype(dy_in, x_in.scalar_type(), op, "dy");
  check_shape(da_c_in, a_c.sizes(), op, "da_c");
  check_shape(da_s_in, a_s.sizes(), op, "da_s");
  for (auto [t, name] : {std::pair{&dy_in, "dy"}, {&da_c_in, "da_c"}, {&da_s_in, "da_s"}}) check_device(*t, x_in, op, name);

  const bool cl = channels_last(x_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const Tensor x = x_in.contiguous(fmt), dy = dy_in.contiguous(fmt);
  const Geom g = geometry(x, w1, ws);
  const int64_t B = x.size(0);
  if (B == 0) {
    // an empty batch: empty dx, and weight gradients that sum over no samples
    return {at::empty_like(x), at::zeros_like(w1), at::zeros_like(w2), at::zeros_like(ws)};
  }
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  const Tensor da_c = da_c_in.to(acc).contiguous(), da_s = da_s_in.to(acc).contiguous();
  const Tensor w1a = w1.to(acc).contiguous(), w2a = w2.to(acc).contiguous(), wsa = ws.to(acc).contiguous();
  const Tensor a_cc = a_c.contiguous(), a_sc = a_s.contiguous(), chanc = chan.contiguous();
  const Tensor pooledc = pooled.contiguous(), idx_cc = idx_c.contiguous(), idx_sc = idx_s.contiguous();
  check_index_range(idx_cc, g.HW, op, "idx_c", "H*W");
  check_index_range(idx_sc, g.C, op, "idx_s", "C");
  Tensor dx = at::empty_like(x);
  Tensor ga_c = at::empty({B, g.C}, acc), hsum = at::empty({B, g.R}, acc);
  Tensor dz = at::empty({B, 2, g.R}, acc), dws_b = at::empty({B, 2, g.k, g.k}, acc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cbam_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // the saved tensors are read only; Batch holds mutable pointers for the forward's sake
    const Batch<scalar_t, acc_t> t{x.const_data_ptr<scalar_t>(),
                                   w1a.const_data_ptr<acc_t>(),
                                   w2a.const_data_ptr<acc_t>(),
                                   wsa.const_data_ptr<acc_t>(),
                                   const_cast<acc_t*>(a_cc.const_data_ptr<acc_t>()),
                                   const_cast<acc_t*>(chanc.const_data_ptr<acc_t>()),
                                   const_cast<acc_t*>(a_sc.const_data_ptr<acc_t>()),
                                   const_cast<acc_t*>(pooledc.const_data_ptr<acc_t>()),
                                   const_cast<int32_t*>(idx_cc.const_data_ptr<int32_t>()),
                                   const_cast<int32_t*>(idx_sc.const_data_ptr<int32_t>())};
    const WeightTerms<acc_t> wt{ga_c.mutable_data_ptr<acc_t>(), hsum.mutable_data_ptr<acc_t>(),
                                dz.mutable_data_ptr<acc_t>(), dws_b.mutable_data_ptr<acc_t>()};
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const acc_t *dac = da_c.const_data_ptr<acc_t>(), *das = da_s.const_data_ptr<acc_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> buf;
      for (int64_t b = b0; b < b1; ++b) {
        if (cl)
          backward_sample<scalar_t, acc_t, true>(t, dyp, dac, das, dxp, wt, b, g, buf);
        else
          backward_sample<scalar_t, acc_t, false>(t, dyp, dac, das, dxp, wt, b, g, buf);
      }
    });
  });
  // sums over the batch, in a fixed order: dw2 = ga_c^T hsum, dw1 = dz^T chan (avg and max routes), dws; in
  // acc, as the contract says, even when the op is called under autocast
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Tensor dw2 = at::mm(ga_c.t(), hsum);
  const Tensor dw1 = at::mm(dz.reshape({2 * B, g.R}).t(), chanc.reshape({2 * B, g.C}));
  const Tensor dws = dws_b.sum(0);
  return {dx, dw1.to(w1.scalar_type()), dw2.to(w2.scalar_type()), dws.to(ws.scalar_type())};
}

}  // namespace
}  // namespace askd

TORCH_LIBRARY_IMPL(askd, CPU, m) {
  m.impl("cbam_forward", &askd::cbam_forward_cpu);
  m.impl("cbam_backward", &askd::cbam_backward_cpu);
}
