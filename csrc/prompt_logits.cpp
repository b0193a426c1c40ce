// prompt_logits on the CPU: the row kernels of the fused prompt-logit head (the GEMM is torch's, on row chunks).
// OpenMP over blocks of rows; each row is read in place, twice from L1 in the forward (a max/argmax pass that
// also sums the row for label smoothing, then an exp pass) and once in the backward (dz written in place). The
// exp is the same branch-free eight-lane polynomial as calibration_bins.cpp, and the block functions are cloned
// for x86-64-v3 (AVX2, FMA) and baseline x86-64, picked at load time. Semantics: see prompt_logits.h.
#include "prompt_logits.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "simd.h"
#include "threads.h"

namespace vlmfast {
namespace {

constexpr int64_t kBlockElems = 1 << 13;  // logits per OpenMP task (a block of whole rows, at least one)

using namespace simd;  // NOLINT: the eight-lane helpers of simd.h

// Adds the eight lanes of v into two float64 four-lane accumulators.
VLMFAST_INLINE void add_f64(vd4& lo, vd4& hi, vf8 v) {
  vf4 a, b;
  std::memcpy(&a, &v, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof(a), sizeof(b));
  lo += __builtin_convertvector(a, vd4);
  hi += __builtin_convertvector(b, vd4);
}

struct RowOut {
  float loss, lse, conf;
  int64_t pred;
};

// The vectorised forward of one row x (C >= 1, contiguous). Returns false, writing nothing, when the row holds a
// NaN or +inf (the scalar path then runs). y is in [0, C) (0 for rows that are not valid).
//   Pass 1: per-lane running max with the first index reaching it (strict >), merged by max value then lowest
//   index = the first argmax; the finiteness flag; for kSmooth the row sum in float64. The last C mod 8
//   elements go through an eight-lane buffer padded with -inf (masked out of the sum).
//   Pass 2: rest = sum_{c != pred} exp(x_c - mx) (two vectors per step), the argmax's lane masked to 0: its exact
//   1 is added once at the end, s = 1 + rest, so the small terms of a near-saturated row are not rounded away.
template <bool kSmooth>
VLMFAST_INLINE bool row_fwd(const float* x, int64_t C, int64_t y, bool valid, double eps, RowOut& out) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const float pinf = std::numeric_limits<float>::infinity();
  const int64_t full = C / kLanes * kLanes;
  const int64_t rem = C - full;
  alignas(32) float tail[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) tail[j] = j < rem ? x[full + j] : ninf;
  const vi8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const vi8 zero = splati(0);
  vf8 mxv = splat(ninf);
  vi8 idxv = zero;
  vi8 ok = splati(-1);
  vd4 slo = {0.0, 0.0, 0.0, 0.0}, shi = slo;
  for (int64_t c0 = 0; c0 < full; c0 += kLanes) {
    const vf8 v = load8(x + c0);
    ok &= v < pinf;  // false for NaN and +inf; -inf (a masked class) is fine
    const vi8 gt = v > mxv;
    mxv = gt ? v : mxv;
    idxv = gt ? lane + static_cast<int32_t>(c0) : idxv;
    if (kSmooth) add_f64(slo, shi, v);
  }
  const vi8 in_tail = lane < static_cast<int32_t>(rem);
  if (rem) {
    const vf8 v = load8(tail);
    ok &= v < pinf;
    const vi8 gt = v > mxv;
    mxv = gt ? v : mxv;
    idxv = gt ? lane + static_cast<int32_t>(full) : idxv;
    if (kSmooth) add_f64(slo, shi, in_tail ? v : splat(0.0f));
  }
  VLMFAST_HREDUCE(ok, vand);
  if (!ok[0]) return false;
  vf8 mxall = mxv;
  VLMFAST_HREDUCE(mxall, vmax);
  const float mx = mxall[0];
  vi8 first = mxv == mxall ? idxv : splati(static_cast<int32_t>(C));  // lowest index of the max
  VLMFAST_HREDUCE(first, vmin);
  const int64_t pred = first[0];  // 0 for a row of -inf (mx == -inf on every lane), as torch.argmax

