"""Batch progress bars of the library's long loops (image encoding, heatmaps, the k-medoids sweep): tqdm by default,
or whatever an application installs with :func:`batch_bars` — ``vlmfast``'s command line shows them as rich bars
under its model and stage bars (:mod:`vlmfast.cli._progress`). The library never imports rich."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterable, Iterator

__all__ = ["bar", "batch_bars", "iterate"]

#: ``factory(total, desc, unit) -> object with update(n) and close()``, or None for tqdm.
_FACTORY: contextvars.ContextVar[Callable[[int | None, str, str], Any] | None] = contextvars.ContextVar(
    "vlmfast_batch_bars", default=None)


@contextlib.contextmanager
def batch_bars(factory: Callable[[int | None, str, str], Any] | None) -> Iterator[None]:
    """Within the block, the library's batch bars are ``factory(total, desc, unit)`` (an object with
    ``update(n)`` and ``close()``); None restores tqdm."""
    token = _FACTORY.set(factory)
    try:
        yield
    finally:
        _FACTORY.reset(token)


class _Quiet:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int | None, desc: str = "", unit: str = "it") -> Any:
    """A progress bar (``update(n)``, ``close()``): the installed factory's, else tqdm's (on stderr), else one
    that shows nothing (tqdm missing)."""
    factory = _FACTORY.get()
    if factory is not None:
        return factory(total, desc, unit)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the extras
        return _Quiet()
    return tqdm(total=total, desc=desc, unit=unit)


def iterate(it: Iterable, total: int | None, desc: str = "", unit: str = "it") -> Iterator:
    """``it`` with a :func:`bar` advanced per item (closed at the end, or when the loop stops early)."""
    b = bar(total, desc, unit)
    try:
        for x in it:
            yield x
            b.update(1)
    finally:
        b.close()
