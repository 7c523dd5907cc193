"""Progress bars (rate and ETA) for long loops, and a step counter for staged work."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def _progress(unit: str, *, extra: str = "") -> Progress:
    """The one bar layout: description, bar, done/total, [extra], rate, elapsed, ETA.

    Shown on a terminal, or anywhere when ``EHRGPT_PROGRESS=1``.
    """
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if extra:
        columns.append(TextColumn(extra))
    columns += [
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, transient=False, disable=not sys.stderr.isatty() and not _force())


def _force() -> bool:
    return os.environ.get("EHRGPT_PROGRESS", "") == "1"


def track(
    items: Iterable[T],
    total: int,
    description: str,
    *,
    unit: str = "it",
    weight: list[int] | None = None,
    enabled: bool = True,
) -> Iterator[T]:
    """Iterate with a progress bar showing items done, rate (``unit``/s) and ETA.

    ``weight`` gives the number of units each item stands for (for example events per shard),
    so the rate is in those units.
    """
    if not enabled:
        yield from items
        return
    start = time.perf_counter()
    done_units = 0
    with _progress(unit) as progress:
        task = progress.add_task(description, total=total, rate="")
        for i, item in enumerate(items):
            yield item
            done_units += weight[i] if weight else 1
            rate = done_units / max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=1, rate=f"{rate:,.0f} {unit}/s")


class Steps:
    """A bar over the named steps of a stage (``advance('writing')`` starts the next step)."""

    def __init__(self, total: int, description: str, *, enabled: bool = True) -> None:
        self.description = description
        self.timings: dict[str, float] = {}
        self._current: tuple[str, float] | None = None
        self._progress = _progress("step") if enabled else None
        self._task = None
        self._started = False
        self.total = total

    def advance(self, step: str) -> None:
        self._clock(step)
        if self._progress is None:
            return
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, rate=step)
            return
        self._progress.update(self._task, advance=1, rate=step)

    def _clock(self, step: str | None) -> None:
        now = time.perf_counter()
        if self._current is not None:
            name, since = self._current
            self.timings[name] = now - since
            logging.getLogger("ehrgpt.timing").debug(
                "%s: %s %.2f s", self.description, name, now - since
            )
        self._current = (step, now) if step else None

    def close(self) -> None:
        self._clock(None)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self.total, rate="done")
            self._progress.stop()


class Bar:
    """A bar updated by hand (``update(done, loss=..., rate=...)``), for loops that are not
    iterators, such as training steps.

    ``fields`` names extra values shown after the count, e.g. ``{"loss": "-"}``.
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        done: int = 0,
        fields: dict[str, str] | None = None,
        enabled: bool = True,
    ) -> None:
        fields = dict(fields or {})
        extra = " ".join(f"{name} {{task.fields[{name}]}}" for name in fields)
        self._progress = _progress("it", extra=extra) if enabled else None
        self._task = None
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(
                description, total=total, completed=done, rate="", **fields
            )

    def update(self, done: int, *, rate: str = "", **fields: str) -> None:
        """Set the count, the rate text and any extra field."""
        if self._progress is not None:
            self._progress.update(self._task, completed=done, rate=rate, **fields)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
