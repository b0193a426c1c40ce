// calibration_bins on the CPU: OpenMP over (model, row block) tasks, thread-local bin accumulators reduced in a
// fixed thread order at the end. Each row is converted to float once into a thread-local buffer, then read
// twice from L1: a max pass (with the non-finite check) and an exp pass (sum of p and of p^2). The exp is a
// branch-free polynomial the compiler vectorises; the row functions are cloned for x86-64-v3 (AVX2, FMA, F16C)
// and baseline x86-64 and picked at load time, so the module runs on any x86-64 CPU.
// Semantics: see calibration_bins.h.
#include "calibration_bins.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

namespace vlmfast {
namespace {

constexpr int64_t kRowsPerTask = 32;

using namespace simd;  // NOLINT: the eight-lane helpers of simd.h

// The scalar end of a float32 row from rest = sum_{c != pred} exp(x_c - mx), rest2 (the squares) and e_y =
// exp(x_y - mx), which is exactly 1 when y is the prediction (exp_nonpos(0) == 1). One division, no branch:
//   s = 1 + rest, conf = 1 / s;
//   log1p(rest) = log(s) + (rest - (s - 1)) / s: s - 1 and rest - (s - 1) are exact (the rounding error of s),
//     so one logf gives log1p to about an ulp (glibc's log1pf costs twice as much: the row's largest scalar cost);
//   Brier = sum_c p_c^2 - 2 p_y + 1 = (1 - p_y)^2 + sum_{c != y} p_c^2
//         = ((1 - e_y + rest)^2 + (1 - e_y^2 + rest2)) / s^2,
//     which for y == pred is (rest^2 + rest2) / s^2 exactly: no cancellation of 1 - 2 p_y + p_y^2 near
//     saturation (and 1 - e_y >= 0 otherwise).
struct RowTail {
  float conf, log1p_rest, brier;
};

VLMFAST_INLINE RowTail row_tail(float rest, float rest2, float ey) {
  const float s = 1.0f + rest;
  const float inv = 1.0f / s;
  const float u = (1.0f - ey) + rest;
  const float w = (1.0f - ey * ey) + rest2;
  return RowTail{inv, std::log(s) + (rest - (s - 1.0f)) * inv, (u * u + w) * (inv * inv)};
}

struct RowResult {
  float conf;
  double nll;    // float64: (mx - x_y) overflows float32 for finite logits; float64 rows: float64 throughout
  double brier;
  int64_t pred;
  bool finite;
};

inline int64_t padded(int64_t C) { return (C + kLanes - 1) / kLanes * kLanes; }

// Statistics of one float32 row `x` (length C >= 1). Pass 1 reads `x` in place (whole vectors, then the last
// C mod 8 elements through an 8-lane buffer padded with -inf): per-lane running max with the first index
// reaching it (strict >) and a NaN/inf flag; the lanes are then merged by max value and lowest index, which is
// the first argmax of the row. Pass 1 also leaves the row in `buf` (padded(C) floats; whole vectors are not
// stored again when x == buf already, `in_buf`), padded with -inf, and the argmax is then overwritten with -inf.
// Pass 2 (over buf, two vectors per step for instruction-level parallelism) thus sums every class but the
// argmax: rest = sum_{c != pred} exp(x_c - mx) (and the squares), and s = 1 + rest. Leaving the argmax's exact
// 1 out of the running sums keeps the small terms of a near-saturated row (gaps of ~17-20 at C >= 10, each term
// below half an ulp of 1) from being rounded away one by one: conf = 1 / (1 + rest) rounds like an accurately
// summed softmax (float64 rounded to float32, away from a 2^-25 < rest <= 2^-24 band where only float32's
// 1 + rest rounds to 1). The copy costs one store per vector in pass 1 and keeps pass 2 unmasked and unsplit
// (a masked or split loop measured slower). The clamped exp's ~1.6e-38 for the -inf entries
// changes nothing (1 + rest and log1p(rest) see it only when the true rest is below 1e-37).
VLMFAST_INLINE RowResult row_stats_f32(const float* x, int64_t C, int64_t y, float* buf, bool in_buf) {
  RowResult out{};
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t full = C / kLanes * kLanes;
  const int64_t rem = C - full;
  alignas(32) float tail[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) tail[j] = j < rem ? x[full + j] : ninf;
  const vi8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  vf8 mxv = splat(ninf);
  vi8 idxv = lane * 0;
  vi8 bad = lane * 0;
  for (int64_t c0 = 0; c0 < full; c0 += kLanes) {
    const vf8 v = load8(x + c0);
    if (!in_buf) std::memcpy(buf + c0, &v, sizeof(v));
    bad |= (v - v) != 0.0f;  // NaN or +-inf
    const vi8 gt = v > mxv;
    mxv = gt ? v : mxv;
    idxv = gt ? lane + static_cast<int32_t>(c0) : idxv;
  }
  if (rem) {
    const vf8 v = load8(tail);
    std::memcpy(buf + full, &v, sizeof(v));
    bad |= ((v - v) != 0.0f) & (lane < static_cast<int32_t>(rem));  // the -inf padding is not an error
    const vi8 gt = v > mxv;
    mxv = gt ? v : mxv;
    idxv = gt ? lane + static_cast<int32_t>(full) : idxv;
  }
  VLMFAST_HREDUCE(bad, vor);
  if (bad[0]) {
    out.finite = false;
    return out;
  }
  out.finite = true;
  vf8 mxall = mxv;  // every lane: the row max (no NaN left)
  VLMFAST_HREDUCE(mxall, vmax);
  const float mx = mxall[0];
  vi8 first = mxv == mxall ? idxv : lane * 0 + static_cast<int32_t>(C);  // lowest index of the max
  VLMFAST_HREDUCE(first, vmin);
  const int64_t pred = first[0];
  const float xy = x[y];
  buf[pred] = ninf;
  const vf8 m = splat(mx);
  const int64_t cp = full + (rem ? kLanes : 0);
  vf8 sa = splat(0.0f), sb = splat(0.0f), s2a = splat(0.0f), s2b = splat(0.0f);
  int64_t c0 = 0;
  for (; c0 + 2 * kLanes <= cp; c0 += 2 * kLanes) {
    const vf8 ea = exp_nonpos(load8(buf + c0) - m);
    const vf8 eb = exp_nonpos(load8(buf + c0 + kLanes) - m);
    sa += ea;
    sb += eb;
    s2a += ea * ea;
    s2b += eb * eb;
  }
  if (c0 < cp) {
    const vf8 e = exp_nonpos(load8(buf + c0) - m);
    sa += e;
    s2a += e * e;
  }
  sa += sb;
  s2a += s2b;
  VLMFAST_HREDUCE(sa, vadd);  // pairwise
  VLMFAST_HREDUCE(s2a, vadd);
  const float rest = sa[0], rest2 = s2a[0];
  const RowTail t = row_tail(rest, rest2, exp_nonpos(xy - mx));
  out.pred = pred;
  out.conf = t.conf;
  // logsumexp - x_y = (mx - x_y) + log1p(rest); the difference in float64 (mx - x_y overflows float32 for
  // finite logits such as 3e38 and -3e38).
  out.nll = (static_cast<double>(mx) - static_cast<double>(xy)) + static_cast<double>(t.log1p_rest);
  out.brier = t.brier;
  return out;
}

// float64 rows keep float64 throughout (std::exp; not a hot path). Same formulas as row_stats_f32.
RowResult row_stats_f64(const double* row, int64_t sc, int64_t C, int64_t y, double* conf64) {
  RowResult out{};
  double mx = -std::numeric_limits<double>::infinity();
  int64_t pred = 0;
  for (int64_t c = 0; c < C; ++c) {
    const double v = row[c * sc];
    if (!std::isfinite(v)) {
      out.finite = false;
      return out;
    }
    if (v > mx) {
      mx = v;
      pred = c;
    }
  }
  double rest = 0.0, rest2 = 0.0;  // every class but the argmax
  for (int64_t c = 0; c < C; ++c) {
    if (c == pred) continue;
    const double e = std::exp(row[c * sc] - mx);
    rest += e;
    rest2 += e * e;
  }
  const double s = 1.0 + rest;
  const double xy = row[y * sc];
  out.finite = true;
  out.pred = pred;
  *conf64 = 1.0 / s;
  out.conf = static_cast<float>(*conf64);
  out.nll = (mx - xy) + std::log1p(rest);
  const double ey = std::exp(xy - mx);  // exactly 1 for y == pred
  const double u = (1.0 - ey) + rest, w = (1.0 - ey * ey) + rest2;
  out.brier = (u * u + w) / (s * s);
  return out;
}

// Per-thread accumulators for all M models.
struct Accum {
  std::vector<int64_t> count, correct, nonfinite;
  std::vector<double> conf, sums;
  Accum(int64_t M, int64_t nb1)
      : count(M * nb1, 0), correct(M * nb1, 0), nonfinite(M, 0), conf(M * nb1, 0.0), sums(M * 2, 0.0) {}
};

struct Ctx {
  const CalibrationBinsArgs* a;
  int64_t M, N, C, nb, nb1;
};

VLMFAST_INLINE int64_t label_at(const TensorView& labels, int64_t m, int64_t n) {
  const int64_t off = m * labels.stride(0) + n * labels.stride(1);
  return labels.dtype == DType::Int64 ? labels.data<const int64_t>()[off]
                                      : static_cast<int64_t>(labels.data<const int32_t>()[off]);
}

VLMFAST_INLINE void record(const Ctx& ctx, Accum& acc, int64_t m, int64_t n, const RowResult& r, int64_t y,
                           double conf_exact) {
  const CalibrationBinsArgs& a = *ctx.a;
  if (!r.finite) {
    acc.nonfinite[m] += 1;
    return;
  }
  const bool correct = r.pred == y;
  int64_t b = static_cast<int64_t>(std::floor(conf_exact * static_cast<double>(ctx.nb)));
  b = std::min<int64_t>(std::max<int64_t>(b, 0), ctx.nb);
  const int64_t slot = m * ctx.nb1 + b;
  acc.count[slot] += 1;
  acc.correct[slot] += correct ? 1 : 0;
  acc.conf[slot] += conf_exact;
  acc.sums[2 * m] += r.nll;
  acc.sums[2 * m + 1] += r.brier;
  if (a.sample_conf.ptr) {
    if (a.sample_conf.dtype == DType::Float64) {
      a.sample_conf.data<double>()[m * ctx.N + n] = conf_exact;
    } else {
      a.sample_conf.data<float>()[m * ctx.N + n] = r.conf;
    }
  }
  if (a.sample_correct.ptr) a.sample_correct.data<uint8_t>()[m * ctx.N + n] = correct ? 1 : 0;
}

// Converts row elements to float32 into buf. Kept separate per dtype so each gets vectorised conversions.
VLMFAST_INLINE void load_row(const float* src, int64_t sc, int64_t C, float* __restrict buf) {
  if (sc == 1) {
    std::memcpy(buf, src, sizeof(float) * static_cast<size_t>(C));
  } else {
    for (int64_t c = 0; c < C; ++c) buf[c] = src[c * sc];
  }
}

VLMFAST_INLINE void load_row(const uint16_t* src, int64_t sc, int64_t C, float* __restrict buf, bool bf16) {
  if (bf16) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const uint32_t bits = static_cast<uint32_t>(src[c * sc]) << 16;
      float f;
      std::memcpy(&f, &bits, sizeof(f));
      buf[c] = f;
    }
  } else {
#if defined(__FLT16_MAX__)
    const _Float16* h = reinterpret_cast<const _Float16*>(src);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<float>(h[c * sc]);
#else
    for (int64_t c = 0; c < C; ++c) buf[c] = fp16_to_float(src[c * sc]);
#endif
  }
}

