// kmeans_assign: the row kernel of the k-means assignment step. The GEMM z = x_chunk @ c^T is done by torch (BLAS)
// on a chunk of R rows (vlmfast/ops/kmeans_assign.py); this kernel does the rest on the chunk.
//
// Per row r of z (float32, k >= 1 centroids): v_j = z_j (metric ip) or v_j = 2 z_j - cc_j (metric l2, cc = ||c||^2);
//   labels[r] = the first index of max_j v_j over the non-NaN v_j (-1 when every v_j is NaN);
//   scores[r] = max_j v_j (ip) or max(xx[r] - max_j v_j, 0) (l2, xx = ||x_r||^2; a NaN stays NaN); NaN for -1 rows.
// Then, for every row with labels[r] = j >= 0: sums[j, :] += x[r, :] (float64) and counts[j] += 1.
// Rows holding a NaN or -inf score take a scalar path with the same semantics; the others a vectorised
// eight-lane max with per-lane first indices merged by (value, lowest index).
//
// Determinism: rows are independent in the argmax pass; the accumulation is split over feature columns, so every
// sums[j, f] is added in row order by one thread, whatever the number of threads; counts are added serially.
//
// Views: z (R, k) float32, column stride 1 (any row stride); x (R, d) float32, any strides; xx (R,) float32, any
// stride, and cc (k,) float32, contiguous (both only read for l2; may be absent for ip); labels (R,) int64 and
// scores (R,) float32, outputs, any stride; sums (k, d) float64 contiguous and counts (k,) int64, any stride,
// ACCUMULATED (the caller zeroes them once and calls this kernel chunk after chunk, in row order).
// R == 0 returns after the checks.
#pragma once

#include <cstdint>

#include "tensor.h"

namespace vlmfast {

void kmeans_assign_rows_cpu(const TensorView& z, const TensorView& x, const TensorView& xx, const TensorView& cc,
                            bool l2, const TensorView& labels, const TensorView& scores, const TensorView& sums,
                            const TensorView& counts, int num_threads);

}  // namespace vlmfast
