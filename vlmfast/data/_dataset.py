"""The dataset containers shared by every builder in :mod:`vlmfast.data`, Cramér's V, and the on-disk format.

Two classes, both small keyword-only dataclasses of tensors that a ``torch.utils.data.DataLoader`` can iterate
directly (``__len__`` and ``__getitem__`` returning a dict of per-sample values; the default collate stacks the
tensors and lists the strings):

* :class:`ImageDataset` — images ``(N, 3, H, W)`` uint8, labels ``(N,)`` int64, class names, captions, and
  optionally one box per sample (``boxes``, ``(N, 4)`` int64, ``[x1, y1, x2, y2]``, −1s where unknown).
* :class:`SpuriousMNIST` — the spurious-MNIST composites (and their shifted versions): adds the digit masks, the
  spurious-square flags and boxes, the four region (quadrant) boxes and their labels, and the requested and the
  measured strength of the correlation. ``digit_boxes`` is the ``boxes`` field under its MNIST name.

**Box convention.** ``[x1, y1, x2, y2]`` in pixels with exclusive ends, as the quadrant boxes ``[0, 0, 28, 28]``:
the box covers rows ``y1 <= y < y2`` and columns ``x1 <= x < x2``.

**Cache format.** :func:`save_npz` writes one ``.npz`` (``numpy.savez_compressed``; no pickled objects) holding
every tensor field plus a ``__meta__`` entry with the JSON of the non-tensor fields and the format version; it
is written to a temporary sibling and renamed into place, so a reader never sees a torn file. The ``__meta__``
entry also holds ``content_sha256``, the SHA-256 of every array and of the rest of the meta
(:func:`vlmfast._cache.content_digest`). :func:`load_npz` opens the file with ``allow_pickle=False``, checks the
hash and validates the fields, raising :class:`CacheError` on anything unexpected (a file altered after it was
written included).
"""

from __future__ import annotations

import dataclasses
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vlmfast._cache import atomic_target, content_digest

#: Region labels of :attr:`SpuriousMNIST.region_labels`.
REGION_EMPTY = 0
REGION_DIGIT = 1
REGION_SPURIOUS = 2

#: Bumped whenever the cache layout or anything that changes built samples changes (2: a content hash; odd class
#: counts of the independent splits round to the smallest Cramér's V).
FORMAT_VERSION = 2


class CacheError(RuntimeError):
    """A cache file that cannot be read back (truncated, not an npz, wrong version or layout)."""


def _per_sample(**kwargs):
    return field(metadata={"per_sample": True}, **kwargs)


def check_has_data(name: str, value: Any) -> None:
    """ValueError naming ``name`` for a meta tensor (a shape without data: nothing can be read from it)."""
    if isinstance(value, torch.Tensor) and value.is_meta:
        raise ValueError(f"{name}: expected a tensor with data, got a meta tensor of shape {tuple(value.shape)}")


def check_index(index: Any, n: int) -> int:
    """One sample position (an int, a numpy integer or a 0-d integer tensor; negative counts from the end) as an
    int in ``[0, n)``: TypeError / IndexError naming ``index`` otherwise."""
    if isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point():
        check_has_data("index", index)
        index = int(index)
    if isinstance(index, np.integer):
        index = int(index)
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError(f"index: expected an int (use .subset() for several samples), got {type(index).__name__}")
    if not -n <= index < n:
        raise IndexError(f"index: expected -{n} <= index < {n}, got {index}")
    return index % n


def _as_index(indices: Any, n: int) -> torch.Tensor:
    """``indices`` (ints, an int/bool array or tensor) as an int64 tensor of valid, non-negative positions."""
    if isinstance(indices, torch.Tensor):
        check_has_data("indices", indices)
        idx = indices.detach().cpu()
    else:
        try:
            idx = torch.as_tensor(np.asarray(indices))
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"indices: expected a sequence of ints or a bool mask, got {type(indices).__name__} ({exc})"
            ) from None
    if idx.dim() == 0:
        idx = idx.reshape(1)
    if idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise ValueError(f"indices: a bool mask must have shape ({n},), got {tuple(idx.shape)}")
        return torch.nonzero(idx).reshape(-1)
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise TypeError(f"indices: expected integer positions, got dtype {idx.dtype}")
    idx = idx.reshape(-1).to(torch.int64)
    if int(idx.min()) < -n or int(idx.max()) >= n:
        raise ValueError(f"indices: expected positions in [-{n}, {n}), got min {int(idx.min())}, max {int(idx.max())}")
    return torch.where(idx < 0, idx + n, idx)


