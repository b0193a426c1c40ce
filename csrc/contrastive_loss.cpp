// contrastive_loss on the CPU: the chunk kernels of the symmetric CLIP loss (the cosine GEMM is torch's, on row
// chunks). Row parts: OpenMP over blocks of whole rows, each row read in place (twice for the lse: a max pass and
// an exp pass). Column parts: OpenMP over blocks of 64 columns, each block walking down the chunk's rows with
// eight-lane accumulators per eight columns. Each row / column block is computed by one thread in a fixed order,
// so nothing depends on the number of threads. The exp is the eight-lane polynomial of simd.h; the block
// functions are cloned for x86-64-v3 (AVX2, FMA) and baseline x86-64. Semantics: see contrastive_loss.h.
#include "contrastive_loss.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"
#include "threads.h"

namespace vlmfast {
namespace {

constexpr int64_t kBlockElems = 1 << 13;          // elements per row task (a block of whole rows, at least one)
constexpr int64_t kColVecs = 8;                   // eight-lane vectors per column block
constexpr int64_t kColBlock = kColVecs * 8;       // columns per column task
constexpr int64_t kRowRun = 8 * 8;                // elements summed in float32 along a row before the float64 flush
constexpr int64_t kColRun = 16;                   // rows summed in float32 down a column before the float64 flush

using namespace simd;  // NOLINT: the eight-lane helpers of simd.h

constexpr float kNinf = -std::numeric_limits<float>::infinity();

// Lane-wise max that propagates NaN (either operand NaN -> NaN).
VLMFAST_INLINE vf8 vmax_nan(vf8 a, vf8 b) { return ((a > b) | (a != a)) ? a : b; }

VLMFAST_INLINE vi8 lanes_below(int64_t n) {
  const vi8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  return lane < static_cast<int32_t>(n);
}

// The first n (1..7) floats at p, the other lanes 0.
VLMFAST_INLINE vf8 load_n(const float* p, int64_t n) {
  alignas(32) float t[kLanes] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t k = 0; k < n; ++k) t[k] = p[k];
  return load8(t);
}

VLMFAST_INLINE void store_n(float* p, vf8 v, int64_t n) {
  alignas(32) float t[kLanes];
  store8(t, v);
  for (int64_t k = 0; k < n; ++k) p[k] = t[k];
}

// Eight float64 lanes fed with float32 partial sums.
struct DAcc {
  vd4 lo = {0.0, 0.0, 0.0, 0.0};
  vd4 hi = {0.0, 0.0, 0.0, 0.0};
  VLMFAST_INLINE void add(vf8 v) {
    vf4 a, b;
    std::memcpy(&a, &v, sizeof(a));
    std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof(a), sizeof(b));
    lo += __builtin_convertvector(a, vd4);
    hi += __builtin_convertvector(b, vd4);
  }
  VLMFAST_INLINE double total() const {
    const vd4 t = lo + hi;
    return (t[0] + t[1]) + (t[2] + t[3]);
  }
  VLMFAST_INLINE double lane(int64_t k) const { return k < 4 ? lo[k] : hi[k - 4]; }
};

// The float32 (hi, lo) split of a float64 value; lo = 0 when hi is not finite.
VLMFAST_INLINE void split(double v, float& hi, float& lo) {
  hi = static_cast<float>(v);
  lo = std::isfinite(hi) ? static_cast<float>(v - static_cast<double>(hi)) : 0.0f;
}

// Contiguous float32 copy of a 1-D view, transformed by f and zero-padded to a multiple of eight.
template <class F>
std::vector<float> padded_copy(const TensorView& t, int64_t n, F f) {
  std::vector<float> out(static_cast<size_t>((n + kLanes - 1) / kLanes * kLanes + kLanes), 0.0f);
  const float* p = t.data<const float>();
  for (int64_t j = 0; j < n; ++j) out[static_cast<size_t>(j)] = f(p[j * t.stride(0)]);
  return out;
}

// ---- lse ----

