"""Experiments and shadows through the real gateway: the variant's overrides are what
serves, every response is logged as an exposure, and shadows run without being served."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from inprocess import Suite, members_with_degree
from prometheus_client import REGISTRY
from sklearn.linear_model import LogisticRegression

from edgeflow.build.ranker import export_onnx
from edgeflow.config import REPO_ROOT
from edgeflow.experiments import records
from edgeflow.scoring.registry import publish_model, published_versions
from edgeflow.shell import metrics
from edgeflow.stores import keys
from edgeflow.stores.redis_client import connect
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
    # pymk's impressions count every surface's exposures: none yet, so one more demotes none.
    connect(suite.cfg.redis_url).delete(keys.impressions(member))
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


# ---- a variant that names a model version the scoring service has not loaded ---------------
async def test_model_watch_trusts_only_a_scoring_service_that_has_loaded_its_models(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before it is SERVING, the scoring service answers ListModels with what it has loaded
    so far: nothing. That is not a problem to report; the check waits for it."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from edgeflow.gateway.models import SCORING_SERVICE, ModelWatch
    from edgeflow.shell.server import channel
    from edgeflow.v1 import scoring_pb2, scoring_pb2_grpc
    from edgeflow.workflow.validate import parse_document

    class Scoring(scoring_pb2_grpc.ScoringServiceServicer):
        versions: list[str] = []

        async def ListModels(
            self, request: scoring_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
        ) -> scoring_pb2.ListModelsResponse:
            models = [scoring_pb2.ModelInfo(name="pymk-ranker", version=v) for v in self.versions]
            return scoring_pb2.ListModelsResponse(models=models)

    caplog.set_level(logging.INFO, logger="edgeflow.gateway")
    scoring, health_servicer = Scoring(), health.aio.HealthServicer()
    server = grpc.aio.server()
    scoring_pb2_grpc.add_ScoringServiceServicer_to_server(scoring, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    addr = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    await health_servicer.set(SCORING_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    doc = yaml.safe_load((REPO_ROOT / "examples" / "pymk-ab.yaml").read_text())
    doc["spec"]["surface"] = surface = "pymk-ab-watch"
    workflows = {surface: parse_document(doc, "pymk-ab.yaml")}
    ch = channel(addr)
    watch = ModelWatch(ch, addr)
    try:
        await watch.refresh()
        watch.update(workflows)
        assert watch.available is None and watch.checks == {}
        assert "is not serving yet" in watch.error
        assert not watch.status(surface, workflows[surface]).models_checked

        await health_servicer.set(SCORING_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        scoring.versions = ["v1"]
        for _ in range(3):  # the same answer again and again: logged once
            await watch.refresh()
            watch.update(workflows)
        assert watch.error == "" and watch.checks[surface].reroutes == {("ranker-v2", "v2"): "v1"}
        status = watch.status(surface, workflows[surface])
        assert status.models_checked and len(status.problems) == 1
        labels = {"surface": surface, "experiment": "ranker-v2", "variant": "v2"}
        assert _sample("edgeflow_gateway_variant_rerouted", **labels) == 1

        scoring.versions = ["v1", "v2"]  # published later
        await watch.refresh()
        watch.update(workflows)
        assert watch.checks[surface].problems == () and not watch.checks[surface].routes
        assert _sample("edgeflow_gateway_variant_rerouted", **labels) is None
        assert _sample("edgeflow_gateway_model_problems", surface=surface) == 0

        watch.update({})  # the workflow is gone: so are its series
        assert _sample("edgeflow_gateway_model_problems", surface=surface) is None
    finally:
        await ch.close()
        await server.stop(None)
    mine = [(r.levelname, r.getMessage()) for r in caplog.records if surface in r.getMessage()]
    assert [level for level, _ in mine] == ["ERROR", "INFO"], mine
    assert "variant 'v2': node 'rank' field params.version" in mine[0][1]
    assert "every model reference is loaded now" in mine[1][1]
    waits = [r for r in caplog.records if "is not serving yet" in r.getMessage()]
    assert len(waits) == 1 and waits[0].levelname == "WARNING"


async def _status(
    suite: Suite, surface: str, ready: Callable[[gateway_pb2.SurfaceStatus], bool]
) -> gateway_pb2.SurfaceStatus:
    for _ in range(100):
        listed = await suite.stub.ListSurfaces(gateway_pb2.ListSurfacesRequest(), timeout=5)
        status = {s.surface: s for s in listed.statuses}.get(surface)
        if status is not None and status.models_checked and ready(status):
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"the gateway's status of {surface} never got there: {status}")


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_a_variant_naming_an_unloaded_model_is_served_control_loudly(
    suite: Suite, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Last in the module: it publishes a new ranker version (the newest, and constant)."""
    from edgeflow.cli.suite_cmd import print_workflows

    caplog.set_level(logging.INFO, logger="edgeflow.gateway")
    loaded = published_versions(suite.cfg.model_dir)["pymk-ranker"]
    missing = f"v{max(int(v[1:]) for v in loaded) + 1}"  # the version published next

    def edit(spec: dict[str, Any]) -> None:
        next(n for n in spec["nodes"] if n["name"] == "rank")["params"]["version"] = "v1"
        spec["experiments"] = [
            {
                "name": "ranker-next",
                "control": "v1",
                "variants": [
                    {"name": "v1", "weight": 50},
                    {"name": "next", "weight": 50, "overrides": {"models": {"rank": missing}}},
                ],
            }
        ]

    surface = "pymk-next"
    path = _write_surface(suite, surface, edit)
    status = await _status(suite, surface, lambda s: bool(s.problems))
    problem = (
        f"experiment 'ranker-next' variant 'next': node 'rank' field params.version: model "
        f"'pymk-ranker' has no version {missing!r} (it has {loaded})"
    )
    assert list(status.problems) == [problem] and status.check_error == ""
    assert [(r.experiment, r.variant, r.served) for r in status.reroutes] == [
        ("ranker-next", "next", "v1")
    ]
    assert _sample("edgeflow_gateway_model_problems", surface=surface) == 1
    labels = {"surface": surface, "experiment": "ranker-next", "variant": "next"}
    assert _sample("edgeflow_gateway_variant_rerouted", **labels) == 1
    counted = _sample("edgeflow_gateway_rerouted_requests_total", **labels) or 0.0

    # Members of `next` are served control, whole, and their responses say so.
    wf = load_workflow(path)
    members = members_with_degree(suite.graph, 8)[:30]
    moved = [m for m in members if wf.for_member(m)[1] == (("ranker-next", "next"),)]
    assert 0 < len(moved) < len(members)
    for member in members:
        resp = await suite.recommend(member, k=10, surface=surface, debug=True)
        assert not resp.partial, resp.degraded
        assert [(a.experiment, a.variant) for a in resp.assignments] == [("ranker-next", "v1")]
        assert {n.node: n.status for n in resp.funnel.nodes}["rank"] == "ok"
        assert len({round(e.model_score, 4) for e in resp.edges}) > 5  # the trained v1
        reroutes = [(r.experiment, r.variant, r.served) for r in resp.rerouted]
        assert reroutes == ([("ranker-next", "next", "v1")] if member in moved else [])
    # ... and their exposures record the variant that served them.
    req = gateway_pb2.RecommendRequest(surface=surface, member=moved[0], k=5, request_id="moved")
    await suite.stub.Recommend(req, timeout=10)
    rds = connect(suite.cfg.redis_url)
    found: list[records.Exposure] = []
    for _ in range(50):
        found = [records.Exposure.decode(f) for _, f in rds.xrange(records.EXPOSURES)
                 if f[b"request_id"] == b"moved"]  # fmt: skip
        if found:
            break
        await asyncio.sleep(0.05)
    assert [e.assignments for e in found] == [(("ranker-next", "v1"),)]
    after = _sample("edgeflow_gateway_rerouted_requests_total", **labels)
    assert after == counted + len(moved) + 1

    # Logged once: not per request, nor per reload of the (unchanged) workflows.
    path.write_text(path.read_text())
    await asyncio.sleep(1.0)  # a few reload intervals
    logged = [r.getMessage() for r in caplog.records if surface in r.getMessage()]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and surface in r.getMessage()]
    assert len(errors) == 1, logged
    assert problem in errors[0].getMessage()
    assert "members of experiment 'ranker-next' variant 'next' are served variant 'v1'" in (
        errors[0].getMessage()
    )

    # edgeflow status lists it under the surface.
    await asyncio.to_thread(print_workflows, f"127.0.0.1:{suite.gateway_port}")
    out = capsys.readouterr().out
    lines = out.splitlines()
    line = next(i for i, text in enumerate(lines) if text.strip().startswith(surface))
    assert "PROBLEM: 1 model reference not loaded by scoring" in lines[line]
    assert lines[line + 1].strip() == f"- {problem}"
    assert "members of ranker-next=next are served ranker-next=v1 (its control)" in lines[line + 2]
    assert any(text.split() == ["pymk", "ok"] for text in lines), out

    # Published later: the problem clears and `next` serves the new version.
    card = json.loads((suite.cfg.model_dir / "pymk-ranker" / "v1" / "card.json").read_text())
    version = publish_model(
        suite.cfg.model_dir, "pymk-ranker", _constant_model(card["features"]), card
    )
    assert version == missing
    status = await _status(suite, surface, lambda s: not s.problems)
    assert not status.reroutes
    assert _sample("edgeflow_gateway_model_problems", surface=surface) == 0
    assert _sample("edgeflow_gateway_variant_rerouted", **labels) is None
    assert any(
        r.levelno == logging.INFO and surface in r.getMessage() and "loaded now" in r.getMessage()
        for r in caplog.records
    )
    resp = await suite.recommend(moved[0], k=10, surface=surface)
    assert not resp.partial and not resp.rerouted
    assert [(a.experiment, a.variant) for a in resp.assignments] == [("ranker-next", "next")]
    assert {round(e.model_score, 4) for e in resp.edges} == {CONSTANT_SCORE}
