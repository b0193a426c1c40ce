// Host-only tests of the CUDA calibration_bins row math (csrc/cuda/calibration_bins_row.cuh).
// A: merges of partial (mx, idx, rest, rest2) states in several split/merge orders vs a direct computation.
// B: an emulation of the kernel's control flow (blocks, model segments, lane groups, xor-butterfly merges,
//    ballots, run-length cache, shared/direct accumulation) built from the same header functions, compared
//    with calibration_bins_cpu on many shapes, dtypes, strides, misalignments, labels and NaN/inf rows.
// C: near-saturated rows (top logit 15-25 above the rest) and extreme logits: the emulation and
//    calibration_bins_cpu against a float64 oracle (saturation decided like an accurately summed float32
//    softmax, conf, NLL via log1p(rest) and without float32 overflow, Brier without cancellation).
#include <algorithm>
#include <cassert>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "calibration_bins.h"
#include "cuda/calibration_bins_row.cuh"

using namespace vlmfast;
using namespace vlmfast::cb;

static int g_fail = 0;
#define EXPECT(cond, ...)                      \
  do {                                         \
    if (!(cond)) {                             \
      if (g_fail < 30) {                       \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);              \
        std::printf("\n");                     \
      }                                        \
      ++g_fail;                                \
    }                                          \
  } while (0)

// ------------------------------------------------------------------------------------------------------
// A. merge tests
// ------------------------------------------------------------------------------------------------------
struct Ref {
  float mx;
  int idx;
  double rest, rest2;  // over every class but idx
};

static Ref direct(const std::vector<float>& x) {
  Ref r{-INFINITY, -1, 0, 0};
  for (size_t c = 0; c < x.size(); ++c)
    if (x[c] > r.mx) {
      r.mx = x[c];
      r.idx = (int)c;
    }
  for (size_t c = 0; c < x.size(); ++c) {
    if ((int)c == r.idx) continue;
    const double e = std::exp((double)x[c] - (double)r.mx);
    r.rest += e;
    r.rest2 += e * e;
  }
  return r;
}

// Folds the given (increasing) class list of one lane into a state with chunks of random sizes/shapes.
static LaneAcc fold_lane(const std::vector<float>& x, const std::vector<int>& cls, std::mt19937& rng) {
  LaneAcc a;
  lane_init(a);
  size_t i = 0;
  while (i < cls.size()) {
    const int kind = rng() % 3;
    if (kind == 0) {  // single element
      const float v[1][1] = {{x[cls[i]]}};
      const bool ok[1] = {true};
      const int c0[1] = {cls[i]};
      chunk_update<1, 1>(a, v, ok, c0, -1);
      i += 1;
    } else if (kind == 1) {  // 4 x 1 with padding
      float v[4][1];
      bool ok[4];
      int c0[4];
      for (int j = 0; j < 4; ++j) {
        ok[j] = i + j < cls.size();
        c0[j] = ok[j] ? cls[i + j] : 1 << 29;
        v[j][0] = ok[j] ? x[cls[i + j]] : -INFINITY;
      }
      chunk_update<4, 1>(a, v, ok, c0, -1);
      i += 4;
    } else {  // 1 x 8 only when the next 8 classes are consecutive
      bool consec = i + 8 <= cls.size();
      for (int t = 1; consec && t < 8; ++t) consec = cls[i + t] == cls[i] + t;
      if (!consec) continue;
      float v[1][8];
      for (int t = 0; t < 8; ++t) v[0][t] = x[cls[i + t]];
      const bool ok[1] = {true};
      const int c0[1] = {cls[i]};
      chunk_update<1, 8>(a, v, ok, c0, -1);
      i += 8;
    }
  }
  return a;
}

static void check_state(const RowState& st, const Ref& r, const char* what, int trial) {
  EXPECT(st.mx == r.mx, "%s trial %d: mx %g vs %g", what, trial, st.mx, r.mx);
  EXPECT(st.idx == r.idx, "%s trial %d: idx %d vs %d", what, trial, st.idx, r.idx);
  // Relative to rest itself (not to 1 + rest): the point of keeping the max's 1 out of the sums. The absolute
  // floor covers terms that underflow float32.
  EXPECT(std::fabs(st.rest - r.rest) <= 2e-6 * r.rest + 1e-37, "%s trial %d: rest %.9g vs %.9g", what, trial,
         st.rest, r.rest);
  EXPECT(std::fabs(st.rest2 - r.rest2) <= 2e-6 * r.rest2 + 1e-37, "%s trial %d: rest2 %.9g vs %.9g", what, trial,
         st.rest2, r.rest2);
}

