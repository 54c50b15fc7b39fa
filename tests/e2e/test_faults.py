"""The fault suite: each process of a running suite (`edgeflow quickstart`, supervised) is
killed under load (benchmarks/faults.py, small), and callers must not notice much."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeflow.config import REPO_ROOT

pytestmark = pytest.mark.e2e

BACKENDS = ("candidates", "features", "scoring", "merging", "nearline")


def test_no_single_fault_takes_the_surface_down(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "faults.py"), "--members", "500",
         "--rate", "20", "--before", "0.5", "--after", "5.0", "--settle", "0.5",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["fault"]: r for r in json.loads(out.read_text())["faults"]}
    assert set(rows) == {*BACKENDS, "redis"}
    for row in rows.values():
        assert row["requests"] >= 100, row  # so that 1% is a share, not "none at all"
        assert row["blocked_shown"] == 0, row  # a block holds through every fault
        assert row["recovery_s"] is not None, row  # the supervisor started it again
    # Served, partially where a fallback stood in, never failed.
    for name in BACKENDS:
        row = rows[name]
        assert row["failed_share"] <= 0.01, (name, row["failed"], row["requests"], row["codes"])
    assert rows["redis"]["events_acked"] > 0 and rows["redis"]["events_lost"] == 0
