// kmeans_assign on the CPU: the row kernel of the k-means assignment step (the GEMM is torch's, on row chunks).
// Pass 1, OpenMP over blocks of rows: one read of each score row (in L1/L2 right after the GEMM), an eight-lane
// running max with per-lane first indices (strict >), merged by (value, lowest index); rows with a NaN or -inf
// score fall back to a scalar loop with the same semantics. Pass 2, OpenMP over slices of feature columns: each
// thread adds its columns of every labelled row into the float64 sums in row order (deterministic). The block
// functions are cloned for x86-64-v3 (AVX2, FMA) and baseline x86-64, picked at load time. Semantics: see
// kmeans_assign.h.
#include "kmeans_assign.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "simd.h"
#include "threads.h"

namespace vlmfast {
namespace {

constexpr int64_t kBlockElems = 1 << 13;  // scores per OpenMP task of pass 1 (a block of whole rows, at least one)
constexpr int64_t kMinSliceCols = 16;     // feature columns per thread at least in pass 2

using namespace simd;  // NOLINT: the eight-lane helpers of simd.h

struct Best {
  int64_t label;
  float value;
};

// v_j of one row: z_j (ip) or 2 z_j - cc_j (l2). 2 z_j is exact, so a contracted fma(2, z, -cc) rounds the same.
template <bool kL2>
VLMFAST_INLINE float score_of(const float* z, const float* cc, int64_t j) {
  return kL2 ? 2.0f * z[j] - cc[j] : z[j];
}

// The exact semantics, any values: the first index of the maximum over the non-NaN v_j; -1 when all are NaN.
template <bool kL2>
VLMFAST_INLINE Best row_best_scalar(const float* z, const float* cc, int64_t K) {
  Best b{-1, -std::numeric_limits<float>::infinity()};
  for (int64_t j = 0; j < K; ++j) {
    const float v = score_of<kL2>(z, cc, j);
    if (v != v) continue;
    if (b.label < 0 || v > b.value) {
      b.label = j;
      b.value = v;
    }
  }
  return b;
}

// Vectorised: false (nothing written) when the row holds a NaN or -inf v_j (the scalar path then runs). Otherwise
// every v_j > -inf, so the per-lane strict > from -inf takes each lane's first maximum, and the lanes merge by the
// maximum value, then the lowest index = the first maximum of the row.
template <bool kL2>
VLMFAST_INLINE bool row_best_vec(const float* z, const float* cc, int64_t K, Best& out) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t full = K / kLanes * kLanes;
  const int64_t rem = K - full;
  const vi8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const vf8 vninf = splat(ninf);
  const vf8 two = splat(2.0f);
  vf8 mxv = vninf;
  vi8 idxv = splati(0);
  vi8 ok = splati(-1);
  for (int64_t c0 = 0; c0 < full; c0 += kLanes) {
    vf8 v = load8(z + c0);
    if (kL2) v = two * v - load8(cc + c0);
    ok &= v > vninf;  // false for NaN and -inf
    const vi8 gt = v > mxv;
    mxv = gt ? v : mxv;
    idxv = gt ? lane + static_cast<int32_t>(c0) : idxv;
  }
  if (rem) {
    alignas(32) float tail[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) tail[j] = j < rem ? score_of<kL2>(z, cc, full + j) : ninf;
    const vf8 v = load8(tail);
    const vi8 in_tail = lane < static_cast<int32_t>(rem);
    ok &= (v > vninf) | ~in_tail;
    const vi8 gt = v > mxv;
    mxv = gt ? v : mxv;
    idxv = gt ? lane + static_cast<int32_t>(full) : idxv;
  }
  VLMFAST_HREDUCE(ok, vand);
  if (!ok[0]) return false;
  vf8 mxall = mxv;
  VLMFAST_HREDUCE(mxall, vmax);
  vi8 first = mxv == mxall ? idxv : splati(std::numeric_limits<int32_t>::max());
  VLMFAST_HREDUCE(first, vmin);
  out.label = first[0];
  out.value = mxall[0];
  return true;
}

struct Args {
  const float* z;
  int64_t z_rs, K;
  const float* x;
  int64_t x_rs, x_cs, D;
  const float* xx;
  int64_t xx_s;
  const float* cc;
  bool l2;
  int64_t* labels;
  int64_t labels_s;
  float* scores;
  int64_t scores_s;
  double* sums;
  int64_t* counts;
  int64_t counts_s;
};

template <bool kL2>
VLMFAST_INLINE void assign_rows_impl(const Args& a, int64_t r0, int64_t r1) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t r = r0; r < r1; ++r) {
    const float* z = a.z + r * a.z_rs;
    Best b;
    if (!row_best_vec<kL2>(z, a.cc, a.K, b)) b = row_best_scalar<kL2>(z, a.cc, a.K);
    float score = b.value;
    if (b.label < 0) {
      score = nan;
    } else if (kL2) {
      const float s = a.xx[r * a.xx_s] - b.value;
      score = s < 0.0f ? 0.0f : s;  // NaN stays NaN
    }
    a.labels[r * a.labels_s] = b.label;
    a.scores[r * a.scores_s] = score;
  }
}

VLMFAST_CLONES void assign_rows(const Args& a, int64_t r0, int64_t r1) {
  if (a.l2) {
    assign_rows_impl<true>(a, r0, r1);
  } else {
    assign_rows_impl<false>(a, r0, r1);
  }
}

