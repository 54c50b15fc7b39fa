"""The candidate-recall ceiling of `edgeflow eval`: per source, any source and no source."""

from __future__ import annotations

from pathlib import Path

from edgeflow.cli.ceiling import candidate_requests, ceiling
from edgeflow.workflow.validate import load_workflow

REPO = Path(__file__).resolve().parents[2]


def test_ceiling_counts_each_source_their_union_and_what_no_source_returns() -> None:
    truth = {1: {10, 11, 12}, 2: {20}}
    found = {
        "fof": {1: {10, 11, 99}, 2: set()},
        "ebr": {1: {11, 12}, 2: {21}},
        "popular": {1: set()},  # a member a source never answered counts as nothing found
    }
    out = ceiling(found, truth, [1, 2])
    assert out["by_source"] == {"fof": 0.5, "ebr": 0.5, "popular": 0.0}
    assert out["any_source"] == 0.75 and out["no_source"] == 0.25


def test_ceiling_of_no_hidden_edges_is_zero_not_a_division_error() -> None:
    out = ceiling({"fof": {1: {2}}}, {1: set()}, [1])
    assert out == {"by_source": {"fof": 0.0}, "any_source": 0.0, "no_source": 0.0}


def test_candidate_requests_ask_each_source_as_the_gateway_does() -> None:
    wf = load_workflow(REPO / "workflows" / "pymk.yaml")
    reqs = candidate_requests(wf)
    assert set(reqs) == {"fof", "ebr", "precomputed", "popular"}
    fof = next(cn for cn in wf.nodes if cn.node.name == "fof")
    assert reqs["fof"].source == "graph" and reqs["fof"].limit == fof.params.limit  # type: ignore[attr-defined]
    assert reqs["fof"].params["weight"] == "adamic_adar"
    assert reqs["precomputed"].params["list"] == "pymk"
    assert "limit" not in reqs["ebr"].params and reqs["ebr"].member == 0
