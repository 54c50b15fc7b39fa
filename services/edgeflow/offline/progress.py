"""The offline job's progress bar: members done, their rate, pairs scored per second, ETA."""

from __future__ import annotations

import sys
import time
from types import TracebackType

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


class _Rate(ProgressColumn):
    """Members per second and pairs scored per second since the bar started."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("-", style="progress.data.speed")
        pairs = float(task.fields.get("pairs", 0))
        return Text(
            f"{task.completed / elapsed:,.0f} members/s, {pairs / elapsed:,.0f} pairs/s",
            style="progress.data.speed",
        )


class Bar:
    """A rich progress bar on stderr; silent when `enabled` is False."""

    def __init__(self, label: str, total: int, done: int = 0, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _Rate(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            disable=not enabled,
        )
        self._task = self._progress.add_task(label, total=total, completed=done, pairs=0)
        self._pairs = 0
        self._last = 0.0

    def __enter__(self) -> Bar:
        self._progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.refresh()
        self._progress.stop()

    def advance(self, members: int, pairs: int) -> None:
        self._pairs += pairs
        self._progress.update(self._task, advance=members, pairs=self._pairs)

    def set(self, done: int, pairs: int | None = None) -> None:
        now = time.monotonic()
        if pairs is not None:
            self._pairs = pairs
        if now - self._last > 0.1 or done >= (self._progress.tasks[0].total or 0):
            self._progress.update(self._task, completed=done, pairs=self._pairs)
            self._last = now
