"""The whole online path in one process: the five services on real grpc.aio servers, a real
Redis, a real Feast repo, Qdrant local mode and a trained ONNX ranker (the `suite` fixture in
conftest.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from inprocess import Suite, members_with_degree
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from edgeflow.shell import tracing
from edgeflow.shell.server import channel, start_server
from edgeflow.stores import keys, lists
from edgeflow.stores.redis_client import connect
from edgeflow.v1 import gateway_pb2
from edgeflow.v1.gateway_pb2_grpc import RecommenderStub


async def test_recommend_ranks_new_members_with_provenance(suite: Suite) -> None:
    member = members_with_degree(suite.graph, 8)[0]
    resp = await suite.recommend(member, k=15)
    assert not resp.partial and list(resp.degraded) == []
    assert len(resp.edges) == 15
    i = suite.graph.index_of(member)
    connected = set(suite.graph.ids[suite.graph.neighbors(i)].tolist())
    targets = [e.target for e in resp.edges]
    assert len(set(targets)) == 15
    assert member not in targets and not connected.intersection(targets)
    scores = [e.score for e in resp.edges]
    assert scores == sorted(scores, reverse=True)
    for edge in resp.edges:
        assert edge.provenance, edge
        assert {p.source for p in edge.provenance} <= {"fof", "ebr", "precomputed", "popular"}
        assert 0.0 <= edge.model_score <= 1.0
    assert resp.surface == "pymk" and resp.workflow == "pymk" and resp.request_id


async def test_every_served_edge_carries_its_mutual_connections(suite: Suite) -> None:
    g = suite.graph
    member = members_with_degree(g, 8)[4]
    mine = set(g.ids[g.neighbors(g.index_of(member))].tolist())
    resp = await suite.recommend(member, k=30)
    assert len(resp.edges) == 30
    for edge in resp.edges:
        shared = sorted(mine & set(g.ids[g.neighbors(g.index_of(edge.target))].tolist()))
        assert edge.HasField("social_proof")
        assert edge.social_proof.mutual_count == len(shared)
        assert list(edge.social_proof.mutual_ids) == shared[:3]
    assert any(e.social_proof.mutual_count > 3 for e in resp.edges)  # counted, not just named


async def test_debug_funnel(suite: Suite) -> None:
    member = members_with_degree(suite.graph, 8)[1]
    resp = await suite.recommend(member, k=5, debug=True)
    nodes = {n.node: n for n in resp.funnel.nodes}
    assert list(nodes) == ["fof", "ebr", "precomputed", "popular", "features", "rank", "blend"]
    assert all(n.status == "ok" for n in nodes.values())
    assert nodes["features"].items_in == sum(
        nodes[s].items_out for s in ("fof", "ebr", "precomputed")
    )
    assert nodes["rank"].items_in == nodes["features"].items_out == nodes["rank"].items_out
    assert nodes["blend"].items_out == 5
    assert nodes["fof"].items_out > 0 and nodes["ebr"].items_out > 0
    assert resp.funnel.total_ms >= max(n.start_ms + n.duration_ms for n in nodes.values()) * 0.5
    plain = await suite.recommend(member, k=5)
    assert not plain.HasField("funnel")


@pytest.mark.parametrize(
    ("surface", "member", "k", "code", "text"),
    [
        ("pymk", 10**12, 10, grpc.StatusCode.NOT_FOUND, "10000000000"),
        ("pymk", 1, 0, grpc.StatusCode.INVALID_ARGUMENT, "k: must be between 1 and 500"),
        ("pymk", 1, 501, grpc.StatusCode.INVALID_ARGUMENT, "k: must be between 1 and 500"),
        ("nope", 1, 10, grpc.StatusCode.INVALID_ARGUMENT, "unknown surface 'nope'"),
        ("pymk", -4, 10, grpc.StatusCode.INVALID_ARGUMENT, "member: must be >= 0"),
    ],
)
async def test_bad_requests(
    suite: Suite, surface: str, member: int, k: int, code: grpc.StatusCode, text: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await suite.recommend(member, k=k, surface=surface)
    assert err.value.code() == code
    assert text in (err.value.details() or "")


async def test_precomputed_list_is_served_and_blocks_apply_at_once(suite: Suite) -> None:
    g = suite.graph
    member = members_with_degree(g, 8)[2]
    i = g.index_of(member)
    far = [int(m) for m in g.ids if m != member and m not in set(g.ids[g.neighbors(i)].tolist())]
    picked = far[-1]
    rds = connect(suite.cfg.redis_url)
    lists.write_lists(
        rds, "pymk", np.asarray([member]), [(np.asarray([picked]), np.asarray([0.9], np.float32))]
    )
    resp = await suite.recommend(member, k=500)
    edge = next(e for e in resp.edges if e.target == picked)
    prov = {p.source: p for p in edge.provenance}
    assert prov["precomputed"].mode == "offline"
    assert prov["precomputed"].score == pytest.approx(0.9)

    rds.sadd(keys.blocked(member), picked)
    resp = await suite.recommend(member, k=500, debug=True)
    assert picked not in [e.target for e in resp.edges]
    assert resp.funnel.dropped["blocked"] >= 1
    rds.delete(keys.blocked(member))


async def test_one_trace_spans_every_service(suite: Suite, spans: InMemorySpanExporter) -> None:
    spans.clear()
    member = members_with_degree(suite.graph, 8)[3]
    await suite.recommend(member, k=5)
    finished = spans.get_finished_spans()
    root = next(s for s in finished if s.name == "edgeflow.v1.Recommender/Recommend")
    tree = [s for s in finished if s.context.trace_id == root.context.trace_id]
    names = [s.name for s in tree]
    for rpc in ("CandidateService/GenerateMany", "FeatureService/GetFeatures",
                "ScoringService/Score", "MergingService/Merge"):  # fmt: skip
        assert f"edgeflow.v1.{rpc}" in names, names
    by_id = {s.context.span_id: s for s in tree}
    for span in tree:
        if span is root:
            continue
        assert span.parent is not None and span.parent.span_id in by_id, span.name
    score = next(s for s in tree if s.name == "edgeflow.v1.ScoringService/Score")
    assert by_id[score.parent.span_id].name == "node rank"  # type: ignore[union-attr]
    assert by_id[by_id[score.parent.span_id].parent.span_id] is root  # type: ignore[union-attr]


async def test_missing_model_is_named_and_candidates_still_served(suite: Suite) -> None:
    member = members_with_degree(suite.graph, 8)[7]
    resp = await suite.recommend(member, k=10, surface="pymk-nomodel")
    assert resp.partial and len(resp.edges) == 10
    [line] = resp.degraded
    assert line.startswith("rank: NOT_FOUND") and "no-such-model" in line
    assert all(e.model_score == 0.0 for e in resp.edges)


async def _statuses(
    suite: Suite,
) -> tuple[gateway_pb2.ListSurfacesResponse, dict[str, gateway_pb2.SurfaceStatus]]:
    listed = await suite.stub.ListSurfaces(gateway_pb2.ListSurfacesRequest(), timeout=5)
    return listed, {s.surface: s for s in listed.statuses}


async def test_status_names_a_surface_whose_model_is_not_loaded(
    suite: Suite, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeflow.cli.suite_cmd import print_workflows

    listed, statuses = await _statuses(suite)
    assert [s.surface for s in listed.statuses] == list(listed.surfaces)
    assert statuses["pymk"].models_checked and not statuses["pymk"].problems
    nomodel = statuses["pymk-nomodel"]
    problem = (
        "node 'rank' field params.model: no model 'no-such-model' in the registry "
        "(it has ['pymk-ranker'])"
    )
    assert nomodel.models_checked and list(nomodel.problems) == [problem]
    assert not nomodel.reroutes  # nothing better to serve: its rank node falls back
    problems = "edgeflow_gateway_model_problems"
    assert REGISTRY.get_sample_value(problems, {"surface": "pymk-nomodel"}) == 1
    assert REGISTRY.get_sample_value(problems, {"surface": "pymk"}) == 0

    # A workflow file the gateway refuses is listed too, until it is gone.
    bad = suite.cfg.workflows_dir / "zz-bad.yaml"
    bad.write_text("spec: {surface: zz-bad, nodes: [], output: nope}\n")
    try:
        for _ in range(100):
            listed, _ = await _statuses(suite)
            if listed.rejected:
                break
            await asyncio.sleep(0.1)
        [rejected] = listed.rejected
        assert rejected.startswith(f"{bad}: invalid workflow") and "metadata.name" in rejected
        assert "pymk" in listed.surfaces  # the others keep serving
        await asyncio.to_thread(print_workflows, f"127.0.0.1:{suite.gateway_port}")
    finally:
        bad.unlink()
    out = capsys.readouterr().out.splitlines()
    line = next(i for i, text in enumerate(out) if text.strip().startswith("pymk-nomodel"))
    assert " ".join(out[line].split()[1:]) == "PROBLEM: 1 model reference not loaded by scoring"
    assert out[line + 1].strip() == f"- {problem}"
    assert any(text.startswith(f"  REJECTED {bad}: invalid workflow") for text in out), out
    for _ in range(100):
        listed, _ = await _statuses(suite)
        if not listed.rejected:
            break
        await asyncio.sleep(0.1)
    assert not listed.rejected


async def test_node_timeout_gives_marked_partial_response(suite: Suite) -> None:
    member = members_with_degree(suite.graph, 8)[4]
    rds = connect(suite.cfg.redis_url)
    rds.execute_command("CLIENT", "PAUSE", 600, "ALL")  # the features read stalls past 100 ms
    resp = await suite.recommend(member, k=10, surface="pymk-slow", debug=True)
    assert resp.partial
    nodes = {n.node: n for n in resp.funnel.nodes}
    assert nodes["features"].status == "fallback" and "timed out" in nodes["features"].error
    assert nodes["rank"].status == "fallback"
    assert any(d.startswith("features: timed out") for d in resp.degraded)
    assert len(resp.edges) == 10  # ranked by source scores, still filtered
    i = suite.graph.index_of(member)
    assert not set(suite.graph.ids[suite.graph.neighbors(i)].tolist()) & {
        e.target for e in resp.edges
    }


async def test_scoring_down_falls_back_to_source_scores(suite: Suite) -> None:
    svc, server, port = suite.servers["scoring"]
    await server.stop(None)
    try:
        member = members_with_degree(suite.graph, 8)[5]
        resp = await suite.recommend(member, k=10)
        assert resp.partial and len(resp.edges) == 10
        assert any(d.startswith("rank: UNAVAILABLE") for d in resp.degraded), resp.degraded
        for _ in range(100):  # the model check cannot ask it either: its last result stands
            _, statuses = await _statuses(suite)
            if statuses["pymk-nomodel"].check_error:
                break
            await asyncio.sleep(0.1)
        nomodel = statuses["pymk-nomodel"]
        assert "UNAVAILABLE" in nomodel.check_error and f":{port}" in nomodel.check_error
        assert nomodel.models_checked and len(nomodel.problems) == 1
    finally:
        server, _, _ = await start_server(svc, f"127.0.0.1:{port}")
        suite.servers["scoring"] = (svc, server, port)
    for _ in range(50):  # the gateway reconnects on its own once scoring is back
        resp = await suite.recommend(member, k=10)
        if not resp.partial:
            break
        await asyncio.sleep(0.1)
    assert not resp.partial, resp.degraded
    for _ in range(50):
        _, statuses = await _statuses(suite)
        if not statuses["pymk-nomodel"].check_error:
            break
        await asyncio.sleep(0.1)
    assert statuses["pymk-nomodel"].check_error == ""


async def test_engine_falls_back_to_generate_on_an_older_candidates_service(
    suite: Suite,
) -> None:
    """A candidates service without GenerateMany (mid-upgrade) still serves every source."""
    from edgeflow.candidates.service import CandidatesService
    from edgeflow.gateway.engine import Clients, Engine
    from edgeflow.v1 import (
        candidates_pb2,
        candidates_pb2_grpc,
    )
    from edgeflow.workflow.validate import load_workflow

    current = suite.servers["candidates"][0]
    assert isinstance(current, CandidatesService)

    class OnlyGenerate(candidates_pb2_grpc.CandidateServiceServicer):
        async def Generate(
            self, request: candidates_pb2.GenerateRequest, context: grpc.aio.ServicerContext
        ) -> candidates_pb2.GenerateResponse:
            return await current.generate(request)

    # The server shell's handler wrapper: it turns a RequestError into the call's status.
    server = grpc.aio.server(interceptors=[tracing.ServerTracing("candidates")])
    candidates_pb2_grpc.add_CandidateServiceServicer_to_server(OnlyGenerate(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    chans = [channel(a) for a in (f"127.0.0.1:{port}", suite.cfg.features_addr,
                                  suite.cfg.scoring_addr, suite.cfg.merging_addr)]  # fmt: skip
    engine = Engine(Clients.over(*chans))
    try:
        wf = load_workflow(suite.cfg.workflows_dir / "pymk.yaml")
        member = members_with_degree(suite.graph, 8)[9]
        outcome = await engine.run(wf, member, 10, 5.0)
        assert not outcome.partial, outcome.degraded
        served = await suite.recommend(member, k=10)
        assert [e.target for e in outcome.frame.edges] == [e.target for e in served.edges]
        assert {t.node: t.items_out for t in outcome.traces}["fof"] > 0
        assert not engine._many  # it stopped asking for GenerateMany
    finally:
        await engine.close()
        for ch in chans:
            await ch.close()
        await server.stop(None)


async def test_no_candidate_source_answering_is_unavailable_not_an_empty_ok(
    suite: Suite,
) -> None:
    """With the candidates service unreachable every source falls back to nothing: the
    request fails UNAVAILABLE naming each source, rather than answering OK with no edges."""
    from edgeflow.gateway.engine import Clients, Engine, NoCandidates
    from edgeflow.local.ports import free_port
    from edgeflow.workflow.validate import load_workflow

    chans = [channel(a) for a in (f"127.0.0.1:{free_port()}", suite.cfg.features_addr,
                                  suite.cfg.scoring_addr, suite.cfg.merging_addr)]  # fmt: skip
    engine = Engine(Clients.over(*chans))
    try:
        wf = load_workflow(suite.cfg.workflows_dir / "pymk.yaml")
        member = members_with_degree(suite.graph, 8)[3]
        with pytest.raises(NoCandidates) as info:
            await engine.run(wf, member, 10, 5.0)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        sources = [cn.node.name for cn in wf.nodes if cn.node.op.startswith("candidates.")]
        assert len(sources) >= 2
        for name in sources:
            assert f"{name}: " in str(info.value), (name, str(info.value))
    finally:
        await engine.close()
        for ch in chans:
            await ch.close()
    # The same member through the gateway, whose candidates service is up: served in full.
    served = await suite.recommend(members_with_degree(suite.graph, 8)[3], k=10)
    assert served.edges and not served.partial


async def _serve(add: Callable[[Any, grpc.aio.Server], None], servicer: Any) -> tuple[Any, int]:
    """A bare gRPC server for `servicer` on a free loopback port, started."""
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _with_a_precomputed_list(suite: Suite, nth: int) -> tuple[int, list[int]]:
    """The nth member of degree 8, given a pymk list of three members it does not know."""
    g = suite.graph
    member = members_with_degree(g, 8)[nth]
    near = set(g.ids[g.neighbors(g.index_of(member))].tolist()) | {member}
    picked = [int(m) for m in g.ids if int(m) not in near][:3]
    rds = connect(suite.cfg.redis_url)
    lists.write_lists(rds, "pymk", np.asarray([member]),
                      [(np.asarray(picked), np.asarray([0.9, 0.8, 0.7], np.float32))])  # fmt: skip
    rds.close()
    return member, picked


async def test_with_candidates_down_the_gateway_serves_the_precomputed_list(
    suite: Suite,
) -> None:
    """The gateway reads a precomputed source's list from Redis itself when the candidates
    service is unreachable; the other sources fall back, and the answer says so."""
    from edgeflow.candidates.service import ListsOnly
    from edgeflow.gateway.engine import Clients, Engine
    from edgeflow.local.ports import free_port
    from edgeflow.workflow.validate import load_workflow

    member, picked = _with_a_precomputed_list(suite, 5)
    local = ListsOnly(suite.cfg)
    chans = [channel(a) for a in (f"127.0.0.1:{free_port()}", suite.cfg.features_addr,
                                  suite.cfg.scoring_addr, suite.cfg.merging_addr)]  # fmt: skip
    engine = Engine(Clients.over(*chans), local_candidates=local)
    try:
        wf = load_workflow(suite.cfg.workflows_dir / "pymk.yaml")
        outcome = await engine.run(wf, member, 10, 5.0)
        assert sorted(e.target for e in outcome.frame.edges) == sorted(picked)
        assert outcome.partial
        traces = {t.node: t for t in outcome.traces}
        pre = next(t for t in outcome.traces if t.op == "candidates.precomputed")
        assert (pre.status, pre.fallback) == ("fallback", "local"), pre
        assert pre.error.startswith("candidates UNAVAILABLE")
        others = [t for t in traces.values()
                  if t.op.startswith("candidates.") and t is not pre]  # fmt: skip
        assert others and all(t.status == "fallback" and t.items_out == 0 for t in others)
    finally:
        await engine.close()
        for ch in chans:
            await ch.close()
        await local.close()


@pytest.mark.parametrize(("read_s", "served"), [(0.06, True), (0.7, False)])
async def test_with_candidates_down_a_slow_list_read_may_take_half_the_budget(
    suite: Suite, read_s: float, served: bool
) -> None:
    """With the candidates service down, the gateway's list read is the surface's only
    source: it may take longer than its node's 20 ms, up to half the request's remaining
    budget (1 s here), and no longer."""
    from edgeflow.candidates.service import ListsOnly
    from edgeflow.gateway.engine import Clients, Engine, NodeFailed
    from edgeflow.local.ports import free_port
    from edgeflow.workflow.validate import parse_document

    member, picked = _with_a_precomputed_list(suite, 5)
    local = ListsOnly(suite.cfg)
    read = local.generate

    async def slow(request: Any) -> Any:  # a gateway starved of CPU, say
        await asyncio.sleep(read_s)
        return await read(request)

    local.generate = slow  # type: ignore[method-assign]
    chans = [channel(a) for a in (f"127.0.0.1:{free_port()}", suite.cfg.features_addr,
                                  suite.cfg.scoring_addr, suite.cfg.merging_addr)]  # fmt: skip
    engine = Engine(Clients.over(*chans), local_candidates=local)
    try:
        doc = yaml.safe_load((suite.cfg.workflows_dir / "pymk.yaml").read_text())
        for node in doc["spec"]["nodes"]:
            if node["name"] == "precomputed":
                node["timeoutMs"] = 20
        wf = parse_document(doc, "pymk.yaml, precomputed timeout 20 ms")
        if served:
            outcome = await engine.run(wf, member, 10, 1.0)
            assert sorted(e.target for e in outcome.frame.edges) == sorted(picked)
        else:
            with pytest.raises(NodeFailed, match="no candidates"):
                await engine.run(wf, member, 10, 1.0)
    finally:
        await engine.close()
        for ch in chans:
            await ch.close()
        await local.close()


async def test_a_stalled_candidates_service_still_yields_the_precomputed_list(
    suite: Suite,
) -> None:
    """A candidates service that is up but answers nothing within the nodes' timeouts: the
    gateway reads the precomputed list itself, as when the service is down."""
    from edgeflow.candidates.service import ListsOnly
    from edgeflow.gateway.engine import Clients, Engine
    from edgeflow.v1 import candidates_pb2_grpc
    from edgeflow.workflow.validate import parse_document

    class Stalled(candidates_pb2_grpc.CandidateServiceServicer):
        async def Generate(self, request: Any, context: Any) -> Any:
            await asyncio.sleep(30)

        async def GenerateMany(self, request: Any, context: Any) -> Any:
            await asyncio.sleep(30)

    server, port = await _serve(candidates_pb2_grpc.add_CandidateServiceServicer_to_server,
                                Stalled())  # fmt: skip
    member, picked = _with_a_precomputed_list(suite, 7)
    local = ListsOnly(suite.cfg)
    chans = [channel(a) for a in (f"127.0.0.1:{port}", suite.cfg.features_addr,
                                  suite.cfg.scoring_addr, suite.cfg.merging_addr)]  # fmt: skip
    engine = Engine(Clients.over(*chans), local_candidates=local)
    doc = yaml.safe_load((suite.cfg.workflows_dir / "pymk.yaml").read_text())
    for node in doc["spec"]["nodes"]:
        if node["op"].startswith("candidates."):
            node["timeoutMs"] = 50
    try:
        wf = parse_document(doc, "pymk.yaml, candidate timeouts 50 ms")
        outcome = await engine.run(wf, member, 10, 5.0)
        assert sorted(e.target for e in outcome.frame.edges) == sorted(picked)
        pre = next(t for t in outcome.traces if t.op == "candidates.precomputed")
        assert (pre.status, pre.fallback) == ("fallback", "local"), pre
        assert pre.error.startswith("candidates DEADLINE_EXCEEDED"), pre.error
    finally:
        await engine.close()
        for ch in chans:
            await ch.close()
        await local.close()
        await server.stop(None)


async def test_with_merging_down_the_gateway_merges_and_filters_itself(suite: Suite) -> None:
    """An unreachable merging service: the gateway runs merging's own blend and visibility
    filters in process, so the answer is the same, a block is still honoured, and the
    response says what happened."""
    import redis as redis_sync

    from edgeflow.gateway.engine import Clients, Engine
    from edgeflow.local.ports import free_port
    from edgeflow.merging.service import MergingService
    from edgeflow.stores import keys
    from edgeflow.workflow.validate import load_workflow

    member = members_with_degree(suite.graph, 8)[4]
    rds = redis_sync.Redis.from_url(suite.redis.url)
    # Earlier tests' requests for this member demote what they showed it three times; one
    # more exposure (this request's) must not move an item across that line between the two.
    rds.delete(keys.impressions(member))
    served = await suite.recommend(member, k=10)
    blocked = served.edges[0].target
    local = MergingService(suite.cfg)
    await local.start()
    chans = [channel(a) for a in (suite.cfg.candidates_addr, suite.cfg.features_addr,
                                  suite.cfg.scoring_addr, f"127.0.0.1:{free_port()}")]  # fmt: skip
    engine = Engine(Clients.over(*chans), local_merging=local)
    try:
        wf = load_workflow(suite.cfg.workflows_dir / "pymk.yaml")
        outcome = await engine.run(wf, member, 10, 5.0)
        assert [e.target for e in outcome.frame.edges] == [e.target for e in served.edges]
        assert outcome.partial
        assert any(d.startswith("blend: merging UNAVAILABLE") and d.endswith("(fallback: local)")
                   for d in outcome.degraded), outcome.degraded  # fmt: skip
        blend = next(t for t in outcome.traces if t.node == "blend")
        assert (blend.status, blend.fallback) == ("fallback", "local")

        rds.sadd(keys.blocked(member), blocked)
        again = await engine.run(wf, member, 10, 5.0)
        assert blocked not in [e.target for e in again.frame.edges]
        assert len(again.frame.edges) == 10
    finally:
        rds.srem(keys.blocked(member), blocked)
        rds.close()
        await engine.close()
        for ch in chans:
            await ch.close()
        await local.stop()


async def test_a_merging_service_too_slow_for_its_timeout_is_stood_in_for_while_budget_lasts(
    suite: Suite, tmp_path: Path
) -> None:
    """A merging service that is up but does not answer within the blend's timeout (a starved
    process): the gateway blends in process if the request's budget has time left, and the
    answer says so; without time left, the request fails DEADLINE_EXCEEDED naming the node."""
    from edgeflow.gateway.engine import Clients, Engine, NodeFailed
    from edgeflow.merging.service import MergingService
    from edgeflow.v1 import merging_pb2_grpc
    from edgeflow.workflow.validate import load_workflow

    class Stalled(merging_pb2_grpc.MergingServiceServicer):
        async def Merge(self, request: Any, context: Any) -> Any:
            await asyncio.sleep(30)

    server, port = await _serve(merging_pb2_grpc.add_MergingServiceServicer_to_server, Stalled())
    member = members_with_degree(suite.graph, 8)[6]
    local = MergingService(suite.cfg, graph=False)
    await local.start()
    chans = [channel(a) for a in (suite.cfg.candidates_addr, suite.cfg.features_addr,
                                  suite.cfg.scoring_addr, f"127.0.0.1:{port}")]  # fmt: skip
    engine = Engine(Clients.over(*chans), local_merging=local)
    try:
        doc = yaml.safe_load((suite.cfg.workflows_dir / "pymk.yaml").read_text())
        [blend] = [n for n in doc["spec"]["nodes"] if n["name"] == "blend"]

        def with_blend_timeout(ms: int) -> Any:
            blend["timeoutMs"] = ms
            (tmp_path / "pymk.yaml").write_text(yaml.safe_dump(doc))
            return load_workflow(tmp_path / "pymk.yaml")

        outcome = await engine.run(with_blend_timeout(40), member, 10, 5.0)
        assert len(outcome.frame.edges) == 10 and outcome.partial
        assert any(
            d.startswith("blend: merging DEADLINE_EXCEEDED") and d.endswith("(fallback: local)")
            for d in outcome.degraded
        ), outcome.degraded
        # The blend may wait out the whole budget: nothing is left to run it here.
        with pytest.raises(NodeFailed) as err:
            await engine.run(with_blend_timeout(60_000), member, 10, 0.5)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "blend" in str(err.value)
    finally:
        await engine.close()
        for ch in chans:
            await ch.close()
        await local.stop()
        await server.stop(None)


# ---- bad input gets a clear error and costs nothing ----------------------------------------
def _service_descriptors() -> dict[str, list[Any]]:
    from edgeflow.v1 import (
        candidates_pb2,
        features_pb2,
        merging_pb2,
        scoring_pb2,
    )
    from edgeflow.v1.inference import grpc_predict_v2_pb2

    return {
        "gateway": [gateway_pb2.DESCRIPTOR.services_by_name["Recommender"]],
        "candidates": [candidates_pb2.DESCRIPTOR.services_by_name["CandidateService"]],
        "features": [features_pb2.DESCRIPTOR.services_by_name["FeatureService"]],
        "scoring": [
            scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"],
            grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        ],
        "merging": [merging_pb2.DESCRIPTOR.services_by_name["MergingService"]],
    }


def _methods(suite: Suite) -> list[tuple[int, str, Any]]:
    """(port, /service/method, request descriptor) for every method of every service."""
    out = []
    for name, services in _service_descriptors().items():
        port = suite.servers[name][2]
        for service in services:
            for method in service.methods:
                out.append((port, f"/{service.full_name}/{method.name}", method.input_type))
    return out


async def test_undecodable_requests_to_any_method_are_invalid_argument_without_tracebacks(
    suite: Suite, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    truncated = b"\x0a\x7f" + b"\x01" * 5  # field 1, 127 bytes long, then 5 bytes
    bad_utf8 = b"\x0a\x02\xff\xfe"  # RecommendRequest.surface holding bytes that are not UTF-8
    calls = 0
    for port, method, _ in _methods(suite):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ch.unary_unary(method)(truncated, timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
                calls += 1
    async with grpc.aio.insecure_channel(f"127.0.0.1:{suite.gateway_port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/edgeflow.v1.Recommender/Recommend")(bad_utf8, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                if method.endswith("Check"):
                    await ch.unary_unary(method)(truncated, timeout=10)
                else:
                    async for _ in ch.unary_stream(method)(truncated, timeout=10):
                        pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method

        async def one() -> AsyncIterator[bytes]:
            yield truncated

        reflection = ch.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in reflection(one(), timeout=10):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert calls > 50
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    logged = [r for r in caplog.records if "undecodable request" in r.getMessage()]
    assert len(logged) <= len(suite.servers)  # at most one line per server per interval


def _string_fields(desc: Any, depth: int = 0) -> list[tuple[str, Callable[[Any, str], None]]]:
    """(expected field path, how to put a value there) for every string field a request
    type can carry, map keys included, down to a few levels."""
    from google.protobuf.descriptor import FieldDescriptor

    out: list[tuple[str, Callable[[Any, str], None]]] = []
    for fd in desc.fields:
        name = fd.name
        if fd.type == FieldDescriptor.TYPE_STRING:
            if fd.is_repeated:
                out.append((f"{name}[0]", lambda m, v, n=name: getattr(m, n).append(v)))
            else:
                out.append((name, lambda m, v, n=name: setattr(m, n, v)))
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and depth < 3:
            sub = fd.message_type
            if sub.GetOptions().map_entry:
                key, value = sub.fields_by_name["key"], sub.fields_by_name["value"]
                if key.type == FieldDescriptor.TYPE_STRING:

                    def set_key(m: Any, v: str, n: str = name, value: Any = value) -> None:
                        if value.type == FieldDescriptor.TYPE_MESSAGE:
                            getattr(m, n)[v].SetInParent()
                        else:
                            getattr(m, n)[v] = value.default_value

                    out.append((f"{name} (a key)", set_key))
                if value.type == FieldDescriptor.TYPE_STRING:

                    def set_value(m: Any, v: str, n: str = name) -> None:
                        getattr(m, n)["k"] = v

                    out.append((f"{name}['k']", set_value))
                continue
            for path, put in _string_fields(sub, depth + 1):
                if fd.is_repeated:
                    out.append((f"{name}[0].{path}",
                                lambda m, v, n=name, p=put: p(getattr(m, n).add(), v)))  # fmt: skip
                else:
                    out.append((f"{name}.{path}",
                                lambda m, v, n=name, p=put: p(getattr(m, n), v)))  # fmt: skip
    return out


async def test_every_string_field_of_every_request_has_a_length_limit(suite: Suite) -> None:
    from google.protobuf.message_factory import GetMessageClass

    long = "x" * 1000
    checked: set[str] = set()
    for port, method, desc in _methods(suite):
        cls = GetMessageClass(desc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary(method)
            for path, put in _string_fields(desc):
                request = cls()
                put(request, long)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(request.SerializeToString(), timeout=10)
                details = err.value.details() or ""
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, path)
                assert details.startswith(f"{path}: at most "), (method, details)
                assert details.endswith("characters, got 1000") and len(details) < 200
                checked.add(f"{method.rsplit('/', 1)[-1]} {path}")
    assert {
        "Recommend surface", "Recommend request_id", "Publish events[0].event_id",
        "Publish events[0].features (a key)", "GenerateMany requests[0].params['k']",
        "Merge lists[0].scores.columns[0]", "Score model", "ModelInfer inputs[0].name",
    } <= checked, checked  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "text"),
    [
        ("surface", "s" * 1024 * 1024, "surface: at most 63 characters, got 1048576"),
        ("surface", "s" * 64, "surface: at most 63 characters, got 64"),
        ("request_id", "r" * 1024 * 1024, "request_id: at most 128 characters, got 1048576"),
        ("request_id", "r" * 129, "request_id: at most 128 characters, got 129"),
        ("surface", "unknown-" * 7, "surface: unknown surface 'unknown-unknown-"),
    ],
)
async def test_long_recommend_fields_are_refused_by_name_without_echoing_them(
    suite: Suite, field: str, value: str, text: str
) -> None:
    request = gateway_pb2.RecommendRequest(surface="pymk", member=1, k=5)
    setattr(request, field, value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await suite.stub.Recommend(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(text)
    assert len(err.value.details() or "") < 300


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def _until_listed(suite: Suite, done: Callable[[gateway_pb2.ListSurfacesResponse], bool]
                        ) -> gateway_pb2.ListSurfacesResponse:  # fmt: skip
    for _ in range(300):
        listed, _ = await _statuses(suite)
        if done(listed):
            return listed
        await asyncio.sleep(0.1)
    raise AssertionError(f"the gateway never listed what was expected: {listed}")


async def test_a_bad_workflow_file_keeps_the_last_good_version_serving(
    suite: Suite, caplog: pytest.LogCaptureFixture
) -> None:
    from edgeflow.cli.suite_cmd import workflow_lines

    caplog.set_level(logging.INFO, logger="edgeflow.gateway")
    directory = suite.cfg.workflows_dir
    keep, other = directory / "keep.yaml", directory / "other.yaml"
    doc = yaml.safe_load((directory / "pymk.yaml").read_text())
    doc["metadata"]["name"] = doc["spec"]["surface"] = "keep"
    keep.write_text(yaml.safe_dump(doc))
    member = members_with_degree(suite.graph, 8)[8]
    try:
        await _until_listed(suite, lambda listed: "keep" in listed.surfaces)
        served = await suite.recommend(member, k=5, surface="keep")
        rejections = _metric("edgeflow_gateway_workflow_rejections_total")

        keep.write_text("spec: " + "[" * 20_000 + "]" * 20_000 + "\n")
        listed = await _until_listed(suite, lambda listed: bool(listed.rejected))
        [rejected] = listed.rejected
        assert rejected.startswith(f"{keep}: invalid workflow") and "nesting depth" in rejected
        assert "keep" in listed.surfaces  # its last valid version
        again = await suite.recommend(member, k=5, surface="keep")
        assert [e.target for e in again.edges] == [e.target for e in served.edges]
        assert _metric("edgeflow_gateway_workflow_files_rejected") == 1

        # Reloading goes on (a new file is served), and the refusal is not logged again.
        doc["metadata"]["name"] = doc["spec"]["surface"] = "other"
        other.write_text(yaml.safe_dump(doc))
        listed = await _until_listed(suite, lambda listed: "other" in listed.surfaces)
        assert "keep" in listed.surfaces and len(listed.rejected) == 1
        assert _metric("edgeflow_gateway_workflow_rejections_total") == rejections + 1
        logged = [r.getMessage() for r in caplog.records if "workflow rejected" in r.getMessage()]
        assert len(logged) == 1 and "surface 'keep' keeps its last valid version" in logged[0]
        lines = workflow_lines(listed, "gw")
        assert any(line.startswith(f"  REJECTED {keep}: invalid workflow") for line in lines)
    finally:
        keep.unlink(missing_ok=True)
        other.unlink(missing_ok=True)
    listed = await _until_listed(
        suite, lambda listed: not listed.rejected and "keep" not in listed.surfaces
    )
    assert "other" not in listed.surfaces
    assert _metric("edgeflow_gateway_workflow_files_rejected") == 0


async def test_a_gateway_starts_with_its_valid_files_and_names_the_bad_ones(
    suite: Suite, tmp_path: Path
) -> None:
    from edgeflow.gateway.service import GatewayService

    (tmp_path / "pymk.yaml").write_text((suite.cfg.workflows_dir / "pymk.yaml").read_text())
    (tmp_path / "deep.yaml").write_text("spec: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n")
    gateway = GatewayService(dataclasses.replace(suite.cfg, workflows_dir=tmp_path))
    server, _, _ = await start_server(gateway, "127.0.0.1:0")
    try:
        assert list(gateway.workflows) == ["pymk"]
        [rejected] = gateway.rejected
        assert rejected.startswith(f"{tmp_path / 'deep.yaml'}: invalid workflow")
    finally:
        await server.stop(None)
        await gateway.stop()
    (tmp_path / "pymk.yaml").unlink()
    with pytest.raises(RuntimeError, match=r"no valid workflow in .* \(1 files refused"):
        await GatewayService(dataclasses.replace(suite.cfg, workflows_dir=tmp_path)).start()


async def test_publish_while_redis_loads_is_unavailable(suite: Suite, tmp_path: Path) -> None:
    from loading_redis import loading_redis

    from edgeflow.gateway.service import GatewayService

    with loading_redis(tmp_path, keys=3000, delay_us=200_000) as proc:
        gateway = GatewayService(dataclasses.replace(suite.cfg, redis_url=proc.url))
        server, port, _ = await start_server(gateway, "127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                event = gateway_pb2.MemberEvent(
                    type=gateway_pb2.MemberEvent.BLOCK, member=1, target=2
                )
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await RecommenderStub(ch).Publish(
                        gateway_pb2.PublishRequest(events=[event]), timeout=30
                    )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading the dataset" in (err.value.details() or "")
        finally:
            await server.stop(None)
            await gateway.stop()


async def test_redis_down_is_unavailable_not_a_hang(suite: Suite) -> None:
    # Last in the module: it leaves the module's Redis stopped.
    member = members_with_degree(suite.graph, 8)[6]
    suite.redis.stop()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await suite.recommend(member, k=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "blend" in (err.value.details() or "")
