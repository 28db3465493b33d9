"""Progress reporting for long loops: a rich bar on a terminal, periodic log lines otherwise.

The one convention for every long-running library function: it takes ``progress``, a
`ProgressFactory` -- ``progress(total, description)`` is a context manager yielding
``advance(n)`` -- and calls ``advance`` as work gets done. The commands pass `progress_bar`;
library callers pass nothing (`no_progress`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

Advance = Callable[[int], None]  # advance(n items done)
ProgressFactory = Callable[[int, str], AbstractContextManager[Advance]]


@contextmanager
def no_progress(total: int, description: str) -> Iterator[Advance]:
    """The `ProgressFactory` that shows nothing."""
    yield lambda n: None


class _RateColumn(ProgressColumn):
    """Items per second, e.g. '1234 particles/s'."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed:
            speed = task.completed / task.elapsed  # too few samples for rich's windowed speed
        return Text("--" if speed is None else f"{speed:,.0f} {self.unit}/s")


@contextmanager
def progress_bar(
    total: int,
    description: str,
    unit: str = "particles",
    stream: TextIO | None = None,
    log_every_s: float = 30.0,
) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``: a rich bar (rate, ETA) on a TTY, else plain lines on ``stream``.

    The plain fallback (logs, pipes, CI) prints at every 10% of ``total`` or every
    ``log_every_s`` seconds, whichever comes first, and once at the end.
    """
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        with _rich(total, description, unit, stream) as advance:
            yield advance
    else:
        with _plain(total, description, unit, stream, log_every_s) as advance:
            yield advance


@contextmanager
def _rich(
    total: int, description: str, unit: str, stream: TextIO
) -> Iterator[Callable[[int], None]]:
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(file=stream)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


@contextmanager
def _plain(
    total: int, description: str, unit: str, stream: TextIO, log_every_s: float
) -> Iterator[Callable[[int], None]]:
    start = last_time = time.perf_counter()
    state = {"done": 0, "logged": 0}
    step = max(1, total // 10)

    def line() -> None:
        done, elapsed = state["done"], time.perf_counter() - start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        pct = 100.0 * done / total if total else 100.0
        print(
            f"{description}: {done}/{total} {unit} ({pct:.0f}%), {rate:,.0f} {unit}/s, "
            f"elapsed {elapsed:.0f} s, ETA {eta:.0f} s",
            file=stream,
            flush=True,
        )
        state["logged"] = done

    def advance(n: int) -> None:
        nonlocal last_time
        state["done"] += n
        now = time.perf_counter()
        if state["done"] - state["logged"] >= step or now - last_time >= log_every_s:
            line()
            last_time = now

    yield advance
    if state["logged"] != state["done"]:
        line()
