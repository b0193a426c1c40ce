"""Property test of image_folder on random CSVs (in memory and streamed): every outcome is a correct result or a
one-line ValueError / FileNotFoundError / TypeError raised by vlmfast itself (naming the CSV file, or the argument)
— never a traceback from deep inside PIL, numpy or csv, and never a hang.

Each generated case records the faults it was built with. A case without faults must load and equal what an
independent reading of the same files gives (labels, class names, captions, boxes, pixels); a case with faults
must raise; a case with random bytes or random box numbers (no oracle) must do one or the other cleanly."""

from __future__ import annotations

import csv
import io
import math
import re
import signal
import struct
import tempfile
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import vlmfast.data as D

# name -> (height, width) of the valid images written once per module
GOOD = {"a.png": (6, 8), "b.png": (6, 8), "c.png": (7, 10)}
BAD = ("bad.png", "bomb.png", "missing.png", "sub")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (h, w) in GOOD.items():
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        (img.convert("L") if name == "b.png" else img).save(root / name)
    (root / "bad.png").write_text("not an image")
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk)
    (root / "sub").mkdir()
    return root


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@st.composite
def cases(draw):
    faults: list[str] = []
    unknown = False
    clean = draw(st.booleans())  # half the cases avoid every fault, so that most of those load
    n_rows = draw(st.integers(1 if clean else 0, 5))
    size = draw(st.sampled_from([None, 5, (4, 9)] if clean else [None, None, 5, (4, 9), 0, (3,), "x"]))
    if size in (0, (3,), "x"):
        faults.append("image_size")
    with_boxes = draw(st.sampled_from(["all", "none"] if clean else ["all", "none", "none", "partial"]))
    if with_boxes == "partial":
        faults.append("box columns")
    with_caption = draw(st.booleans())
    header = ["path", "label"]
    drop = None if clean else draw(st.sampled_from([None] * 6 + ["path", "label"]))
    if drop:
        header.remove(drop)
        faults.append("missing column")
    if with_boxes == "all":
        header += ["x1", "y1", "x2", "y2"]
    elif with_boxes == "partial":
        header += ["x1", "y1"]
    if with_caption:
        header.append("caption")
    if draw(st.booleans()):
        header.append("extra")
    header = [draw(st.sampled_from(["", " "])) + h + draw(st.sampled_from(["", " "])) for h in header]

    rows = []
    int_labels = draw(st.booleans())
    for _ in range(n_rows):
        kind = draw(st.sampled_from(["good", "abs"] if clean else ["good"] * 6 + ["bad", "empty", "random", "abs"]))
        if kind == "good" or kind == "abs":
            path = draw(st.sampled_from(sorted(GOOD) if size is not None or not clean else ["a.png", "b.png"]))
        elif kind == "bad":
            path = draw(st.sampled_from(BAD))
        elif kind == "empty":
            path = ""
        else:
            path = "zz" + draw(st.text(alphabet="abcdef", max_size=5)) + ".png"
        if clean:
            label = draw(st.sampled_from(["0", "1", " 1 ", "+1"] if int_labels else ["cat", "dog", " dog"]))
            box = draw(st.sampled_from(["none", "valid", "valid"]))
        else:
            label = draw(st.sampled_from(["0", "1", "3", " 2 ", "cat", "dog", "-1", "5000000", "9" * 30, "", "text"]))
            if label == "text":
                label = draw(TEXT)
            box = draw(st.sampled_from(["none", "valid", "float", "partial", "word", "inf", "flat", "outside"]))
        caption = draw(TEXT) if with_caption else ""
        rows.append({"path": path, "kind": kind, "label": label, "box": box, "caption": caption,
                     "floats": [draw(st.floats(allow_nan=True, allow_infinity=True)) for _ in range(4)],
                     "valid": (draw(st.integers(0, 2)), draw(st.integers(0, 2)), draw(st.integers(5, 6)),
                               draw(st.integers(4, 5)))})
    if clean:
        names = draw(st.sampled_from([None, ["dog", "cat", "eel"]] if not int_labels else [None, ["x", "y"]]))
    else:
        names = draw(st.sampled_from([None, None, ["cat", "dog"], ["0", "1", "2", "3"], ["cat", "cat", "dog"]]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1"] if clean else
                                    ["utf-8"] * 4 + ["utf-8-sig", "latin-1", "garbage"]))
    stream = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return header, rows, names, size, encoding, stream, seed, faults, unknown


