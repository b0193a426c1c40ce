"""``TrainConfig``: every setting of a :func:`vlmfast.train.fit` run, validated when built."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any, Callable

PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("cosine", "constant")
# settings that do not change the trajectory of a run: a resumed run may change them
_NOT_IN_FINGERPRINT = ("checkpoint_every", "checkpoint_dir", "keep_checkpoints", "progress", "log_every", "desc")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run; the length is a number of optimizer ``steps`` (never wall-clock time), so a
    run is a deterministic function of its inputs and ``seed``.

    ``lr``: peak learning rate; a parameter group's rate is ``lr * group["lr_scale"] * schedule(step)``.
    ``weight_decay``, ``betas``, ``eps``: AdamW's (``weight_decay`` applies to groups that do not set their own).
    ``warmup``: linear warm-up length, an int number of steps or a float fraction of ``steps`` in [0, 1).
    ``schedule``: ``"cosine"`` (warm-up, then cosine decay to 0 at ``steps``), ``"constant"`` (warm-up, then 1),
    or a callable ``(step, steps, warmup_steps) -> factor``. ``grad_clip``: max global gradient norm, or None.
    ``seed``: seeds torch / random / numpy at the start of a fresh run (a resumed run restores the saved states).
    ``checkpoint_every``: write a resumable checkpoint every this many steps (None: only at the end);
    ``checkpoint_dir``: where (None: no checkpoints, no resume); ``keep_checkpoints``: how many to keep.
    ``precision``: ``"auto"`` (bf16 autocast on a CUDA device that supports it, else fp32), ``"fp32"``, ``"bf16"``.
    ``progress``: None (a bar when stderr is a terminal, else one line every ``log_every`` steps), True (always
    a bar), False (silent). ``log_every``: steps between log lines / metrics callbacks. ``desc``: the bar's label.
    """

    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup: int | float = 0
    schedule: str | Callable[[int, int, int], float] = "cosine"
    grad_clip: float | None = None
    seed: int = 0
    checkpoint_every: int | None = None
    checkpoint_dir: str | os.PathLike | None = None
    keep_checkpoints: int = 1
    precision: str = "auto"
    progress: bool | None = None
    log_every: int = 50
    desc: str = "train"

    def __post_init__(self) -> None:
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {self.steps!r}")
        if not _is_real(self.lr) or self.lr < 0:
            raise ValueError(f"lr: expected a finite float >= 0, got {self.lr!r}")
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected a finite float >= 0, got {self.weight_decay!r}")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else None
        if betas is None or len(betas) != 2 or not all(_is_real(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas: expected two floats in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        if not _is_real(self.eps) or self.eps <= 0:
            raise ValueError(f"eps: expected a float > 0, got {self.eps!r}")
        if _is_int(self.warmup):
            if self.warmup < 0:
                raise ValueError(f"warmup: expected an int number of steps >= 0 or a fraction in [0, 1), got "
                                 f"{self.warmup!r}")
        elif not (isinstance(self.warmup, float) and math.isfinite(self.warmup) and 0 <= self.warmup < 1):
            raise ValueError(f"warmup: expected an int number of steps >= 0 or a float fraction in [0, 1), got "
                             f"{self.warmup!r}")
        if not callable(self.schedule) and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES} or a callable (step, steps, warmup_steps) -> "
                             f"factor, got {self.schedule!r}")
        if self.grad_clip is not None and (not _is_real(self.grad_clip) or self.grad_clip <= 0):
            raise ValueError(f"grad_clip: expected a float > 0 or None, got {self.grad_clip!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")
        if self.checkpoint_every is not None and (not _is_int(self.checkpoint_every) or self.checkpoint_every < 1):
            raise ValueError(f"checkpoint_every: expected an int >= 1 or None, got {self.checkpoint_every!r}")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir: expected a path or None, got {type(self.checkpoint_dir).__name__}")
        if self.checkpoint_every is not None and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every: needs checkpoint_dir (where to write them), got checkpoint_dir=None")
        if not _is_int(self.keep_checkpoints) or self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints: expected an int >= 1, got {self.keep_checkpoints!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise TypeError(f"progress: expected None, True or False, got {self.progress!r}")
        if not _is_int(self.log_every) or self.log_every < 1:
            raise ValueError(f"log_every: expected an int >= 1, got {self.log_every!r}")
        if not isinstance(self.desc, str):
            raise TypeError(f"desc: expected a str, got {type(self.desc).__name__}")

    @property
    def warmup_steps(self) -> int:
        """The warm-up length in steps (a fraction is rounded to the nearest step)."""
        if _is_int(self.warmup):
            return min(int(self.warmup), self.steps)
        return int(round(self.warmup * self.steps))

    def fingerprint(self) -> dict[str, Any]:
        """The settings that determine the trajectory (JSON values): a resumed run must match them."""
        out = {}
        for f in fields(self):
            if f.name in _NOT_IN_FINGERPRINT:
                continue
            v = getattr(self, f.name)
            if callable(v):
                v = f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', repr(v))}"
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out
