"""Experiments and shadows through the real gateway: the variant's overrides are what
serves, every response is logged as an exposure, and shadows run without being served."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from inprocess import Suite, members_with_degree
from sklearn.linear_model import LogisticRegression

from edgeflow import metrics
from edgeflow.build.ranker import export_onnx
from edgeflow.experiments import records
from edgeflow.redis_client import connect
from edgeflow.scoring.registry import publish_model, published_versions
from edgeflow.v1 import gateway_pb2
from edgeflow.workflow.validate import load_workflow

CONSTANT_SCORE = 0.3


def _constant_model(features: list[str]) -> bytes:
    """A logistic regression that scores every row CONSTANT_SCORE, whatever its features."""
    model = LogisticRegression().fit(np.eye(2, len(features)), [0, 1])
    model.coef_[:] = 0.0
    model.intercept_[:] = np.log(CONSTANT_SCORE / (1 - CONSTANT_SCORE))
    return export_onnx(model, len(features))


def _write_surface(suite: Suite, surface: str, edit: Any) -> Path:
    wf_dir = suite.cfg.workflows_dir
    doc: dict[str, Any] = yaml.safe_load((wf_dir / "pymk.yaml").read_text())
    doc["metadata"]["name"] = doc["spec"]["surface"] = surface
    edit(doc["spec"])
    path = wf_dir / f"{surface}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def _served(suite: Suite, surface: str) -> None:
    for _ in range(100):
        listed = await suite.stub.ListSurfaces(gateway_pb2.ListSurfacesRequest(), timeout=5)
        if surface in listed.surfaces:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the gateway never loaded {surface}")


@pytest.fixture(scope="module")
def ab_surface(suite: Suite) -> Path:
    """pymk-ab: half the members on the trained ranker (v1), half on a constant v2."""
    card_path = next((suite.cfg.model_dir / "pymk-ranker").glob("v1/card.json"))
    card = json.loads(card_path.read_text())
    version = publish_model(
        suite.cfg.model_dir, "pymk-ranker", _constant_model(card["features"]), card
    )
    assert version == "v2", published_versions(suite.cfg.model_dir)

    def edit(spec: dict[str, Any]) -> None:
        next(n for n in spec["nodes"] if n["name"] == "rank")["params"]["version"] = "v1"
        spec["experiments"] = [
            {
                "name": "ranker-v2",
                "control": "v1",
                "variants": [
                    {"name": "v1", "weight": 50},
                    {"name": "v2", "weight": 50, "overrides": {"models": {"rank": "v2"}}},
                ],
            }
        ]

    return _write_surface(suite, "pymk-ab", edit)


async def test_variant_overrides_change_the_served_model(suite: Suite, ab_surface: Path) -> None:
    await _served(suite, "pymk-ab")
    wf = load_workflow(ab_surface)
    members = members_with_degree(suite.graph, 8)[:40]
    seen = set()
    for member in members:
        resp = await suite.recommend(member, k=20, surface="pymk-ab")
        assert not resp.partial, resp.degraded
        variant = wf.for_member(member)[1]
        assert [(a.experiment, a.variant) for a in resp.assignments] == list(variant)
        scores = {round(e.model_score, 4) for e in resp.edges}
        if variant == (("ranker-v2", "v2"),):
            assert scores == {CONSTANT_SCORE}
        else:
            assert len(scores) > 5  # the trained ranker tells candidates apart
        seen.add(variant)
        again = await suite.recommend(member, k=20, surface="pymk-ab")
        assert again.assignments == resp.assignments  # sticky
    assert seen == {(("ranker-v2", "v1"),), (("ranker-v2", "v2"),)}


async def test_every_response_is_logged_as_an_exposure(suite: Suite, ab_surface: Path) -> None:
    await _served(suite, "pymk-ab")
    member = members_with_degree(suite.graph, 8)[5]
    req = gateway_pb2.RecommendRequest(surface="pymk-ab", member=member, k=7, request_id="exp-1")
    resp = await suite.stub.Recommend(req, timeout=10)
    rds = connect(suite.cfg.redis_url)
    for _ in range(50):  # written in the background, within a few ms
        found = [
            records.Exposure.decode(f)
            for _, f in rds.xrange(records.EXPOSURES)
            if f[b"request_id"] == b"exp-1"
        ]
        if found:
            break
        await asyncio.sleep(0.05)
    (exposure,) = found
    assert exposure.member == member and exposure.surface == "pymk-ab"
    assert exposure.items == tuple(e.target for e in resp.edges)
    assert exposure.assignments == tuple((a.experiment, a.variant) for a in resp.assignments)
    assert exposure.assignments and not exposure.partial
    plain = await suite.recommend(member, k=3)  # a surface with no experiment is logged too
    for _ in range(50):
        last = records.Exposure.decode(rds.xrevrange(records.EXPOSURES, count=1)[0][1])
        if last.request_id == plain.request_id:
            break
        await asyncio.sleep(0.05)
    assert last.request_id == plain.request_id and last.assignments == ()


async def test_shadow_runs_but_is_never_served(suite: Suite) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["shadows"] = [
            {
                "name": "fof-only",
                "share": 1.0,
                "overrides": {
                    "params": {"fof": {"limit": 5}},
                    "nodes": [
                        {
                            "name": "features",
                            "op": "features.fetch",
                            "inputs": ["fof"],
                            "timeoutMs": 4000,
                        }
                    ],
                },
            }
        ]

    _write_surface(suite, "pymk-shadow", edit)
    await _served(suite, "pymk-shadow")
    member = members_with_degree(suite.graph, 8)[6]
    before = metrics.SHADOW_RUNS.labels("pymk-shadow", "fof-only", "compared")._value.get()
    served = await suite.recommend(member, k=15, surface="pymk-shadow")
    plain = await suite.recommend(member, k=15)
    # What is served is the workflow's own graph, exactly as the surface without a shadow.
    assert [e.target for e in served.edges] == [e.target for e in plain.edges]
    rds = connect(suite.cfg.redis_url)
    comparison = None
    for _ in range(100):
        for _, fields in rds.xrange(records.SHADOW):
            record = records.ShadowComparison.decode(fields)
            if record.request_id == served.request_id:
                comparison = record
        if comparison is not None:
            break
        await asyncio.sleep(0.05)
    assert comparison is not None, "no shadow comparison was recorded"
    assert comparison.shadow == "fof-only" and comparison.member == member
    assert comparison.served_items == tuple(e.target for e in served.edges)
    assert 0 < len(comparison.shadow_items) <= 5  # its own graph: at most 5 fof candidates
    assert comparison.overlap_at_k == records.overlap_at_k(
        comparison.served_items, comparison.shadow_items, 15
    )
    assert comparison.shadow_ms > 0
    after = metrics.SHADOW_RUNS.labels("pymk-shadow", "fof-only", "compared")._value.get()
    assert after == before + 1


async def test_outcomes_published_after_exposures_reach_the_report(
    suite: Suite, ab_surface: Path
) -> None:
    """Served through Recommend, accepted through Publish, counted by the report."""
    from edgeflow.experiments.report import report

    await _served(suite, "pymk-ab")
    wf = load_workflow(ab_surface)
    members = members_with_degree(suite.graph, 8)[40:60]
    accepted: dict[str, int] = {"v1": 0, "v2": 0}
    dismissed: dict[str, int] = {"v1": 0, "v2": 0}
    for i, member in enumerate(members):
        resp = await suite.recommend(member, k=10, surface="pymk-ab")
        variant = wf.for_member(member)[1][0][1]
        kind = gateway_pb2.MemberEvent.DISMISS if i % 4 == 0 else gateway_pb2.MemberEvent.CONNECT
        event = gateway_pb2.MemberEvent(type=kind, member=member, target=resp.edges[2].target)
        await suite.stub.Publish(gateway_pb2.PublishRequest(events=[event]), timeout=5)
        (dismissed if kind == gateway_pb2.MemberEvent.DISMISS else accepted)[variant] += 1
    rds = connect(suite.cfg.redis_url)
    result = None
    for _ in range(50):  # exposures are written in the background
        result = report(rds, "ranker-v2", control="v1")
        if sum(v.accepted + v.dismissed for v in result.variants) == len(members):
            break
        await asyncio.sleep(0.05)
    assert result is not None
    by_variant = {v.variant: v for v in result.variants}
    for name in ("v1", "v2"):
        assert by_variant[name].accepted == accepted[name]
        assert by_variant[name].dismissed == dismissed[name]
    assert by_variant["v1"].is_control and by_variant["v1"].lift == 0
