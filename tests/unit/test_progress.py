"""The one progress helper every command uses, and the time formats people read."""

from __future__ import annotations

import io
import re
import threading
import time
from datetime import datetime

import pytest
from rich.console import Console

from edgeflow.offline.progress import Stages, age, duration, timestamp

ANSI = re.compile(r"\x1b\[")
BAR_GLYPHS = re.compile("[━╸╺⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]")
DURATION = r"\((\d+\.\ds|\d+m \d\ds|\d+h \d\dm)\)"


def plain() -> tuple[Stages, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=60)  # a file is not a terminal: no bars
    assert not console.is_terminal
    return Stages(console), out


def test_duration_reads_as_seconds_minutes_and_hours() -> None:
    assert duration(0.04) == "0.0s"
    assert duration(12.34) == "12.3s"
    assert duration(65) == "1m 05s"
    assert duration(3 * 3600 + 4 * 60 + 10) == "3h 04m"
    assert duration(-1) == "0.0s"


def test_age_reads_as_a_person_says_it() -> None:
    assert age(0.2) == "just now"
    assert age(42) == "42 s ago"
    assert age(185) == "3 min ago"
    assert age(2 * 3600 + 5 * 60) == "2 h 5 min ago"
    assert age(3 * 86400) == "3 days ago"
    assert age(-180) == "in 3 min"


def test_timestamp_is_local_time_with_its_age_and_no_epoch() -> None:
    now = 1_796_583_926.37
    text = timestamp(now - 180, now)
    local = datetime.fromtimestamp(now - 180).strftime("%Y-%m-%d %H:%M:%S")
    assert text == f"{local} (3 min ago)"
    assert not re.search(r"\d{9,}", text)


def test_a_plain_run_prints_one_line_per_stage_with_its_duration() -> None:
    stages, out = plain()
    with stages.stage("loading the graph") as st:
        st.note = "4,039 members"
    with stages.stage("Qdrant upsert", 3, unit="points") as st:
        for _ in range(3):
            st.advance()
    with stages.stage("scoring", 10, unit="members", rates=("pairs",)) as st:
        st.advance(10, pairs=500)
    nested = stages.nested()
    with nested.stage("ranker: fitting"):
        pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert re.fullmatch(rf"loading the graph: 4,039 members {DURATION}", lines[0])
    assert re.fullmatch(rf"Qdrant upsert: 3/3 points {DURATION}", lines[1])
    assert re.fullmatch(
        rf"scoring: 10/10 members, [\d,]+ members/s, [\d,]+ pairs/s {DURATION}", lines[2]
    )
    assert re.fullmatch(rf"  ranker: fitting {DURATION}", lines[3])
    assert not ANSI.search(out.getvalue()) and not BAR_GLYPHS.search(out.getvalue())


def test_long_lines_are_not_wrapped_when_not_a_terminal() -> None:
    stages, out = plain()
    with stages.stage("Feast materialize into the Redis online store") as st:
        st.note = "x" * 100
    assert len(out.getvalue().splitlines()) == 1


def test_a_failed_stage_says_so_and_the_error_passes() -> None:
    stages, out = plain()
    with pytest.raises(ValueError, match="boom"), stages.stage("Feast apply"):
        raise ValueError("boom")
    assert re.fullmatch(r"Feast apply: failed after \d+\.\ds\n", out.getvalue())


def test_every_prints_count_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    stages = Stages(Console(file=out, width=60), every=0.0)
    with stages.stage("pymk", 4, unit="members") as st:
        st.advance(2)
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"pymk: 2/4 members \(50%\), \d+\.\ds so far", lines[0]), lines
    assert lines[-1].startswith("pymk: 2/4 members (")


def test_disabled_stages_print_nothing_but_still_time() -> None:
    out = io.StringIO()
    stages = Stages(Console(file=out), enabled=False)
    with stages.stage("quiet", 2, unit="x") as st:
        st.advance(2)
        st.watch(lambda: 1)  # no thread for a silent stage
    assert out.getvalue() == "" and st.seconds >= 0 and st.completed == 2


def test_watch_reads_a_counter_that_cannot_report_itself() -> None:
    stages, out = plain()
    counter = [0]
    seen: list[float] = []
    with stages.stage("trees", 5, unit="trees") as st:
        st.watch(lambda: counter[0], every=0.01)
        for _ in range(5):
            counter[0] += 1
            deadline = time.monotonic() + 5
            while st.completed < counter[0] and time.monotonic() < deadline:
                time.sleep(0.005)
            seen.append(st.completed)
    assert seen == [1, 2, 3, 4, 5]
    assert not [t for t in threading.enumerate() if t.name == "progress-watch"]
    assert out.getvalue().startswith("trees: 5/5 trees (")


def test_a_terminal_gets_bars_that_end_in_the_same_line() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    stages = Stages(console)
    assert stages.live
    with stages.stage("Qdrant upsert", 2, unit="points") as st:
        st.advance(2)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert re.search(rf"✓ Qdrant upsert: 2/2 points {DURATION}", text), text
