"""Batch sources that are pure functions of ``(seed, step)``, so a resumed run draws exactly the batches the
uninterrupted run would have drawn."""

from __future__ import annotations

import hashlib

import torch


def step_seed(seed: int, step: int, stream: str = "") -> int:
    """A 63-bit seed derived from ``(seed, stream, step)`` (SHA-256; independent streams per label)."""
    digest = hashlib.sha256(f"{seed}:{stream}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, stream: str = "") -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`step_seed`: per-step randomness (augmentations, dropout of
    inputs, outlier draws) that does not depend on what ran before."""
    return torch.Generator().manual_seed(step_seed(seed, step, stream))


class EpochSampler:
    """Indices of the batch of each step: epochs of a fresh permutation of ``range(n)`` (seeded by ``(seed,
    epoch)``), cut into ``n // batch_size`` full batches (the tail of each permutation is dropped).

    ``sampler(step)`` -> ``(batch_size,)`` int64; any step, in any order, without replaying earlier ones.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0) -> None:
        for name, v, low in (("n", n, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")
        if batch_size > n:
            raise ValueError(f"batch_size: expected at most n = {n} (one batch per step, no repeats), got "
                             f"{batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.batches_per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(step_seed(self.seed, epoch, "epoch"))
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def __call__(self, step: int) -> torch.Tensor:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: expected an int >= 0, got {step!r}")
        epoch, pos = divmod(step, self.batches_per_epoch)
        start = pos * self.batch_size
        return self.permutation(epoch)[start:start + self.batch_size]

    def __repr__(self) -> str:
        return f"EpochSampler(n={self.n}, batch_size={self.batch_size}, seed={self.seed})"