static void test_merge() {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 4000; ++trial) {
    const int C = 1 + rng() % 300;
    std::vector<float> x(C);
    const int mode = trial % 5;
    for (int c = 0; c < C; ++c) {
      if (mode == 0) x[c] = std::uniform_real_distribution<float>(-10, 10)(rng);
      else if (mode == 1) x[c] = (float)(int)(rng() % 4);  // many ties at the max
      else if (mode == 2) x[c] = -200.0f + (float)(rng() % 3);  // saturated: one tie group far from the rest
      else if (mode == 3) x[c] = std::uniform_real_distribution<float>(-1e4f, 1e4f)(rng);
      else x[c] = 3.0f;  // all equal
    }
    if (mode == 2) {  // one (or a few tied) far above the rest: s must be exactly 1 (or the tie count)
      const int k = 1 + rng() % 3;
      for (int i = 0; i < k; ++i) x[rng() % C] = 100.0f;
    }
    if (mode == 1 && trial % 10 == 1) {  // near-saturated: the rest 15-25 below the max
      const float top = std::uniform_real_distribution<float>(-5, 5)(rng);
      for (int c = 0; c < C; ++c) x[c] = top - std::uniform_real_distribution<float>(15, 25)(rng);
      x[rng() % C] = top;
    }
    const Ref r = direct(x);
    for (int L : {1, 2, 4, 8, 16, 32, 5}) {
      // Partitions: strided (kernel-like), contiguous blocks, random (each lane in increasing order).
      for (int part = 0; part < 3; ++part) {
        std::vector<std::vector<int>> cls(L);
        for (int c = 0; c < C; ++c) {
          int l = part == 0 ? c % L : part == 1 ? (int)((int64_t)c * L / C) : (int)(rng() % L);
          cls[l].push_back(c);
        }
        std::vector<RowState> st(L);
        for (int l = 0; l < L; ++l) st[l] = fold_lane(x, cls[l], rng).st;
        // left fold
        RowState a = st[0];
        for (int l = 1; l < L; ++l) a = merge_states(a, st[l]);
        check_state(a, r, "left", trial);
        // right fold
        RowState b = st[L - 1];
        for (int l = L - 2; l >= 0; --l) b = merge_states(st[l], b);
        check_state(b, r, "right", trial);
        // random tree
        std::vector<RowState> pool = st;
        while (pool.size() > 1) {
          const size_t i = rng() % pool.size();
          size_t j = rng() % (pool.size() - 1);
          if (j >= i) ++j;
          const RowState m = (rng() & 1) ? merge_states(pool[i], pool[j]) : merge_states(pool[j], pool[i]);
          pool[std::min(i, j)] = m;
          pool.erase(pool.begin() + std::max(i, j));
        }
        check_state(pool[0], r, "tree", trial);
        // xor butterfly as on the device (power-of-two L): every lane must end with the same state
        if ((L & (L - 1)) == 0) {
          std::vector<RowState> cur = st;
          for (int off = L / 2; off > 0; off >>= 1) {
            std::vector<RowState> nxt(L);
            for (int l = 0; l < L; ++l) nxt[l] = merge_states(cur[l], cur[l ^ off]);
            cur = nxt;
          }
          for (int l = 0; l < L; ++l) check_state(cur[l], r, "butterfly", trial);
          if (mode == 2) {
            int ties = 0;
            for (float v : x) ties += v == r.mx;
            EXPECT(cur[0].rest == (float)(ties - 1), "saturated trial %d: rest = %.9g, expected exactly %d", trial,
                   cur[0].rest, ties - 1);
            if (ties == 1) EXPECT(finalize_row(cur[0], 0.0f).conf == 1.0f, "saturated conf != 1");
          }
          if (mode == 4) EXPECT(cur[0].rest == (float)(C - 1) && cur[0].idx == 0, "all-equal row: rest %g idx %d",
                                cur[0].rest, cur[0].idx);
        }
      }
    }
  }
  // empty states
  RowState e = merge_states(empty_state(), empty_state());
  EXPECT(e.rest == 0.0f && e.rest2 == 0.0f && e.mx == -INFINITY && e.idx == INT_MAX, "empty merge");
  RowState one{2.0f, 5, 0.0f, 0.0f};
  RowState m1 = merge_states(empty_state(), one), m2 = merge_states(one, empty_state());
  EXPECT(m1.rest == 0.0f && m1.idx == 5 && m2.rest == 0.0f && m2.idx == 5, "empty + one");
  // The old max's 1 joins the rest when a state with a larger max wins: (0 + 1) * exp(2 - 3).
  RowState two{3.0f, 9, 0.0f, 0.0f};
  RowState m3 = merge_states(one, two);
  EXPECT(m3.idx == 9 && std::fabs(m3.rest - std::exp(-1.0f)) <= 1e-7f && std::fabs(m3.rest2 - std::exp(-2.0f)) <= 1e-7f,
         "one + two: rest %g rest2 %g", m3.rest, m3.rest2);
  // Equal maxima: the lower index wins and the other max joins the rest as exactly 1.
  RowState m4 = merge_states(two, RowState{3.0f, 4, 0.5f, 0.25f});
  EXPECT(m4.idx == 4 && m4.rest == 1.5f && m4.rest2 == 1.25f, "tie merge: idx %d rest %g", m4.idx, m4.rest);
  std::printf("merge tests done\n");
}

// ------------------------------------------------------------------------------------------------------
// B. kernel emulation vs calibration_bins_cpu
// ------------------------------------------------------------------------------------------------------
struct Out {
  std::vector<int64_t> count, correct, nonfinite;
  std::vector<double> conf, sums;
  std::vector<float> sconf;
  std::vector<uint8_t> scorr;
  Out(int64_t M, int64_t N, int nb)
      : count(M * (nb + 1)), correct(M * (nb + 1)), nonfinite(M), conf(M * (nb + 1)), sums(2 * M), sconf(M * N),
        scorr(M * N) {}
};

// Points the CPU kernel's output views at an Out's buffers (M models, N samples, nb1 = n_bins + 1 slots).
static void bind_outputs(CalibrationBinsArgs& a, Out& ref, int64_t M, int64_t N, int64_t nb1) {
  a.bin_count = TensorView{(uintptr_t)ref.count.data(), DType::Int64, {M, nb1}, {nb1, 1}, -1};
  a.bin_correct = TensorView{(uintptr_t)ref.correct.data(), DType::Int64, {M, nb1}, {nb1, 1}, -1};
  a.bin_conf = TensorView{(uintptr_t)ref.conf.data(), DType::Float64, {M, nb1}, {nb1, 1}, -1};
  a.sums = TensorView{(uintptr_t)ref.sums.data(), DType::Float64, {M, 2}, {2, 1}, -1};
  a.nonfinite = TensorView{(uintptr_t)ref.nonfinite.data(), DType::Int64, {M}, {1}, -1};
  a.sample_conf = TensorView{(uintptr_t)ref.sconf.data(), DType::Float32, {M, N}, {N, 1}, -1};
  a.sample_correct = TensorView{(uintptr_t)ref.scorr.data(), DType::Bool, {M, N}, {N, 1}, -1};
}

