// prompt_logits: the row kernels of the fused prompt-logit cross-entropy head. The GEMM z = s * xn @ wn^T is done
// by torch (BLAS) on a chunk of R rows (vlmfast/ops/prompt_logits.py); these kernels do everything else on the
// chunk, one pass per row, OpenMP over rows (each row independent, so the results do not depend on the threads).
//
// Forward, per row r of z (float32, C >= 1 classes), y = labels[r], valid = y != ignore_index && 0 <= y < C:
//   mx   = max_c z_c,  pred = first argmax (ties -> lowest index, as torch.argmax; a NaN counts as the maximum)
//   rest = sum_{c != pred} exp(z_c - mx)     (float32, vectorised; the argmax's exact 1 kept out of the sum)
//   lse  = mx + log1p(rest),  conf = 1 / (1 + rest) = exp(mx - lse)
//   loss = (1 - eps) (lse - z_y) + eps (lse - mean_c z_c)   (torch.nn.functional.cross_entropy with
//          label_smoothing = eps; the differences in float64), 0 when !valid.
// Rows holding a NaN or +inf take a plain scalar path: mx + log(sum exp(z - mx)), which propagates the NaN
// (loss, lse and conf NaN, except loss = 0 for rows that are not valid). -inf logits (masked classes) are fine.
//
// Backward: z is overwritten IN PLACE with dz = grad_r (exp(z - lse_r) - (1 - eps) [c == y_r] - eps / C);
// rows that are not valid become all 0.
//
// Views: z (R, C) float32, column stride 1, any row stride (>= C in the backward, which writes in place);
// labels (R,) int64; lse / grad / loss / conf (R,) float32, pred (R,) int64; the 1-D views may have any stride.
// R == 0 returns after the checks. Labels outside [0, C) are never read out of bounds (the Python layer counts
// and rejects them first).
#pragma once

#include <cstdint>

#include "tensor.h"

namespace vlmfast {

void prompt_logits_rows_fwd_cpu(const TensorView& z, const TensorView& labels, double label_smoothing,
                                int64_t ignore_index, const TensorView& loss, const TensorView& lse,
                                const TensorView& conf, const TensorView& pred, int num_threads);

void prompt_logits_rows_bwd_cpu(const TensorView& z, const TensorView& lse, const TensorView& labels,
                                const TensorView& grad, double label_smoothing, int64_t ignore_index,
                                int num_threads);

}  // namespace vlmfast
