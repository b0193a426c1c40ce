// calibration_bins: one pass over the logits of M models x N samples x C classes.
//
// Per row (model m, sample n), with x = logits[m, n, :] converted to float32 (float64 stays float64):
//   mx   = max_c x_c,  pred = first argmax (ties -> lowest class index, as torch.argmax)
//   rest = sum_{c != pred} exp(x_c - mx),  rest2 = sum_{c != pred} exp(2 (x_c - mx))   (probabilities never stored)
//   s    = 1 + rest               (the argmax's exact 1 is kept out of the running sums, so that the small terms
//                                  of a near-saturated row are not rounded away one by one against it)
//   conf = 1 / s                  (the top softmax probability; exactly 1.0 iff 1 + rest rounds to 1, as in an
//                                  accurately summed softmax)
//   nll  = (mx - x_y) + log1p(rest)   (logsumexp - logit of the label; mx - x_y in float64: no overflow for
//                                  finite logits such as 3e38 and -3e38)
//   brier= ((1 - e_y + rest)^2 + (1 - e_y^2 + rest2)) / s^2, e_y = exp(x_y - mx)   (sum_c p_c^2 - 2 p_y + 1;
//                                  (rest^2 + rest2) / s^2 exactly when y == pred: no cancellation)
//   bin  = floor(conf * n_bins), computed in float64, in [0, n_bins]; slot n_bins holds conf == 1.0 exactly
//          (the Python side folds it into the last bin, or keeps it apart for the DAC convention).
// Rows holding a NaN or +-inf logit are counted in `nonfinite` and contribute nothing else.
// Labels must lie in [0, C) (the Python wrapper checks; the kernels never read out of bounds regardless).
#pragma once

#include <cstdint>

#include "tensor.h"

namespace vlmfast {

struct CalibrationBinsArgs {
  TensorView logits;          // (M, N, C) float32 | float16 | bfloat16 | float64, any strides
  TensorView labels;          // (M, N) int64 | int32, any strides (stride 0 along M: shared labels)
  int64_t n_bins = 15;
  // Outputs: contiguous, zero-initialised by the caller, accumulated into.
  TensorView bin_count;       // (M, n_bins + 1) int64
  TensorView bin_correct;     // (M, n_bins + 1) int64
  TensorView bin_conf;        // (M, n_bins + 1) float64: sum of confidences
  TensorView sums;            // (M, 2) float64: [sum of NLL, sum of Brier]
  TensorView nonfinite;       // (M,) int64: rows with a non-finite logit
  TensorView sample_conf;     // (M, N) float32 (float64 for float64 logits), or ptr == 0 when not requested
  TensorView sample_correct;  // (M, N) bool, or ptr == 0 when not requested
};

// Validates shapes/dtypes/devices of every view; throws std::invalid_argument naming the argument.
void check_calibration_bins_args(const CalibrationBinsArgs& a, bool cuda);

void calibration_bins_cpu(const CalibrationBinsArgs& a, int num_threads);

#ifdef VLMFAST_WITH_CUDA
// Launches on `stream` (a cudaStream_t passed as an integer; 0 = legacy default stream). Asynchronous.
void calibration_bins_cuda(const CalibrationBinsArgs& a, std::uintptr_t stream);
#endif

}  // namespace vlmfast
