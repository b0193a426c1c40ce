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

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define VLMFAST_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VLMFAST_CLONES
#endif

#if defined(__GNUC__)
#define VLMFAST_INLINE inline __attribute__((always_inline))
#else
#define VLMFAST_INLINE inline
#endif

namespace vlmfast {
namespace {

constexpr int64_t kRowsPerTask = 32;

// Eight float32 lanes as a GCC/Clang vector-extension type: compiles to one AVX register in the x86-64-v3
// clone and to two SSE registers in the baseline clone, with no reliance on the auto-vectoriser.
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

VLMFAST_INLINE vf8 splat(float v) { return vf8{v, v, v, v, v, v, v, v}; }

// exp(x) for x <= 0 (x = logit - row max), float32, eight lanes. Range reduction x = k ln2 + r, |r| <= ln2/2
// (k rounded to nearest with the 1.5 * 2^23 trick), then the degree-7 Taylor polynomial of exp(r) (truncation
// error < 6e-9 relative, below one float ulp) and 2^k built from the exponent bits. Exactly 1 at x = 0, so a
// row's own maximum contributes exactly 1. Inputs below -87 (and -inf) are clamped to -87, giving ~1.6e-38
// instead of a denormal or 0: against a sum >= 1 that is invisible (1 + 1.6e-38 == 1 in float32), so a
// saturated softmax still has confidence exactly 1.0.
VLMFAST_INLINE vf8 exp_nonpos(vf8 x) {
  const vf8 lo = splat(-87.0f);
  const vf8 xc = x < lo ? lo : x;
  const vf8 kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  vf8 r = xc - kf * 0.693359375f;  // ln 2 split: k * ln2_hi is exact for |k| < 2^10
  r = r - kf * -2.12194440e-4f;
  vf8 p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi8 bits = (__builtin_convertvector(kf, vi8) + 127) << 23;
  return p * (vf8)bits;  // same-size vector cast = bit cast
}

VLMFAST_INLINE float exp_nonpos(float x) { return exp_nonpos(splat(x))[0]; }

struct RowResult {
  float conf;
  double nll;    // float32 math for float32/16 rows, float64 for float64 rows
  double brier;
  int64_t pred;
  bool finite;
};

inline int64_t padded(int64_t C) { return (C + kLanes - 1) / kLanes * kLanes; }

VLMFAST_INLINE vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Statistics of one contiguous float32 row `x` (length C >= 1), read in place: whole vectors straight from `x`,
// the last C mod 8 elements through an 8-lane buffer padded with -inf (whose exp is exactly 0).
// Pass 1: per-lane running max with the first index reaching it (strict >), NaN/inf flag; the lanes are then
// merged by max value and lowest index, which is the first argmax of the row. Pass 2: exp sums, two vectors
// per step for instruction-level parallelism.
VLMFAST_INLINE RowResult row_stats_f32(const float* __restrict x, int64_t C, int64_t y) {
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
    bad |= (v - v) != 0.0f;  // NaN or +-inf
    const vi8 gt = v > mxv;
    mxv = gt ? v : mxv;
    idxv = gt ? lane + static_cast<int32_t>(c0) : idxv;
  }
  if (rem) {
    const vf8 v = load8(tail);
    bad |= ((v - v) != 0.0f) & (lane < static_cast<int32_t>(rem));  // the -inf padding is not an error
    const vi8 gt = v > mxv;
    mxv = gt ? v : mxv;
    idxv = gt ? lane + static_cast<int32_t>(full) : idxv;
  }
  int any_bad = 0;
  float mx = ninf;
  for (int64_t j = 0; j < kLanes; ++j) {
    any_bad |= bad[j];
    mx = mxv[j] > mx ? mxv[j] : mx;
  }
  if (any_bad) {
    out.finite = false;
    return out;
  }
  out.finite = true;
  int64_t pred = C;
  for (int64_t j = 0; j < kLanes; ++j) {
    if (mxv[j] == mx && idxv[j] < pred) pred = idxv[j];
  }
  const vf8 m = splat(mx);
  vf8 sa = splat(0.0f), sb = splat(0.0f), s2a = splat(0.0f), s2b = splat(0.0f);
  int64_t c0 = 0;
  for (; c0 + 2 * kLanes <= full; c0 += 2 * kLanes) {
    const vf8 ea = exp_nonpos(load8(x + c0) - m);
    const vf8 eb = exp_nonpos(load8(x + c0 + kLanes) - m);
    sa += ea;
    sb += eb;
    s2a += ea * ea;
    s2b += eb * eb;
  }
  for (; c0 < full; c0 += kLanes) {
    const vf8 e = exp_nonpos(load8(x + c0) - m);
    sa += e;
    s2a += e * e;
  }
  if (rem) {
    const vf8 e = exp_nonpos(load8(tail) - m);
    sb += e;
    s2b += e * e;
  }
  sa += sb;
  s2a += s2b;
  float s = 0.0f, s2 = 0.0f;
  for (int64_t j = 0; j < kLanes; ++j) {
    s += sa[j];
    s2 += s2a[j];
  }
  const float xy = x[y];
  const float py = exp_nonpos(xy - mx) / s;
  out.pred = pred;
  out.conf = 1.0f / s;
  out.nll = mx + std::log(s) - xy;
  out.brier = s2 / (s * s) - 2.0f * py + 1.0f;
  return out;
}

// float64 rows keep float64 throughout (std::exp; not a hot path).
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
  double s = 0.0, s2 = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const double e = std::exp(row[c * sc] - mx);
    s += e;
    s2 += e * e;
  }
  const double xy = row[y * sc];
  const double py = std::exp(xy - mx) / s;
  out.finite = true;
  out.pred = pred;
  *conf64 = 1.0 / s;
  out.conf = static_cast<float>(*conf64);
  out.nll = mx + std::log(s) - xy;
  out.brier = s2 / (s * s) - 2.0 * py + 1.0;
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
    RowResult r = row_stats_f32(row, ctx.C, y_ok ? y : 0);
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
    RowResult r = row_stats_f32(buf, ctx.C, y_ok ? y : 0);
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