struct Problem {
  DType dt;
  const void* x;
  int64_t M, N;
  int C;
  int64_t xs0, xs1, xs2;
  const void* lab;
  bool lab64;
  int64_t ls0, ls1;
  int nb;
};

static int64_t label_at(const Problem& p, int64_t m, int64_t n) {
  const int64_t off = m * p.ls0 + n * p.ls1;
  return p.lab64 ? ((const int64_t*)p.lab)[off] : ((const int32_t*)p.lab)[off];
}

static int64_t g_direct_segments = 0, g_shared_segments = 0;

// Mirrors calibration_bins_kernel (csrc/cuda/calibration_bins.cu) for one block size of kWarps warps.
template <class Tag, int G, bool kContiguous>
static void emulate(const Problem& p, int64_t grid, Out& o) {
  using raw_t = typename Tag::raw_t;
  constexpr int kWarps = 8, kRowsPerWarp = 32 / G, kSlots = kWarps * kRowsPerWarp;
  const int nb1 = p.nb + 1;
  const raw_t* x = (const raw_t*)p.x;
  for (int64_t bid = 0; bid < grid; ++bid) {
    std::vector<double> s_conf(nb1, 0.0);
    std::vector<uint32_t> s_count(nb1, 0), s_correct(nb1, 0);
    int64_t r0, r1;
    block_rows(bid, grid, p.M * p.N, &r0, &r1);
    for (int64_t seg0 = r0; seg0 < r1;) {
      const int64_t m = seg0 / p.N;
      const int64_t seg1 = std::min(r1, (m + 1) * p.N);
      const bool direct = (seg1 - seg0) < nb1;
      (direct ? g_direct_segments : g_shared_segments)++;
      const raw_t* xm = x + m * p.xs0;
      for (int w = 0; w < kWarps; ++w) {
        // per-lane registers of this warp
        double nll_sum[32] = {}, brier_sum[32] = {};
        unsigned bad_rows[32] = {};
        int run_bin[32];
        unsigned run_cnt[32] = {}, run_corr[32] = {};
        double run_conf[32] = {};
        for (int l = 0; l < 32; ++l) run_bin[l] = -1;
        auto push = [&](int l) {
          if (direct) {
            const int64_t slot = m * nb1 + run_bin[l];
            o.count[slot] += run_cnt[l];
            o.correct[slot] += run_corr[l];
            o.conf[slot] += run_conf[l];
          } else {
            s_count[run_bin[l]] += run_cnt[l];
            s_correct[run_bin[l]] += run_corr[l];
            s_conf[run_bin[l]] += run_conf[l];
          }
        };
        for (int64_t base = seg0 + w * kRowsPerWarp; base < seg1; base += kSlots) {
          LaneAcc acc[32];
          int yv[32];
          bool active[32];
          int64_t nn[32];
          for (int lane = 0; lane < 32; ++lane) {
            const int group = lane / G, gl = lane % G;
            const int64_t row = base + group;
            active[lane] = row < seg1;
            nn[lane] = row - m * p.N;
            lane_init(acc[lane]);
            yv[lane] = -1;
            if (active[lane]) {
              const int64_t yl = label_at(p, m, nn[lane]);
              yv[lane] = (yl >= 0 && yl < p.C) ? (int)yl : -1;
              const raw_t* rp = xm + nn[lane] * p.xs1;
              if (kContiguous) {
                lane_pass_contiguous<Tag, G, 4>(acc[lane], rp, p.C, gl, yv[lane]);
              } else {
                lane_pass_strided<Tag, G, 8>(acc[lane], rp, p.xs2, p.C, gl, yv[lane]);
              }
            }
          }
          RowState st[32];
          for (int l = 0; l < 32; ++l) st[l] = acc[l].st;
          for (int off = G / 2; off > 0; off >>= 1) {
            RowState nx[32];
            for (int l = 0; l < 32; ++l) nx[l] = merge_states(st[l], st[l ^ off]);
            std::memcpy(st, nx, sizeof(st));
          }
          uint32_t have_all = 0, bad_all = 0;
          for (int l = 0; l < 32; ++l) {
            if (acc[l].have) have_all |= 1u << l;
            if (!(acc[l].amax <= FLT_MAX)) bad_all |= 1u << l;
          }
          float xy_src[32];
          for (int l = 0; l < 32; ++l) xy_src[l] = acc[l].xy;
          for (int lane = 0; lane < 32; ++lane) {
            const int group = lane / G, gl = lane % G;
            const uint32_t gmask = (G == 32) ? 0xffffffffu : (((1u << G) - 1u) << (group * G));
            const uint32_t have = have_all & gmask, bad = bad_all & gmask;
            const int src = have ? (__builtin_ffs(have) - 1) : lane;
            const float xy = xy_src[src];
            if (!(active[lane] && gl == 0)) continue;
            if (bad != 0u || have == 0u) {
              ++bad_rows[lane];
              continue;
            }
            const RowOut r = finalize_row(st[lane], xy);
            const bool correct = r.pred == yv[lane];
            const int b = bin_of(r.conf, p.nb);
            nll_sum[lane] += r.nll;
            brier_sum[lane] += r.brier;
            if (b != run_bin[lane]) {
              if (run_bin[lane] >= 0) push(lane);
              run_bin[lane] = b;
              run_cnt[lane] = 0;
              run_corr[lane] = 0;
              run_conf[lane] = 0;
            }
            ++run_cnt[lane];
            run_corr[lane] += correct;
            run_conf[lane] += r.conf;
            o.sconf[m * p.N + nn[lane]] = r.conf;
            o.scorr[m * p.N + nn[lane]] = correct;
          }
        }
        for (int l = 0; l < 32; ++l)
          if (run_bin[l] >= 0) push(l);
        double a = 0, b = 0;
        unsigned c = 0;
        for (int l = 0; l < 32; ++l) {
          a += nll_sum[l];
          b += brier_sum[l];
          c += bad_rows[l];
        }
        o.sums[2 * m] += a;
        o.sums[2 * m + 1] += b;
        o.nonfinite[m] += c;
      }
      if (!direct) {
        for (int i = 0; i < nb1; ++i) {
          if (s_count[i]) {
            o.count[m * nb1 + i] += s_count[i];
            o.correct[m * nb1 + i] += s_correct[i];
            o.conf[m * nb1 + i] += s_conf[i];
            s_count[i] = s_correct[i] = 0;
            s_conf[i] = 0;
          }
        }
      }
      seg0 = seg1;
    }
  }
}

