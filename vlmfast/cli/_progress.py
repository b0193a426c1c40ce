"""Progress of the long commands (``vlmfast demo``, ``vlmfast finetune --plan``, ``vlmfast audit --manifest``):
rich progress bars on a terminal — one per stage (runs, models per audit) with the elapsed and remaining time,
and a transient one per batch loop of the library (encoding, heatmaps, the k-medoids sweep:
:func:`vlmfast._progress.batch_bars`) — and each finished item's line printed above them; plain lines (the
same lines, nothing else) when the output is not a terminal, when ``rich`` is missing or when ``enabled=False``.

    with Progress() as p:
        bar = p.stage("fine-tuning", total=35)
        ...; bar.advance("flyp-seed0-...: done (6.6 s)")
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

__all__ = ["Progress"]


class _Stage:
    def __init__(self, owner: "Progress", task: Any) -> None:
        self._owner, self._task = owner, task

    def advance(self, line: str | None = None) -> None:
        """One item done; ``line`` (its outcome) printed above the bars, or as a plain line."""
        self._owner._advance(self._task, line)

    def done(self) -> None:
        """Mark the stage complete (its bar stays, filled)."""
        self._owner._done(self._task)


class Progress:
    """Stages with bars (module docs). ``enabled``: None — bars when ``stream`` is a terminal and rich is
    installed; True — bars whenever rich is installed; False — plain lines only. Lines go to ``stream`` (stdout by
    default), so piping a command's output keeps every line."""

    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self._rich = None
        if enabled is not False and (enabled or _isatty(self.stream)):
            try:
                from rich.console import Console
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                           TimeElapsedColumn, TimeRemainingColumn)
            except ImportError:
                pass
            else:
                self._rich = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                          console=Console(file=self.stream), transient=False)

    @property
    def bars(self) -> bool:
        """Whether rich bars are shown."""
        return self._rich is not None

    def __enter__(self) -> "Progress":
        if self._rich is not None:
            from vlmfast._progress import batch_bars

            self._rich.start()
            self._batches = batch_bars(self._batch_bar)  # the library's batch bars become rich tasks
            self._batches.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._rich is not None:
            self._batches.__exit__(*exc)
            self._rich.stop()

    def _batch_bar(self, total: int | None, desc: str, unit: str) -> Any:
        """A transient rich task for one of the library's batch loops (removed when it closes)."""
        rich, task = self._rich, self._rich.add_task(f"  {desc} ({unit})", total=total)

        class _Bar:
            def update(self, n: int = 1) -> None:
                rich.advance(task, n)

            def close(self) -> None:
                rich.remove_task(task)

        return _Bar()

    def stage(self, description: str, total: int | None) -> _Stage:
        """A new stage of ``total`` items (None: unknown)."""
        if self._rich is None:
            return _Stage(self, None)
        return _Stage(self, self._rich.add_task(description, total=total))

    def line(self, text: str) -> None:
        """A line above the bars (or plain)."""
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def _advance(self, task: Any, line: str | None) -> None:
        if line is not None:
            self.line(line)
        if self._rich is not None and task is not None:
            self._rich.advance(task)

    def _done(self, task: Any) -> None:
        if self._rich is not None and task is not None:
            t = next(x for x in self._rich.tasks if x.id == task)
            end = t.completed if t.total is None else t.total
            self._rich.update(task, total=end, completed=end)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