// One task = up to kRowsPerTask rows of one model. DType dispatch happens once per task.
VLMFAST_CLONES void run_task_f32(const Ctx& ctx, Accum& acc, int64_t m, int64_t n0, int64_t n1, float* buf) {
  const TensorView& x = ctx.a->logits;
  const float* base = x.data<const float>();
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t y = label_at(ctx.a->labels, m, n);
    const bool y_ok = y >= 0 && y < ctx.C;
    const float* row = base + m * x.stride(0) + n * x.stride(1);
    if (x.stride(2) != 1) {
      load_row(row, x.stride(2), ctx.C, buf);
      row = buf;
    }
    RowResult r = row_stats_f32(row, ctx.C, y_ok ? y : 0, buf, /*in_buf=*/x.stride(2) != 1);
    if (!y_ok) r.finite = false;
    record(ctx, acc, m, n, r, y, static_cast<double>(r.conf));
  }
}

VLMFAST_CLONES void run_task_16(const Ctx& ctx, Accum& acc, int64_t m, int64_t n0, int64_t n1, float* buf) {
  const TensorView& x = ctx.a->logits;
  const uint16_t* base = x.data<const uint16_t>();
  const bool bf16 = x.dtype == DType::BFloat16;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t y = label_at(ctx.a->labels, m, n);
    const bool y_ok = y >= 0 && y < ctx.C;
    load_row(base + m * x.stride(0) + n * x.stride(1), x.stride(2), ctx.C, buf, bf16);
    RowResult r = row_stats_f32(buf, ctx.C, y_ok ? y : 0, buf, /*in_buf=*/true);
    if (!y_ok) r.finite = false;
    record(ctx, acc, m, n, r, y, static_cast<double>(r.conf));
  }
}