  const vf8 m = splat(mx);
  const vi8 pv = splati(static_cast<int32_t>(pred));
  const vf8 vzero = splat(0.0f);
  vf8 sa = vzero, sb = vzero;
  int64_t c0 = 0;
  for (; c0 + 2 * kLanes <= full; c0 += 2 * kLanes) {
    const vf8 ea = exp_nonpos(load8(x + c0) - m);
    const vf8 eb = exp_nonpos(load8(x + c0 + kLanes) - m);
    sa += (lane + static_cast<int32_t>(c0)) == pv ? vzero : ea;
    sb += (lane + static_cast<int32_t>(c0 + kLanes)) == pv ? vzero : eb;
  }
  if (c0 < full) {
    const vf8 e = exp_nonpos(load8(x + c0) - m);
    sa += (lane + static_cast<int32_t>(c0)) == pv ? vzero : e;
  }
  if (rem) {
    const vf8 e = exp_nonpos(load8(tail) - m);
    sb += (in_tail & ((lane + static_cast<int32_t>(full)) != pv)) ? e : vzero;
  }
  sa += sb;
  VLMFAST_HREDUCE(sa, vadd);  // pairwise
  const float rest = sa[0];
  const float s = 1.0f + rest;
  const float inv = 1.0f / s;
  // log1p(rest) = log(s) + (rest - (s - 1)) / s: s - 1 and rest - (s - 1) are exact (the rounding error of s).
  const float log1p_rest = std::log(s) + (rest - (s - 1.0f)) * inv;
  out.lse = mx + log1p_rest;
  out.conf = inv;
  out.pred = pred;
  if (valid) {
    // lse - z_y = (mx - z_y) + log1p(rest), in float64 (mx - z_y overflows float32 for finite logits)
    const double l1p = static_cast<double>(log1p_rest);
    double loss = (1.0 - eps) * ((static_cast<double>(mx) - static_cast<double>(x[y])) + l1p);
    if (kSmooth) {
      const vd4 t = slo + shi;
      const double mean = ((t[0] + t[1]) + (t[2] + t[3])) / static_cast<double>(C);
      loss += eps * ((static_cast<double>(mx) - mean) + l1p);
    }
    out.loss = static_cast<float>(loss);
  } else {
    out.loss = 0.0f;
  }
  return true;
}

// A row holding a NaN or +inf: pred = the first NaN if any (torch.argmax counts NaN as the maximum), else the
// first maximum; then the plain mx + log(sum exp(z - mx)), which is NaN here (NaN - mx, or inf - inf), so lse,
// conf and the loss of a valid row come out NaN, as in torch.
void row_fwd_scalar(const float* x, int64_t C, int64_t y, bool valid, double eps, RowOut& out) {
  float mx = x[0];
  int64_t pred = 0;
  for (int64_t c = 1; c < C && !std::isnan(mx); ++c) {
    const float v = x[c];
    if (v > mx || std::isnan(v)) {
      mx = v;
      pred = c;
    }
  }
  double s = 0.0, sum = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    s += std::exp(static_cast<double>(x[c]) - static_cast<double>(mx));
    sum += static_cast<double>(x[c]);
  }
  const double lse = static_cast<double>(mx) + std::log(s);
  out.lse = static_cast<float>(lse);
  out.conf = static_cast<float>(std::exp(static_cast<double>(mx) - lse));
  out.pred = pred;
  if (valid) {
    double loss = (1.0 - eps) * (lse - static_cast<double>(x[y]));
    if (eps != 0.0) loss += eps * (lse - sum / static_cast<double>(C));
    out.loss = static_cast<float>(loss);
  } else {
    out.loss = 0.0f;
  }
}