class LoaderMixin:
    """``.loader(...)`` for the datasets (in memory or streamed): batches with the ``__getitem__`` field names."""

    def loader(
        self,
        batch_size: int = 256,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        shuffle: bool = False,
        **kwargs: Any,
    ) -> torch.utils.data.DataLoader:
        """A ``DataLoader`` of batches with the ``__getitem__`` field names (see :func:`vlmfast.data.loader`)."""
        from vlmfast.data.stream import loader

        return loader(self, batch_size, num_workers=num_workers, pin_memory=pin_memory, shuffle=shuffle, **kwargs)


@dataclass(eq=False, repr=False, kw_only=True)
class ImageDataset(LoaderMixin):
    """A labelled image set. Per-sample fields (indexed by :meth:`subset`, returned by ``__getitem__``):

    * ``images`` ``(N, 3, H, W)`` uint8 RGB;  ``labels`` ``(N,)`` int64 in ``[0, len(classnames))``;
    * ``captions`` list of N str;  ``boxes`` ``(N, 4)`` int64 ``[x1, y1, x2, y2]`` (exclusive ends; −1s where the
      sample has none) or None when the set has no boxes at all.

    ``classnames`` (list of str) names the labels; ``split`` says where the set comes from.
    """

    images: torch.Tensor = _per_sample()
    labels: torch.Tensor = _per_sample()
    classnames: list[str]
    captions: list[str] = _per_sample()
    split: str = ""
    boxes: torch.Tensor | None = _per_sample(default=None)

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        for f in dataclasses.fields(self):
            check_has_data(f.name, getattr(self, f.name))
        im = self.images
        if not isinstance(im, torch.Tensor):
            raise TypeError(f"images: expected a torch.Tensor, got {type(im).__name__}")
        if im.dtype != torch.uint8 or im.dim() != 4 or im.shape[1] != 3:
            raise ValueError(f"images: expected a uint8 tensor of shape (N, 3, H, W), got {im.dtype} {tuple(im.shape)}")
        n = im.shape[0]
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 or self.labels.shape != (n,):
            lab = self.labels
            got = f"{lab.dtype} {tuple(lab.shape)}" if isinstance(lab, torch.Tensor) else type(lab).__name__
            raise ValueError(f"labels: expected an int64 tensor of shape ({n},), got {got}")
        if not isinstance(self.classnames, list) or not all(isinstance(c, str) for c in self.classnames):
            raise TypeError(f"classnames: expected a list of str, got {self.classnames!r:.200}")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classnames)):
            raise ValueError(
                f"labels: expected values in [0, {len(self.classnames)}) (one per class name), "
                f"got min {int(self.labels.min())}, max {int(self.labels.max())}"
            )
        if not isinstance(self.captions, list) or len(self.captions) != n:
            got = len(self.captions) if isinstance(self.captions, list) else type(self.captions).__name__
            raise ValueError(f"captions: expected a list of {n} str, got {got}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.metadata.get("per_sample") and isinstance(v, torch.Tensor) and (v.dim() == 0 or v.shape[0] != n):
                raise ValueError(
                    f"{f.name}: expected a leading dimension of {n} (one row per image), got {tuple(v.shape)}"
                )
        if self.boxes is not None and (self.boxes.dtype != torch.int64 or self.boxes.shape != (n, 4)):
            got = f"{self.boxes.dtype} {tuple(self.boxes.shape)}"
            raise ValueError(f"boxes: expected an int64 tensor of shape ({n}, 4), got {got}")

    # ------------------------------------------------------------------ sequence protocol
    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _sample_fields(self) -> list[str]:
        fs = dataclasses.fields(self)
        return [f.name for f in fs if f.metadata.get("per_sample") and getattr(self, f.name) is not None]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample as a dict: every per-sample field (``images`` → ``"image"``, ``labels`` → ``"label"``,
        ``captions`` → ``"caption"``, ``boxes`` → ``"box"``, other fields under their own name) and ``"index"``."""
        index = check_index(index, len(self))
        out: dict[str, Any] = {"index": index}
        for name in self._sample_fields():
            v = getattr(self, name)
            key = _ITEM_KEYS.get(name, name)
            out[key] = v[index]
        return out

    def subset(self, indices: Any):
        """A new dataset of the same class holding the samples at ``indices`` (ints, negative allowed, or a bool
        mask of length N), in that order. Tensors are copied; derived statistics are recomputed."""
        idx = _as_index(indices, len(self))
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.metadata.get("per_sample") and v is not None:
                kwargs[f.name] = [v[i] for i in idx.tolist()] if isinstance(v, list) else v[idx]
            else:
                kwargs[f.name] = v
        return self._rebuild(kwargs)

    def _rebuild(self, kwargs: dict[str, Any]):
        return type(self)(**kwargs)

    def replace(self, **changes: Any):
        """A copy with some fields replaced (e.g. corrupted ``images``); validated like a new dataset."""
        return self._rebuild({**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **changes})

    def __repr__(self) -> str:
        h, w = self.images.shape[2:]
        return (
            f"{type(self).__name__}(split={self.split!r}, n={len(self)}, image_size=({h}, {w}), "
            f"classes={len(self.classnames)})"
        )


_ITEM_KEYS = {"images": "image", "labels": "label", "captions": "caption", "boxes": "box"}


@dataclass(eq=False, repr=False, kw_only=True)
class SpuriousMNIST(ImageDataset):
    """Spurious-MNIST composites: 56×56 canvases of four 28×28 quadrants holding one digit and, in some samples,
    a solid red square. Per-sample fields beyond :class:`ImageDataset`'s:

    * ``boxes`` (also ``digit_boxes``) ``(N, 4)`` int64: tight box around the digit's stroke pixels
      (``digit_masks``), canvas coordinates, exclusive ends; −1s if a digit had no stroke pixel (never for the
      shipped sources);
    * ``digit_masks`` ``(N, H, W)`` bool: the digit's stroke pixels, grey level > ``STROKE_THRESHOLD`` (64 of
      255) in the *clean* digit (for corrupted images they still describe the clean digit);
    * ``has_spurious`` ``(N,)`` bool;  ``square_boxes`` ``(N, 4)`` int64, the red square's quadrant, −1s when absent;
    * ``region_boxes`` ``(N, 4, 4)`` int64: the four quadrant boxes (the same for every sample);
    * ``region_labels`` ``(N, 4)`` int64: ``REGION_EMPTY``, ``REGION_DIGIT`` or ``REGION_SPURIOUS`` per quadrant;
    * ``source_ids`` ``(N,)`` int64: index of the source digit in its source set (``source``).

    Set-level: ``strength`` is the requested Cramér's V between square and class (0.0 for the evaluation sets,
    where the square is independent of the class), ``spurious_class`` the class the square is tied to (for
    evaluation sets: the class it is audited against), ``cramers_v`` the V actually measured on these samples
    (:func:`cramers_v`; NaN when fewer than two classes or only one square state occur).
    """

    digit_masks: torch.Tensor = _per_sample()
    has_spurious: torch.Tensor = _per_sample()
    square_boxes: torch.Tensor = _per_sample()
    region_boxes: torch.Tensor = _per_sample()
    region_labels: torch.Tensor = _per_sample()
    source_ids: torch.Tensor = _per_sample()
    strength: float = 0.0
    spurious_class: int = 9
    cramers_v: float = float("nan")
    source: str = ""
    params: dict = field(default_factory=dict)

    def _validate(self) -> None:
        super()._validate()
        n, _, h, w = self.images.shape
        checks = {
            "digit_masks": (torch.bool, (n, h, w)),
            "has_spurious": (torch.bool, (n,)),
            "square_boxes": (torch.int64, (n, 4)),
            "region_boxes": (torch.int64, (n, 4, 4)),
            "region_labels": (torch.int64, (n, 4)),
            "source_ids": (torch.int64, (n,)),
        }
        for name, (dtype, shape) in checks.items():
            v = getattr(self, name)
            if not isinstance(v, torch.Tensor) or v.dtype != dtype or tuple(v.shape) != shape:
                got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{name}: expected a {dtype} tensor of shape {shape}, got {got}")
        if self.boxes is None:
            raise ValueError("boxes: SpuriousMNIST needs the digit boxes, got None")

    @property
    def digit_boxes(self) -> torch.Tensor:
        """``(N, 4)`` int64 tight boxes around the digits' stroke pixels (the ``boxes`` field)."""
        return self.boxes

    def contingency(self) -> torch.Tensor:
        """The ``(C, 2)`` table of counts: column 0 without the square, column 1 with it, one row per class."""
        return torch.from_numpy(contingency_table(self.labels.numpy(), self.has_spurious.numpy(), len(self.classnames)))

    def _rebuild(self, kwargs: dict[str, Any]):
        ds = type(self)(**kwargs)  # validates first
        ds.cramers_v = cramers_v(ds.contingency().numpy())
        return ds

    def __repr__(self) -> str:
        rate = float(self.has_spurious.float().mean()) if len(self) else float("nan")
        return (
            f"SpuriousMNIST(split={self.split!r}, n={len(self)}, spurious_class={self.spurious_class}, "
            f"strength={self.strength}, cramers_v={self.cramers_v:.4f}, square_rate={rate:.3f})"
        )