// G selection exactly as in launch_for.
template <class Tag, bool kContiguous>
static int pick_G(int C) {
  const int64_t units = kContiguous ? ((int64_t)C * (int64_t)sizeof(typename Tag::raw_t) + 15) / 16 : C;
  const int64_t per_lane = 2 * (kContiguous ? 4 : 8);
  if (units <= 4 * per_lane) return 4;
  if (units <= 8 * per_lane) return 8;
  if (units <= 16 * per_lane) return 16;
  return 32;
}

template <class Tag, bool kContiguous>
static void emulate_dispatch(const Problem& p, int64_t grid, Out& o, int G) {
  switch (G) {
    case 4: emulate<Tag, 4, kContiguous>(p, grid, o); break;
    case 8: emulate<Tag, 8, kContiguous>(p, grid, o); break;
    case 16: emulate<Tag, 16, kContiguous>(p, grid, o); break;
    default: emulate<Tag, 32, kContiguous>(p, grid, o); break;
  }
}

static uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16);
}
static uint16_t f2h(float f) {  // round-toward-zero fp16 for |f| < 65504 normal range, enough for test data
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int e = (int)((u >> 23) & 0xff) - 127 + 15;
  if (e <= 0) return (uint16_t)sign;
  if (e >= 31) return (uint16_t)(sign | 0x7bffu);
  return (uint16_t)(sign | (e << 10) | ((u >> 13) & 0x3ffu));
}

static int g_cases = 0;
static int64_t g_edge = 0;

