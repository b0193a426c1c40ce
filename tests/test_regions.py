"""Region embeddings: ViT patch pooling (weights, equality with a hand-written pooling of the tower's own tokens,
gradients) and :func:`vlmfast.audit.regions.region_embeddings` (same values as region_features, image embeddings
from the same forward equal to encode_image, variable box counts, padded layout, bad input)."""

import pytest
import torch
import torch.nn.functional as F

import vlmfast.data as D
import vlmfast.models as M
from vlmfast.audit.regions import RegionEmbeddings, region_embeddings
from vlmfast.models.regions import patch_weights

QUADRANTS = torch.tensor([[0, 0, 28, 28], [28, 0, 56, 28], [0, 28, 28, 56], [28, 28, 56, 56]], dtype=torch.float32)


@pytest.fixture(scope="module")
def rn():
    torch.manual_seed(0)
    return M.create_model(M.TINY_RN, device="cpu").eval()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return M.create_model(M.TINY_VIT, device="cpu").eval()


@pytest.fixture(scope="module")
def mnist():
    return D.spurious_mnist("test", n=20, seed=0, cache=False)


def _rois(boxes):
    return torch.cat([torch.zeros(len(boxes), 1), torch.as_tensor(boxes, dtype=torch.float32)], dim=1)


def test_patch_weights_cover_fractions():
    # a 4 x 4 grid of 16-px patches on a 64-px input; boxes given in 56-px image pixels (scale 64 / 56)
    s = 64 / 56
    w = patch_weights(_rois([[0, 0, 56, 56]]), (4, 4), (64, 64), s)
    torch.testing.assert_close(w, torch.full((1, 16), 1 / 16))
    q = patch_weights(_rois(QUADRANTS), (4, 4), (64, 64), s).reshape(4, 4, 4)
    want = torch.zeros(4, 4, 4)
    want[0, :2, :2] = want[1, :2, 2:] = want[2, 2:, :2] = want[3, 2:, 2:] = 0.25
    torch.testing.assert_close(q, want)
    # half a patch column: covered fractions 1 and 0.5 -> weights 2/3, 1/3 (input pixels; scale 1)
    h = patch_weights(_rois([[0, 0, 24, 16]]), (4, 4), (64, 64), 1.0).reshape(4, 4)
    torch.testing.assert_close(h[0, :2], torch.tensor([2 / 3, 1 / 3]))
    assert float(h.sum()) == pytest.approx(1.0) and float(h[1:].abs().sum()) == 0.0
    # a box narrower than a patch, off the cell edges: positive area -> its cell; zero-area -> the centre's cell
    t = patch_weights(_rois([[20, 36, 22, 38], [40, 8, 40, 8]]), (4, 4), (64, 64), 1.0)
    assert int(t[0].argmax()) == 2 * 4 + 1 and float(t[0].max()) == pytest.approx(1.0)
    assert int(t[1].argmax()) == 0 * 4 + 2 and float(t[1].max()) == 1.0


