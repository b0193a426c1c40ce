// placeholder, replaced by the CUDA implementation
#include "calibration_bins.h"
namespace vlmfast {
void calibration_bins_cuda(const CalibrationBinsArgs& a, std::uintptr_t stream) {
  check_calibration_bins_args(a, true);
  throw std::runtime_error("not implemented");
}
}
