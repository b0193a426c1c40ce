// contrastive_loss: the chunk kernels of the symmetric CLIP contrastive loss on a B x B similarity matrix that is
// never held whole. Python (vlmfast/ops/contrastive_loss.py) forms, for R consecutive rows r0 .. r0 + R - 1, the
// cosine block c = fn[r0:r1] @ gn^T (float32, (R, B), torch BLAS) and calls these kernels on it; chunks come in
// increasing r0, and the column statistics over all B rows accumulate across the calls in caller-owned arrays.
// The logits are z_ij = S c_ij + bias, with S = float32(scale) (the exp arguments are float32; bias and the
// sums in float64). Teacher logits (no bias): zt_ij = T ct_ij, T = float32(tscale).
//
// contrastive_lse_rows_cpu(c, scale, bias, lse_row, col_max, col_sum):
//   lse_row[r] = logsumexp_j z_rj = m_r + bias + log(sum_j exp(S c_rj - m_r)),  m_r = max_j S c_rj.
//   Column online merge, per column j, with M_j = bias + max_r S c_rj over this chunk's rows and
//   s_j = sum_r exp(S c_rj + bias - M_j):  new = max(col_max[j], M_j) (stored as float32),
//   col_sum[j] = col_sum[j] exp(col_max[j] - new) + s_j exp(M_j - new),  col_max[j] = new  (the merge in float64;
//   a -inf col_max contributes exactly 0, so the initial state col_max = -inf, col_sum = 0 is the empty set).
//   After the last chunk, lse_col = col_max + log(col_sum).
//
// contrastive_cross_rows_cpu(c, scale, bias, ct, tscale, tlse_row, tlse_col, x_row, x_col):
//   pt_ij = exp(zt_ij - tlse_row[i]), qt_ij = exp(zt_ij - tlse_col[j]);
//   x_row[i] = sum_j pt_ij z_ij (written),  x_col[j] += sum_i qt_ij z_ij over this chunk's rows (accumulated;
//   computed as S sum(q c) + bias sum(q) in float64, then stored as float32).
//
// contrastive_grad_rows_cpu(c, scale, bias, lse_row, lse_col, alpha, beta, ct, tscale, tlse_row, tlse_col)
//   -> (sum_ij D_ij c_ij, sum_ij D_ij):
//   D_ij = alpha (exp(z_ij - lse_row[i]) + exp(z_ij - lse_col[j]))
//          - beta (exp(zt_ij - tlse_row[i]) + exp(zt_ij - tlse_col[j]))   (the beta term only when ct is given;
//   tlse_row and tlse_col are then required; without ct they are ignored). c is overwritten IN PLACE with D; the
//   two sums use the original c and are accumulated in float64, per row and then in row order.
//
// exp: the eight-lane polynomial of simd.h. Arguments that are <= 0 by construction (z - max) take exp_nonpos;
// those against a given lse (cross, grad) are clamped to at most 88 and give exactly 0 below -87. Sums: float32
// lanes over short runs (64 elements along a row, 16 rows down a column), flushed into float64.
// Determinism: rows are independent in the row parts, column blocks of 64 in the column parts, and per-row
// partials are summed in row order, so the results do not depend on the number of threads.
// NaN in c / ct propagates NaN into the outputs that depend on it (a NaN column max makes that column NaN for
// good). +inf logits give NaN (inf - inf), not inf.
//
// Views: c, ct (R, B) float32, column stride 1, row stride >= B (any, when R <= 1); ct has c's shape and must
// not alias c. lse_row, tlse_row, x_row (R,); col_max, col_sum, lse_col, tlse_col, x_col (B,); all float32 CPU;
// the 1-D views may have any stride (> 0 for the outputs). R == 0 or B == 0 returns after the checks
// (grad: (0.0, 0.0)).
#pragma once

#include <cstdint>
#include <utility>

#include "tensor.h"

namespace vlmfast {

void contrastive_lse_rows_cpu(const TensorView& c, double scale, double bias, const TensorView& lse_row,
                              const TensorView& col_max, const TensorView& col_sum, int num_threads);

void contrastive_cross_rows_cpu(const TensorView& c, double scale, double bias, const TensorView& ct, double tscale,
                                const TensorView& tlse_row, const TensorView& tlse_col, const TensorView& x_row,
                                const TensorView& x_col, int num_threads);

// ct, tlse_row, tlse_col: nullptr when not given (None from Python).
std::pair<double, double> contrastive_grad_rows_cpu(const TensorView& c, double scale, double bias,
                                                    const TensorView& lse_row, const TensorView& lse_col,
                                                    double alpha, double beta, const TensorView* ct, double tscale,
                                                    const TensorView* tlse_row, const TensorView* tlse_col,
                                                    int num_threads);

}  // namespace vlmfast