struct LseArgs {
  const float* c;
  int64_t c_rs, R, B;
  float S;
  double bias;
  float* lse_row;
  int64_t lse_s;
  float* col_max;
  int64_t cmax_s;
  float* col_sum;
  int64_t csum_s;
};

VLMFAST_CLONES void lse_rows_block(const LseArgs& a, int64_t r0, int64_t r1) {
  const int64_t B = a.B, full = B / kLanes * kLanes, rem = B - full;
  const vf8 S = splat(a.S), zero = splat(0.0f), ninf = splat(kNinf);
  const vi8 tail = lanes_below(rem);
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = a.c + r * a.c_rs;
    vf8 mv = ninf;
    for (int64_t j = 0; j < full; j += kLanes) mv = vmax_nan(mv, load8(x + j) * S);
    if (rem) mv = vmax_nan(mv, tail ? load_n(x + full, rem) * S : ninf);
    VLMFAST_HREDUCE(mv, vmax_nan);
    const float m = mv[0];
    const vf8 M = splat(m);
    DAcc acc;
    for (int64_t j0 = 0; j0 < full; j0 += kRowRun) {
      const int64_t je = std::min(full, j0 + kRowRun);
      vf8 s = zero;
      for (int64_t j = j0; j < je; j += kLanes) s += exp_nonpos(load8(x + j) * S - M);
      acc.add(s);
    }
    if (rem) {
      const vf8 e = exp_nonpos(load_n(x + full, rem) * S - M);
      acc.add(tail ? e : zero);
    }
    const double lse = static_cast<double>(m) + a.bias + std::log(acc.total());
    a.lse_row[r * a.lse_s] = static_cast<float>(lse);
  }
}

// Columns j0 .. j0 + w - 1 (w <= 64): per-column max over the chunk's rows, then the exp sums against it, then
// the float64 merge into (col_max, col_sum).
VLMFAST_CLONES void lse_cols_block(const LseArgs& a, int64_t j0) {
  const int64_t w = std::min(kColBlock, a.B - j0);
  const int64_t nfull = w / kLanes, rem = w - nfull * kLanes;
  const int64_t nv = nfull + (rem ? 1 : 0);
  const vf8 S = splat(a.S), zero = splat(0.0f);
  vf8 mv[kColVecs];
  for (int64_t k = 0; k < nv; ++k) mv[k] = splat(kNinf);
  for (int64_t r = 0; r < a.R; ++r) {
    const float* x = a.c + r * a.c_rs + j0;
    for (int64_t k = 0; k < nfull; ++k) mv[k] = vmax_nan(mv[k], load8(x + k * kLanes) * S);
    if (rem) mv[nfull] = vmax_nan(mv[nfull], load_n(x + nfull * kLanes, rem) * S);
  }
  DAcc acc[kColVecs];
  for (int64_t r0 = 0; r0 < a.R; r0 += kColRun) {
    const int64_t re = std::min(a.R, r0 + kColRun);
    vf8 s[kColVecs];
    for (int64_t k = 0; k < nv; ++k) s[k] = zero;
    for (int64_t r = r0; r < re; ++r) {
      const float* x = a.c + r * a.c_rs + j0;
      for (int64_t k = 0; k < nfull; ++k) s[k] += exp_nonpos(load8(x + k * kLanes) * S - mv[k]);
      if (rem) s[nfull] += exp_nonpos(load_n(x + nfull * kLanes, rem) * S - mv[nfull]);
    }
    for (int64_t k = 0; k < nv; ++k) acc[k].add(s[k]);
  }
  const double ninf = -std::numeric_limits<double>::infinity();
  for (int64_t l = 0; l < w; ++l) {
    const int64_t k = l / kLanes, q = l % kLanes;
    const double M = static_cast<double>(mv[k][q]) + a.bias;  // this chunk's column max of z
    const double s = acc[k].lane(q);                           // sum_r exp(z_rj - M)
    float* pm = a.col_max + (j0 + l) * a.cmax_s;
    float* ps = a.col_sum + (j0 + l) * a.csum_s;
    const double old = static_cast<double>(*pm), old_s = static_cast<double>(*ps);
    double nw = old > M ? old : M;  // NaN M -> NaN
    if (std::isnan(old)) nw = old;
    const float f = static_cast<float>(nw);
    const double F = static_cast<double>(f);  // the stored max: col_sum is relative to it
    const double t_old = old == ninf ? 0.0 : old_s * std::exp(old - F);
    const double t_new = M == ninf ? 0.0 : s * std::exp(M - F);
    *pm = f;
    *ps = static_cast<float>(t_old + t_new);
  }
}

