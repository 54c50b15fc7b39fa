"""`edgeflow eval` on a real 3-master Redis Cluster against one Redis server (a file of its
own, so that a test worker runs it beside the cluster's end-to-end test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from inprocess import small_eval

pytestmark = pytest.mark.e2e


def test_eval_on_a_redis_cluster_gives_the_recall_of_one_server(tmp_path: Path) -> None:
    """The same split, training and members through `edgeflow eval` on one Redis server and
    on a 3-master cluster: the storage layout must not change a single recommendation."""
    (tmp_path / "one").mkdir()
    (tmp_path / "three").mkdir()
    one = small_eval(tmp_path / "one")
    three = small_eval(tmp_path / "three", "--redis-cluster", "3")
    for report in (one, three):
        assert report["partial_responses"] == 0 and report["failed_requests"] == 0, report
    same = (
        "recall_at_k",
        "baseline_adamic_adar_recall_at_k",
        "members",
        "hidden_edges_of_members",
        "recall_at_k_by_degree",
        "candidate_recall_ceiling",
    )
    assert {k: one[k] for k in same} == {k: three[k] for k in same}
