"""A generic loader: images listed in a CSV file, read with PIL — into memory (:class:`~vlmfast.data.ImageDataset`)
or streamed (:class:`ImageFolderStream`: lazy decode per item, for folders that do not fit in memory).

CSV format (a header row, comma-separated, UTF-8 with or without BOM):

* ``path`` (required): the image file, relative to ``root`` (absolute paths are used as they are);
* ``label`` (required): an integer class index (ASCII digits), or a class name;
* ``x1, y1, x2, y2`` (optional, all four or none): the object box in pixels of the *original* image,
  ``[x1, y1, x2, y2]`` with exclusive ends, finite, ``x1 < x2`` and ``y1 < y2``, overlapping the image; numbers are
  rounded (half up) to ints; a row with all four cells empty has no box (stored as −1s);
* ``caption`` (optional): the caption; empty or absent → ``"a photo of a {classname}"``.

Class names: the ``classnames`` argument if given (integer labels index it; string labels must be in it);
otherwise, for string labels the sorted unique labels, for integer labels ``"0" … str(max label)`` — which needs
the largest label below :data:`MAX_AUTO_CLASSES` (pass ``classnames`` for a larger label space).
Images are converted to RGB; with ``image_size`` they are resized (PIL bilinear) to it and the boxes scaled to
match (rounded, clipped to the image; a box smaller than a pixel after scaling covers the pixel holding its
centre); without it every image must have the size of the first.

Every error names the CSV file and, for a row, its line: a file that is not UTF-8, a missing column, a bad label,
box or path, an image that is missing, unreadable, of another size, or larger than PIL's decompression-bomb limit.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vlmfast.data._dataset import ImageDataset, LoaderMixin, check_index, sequence_of_str

BOX_COLUMNS = ("x1", "y1", "x2", "y2")
DEFAULT_CAPTION = "a photo of a {}"
#: Integer labels without ``classnames`` are named ``"0" … str(max label)``; a largest label at or above this
#: needs ``classnames`` (one label of 5,000,000 would otherwise create 5,000,001 names).
MAX_AUTO_CLASSES = 100_000
_INT_RE = re.compile(r"[+-]?[0-9]+")
_MAX_INT_DIGITS = 18


def _check_size(image_size: Any) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in image_size)
    ):
        raise ValueError(
            f"image_size: expected None, a positive int or (height, width) of positive ints, got {image_size!r}"
        )
    return int(image_size[0]), int(image_size[1])


def image_folder(
    root: str | os.PathLike,
    csv_path: str | os.PathLike,
    *,
    image_size: int | tuple[int, int] | None = None,
    classnames: Sequence[str] | None = None,
    split: str = "folder",
    stream: bool = False,
) -> ImageDataset | ImageFolderStream:
    """Load the images listed in ``csv_path`` (format in the module docstring).

    Args:
        root: directory the ``path`` column is relative to.
        csv_path: the CSV file; a relative path that does not exist is also tried relative to ``root``.
        image_size: None (keep sizes; they must all agree), an int (square) or ``(height, width)``.
        classnames: the class names, indexed by integer labels / matched by string labels.
        split: recorded as the dataset's ``split``.
        stream: False (default): decode every image now into an :class:`ImageDataset` (the whole set in memory).
            True: an :class:`ImageFolderStream` that parses only the CSV now and decodes each image when it is
            indexed (memory bounded by the batch; use ``.loader(...)`` for worker processes and pinned memory).

    Raises:
        FileNotFoundError: the CSV or an image file is missing (naming the CSV file, its line and the path).
        ValueError: a CSV that is not UTF-8, a missing column, a bad label, box or image (naming the CSV file and
            line). With ``stream=True`` image errors are raised when that item is read.
    """
    if not isinstance(stream, bool):
        raise TypeError(f"stream: expected a bool, got {type(stream).__name__}")
    ds = ImageFolderStream(root, csv_path, image_size=image_size, classnames=classnames, split=split)
    return ds if stream else ds.to_dataset()


class ImageFolderStream(LoaderMixin, torch.utils.data.Dataset):
    """The images of an :func:`image_folder` CSV, decoded one at a time (a map-style ``torch.utils.data.Dataset``).

    Built from the CSV alone (plus the first image's header when ``image_size`` is None); ``ds[i]`` opens,
    converts and resizes image ``i`` and returns the fields of :meth:`ImageDataset.__getitem__` under the same
    names: ``"index"``, ``"image"`` ``(3, H, W)`` uint8, ``"label"`` (0-d int64), ``"caption"``, and ``"box"``
    ``(4,)`` int64 when the CSV has box columns. Set-level fields as in :class:`ImageDataset`: ``labels`` ``(N,)``
    int64, ``classnames``, ``captions``, ``split``, and ``boxes`` (``(N, 4)`` int64 or None; computed on first use
    from every image's header — no pixel decode). ``loader(...)`` batches it with worker processes;
    ``to_dataset()`` loads it all into an :class:`ImageDataset` (equal images and fields).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        csv_path: str | os.PathLike,
        *,
        image_size: int | tuple[int, int] | None = None,
        classnames: Sequence[str] | None = None,
        split: str = "folder",
    ) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root: expected a path, got {type(root).__name__}")
        if not isinstance(csv_path, (str, os.PathLike)):
            raise TypeError(f"csv_path: expected a path, got {type(csv_path).__name__}")
        if not isinstance(split, str):
            raise TypeError(f"split: expected a str, got {type(split).__name__}")
        self.root = Path(root)
        self.image_size = _check_size(image_size)
        self.split = split
        names = sequence_of_str("classnames", classnames)
        self.csv_path = _find_csv(self.root, Path(csv_path))
        rows, self.has_boxes, self._csv_sha256 = _read_rows(self.csv_path)
        self._lines = [line for line, _ in rows]
        self.classnames, labels = _labels(rows, names, self.csv_path)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.captions = [r.get("caption", "") or DEFAULT_CAPTION.format(self.classnames[lab])
                         for (_, r), lab in zip(rows, labels)]
        self._paths = [_image_path(self.root, r["path"], self.csv_path, line) for line, r in rows]
        self._raw_boxes = [_parse_box(r, self.csv_path, line) for line, r in rows] if self.has_boxes else None
        self._boxes: torch.Tensor | None = None
        self._first_size = None
        if self.image_size is None:  # every image must have the first one's size: read its header now
            self._first_size = _header_size(self._paths[0], self.csv_path, self._lines[0])

    # ------------------------------------------------------------------ sequence protocol
    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index(index, len(self))
        arr, orig = _read_image(self._paths[i], self.csv_path, self._lines[i], self.image_size, self._first_size)
        out: dict[str, Any] = {"index": i, "image": torch.from_numpy(arr), "label": self.labels[i],
                               "caption": self.captions[i]}
        if self._raw_boxes is not None:
            out["box"] = torch.tensor(self._box(i, orig), dtype=torch.int64)
        return out

    def _box(self, i: int, orig: tuple[int, int]) -> list[int]:
        return _scale_box(self._raw_boxes[i], self.csv_path, self._lines[i], orig, self.image_size)

    # ------------------------------------------------------------------ set-level fields
    @property
    def boxes(self) -> torch.Tensor | None:
        """``(N, 4)`` int64 boxes in output pixels (−1s where a row has none), or None without box columns. The
        first access reads every image's header (its size), not its pixels."""
        if self._raw_boxes is None:
            return None
        if self._boxes is None:
            rows = []
            for i in range(len(self)):
                if self._raw_boxes[i] is None:
                    rows.append([-1, -1, -1, -1])
                    continue
                orig = _header_size(self._paths[i], self.csv_path, self._lines[i])
                if self._first_size is not None:
                    _check_same_size(orig, self._first_size, self._paths[i], self.csv_path, self._lines[i])
                rows.append(self._box(i, orig))
            self._boxes = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
        return self._boxes

    def to_dataset(self) -> ImageDataset:
        """Every image decoded into one :class:`ImageDataset` (the in-memory path of :func:`image_folder`)."""
        n = len(self)
        images = None
        boxes = torch.full((n, 4), -1, dtype=torch.int64) if self._raw_boxes is not None else None
        for i in range(n):
            arr, orig = _read_image(self._paths[i], self.csv_path, self._lines[i], self.image_size,
                                    self._first_size)
            if images is None:
                images = torch.empty((n, *arr.shape), dtype=torch.uint8)
            images[i] = torch.from_numpy(arr)
            if boxes is not None:
                boxes[i] = torch.tensor(self._box(i, orig))
        if self._raw_boxes is not None:
            self._boxes = boxes
        return ImageDataset(images=images, labels=self.labels.clone(), classnames=list(self.classnames),
                            captions=list(self.captions), split=self.split, boxes=boxes)

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of what determines the items: the CSV's bytes, ``root``, ``image_size``, the
        class names and each image file's path, size and modification time (the files are not read)."""
        h = hashlib.sha256()
        h.update(repr((self._csv_sha256, str(self.root.resolve()), self.image_size, self.classnames)).encode())
        for p in self._paths:
            try:
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}\0missing\n".encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        size = "original" if self.image_size is None else self.image_size
        return (f"ImageFolderStream(split={self.split!r}, n={len(self)}, image_size={size}, "
                f"classes={len(self.classnames)}, csv={str(self.csv_path)!r})")