// ---- cross ----

struct CrossArgs {
  const float* c;
  int64_t c_rs;
  const float* ct;
  int64_t ct_rs, R, B;
  float S;
  double bias;
  float T;
  const float* tlse_row;
  int64_t tlr_s;
  const float* ntc;  // -tlse_col, contiguous, zero-padded
  float* x_row;
  int64_t xr_s;
  float* x_col;
  int64_t xc_s;
};

VLMFAST_CLONES void cross_rows_block(const CrossArgs& a, int64_t r0, int64_t r1) {
  const int64_t B = a.B, full = B / kLanes * kLanes, rem = B - full;
  const vf8 T = splat(a.T), zero = splat(0.0f);
  const vi8 tail = lanes_below(rem);
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = a.c + r * a.c_rs;
    const float* t = a.ct + r * a.ct_rs;
    const vf8 NT = splat(-a.tlse_row[r * a.tlr_s]);
    DAcc a1, a2;  // sum p c, sum p
    for (int64_t j0 = 0; j0 < full; j0 += kRowRun) {
      const int64_t je = std::min(full, j0 + kRowRun);
      vf8 s1 = zero, s2 = zero;
      for (int64_t j = j0; j < je; j += kLanes) {
        const vf8 p = exp_ftz(load8(t + j) * T + NT);
        s1 += p * load8(x + j);
        s2 += p;
      }
      a1.add(s1);
      a2.add(s2);
    }
    if (rem) {
      vf8 p = exp_ftz(load_n(t + full, rem) * T + NT);
      p = tail ? p : zero;
      a1.add(p * load_n(x + full, rem));
      a2.add(p);
    }
    const double xr = static_cast<double>(a.S) * a1.total() + a.bias * a2.total();
    a.x_row[r * a.xr_s] = static_cast<float>(xr);
  }
}

VLMFAST_CLONES void cross_cols_block(const CrossArgs& a, int64_t j0) {
  const int64_t w = std::min(kColBlock, a.B - j0);
  const int64_t nfull = w / kLanes, rem = w - nfull * kLanes;
  const int64_t nv = nfull + (rem ? 1 : 0);
  const vf8 T = splat(a.T), zero = splat(0.0f);
  vf8 NT[kColVecs];
  for (int64_t k = 0; k < nv; ++k) NT[k] = load8(a.ntc + j0 + k * kLanes);
  DAcc a1[kColVecs], a2[kColVecs];
  for (int64_t r0 = 0; r0 < a.R; r0 += kColRun) {
    const int64_t re = std::min(a.R, r0 + kColRun);
    vf8 s1[kColVecs], s2[kColVecs];
    for (int64_t k = 0; k < nv; ++k) s1[k] = s2[k] = zero;
    for (int64_t r = r0; r < re; ++r) {
      const float* x = a.c + r * a.c_rs + j0;
      const float* t = a.ct + r * a.ct_rs + j0;
      for (int64_t k = 0; k < nfull; ++k) {
        const vf8 q = exp_ftz(load8(t + k * kLanes) * T + NT[k]);
        s1[k] += q * load8(x + k * kLanes);
        s2[k] += q;
      }
      if (rem) {
        const vf8 q = exp_ftz(load_n(t + nfull * kLanes, rem) * T + NT[nfull]);
        s1[nfull] += q * load_n(x + nfull * kLanes, rem);
        s2[nfull] += q;
      }
    }
    for (int64_t k = 0; k < nv; ++k) {
      a1[k].add(s1[k]);
      a2[k].add(s2[k]);
    }
  }
  const double S = static_cast<double>(a.S);
  for (int64_t l = 0; l < w; ++l) {
    const int64_t k = l / kLanes, q = l % kLanes;
    float* px = a.x_col + (j0 + l) * a.xc_s;
    *px = static_cast<float>(static_cast<double>(*px) + (S * a1[k].lane(q) + a.bias * a2[k].lane(q)));
  }
}

