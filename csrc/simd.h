// Eight-lane float32 helpers shared by the CPU row kernels (calibration_bins.cpp, prompt_logits.cpp): GCC/Clang
// vector-extension types (one AVX register in the x86-64-v3 clone, two SSE registers in the baseline clone, with
// no reliance on the auto-vectoriser), lane-wise min/max/add/bit ops, the three-step horizontal reduction, and
// the branch-free exp polynomial. Everything is always_inline so each target_clones clone of a caller gets its
// own instruction set. Internal to the extension: included inside `namespace vlmfast { namespace { ... } }`.
#pragma once

#include <cstdint>
#include <cstring>

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
namespace simd {

typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef double vd4 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

VLMFAST_INLINE vf8 splat(float v) { return vf8{v, v, v, v, v, v, v, v}; }
VLMFAST_INLINE vi8 splati(int32_t v) { return vi8{v, v, v, v, v, v, v, v}; }

// Lane permutations for the horizontal reductions (three steps: halves, quarters, neighbours).
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define VLMFAST_PERMUTE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define VLMFAST_PERMUTE(v, ...) __builtin_shuffle(v, ::vlmfast::simd::vi8{__VA_ARGS__})
#endif
#define VLMFAST_HREDUCE(v, OP)                             \
  do {                                                     \
    v = OP(v, VLMFAST_PERMUTE(v, 4, 5, 6, 7, 0, 1, 2, 3)); \
    v = OP(v, VLMFAST_PERMUTE(v, 2, 3, 0, 1, 6, 7, 4, 5)); \
    v = OP(v, VLMFAST_PERMUTE(v, 1, 0, 3, 2, 5, 4, 7, 6)); \
  } while (0)

template <class V>
VLMFAST_INLINE V vadd(V a, V b) { return a + b; }
template <class V>
VLMFAST_INLINE V vor(V a, V b) { return a | b; }
template <class V>
VLMFAST_INLINE V vand(V a, V b) { return a & b; }
template <class V>
VLMFAST_INLINE V vmax(V a, V b) { return a > b ? a : b; }
template <class V>
VLMFAST_INLINE V vmin(V a, V b) { return a < b ? a : b; }

VLMFAST_INLINE vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
VLMFAST_INLINE void store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) for x in [-87, 88], eight float32 lanes. Range reduction x = k ln2 + r, |r| <= ln2/2 (k rounded to
// nearest with the 1.5 * 2^23 trick), then the degree-7 Taylor polynomial of exp(r) (truncation error < 6e-9
// relative, below one float ulp) and 2^k built from the exponent bits. Exactly 1 at x = 0. A NaN stays NaN.
VLMFAST_INLINE vf8 exp_core(vf8 xc) {
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

// exp(x) for x <= 0 (x = logit - row max). Inputs below -87 (and -inf) are clamped to -87, giving ~1.6e-38
// instead of a denormal or 0: against a sum >= 1 that is invisible (1 + 1.6e-38 == 1 in float32), so a saturated
// softmax still has confidence exactly 1.0, and a row's own maximum contributes exactly 1.
VLMFAST_INLINE vf8 exp_nonpos(vf8 x) {
  const vf8 lo = splat(-87.0f);
  return exp_core(x < lo ? lo : x);
}

VLMFAST_INLINE float exp_nonpos(float x) { return exp_nonpos(splat(x))[0]; }

// exp(x - lse)-style terms of a backward pass: exactly 0 below -87 (a masked -inf entry gets 0, not 1.6e-38),
// clamped at 88 above (reachable only by rounding, or with an lse that is not the row's), so the exponent bits
// never overflow; a NaN stays NaN.
VLMFAST_INLINE vf8 exp_ftz(vf8 x) {
  const vf8 lo = splat(-87.0f), hi = splat(88.0f);
  vf8 xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vf8 e = exp_core(xc);
  return x < lo ? splat(0.0f) : e;
}

}  // namespace simd
}  // namespace vlmfast