# ---------------------------------------------------------------------- Cramér's V


def contingency_table(labels: Any, flags: Any, num_classes: int) -> np.ndarray:
    """``(num_classes, 2)`` int64 counts: row = class, column 0 = flag False, column 1 = flag True."""
    check_has_data("labels", labels)
    check_has_data("flags", flags)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    flags = np.asarray(flags).astype(bool).reshape(-1)
    if labels.shape != flags.shape:
        raise ValueError(f"flags: expected one flag per label ({labels.size}), got {flags.size}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels: expected values in [0, {num_classes}), got min {labels.min()}, max {labels.max()}")
    return np.bincount(labels * 2 + flags, minlength=2 * num_classes).reshape(num_classes, 2).astype(np.int64)


def cramers_v(table: Any) -> float:
    """Cramér's V of an ``(r, c)`` contingency table of counts, without continuity correction:
    ``V = sqrt(chi2 / (N * (min(r', c') - 1)))`` where ``chi2 = sum (O - E)^2 / E``, ``E = row_sum * col_sum / N``
    and ``r'``, ``c'`` count the non-empty rows and columns (empty ones are dropped first, as they carry no
    information). NaN when ``min(r', c') < 2`` (association undefined). Equals
    ``scipy.stats.contingency.association(table, method="cramer")`` wherever that is defined."""
    obs = np.asarray(table, dtype=np.float64)
    if obs.ndim != 2:
        raise ValueError(f"table: expected a 2-D contingency table, got shape {obs.shape}")
    if (obs < 0).any():
        raise ValueError("table: expected non-negative counts, got a negative entry")
    obs = obs[obs.sum(1) > 0][:, obs.sum(0) > 0]
    k = min(obs.shape) - 1 if obs.size else 0
    if k < 1:
        return float("nan")
    n = obs.sum()
    exp = obs.sum(1, keepdims=True) * obs.sum(0, keepdims=True) / n
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    return math.sqrt(min(chi2 / (n * k), 1.0))


