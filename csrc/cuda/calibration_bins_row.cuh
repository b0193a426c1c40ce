// Row math of the CUDA calibration_bins kernel, written as __host__ __device__ functions so that the same code
// can be compiled by a host C++ compiler and tested on a machine without a GPU.
//
// One row (model m, sample n) of C logits is split among the G lanes of a lane group. Every lane folds the
// elements it owns, in increasing class order, into a partial state (mx, idx, rest, rest2) with an online max:
//   mx   = max of the lane's elements, idx = first class index holding mx,
//   rest = sum exp(x - mx) over the lane's elements except the one at idx,  rest2 = the same of exp(x - mx)^2.
// The element at idx (exactly exp(0) = 1) is kept out of the sums: added to them, it would round away the small
// terms of a near-saturated row one by one (each below half an ulp of 1 at gaps ~17-20), and conf = 1 / s with
// s = 1 + rest would become exactly 1.0 where an accurately summed softmax is not. When the max moves, the old
// max's 1 joins the rest: rest = (rest + 1) * exp(mx_old - mx_new).
// The lanes' states are then merged (merge_states: the larger max wins, ties go to the lower class index, the
// loser's rest + 1 is rescaled by exp(mx_lo - mx_hi), rest2 + 1 by its square). Because the winner of a merge is
// chosen with a total order on (mx descending, idx ascending), the argmax is the first argmax of the row
// whatever the order of the merges; the sums are equal up to float rounding. A state is never rescaled when it
// already holds the row maximum (the factor is then taken as exactly 1), so a row whose other terms all
// underflow gets rest == 0 and conf == 1.0, and a row with k tied maxima gets rest == k - 1 exactly.
//
// exp: on the device the __expf algorithm, ex2.approx.ftz(x * log2(e)) (about 2 ulp plus |x| * 2^-24 relative
// error, results below 2^-126 flushed to 0, exactly 1 at x = 0); std::exp on the host (test builds).
// Non-finite detection: amax = NaN-propagating max of |x| over the lane's real elements (padding excluded);
// the row is bad when !(amax <= FLT_MAX), i.e. on any NaN or +-inf.
#pragma once

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "tensor.h"  // host conversions fp16_to_float / bf16_to_float

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define VLMFAST_HD __host__ __device__ __forceinline__
#define VLMFAST_UNROLL _Pragma("unroll")
#else
#define VLMFAST_HD inline
#define VLMFAST_UNROLL
#endif

namespace vlmfast {
namespace cb {

// ---------------------------------------------------------------------------------------------------------
// Element types. raw_t is the storage type; kVec elements make one 16-byte vector.
// ---------------------------------------------------------------------------------------------------------
struct alignas(16) Vec16 {
  uint32_t w[4];
};

struct TagF32 {
  using raw_t = float;
  static constexpr int kVec = 4;
};
struct TagF16 {
  using raw_t = uint16_t;
  static constexpr int kVec = 8;
};
struct TagBF16 {
  using raw_t = uint16_t;
  static constexpr int kVec = 8;
};

VLMFAST_HD float u32_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

VLMFAST_HD float to_float(TagF32, float v) { return v; }
VLMFAST_HD float to_float(TagBF16, uint16_t v) { return u32_as_float(static_cast<uint32_t>(v) << 16); }
VLMFAST_HD float to_float(TagF16, uint16_t v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v));
#else
  return fp16_to_float(v);
#endif
}

VLMFAST_HD void unpack(TagF32, const Vec16& r, float (&out)[4]) {
VLMFAST_UNROLL
  for (int i = 0; i < 4; ++i) out[i] = u32_as_float(r.w[i]);
}
VLMFAST_HD void unpack(TagBF16, const Vec16& r, float (&out)[8]) {
VLMFAST_UNROLL
  for (int i = 0; i < 4; ++i) {  // little endian: the lower half-word is the lower class index
    out[2 * i] = u32_as_float(r.w[i] << 16);
    out[2 * i + 1] = u32_as_float(r.w[i] & 0xffff0000u);
  }
}
VLMFAST_HD void unpack(TagF16, const Vec16& r, float (&out)[8]) {
VLMFAST_UNROLL
  for (int i = 0; i < 4; ++i) {
#if defined(__CUDA_ARCH__)
    __half2 h;
    std::memcpy(&h, &r.w[i], sizeof(h));
    const float2 f = __half22float2(h);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
#else
    out[2 * i] = fp16_to_float(static_cast<uint16_t>(r.w[i] & 0xffffu));
    out[2 * i + 1] = fp16_to_float(static_cast<uint16_t>(r.w[i] >> 16));
#endif
  }
}