// ---- grad ----

struct GradArgs {
  float* c;
  int64_t c_rs;
  const float* ct;
  int64_t ct_rs, R, B;
  float S;
  double bias;
  float T, alpha, beta;
  const float* lse_row;
  int64_t lr_s;
  const float* tlse_row;
  int64_t tlr_s;
  const float* kc_hi;  // bias - lse_col[j] as float32 hi + lo, contiguous, zero-padded
  const float* kc_lo;
  const float* ntc;  // -tlse_col[j], contiguous, zero-padded
  double* sum_dc;    // per-row partials
  double* sum_d;
};

template <bool kTeacher>
VLMFAST_INLINE vf8 grad_d(const GradArgs& a, vf8 cv, vf8 tv, vf8 Rh, vf8 Rl, vf8 NTr, int64_t j) {
  const vf8 S = splat(a.S);
  const vf8 e1 = exp_ftz((cv * S + Rh) + Rl);
  const vf8 e2 = exp_ftz((cv * S + load8(a.kc_hi + j)) + load8(a.kc_lo + j));
  vf8 d = splat(a.alpha) * (e1 + e2);
  if (kTeacher) {
    const vf8 T = splat(a.T);
    const vf8 e3 = exp_ftz(tv * T + NTr);
    const vf8 e4 = exp_ftz(tv * T + load8(a.ntc + j));
    d = d - splat(a.beta) * (e3 + e4);
  }
  return d;
}

template <bool kTeacher>
VLMFAST_INLINE void grad_rows_impl(const GradArgs& a, int64_t r0, int64_t r1) {
  const int64_t B = a.B, full = B / kLanes * kLanes, rem = B - full;
  const vf8 zero = splat(0.0f);
  const vi8 tail = lanes_below(rem);
  for (int64_t r = r0; r < r1; ++r) {
    float* x = a.c + r * a.c_rs;
    const float* t = kTeacher ? a.ct + r * a.ct_rs : nullptr;
    float rh, rl;
    split(a.bias - static_cast<double>(a.lse_row[r * a.lr_s]), rh, rl);
    const vf8 Rh = splat(rh), Rl = splat(rl);
    const vf8 NTr = kTeacher ? splat(-a.tlse_row[r * a.tlr_s]) : zero;
    DAcc a1, a2;  // sum D c, sum D
    for (int64_t j0 = 0; j0 < full; j0 += kRowRun) {
      const int64_t je = std::min(full, j0 + kRowRun);
      vf8 s1 = zero, s2 = zero;
      for (int64_t j = j0; j < je; j += kLanes) {
        const vf8 cv = load8(x + j);
        const vf8 d = grad_d<kTeacher>(a, cv, kTeacher ? load8(t + j) : zero, Rh, Rl, NTr, j);
        store8(x + j, d);
        s1 += d * cv;
        s2 += d;
      }
      a1.add(s1);
      a2.add(s2);
    }
    if (rem) {
      const vf8 cv = load_n(x + full, rem);
      vf8 d = grad_d<kTeacher>(a, cv, kTeacher ? load_n(t + full, rem) : zero, Rh, Rl, NTr, full);
      store_n(x + full, d, rem);
      d = tail ? d : zero;
      a1.add(d * cv);
      a2.add(d);
    }
    a.sum_dc[r] = a1.total();
    a.sum_d[r] = a2.total();
  }
}

VLMFAST_CLONES void grad_rows_block(const GradArgs& a, int64_t r0, int64_t r1, bool teacher) {
  if (teacher) {
    grad_rows_impl<true>(a, r0, r1);
  } else {
    grad_rows_impl<false>(a, r0, r1);
  }
}