def _box_cells(r, h0_w0):
    h0, w0 = h0_w0
    kind = r["box"]
    if kind == "none":
        return ["", "", "", ""], None, None
    if kind == "valid":
        x1, y1, w, h = r["valid"]
        return [x1, y1, x1 + w, y1 + h], None, (x1, y1, x1 + w, y1 + h)
    if kind == "float":
        return [repr(v) for v in r["floats"]], "unknown", None
    if kind == "partial":
        return [1, "", 3, ""], "box", None
    if kind == "word":
        return ["one", 1, 3, 3], "box", None
    if kind == "inf":
        return [0, 0, "inf", "inf"], "box", None
    if kind == "flat":
        return [2, 2, 2, 5], "box", None
    return [w0 + 1, 0, w0 + 5, 3], "box", None  # wholly outside


def _expected_labels(raw, names):
    """(class names, labels) or None when the labels are faulty — an independent reading of the rules."""
    raw = [s.strip() for s in raw]
    if any(s == "" for s in raw):
        return None
    if all(re.fullmatch(r"[+-]?[0-9]+", s) for s in raw):
        if any(len(s.lstrip("+-")) > 18 for s in raw):
            return None
        vals = [int(s) for s in raw]
        if names is None:
            if max(vals) >= D.MAX_AUTO_CLASSES:
                return None
            names = [str(i) for i in range(max(vals) + 1)]
        return (names, vals) if all(0 <= v < len(names) for v in vals) else None
    if names is None:
        names = sorted(set(raw))
    if len(set(names)) != len(names) or any(s not in names for s in raw):
        return None
    return names, [names.index(s) for s in raw]


def _round_half_up(v: float) -> int:
    return math.floor(v + 0.5)