static void run_case(std::mt19937& rng, DType dt, int64_t M, int64_t N, int C, int layout, bool lab64, bool shared_labels,
                     int nb, int value_mode, int nonfinite_mode, int bad_label_mode, int64_t grid, int G_override) {
  ++g_cases;
  const size_t es = dt == DType::Float32 ? 4 : 2;
  // layout 0: contiguous; 1: padded rows (C + pad) with misaligned base; 2: stride along C = 3; 3: (C, N) transposed
  int64_t xs0, xs1, xs2;
  const int pad = (int)(rng() % 7);
  const int64_t base_off = (layout == 1) ? (int64_t)(rng() % 8) : 0;
  if (layout == 0) { xs2 = 1; xs1 = C; xs0 = N * C; }
  else if (layout == 1) { xs2 = 1; xs1 = C + pad; xs0 = N * (C + pad) + 5; }
  else if (layout == 2) { xs2 = 3; xs1 = 3 * C + 1; xs0 = N * (3 * C + 1); }
  else { xs2 = N; xs1 = 1; xs0 = N * C; }
  // Tight allocation (malloc: 16-byte aligned): the last logit is the last byte, so ASan sees any over-read.
  const int64_t span = base_off + (M - 1) * xs0 + (N - 1) * xs1 + (int64_t)(C - 1) * xs2 + 1;
  std::vector<uint8_t> storage((size_t)span * es);
  EXPECT(((uintptr_t)storage.data() & 15) == 0, "allocation not 16-byte aligned");
  void* xbase = storage.data() + base_off * es;
  std::vector<float> vals((size_t)M * N * C);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      for (int c = 0; c < C; ++c) {
        float v;
        if (value_mode == 0) v = std::normal_distribution<float>(0.f, 3.f)(rng);
        else if (value_mode == 1) v = (float)(int)(rng() % 3);  // ties
        else v = (rng() % 50 == 0) ? 60.f : std::normal_distribution<float>(0.f, 1.f)(rng);  // some saturated
        const int64_t off = m * xs0 + n * xs1 + c * xs2;
        if (dt == DType::Float32) ((float*)xbase)[off] = v;
        else if (dt == DType::BFloat16) ((uint16_t*)xbase)[off] = f2bf(v);
        else ((uint16_t*)xbase)[off] = f2h(v);
      }
  if (value_mode == 2) {  // saturated rows: one class at +60, the rest far below
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; n += 3) {
        const int top = rng() % C;
        for (int c = 0; c < C; ++c) {
          const float v = c == top ? 60.f : -60.f;
          const int64_t off = m * xs0 + n * xs1 + c * xs2;
          if (dt == DType::Float32) ((float*)xbase)[off] = v;
          else if (dt == DType::BFloat16) ((uint16_t*)xbase)[off] = f2bf(v);
          else ((uint16_t*)xbase)[off] = f2h(v);
        }
      }
  }
  if (nonfinite_mode) {
    const int k = 1 + (int)(rng() % 5);
    for (int i = 0; i < k; ++i) {
      const int64_t m = rng() % M, n = rng() % N;
      // put it in the head, the body or the tail of the row
      int c = (int)(rng() % C);
      if (i % 3 == 0) c = 0;
      if (i % 3 == 1) c = C - 1;
      const int kind = rng() % 3;
      const int64_t off = m * xs0 + n * xs1 + c * xs2;
      if (dt == DType::Float32) {
        ((float*)xbase)[off] = kind == 0 ? NAN : kind == 1 ? INFINITY : -INFINITY;
      } else if (dt == DType::BFloat16) {
        ((uint16_t*)xbase)[off] = kind == 0 ? 0x7fc0 : kind == 1 ? 0x7f80 : 0xff80;
      } else {
        ((uint16_t*)xbase)[off] = kind == 0 ? 0x7e00 : kind == 1 ? 0x7c00 : 0xfc00;
      }
    }
  }
  // labels
  int64_t ls0 = shared_labels ? 0 : N * 2, ls1 = 2;  // strided labels
  const int64_t lspan = (shared_labels ? 0 : (M - 1) * ls0) + (N - 1) * ls1 + 1;
  std::vector<int64_t> lab64v(lspan);
  std::vector<int32_t> lab32v(lspan);
  for (int64_t i = 0; i < lspan; ++i) {
    int64_t y = rng() % C;
    if (bad_label_mode && rng() % 97 == 0) y = (rng() & 1) ? C + (int64_t)(rng() % 3) : -1 - (int64_t)(rng() % 3);
    lab64v[i] = y;
    lab32v[i] = (int32_t)y;
  }
  if (value_mode == 1) {  // make the label hit the argmax often
  }
  Problem p{dt, xbase, M, N, C, xs0, xs1, xs2, lab64 ? (const void*)lab64v.data() : (const void*)lab32v.data(), lab64,
            ls0, ls1, nb};

  // CPU reference
  Out ref(M, N, nb);
  CalibrationBinsArgs a;
  a.logits = TensorView{(uintptr_t)xbase, dt, {M, N, (int64_t)C}, {xs0, xs1, xs2}, -1};
  a.labels = TensorView{(uintptr_t)p.lab, lab64 ? DType::Int64 : DType::Int32, {M, N}, {ls0, ls1}, -1};
  a.n_bins = nb;
  const int64_t nb1 = nb + 1;
  bind_outputs(a, ref, M, N, nb1);
  calibration_bins_cpu(a, 2);

  // emulation
  Out emu(M, N, nb);
  const bool contiguous = xs2 == 1 || C == 1;
  int G;
  if (dt == DType::Float32) {
    G = contiguous ? pick_G<TagF32, true>(C) : pick_G<TagF32, false>(C);
    if (G_override) G = G_override;
    if (contiguous) emulate_dispatch<TagF32, true>(p, grid, emu, G);
    else emulate_dispatch<TagF32, false>(p, grid, emu, G);
  } else if (dt == DType::BFloat16) {
    G = contiguous ? pick_G<TagBF16, true>(C) : pick_G<TagBF16, false>(C);
    if (G_override) G = G_override;
    if (contiguous) emulate_dispatch<TagBF16, true>(p, grid, emu, G);
    else emulate_dispatch<TagBF16, false>(p, grid, emu, G);
  } else {
    G = contiguous ? pick_G<TagF16, true>(C) : pick_G<TagF16, false>(C);
    if (G_override) G = G_override;
    if (contiguous) emulate_dispatch<TagF16, true>(p, grid, emu, G);
    else emulate_dispatch<TagF16, false>(p, grid, emu, G);
  }

  char tag[256];
  std::snprintf(tag, sizeof(tag), "case %d dt=%d M=%" PRId64 " N=%" PRId64 " C=%d layout=%d G=%d grid=%" PRId64 " nb=%d vm=%d nf=%d",
                g_cases, (int)dt, M, N, C, layout, G, grid, nb, value_mode, nonfinite_mode);
  // per sample: conf close, correct exact (CPU uses its own polynomial exp; compare with tolerance)
  int64_t near_edge = 0;
  for (int64_t i = 0; i < M * N; ++i) {
    EXPECT(std::fabs(emu.sconf[i] - ref.sconf[i]) <= 3e-6f * std::max(1.0f, ref.sconf[i]), "%s: sconf[%" PRId64 "] %.9g vs %.9g", tag, i,
           emu.sconf[i], ref.sconf[i]);
    EXPECT(emu.scorr[i] == ref.scorr[i], "%s: scorr[%" PRId64 "] %d vs %d", tag, i, emu.scorr[i], ref.scorr[i]);
    if (ref.sconf[i] != 0.0f && bin_of(emu.sconf[i], nb) != bin_of(ref.sconf[i], nb)) { ++near_edge; std::printf("edge: %s emu %.9g ref %.9g nb %d\n", tag, emu.sconf[i], ref.sconf[i], nb); }
  }
  for (int64_t m = 0; m < M; ++m) {
    EXPECT(emu.nonfinite[m] == ref.nonfinite[m], "%s: nonfinite[%" PRId64 "] %" PRId64 " vs %" PRId64, tag, m, emu.nonfinite[m], ref.nonfinite[m]);
    int64_t tot_e = 0, tot_r = 0;
    for (int b = 0; b <= nb; ++b) {
      const int64_t i = m * nb1 + b;
      tot_e += emu.count[i];
      tot_r += ref.count[i];
      if (near_edge == 0) {
        EXPECT(emu.count[i] == ref.count[i], "%s: count[%" PRId64 ",%d] %" PRId64 " vs %" PRId64, tag, m, b, emu.count[i], ref.count[i]);
        EXPECT(emu.correct[i] == ref.correct[i], "%s: correct[%" PRId64 ",%d]", tag, m, b);
        EXPECT(std::fabs(emu.conf[i] - ref.conf[i]) <= 1e-5 * std::max(1.0, ref.conf[i]), "%s: conf[%" PRId64 ",%d] %.12g vs %.12g", tag, m, b,
               emu.conf[i], ref.conf[i]);
      }
    }
    EXPECT(tot_e == tot_r && tot_e + emu.nonfinite[m] == N, "%s: totals", tag);
    EXPECT(std::fabs(emu.sums[2 * m] - ref.sums[2 * m]) <= 1e-5 * std::max(1.0, std::fabs(ref.sums[2 * m])) + 1e-5 * N,
           "%s: nll %.12g vs %.12g", tag, emu.sums[2 * m], ref.sums[2 * m]);
    EXPECT(std::fabs(emu.sums[2 * m + 1] - ref.sums[2 * m + 1]) <= 1e-5 * std::max(1.0, std::fabs(ref.sums[2 * m + 1])) + 1e-5 * N,
           "%s: brier %.12g vs %.12g", tag, emu.sums[2 * m + 1], ref.sums[2 * m + 1]);
  }
  // saturated bin: every row of value_mode 2 with n % 3 == 0 and finite must sit in slot nb
  if (value_mode == 2 && !nonfinite_mode && !bad_label_mode) {
    for (int64_t m = 0; m < M; ++m) EXPECT(emu.count[m * nb1 + nb] >= 1, "%s: no saturated rows", tag);
  }
  g_edge += near_edge;
}

