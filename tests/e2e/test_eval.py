"""`edgeflow eval` on the Facebook graph: the quality contract, end to end; and on a small
generated graph, repeated sessions on one Redis server and the same eval on a 3-master Redis
Cluster (its own file so that the test workers can run it beside the other long end-to-end
tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inprocess import small_eval

from edgeflow.cli.evaluate import recall_by_degree, still_shown
from edgeflow.graph import Graph

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
    # Recall per training-degree bucket; the buckets partition the members and their edges.
    buckets = result["recall_at_k_by_degree"]
    assert list(buckets) == ["0", "1-2", "3-9", "10-49", "50+"]
    assert sum(b["members"] for b in buckets.values()) == result["members"]
    assert sum(b["hidden_edges"] for b in buckets.values()) == result["hidden_edges_of_members"]
    assert all(0 <= b["recall_at_k"] <= 1 for b in buckets.values())
    # The candidate-recall ceiling: what each of pymk's sources returns, and no source does.
    ceiling = result["candidate_recall_ceiling"]
    assert set(ceiling["by_source"]) == {"fof", "ebr", "precomputed", "popular"}
    assert ceiling["failed_requests"] == 0
    assert max(ceiling["by_source"].values()) <= ceiling["any_source"] <= 1
    assert ceiling["no_source"] == pytest.approx(1 - ceiling["any_source"], abs=1e-5)
    assert result["recall_at_k"] <= ceiling["any_source"]  # nothing served comes from nowhere


def test_recall_by_degree_splits_members_by_training_degree() -> None:
    graph = Graph.from_edges(np.asarray([1, 1, 2]), np.asarray([2, 3, 3]),
                             members=np.asarray([1, 2, 3, 4, 5]))  # fmt: skip
    truth = {1: {4}, 4: {1, 5}, 5: {4}}
    recs = {1: [4], 4: [1, 3], 5: []}
    buckets = recall_by_degree(graph, recs, {1: [], 4: [5], 5: [4]}, truth)
    assert buckets["0"] == {"members": 2, "hidden_edges": 3, "recall_at_k": round(1 / 3, 5),
                            "baseline_adamic_adar_recall_at_k": round(2 / 3, 5)}  # fmt: skip
    assert buckets["1-2"] == {"members": 1, "hidden_edges": 1, "recall_at_k": 1.0,
                              "baseline_adamic_adar_recall_at_k": 0.0}  # fmt: skip
    assert buckets["50+"]["members"] == 0 and buckets["50+"]["recall_at_k"] == 0.0


@pytest.fixture(scope="module")
def sessions_eval(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`small_eval` with 7 sessions on one Redis server: its first session is a plain eval."""
    return small_eval(tmp_path_factory.mktemp("sessions"), "--sessions", "7")


def test_eval_sessions_measure_impressions(sessions_eval: dict[str, Any]) -> None:
    """Repeated sessions with no action: pymk's impressions (demote after 3 exposures,
    suppress after 6) change what session 4 and session 7 show, never session 1's recall."""
    result = sessions_eval
    sessions = result["repeat_sessions"]
    assert sessions["failed_requests_by_session"] == [0] * 7, result["failed_examples"]
    partial = sessions["partial_responses_by_session"]
    assert len(partial) == 7 and sum(partial) == result["partial_responses"], sessions
    assert sessions["sessions"] == 7
    assert sessions["session_1_recall_at_k"] == result["recall_at_k"]
    assert sessions["recall_at_k_by_session"][0] == result["recall_at_k"]
    shown = sessions["still_shown_by_session"]
    assert shown[:3] == [1.0, 1.0, 1.0]  # two exposures: nothing demoted yet
    assert shown[3] < 1.0  # demoted after 3
    assert sessions["still_shown_at_last_session"] == shown[6] < shown[3]  # suppressed after 6


def test_still_shown_is_the_share_of_the_first_sessions_edges() -> None:
    assert still_shown({1: [2, 3], 4: [5, 6]}, {1: [3, 9], 4: []}) == 0.25
    assert still_shown({}, {}) == 0.0


def test_eval_on_a_redis_cluster_gives_the_recall_of_one_server(
    sessions_eval: dict[str, Any], tmp_path: Path
) -> None:
    """The same split, training and members through `edgeflow eval` on one Redis server
    (the first of the sessions above: recommendations and the candidate ceiling are read
    before any later session) and on a 3-master cluster: the storage layout must not change
    a single recommendation."""
    one = sessions_eval
    three = small_eval(tmp_path, "--redis-cluster", "3")
    first = one["repeat_sessions"]
    assert first["partial_responses_by_session"][0] == 0, first
    assert first["failed_requests_by_session"][0] == 0, first
    assert three["partial_responses"] == 0 and three["failed_requests"] == 0, three
    same = (
        "recall_at_k",
        "baseline_adamic_adar_recall_at_k",
        "members",
        "hidden_edges_of_members",
        "recall_at_k_by_degree",
        "candidate_recall_ceiling",
    )
    assert {k: one[k] for k in same} == {k: three[k] for k in same}