// ---- argument checks (the Python layer validates first; these name the argument) ----

void check_c(const TensorView& c, const char* name) {
  check_view(c, name, DType::Float32, 2, -1);
  const int64_t R = c.size(0), B = c.size(1);
  VLMFAST_CHECK(R >= 0 && B >= 0, name, ": bad shape (", R, ", ", B, ")");
  VLMFAST_CHECK(c.stride(1) == 1 || B <= 1, name, ": expected column stride 1, got ", c.stride(1));
  VLMFAST_CHECK(R <= 1 || c.stride(0) >= B, name, ": expected a row stride >= B = ", B, " (rows must not overlap), got ",
                c.stride(0));
}

void check_like_c(const TensorView& t, const char* name, int64_t R, int64_t B) {
  check_view(t, name, DType::Float32, 2, -1);
  VLMFAST_CHECK(t.size(0) == R && t.size(1) == B, name, ": expected shape (", R, ", ", B, ") like c, got (",
                t.size(0), ", ", t.size(1), ")");
  check_c(t, name);
}

void check_vec(const TensorView& t, const char* name, int64_t n, const char* like, bool output) {
  check_view(t, name, DType::Float32, 1, -1);
  VLMFAST_CHECK(t.size(0) == n, name, ": expected shape (", n, ",) like c's ", like, ", got (", t.size(0), ",)");
  VLMFAST_CHECK(t.stride(0) >= (output && n > 1 ? 1 : 0), name, ": expected a ", output ? "positive" : "non-negative",
                " stride, got ", t.stride(0));
}


int64_t rows_per_block(int64_t B) { return std::max<int64_t>(1, kBlockElems / std::max<int64_t>(B, 1)); }

}  // namespace

void contrastive_lse_rows_cpu(const TensorView& c, double scale, double bias, const TensorView& lse_row,
                              const TensorView& col_max, const TensorView& col_sum, int num_threads) {
  check_c(c, "c");
  const int64_t R = c.size(0), B = c.size(1);
  check_vec(lse_row, "lse_row", R, "rows", true);
  check_vec(col_max, "col_max", B, "columns", true);
  check_vec(col_sum, "col_sum", B, "columns", true);
  if (R == 0 || B == 0) return;
  const LseArgs a{c.data<const float>(), c.stride(0),          R, B, static_cast<float>(scale), bias,
                  lse_row.data<float>(), lse_row.stride(0),    col_max.data<float>(),       col_max.stride(0),
                  col_sum.data<float>(), col_sum.stride(0)};
  const int64_t rows = rows_per_block(B);
  const int64_t row_blocks = (R + rows - 1) / rows;
  const int64_t col_blocks = (B + kColBlock - 1) / kColBlock;
  const int threads = pick_threads(num_threads, R * B, std::max(row_blocks, col_blocks));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t b = 0; b < row_blocks; ++b) lse_rows_block(a, b * rows, std::min(R, (b + 1) * rows));
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < col_blocks; ++b) lse_cols_block(a, b * kColBlock);
  }
}

void contrastive_cross_rows_cpu(const TensorView& c, double scale, double bias, const TensorView& ct, double tscale,
                                const TensorView& tlse_row, const TensorView& tlse_col, const TensorView& x_row,
                                const TensorView& x_col, int num_threads) {
  check_c(c, "c");
  const int64_t R = c.size(0), B = c.size(1);
  check_like_c(ct, "ct", R, B);
  check_vec(tlse_row, "tlse_row", R, "rows", false);
  check_vec(tlse_col, "tlse_col", B, "columns", false);
  check_vec(x_row, "x_row", R, "rows", true);
  check_vec(x_col, "x_col", B, "columns", true);
  if (R == 0 || B == 0) return;
  const std::vector<float> ntc = padded_copy(tlse_col, B, [](float v) { return -v; });
  const CrossArgs a{c.data<const float>(),
                    c.stride(0),
                    ct.data<const float>(),
                    ct.stride(0),
                    R,
                    B,
                    static_cast<float>(scale),
                    bias,
                    static_cast<float>(tscale),
                    tlse_row.data<const float>(),
                    tlse_row.stride(0),
                    ntc.data(),
                    x_row.data<float>(),
                    x_row.stride(0),
                    x_col.data<float>(),
                    x_col.stride(0)};
  const int64_t rows = rows_per_block(B);
  const int64_t row_blocks = (R + rows - 1) / rows;
  const int64_t col_blocks = (B + kColBlock - 1) / kColBlock;
  const int threads = pick_threads(num_threads, R * B, std::max(row_blocks, col_blocks));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t b = 0; b < row_blocks; ++b) cross_rows_block(a, b * rows, std::min(R, (b + 1) * rows));
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < col_blocks; ++b) cross_cols_block(a, b * kColBlock);
  }
}