void run_task_f64(const Ctx& ctx, Accum& acc, int64_t m, int64_t n0, int64_t n1) {
  const TensorView& x = ctx.a->logits;
  const double* base = x.data<const double>();
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t y = label_at(ctx.a->labels, m, n);
    const bool y_ok = y >= 0 && y < ctx.C;
    double conf64 = 0.0;
    RowResult r = row_stats_f64(base + m * x.stride(0) + n * x.stride(1), x.stride(2), ctx.C, y_ok ? y : 0, &conf64);
    if (!y_ok) r.finite = false;
    record(ctx, acc, m, n, r, y, conf64);
  }
}

}  // namespace

void check_calibration_bins_args(const CalibrationBinsArgs& a, bool cuda) {
  const int dev = cuda ? 0 : -1;
  const TensorView& x = a.logits;
  VLMFAST_CHECK(x.dim() == 3, "logits: expected 3 dimensions (M, N, C), got ", x.dim());
  VLMFAST_CHECK(x.dtype == DType::Float32 || x.dtype == DType::Float16 || x.dtype == DType::BFloat16 ||
                    x.dtype == DType::Float64,
                "logits: expected float32, float16, bfloat16 or float64, got ", dtype_name(x.dtype));
  VLMFAST_CHECK(cuda == x.is_cuda(), "logits: expected a ", cuda ? "CUDA" : "CPU", " tensor");
  const int64_t M = x.size(0), N = x.size(1), C = x.size(2);
  VLMFAST_CHECK(M >= 1 && N >= 1 && C >= 1, "logits: every dimension must be >= 1, got (", M, ", ", N, ", ", C, ")");
  VLMFAST_CHECK(a.n_bins >= 1, "n_bins: expected >= 1, got ", a.n_bins);
  VLMFAST_CHECK(a.labels.dim() == 2 && a.labels.size(0) == M && a.labels.size(1) == N,
                "labels: expected shape (", M, ", ", N, ")");
  VLMFAST_CHECK(a.labels.dtype == DType::Int64 || a.labels.dtype == DType::Int32,
                "labels: expected int64 or int32, got ", dtype_name(a.labels.dtype));
  VLMFAST_CHECK(cuda == a.labels.is_cuda(), "labels: expected a ", cuda ? "CUDA" : "CPU", " tensor");
  const int64_t nb1 = a.n_bins + 1;
  check_view(a.bin_count, "bin_count", DType::Int64, 2, dev);
  check_view(a.bin_correct, "bin_correct", DType::Int64, 2, dev);
  check_view(a.bin_conf, "bin_conf", DType::Float64, 2, dev);
  check_view(a.sums, "sums", DType::Float64, 2, dev);
  check_view(a.nonfinite, "nonfinite", DType::Int64, 1, dev);
  for (const TensorView* t : {&a.bin_count, &a.bin_correct, &a.bin_conf}) {
    VLMFAST_CHECK(t->size(0) == M && t->size(1) == nb1 && is_contiguous(*t), "bin outputs: expected contiguous (",
                  M, ", ", nb1, ")");
  }
  VLMFAST_CHECK(a.sums.size(0) == M && a.sums.size(1) == 2 && is_contiguous(a.sums), "sums: expected contiguous (",
                M, ", 2)");
  VLMFAST_CHECK(a.nonfinite.size(0) == M && is_contiguous(a.nonfinite), "nonfinite: expected contiguous (", M, ",)");
  if (a.sample_conf.ptr) {
    check_view(a.sample_conf, "sample_conf", x.dtype == DType::Float64 ? DType::Float64 : DType::Float32, 2, dev);
    VLMFAST_CHECK(a.sample_conf.size(0) == M && a.sample_conf.size(1) == N && is_contiguous(a.sample_conf),
                  "sample_conf: expected contiguous (", M, ", ", N, ")");
  }
  if (a.sample_correct.ptr) {
    check_view(a.sample_correct, "sample_correct", DType::Bool, 2, dev);
    VLMFAST_CHECK(a.sample_correct.size(0) == M && a.sample_correct.size(1) == N && is_contiguous(a.sample_correct),
                  "sample_correct: expected contiguous (", M, ", ", N, ")");
  }
}

