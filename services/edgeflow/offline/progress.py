"""How commands show work in progress, and times to people: one helper for every command.

`Stages` shows the stages of a command (`edgeflow train`, `quickstart`, the offline job) while
they run. On a terminal each stage is a rich progress bar saying what it does (a spinner when
it has no count), replaced by one line with its result and duration when it ends. When the
output is not a terminal (tests, CI, a log) nothing is drawn: each stage prints that one line
only, and with `every` also a line with its count at most every `every` seconds.

`duration`, `age` and `timestamp` format seconds and times as a person reads them.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


# ---- times for people ----------------------------------------------------------------------
def duration(seconds: float) -> str:
    """'0.4s', '12.3s', '4m 05s', '2h 03m'."""
    s = max(0.0, float(seconds))
    if s < 59.95:
        return f"{s:.1f}s"
    whole = round(s)
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole // 3600}h {whole % 3600 // 60:02d}m"


def age(seconds: float) -> str:
    """How long ago: 'just now', '42 s ago', '3 min ago', '2 h 5 min ago', '3 days ago';
    a negative age (a clock ahead) reads 'in 3 min'."""
    s = abs(float(seconds))
    if s < 1:
        return "just now"
    if s < 60:
        text = f"{s:.0f} s"
    elif s < 3600:
        text = f"{s // 60:.0f} min"
    elif s < 2 * 86400:
        hours, minutes = divmod(int(s // 60), 60)
        text = f"{hours} h" + (f" {minutes} min" if hours < 10 and minutes else "")
    else:
        text = f"{s // 86400:.0f} days"
    return f"in {text}" if seconds < 0 else f"{text} ago"


def timestamp(epoch: float, now: float | None = None) -> str:
    """Unix seconds as local time and age: '2026-12-06 20:15:03 (3 min ago)'."""
    local = datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")
    return f"{local} ({age((time.time() if now is None else now) - epoch)})"


# ---- stages ----------------------------------------------------------------------------------
class Stage:
    """One running stage, as `Stages.stage` yields it: report its count with `advance` or
    `update` (or `watch` a counter), and set `note` to what it produced for its closing line."""

    def __init__(
        self,
        stages: Stages,
        text: str,
        total: float | None,
        done: float,
        unit: str,
        rates: tuple[str, ...] | None,
    ) -> None:
        self.text = text
        self.total = total
        self.completed = done
        self.initial = done  # done before the stage began: not part of its rates
        self.unit = unit
        self.rates = rates
        self.counts: dict[str, float] = {}
        self.note = ""
        self.task: TaskID | None = None
        self._stages = stages
        self._start = self._said = time.perf_counter()
        self._end: float | None = None
        self._watchers: list[tuple[threading.Thread, threading.Event]] = []

    @property
    def seconds(self) -> float:
        """Time since the stage began, or its duration once it ended."""
        return (self._end or time.perf_counter()) - self._start

    def advance(self, n: float = 1, **counts: float) -> None:
        """`n` more done; `counts` add to named counters (pairs=...), shown as rates."""
        added = {k: self.counts.get(k, 0) + v for k, v in counts.items()}
        self.update(self.completed + n, counts=added)

    def update(
        self,
        completed: float | None = None,
        *,
        total: float | None = None,
        text: str | None = None,
        counts: dict[str, float] | None = None,
    ) -> None:
        """Set the count (and the total, the text, named counters) and show them."""
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        if text is not None:
            self.text = text
        if counts:
            self.counts.update(counts)
        self._stages._show(self)

    def watch(self, read: Callable[[], float], every: float = 0.2) -> None:
        """Set the count from `read()` every `every` seconds until the stage ends: for loops
        that cannot report themselves (scikit-learn's fit, child processes)."""
        if not self._stages.enabled:
            return
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(every):
                try:
                    self.update(read())
                except Exception:  # a progress reading must never stop the work
                    return

        thread = threading.Thread(target=poll, name="progress-watch", daemon=True)
        thread.start()
        self._watchers.append((thread, stop))

    def _finish(self) -> None:
        self._end = time.perf_counter()
        for thread, stop in self._watchers:
            stop.set()
            thread.join()

    def summary(self) -> str:
        """The closing line's result: the note, else the count, with rates when asked for."""
        parts = [self.note] if self.note else []
        if not self.note and self.total is not None:
            parts.append(f"{self.completed:,.0f}/{self.total:,.0f} {self.unit}".rstrip())
        if self.rates is not None and self.seconds > 0:
            done = self.completed - self.initial
            parts += _rates(done, self.unit, self.counts, self.rates, self.seconds)
        return ", ".join(parts)


def _rates(
    done: float, unit: str, counts: dict[str, float], names: tuple[str, ...], seconds: float
) -> list[str]:
    out = [f"{done / seconds:,.0f} {unit}/s"]
    out += [f"{counts.get(n, 0) / seconds:,.0f} {n}/s" for n in names]
    return out


class Stages:
    """Shows a command's stages on `console` (default stderr); silent when not `enabled`.

    `live` (default: whether the console is a terminal) draws bars; otherwise one plain line
    per stage is printed when it ends, and, with `every`, a count line at most that often.
    `nested()` gives stages indented under this one's, on the same display.
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        enabled: bool = True,
        live: bool | None = None,
        every: float | None = None,
        indent: int = 0,
    ) -> None:
        # stderr as it is now: a step that captures sys.stderr for a while (Feast's own
        # output, build/feast_features.py) must not swallow the live display meanwhile.
        self.console = console if console is not None else Console(file=sys.stderr)
        self.enabled = enabled
        self.live = enabled and (self.console.is_terminal if live is None else live)
        self.every = every
        self.indent = indent
        self._display = _Display(self.console) if self.live else None

    def nested(self) -> Stages:
        child = Stages(self.console, enabled=self.enabled, live=False, every=self.every)
        child.indent, child.live, child._display = self.indent + 2, self.live, self._display
        return child

    def print(self, text: str) -> None:
        """A plain line at this level (above any bar)."""
        if self.enabled:
            self.console.print(
                " " * self.indent + text, markup=False, highlight=False, soft_wrap=True
            )

    @contextmanager
    def stage(
        self,
        text: str,
        total: float | None = None,
        *,
        done: float = 0,
        unit: str = "",
        rates: tuple[str, ...] | None = None,
    ) -> Iterator[Stage]:
        """A stage saying `text`: a spinner, or with `total` a bar of `unit`s with an ETA
        (`done` of them done already); `rates` adds units per second and, for each name in
        it, that counter (`advance(n, pairs=k)`) per second."""
        st = Stage(self, text, total, done, unit, rates)
        if self._display is not None:
            st.task = self._display.add(" " * self.indent + text, st)
        try:
            yield st
        except BaseException as exc:
            st._finish()
            self._close(st, "failed" if isinstance(exc, Exception) else "stopped")
            raise
        st._finish()
        self._close(st, None)

    def _show(self, st: Stage) -> None:
        if not self.enabled:
            return
        if self._display is not None and st.task is not None:
            self._display.update(st.task, " " * self.indent + st.text, st)
            return
        now = time.perf_counter()
        if self.every is None or st.total is None or now - st._said < self.every:
            return
        st._said = now
        share = f" ({st.completed / st.total:.0%})" if st.total else ""
        self.print(
            f"{st.text}: {st.completed:,.0f}/{st.total:,.0f} {st.unit}{share}, "
            f"{duration(st.seconds)} so far"
        )

    def _close(self, st: Stage, failure: str | None) -> None:
        if self._display is not None and st.task is not None:
            self._display.remove(st.task)
        if not self.enabled:
            return
        if failure:
            line = f"{st.text}: {failure} after {duration(st.seconds)}"
        else:
            result = st.summary()
            line = f"{st.text}{': ' + result if result else ''} ({duration(st.seconds)})"
        if not self.live:
            self.print(line)
            return
        mark = Text("✗ ", style="red") if failure else Text("✓ ", style="green")
        self.console.print(Text(" " * self.indent) + mark + Text(line), soft_wrap=True)


# ---- the live display ----------------------------------------------------------------------
class _Bar(ProgressColumn):
    """A bar for stages with a total; nothing for the others (the spinner says enough)."""

    def __init__(self) -> None:
        super().__init__()
        self._bar = BarColumn()

    def render(self, task: Task) -> RenderableType:
        if task.total is None:
            return Text("")
        return self._bar.render(task)


class _Count(ProgressColumn):
    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        unit = task.fields.get("unit", "")
        text = f"{task.completed:,.0f}/{task.total:,.0f} {unit}".rstrip()
        return Text(text, style="progress.download")


class _Rate(ProgressColumn):
    """The units per second and each named counter per second, since the stage began."""

    def render(self, task: Task) -> Text:
        names = task.fields.get("rates")
        elapsed = task.elapsed or 0.0
        if names is None:
            return Text("")
        if elapsed <= 0:
            return Text("-", style="progress.data.speed")
        done = task.completed - task.fields["initial"]
        parts = _rates(done, task.fields["unit"], task.fields["counts"], names, elapsed)
        return Text(", ".join(parts), style="progress.data.speed")


class _Eta(TimeRemainingColumn):
    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return Text("ETA ") + super().render(task)


class _Display:
    """One rich Progress shared by a Stages tree: one task per running stage, started with
    the first and stopped (erased, `transient`) with the last."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._lock = threading.Lock()

    def add(self, description: str, st: Stage) -> TaskID:
        with self._lock:
            if self._progress is None:
                self._progress = Progress(
                    SpinnerColumn(),
                    TextColumn("{task.description}"),
                    _Bar(),
                    _Count(),
                    _Rate(),
                    TimeElapsedColumn(),
                    _Eta(),
                    console=self.console,
                    transient=True,
                )
                self._progress.start()
            return self._progress.add_task(
                description,
                total=st.total,
                completed=int(st.completed),
                unit=st.unit,
                initial=st.initial,
                rates=st.rates,
                counts=dict(st.counts),
            )

    def update(self, task: TaskID, description: str, st: Stage) -> None:
        with self._lock:
            if self._progress is not None:
                self._progress.update(
                    task,
                    description=description,
                    total=st.total,
                    completed=st.completed,
                    counts=dict(st.counts),
                )

    def remove(self, task: TaskID) -> None:
        with self._lock:
            if self._progress is None:
                return
            self._progress.remove_task(task)
            if not self._progress.tasks:
                self._progress.stop()
                self._progress = None
