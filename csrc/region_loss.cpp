// region_loss on the CPU: the chunk kernels of RaVL's region-aware loss (the cosine GEMM is torch's, on image
// chunks). OpenMP over blocks of whole images; each image's R x C similarity block is read in place, region by
// region, with per-class running maxima / argmaxima (relevant regions), a two-pass max-subtracted LSE (spurious
// regions) and a per-region first argmax over the present classes. The backward pass writes dsim over c in one
// read. Semantics: see region_loss.h.
#include "region_loss.h"
#include "threads.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace vlmfast {
namespace {

constexpr int64_t kBlockElems = 1 << 13;  // similarities per OpenMP task (a block of whole images, at least one)
constexpr float kNinf = -std::numeric_limits<float>::infinity();

struct Strided {
  uintptr_t ptr;
  int64_t s0, s1;
  template <typename T>
  T& at(int64_t i, int64_t j) const { return reinterpret_cast<T*>(ptr)[i * s0 + j * s1]; }
};

Strided strided(const TensorView& t) {
  return {t.ptr, t.stride(0), t.dim() > 1 ? t.stride(1) : 0};
}

void check_c(const TensorView& c) {
  check_view(c, "c", DType::Float32, 3, -1);
  VLMFAST_CHECK(c.size(2) == 1 || c.stride(2) == 1, "c: expected stride 1 along the classes, got ", c.stride(2));
}

void check_2d(const TensorView& t, const char* name, DType dtype, int64_t n0, int64_t n1, const char* like) {
  check_view(t, name, dtype, 2, -1);
  VLMFAST_CHECK(t.size(0) == n0 && t.size(1) == n1, name, ": expected shape (", n0, ", ", n1, ") like c's ", like,
                ", got (", t.size(0), ", ", t.size(1), ")");
}

void check_1d(const TensorView& t, const char* name, DType dtype, int64_t n) {
  check_view(t, name, dtype, 1, -1);
  VLMFAST_CHECK(t.size(0) == n, name, ": expected shape (", n, ",) like c's classes, got (", t.size(0), ",)");
}


}  // namespace

void region_loss_stats_rows_cpu(const TensorView& c, double inv_tau, const TensorView& rel, const TensorView& spu,
                                const TensorView& present, const TensorView& m, const TensorView& am,
                                const TensorView& sl, const TensorView& smax, const TensorView& sarg,
                                int num_threads) {
  check_c(c);
  const int64_t NB = c.size(0), R = c.size(1), C = c.size(2);
  check_2d(rel, "rel", DType::Bool, NB, R, "(images, regions)");
  check_2d(spu, "spu", DType::Bool, NB, R, "(images, regions)");
  check_1d(present, "present", DType::Bool, C);
  check_2d(m, "m", DType::Float32, NB, C, "(images, classes)");
  check_2d(am, "am", DType::Int64, NB, C, "(images, classes)");
  check_2d(sl, "sl", DType::Float32, NB, C, "(images, classes)");
  check_2d(smax, "smax", DType::Float32, NB, R, "(images, regions)");
  check_2d(sarg, "sarg", DType::Int64, NB, R, "(images, regions)");
  if (NB == 0 || R == 0 || C == 0) return;
  const float S = static_cast<float>(inv_tau);
  const float* cp = c.data<const float>();
  const int64_t cs0 = c.stride(0), cs1 = c.stride(1);
  const Strided vrel = strided(rel), vspu = strided(spu), vm = strided(m), vam = strided(am), vsl = strided(sl),
                vsmax = strided(smax), vsarg = strided(sarg);
  std::vector<uint8_t> pres(static_cast<size_t>(C));
  for (int64_t k = 0; k < C; ++k) pres[static_cast<size_t>(k)] = present.data<const uint8_t>()[k * present.stride(0)];
  const int64_t per = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(R * C, 1));
  const int64_t blocks = (NB + per - 1) / per;
  const int threads = pick_threads(num_threads, NB * R * C, blocks);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> mx(static_cast<size_t>(C));
    std::vector<int64_t> ax(static_cast<size_t>(C));
    std::vector<float> smx(static_cast<size_t>(C));
    std::vector<double> ssum(static_cast<size_t>(C));
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      for (int64_t b = blk * per; b < std::min(NB, (blk + 1) * per); ++b) {
        std::fill(mx.begin(), mx.end(), kNinf);
        std::fill(ax.begin(), ax.end(), int64_t{-1});
        std::fill(smx.begin(), smx.end(), kNinf);
        std::fill(ssum.begin(), ssum.end(), 0.0);
        bool any_spu = false;
        for (int64_t r = 0; r < R; ++r) {
          const float* x = cp + b * cs0 + r * cs1;
          const bool is_rel = vrel.at<const uint8_t>(b, r) != 0;
          const bool is_spu = vspu.at<const uint8_t>(b, r) != 0;
          any_spu |= is_spu;
          float best = kNinf;
          int64_t arg = -1;
          for (int64_t k = 0; k < C; ++k) {
            const float z = x[k] * S;
            if (is_rel && z > mx[static_cast<size_t>(k)]) {
              mx[static_cast<size_t>(k)] = z;
              ax[static_cast<size_t>(k)] = r;
            }
            if (is_spu) smx[static_cast<size_t>(k)] = std::max(smx[static_cast<size_t>(k)], z);
            if (pres[static_cast<size_t>(k)] && (arg < 0 || z > best)) {
              if (z == z) {
                best = z;
                arg = k;
              }
            }
          }
          vsmax.at<float>(b, r) = best;
          vsarg.at<int64_t>(b, r) = arg;
        }
        if (any_spu) {  // second pass over the spurious regions: sum exp(z - max), in float64
          for (int64_t r = 0; r < R; ++r) {
            if (vspu.at<const uint8_t>(b, r) == 0) continue;
            const float* x = cp + b * cs0 + r * cs1;
            for (int64_t k = 0; k < C; ++k) {
              const float z = x[k] * S;
              ssum[static_cast<size_t>(k)] += std::exp(static_cast<double>(z) - smx[static_cast<size_t>(k)]);
            }
          }
        }
        for (int64_t k = 0; k < C; ++k) {
          vm.at<float>(b, k) = mx[static_cast<size_t>(k)];
          vam.at<int64_t>(b, k) = ax[static_cast<size_t>(k)];
          const float s = smx[static_cast<size_t>(k)];
          vsl.at<float>(b, k) =
              any_spu ? static_cast<float>(static_cast<double>(s) + std::log(ssum[static_cast<size_t>(k)])) : kNinf;
        }
      }
    }
  }
}