// ------------------------------------------------------------------------------------------------------
// C. near-saturated rows and extreme logits: emulation and CPU kernel vs a float64 oracle
// ------------------------------------------------------------------------------------------------------
static float decode(DType dt, float v) {  // the float32 value the kernels see for v stored as dt
  if (dt == DType::Float32) return v;
  if (dt == DType::BFloat16) return u32_as_float(static_cast<uint32_t>(f2bf(v)) << 16);
  return fp16_to_float(f2h(v));
}

static int64_t g_oracle_rows = 0, g_oracle_saturated = 0, g_oracle_rescued = 0;

// rows: N x C float values (stored as dt, then decoded for the oracle). Model 0's labels are the argmax (NLL =
// log1p(rest), Brier = (rest^2 + rest2) / s^2: tiny values, compared relative to themselves), model 1's another
// class. layout: 0 contiguous, 1 padded rows with a misaligned base, 3 transposed (strided path).
static void run_oracle_case(std::mt19937& rng, DType dt, int64_t N, int C, const std::vector<float>& rows, int layout,
                            int64_t grid, int G_override, const char* what) {
  const int64_t M = 2;
  const size_t es = dt == DType::Float32 ? 4 : 2;
  int64_t xs0, xs1, xs2;
  const int pad = 1 + (int)(rng() % 5);
  const int64_t base_off = layout == 1 ? 1 + (int64_t)(rng() % 7) : 0;
  if (layout == 0) { xs2 = 1; xs1 = C; xs0 = N * C; }
  else if (layout == 1) { xs2 = 1; xs1 = C + pad; xs0 = N * (C + pad) + 3; }
  else { xs2 = N; xs1 = 1; xs0 = N * C; }
  const int64_t span = base_off + (M - 1) * xs0 + (N - 1) * xs1 + (int64_t)(C - 1) * xs2 + 1;
  std::vector<uint8_t> storage((size_t)span * es);
  void* xbase = storage.data() + base_off * es;
  std::vector<double> xv((size_t)N * C);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      for (int c = 0; c < C; ++c) {
        const float v = rows[n * C + c];
        const int64_t off = m * xs0 + n * xs1 + c * xs2;
        if (dt == DType::Float32) ((float*)xbase)[off] = v;
        else if (dt == DType::BFloat16) ((uint16_t*)xbase)[off] = f2bf(v);
        else ((uint16_t*)xbase)[off] = f2h(v);
        xv[n * C + c] = decode(dt, v);
      }
  // float64 oracle per row
  std::vector<int> pred(N);
  std::vector<double> rest(N), rest2(N);
  std::vector<float> conf32(N);
  std::vector<int64_t> lab(M * N);
  for (int64_t n = 0; n < N; ++n) {
    const double* x = &xv[n * C];
    int p = 0;
    for (int c = 1; c < C; ++c) p = x[c] > x[p] ? c : p;
    double r = 0, r2 = 0;
    float naive = 1.0f;  // the max's 1 first, then every other term: what the old kernels rounded like
    for (int c = 0; c < C; ++c) {
      if (c == p) continue;
      const double e = std::exp(x[c] - x[p]);
      r += e;
      r2 += e * e;
      naive += (float)e;
    }
    pred[n] = p;
    rest[n] = r;
    rest2[n] = r2;
    const float s32 = (float)(1.0 + r);  // an accurately summed float32 softmax: 1 + rest rounded once
    conf32[n] = 1.0f / s32;
    lab[n] = p;
    lab[N + n] = C > 1 ? (p + 1 + (int)(rng() % (C - 1))) % C : 0;
    ++g_oracle_rows;
    g_oracle_saturated += s32 == 1.0f;
    g_oracle_rescued += naive == 1.0f && s32 != 1.0f;
  }
  const int nb = 10;
  Problem p{dt, xbase, M, N, C, xs0, xs1, xs2, lab.data(), true, N, 1, nb};
  Out ref(M, N, nb), emu(M, N, nb);
  CalibrationBinsArgs a;
  const int64_t nb1 = nb + 1;
  a.logits = TensorView{(uintptr_t)xbase, dt, {M, N, (int64_t)C}, {xs0, xs1, xs2}, -1};
  a.labels = TensorView{(uintptr_t)lab.data(), DType::Int64, {M, N}, {N, 1}, -1};
  a.n_bins = nb;
  bind_outputs(a, ref, M, N, nb1);
  calibration_bins_cpu(a, 2);
  const bool contiguous = xs2 == 1 || C == 1;
  int G;
  if (dt == DType::Float32) {
    G = G_override ? G_override : contiguous ? pick_G<TagF32, true>(C) : pick_G<TagF32, false>(C);
    if (contiguous) emulate_dispatch<TagF32, true>(p, grid, emu, G);
    else emulate_dispatch<TagF32, false>(p, grid, emu, G);
  } else if (dt == DType::BFloat16) {
    G = G_override ? G_override : contiguous ? pick_G<TagBF16, true>(C) : pick_G<TagBF16, false>(C);
    if (contiguous) emulate_dispatch<TagBF16, true>(p, grid, emu, G);
    else emulate_dispatch<TagBF16, false>(p, grid, emu, G);
  } else {
    G = G_override ? G_override : contiguous ? pick_G<TagF16, true>(C) : pick_G<TagF16, false>(C);
    if (contiguous) emulate_dispatch<TagF16, true>(p, grid, emu, G);
    else emulate_dispatch<TagF16, false>(p, grid, emu, G);
  }
  for (int k = 0; k < 2; ++k) {
    const Out& o = k == 0 ? emu : ref;
    char tag[200];
    std::snprintf(tag, sizeof(tag), "%s [%s] dt=%d C=%d layout=%d G=%d", what, k == 0 ? "emulation" : "cpu", (int)dt, C,
                  layout, G);
    for (int64_t m = 0; m < M; ++m) {
      int64_t saturated = 0;
      bool ambiguous = false;
      double nll = 0, brier = 0, nll_abs = 0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t i = m * N + n;
        const int64_t y = lab[i];
        const double* x = &xv[n * C];
        const double s = 1.0 + rest[n];
        const double ey = y == pred[n] ? 1.0 : std::exp(x[y] - x[pred[n]]);
        const double row_nll = (x[pred[n]] - x[y]) + std::log1p(rest[n]);
        nll += row_nll;
        nll_abs += std::fabs(row_nll);
        brier += y == pred[n] ? (rest[n] * rest[n] + rest2[n]) / (s * s) : (1.0 + rest2[n]) / (s * s) - 2.0 * ey / s + 1.0;
        // 1 + rest rounds to 1 in float32 iff rest <= 2^-24: undecidable within the kernels' rest error.
        const bool near = std::fabs(rest[n] - 0x1p-24) <= 1e-4 * 0x1p-24;
        ambiguous |= near;
        saturated += conf32[n] == 1.0f;
        EXPECT(o.scorr[i] == (y == pred[n]), "%s: correct[%" PRId64 "]", tag, i);
        if (!near) {
          EXPECT((o.sconf[i] == 1.0f) == (conf32[n] == 1.0f), "%s: row %" PRId64 " rest %.6g: conf %.9g, oracle %.9g", tag,
                 n, rest[n], o.sconf[i], conf32[n]);
        }
        // A few ulps while rest is small; with a tied max (rest >= 1) the float32 summation error of up to C
        // terms against a sum >= 2, as in any float32 softmax.
        const float ctol = rest[n] < 0.5 ? 4e-7f : 4e-6f;
        EXPECT(std::fabs(o.sconf[i] - conf32[n]) <= ctol * conf32[n], "%s: row %" PRId64 " conf %.9g vs %.9g", tag, n,
               o.sconf[i], conf32[n]);
      }
      EXPECT(o.nonfinite[m] == 0, "%s: nonfinite", tag);
      if (!ambiguous) {
        EXPECT(o.count[m * nb1 + nb] == saturated, "%s: model %" PRId64 " saturated %" PRId64 " vs oracle %" PRId64, tag, m,
               o.count[m * nb1 + nb], saturated);
      }
      // model 0: NLL = sum log1p(rest), Brier = sum (rest^2 + rest2) / s^2, relative to themselves
      const double nll_tol = (m == 0 ? 2e-5 : 1e-6) * nll_abs + 1e-30;
      EXPECT(std::isfinite(o.sums[2 * m]) && std::fabs(o.sums[2 * m] - nll) <= nll_tol, "%s: model %" PRId64
             " nll %.12g vs %.12g", tag, m, o.sums[2 * m], nll);
      const double brier_tol = (m == 0 ? 1e-4 * std::fabs(brier) : 1e-6 * N) + 1e-30;
      EXPECT(std::fabs(o.sums[2 * m + 1] - brier) <= brier_tol, "%s: model %" PRId64 " brier %.12g vs %.12g", tag, m,
             o.sums[2 * m + 1], brier);
    }
  }
}