# ---------------------------------------------------------------------- cache I/O

_META_KEY = "__meta__"


def save_npz(ds: SpuriousMNIST, path: Path) -> None:
    """Write ``ds`` to ``path`` atomically (see the module docstring). ``digit_masks`` are stored bit-packed."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "class": type(ds).__name__}
    for f in dataclasses.fields(ds):
        v = getattr(ds, f.name)
        if isinstance(v, torch.Tensor):
            a = v.numpy()
            if a.dtype == np.bool_:
                meta.setdefault("packed", {})[f.name] = list(a.shape)
                a = np.packbits(a.reshape(-1))
            arrays[f.name] = a
        else:
            meta[f.name] = v
    meta["content_sha256"] = content_digest(arrays, meta)
    arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_target(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def load_npz(path: Path) -> SpuriousMNIST:
    """Read a file written by :func:`save_npz`; :class:`CacheError` (with the path) if it is unusable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(bytes(data.pop(_META_KEY)).decode())
        if meta.get("format_version") != FORMAT_VERSION or meta.get("class") != "SpuriousMNIST":
            got = f"{meta.get('format_version')!r}/{meta.get('class')!r}"
            raise CacheError(f"format {got}, expected {FORMAT_VERSION}/SpuriousMNIST")
        stored = meta.pop("content_sha256", None)
        if stored != content_digest(data, meta):
            raise CacheError("content hash mismatch: the file was changed after it was written")
        packed = meta.pop("packed", {})
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(SpuriousMNIST):
            if f.name in data:
                a = data[f.name]
                if f.name in packed:
                    shape = tuple(packed[f.name])
                    a = np.unpackbits(a, count=int(np.prod(shape))).reshape(shape).astype(bool)
                kwargs[f.name] = torch.from_numpy(np.ascontiguousarray(a))
            elif f.name in meta:
                kwargs[f.name] = meta[f.name]
        return SpuriousMNIST(**kwargs)
    except CacheError as exc:
        raise CacheError(f"{path}: {exc}") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise CacheError(f"{path}: unreadable cache file ({type(exc).__name__}: {exc})") from None


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected a non-negative int, got {type(seed).__name__} ({seed!r})")
    if seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed}")
    return int(seed)


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r})")
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo} <= {name} <= {hi}" if hi is not None else f"{name} >= {lo}"
        raise ValueError(f"{name}: expected {rng}, got {value}")
    return int(value)


def rng_for(seed: int, *tags: str | int) -> np.random.Generator:
    """An independent PCG64 stream for (seed, tags...): streams for different purposes never overlap."""
    import zlib

    words = [seed] + [zlib.crc32(t.encode()) if isinstance(t, str) else int(t) for t in tags]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


def sequence_of_str(name: str, value: Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name}: expected a list of str, got {value!r:.200}")
    return list(value)