void region_loss_grad_rows_cpu(const TensorView& c, double inv_tau, const TensorView& spu, const TensorView& am,
                               const TensorView& dm, const TensorView& za, const TensorView& ga,
                               const TensorView& sarg, const TensorView& dsmax, int num_threads) {
  check_c(c);
  const int64_t NB = c.size(0), R = c.size(1), C = c.size(2);
  VLMFAST_CHECK(NB <= 1 || c.stride(0) >= R * C, "c: expected non-overlapping images (stride(0) >= R * C = ", R * C,
                "), got ", c.stride(0));
  check_2d(spu, "spu", DType::Bool, NB, R, "(images, regions)");
  check_2d(am, "am", DType::Int64, NB, C, "(images, classes)");
  check_2d(dm, "dm", DType::Float32, NB, C, "(images, classes)");
  check_1d(za, "za", DType::Float32, C);
  check_1d(ga, "ga", DType::Float32, C);
  check_2d(sarg, "sarg", DType::Int64, NB, R, "(images, regions)");
  check_2d(dsmax, "dsmax", DType::Float32, NB, R, "(images, regions)");
  if (NB == 0 || R == 0 || C == 0) return;
  const float S = static_cast<float>(inv_tau);
  float* cp = c.data<float>();
  const int64_t cs0 = c.stride(0), cs1 = c.stride(1);
  const Strided vspu = strided(spu), vam = strided(am), vdm = strided(dm), vsarg = strided(sarg),
                vds = strided(dsmax);
  std::vector<float> zav(static_cast<size_t>(C)), gav(static_cast<size_t>(C));
  for (int64_t k = 0; k < C; ++k) {
    zav[static_cast<size_t>(k)] = za.data<const float>()[k * za.stride(0)];
    gav[static_cast<size_t>(k)] = ga.data<const float>()[k * ga.stride(0)];
  }
  const int64_t per = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(R * C, 1));
  const int64_t blocks = (NB + per - 1) / per;
  const int threads = pick_threads(num_threads, NB * R * C, blocks);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int64_t b = blk * per; b < std::min(NB, (blk + 1) * per); ++b) {
      for (int64_t r = 0; r < R; ++r) {
        float* x = cp + b * cs0 + r * cs1;
        const bool is_spu = vspu.at<const uint8_t>(b, r) != 0;
        const int64_t sk = vsarg.at<const int64_t>(b, r);
        const float dsm = vds.at<const float>(b, r);
        for (int64_t k = 0; k < C; ++k) {
          float d = vam.at<const int64_t>(b, k) == r ? vdm.at<const float>(b, k) : 0.0f;
          if (is_spu) {
            const float z = x[k] * S;
            const float e = std::exp(std::min(z - zav[static_cast<size_t>(k)], 0.0f)) * gav[static_cast<size_t>(k)];
            d += e + (k == sk ? dsm : 0.0f);
          }
          x[k] = d;
        }
      }
    }
  }
}

}  // namespace vlmfast
