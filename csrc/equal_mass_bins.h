// equal_mass_bins: equal-mass (ACE) bins of per-sample confidences, the follow-up step of calibration_bins.
#pragma once

#include <cstdint>

#include "tensor.h"

namespace vlmfast {

// Equal-mass bins (ACE): per model, the confidences sorted ascending, stably (ties keep sample order), and cut
// into n_bins contiguous groups whose sizes differ by at most one, the first N mod n_bins larger (as
// torch.sort(stable=True) followed by torch.tensor_split). Accumulates per group the count, the number correct
// and the sum of confidences into zero-initialised (M, n_bins) outputs. LSD radix sort, OpenMP over models.
//   conf (M, N) float32 | float64 contiguous, correct (M, N) bool contiguous,
//   count / n_correct (M, n_bins) int64, conf_sum (M, n_bins) float64, all contiguous.
void equal_mass_bins_cpu(const TensorView& conf, const TensorView& correct, int64_t n_bins, const TensorView& count,
                         const TensorView& n_correct, const TensorView& conf_sum, int num_threads);

}  // namespace vlmfast
