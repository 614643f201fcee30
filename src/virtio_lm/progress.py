"""Progress for a terminal and for a pipe.

On a terminal, rich's live bars.  In a pipe or a CI log a live bar is redrawn
into fragments ("complet… round  …  82.3 MiB s…"), so there each update worth
telling becomes one whole plain line, at most one per ``interval`` seconds
unless something changed that the reader must see (a new round, a new status,
a finished task).

* :func:`is_terminal` -- whether a stream is a TTY.
* :class:`Lines` -- the rate-limited line printer both uses below share.
* :func:`task_progress` -- a context manager giving an object with rich's
  ``add_task`` / ``advance`` / ``update`` (the subset used here): rich's
  Progress on a terminal, :class:`PlainTasks` elsewhere.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterator, TextIO

INTERVAL_S = 1.0


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream if stream is not None else sys.stdout
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


class Lines:
    """Whole lines to ``out``: :meth:`emit` prints when ``key`` changed or ``interval`` passed."""

    def __init__(self, out: TextIO | None = None, interval: float = INTERVAL_S) -> None:
        self.out = out
        self.interval = interval
        self._key: object = object()
        self._last = -float("inf")

    def emit(self, key: object, text: str, *, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and key == self._key and now - self._last < self.interval:
            return False
        self._key, self._last = key, now
        out = self.out if self.out is not None else sys.stdout
        print(text.replace("\n", " "), file=out, flush=True)
        return True


class PlainTasks:
    """rich.progress.Progress's add_task / advance / update, as plain lines (see module doc)."""

    def __init__(self, out: TextIO | None = None, interval: float = INTERVAL_S) -> None:
        self._lines = Lines(out, interval)
        self._tasks: dict[int, dict[str, Any]] = {}
        self._t0 = time.monotonic()

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        tid = len(self._tasks)
        self._tasks[tid] = {"description": description, "total": total, "completed": 0.0}
        return tid

    def update(self, task: int, *, description: str | None = None, advance: float = 0.0,
               completed: float | None = None, total: float | None = None, **_: Any) -> None:
        t = self._tasks[task]
        if description is not None:
            t["description"] = description
        if total is not None:
            t["total"] = total
        t["completed"] = completed if completed is not None else t["completed"] + advance
        self._tell(task)

    def advance(self, task: int, advance: float = 1.0) -> None:
        self.update(task, advance=advance)

    def _tell(self, task: int) -> None:
        t = self._tasks[task]
        total = t["total"]
        done = total is not None and t["completed"] >= total
        count = f"{t['completed']:.0f}/{total:.0f}" if total is not None else f"{t['completed']:.0f}"
        self._lines.emit((task, t["description"], done),
                         f"{t['description']}: {count} ({time.monotonic() - self._t0:.0f} s)", force=done)


@contextlib.contextmanager
def task_progress(out: TextIO | None = None) -> Iterator[Any]:
    """Rich bars on a terminal, :class:`PlainTasks` lines elsewhere."""
    if is_terminal(out):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(file=out) if out is not None else None
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as bar:
            yield bar
    else:
        yield PlainTasks(out)