def test_patch_regions_equal_pooled_tokens_of_the_tower(vit):
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (3, 3, 56, 56), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        got = M.region_features(vit, imgs, QUADRANTS.expand(3, 4, 4), patch_pool="mean")
        assert got.shape == (3, 4, 64)
        vis = vit.visual
        vis.output_tokens = True
        try:
            pooled, tokens = vis(M.preprocess(imgs, 64))  # tokens: ln_post'ed patch tokens (B, 64, width)
        finally:
            vis.output_tokens = False
        grid = tokens.reshape(3, 8, 8, -1)
        quads = [grid[:, :4, :4], grid[:, :4, 4:], grid[:, 4:, :4], grid[:, 4:, 4:]]
        want = torch.stack([F.normalize(q.reshape(3, 16, -1).mean(1) @ vis.proj, dim=-1) for q in quads], dim=1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # the whole-image box: the mean of all patch tokens, not the CLS token
        full = M.region_features(vit, imgs, torch.tensor([[[0.0, 0, 56, 56]]]).expand(3, 1, 4), patch_pool="mean")[:, 0]
        torch.testing.assert_close(full, F.normalize(tokens.mean(1) @ vis.proj, dim=-1), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        # patch_pool="attn" (the default): the last block with the CLS query restricted to the box's patches =
        # the last block run on the subsequence [CLS, the box's patches]; the whole-image box = encode_image
        att = M.region_features(vit, imgs, QUADRANTS.expand(3, 4, 4))
        x = M.preprocess(imgs, 64)
        h = vis._embeds(x)
        for blk in vis.transformer.resblocks[:-1]:
            h = blk(h)
        cells = torch.arange(64).reshape(8, 8)
        for q, (r0, c0) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
            keep = torch.cat([torch.zeros(1, dtype=torch.long), 1 + cells[r0:r0 + 4, c0:c0 + 4].reshape(-1)])
            cls = vis.transformer.resblocks[-1](h[:, keep])[:, 0]
            want_q = F.normalize(vis.ln_post(cls) @ vis.proj, dim=-1)
            torch.testing.assert_close(att[:, q], want_q, atol=1e-5, rtol=1e-5)
        whole = M.region_features(vit, imgs, torch.tensor([[[0.0, 0, 56, 56]]]).expand(3, 1, 4))[:, 0]
        torch.testing.assert_close(whole, F.normalize(vit.encode_image(x), dim=-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="patch_pool: expected one of"):
        M.region_features(vit, imgs, QUADRANTS.expand(3, 4, 4), patch_pool="max")
    # differentiable: the mitigation loss trains through it
    r = M.region_features(vit, imgs[:1], QUADRANTS[None])
    r.sum().backward()
    assert vit.visual.proj.grad is not None and vit.visual.conv1.weight.grad.abs().sum() > 0
    vit.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="method: 'patch' needs an open_clip VisionTransformer"):
        M.region_features(M.create_model(M.TINY_RN, device="cpu"), imgs, QUADRANTS.expand(3, 4, 4), method="patch")


@pytest.mark.parametrize("family", ["rn", "vit"])
def test_region_embeddings_of_a_dataset(family, rn, vit, mnist):
    model = rn if family == "rn" else vit
    out = region_embeddings(model, mnist, batch_size=6)
    assert isinstance(out, RegionEmbeddings)
    assert out.method == ("roi" if family == "rn" else "patch")
    assert out.embeddings.shape == (80, 64) and out.image_embeddings.shape == (20, 64)
    assert out.regions_per_image.tolist() == [4] * 20
    assert out.image_index.tolist() == [i for i in range(20) for _ in range(4)]
    torch.testing.assert_close(out.boxes, mnist.region_boxes.reshape(-1, 4).float())
    with torch.no_grad():
        ref = M.region_features(model, mnist.images, mnist.region_boxes).reshape(80, 64)
        img = F.normalize(model.encode_image(M.preprocess(mnist.images, 64)), dim=-1)
    torch.testing.assert_close(out.embeddings, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image_embeddings, img, atol=1e-5, rtol=0)  # the same forward gives the image
    torch.testing.assert_close(out.embeddings.norm(dim=1), torch.ones(80), atol=1e-5, rtol=0)
    crop = region_embeddings(model, mnist.images, mnist.region_boxes, method="crop", batch_size=20)
    assert crop.method == "crop"
    torch.testing.assert_close(crop.image_embeddings, img, atol=1e-5, rtol=0)


def test_variable_box_counts_and_padded_layout(rn, mnist):
    boxes = [QUADRANTS[: 1 + i % 4] for i in range(6)]
    out = region_embeddings(rn, mnist.images[:6], boxes, batch_size=4)
    assert out.regions_per_image.tolist() == [1, 2, 3, 4, 1, 2]
    assert out.embeddings.shape == (13, 64)
    with torch.no_grad():
        ref = M.region_features(rn, mnist.images[:6], boxes)
    torch.testing.assert_close(out.embeddings, ref, atol=1e-5, rtol=0)
    pad, mask = out.padded()
    assert pad.shape == (6, 4, 64) and mask.sum(1).tolist() == [1, 2, 3, 4, 1, 2]
    torch.testing.assert_close(pad[mask], out.embeddings)
    assert float(pad[~mask].abs().sum()) == 0.0


def test_grad_mode_keeps_the_graph(rn, mnist):
    out = region_embeddings(rn, mnist.images[:2], mnist.region_boxes[:2], grad=True)
    assert out.embeddings.requires_grad
    assert not region_embeddings(rn, mnist.images[:2], mnist.region_boxes[:2]).embeddings.requires_grad


def test_bad_input(rn, mnist):
    with pytest.raises(ValueError, match="method: expected one of"):
        region_embeddings(rn, mnist, method="pixels")
    with pytest.raises(TypeError, match="batch_size: expected an int"):
        region_embeddings(rn, mnist, batch_size=2.0)
    with pytest.raises(ValueError, match="batch_size: expected >= 1"):
        region_embeddings(rn, mnist, batch_size=0)
    with pytest.raises(ValueError, match="boxes: expected 19 entries|boxes: expected one entry per image"):
        region_embeddings(rn, mnist.images[:19], mnist.region_boxes[:18])
    with pytest.raises(TypeError, match="boxes: expected a Tensor"):
        region_embeddings(rn, mnist.images, "quadrants")
    with pytest.raises(ValueError, match="boxes: the data has no 'region_boxes'"):
        region_embeddings(rn, torch.utils.data.TensorDataset(mnist.images[:2]))
    with pytest.raises(ValueError, match="boxes: expected x2 > x1"):
        region_embeddings(rn, mnist.images[:1], torch.tensor([[[10.0, 10, 5, 20]]]))
