"""vlmfast.losses: the CLIP contrastive loss against a hand-written InfoNCE and open_clip's ClipLoss (values,
gradients, logit_bias, output_dict), class-aware targets, and input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmfast.losses import ClipLoss, clip_loss, clip_targets

open_clip_loss = pytest.importorskip("open_clip.loss")


def _features(n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return img, txt


def _infonce_by_hand(img, txt, scale, bias=0.0, labels=None):
    """Loops over rows: -sum_j t_ij log softmax_j(s * <x_i, y_j> + b), both directions, halved."""
    n = img.shape[0]
    total = 0.0
    for a, b in ((img, txt), (txt, img)):
        for i in range(n):
            logits = [scale * float(a[i] @ b[j]) + bias for j in range(n)]
            m = max(logits)
            lse = m + math.log(sum(math.exp(v - m) for v in logits))
            if labels is None:
                pos = [i]
            else:
                pos = [j for j in range(n) if labels[j] == labels[i]]
            total += -sum(logits[j] - lse for j in pos) / len(pos) / n
    return total / 2


@pytest.mark.parametrize("n,d", [(1, 4), (7, 5), (33, 16)])
@pytest.mark.parametrize("bias", [None, -2.5])
def test_matches_hand_written_infonce(n, d, bias):
    img, txt = _features(n, d, seed=n)
    got = clip_loss(img, txt, 14.0, bias)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(_infonce_by_hand(img, txt, 14.0, bias or 0.0), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("bias", [None, 0.7])
@pytest.mark.parametrize("output_dict", [False, True])
def test_matches_open_clip_value_and_gradients(bias, output_dict):
    img0, txt0 = _features(24, 12, seed=3, dtype=torch.float32)
    ref_loss = open_clip_loss.ClipLoss()
    ours_loss = ClipLoss()

    def run(fn):
        img = img0.clone().requires_grad_(True)
        txt = txt0.clone().requires_grad_(True)
        scale = torch.tensor(math.log(20.0), requires_grad=True)
        b = torch.tensor(bias, requires_grad=True) if bias is not None else None
        out = fn(img, txt, scale.exp(), b, output_dict=output_dict)
        loss = out["contrastive_loss"] if output_dict else out
        if output_dict:
            assert set(out) == {"contrastive_loss"}
        loss.backward()
        grads = [img.grad, txt.grad, scale.grad] + ([b.grad] if b is not None else [])
        return loss.detach(), grads

    ref, ref_grads = run(ref_loss)
    got, got_grads = run(ours_loss)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    if bias is not None:  # a constant shift of every logit: no gradient through the softmax
        assert abs(float(got_grads[-1])) < 1e-5


def test_gradients_against_autograd_of_the_reference_in_float64():
    """Our gradients (features, scale) equal autograd through the row-by-row reference formula."""
    img, txt = _features(9, 6, seed=5)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0, 2])
    for lab in (None, labels):
        a = img.clone().requires_grad_(True)
        b = txt.clone().requires_grad_(True)
        s = torch.tensor(11.0, dtype=torch.float64, requires_grad=True)
        clip_loss(a, b, s, labels=lab).backward()
        a2 = img.clone().requires_grad_(True)
        b2 = txt.clone().requires_grad_(True)
        s2 = torch.tensor(11.0, dtype=torch.float64, requires_grad=True)
        logits = s2 * a2 @ b2.T
        same = torch.eye(9, dtype=torch.float64) if lab is None else (lab[:, None] == lab[None, :]).double()
        ref = 0.0
        for m in (logits, logits.T):
            for i in range(9):
                ls = m[i] - torch.logsumexp(m[i], 0)
                ref = ref - (same[i] * ls).sum() / same[i].sum() / 9
        (ref / 2).backward()
        for g, r in ((a.grad, a2.grad), (b.grad, b2.grad), (s.grad, s2.grad)):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_class_aware_targets():
    img, txt = _features(12, 8, seed=1)
    labels = torch.tensor([3, 1, 3, 0, 1, 1, 2, 3, 0, 2, 2, 1])
    got = clip_loss(img, txt, 9.0, labels=labels)
    assert float(got) == pytest.approx(_infonce_by_hand(img, txt, 9.0, labels=labels.tolist()), rel=1e-10)
    # with every label distinct it is exactly the one-hot loss; repeated labels change it
    distinct = torch.arange(12) * 7
    torch.testing.assert_close(clip_loss(img, txt, 9.0, labels=distinct), clip_loss(img, txt, 9.0), rtol=0,
                               atol=1e-12)
    assert abs(float(got) - float(clip_loss(img, txt, 9.0))) > 1e-3
    t = clip_targets(12, labels)
    torch.testing.assert_close(t.sum(1), torch.ones(12))
    assert torch.equal(t > 0, labels[:, None] == labels[None, :])
    assert torch.equal(clip_targets(5), torch.arange(5))


def test_low_precision_features_give_a_float32_loss():
    img, txt = _features(16, 8, seed=2, dtype=torch.float32)
    ref = clip_loss(img, txt, 30.0)
    got = clip_loss(img.bfloat16(), txt.bfloat16(), 30.0)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(ref), rel=2e-2)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((torch.zeros(3, 4), torch.zeros(4, 4), 1.0), {}, ValueError, r"same shape.*\(3, 4\) and \(4, 4\)"),
        ((torch.zeros(3), torch.zeros(3), 1.0), {}, ValueError, r"image_features: expected shape \(N, D\)"),
        ((torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4), 1.0), {}, TypeError, "floating dtype"),
        ((torch.zeros(0, 4), torch.zeros(0, 4), 1.0), {}, ValueError, "at least one pair"),
        (([[1.0]], torch.zeros(1, 1), 1.0), {}, TypeError, "image_features: expected a torch.Tensor"),
        ((torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(2)), {}, ValueError, "logit_scale: expected a scalar"),
        ((torch.zeros(3, 4), torch.zeros(3, 4), "big"), {}, TypeError, "logit_scale"),
        ((torch.zeros(3, 4), torch.zeros(3, 4), 1.0, torch.ones(3)), {}, ValueError, "logit_bias"),
        ((torch.zeros(3, 4), torch.zeros(3, 4), 1.0), {"labels": torch.zeros(4, dtype=torch.long)}, ValueError,
         r"labels: expected shape \(3,\)"),
        ((torch.zeros(3, 4), torch.zeros(3, 4), 1.0), {"labels": torch.zeros(3)}, TypeError, "integer dtype"),
        ((torch.zeros(3, 4), torch.zeros(3, 4), 1.0), {"labels": [0, 1, 2]}, TypeError, "labels"),
    ],
)
def test_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        clip_loss(*args, **kwargs)


def test_module_errors_and_repr():
    with pytest.raises(ValueError, match="world_size"):
        ClipLoss(world_size=2)
    assert "world_size=1" in repr(ClipLoss())