// 16-byte streaming load (read once: no L1 allocation, 256-byte L2 prefetch). p must be 16-byte aligned.
VLMFAST_HD Vec16 load16(const void* p) {
  Vec16 v;
#if defined(__CUDA_ARCH__)
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
      : "l"(p));
#else
  if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0) std::abort();  // host tests: a device load would fault
  std::memcpy(&v, p, sizeof(v));
#endif
  return v;
}

template <class Tag>
VLMFAST_HD float load_elem(const typename Tag::raw_t* p) {
#if defined(__CUDA_ARCH__)
  return to_float(Tag{}, __ldg(p));
#else
  return to_float(Tag{}, *p);
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Scalar helpers
// ---------------------------------------------------------------------------------------------------------
// Device: what __expf does, 2^(x * log2(e)) with ex2.approx, but in its flush-to-zero form (one MUFU.EX2, no
// subnormal fix-up; results below 2^-126 become 0). x = 0 gives exactly 1 (0 * log2(e) = 0, ex2(0) = 1).
VLMFAST_HD float exp_f(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x * 1.44269504088896341f));
  return r;
#elif defined(VLMFAST_CB_HOST_EXP2)  // host tests: the device formula with an exact exp2, flushed to zero
  const float r = std::exp2(x * 1.44269504088896341f);
  return r < FLT_MIN ? 0.0f : r;
#else
  return std::exp(x);
#endif
}

// max that returns NaN when either operand is NaN (fmaxf would drop it).
VLMFAST_HD float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Partial row state and its merge
// ---------------------------------------------------------------------------------------------------------
struct RowState {
  float mx;     // running max (-inf: no element yet)
  int idx;      // first class index holding mx (INT_MAX: none)
  float rest;   // sum of exp(x - mx) over the elements other than idx's
  float rest2;  // sum of exp(x - mx)^2 over the same elements
};

VLMFAST_HD RowState empty_state() { return RowState{-INFINITY, INT_MAX, 0.0f, 0.0f}; }

// Merge of two partial states over disjoint element sets. Commutative in the chosen (mx, idx); all of the
// loser's elements, its own max (1) included, join the winner's rest, rescaled onto the winner's max. A state
// whose max equals the winner's is not rescaled (factor exactly 1); an empty state adds nothing, and two empty
// states (-inf) merge without forming -inf - -inf.
VLMFAST_HD RowState merge_states(const RowState& a, const RowState& b) {
  const bool take_b = b.mx > a.mx || (b.mx == a.mx && b.idx < a.idx);
  RowState hi = take_b ? b : a;
  const RowState lo = take_b ? a : b;
  const float one = lo.idx == INT_MAX ? 0.0f : 1.0f;  // lo's own max, unless lo is empty
  const float f = (lo.mx == hi.mx) ? 1.0f : exp_f(lo.mx - hi.mx);
  hi.rest = fmaf(lo.rest + one, f, hi.rest);
  hi.rest2 = fmaf(lo.rest2 + one, f * f, hi.rest2);
  return hi;
}

// Everything one lane accumulates for one row.
struct LaneAcc {
  RowState st;
  float amax;  // NaN-propagating max |x| over the lane's real elements
  float xy;    // the label's logit, when this lane owns it
  bool have;   // this lane owns the label's element
};

VLMFAST_HD void lane_init(LaneAcc& a) {
  a.st = empty_state();
  a.amax = 0.0f;
  a.xy = 0.0f;
  a.have = false;
}

