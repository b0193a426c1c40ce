// equal_mass_bins on the CPU: equal-mass (ACE) bins of per-sample confidences. Semantics: see equal_mass_bins.h.
#include "equal_mass_bins.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

// ------------------------------------------------------------------------------------------------------------
// Equal-mass bins: stable LSD radix sort of the confidence bits (11-bit digits, passes whose digit is constant
// skipped), carrying the sample index, then a linear walk that cuts the sorted order into the groups.
// ------------------------------------------------------------------------------------------------------------
namespace vlmfast {
namespace {

// Order-preserving map of an IEEE float's bits to an unsigned integer (negative values flipped entirely).
inline uint32_t sortable(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
inline uint64_t sortable(double f) {
  uint64_t b;
  std::memcpy(&b, &f, sizeof(b));
  return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}

template <typename K>
void radix_argsort(std::vector<K>& keys, std::vector<K>& keys_tmp, std::vector<int32_t>& idx,
                   std::vector<int32_t>& idx_tmp) {
  constexpr int kBits = 11;
  constexpr uint32_t kBuckets = 1u << kBits;
  const size_t n = keys.size();
  std::vector<size_t> hist(kBuckets);
  for (int shift = 0; shift < static_cast<int>(8 * sizeof(K)); shift += kBits) {
    std::fill(hist.begin(), hist.end(), 0);
    for (size_t i = 0; i < n; ++i) ++hist[(keys[i] >> shift) & (kBuckets - 1)];
    if (hist[(keys[0] >> shift) & (kBuckets - 1)] == n) continue;  // same digit everywhere: order unchanged
    size_t sum = 0;
    for (uint32_t b = 0; b < kBuckets; ++b) {
      const size_t h = hist[b];
      hist[b] = sum;
      sum += h;
    }
    for (size_t i = 0; i < n; ++i) {
      const size_t dst = hist[(keys[i] >> shift) & (kBuckets - 1)]++;
      keys_tmp[dst] = keys[i];
      idx_tmp[dst] = idx[i];
    }
    keys.swap(keys_tmp);
    idx.swap(idx_tmp);
  }
}

template <typename T, typename K>
void equal_mass_model(const T* conf, const uint8_t* correct, int64_t N, int64_t n_bins, int64_t* count,
                      int64_t* n_correct, double* conf_sum) {
  std::vector<K> keys(static_cast<size_t>(N)), keys_tmp(static_cast<size_t>(N));
  std::vector<int32_t> idx(static_cast<size_t>(N)), idx_tmp(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) {
    keys[static_cast<size_t>(i)] = sortable(conf[i]);
    idx[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  }
  radix_argsort(keys, keys_tmp, idx, idx_tmp);
  const int64_t q = N / n_bins, r = N % n_bins;
  int64_t pos = 0;
  for (int64_t b = 0; b < n_bins && pos < N; ++b) {
    const int64_t size = q + (b < r ? 1 : 0);
    int64_t c = 0;
    double s = 0.0;
    for (int64_t j = pos; j < pos + size; ++j) {
      const int32_t i = idx[static_cast<size_t>(j)];
      c += correct[i] ? 1 : 0;
      s += static_cast<double>(conf[i]);
    }
    count[b] += size;
    n_correct[b] += c;
    conf_sum[b] += s;
    pos += size;
  }
}

}  // namespace

void equal_mass_bins_cpu(const TensorView& conf, const TensorView& correct, int64_t n_bins, const TensorView& count,
                         const TensorView& n_correct, const TensorView& conf_sum, int num_threads) {
  VLMFAST_CHECK(conf.dim() == 2, "conf: expected 2 dimensions (M, N), got ", conf.dim());
  VLMFAST_CHECK(conf.dtype == DType::Float32 || conf.dtype == DType::Float64, "conf: expected float32 or float64, got ",
                dtype_name(conf.dtype));
  VLMFAST_CHECK(!conf.is_cuda() && is_contiguous(conf), "conf: expected a contiguous CPU tensor");
  const int64_t M = conf.size(0), N = conf.size(1);
  VLMFAST_CHECK(N >= 1 && N < (int64_t(1) << 31), "conf: expected 1 <= N < 2^31 samples, got ", N);
  VLMFAST_CHECK(n_bins >= 1, "n_bins: expected >= 1, got ", n_bins);
  check_view(correct, "correct", DType::Bool, 2, -1);
  VLMFAST_CHECK(correct.size(0) == M && correct.size(1) == N && is_contiguous(correct),
                "correct: expected contiguous (", M, ", ", N, ")");
  check_view(count, "count", DType::Int64, 2, -1);
  check_view(n_correct, "n_correct", DType::Int64, 2, -1);
  check_view(conf_sum, "conf_sum", DType::Float64, 2, -1);
  for (const TensorView* t : {&count, &n_correct, &conf_sum}) {
    VLMFAST_CHECK(t->size(0) == M && t->size(1) == n_bins && is_contiguous(*t), "outputs: expected contiguous (", M,
                  ", ", n_bins, ")");
  }
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads > 0 ? num_threads
                                                                                              : omp_get_max_threads(),
                                                                              M)));
  const uint8_t* corr = correct.data<const uint8_t>();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t m = 0; m < M; ++m) {
    int64_t* c = count.data<int64_t>() + m * n_bins;
    int64_t* k = n_correct.data<int64_t>() + m * n_bins;
    double* s = conf_sum.data<double>() + m * n_bins;
    if (conf.dtype == DType::Float32) {
      equal_mass_model<float, uint32_t>(conf.data<const float>() + m * N, corr + m * N, N, n_bins, c, k, s);
    } else {
      equal_mass_model<double, uint64_t>(conf.data<const double>() + m * N, corr + m * N, N, n_bins, c, k, s);
    }
  }
}

}  // namespace vlmfast