def _check_error(exc: BaseException, csv_file: Path) -> None:
    msg = str(exc)
    assert isinstance(exc, (ValueError, FileNotFoundError, TypeError)), f"{type(exc).__name__}: {msg}"
    assert "\n" not in msg, msg
    assert msg.startswith(str(csv_file)) or re.match(r"^(image_size|classnames|csv_path|index): ", msg), msg
    last = traceback.extract_tb(exc.__traceback__)[-1]
    assert "vlmfast" in last.filename and "data" in last.filename, (last.filename, msg)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_image_folder_is_correct_or_fails_in_one_line(images, case):
    header, rows, names, size, encoding, stream, seed, faults, unknown = case
    faults = list(faults)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    cols = [h.strip() for h in header]
    expect_rows = []
    for r in rows:
        orig = GOOD.get(r["path"], (6, 8))
        box_cells, box_fault, box = _box_cells(r, orig)
        if "x1" in cols:
            if box_fault == "unknown":
                unknown = True
            elif box_fault:
                faults.append("box")
        path = str(images / r["path"]) if r["kind"] == "abs" else r["path"]
        cells = {"path": path, "label": r["label"], "x1": box_cells[0], "y1": box_cells[1], "x2": box_cells[2],
                 "y2": box_cells[3], "caption": r["caption"], "extra": "e"}
        w.writerow([cells[c] for c in cols])
        expect_rows.append((r, box if "x1" in cols else None))
    text = out.getvalue()
    if not rows:
        faults.append("no rows")
    if rows and all(c in cols for c in ("path", "label")):
        if _expected_labels([r["label"] for r in rows], names) is None:
            faults.append("label")
        if any(r["path"] not in GOOD for r in rows):
            faults.append("image")
        if size is None and len({GOOD.get(r["path"]) for r in rows}) > 1:
            faults.append("sizes")
    if encoding == "garbage":
        data = bytearray(text.encode("utf-8"))
        rng = np.random.default_rng(seed)
        for _ in range(3):
            data.insert(int(rng.integers(0, len(data) + 1)), int(rng.integers(0, 256)))
        data, unknown = bytes(data), True
    else:
        try:
            data = text.encode(encoding)
            if encoding == "latin-1" and any(ord(ch) > 127 for ch in text):
                try:  # latin-1 bytes of non-ASCII text are usually not UTF-8 — but some are ("Â\x80" = C2 80)
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    faults.append("encoding")
                else:
                    unknown = True  # valid UTF-8 of other text: read as that text, no oracle for the values
        except UnicodeEncodeError:  # beyond latin-1: written as UTF-8
            data = text.encode("utf-8")
    folder = Path(tempfile.mkdtemp(dir=images))
    csv_file = folder / "index.csv"
    csv_file.write_bytes(data)

    def run():
        ds = D.image_folder(images, csv_file, image_size=size, classnames=names, stream=stream)
        if stream:
            items = [ds[i] for i in range(len(ds))]
            return ds, torch.stack([it["image"] for it in items]), ds.boxes
        return ds, ds.images, ds.boxes

    alarm = hasattr(signal, "SIGALRM")  # a hang fails the example instead of stalling the suite (POSIX)
    if alarm:
        old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("image_folder hung"))
        signal.alarm(30)
    try:
        try:
            ds, imgs, boxes = run()
        except Exception as exc:  # noqa: BLE001 - every exception is checked
            _check_error(exc, csv_file)
            assert unknown or faults, f"a clean case failed: {exc}"
            event("error" + (" (no oracle)" if unknown else ""))
            return
    finally:
        if alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    assert unknown or not faults, f"expected an error for {faults}"
    event("loaded" + (" (no oracle)" if unknown else ", checked against the oracle"))

    # a result: always self-consistent
    n = len(ds)
    assert n == len(rows) and imgs.dtype == torch.uint8 and imgs.shape[:2] == (n, 3)
    h, w = (size, size) if isinstance(size, int) else (size or GOOD[rows[0]["path"]])
    assert tuple(imgs.shape[2:]) == (h, w)
    assert ds.labels.dtype == torch.int64 and ((ds.labels >= 0) & (ds.labels < len(ds.classnames))).all()
    if boxes is not None:
        has = (boxes >= 0).all(1)
        assert ((boxes == -1).all(1) | has).all()
        b = boxes[has]
        assert (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all()
        assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    if unknown:
        return
    # and equal to an independent reading
    from PIL import Image

    exp_names, exp_labels = _expected_labels([r["label"] for r in rows], names)
    assert ds.classnames == exp_names and ds.labels.tolist() == exp_labels
    for i, ((r, box), lab) in enumerate(zip(expect_rows, exp_labels)):
        cap = r["caption"].strip() if "caption" in cols else ""
        assert ds.captions[i] == (cap or f"a photo of a {exp_names[lab]}")
        with Image.open(images / r["path"]) as im:
            im = im.convert("RGB")
            h0, w0 = GOOD[r["path"]]
            if (h0, w0) != (h, w):
                im = im.resize((w, h), Image.Resampling.BILINEAR)
            assert np.array_equal(imgs[i].permute(1, 2, 0).numpy(), np.asarray(im))
        if "x1" in cols:
            want = [-1] * 4 if box is None else [_round_half_up(min(v, e) * s) for v, e, s in  # clipped, scaled
                                                  zip(box, (w0, h0, w0, h0), (w / w0, h / h0, w / w0, h / h0))]
            assert boxes[i].tolist() == want