void calibration_bins_cpu(const CalibrationBinsArgs& a, int num_threads) {
  check_calibration_bins_args(a, /*cuda=*/false);
  Ctx ctx{&a, a.logits.size(0), a.logits.size(1), a.logits.size(2), a.n_bins, a.n_bins + 1};
  const int64_t blocks_per_model = (ctx.N + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t tasks = ctx.M * blocks_per_model;
  int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
  std::vector<Accum> per_thread;
  per_thread.reserve(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t) per_thread.emplace_back(ctx.M, ctx.nb1);

#pragma omp parallel num_threads(threads)
  {
    Accum& acc = per_thread[static_cast<size_t>(omp_get_thread_num())];
    std::vector<float> buf(static_cast<size_t>(padded(ctx.C)));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t m = t / blocks_per_model;
      const int64_t n0 = (t % blocks_per_model) * kRowsPerTask;
      const int64_t n1 = std::min(ctx.N, n0 + kRowsPerTask);
      switch (a.logits.dtype) {
        case DType::Float32: run_task_f32(ctx, acc, m, n0, n1, buf.data()); break;
        case DType::Float16:
        case DType::BFloat16: run_task_16(ctx, acc, m, n0, n1, buf.data()); break;
        default: run_task_f64(ctx, acc, m, n0, n1); break;
      }
    }
  }

  // Deterministic reduction: thread order is fixed for a given thread count and static schedule.
  int64_t* count = a.bin_count.data<int64_t>();
  int64_t* correct = a.bin_correct.data<int64_t>();
  double* conf = a.bin_conf.data<double>();
  double* sums = a.sums.data<double>();
  int64_t* nonfinite = a.nonfinite.data<int64_t>();
  for (const Accum& acc : per_thread) {
    for (int64_t i = 0; i < ctx.M * ctx.nb1; ++i) {
      count[i] += acc.count[i];
      correct[i] += acc.correct[i];
      conf[i] += acc.conf[i];
    }
    for (int64_t i = 0; i < 2 * ctx.M; ++i) sums[i] += acc.sums[i];
    for (int64_t i = 0; i < ctx.M; ++i) nonfinite[i] += acc.nonfinite[i];
  }
}

}  // namespace vlmfast