# ---------------------------------------------------------------------- CSV


def _find_csv(root: Path, csv_file: Path) -> Path:
    try:
        if not csv_file.exists() and not csv_file.is_absolute() and (root / csv_file).exists():
            csv_file = root / csv_file
        ok = csv_file.is_file()
    except (OSError, ValueError) as exc:
        raise ValueError(f"csv_path: cannot use {str(csv_file)!r} ({exc})") from None
    if not ok:
        raise FileNotFoundError(f"csv_path: no such file {str(csv_file)!r}")
    return csv_file


def _read_rows(csv_file: Path) -> tuple[list[tuple[int, dict[str, str]]], bool, str]:
    """((line, {column: stripped cell}) per data row, whether the box columns are there, SHA-256 of the file)."""
    try:
        raw = csv_file.read_bytes()
    except OSError as exc:
        raise ValueError(f"{csv_file}: cannot read the CSV ({exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"{csv_file}, line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the CSV as UTF-8"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        dup = sorted({h for h in header if header.count(h) > 1 and h})
        if dup:
            raise ValueError(f"{csv_file}: duplicate column(s) {dup} in the header {header}")
        reader.fieldnames = header
        missing = [c for c in ("path", "label") if c not in header]
        if missing:
            raise ValueError(f"{csv_file}: missing required column(s) {missing}; found columns {header}")
        box_cols = [c for c in BOX_COLUMNS if c in header]
        if box_cols and len(box_cols) != 4:
            raise ValueError(
                f"{csv_file}: box columns must be all of {list(BOX_COLUMNS)} or none, found only {box_cols}"
            )
        for row in reader:
            cells = {k: (v if isinstance(v, str) else "").strip() for k, v in row.items() if k is not None}
            rows.append((reader.line_num, cells))
    except csv.Error as exc:
        raise ValueError(f"{csv_file}, line {reader.line_num}: not a readable CSV row ({exc})") from None
    if not rows:
        raise ValueError(f"{csv_file}: no data rows")
    return rows, bool(box_cols), hashlib.sha256(raw).hexdigest()


def _labels(rows, names: list[str] | None, csv_file: Path) -> tuple[list[str], list[int]]:
    raw = [r["label"] for _, r in rows]
    for (line, _), s in zip(rows, raw):
        if not s:
            raise ValueError(f"{csv_file}, line {line}: empty label")
    is_int = all(_INT_RE.fullmatch(s) for s in raw)
    if not is_int:
        if names is None:
            names = sorted(set(raw))
        index: dict[str, int] = {}
        for i, c in enumerate(names):
            if c in index:
                raise ValueError(f"classnames: the name {c!r} appears twice, so string labels are ambiguous")
            index[c] = i
        labels = []
        for (line, _), s in zip(rows, raw):
            if s not in index:
                raise ValueError(f"{csv_file}, line {line}: label {s!r:.80} is not one of the class names "
                                 f"{[c[:40] for c in names[:20]]}")
            labels.append(index[s])
        return names, labels
    values = []
    for (line, _), s in zip(rows, raw):
        if len(s.lstrip("+-")) > _MAX_INT_DIGITS:
            raise ValueError(f"{csv_file}, line {line}: label {s[:24]}... is not a usable class index "
                             f"({len(s)} digits)")
        values.append(int(s))
    if names is None:
        top = max(values)
        if top >= MAX_AUTO_CLASSES:
            line = rows[values.index(top)][0]
            raise ValueError(
                f"{csv_file}, line {line}: label {top} is >= {MAX_AUTO_CLASSES}; integer labels without classnames "
                f"are named '0' ... str(max label), so pass classnames= for a label space this large"
            )
        names = [str(i) for i in range(max(top, -1) + 1)]
    for (line, _), v in zip(rows, values):
        if not 0 <= v < len(names):
            raise ValueError(
                f"{csv_file}, line {line}: label {v} outside [0, {len(names)}) ({len(names)} class names)"
            )
    return names, values


def _image_path(root: Path, cell: str, csv_file: Path, line: int) -> Path:
    if not cell:
        raise ValueError(f"{csv_file}, line {line}: empty path")
    if "\x00" in cell:
        raise ValueError(f"{csv_file}, line {line}: the path contains a NUL character")
    p = Path(cell)
    return p if p.is_absolute() else root / p


def _parse_box(r: dict[str, str], csv_file: Path, line: int) -> tuple[float, float, float, float] | None:
    cells = [r.get(c, "") for c in BOX_COLUMNS]
    if all(c == "" for c in cells):
        return None
    box = dict(zip(BOX_COLUMNS, (c[:40] for c in cells)))
    try:
        x1, y1, x2, y2 = (float(c) for c in cells)
    except ValueError:
        raise ValueError(f"{csv_file}, line {line}: box {box} must be four numbers (or all empty)") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"{csv_file}, line {line}: box {box} must be four finite numbers")
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"{csv_file}, line {line}: box needs x1 < x2 and y1 < y2, got {[x1, y1, x2, y2]}")
    return x1, y1, x2, y2


