"""Streaming datasets: ImageFolderStream (lazy decode) against the in-memory image_folder, the loader helper, and
encode_images / region_features on streams, datasets and DataLoaders (same features as the in-memory path, memory
bounded by the batch). Small folders of PNGs written in tmp_path; a randomly initialised tiny CLIP (no training)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import vlmfast.data as D
import vlmfast.data.folder as folder_mod

N_IMAGES = 11  # not a multiple of the batch size


def _write_folder(root, n=N_IMAGES, sizes=None, boxes=True, captions=True, missing_box=()):
    from PIL import Image

    rng = np.random.default_rng(1)
    header = "path,label" + (",x1,y1,x2,y2" if boxes else "") + (",caption" if captions else "")
    lines = [header]
    for i in range(n):
        h, w = sizes[i] if sizes else (24 + i % 3, 30 + 2 * (i % 4))
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        cells = [f"im{i}.png", ["cat", "dog", "fox"][i % 3]]
        if boxes:
            cells += ["", "", "", ""] if i in missing_box else [1 + i % 2, 2, 10 + i, 20]
        if captions:
            cells.append(f"picture {i}" if i % 2 else "")
        lines.append(",".join(map(str, cells)))
    (root / "index.csv").write_text("\n".join(lines) + "\n")
    return root / "index.csv"


@pytest.fixture(scope="module")
def rn():
    open_clip = pytest.importorskip("open_clip")  # noqa: F841
    import vlmfast.models as M

    torch.manual_seed(0)
    return M.create_model(M.TINY_RN, device="cpu")


@pytest.fixture()
def folder(tmp_path):
    _write_folder(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------- the stream itself


def test_stream_matches_in_memory(folder):
    mem = D.image_folder(folder, "index.csv", image_size=(20, 28))
    st = D.image_folder(folder, "index.csv", image_size=(20, 28), stream=True)
    assert isinstance(st, D.ImageFolderStream) and isinstance(st, torch.utils.data.Dataset)
    assert len(st) == len(mem) == N_IMAGES
    assert st.classnames == mem.classnames == ["cat", "dog", "fox"]
    assert torch.equal(st.labels, mem.labels) and st.captions == mem.captions and st.split == mem.split
    assert st.captions[0] == "a photo of a cat" and st.captions[1] == "picture 1"
    for i in (0, 5, -1):
        a, b = st[i], mem[i]
        assert a.keys() == b.keys() == {"index", "image", "label", "caption", "box"}
        assert a["index"] == b["index"] == i % N_IMAGES
        assert torch.equal(a["image"], b["image"]) and a["image"].dtype == torch.uint8
        assert torch.equal(a["label"], b["label"]) and a["caption"] == b["caption"] and torch.equal(a["box"], b["box"])
    assert torch.equal(st.boxes, mem.boxes)
    again = st.to_dataset()
    assert torch.equal(again.images, mem.images) and torch.equal(again.boxes, mem.boxes)
    with pytest.raises(IndexError, match="index"):
        st[N_IMAGES]
    with pytest.raises(TypeError, match="index"):
        st[1:3]
    assert "ImageFolderStream(split='folder', n=11" in repr(st)


def test_stream_holds_no_pixels_and_decodes_lazily(folder, monkeypatch):
    calls = []
    real = folder_mod._read_image
    monkeypatch.setattr(folder_mod, "_read_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    st = D.image_folder(folder, "index.csv", image_size=16, stream=True)
    assert calls == []  # building reads the CSV only
    # what a worker process receives: metadata, not images (11 images of 16x16x3 would be 8 kB)
    assert len(pickle.dumps(st)) < 4_000 + 300 * N_IMAGES
    st[3]
    assert len(calls) == 1


def test_loader_batches_have_the_item_fields(folder):
    mem = D.image_folder(folder, "index.csv", image_size=16)
    st = D.image_folder(folder, "index.csv", image_size=16, stream=True)
    for nw in (0, 2):
        batches = list(st.loader(4, num_workers=nw, pin_memory=True))
        assert [len(b["caption"]) for b in batches] == [4, 4, 3]
        ref = list(mem.loader(4))
        for b, r in zip(batches, ref):
            assert b.keys() == r.keys()
            for k in b:
                if isinstance(b[k], torch.Tensor):
                    assert torch.equal(b[k], r[k]), k
                else:
                    assert b[k] == r[k], k
    with pytest.raises(ValueError, match="batch_size"):
        st.loader(0)
    with pytest.raises(ValueError, match="num_workers"):
        D.loader(st, 4, num_workers=-1)
    with pytest.raises(TypeError, match="pin_memory"):
        D.loader(st, 4, pin_memory="yes")
    with pytest.raises(TypeError, match="dataset"):
        D.loader([1, 2, 3])


def test_stream_item_errors_name_the_line(tmp_path):
    csv = _write_folder(tmp_path, n=4, sizes=[(10, 10), (10, 10), (12, 10), (10, 10)], boxes=False)
    st = D.image_folder(tmp_path, csv, stream=True)  # sizes are checked per item, against the first
    st[1]
    with pytest.raises(ValueError, match=r"index\.csv, line 4: .*12x10 but the first is 10x10; pass image_size"):
        st[2]
    with pytest.raises(ValueError, match=r"line 4: .*image_size"):
        D.image_folder(tmp_path, csv)
    (tmp_path / "im3.png").unlink()
    st = D.image_folder(tmp_path, csv, image_size=8, stream=True)  # a missing file: found when it is read
    with pytest.raises(FileNotFoundError, match=r"index\.csv, line 5: image file not found: .*im3\.png"):
        st[3]
    with pytest.raises(TypeError, match="stream"):
        D.image_folder(tmp_path, csv, stream="yes")


# ---------------------------------------------------------------------- encode_images / region_features


def test_encode_images_stream_equals_in_memory(folder, rn):
    import vlmfast.models as M

    mem = D.image_folder(folder, "index.csv", image_size=(40, 40))
    st = D.image_folder(folder, "index.csv", image_size=(40, 40), stream=True)
    ref = M.encode_images(rn, mem.images, batch_size=4)
    assert ref.shape == (N_IMAGES, 64)
    assert torch.equal(M.encode_images(rn, mem, batch_size=4), ref)
    assert torch.equal(M.encode_images(rn, st, batch_size=4), ref)
    for nw in (0, 2):
        assert torch.equal(M.encode_images(rn, st.loader(4, num_workers=nw)), ref)
    # a plain DataLoader of tensors (TensorDataset yields tuples)
    tl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(mem.images), batch_size=4)
    assert torch.equal(M.encode_images(rn, tl), ref)
    # rows come back in the loader's order
    g = torch.Generator().manual_seed(3)
    shuffled = st.loader(4, shuffle=True, generator=g)
    order = torch.cat([b["index"] for b in shuffled])
    g.manual_seed(3)
    # other batch compositions: the conv backend may block the batch differently, so equal up to rounding
    torch.testing.assert_close(M.encode_images(rn, shuffled), ref[order], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="data_or_images"):
        M.encode_images(rn, torch.utils.data.DataLoader(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), batch_size=2))
    with pytest.raises(ValueError, match="data_or_images: expected images with data"):
        M.encode_images(rn, torch.empty(2, 3, 8, 8, dtype=torch.uint8, device="meta"))


def test_encoding_a_stream_holds_one_batch(folder, rn, monkeypatch):
    """Decoding and encoding interleave: at most one batch of images is ever waiting (memory bounded by the
    batch, not by N)."""
    import vlmfast.models as M

    events = []
    real_get = D.ImageFolderStream.__getitem__
    monkeypatch.setattr(D.ImageFolderStream, "__getitem__", lambda self, i: events.append("d") or real_get(self, i))
    hook = rn.visual.conv1.register_forward_pre_hook(lambda mod, args: events.append("e"))  # the model runs
    st = D.image_folder(folder, "index.csv", image_size=32, stream=True)
    try:
        M.encode_images(rn, st, batch_size=3)
        events_encode = list(events)
        events.clear()
        with torch.no_grad():
            M.region_features(rn, st, batch_size=5)
    finally:
        hook.remove()
    events_regions, events = events, events_encode
    waiting = peak = 0
    for e in events:
        waiting = waiting + 1 if e == "d" else 0
        peak = max(peak, waiting)
    assert peak == 3 and events.count("d") == N_IMAGES and events.count("e") == 4
    assert "".join(events_regions) == "ddddde" * 2 + "de"


def test_encode_images_cache_for_streams(folder, rn, tmp_path_factory, monkeypatch):
    import vlmfast.models as M

    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("VLMFAST_CACHE", str(cache))
    st = D.image_folder(folder, "index.csv", image_size=32, stream=True)
    first = M.encode_images(rn, st, batch_size=4, cache=True)
    (entry,) = (cache / "features").glob("*.safetensors")
    real_enc = rn.encode_image
    monkeypatch.setattr(rn, "encode_image", lambda x: pytest.fail("recomputed although cached"))
    assert torch.equal(M.encode_images(rn, st.loader(5), cache=True), first)  # same stream, read in order
    # an entry whose contents were changed after it was written is not used
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(entry), framework="pt") as fh:
        meta = fh.metadata()
    save_file({"features": first + 1}, str(entry), metadata=meta)
    monkeypatch.setattr(rn, "encode_image", real_enc)
    assert torch.equal(M.encode_images(rn, st, batch_size=4, cache=True), first)
    # a changed image file changes the stream's fingerprint
    fp = st.fingerprint()
    from PIL import Image

    Image.fromarray(np.zeros((24, 30, 3), dtype=np.uint8)).save(folder / "im0.png")
    assert st.fingerprint() != fp
    changed = M.encode_images(rn, st, batch_size=4, cache=True)
    assert not torch.equal(changed[0], first[0]) and torch.equal(changed[1:], first[1:])
    with pytest.raises(ValueError, match="cache"):
        M.encode_images(rn, st.loader(4, shuffle=True), cache=True)


def test_region_features_stream_equals_in_memory(folder, rn):
    import vlmfast.models as M

    mem = D.image_folder(folder, "index.csv", image_size=32)
    st = D.image_folder(folder, "index.csv", image_size=32, stream=True)
    with torch.no_grad():
        whole = M.region_features(rn, mem.images, mem.boxes[:, None].float())
        by_ds = M.region_features(rn, mem, batch_size=4)  # boxes from the dataset's "box" field
        assert by_ds.shape == (N_IMAGES, 1, 64)
        torch.testing.assert_close(by_ds, whole, atol=1e-5, rtol=0)
        assert torch.equal(M.region_features(rn, st, batch_size=4), by_ds)
        for nw in (0, 2):
            assert torch.equal(M.region_features(rn, st.loader(4, num_workers=nw)), by_ds)
        two = torch.stack([mem.boxes, torch.tensor([0, 0, 16, 16]).expand(N_IMAGES, 4)], dim=1)
        given = M.region_features(rn, st.loader(4), two)
        torch.testing.assert_close(given, M.region_features(rn, mem.images, two), atol=1e-5, rtol=0)
        flat = M.region_features(rn, st.loader(4), [two[i, : 1 + i % 2] for i in range(N_IMAGES)])
        assert flat.shape == (sum(1 + i % 2 for i in range(N_IMAGES)), 64)
        with pytest.raises(ValueError, match=f"boxes: expected {N_IMAGES} entries .*got {N_IMAGES - 1}"):
            M.region_features(rn, st, two[:-1])
        with pytest.raises(ValueError, match=f"boxes: expected one entry per image, got {N_IMAGES - 1}"):
            M.region_features(rn, st.loader(4), two[:-1])
        with pytest.raises(ValueError, match=f"boxes: expected {N_IMAGES} entries .*got {N_IMAGES + 1}"):
            M.region_features(rn, st.loader(4), torch.cat([two, two[:1]]))
        with pytest.raises(ValueError, match="boxes: required"):
            M.region_features(rn, mem.images)
        with pytest.raises(TypeError, match="images"):
            M.region_features(rn, "not images", two)


def test_region_features_of_spurious_mnist_and_missing_boxes(tmp_path, rn):
    import vlmfast.models as M

    te = D.spurious_mnist("test", n=24, seed=0, cache=False)
    with torch.no_grad():
        quads = M.region_features(rn, te, batch_size=10)  # region_boxes: the four quadrants
        torch.testing.assert_close(quads, M.region_features(rn, te.images, te.region_boxes), atol=1e-5, rtol=0)
    assert quads.shape == (24, 4, 64)
    _write_folder(tmp_path, n=4, sizes=[(16, 16)] * 4, missing_box={2})
    st = D.image_folder(tmp_path, "index.csv", stream=True)
    with pytest.raises(ValueError, match="boxes: sample 2 has no box"), torch.no_grad():
        M.region_features(rn, st.loader(3))


@pytest.mark.cuda
def test_pinned_stream_on_cuda(folder):
    import vlmfast.models as M

    torch.manual_seed(0)
    model = M.create_model(M.TINY_RN, device="cuda")
    mem = D.image_folder(folder, "index.csv", image_size=32)
    st = D.image_folder(folder, "index.csv", image_size=32, stream=True)
    batch = next(iter(st.loader(4, num_workers=2, pin_memory=True)))
    assert batch["image"].is_pinned()
    ref = M.encode_images(model, mem, batch_size=4)
    assert ref.device.type == "cpu" and ref.shape == (N_IMAGES, 64)
    assert torch.equal(M.encode_images(model, st.loader(4, num_workers=2, pin_memory=True)), ref)
    with torch.no_grad():
        torch.testing.assert_close(M.region_features(model, st.loader(4, pin_memory=True)).cpu(),
                                   M.region_features(model, mem, batch_size=4).cpu(), atol=0, rtol=0)
