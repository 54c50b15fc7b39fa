"""`edgeflow eval` on the Facebook graph: the quality contract, end to end (its own file so
that the test workers can run it beside the other long end-to-end tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_eval_on_facebook_beats_adamic_adar(facebook_edges: Path, tmp_path: Path) -> None:
    """Train on 90%, ask Recommend, compare with Adamic-Adar (eval starts its own suite)."""
    run = subprocess.run(
        [sys.executable, "-m", "edgeflow.cli.main", "eval", "--edges", str(facebook_edges),
         "--holdout", "0.1", "--k", "50", "--seed", "1", "--max-members", "400", "--json"],
        env=dict(os.environ, EDGEFLOW_HOME=str(tmp_path)), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    for key in ("recall_at_k", "baseline_adamic_adar_recall_at_k", "members", "k", "seconds"):
        assert key in result
    assert result["members"] == 400 and result["k"] == 50
    assert result["failed_requests"] == 0, result["failed_examples"]
    assert result["recall_at_k"] >= result["baseline_adamic_adar_recall_at_k"], result