def _scale_box(
    raw: tuple[float, float, float, float] | None,
    csv_file: Path,
    line: int,
    orig: tuple[int, int],
    size: tuple[int, int] | None,
) -> list[int]:
    """A parsed box in output pixels: scaled, clipped, rounded half up; ValueError if it misses the image."""
    if raw is None:
        return [-1, -1, -1, -1]
    x1, y1, x2, y2 = raw
    h0, w0 = orig
    if x2 <= 0 or y2 <= 0 or x1 >= w0 or y1 >= h0:
        raise ValueError(
            f"{csv_file}, line {line}: box {[x1, y1, x2, y2]} lies wholly outside the {w0}x{h0} (width x height) image"
        )
    h, w = size if size is not None else orig
    out = []
    for lo, hi, extent, limit in ((x1, x2, w0, w), (y1, y2, h0, h)):
        scale = limit / extent
        a, b = min(max(lo, 0.0), extent) * scale, min(max(hi, 0.0), extent) * scale  # clipped first: no overflow
        ra, rb = math.floor(a + 0.5), math.floor(b + 0.5)  # round half up
        if rb <= ra:  # thinner than a pixel after scaling: the pixel that holds its centre
            ra = min(int(math.floor((a + b) / 2)), limit - 1)
            rb = ra + 1
        out.append((ra, rb))
    (bx1, bx2), (by1, by2) = out
    return [bx1, by1, bx2, by2]


