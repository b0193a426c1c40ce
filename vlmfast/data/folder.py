"""A generic loader: images listed in a CSV file, read with PIL into an :class:`~vlmfast.data.ImageDataset`.

CSV format (a header row, comma-separated, UTF-8 with or without BOM):

* ``path`` (required): the image file, relative to ``root`` (absolute paths are used as they are);
* ``label`` (required): an integer class index, or a class name;
* ``x1, y1, x2, y2`` (optional, all four or none): the object box in pixels of the *original* image,
  ``[x1, y1, x2, y2]`` with exclusive ends; numbers are rounded (half up) to ints; a row with all four cells empty has
  no box (stored as −1s);
* ``caption`` (optional): the caption; empty or absent → ``"a photo of a {classname}"``.

Class names: the ``classnames`` argument if given (integer labels index it; string labels must be in it);
otherwise, for string labels the sorted unique labels, for integer labels ``"0" … str(max label)``.
Images are converted to RGB; with ``image_size`` they are resized (PIL bilinear) to it and the boxes scaled to
match (rounded, clipped to the image); without it every image must have the same size.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vlmfast.data._dataset import ImageDataset, sequence_of_str

BOX_COLUMNS = ("x1", "y1", "x2", "y2")
DEFAULT_CAPTION = "a photo of a {}"


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
) -> ImageDataset:
    """Load the images listed in ``csv_path`` (format in the module docstring) into an :class:`ImageDataset`.

    Args:
        root: directory the ``path`` column is relative to.
        csv_path: the CSV file; a relative path that does not exist is also tried relative to ``root``.
        image_size: None (keep sizes; they must all agree), an int (square) or ``(height, width)``.
        classnames: the class names, indexed by integer labels / matched by string labels.
        split: recorded as the dataset's ``split``.

    Raises:
        FileNotFoundError: the CSV or an image file is missing (naming the CSV file, its line and the path).
        ValueError: a missing column, a bad label, box or image size (naming the CSV file and line).
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    size = _check_size(image_size)
    names = sequence_of_str("classnames", classnames)
    csv_file = Path(csv_path)
    if not csv_file.exists() and not csv_file.is_absolute() and (root / csv_file).exists():
        csv_file = root / csv_file
    if not csv_file.is_file():
        raise FileNotFoundError(f"csv_path: no such file {str(csv_file)!r}")

    with open(csv_file, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        missing = [c for c in ("path", "label") if c not in header]
        if missing:
            raise ValueError(f"{csv_file}: missing required column(s) {missing}; found columns {header}")
        box_cols = [c for c in BOX_COLUMNS if c in header]
        if box_cols and len(box_cols) != 4:
            raise ValueError(
                f"{csv_file}: box columns must be all of {list(BOX_COLUMNS)} or none, found only {box_cols}"
            )
        rows = []
        for row in reader:
            rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}))
    if not rows:
        raise ValueError(f"{csv_file}: no data rows")

    # labels
    raw_labels = [r["label"] for _, r in rows]
    for line, r in rows:
        if not r["label"]:
            raise ValueError(f"{csv_file}, line {line}: empty label")
    is_int = all(_is_int(s) for s in raw_labels)
    if names is None:
        names = [str(i) for i in range(max(int(s) for s in raw_labels) + 1)] if is_int else sorted(set(raw_labels))
    index = {c: i for i, c in enumerate(names)}
    labels = []
    for (line, _), s in zip(rows, raw_labels):
        if is_int:
            v = int(s)
            if not 0 <= v < len(names):
                raise ValueError(
                    f"{csv_file}, line {line}: label {v} outside [0, {len(names)}) ({len(names)} class names)"
                )
        else:
            if s not in index:
                raise ValueError(f"{csv_file}, line {line}: label {s!r} is not one of the class names {names[:20]}")
            v = index[s]
        labels.append(v)

    images, boxes, captions = [], [], []
    first_size = None
    for (line, r), lab in zip(rows, labels):
        p = Path(r["path"])
        if not r["path"]:
            raise ValueError(f"{csv_file}, line {line}: empty path")
        full = p if p.is_absolute() else root / p
        if not full.is_file():
            raise FileNotFoundError(f"{csv_file}, line {line}: image file not found: {str(full)!r}")
        try:
            with Image.open(full) as im:
                im = im.convert("RGB")
                w0, h0 = im.size
                if size is not None and (h0, w0) != size:
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{csv_file}, line {line}: cannot read image {str(full)!r} ({exc})") from None
        if size is None:
            if first_size is None:
                first_size = (h0, w0)
            elif (h0, w0) != first_size:
                raise ValueError(
                    f"{csv_file}, line {line}: image {str(full)!r} is {h0}x{w0} but the first is "
                    f"{first_size[0]}x{first_size[1]}; pass image_size= to resize"
                )
        images.append(arr.transpose(2, 0, 1))
        if box_cols:
            boxes.append(_parse_box(r, csv_file, line, (h0, w0), size))
        cap = r.get("caption", "")
        captions.append(cap if cap else DEFAULT_CAPTION.format(names[lab]))

    return ImageDataset(
        images=torch.from_numpy(np.stack(images)),
        labels=torch.tensor(labels, dtype=torch.int64),
        classnames=list(names),
        captions=captions,
        split=split,
        boxes=torch.tensor(boxes, dtype=torch.int64) if box_cols else None,
    )


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _parse_box(
    r: dict[str, str], csv_file: Path, line: int, orig: tuple[int, int], size: tuple[int, int] | None
) -> list[int]:
    cells = [r.get(c, "") for c in BOX_COLUMNS]
    if all(c == "" for c in cells):
        return [-1, -1, -1, -1]
    try:
        x1, y1, x2, y2 = (float(c) for c in cells)
    except ValueError:
        box = dict(zip(BOX_COLUMNS, cells))
        raise ValueError(f"{csv_file}, line {line}: box {box} must be four numbers (or all empty)") from None
    if not (x1 <= x2 and y1 <= y2):
        raise ValueError(f"{csv_file}, line {line}: box needs x1 <= x2 and y1 <= y2, got {[x1, y1, x2, y2]}")
    h0, w0 = orig
    h, w = size if size is not None else orig
    sx, sy = w / w0, h / h0
    out = [math.floor(v + 0.5) for v in (x1 * sx, y1 * sy, x2 * sx, y2 * sy)]  # round half up
    return [min(max(out[0], 0), w), min(max(out[1], 0), h), min(max(out[2], 0), w), min(max(out[3], 0), h)]