// Folds a chunk of NU x NV values into the lane state (one exp per value, plus one for the rescale). v[j][t] is
// class c0[j] + t; rows j with valid[j] false are padding and hold -inf (they add exp(-inf - mx) = 0, and are
// left out of amax and of the label capture); valid[0] must be true. Requirement: the classes of a chunk
// increase with (j, t) and exceed every class this lane folded before, so a strict '>' keeps the first
// argmax. y is the label, or -1 when invalid.
template <int NU, int NV>
VLMFAST_HD void chunk_update(LaneAcc& a, const float (&v)[NU][NV], const bool (&valid)[NU], const int (&c0)[NU],
                             int y) {
  float cmax = v[0][0];  // fmaxf drops NaN: cmax is NaN only when every value is
VLMFAST_UNROLL
  for (int j = 0; j < NU; ++j) {
VLMFAST_UNROLL
    for (int t = 0; t < NV; ++t) {
      if (j > 0 || t > 0) cmax = fmaxf(cmax, v[j][t]);
    }
  }
VLMFAST_UNROLL
  for (int j = 0; j < NU; ++j) {
    if (valid[j]) {
VLMFAST_UNROLL
      for (int t = 0; t < NV; ++t) a.amax = max_nan(a.amax, fabsf(v[j][t]));
      const unsigned off = static_cast<unsigned>(y - c0[j]);
      if (off < static_cast<unsigned>(NV)) {
VLMFAST_UNROLL
        for (int t = 0; t < NV; ++t) {
          if (static_cast<unsigned>(t) == off) a.xy = v[j][t];
        }
        a.have = true;
      }
    }
  }
  // First class holding cmax (cmax is one of the values unless the whole chunk is NaN, a bad row anyway).
  int id_base = c0[0], id_t = 0;
VLMFAST_UNROLL
  for (int j = NU - 1; j >= 0; --j) {
VLMFAST_UNROLL
    for (int t = NV - 1; t >= 0; --t) {
      if (v[j][t] == cmax) {
        id_base = c0[j];
        id_t = t;
      }
    }
  }
  // Branch-free online update (the new-max test is divergent across lanes, so a branch would rarely be skipped
  // by a whole warp). When the max does not grow, f = exp(0) = 1 exactly and every element of the chunk joins
  // the rest (one equal to mx is a later tie: exactly 1). When it grows, the chunk's max element is the new
  // max (left out of the rest) and the old max's 1 joins the rest: rest = (rest + 1) * f; on the lane's first
  // chunk f = exp(-inf) = 0, so the empty state adds nothing. -inf - -inf (NaN) can only arise in a row
  // holding -inf, which is reported as bad.
  const bool grows = cmax > a.st.mx;
  const float mx = grows ? cmax : a.st.mx;
  const float f = exp_f(a.st.mx - mx);
  const float one = grows ? 1.0f : 0.0f;
  const int drop = grows ? id_base + id_t : -1;  // class of the new max (none when the max stays)
  a.st.idx = grows ? drop : a.st.idx;
  a.st.mx = mx;
  float cs = 0.0f, cs2 = 0.0f;
VLMFAST_UNROLL
  for (int j = 0; j < NU; ++j) {
VLMFAST_UNROLL
    for (int t = 0; t < NV; ++t) {
      float e = exp_f(v[j][t] - mx);  // one exp per element; exactly 1 for the maximum
      e = (c0[j] + t == drop) ? 0.0f : e;
      if (j == 0 && t == 0) {
        cs = e;
        cs2 = e * e;
      } else {
        cs += e;
        cs2 = fmaf(e, e, cs2);
      }
    }
  }
  a.st.rest = fmaf(a.st.rest + one, f, cs);
  a.st.rest2 = fmaf(a.st.rest2 + one, f * f, cs2);
}

template <class Tag>
VLMFAST_HD void element_update(LaneAcc& a, const typename Tag::raw_t* row, int c, int y) {
  const float v[1][1] = {{load_elem<Tag>(row + c)}};
  const bool valid[1] = {true};
  const int c0[1] = {c};
  chunk_update<1, 1>(a, v, valid, c0, y);
}

// ---------------------------------------------------------------------------------------------------------
// One lane's pass over one row
// ---------------------------------------------------------------------------------------------------------