struct FwdArgs {
  const float* z;
  int64_t z_rs, C;
  const int64_t* labels;
  int64_t labels_s;
  float* loss;
  int64_t loss_s;
  float* lse;
  int64_t lse_s;
  float* conf;
  int64_t conf_s;
  int64_t* pred;
  int64_t pred_s;
  double eps;
  int64_t ignore_index;
};

template <bool kSmooth>
VLMFAST_INLINE void fwd_rows_impl(const FwdArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t y = a.labels[r * a.labels_s];
    const bool valid = y != a.ignore_index && y >= 0 && y < a.C;
    const int64_t yy = valid ? y : 0;
    const float* x = a.z + r * a.z_rs;
    RowOut o;
    if (!row_fwd<kSmooth>(x, a.C, yy, valid, a.eps, o)) row_fwd_scalar(x, a.C, yy, valid, a.eps, o);
    a.loss[r * a.loss_s] = o.loss;
    a.lse[r * a.lse_s] = o.lse;
    a.conf[r * a.conf_s] = o.conf;
    a.pred[r * a.pred_s] = o.pred;
  }
}

VLMFAST_CLONES void fwd_rows(const FwdArgs& a, int64_t r0, int64_t r1) {
  if (a.eps != 0.0) {
    fwd_rows_impl<true>(a, r0, r1);
  } else {
    fwd_rows_impl<false>(a, r0, r1);
  }
}

struct BwdArgs {
  float* z;
  int64_t z_rs, C;
  const float* lse;
  int64_t lse_s;
  const int64_t* labels;
  int64_t labels_s;
  const float* grad;
  int64_t grad_s;
  float off;        // eps / C
  float one_m_eps;  // 1 - eps
  int64_t ignore_index;
};

// dz of one valid row, in place: g ((exp(z - lse) - eps/C) - (1 - eps) [c == y]), in torch's order of operations.
VLMFAST_INLINE void row_bwd(float* x, int64_t C, int64_t y, float lse, float g, float off, float one_m_eps) {
  const vf8 L = splat(lse), O = splat(off), G = splat(g);
  const float zy = x[y];
  const int64_t full = C / kLanes * kLanes;
  const int64_t rem = C - full;
  for (int64_t c0 = 0; c0 < full; c0 += kLanes) store8(x + c0, (exp_ftz(load8(x + c0) - L) - O) * G);
  if (rem) {
    alignas(32) float tail[kLanes] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t j = 0; j < rem; ++j) tail[j] = x[full + j];
    const vf8 d = (exp_ftz(load8(tail) - L) - O) * G;
    for (int64_t j = 0; j < rem; ++j) x[full + j] = d[j];
  }
  x[y] = ((exp_ftz(splat(zy - lse))[0] - off) - one_m_eps) * g;
}

VLMFAST_CLONES void bwd_rows(const BwdArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t y = a.labels[r * a.labels_s];
    float* x = a.z + r * a.z_rs;
    if (y != a.ignore_index && y >= 0 && y < a.C) {
      row_bwd(x, a.C, y, a.lse[r * a.lse_s], a.grad[r * a.grad_s], a.off, a.one_m_eps);
    } else {
      std::fill(x, x + a.C, 0.0f);
    }
  }
}

// ---- argument checks (the Python layer validates first; these name the argument) ----

void check_z(const TensorView& z, bool in_place) {
  check_view(z, "z", DType::Float32, 2, -1);
  const int64_t R = z.size(0), C = z.size(1);
  VLMFAST_CHECK(C >= 1 && C <= std::numeric_limits<int32_t>::max() - kLanes,
                "z: expected 1 <= C < 2^31 classes, got ", C);
  VLMFAST_CHECK(R >= 0, "z: expected R >= 0 rows, got ", R);
  VLMFAST_CHECK(z.stride(1) == 1 || C == 1, "z: expected column stride 1, got ", z.stride(1));
  VLMFAST_CHECK(z.stride(0) >= 0, "z: expected a non-negative row stride, got ", z.stride(0));
  if (in_place) {
    VLMFAST_CHECK(R <= 1 || z.stride(0) >= C, "z: rows overlap (row stride ", z.stride(0), " < C = ", C,
                  "); the backward writes dz in place");
  }
}

