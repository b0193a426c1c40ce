// The OpenMP thread count of a row/column pass, shared by the CPU kernels: the requested count (0: OpenMP's
// maximum), but at most one thread per kGrainElems elements of work (tiny chunks run on fewer threads) and at
// most one per task; at least 1.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace vlmfast {

constexpr int64_t kGrainElems = 1 << 14;  // elements per thread at least

inline int pick_threads(int num_threads, int64_t work, int64_t max_tasks) {
  const int64_t t = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int64_t by_work = std::max<int64_t>(1, work / kGrainElems);
  return static_cast<int>(std::max<int64_t>(1, std::min(std::min(t, by_work), max_tasks)));
}

}  // namespace vlmfast
