// region_loss: the chunk kernels of RaVL's region-aware loss. Python (vlmfast/ops/region_loss.py) forms, for nb
// consecutive images b0 .. b0 + nb - 1, the cosine block c = rn[b0:b1] @ tn^T (float32, viewed (nb, R, C), torch
// BLAS) and calls these kernels on it. The similarities are z[b, r, c] = S c[b, r, c], S = float32(inv_tau)
// (the product in float32, as torch's c * inv_tau).
//
// region_loss_stats_rows_cpu(c, inv_tau, rel, spu, present, m, am, sl, smax, sarg), per image b:
//   m[b, k]  = max over the regions r with rel[b, r] of z[b, r, k]; am[b, k] = the FIRST such r reaching it
//              (strict > in region order); -inf and -1 when the image has no relevant region;
//   sl[b, k] = logsumexp over the regions r with spu[b, r] of z[b, r, k] (max-subtracted, the sum in float64);
//              -inf when the image has no spurious region;
//   smax[b, r] = max over the classes k with present[k] of z[b, r, k]; sarg[b, r] = the FIRST such k (for every
//              region, spurious or not; -inf and -1 when no class is present).
//   Rows with NaN: a NaN z never wins a max (strict >); it propagates into sl.
//
// region_loss_grad_rows_cpu(c, inv_tau, spu, am, dm, za, ga, sarg, dsmax): c is overwritten IN PLACE with
//   dsim[b, r, k] = (am[b, k] == r ? dm[b, k] : 0)
//                 + (spu[b, r] ? exp(min(z[b, r, k] - za[k], 0)) ga[k] + (sarg[b, r] == k ? dsmax[b, r] : 0) : 0)
//   (za[k] = +inf gives exp(-inf) = 0: a class without weight).
//
// Views: c (nb, R, C) float32 with stride 1 along C (any other strides; rows must not overlap for the in-place
// pass); rel, spu (nb, R) bool; present (C,) bool; m, sl, dm (nb, C) float32; am (nb, C) int64; smax, dsmax
// (nb, R) float32; sarg (nb, R) int64; za, ga (C,) float32; all CPU, any strides. OpenMP over images: every output
// element has one writer and a fixed evaluation order, so nothing depends on the number of threads. nb == 0
// returns after the checks.
#pragma once

#include <cstdint>

#include "tensor.h"

namespace vlmfast {

void region_loss_stats_rows_cpu(const TensorView& c, double inv_tau, const TensorView& rel, const TensorView& spu,
                                const TensorView& present, const TensorView& m, const TensorView& am,
                                const TensorView& sl, const TensorView& smax, const TensorView& sarg,
                                int num_threads);

void region_loss_grad_rows_cpu(const TensorView& c, double inv_tau, const TensorView& spu, const TensorView& am,
                               const TensorView& dm, const TensorView& za, const TensorView& ga,
                               const TensorView& sarg, const TensorView& dsmax, int num_threads);

}  // namespace vlmfast