static void test_saturation_and_extremes(std::mt19937& rng) {
  const DType dts[3] = {DType::Float32, DType::Float16, DType::BFloat16};
  const int Gs[5] = {0, 4, 8, 16, 32};
  for (DType dt : dts)
    for (int C : {10, 100, 1000, 13}) {
      // Near-saturated: the top logit 15-25 above the rest, in the first / last / middle column, next to a
      // vector or lane-group boundary, or anywhere; some rows with a tied top.
      const int64_t N = 60;
      std::vector<float> rows((size_t)N * C);
      for (int64_t n = 0; n < N; ++n) {
        const float top = std::uniform_real_distribution<float>(-8.0f, 8.0f)(rng);
        const float gap = std::uniform_real_distribution<float>(15.0f, 25.0f)(rng);
        for (int c = 0; c < C; ++c) rows[n * C + c] = top - gap + std::uniform_real_distribution<float>(-0.3f, 0.3f)(rng);
        const int spots[8] = {0, C - 1, C / 2, 1, C - 2, 7, 8 * (1 + (int)(rng() % 4)) % C, (int)(rng() % C)};
        rows[n * C + spots[n % 8]] = top;
        if (n % 11 == 5) rows[n * C + (spots[n % 8] + 1 + (int)(rng() % (C - 1))) % C] = top;  // a tie
      }
      for (int layout : {0, 1, 3})
        run_oracle_case(rng, dt, N, C, rows, layout, 1 + rng() % 5, Gs[rng() % 5], "near-saturated");
      // Extremes: +-FLT_MAX (bf16: +-3.39e38 after truncation, fp16: +-65504), +-3e38, 0 and ordinary values.
      std::vector<float> ext((size_t)N * C);
      const float bigs[2] = {FLT_MAX, 3e38f};
      for (int64_t n = 0; n < N; ++n) {
        const float big = bigs[n % 2];
        for (int c = 0; c < C; ++c) {
          const int kind = (int)(rng() % 4);
          ext[n * C + c] = kind == 0 ? -big : kind == 1 ? 0.0f : kind == 2 ? -big / 2 : std::normal_distribution<float>(0.f, 3.f)(rng);
        }
        const int top = n % 3 == 0 ? 0 : n % 3 == 1 ? C - 1 : (int)(rng() % C);
        ext[n * C + top] = n % 5 == 4 ? 0.5f * big : big;
        if (n % 7 == 3) {
          for (int c = 0; c < C; ++c) ext[n * C + c] = -big;  // every logit at the bottom: conf 1/C
        }
      }
      for (int layout : {0, 1, 3}) run_oracle_case(rng, dt, N, C, ext, layout, 1 + rng() % 5, Gs[rng() % 5], "extremes");
    }
  // The classic case of issue 8: [3e38, -3e38, 0] (NLL 6e38 for label 1) and its mirror images.
  for (DType dt : dts) {
    const std::vector<float> r = {3e38f, -3e38f, 0.0f, -3e38f, 0.0f, 3e38f, 0.0f, 3e38f, -3e38f};
    run_oracle_case(rng, dt, 3, 3, r, 0, 1, 0, "issue 8");
  }
  EXPECT(g_oracle_saturated > 0 && g_oracle_saturated < g_oracle_rows, "oracle coverage: %" PRId64 " of %" PRId64
         " saturated", g_oracle_saturated, g_oracle_rows);
  EXPECT(g_oracle_rescued > 0, "no row that summing the max's 1 first would saturate");
  std::printf("saturation/extremes rows: %" PRId64 " (saturated %" PRId64 ", saturated only by a naive sum %" PRId64 ")\n",
              g_oracle_rows, g_oracle_saturated, g_oracle_rescued);
}