// Contiguous row (stride 1 along C), base element-aligned. Split: head elements up to the first 16-byte
// boundary, nv whole 16-byte vectors, tail elements. Lane gl of G owns head/tail elements gl, gl + G, ... and
// vectors gl, gl + G, ...; vectors are loaded U at a time (all U loads are issued before any is used).
// Reads only [row, row + C).
template <class Tag, int G, int U>
VLMFAST_HD void lane_pass_contiguous(LaneAcc& a, const typename Tag::raw_t* row, int C, int gl, int y) {
  using raw_t = typename Tag::raw_t;
  constexpr int V = Tag::kVec;
  static_assert(V * sizeof(raw_t) == 16, "a vector is 16 bytes");
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  int head = static_cast<int>(((16u - static_cast<unsigned>(addr & 15u)) & 15u) / sizeof(raw_t));
  if (head > C) head = C;
  const int nv = (C - head) / V;
  const int body_end = head + nv * V;
  for (int c = gl; c < head; c += G) element_update<Tag>(a, row, c, y);
  const raw_t* body = row + head;  // 16-byte aligned
  for (int k = gl; k < nv; k += G * U) {
    Vec16 raw[U];
    bool valid[U];
    int c0[U];
VLMFAST_UNROLL
    for (int j = 0; j < U; ++j) {
      const int vi = k + j * G;
      valid[j] = vi < nv;
      c0[j] = head + vi * V;
      if (valid[j]) {
        raw[j] = load16(body + static_cast<size_t>(vi) * V);
      } else {
        raw[j] = Vec16{{0u, 0u, 0u, 0u}};
      }
    }
    // Fold the vectors one at a time (online max per vector): only one vector is live as floats, the others
    // stay packed in their load registers. A vector past the row end (valid false) is skipped entirely.
VLMFAST_UNROLL
    for (int j = 0; j < U; ++j) {
      if (valid[j]) {
        float v[1][V];
        unpack(Tag{}, raw[j], v[0]);
        const bool vj[1] = {true};
        const int cj[1] = {c0[j]};
        chunk_update<1, V>(a, v, vj, cj, y);
      }
    }
  }
  for (int c = body_end + gl; c < C; c += G) element_update<Tag>(a, row, c, y);
}

// Any stride along C (elements sc apart): scalar loads, U per lane per chunk, lane gl owns classes gl + i * G.
template <class Tag, int G, int U>
VLMFAST_HD void lane_pass_strided(LaneAcc& a, const typename Tag::raw_t* row, int64_t sc, int C, int gl, int y) {
  for (int cb = gl; cb < C; cb += G * U) {
    float v[U][1];
    bool valid[U];
    int c0[U];
VLMFAST_UNROLL
    for (int j = 0; j < U; ++j) {
      const int c = cb + j * G;
      valid[j] = c < C;
      c0[j] = c;
      v[j][0] = valid[j] ? load_elem<Tag>(row + static_cast<int64_t>(c) * sc) : -INFINITY;
    }
    chunk_update<U, 1>(a, v, valid, c0, y);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Row results (same formulas as calibration_bins.cpp)
// ---------------------------------------------------------------------------------------------------------
struct RowOut {
  float conf;
  double nll;
  float brier;
  int pred;
};

// s = 1 + rest; conf = 1 / s; nll = (mx - x_y) + log1p(rest) with the difference in float64 (it overflows
// float32 for finite logits such as 3e38 and -3e38); Brier = sum_c p_c^2 - 2 p_y + 1
// = ((1 - e_y + rest)^2 + (1 - e_y^2 + rest2)) / s^2 with e_y = exp(x_y - mx), exactly 1 for the label at the
// max: then (rest^2 + rest2) / s^2, with no cancellation near saturation.
VLMFAST_HD RowOut finalize_row(const RowState& st, float xy) {
  RowOut o;
  const float s = 1.0f + st.rest;
  const float ey = exp_f(xy - st.mx);
  const float u = (1.0f - ey) + st.rest;
  const float w = (1.0f - ey * ey) + st.rest2;
  o.pred = st.idx;
  o.conf = 1.0f / s;
  o.nll = (static_cast<double>(st.mx) - static_cast<double>(xy)) + static_cast<double>(log1pf(st.rest));
  o.brier = (u * u + w) / (s * s);
  return o;
}

// floor(conf * n_bins) in float64, clamped to [0, n_bins] (slot n_bins: conf == 1.0 exactly).
VLMFAST_HD int bin_of(float conf, int n_bins) {
  const double b = floor(static_cast<double>(conf) * static_cast<double>(n_bins));
  if (!(b >= 0.0)) return 0;
  if (b >= static_cast<double>(n_bins)) return n_bins;
  return static_cast<int>(b);
}

// Rows [r0, r1) of the flattened (model, sample) index space handled by block `bid` of `grid`.
VLMFAST_HD void block_rows(int64_t bid, int64_t grid, int64_t rows, int64_t* r0, int64_t* r1) {
  *r0 = bid * rows / grid;
  *r1 = (bid + 1) * rows / grid;
}

}  // namespace cb
}  // namespace vlmfast
