"""Batches from any image source: one loader helper for the datasets of :mod:`vlmfast.data`, and the batch
iterator that :func:`vlmfast.models.encode_images` and :func:`vlmfast.models.region_features` use, so they take an
in-memory set and a stream alike.

Sources :func:`iter_batches` accepts, each yielding dicts with at least ``"image"`` ``(B, 3, H, W)``:

* a tensor ``(N, 3, H, W)`` (or a numpy array) — sliced;
* an in-memory dataset (anything with an ``.images`` tensor: :class:`~vlmfast.data.ImageDataset`,
  :class:`~vlmfast.data.SpuriousMNIST`) — sliced, with its per-sample tensors under the item names (``"label"``,
  ``"box"``, ``"region_boxes"``, ...);
* a map-style or iterable ``torch.utils.data.Dataset`` (:class:`~vlmfast.data.ImageFolderStream`) — batched in
  order by a ``DataLoader`` in this process (for worker processes pass a loader);
* a ``torch.utils.data.DataLoader`` — used as it is; its batches may be dicts with ``"image"``, bare image
  tensors, or tuples/lists whose first element is the images.

Only one batch is held at a time, so memory is bounded by the batch, not by N.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from vlmfast.data._dataset import check_has_data

# In-memory dataset attribute -> batch key (the ImageDataset.__getitem__ names)
_FIELDS = (("images", "image"), ("labels", "label"), ("boxes", "box"), ("region_boxes", "region_boxes"),
           ("region_labels", "region_labels"))


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r:.60})")
    if value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {value}")
    return int(value)


def loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int = 256,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    shuffle: bool = False,
    **kwargs: Any,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over a dataset of :mod:`vlmfast.data` (in memory or streamed) whose batches are dicts
    with the item field names: ``"image"`` ``(B, 3, H, W)`` uint8, ``"label"`` ``(B,)``, ``"caption"`` (list of
    str), ``"index"`` ``(B,)``, ``"box"`` ``(B, 4)`` where the set has boxes, and the other per-sample fields.

    ``num_workers`` worker processes decode in parallel; ``pin_memory`` pins batches for fast copies to the GPU
    (ignored where no GPU is visible); ``shuffle`` draws a new order each epoch; other keyword arguments go to
    ``DataLoader`` as they are (``drop_last``, ``prefetch_factor``, ``persistent_workers``, ``generator``, ...).
    """
    sized = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    if not (sized or isinstance(dataset, torch.utils.data.IterableDataset)) or isinstance(dataset, (str, bytes)):
        raise TypeError(f"dataset: expected a dataset (len() and indexing, or a torch IterableDataset), got "
                        f"{type(dataset).__name__}")
    if isinstance(dataset, (list, tuple, dict, torch.Tensor, np.ndarray)):
        raise TypeError(f"dataset: expected a dataset object, got a {type(dataset).__name__}")
    batch_size = _check_int("batch_size", batch_size, 1)
    num_workers = _check_int("num_workers", num_workers, 0)
    for name, v in (("pin_memory", pin_memory), ("shuffle", shuffle)):
        if not isinstance(v, bool):
            raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(), **kwargs,
    )


def is_streaming(data: Any) -> bool:
    """True for a DataLoader or a Dataset without an in-memory ``.images`` tensor (read batch by batch)."""
    if isinstance(data, torch.utils.data.DataLoader):
        return True
    return isinstance(data, torch.utils.data.Dataset) and not isinstance(getattr(data, "images", None), torch.Tensor)


def fingerprint(data: Any) -> str | None:
    """A cache key for a streamed source, or None where there is none: a dataset's ``fingerprint()``, or that of
    a DataLoader's dataset when the loader reads it in order, whole (sequential sampler, no ``drop_last``)."""
    if isinstance(data, torch.utils.data.DataLoader):
        seq = isinstance(data.sampler, torch.utils.data.SequentialSampler) and not data.drop_last
        return fingerprint(data.dataset) if seq else None
    fp = getattr(data, "fingerprint", None)
    return fp() if callable(fp) else None


def _check_images(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected batches of image tensors (B, 3, H, W), got {type(x).__name__}")
    check_has_data(what, x)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    return x


def _normalise(batch: Any, what: str) -> dict[str, Any]:
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(f"{what}: expected batches with an 'image' field, got fields {sorted(map(str, batch))}")
        out = dict(batch)
    elif isinstance(batch, (list, tuple)) and batch:
        out = {"image": batch[0]}
    else:
        out = {"image": batch}
    out["image"] = _check_images(out["image"], what)
    return out


def iter_batches(data: Any, batch_size: int = 256, *, what: str = "data") -> Iterator[dict[str, Any]]:
    """Batches of ``data`` (any source in the module docstring) as dicts with ``"image"`` ``(B, 3, H, W)``;
    TypeError / ValueError naming ``what`` for anything else."""
    batch_size = _check_int("batch_size", batch_size, 1)
    if isinstance(data, (torch.Tensor, np.ndarray)) or isinstance(getattr(data, "images", None), torch.Tensor):
        images = _check_images(getattr(data, "images", data), what)
        n = images.shape[0]
        fields = {}
        if images is not data:
            for attr, key in _FIELDS[1:]:
                v = getattr(data, attr, None)
                if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n:
                    fields[key] = v
        for s in range(0, n, batch_size):
            out = {"image": images[s:s + batch_size], "index": torch.arange(s, min(s + batch_size, n))}
            out.update({k: v[s:s + batch_size] for k, v in fields.items()})
            yield out
        return
    if isinstance(data, torch.utils.data.DataLoader):
        batches = data
    elif isinstance(data, torch.utils.data.Dataset):
        batches = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    else:
        raise TypeError(
            f"{what}: expected a (N, 3, H, W) tensor, a dataset with .images, a torch Dataset or a DataLoader, "
            f"got {type(data).__name__}"
        )
    for batch in batches:
        yield _normalise(batch, what)


def num_batches(data: Any, batch_size: int) -> int | None:
    """How many batches :func:`iter_batches` yields, where that is known up front (for progress bars)."""
    try:
        if isinstance(data, torch.utils.data.DataLoader):
            return len(data)
        n = len(getattr(data, "images", data))
    except TypeError:
        return None
    return -(-n // batch_size)
