"""vlmfast.audit.heatmaps: the batched relevance equals a literal per-image implementation (Chefer's rule with
R = I, R <- R + Abar R on full matrices, gradients from .grad of retained attention maps, one image per backward)
for last-block and all-block ViT maps and Grad-CAM on ResNets, CLIP and classifier targets; post-processing and
bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

import vlmfast.models as M  # noqa: E402
from vlmfast.audit import default_blocks, heatmaps  # noqa: E402
from vlmfast.models.factory import preprocess_for  # noqa: E402
from vlmfast.models.text import zero_shot_head  # noqa: E402
from vlmfast.tuning import robust as R  # noqa: E402

NAMES = ["cat", "dog", "car"]


def _images(n=5, seed=0, size=40):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return M.create_model("vlmfast-tiny-vit", device="cpu")


@pytest.fixture(scope="module")
def rn():
    torch.manual_seed(0)
    return M.create_model("vlmfast-tiny-rn", device="cpu")


def _naive_vit(model, visual, x1, target, blocks):
    """One image: record every block's attention probabilities (recomputed literally from the block's weights),
    s.backward(), Abar_b = mean_h relu(A_b.grad * A_b), R = I; R <- R + Abar_b @ R; map = R[0, 1:]."""
    saved = []

    def make(blk):
        mha = blk.attn

        def attention(q_x, k_x=None, v_x=None, attn_mask=None):
            b, n, e = q_x.shape
            h = mha.num_heads
            w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
            b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
            q = (q_x @ w_q.t() + b_q).view(b, n, h, e // h).permute(0, 2, 1, 3)
            k = (q_x @ w_k.t() + b_k).view(b, n, h, e // h).permute(0, 2, 1, 3)
            v = (q_x @ w_v.t() + b_v).view(b, n, h, e // h).permute(0, 2, 1, 3)
            a = torch.softmax(q @ k.transpose(-1, -2) / (e // h) ** 0.5, dim=-1)
            a.retain_grad()
            saved.append(a)
            return mha.out_proj((a @ v).permute(0, 2, 1, 3).reshape(b, n, e))
        return attention

    blocks_ = list(visual.transformer.resblocks)
    for blk in blocks_:
        blk.attention = make(blk)
    try:
        x1 = x1.clone().requires_grad_(True)  # a graph through every block
        s = target(visual(x1))
        s.backward()
    finally:
        for blk in blocks_:
            blk.__dict__.pop("attention", None)
    use = saved[-1:] if blocks == "last" else saved
    n = saved[0].shape[-1]
    rel = torch.eye(n)
    for a in use:
        abar = (a.grad * a).clamp(min=0).mean(dim=1)[0]
        rel = rel + abar @ rel
    return rel[0, 1:]


def _naive_gradcam(visual, x1, target):
    acts = {}
    h = visual.layer4.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    try:
        x1 = x1.clone().requires_grad_(True)
        out = visual(x1)
        act = acts["a"]
        act.retain_grad()
        target(out).backward()
    finally:
        h.remove()
    w = act.grad.mean(dim=(2, 3))[0]
    return torch.relu((w[:, None, None] * act[0]).sum(0))


def _post(cam, size):
    up = F.interpolate(cam[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    return (up - up.min()) / (up.max() - up.min())


@pytest.mark.parametrize("blocks", ["last", "all"])
def test_vit_batched_equals_per_image_clip_target(vit, blocks):
    imgs, y = _images(5), torch.tensor([0, 1, 2, 1, 0])
    out = heatmaps(vit, imgs, y, classnames=NAMES, blocks=blocks, batch_size=3)
    assert out.method == f"chefer-{blocks}" and out.maps.shape == (5, 40, 40)
    text = F.normalize(zero_shot_head(vit, NAMES, ["a photo of a {}"]), dim=-1)
    scale = vit.logit_scale.exp().detach()
    for i in range(5):
        x1 = preprocess_for(vit, imgs[i:i + 1])
        rel = _naive_vit(vit, vit.visual, x1, lambda f: scale * (F.normalize(f, dim=-1) @ text[y[i]]).sum(), blocks)
        g = vit.visual.grid_size
        want = _post(rel.reshape(g), (40, 40))
        torch.testing.assert_close(out.maps[i], want, atol=1e-5, rtol=1e-4)
    logits = scale * F.normalize(vit.encode_image(preprocess_for(vit, imgs)), dim=-1) @ text.t()
    assert torch.equal(out.predictions, logits.argmax(1)) and torch.equal(out.correct, logits.argmax(1) == y)
    torch.testing.assert_close(out.targets, logits.gather(1, y[:, None])[:, 0].detach(), atol=1e-4, rtol=1e-5)


def test_vit_classifier_target_all_blocks(vit):
    head = torch.randn(3, vit.visual.output_dim, generator=torch.Generator().manual_seed(1))
    clf = R.ImageClassifier(vit.visual, head, torch.tensor([0.1, -0.2, 0.3]), normalize=False)
    assert default_blocks(clf) == "all" and default_blocks(vit) == "last"
    imgs, y = _images(3, seed=2), torch.tensor([2, 0, 1])
    out = heatmaps(clf, imgs, y)
    assert out.method == "chefer-all"
    for i in range(3):
        x1 = preprocess_for(clf, imgs[i:i + 1])
        rel = _naive_vit(clf, clf.visual, x1, lambda f: clf.head(f)[0, y[i]], "all")
        torch.testing.assert_close(out.maps[i], _post(rel.reshape(vit.visual.grid_size), (40, 40)), atol=1e-5,
                                   rtol=1e-4)


def test_resnet_gradcam_batched_equals_per_image(rn):
    imgs, y = _images(4, seed=3), torch.tensor([1, 0, 2, 2])
    out = heatmaps(rn, imgs, y, classnames=NAMES, batch_size=4, size=(32, 32))
    assert out.method == "gradcam" and out.maps.shape == (4, 32, 32)
    text = F.normalize(zero_shot_head(rn, NAMES, ["a photo of a {}"]), dim=-1)
    scale = rn.logit_scale.exp().detach()
    for i in range(4):
        x1 = preprocess_for(rn, imgs[i:i + 1])
        cam = _naive_gradcam(rn.visual, x1, lambda f: scale * (F.normalize(f, dim=-1) @ text[y[i]]).sum())
        torch.testing.assert_close(out.maps[i], _post(cam.detach(), (32, 32)), atol=1e-5, rtol=1e-4)


def test_maps_are_min_max_normalised_and_model_state_is_restored(vit):
    vit.train()
    flags = [p.requires_grad for p in vit.parameters()]
    out = heatmaps(vit, _images(4, seed=4), torch.tensor([0, 1, 2, 0]), classnames=NAMES)
    assert vit.training and [p.requires_grad for p in vit.parameters()] == flags
    vit.eval()
    flat = out.maps.reshape(4, -1)
    assert torch.all(flat.amin(1) == 0) and torch.allclose(flat.amax(1), torch.ones(4))
    assert all("attention" not in blk.__dict__ for blk in vit.visual.transformer.resblocks)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(blocks="first"), ValueError, "blocks: expected one of"),
    (dict(labels=torch.tensor([0, 5])), ValueError, r"labels: expected class ids in \[0, 3\)"),
    (dict(labels=torch.tensor([0])), ValueError, r"labels: expected shape \(2,\)"),
    (dict(classnames=None), ValueError, "classnames"),
    (dict(batch_size=0), ValueError, "batch_size"),
])
def test_bad_input(vit, kwargs, exc, match):
    kw = dict(labels=torch.tensor([0, 1]), classnames=NAMES)
    kw.update(kwargs)
    labels = kw.pop("labels")
    with pytest.raises(exc, match=match):
        heatmaps(vit, _images(2), labels, **kw)


def test_cli_audit_rationality(tmp_path, capsys):
    import json

    from vlmfast.cli import main

    out = tmp_path / "rat"
    rc = main(["audit", "rationality", "--models", "vlmfast-tiny-vit", "vlmfast-tiny-rn", "--n", "20",
               "--split", "noise-2", "--overlays", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| vlmfast-tiny-vit (random init) | chefer-last |" in text and "| vlmfast-tiny-rn (random init) | gradcam |" in text
    res = json.loads((out / "results.json").read_text())
    for r in res["results"].values():
        assert r["RR"] + r["RW"] + r["WR"] + r["WW"] == 20 and r["n"] == 20
    assert len(res["overlays"]) == 2 and all(p.endswith(".png") for p in res["overlays"])
    assert (out / "overlays").is_dir() and len(list((out / "overlays").glob("*.png"))) == 2
    rc = main(["audit", "rationality", "--models", "vlmfast-tiny-vit", "--split", "fog-3", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--split: expected test, sklearn-digits or KIND-SEVERITY" in err
    rc = main(["audit", "rationality", "--models", "no-such-thing", "--out", str(out)])
    assert rc == 2 and "--models: 'no-such-thing'" in capsys.readouterr().err


def test_overlay_plot_validates(tmp_path):
    pytest.importorskip("matplotlib")
    from vlmfast.plot import heatmap_overlays

    imgs = _images(2, size=8)
    path = heatmap_overlays(imgs, torch.rand(2, 8, 8), torch.rand(2, 8, 8) > 0.5, tmp_path / "o.png", ["a", "b"])
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="maps: expected shape"):
        heatmap_overlays(imgs, torch.rand(2, 4, 4), None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="titles: expected 2"):
        heatmap_overlays(imgs, torch.rand(2, 8, 8), None, tmp_path / "x.png", ["a"])


def test_pretrained_vit_explains_the_digit_better_than_random_init():
    """The tiny pretrained ViT base (``pretrain_base("vlmfast-tiny-vit", preset="test")``, cached across runs): its
    zero-shot relevance falls on the digit's box far more than an untrained ViT's does — the heatmaps mean
    something only for a trained model, which is why the reproduction uses it."""
    from vlmfast.data import CLASSNAMES, spurious_mnist
    from vlmfast.metrics import masks_from_boxes, rationality

    data = spurious_mnist("test", n=60, seed=3)
    masks = masks_from_boxes(torch.as_tensor(data.boxes).float(), (56, 56))
    pre, card = M.pretrain_base(M.TINY_VIT, preset="test", progress=False)
    assert card["metrics"]["zero_shot_test"] >= 0.75
    torch.manual_seed(0)
    rand = M.create_model(M.TINY_VIT, device="cpu").eval()
    out = {}
    for name, model in (("pretrained", pre), ("random", rand)):
        h = heatmaps(model, data.images, data.labels, classnames=list(CLASSNAMES), blocks="last")
        out[name] = rationality(h.maps, masks, torch.ones(60, dtype=torch.bool))
    rma_pre, rma_rand = float(out["pretrained"].rma.mean()), float(out["random"].rma.mean())
    assert rma_pre > rma_rand + 0.1, (rma_pre, rma_rand)
    assert float(h.correct.float().mean()) < 0.3  # the random model is at chance