std::pair<double, double> contrastive_grad_rows_cpu(const TensorView& c, double scale, double bias,
                                                    const TensorView& lse_row, const TensorView& lse_col,
                                                    double alpha, double beta, const TensorView* ct, double tscale,
                                                    const TensorView* tlse_row, const TensorView* tlse_col,
                                                    int num_threads) {
  check_c(c, "c");
  const int64_t R = c.size(0), B = c.size(1);
  check_vec(lse_row, "lse_row", R, "rows", false);
  check_vec(lse_col, "lse_col", B, "columns", false);
  const bool teacher = ct != nullptr;
  if (teacher) {
    check_like_c(*ct, "ct", R, B);
    VLMFAST_CHECK(tlse_row != nullptr, "tlse_row: required when ct is given, got None");
    VLMFAST_CHECK(tlse_col != nullptr, "tlse_col: required when ct is given, got None");
    check_vec(*tlse_row, "tlse_row", R, "rows", false);
    check_vec(*tlse_col, "tlse_col", B, "columns", false);
  }
  if (R == 0 || B == 0) return {0.0, 0.0};
  std::vector<float> kc_hi(static_cast<size_t>((B + kLanes - 1) / kLanes * kLanes + kLanes), 0.0f), kc_lo = kc_hi;
  {
    const float* p = lse_col.data<const float>();
    for (int64_t j = 0; j < B; ++j) {
      split(bias - static_cast<double>(p[j * lse_col.stride(0)]), kc_hi[static_cast<size_t>(j)],
            kc_lo[static_cast<size_t>(j)]);
    }
  }
  const std::vector<float> ntc =
      teacher ? padded_copy(*tlse_col, B, [](float v) { return -v; }) : std::vector<float>();
  std::vector<double> sum_dc(static_cast<size_t>(R)), sum_d(static_cast<size_t>(R));
  const GradArgs a{c.data<float>(),
                   c.stride(0),
                   teacher ? ct->data<const float>() : nullptr,
                   teacher ? ct->stride(0) : 0,
                   R,
                   B,
                   static_cast<float>(scale),
                   bias,
                   static_cast<float>(tscale),
                   static_cast<float>(alpha),
                   static_cast<float>(beta),
                   lse_row.data<const float>(),
                   lse_row.stride(0),
                   teacher ? tlse_row->data<const float>() : nullptr,
                   teacher ? tlse_row->stride(0) : 0,
                   kc_hi.data(),
                   kc_lo.data(),
                   teacher ? ntc.data() : nullptr,
                   sum_dc.data(),
                   sum_d.data()};
  const int64_t rows = rows_per_block(B);
  const int64_t blocks = (R + rows - 1) / rows;
  const int threads = pick_threads(num_threads, R * B, blocks);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t b = 0; b < blocks; ++b) grad_rows_block(a, b * rows, std::min(R, (b + 1) * rows), teacher);
  double s_dc = 0.0, s_d = 0.0;
  for (int64_t r = 0; r < R; ++r) {
    s_dc += sum_dc[static_cast<size_t>(r)];
    s_d += sum_d[static_cast<size_t>(r)];
  }
  return {s_dc, s_d};
}

}  // namespace vlmfast
