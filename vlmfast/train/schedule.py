"""Learning-rate schedules: a factor in [0, 1] of the peak rate for each (0-based) optimizer step."""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, steps: int, warmup_steps: int = 0) -> float:
    """Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then cosine decay from 1
    towards 0: ``0.5 * (1 + cos(pi * (step - warmup_steps) / (steps - warmup_steps)))``. ``step`` is 0-based (the
    step about to be taken), so the first post-warm-up step runs at the peak and the last one just above 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def constant_with_warmup(step: int, steps: int, warmup_steps: int = 0) -> float:
    """Linear warm-up as :func:`cosine_with_warmup`, then 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


SCHEDULE_FUNCTIONS = {"cosine": cosine_with_warmup, "constant": constant_with_warmup}