void check_vec(const TensorView& t, const char* name, DType dtype, int64_t R, bool output) {
  check_view(t, name, dtype, 1, -1);
  VLMFAST_CHECK(t.size(0) == R, name, ": expected shape (", R, ",) like z's rows, got (", t.size(0), ",)");
  VLMFAST_CHECK(t.stride(0) >= (output && R > 1 ? 1 : 0), name, ": expected a ", output ? "positive" : "non-negative",
                " stride, got ", t.stride(0));
}

void check_eps(double eps) {
  VLMFAST_CHECK(eps >= 0.0 && eps <= 1.0, "label_smoothing: expected a value in [0, 1], got ", eps);
}


}  // namespace

void prompt_logits_rows_fwd_cpu(const TensorView& z, const TensorView& labels, double label_smoothing,
                                int64_t ignore_index, const TensorView& loss, const TensorView& lse,
                                const TensorView& conf, const TensorView& pred, int num_threads) {
  check_z(z, /*in_place=*/false);
  const int64_t R = z.size(0), C = z.size(1);
  check_vec(labels, "labels", DType::Int64, R, false);
  check_eps(label_smoothing);
  check_vec(loss, "loss", DType::Float32, R, true);
  check_vec(lse, "lse", DType::Float32, R, true);
  check_vec(conf, "conf", DType::Float32, R, true);
  check_vec(pred, "pred", DType::Int64, R, true);
  if (R == 0) return;
  const FwdArgs a{z.data<const float>(), z.stride(0), C, labels.data<const int64_t>(), labels.stride(0),
                  loss.data<float>(), loss.stride(0), lse.data<float>(), lse.stride(0), conf.data<float>(),
                  conf.stride(0), pred.data<int64_t>(), pred.stride(0), label_smoothing, ignore_index};
  const int64_t rows = std::max<int64_t>(1, kBlockElems / C);
  const int64_t blocks = (R + rows - 1) / rows;
  const int threads = pick_threads(num_threads, R * C, R);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t b = 0; b < blocks; ++b) fwd_rows(a, b * rows, std::min(R, (b + 1) * rows));
}

void prompt_logits_rows_bwd_cpu(const TensorView& z, const TensorView& lse, const TensorView& labels,
                                const TensorView& grad, double label_smoothing, int64_t ignore_index,
                                int num_threads) {
  check_z(z, /*in_place=*/true);
  const int64_t R = z.size(0), C = z.size(1);
  check_vec(lse, "lse", DType::Float32, R, false);
  check_vec(labels, "labels", DType::Int64, R, false);
  check_vec(grad, "grad", DType::Float32, R, false);
  check_eps(label_smoothing);
  if (R == 0) return;
  const BwdArgs a{z.data<float>(),
                  z.stride(0),
                  C,
                  lse.data<const float>(),
                  lse.stride(0),
                  labels.data<const int64_t>(),
                  labels.stride(0),
                  grad.data<const float>(),
                  grad.stride(0),
                  static_cast<float>(label_smoothing / static_cast<double>(C)),
                  static_cast<float>(1.0 - label_smoothing),
                  ignore_index};
  const int64_t rows = std::max<int64_t>(1, kBlockElems / C);
  const int64_t blocks = (R + rows - 1) / rows;
  const int threads = pick_threads(num_threads, R * C, R);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t b = 0; b < blocks; ++b) bwd_rows(a, b * rows, std::min(R, (b + 1) * rows));
}

}  // namespace vlmfast
