"""Every tolerance the tests use, in one table, keyed by (op, input dtype, quantity).

calibration_bins upcasts every input dtype to float32 (float64 stays float64), so the tolerances do not grow
for float16/bfloat16 inputs: the inputs are exact in float32. They bound the difference between two float32
evaluations of the same formula in different summation orders (backend vs torch reference), or between
float32 and a float64 numpy reference.
  conf:   per-sample confidence (atol, rtol)
  sums:   per-model sums of NLL / Brier / confidence (atol, rtol), relative to N
  metric: final metric values (ECE, NLL, ...) vs an independent float64 implementation (atol, rtol)
  conf_near_saturated: per-sample confidence of a near-saturated row (rest = sum of the non-max terms < 1) vs
          1 / (1 + rest) from float64: a few ulps, since rest is summed apart from the max's 1
  tiny_sums: sums of NLL = log1p(rest) / Brier = (rest^2 + rest2) / s^2 of near-saturated rows labelled with
          their argmax (values of 1e-18..1e-6), relative to themselves: the float32 summation error of rest
prompt_logits computes in float32 from upcast inputs and is compared with autograd through F.normalize /
F.cross_entropy on the same upcast inputs (tests/test_prompt_logits.py):
  loss:   the per-row or reduced loss (atol, rtol)
  stats:  lse and confidence (atol, rtol)
  grad:   dx, dw (returned in the input dtype: float16/bfloat16 add their own rounding, about 2**-11 / 2**-8
          relative) and dscale, relative to the largest entry of the reference gradient (atol is scaled by it)
contrastive_loss computes in float32 from upcast inputs and is compared with autograd through the materialised
S = s f g^T + b, F.cross_entropy / log_softmax (clip_loss_ref) on the same upcast inputs
(tests/test_contrastive_loss.py):
  loss:   contrastive and distill losses (atol, rtol); for float16/bfloat16 inputs the triton path feeds its
          tiles the normalized features rounded to the input dtype (as a 16-bit GEMM under autocast would), so
          the loss carries that rounding (measured 1e-4 relative for float16, 6e-4 for bfloat16)
  grad:   df, dg (in the input dtype), dscale, dbias, relative to the largest entry of the reference gradient
kmeans_assign upcasts every input dtype to float32 exactly (the products are accumulated in float32, the sums in
float64), so the tolerances do not grow for float16/bfloat16 inputs: they bound a float32 evaluation against the
numpy float64 oracle on the same upcast values (tests/test_kmeans_assign.py). ``scale`` is per row: ||x|| max||c||
(ip) or ||x||^2 + max||c||^2 (l2):
  score:  the best score (atol relative to the row's scale, rtol)
  tie:    (gap, unused): two centroids whose float64 scores differ by at most gap times the row's scale are a
          near-tie: either label is accepted
  sums:   per-centroid sums vs float64 sums of the returned labels (atol relative to max|x|, rtol)
region_loss computes in float32 from upcast inputs and is compared with autograd through the per-image loop formula
(region_loss_ref) on the same upcast inputs, and with a numpy float64 oracle (tests/test_region_loss.py):
  loss:   the per-image L_R / L_A and the reduced loss (atol, rtol); oracle: float32 vs float64 (atol, rtol)
  grad:   d regions, d text (in the input dtype: float16/bfloat16 add their own rounding), relative to the largest
          entry of the reference gradient (atol is scaled by it); oracle_grad: vs float64 central differences
"""

import torch

_F32 = {"conf": (2e-6, 2e-6), "sums": (1e-5, 1e-5), "metric": (2e-5, 1e-5), "conf_near_saturated": (0.0, 3e-7),
        "tiny_sums": (0.0, 2e-5)}
_F64 = {"conf": (1e-12, 1e-12), "sums": (1e-9, 1e-10), "metric": (1e-9, 1e-9), "conf_near_saturated": (0.0, 1e-15),
        "tiny_sums": (0.0, 1e-12)}

_PL_F32 = {"loss": (2e-5, 2e-5), "stats": (2e-5, 2e-5), "grad": (2e-5, 1e-4)}

_CL_F32 = {"loss": (2e-5, 2e-5), "grad": (2e-5, 1e-4)}

_KA = {"score": (1e-5, 1e-5), "tie": (1e-5, 0.0), "sums": (1e-6, 1e-6)}

_RL_F32 = {"loss": (2e-5, 2e-5), "grad": (2e-5, 1e-4), "oracle": (2e-5, 1e-5), "oracle_grad": (2e-5, 1e-4)}

TOLERANCES = {
    ("region_loss", torch.float32): _RL_F32,
    ("region_loss", torch.float16): {**_RL_F32, "grad": (1e-3, 2e-3)},
    ("region_loss", torch.bfloat16): {**_RL_F32, "grad": (8e-3, 1.6e-2)},
    ("kmeans_assign", torch.float32): _KA,
    ("kmeans_assign", torch.float16): _KA,
    ("kmeans_assign", torch.bfloat16): _KA,
    ("contrastive_loss", torch.float32): _CL_F32,
    ("contrastive_loss", torch.float16): {"loss": (5e-4, 5e-4), "grad": (1e-3, 2e-3)},
    ("contrastive_loss", torch.bfloat16): {"loss": (3e-3, 3e-3), "grad": (1.6e-2, 1.6e-2)},
    ("prompt_logits", torch.float32): _PL_F32,
    ("prompt_logits", torch.float16): {**_PL_F32, "grad": (1e-3, 2e-3)},
    ("prompt_logits", torch.bfloat16): {**_PL_F32, "grad": (8e-3, 1.6e-2)},
    ("calibration_bins", torch.float32): _F32,
    ("calibration_bins", torch.float16): _F32,
    ("calibration_bins", torch.bfloat16): _F32,
    ("calibration_bins", torch.float64): _F64,
}


def tol(op: str, dtype: torch.dtype, quantity: str) -> dict:
    atol, rtol = TOLERANCES[(op, dtype)][quantity]
    return {"atol": atol, "rtol": rtol}