# ---------------------------------------------------------------------- images


def _open(full: Path, csv_file: Path, line: int):
    from PIL import Image

    try:
        ok = full.is_file()
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise FileNotFoundError(f"{csv_file}, line {line}: image file not found: {str(full)!r}")
    try:
        return Image.open(full)
    except Image.DecompressionBombError as exc:
        raise ValueError(
            f"{csv_file}, line {line}: image {str(full)!r} is too large to decode safely ({_first_line(exc)}); "
            "raise PIL.Image.MAX_IMAGE_PIXELS if the file is genuine"
        ) from None
    except Exception as exc:
        raise ValueError(f"{csv_file}, line {line}: cannot read image {str(full)!r} ({_first_line(exc)})") from None


def _header_size(full: Path, csv_file: Path, line: int) -> tuple[int, int]:
    """(height, width) from the image's header (no decode)."""
    with _open(full, csv_file, line) as im:
        w0, h0 = im.size
    return h0, w0


def _check_same_size(orig, first, full: Path, csv_file: Path, line: int) -> None:
    if orig != first:
        raise ValueError(
            f"{csv_file}, line {line}: image {str(full)!r} is {orig[0]}x{orig[1]} but the first is "
            f"{first[0]}x{first[1]}; pass image_size= to resize"
        )


def _read_image(
    full: Path, csv_file: Path, line: int, size: tuple[int, int] | None, first: tuple[int, int] | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """(``(3, H, W)`` uint8 RGB, original (height, width)) of one image, resized to ``size`` if given."""
    from PIL import Image

    im = _open(full, csv_file, line)
    try:
        with im:
            w0, h0 = im.size
            if size is None:
                _check_same_size((h0, w0), first, full, csv_file, line)
            rgb = im.convert("RGB")
            if size is not None and (h0, w0) != size:
                rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(rgb, dtype=np.uint8)
    except ValueError as exc:
        if str(exc).startswith(str(csv_file)):
            raise
        raise ValueError(f"{csv_file}, line {line}: cannot read image {str(full)!r} ({_first_line(exc)})") from None
    except Exception as exc:
        raise ValueError(f"{csv_file}, line {line}: cannot read image {str(full)!r} ({_first_line(exc)})") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), (h0, w0)


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."