// sums[labels[r], f0:f1] += x[r, f0:f1] for r = 0 .. R-1 in order (float64).
VLMFAST_CLONES void accumulate_cols(const Args& a, int64_t R, int64_t f0, int64_t f1) {
  for (int64_t r = 0; r < R; ++r) {
    const int64_t j = a.labels[r * a.labels_s];
    if (j < 0) continue;
    double* dst = a.sums + j * a.D;
    const float* src = a.x + r * a.x_rs;
    if (a.x_cs == 1) {
      for (int64_t f = f0; f < f1; ++f) dst[f] += static_cast<double>(src[f]);
    } else {
      for (int64_t f = f0; f < f1; ++f) dst[f] += static_cast<double>(src[f * a.x_cs]);
    }
  }
}

// ---- argument checks (the Python layer validates first; these name the argument) ----

void check_vec(const TensorView& t, const char* name, DType dtype, int64_t n, const char* like, bool output) {
  check_view(t, name, dtype, 1, -1);
  VLMFAST_CHECK(t.size(0) == n, name, ": expected shape (", n, ",) like ", like, ", got (", t.size(0), ",)");
  VLMFAST_CHECK(t.stride(0) >= (output && n > 1 ? 1 : 0), name, ": expected a ", output ? "positive" : "non-negative",
                " stride, got ", t.stride(0));
}


}  // namespace

void kmeans_assign_rows_cpu(const TensorView& z, const TensorView& x, const TensorView& xx, const TensorView& cc,
                            bool l2, const TensorView& labels, const TensorView& scores, const TensorView& sums,
                            const TensorView& counts, int num_threads) {
  check_view(z, "z", DType::Float32, 2, -1);
  const int64_t R = z.size(0), K = z.size(1);
  VLMFAST_CHECK(K >= 1 && K <= std::numeric_limits<int32_t>::max() - kLanes, "z: expected 1 <= k < 2^31 centroids, got ",
                K);
  VLMFAST_CHECK(R >= 0, "z: expected R >= 0 rows, got ", R);
  VLMFAST_CHECK(z.stride(1) == 1 || K == 1, "z: expected column stride 1, got ", z.stride(1));
  VLMFAST_CHECK(z.stride(0) >= 0, "z: expected a non-negative row stride, got ", z.stride(0));
  check_view(x, "x", DType::Float32, 2, -1);
  const int64_t D = x.size(1);
  VLMFAST_CHECK(x.size(0) == R, "x: expected ", R, " rows like z, got ", x.size(0));
  VLMFAST_CHECK(D >= 1, "x: expected d >= 1 features, got ", D);
  VLMFAST_CHECK(x.stride(0) >= 0 && x.stride(1) >= 0, "x: expected non-negative strides, got (", x.stride(0), ", ",
                x.stride(1), ")");
  if (l2) {
    VLMFAST_CHECK(xx.ptr != 0 || R == 0, "xx: required for metric l2");
    VLMFAST_CHECK(cc.ptr != 0, "cc: required for metric l2");
    check_vec(xx, "xx", DType::Float32, R, "z's rows", false);
    check_vec(cc, "cc", DType::Float32, K, "z's columns", false);
    VLMFAST_CHECK(cc.stride(0) == 1 || K == 1, "cc: expected stride 1, got ", cc.stride(0));
  }
  check_vec(labels, "labels", DType::Int64, R, "z's rows", true);
  check_vec(scores, "scores", DType::Float32, R, "z's rows", true);
  check_view(sums, "sums", DType::Float64, 2, -1);
  VLMFAST_CHECK(sums.size(0) == K && sums.size(1) == D, "sums: expected shape (", K, ", ", D, "), got (", sums.size(0),
                ", ", sums.size(1), ")");
  VLMFAST_CHECK(is_contiguous(sums), "sums: expected a contiguous (k, d) buffer");
  check_vec(counts, "counts", DType::Int64, K, "z's columns", true);
  if (R == 0) return;

  const Args a{z.data<const float>(), z.stride(0), K, x.data<const float>(), x.stride(0), x.stride(1), D,
               l2 ? xx.data<const float>() : nullptr, l2 ? xx.stride(0) : 0, l2 ? cc.data<const float>() : nullptr, l2,
               labels.data<int64_t>(), labels.stride(0), scores.data<float>(), scores.stride(0), sums.data<double>(),
               counts.data<int64_t>(), counts.stride(0)};

  // Pass 1: labels and scores, rows independent.
  const int64_t rows = std::max<int64_t>(1, kBlockElems / K);
  const int64_t blocks = (R + rows - 1) / rows;
  const int t1 = pick_threads(num_threads, R * K, blocks);
#pragma omp parallel for schedule(dynamic, 1) num_threads(t1) if (t1 > 1)
  for (int64_t b = 0; b < blocks; ++b) assign_rows(a, b * rows, std::min(R, (b + 1) * rows));

  // Pass 2: sums, one slice of feature columns per task, rows in order inside each.
  const int64_t max_slices = std::max<int64_t>(1, D / kMinSliceCols);
  const int t2 = pick_threads(num_threads, R * D, max_slices);
  const int64_t width = (D + t2 - 1) / t2;
#pragma omp parallel for schedule(static, 1) num_threads(t2) if (t2 > 1)
  for (int s = 0; s < t2; ++s) {
    const int64_t f0 = std::min(D, s * width), f1 = std::min(D, (s + 1) * width);
    if (f0 < f1) accumulate_cols(a, R, f0, f1);
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t j = a.labels[r * a.labels_s];
    if (j >= 0) ++a.counts[j * a.counts_s];
  }
}

}  // namespace vlmfast