int main() {
  test_merge();
  std::mt19937 rng(42);
  const DType dts[3] = {DType::Float32, DType::Float16, DType::BFloat16};
  // Systematic small C sweep over all dtypes/layouts (head/tail/vector boundaries), forced and picked G.
  for (DType dt : dts)
    for (int layout = 0; layout < 4; ++layout)
      for (int C : {1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 100, 127, 129, 257, 513, 1000, 1001}) {
        const int64_t M = 1 + rng() % 3, N = 1 + rng() % 40;
        const int64_t grid = 1 + rng() % 9;
        run_case(rng, dt, M, N, C, layout, rng() & 1, rng() % 4 == 0, 1 + rng() % 20, rng() % 3, rng() % 3 == 0,
                 rng() % 4 == 0, grid, 0);
        const int Gs[4] = {4, 8, 16, 32};
        run_case(rng, dt, M, N, C, layout, rng() & 1, false, 15, 0, 1, 1, grid, Gs[rng() % 4]);
      }
  // Many small models (direct segments), many bins, big grids.
  for (int i = 0; i < 60; ++i) {
    const DType dt = dts[rng() % 3];
    const int64_t M = 1 + rng() % 40, N = 1 + rng() % 60;
    const int C = 1 + rng() % 200;
    const int nb = (i % 3 == 0) ? 4096 : (i % 3 == 1) ? 1 : 1 + rng() % 100;
    const int64_t grid = 1 + rng() % 200;
    run_case(rng, dt, M, N, C, rng() % 4, rng() & 1, rng() & 1, nb, rng() % 3, rng() & 1, rng() % 3 == 0, grid, 0);
  }
  // A few larger ones (several segments per block, shared path).
  for (int i = 0; i < 6; ++i) {
    const DType dt = dts[i % 3];
    run_case(rng, dt, 3, 2000, 1000 + (int)(rng() % 3), i % 2 ? 1 : 0, true, false, 15, 0, 1, 0, 5, 0);
  }
  test_saturation_and_extremes(rng);
  std::printf("cases: %d, segments: shared %" PRId64 ", direct %" PRId64 "\n", g_cases, g_shared_segments, g_direct_segments);
  std::printf("samples whose bin differs (conf at a bin edge, bins not compared): %" PRId64 "\n", g_edge);
  std::printf("%s: %d failures\n", g_fail ? "FAILED" : "OK", g_fail);
  return g_fail ? 1 : 0;
}
