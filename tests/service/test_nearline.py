"""Nearline mode on a real Redis, real Feast pushes and the real services over gRPC: Publish,
visibility that changes at once, the worker's recomputed lists, graph deltas, and
at-least-once delivery through a worker killed between reading and acknowledging."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import numpy as np
import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inprocess import clone_serving, relaxed_copy, start_backends, start_gateway, stop_all
from world import World

from edgeflow.cli.recommend import empty_reasons
from edgeflow.config import REPO_ROOT, Config
from edgeflow.gateway.service import GatewayService
from edgeflow.graph import Graph
from edgeflow.local.ports import free_port
from edgeflow.local.redis_server import RedisProcess
from edgeflow.nearline import worker as worker_module
from edgeflow.nearline.worker import NearlineWorker
from edgeflow.offline.context import find_workflow, load_inputs
from edgeflow.offline.executor import BatchRunner
from edgeflow.offline.ranking import deactivated_members
from edgeflow.shell.server import Service, channel, drain, start_server
from edgeflow.stores import keys, lists
from edgeflow.stores.feast_online import OnlineReader
from edgeflow.stores.graph_store import (
    GraphStore,
    append_deltas,
    compact_graph,
    load_graph,
    snapshot_of,
)
from edgeflow.stores.vectors import EdgeReplica
from edgeflow.v1 import candidates_pb2, candidates_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from edgeflow.workflow.ops import BlendParams

Event = gateway_pb2.MemberEvent
TIMEOUT_S = 60.0


@dataclasses.dataclass
class NearlineSuite:
    graph: Graph
    redis: RedisProcess
    cfg: Config
    client: redis.Redis
    stub: gateway_pb2_grpc.RecommenderStub
    candidates: candidates_pb2_grpc.CandidateServiceStub
    servers: dict[str, tuple[Service, grpc.aio.Server, int]]

    async def recommend(
        self, member: int, surface: str = "pymk", k: int = 50
    ) -> gateway_pb2.RecommendResponse:
        req = gateway_pb2.RecommendRequest(surface=surface, member=member, k=k, debug=True)
        return await self.stub.Recommend(req, timeout=10)

    async def publish(self, *events: gateway_pb2.MemberEvent) -> gateway_pb2.PublishResponse:
        return await self.stub.Publish(gateway_pb2.PublishRequest(events=events), timeout=10)

    def connected(self, member: int) -> set[int]:
        return {int(x) for x in cast(set[bytes], self.client.smembers(keys.adjacency(member)))}

    def stranger(self, member: int, skip: set[int] | None = None) -> int:
        """A member in this member's stored pymk list: neither connected nor in `skip`."""
        [stored] = lists.read_lists(self.client, "pymk", [member])
        assert stored is not None
        avoid = (skip or set()) | self.connected(member)
        return next(int(t) for t in stored.ids if int(t) not in avoid)


@pytest_asyncio.fixture(scope="module")
async def nearline_suite(
    tmp_path_factory: pytest.TempPathFactory, suite_world: World
) -> AsyncIterator[NearlineSuite]:
    """The session's trained world, cloned, with pymk, follows and catch-up."""
    surfaces = ("pymk", "follows")  # the offline lists the worker updates
    cfg, proc, client = clone_serving(suite_world, tmp_path_factory.mktemp("nearline"), surfaces)
    graph = suite_world.graph
    workflows = cfg.workflows_dir
    cfg, servers = await start_backends(cfg)
    # catch-up scores remotely, over the scoring service's OIP endpoint.
    remote = yaml.safe_load(relaxed_copy(REPO_ROOT / "workflows" / "catch-up.yaml",
                                         workflows).read_text())  # fmt: skip
    remote["spec"]["modes"]["remote"]["endpoint"] = cfg.scoring_addr
    (workflows / "catch-up.yaml").write_text(yaml.safe_dump(remote))
    port = await start_gateway(cfg, servers)
    gch, cch = channel(f"127.0.0.1:{port}"), channel(cfg.candidates_addr)
    yield NearlineSuite(graph, proc, cfg, client, gateway_pb2_grpc.RecommenderStub(gch),
                candidates_pb2_grpc.CandidateServiceStub(cch), servers)  # fmt: skip
    await gch.close()
    await cch.close()
    await stop_all(servers)
    client.close()
    proc.stop()


def members_with_degree(graph: Graph, lo: int) -> list[int]:
    return [int(graph.ids[i]) for i in np.flatnonzero(graph.degree >= lo)]


def _fresh_stream(client: redis.Redis) -> None:
    client.delete(keys.EVENTS, keys.NEARLINE_STATS, keys.EVENTS_DEAD)


async def _until(check: Any, what: str, timeout: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _applied(client: redis.Redis) -> int:
    return int(cast(bytes | None, client.hget(keys.NEARLINE_STATS, "applied")) or 0)


def _pending(client: redis.Redis) -> dict[str, int]:
    info = cast(dict[str, Any], client.xpending(keys.EVENTS, keys.NEARLINE_GROUP))
    return {c["name"].decode(): int(c["pending"]) for c in info["consumers"]}


# ---- Publish ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("event", "text"),
    [
        (Event(member=1, target=2), "events[0].type: required"),
        (Event(type=Event.CONNECT, member=-1, target=2), "events[0].member: must be >= 0"),
        (Event(type=Event.BLOCK, member=3, target=3), "events[0].target: a member cannot block"),
        (Event(type=Event.DISMISS, member=3, target=-2), "events[0].target: must be >= 0"),
        (Event(type=Event.PROFILE_CHANGE, member=3), "events[0].features: a profile_change"),
        (Event(type=Event.PROFILE_CHANGE, member=3, features={"height": 1.0}),
         "unknown feature 'height'"),
        (Event(type=Event.PROFILE_CHANGE, member=3, features={"embedding_0": 1.0}),
         "the embedding changes whole: 1 of 32"),
        (Event(type=Event.CONNECT, member=3, target=4, features={"degree": 1.0}),
         "only a profile_change carries features"),
        (Event(type=Event.CONNECT, member=3, target=4, time=1e300),
         "events[0].time: 1e+300 is "),
        (Event(type=Event.CONNECT, member=3, target=4, time=time.time() + 3 * 86400),
         "ahead of the gateway's clock; events may be at most 1 day ahead and 365 days behind"),
        (Event(type=Event.CONNECT, member=3, target=4, time=time.time() - 2 * 365 * 86400),
         "days behind the gateway's clock"),
        (Event(type=Event.CONNECT, member=3, target=4, time=-5.0),
         "events[0].time: must be unix seconds >= 0, got -5"),
        (Event(type=Event.CONNECT, member=3, target=4, event_id="e" * 129),
         "events[0].event_id: at most 128 characters, got 129"),
        (Event(type=Event.CONNECT, member=3, target=4, event_id="e" * 1024 * 1024),
         "events[0].event_id: at most 128 characters, got 1048576"),
        (Event(type=Event.PROFILE_CHANGE, member=3, features={"f" * 1024 * 1024: 1.0}),
         "events[0].features (a key): at most 256 characters, got 1048576"),
        (Event(type=Event.DEACTIVATE, member=3, target=4),
         "events[0].target: a deactivate is about the member alone and names no target, got 4"),
        (Event(type=Event.REACTIVATE, member=3, features={"degree": 1.0}),
         "events[0].features: only a profile_change carries features"),
        (Event(type=Event.DEACTIVATE, member=-3), "events[0].member: must be >= 0, got -3"),
    ],
)  # fmt: skip
async def test_publish_names_the_bad_field(
    nearline_suite: NearlineSuite, event: gateway_pb2.MemberEvent, text: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await nearline_suite.publish(event)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert text in (err.value.details() or "")
    assert len(err.value.details() or "") < 400


async def test_publish_takes_recent_times_and_a_configured_skew(
    nearline_suite: NearlineSuite,
) -> None:
    from edgeflow.nearline.events import EventError, parse_request

    _fresh_stream(nearline_suite.client)
    now = time.time()
    member, target = members_with_degree(nearline_suite.graph, 6)[5:7]
    for when in (now - 3600, now + 60, now - 300 * 86400):
        event = Event(type=Event.DISMISS, member=member, target=target, time=when)
        assert (await nearline_suite.publish(event)).published == 1
    nearline_suite.client.delete(keys.dismissed(member))
    _fresh_stream(nearline_suite.client)
    request = gateway_pb2.PublishRequest(
        events=[Event(type=Event.DISMISS, member=1, target=2, time=now + 120)]
    )
    with pytest.raises(EventError, match=r"events\[0\]\.time: .* 60 s ahead"):
        parse_request(request, max_future_s=60, max_age_s=3600)
    assert parse_request(request, max_future_s=600, max_age_s=3600)[0].time == now + 120


async def test_block_dismiss_and_connect_apply_before_any_recompute(
    nearline_suite: NearlineSuite,
) -> None:
    _fresh_stream(nearline_suite.client)  # no worker runs in this test
    member = members_with_degree(nearline_suite.graph, 6)[0]
    before = await nearline_suite.recommend(member)
    targets = [e.target for e in before.edges]
    blocked, connected = targets[0], targets[1]
    resp = await nearline_suite.publish(
        Event(type=Event.BLOCK, member=member, target=blocked),
        Event(type=Event.CONNECT, member=member, target=connected),
    )
    assert resp.published == 2 and all(resp.entry_ids) and len(set(resp.event_ids)) == 2
    after = await nearline_suite.recommend(member)
    shown = {e.target for e in after.edges}
    assert blocked not in shown and connected not in shown
    assert after.funnel.dropped["blocked"] >= 1 and after.funnel.dropped["connected"] >= 1
    # The blocked member does not see the blocker either.
    assert member not in {e.target for e in (await nearline_suite.recommend(blocked)).edges}
    # follows has no online scoring: its list is served, and filtered, at request time.
    follows = [e.target for e in (await nearline_suite.recommend(member, "follows")).edges]
    assert follows and blocked not in follows and connected not in follows
    gone = follows[0]
    await nearline_suite.publish(Event(type=Event.DISMISS, member=member, target=gone))
    assert gone not in {e.target for e in (await nearline_suite.recommend(member, "follows")).edges}
    edge = (await nearline_suite.recommend(member, "follows")).edges[0]
    assert [(p.source, p.mode) for p in edge.provenance] == [("precomputed", "offline")]
    # Undo, so later tests start from the ingested graph.
    await nearline_suite.publish(Event(type=Event.DISCONNECT, member=member, target=connected))
    assert connected not in nearline_suite.connected(member)
    nearline_suite.client.delete(
        keys.blocked(member), keys.blocked(blocked), keys.dismissed(member)
    )
    assert int(cast(int, nearline_suite.client.xlen(keys.EVENTS))) == 4


SURFACES = ("pymk", "follows", "catch-up")


async def _served(
    nearline_suite: NearlineSuite, member: int
) -> dict[str, gateway_pb2.RecommendResponse]:
    return {s: await nearline_suite.recommend(member, s) for s in SURFACES}


async def test_a_deactivated_member_is_never_served_until_reactivated(
    nearline_suite: NearlineSuite,
) -> None:
    _fresh_stream(nearline_suite.client)
    member, other = members_with_degree(nearline_suite.graph, 6)[6:8]
    [listed] = lists.read_lists(nearline_suite.client, "pymk", [member])
    assert listed is not None
    stored = next(
        int(t) for t in listed.ids[::-1] if int(t) not in nearline_suite.connected(member)
    )
    lists.update_lists(nearline_suite.client, "pymk", np.asarray([member]),
                       [(np.asarray([stored]), np.asarray([9.0], np.float32))])  # fmt: skip
    before = await _served(nearline_suite, member)
    assert all(r.edges and not r.partial for r in before.values())
    # Online (pymk's ranker), remote (catch-up's), offline (follows' list as the job wrote
    # it) and nearline (pymk's list entry as the worker writes it): each one's best edge.
    gone = {stored, *(r.edges[0].target for r in before.values())}
    deactivate = [Event(type=Event.DEACTIVATE, member=m) for m in sorted(gone)]
    assert (await nearline_suite.publish(*deactivate)).published == len(gone)
    assert deactivated_members(nearline_suite.client).tolist() == sorted(gone)

    after = await _served(nearline_suite, member)
    for surface, resp in after.items():
        shown = {e.target for e in resp.edges}
        assert shown and not shown & gone, surface
        assert resp.funnel.dropped["deactivated"] >= 1, surface
    assert stored not in {e.target for e in (await nearline_suite.recommend(member, k=500)).edges}
    explained = await nearline_suite.stub.Recommend(gateway_pb2.RecommendRequest(
        surface="follows", member=member, k=10, explain=True), timeout=10)  # fmt: skip
    assert (before["follows"].edges[0].target, "deactivated", "blend") in {
        (d.target, d.reason, d.node) for d in explained.explanation.dropped
    }
    # Nor are they served to a member whose lists never held them.
    assert not {e.target for e in (await nearline_suite.recommend(other, k=500)).edges} & gone
    # A deactivated member asking is refused, on every surface, and says why.
    for surface in SURFACES:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await nearline_suite.recommend(min(gone), surface)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"member: {min(gone)} is deactivated (since " in (err.value.details() or "")
        assert "after a reactivate event" in (err.value.details() or "")

    # Lists computed meanwhile leave them out, and still hold k members each.
    wf = find_workflow(nearline_suite.cfg, "pymk")
    runner = BatchRunner(wf, load_inputs(nearline_suite.cfg, nearline_suite.client, wf))
    members = np.array(members_with_degree(nearline_suite.graph, 6)[:40], dtype=np.int64)
    computed = runner.run(members).lists
    assert all(ids.size == runner.k and not set(ids.tolist()) & gone for ids, _ in computed)

    reactivate = [Event(type=Event.REACTIVATE, member=m) for m in sorted(gone)]
    assert (await nearline_suite.publish(*reactivate)).published == len(gone)
    assert deactivated_members(nearline_suite.client).size == 0
    again = await _served(nearline_suite, member)
    for surface, resp in again.items():
        assert resp.edges[0].target == before[surface].edges[0].target, surface
        assert "deactivated" not in resp.funnel.dropped
    assert stored in {e.target for e in (await nearline_suite.recommend(member, k=500)).edges}
    assert (await nearline_suite.recommend(min(gone))).edges
    # The worker takes both kinds of event: applied, none dead-lettered.
    worker, server, health = await _start_worker(nearline_suite, "states")
    try:
        await _until(lambda: _applied(nearline_suite.client) == 2 * len(gone), "the events applied")
    finally:
        await drain(worker, server, health)
    assert not nearline_suite.client.exists(keys.EVENTS_DEAD)


async def test_the_safety_filters_apply_whatever_the_served_graph_says(
    nearline_suite: NearlineSuite,
) -> None:
    """A graph whose blend lost its filters (one validated before they were required, or
    changed in memory) still serves no one the member blocked, is connected to or is."""
    member = members_with_degree(nearline_suite.graph, 6)[8]
    gateway = cast(GatewayService, nearline_suite.servers["gateway"][0])
    params = gateway.workflows["follows"].node("blend").params
    assert isinstance(params, BlendParams)
    saved = list(params.filters)
    top = (await nearline_suite.recommend(member, "follows")).edges[0].target
    nearline_suite.client.sadd(keys.blocked(member), top)
    params.filters[:] = []
    try:
        resp = await nearline_suite.recommend(member, "follows", k=500)
    finally:
        params.filters[:] = saved
        nearline_suite.client.delete(keys.blocked(member))
    shown = {e.target for e in resp.edges}
    assert shown and top not in shown and member not in shown
    assert not shown & nearline_suite.connected(member)
    assert resp.funnel.dropped["blocked"] == 1


async def test_a_repeated_event_id_is_stored_once(nearline_suite: NearlineSuite) -> None:
    _fresh_stream(nearline_suite.client)
    event = Event(type=Event.FOLLOW, member=1, target=2, event_id="follow-1-2")
    first = await nearline_suite.publish(event)
    again = await nearline_suite.publish(event, Event(type=Event.FOLLOW, member=1, target=3))
    assert first.published == 1 and list(first.event_ids) == ["follow-1-2"]
    assert again.published == 1 and again.duplicates == 1 and again.entry_ids[0] == ""
    assert int(cast(int, nearline_suite.client.xlen(keys.EVENTS))) == 2
    with pytest.raises(grpc.aio.AioRpcError, match="appears twice in one request"):
        await nearline_suite.publish(Event(type=Event.FOLLOW, member=1, target=4, event_id="x"),
                            Event(type=Event.FOLLOW, member=1, target=5, event_id="x"))  # fmt: skip
    nearline_suite.client.delete(keys.follows(1))


async def test_a_followed_member_leaves_the_follows_surface_at_once_but_not_pymk(
    nearline_suite: NearlineSuite,
) -> None:
    member = members_with_degree(nearline_suite.graph, 4)[3]
    before = await nearline_suite.recommend(member, "follows", k=10)
    target = before.edges[0].target
    try:
        assert (await nearline_suite.publish(Event(type=Event.FOLLOW, member=member,
                                                   target=target))).published == 1  # fmt: skip
        after = await nearline_suite.recommend(member, "follows", k=10)
        assert target not in {e.target for e in after.edges} and len(after.edges) == 10
        assert after.funnel.dropped["followed"] >= 1
        pymk = await nearline_suite.recommend(member, "pymk", k=500)
        assert "followed" not in pymk.funnel.dropped  # following is no reason not to connect
    finally:
        nearline_suite.client.delete(keys.follows(member))


async def test_follows_has_no_model_scores_and_an_empty_answer_says_why(
    nearline_suite: NearlineSuite,
) -> None:
    member = members_with_degree(nearline_suite.graph, 4)[2]
    follows = await nearline_suite.recommend(member, "follows")
    assert follows.edges and not follows.partial
    # No model scores a follows edge at request time: its list is served as written.
    assert not any(e.HasField("model_score") for e in follows.edges)
    assert all(e.model_score == 0.0 for e in follows.edges)  # what a client reading 0 sees
    pymk = await nearline_suite.recommend(member, "pymk")
    assert not pymk.partial, pymk.degraded
    assert pymk.edges and all(e.HasField("model_score") for e in pymk.edges)

    pointer = keys.list_current("follows")
    nearline_suite.client.rename(pointer, pointer + ":away")  # as before the first offline run
    try:
        never = await nearline_suite.recommend(member, "follows")
    finally:
        nearline_suite.client.rename(pointer + ":away", pointer)
    assert not never.edges and not never.partial
    [node] = [n for n in never.funnel.nodes if n.op == "candidates.precomputed"]
    assert (node.status, node.items_out) == ("ok", 0)
    assert node.note == "list 'follows' has never been written (no offline run has published it)"
    assert all(not n.note for n in never.funnel.nodes if n is not node)
    # The command line turns the funnel into the reason and what to run.
    assert empty_reasons(never) == [
        f"node 'precomputed' (candidates.precomputed): {node.note}",
        "list 'follows' is computed by the offline job: run "
        "`edgeflow offline run --workflow follows`",
    ]

    newcomer = int(nearline_suite.graph.ids.max()) + 1  # joined after the run: no entry
    fresh = await nearline_suite.recommend(newcomer, "follows")
    [node] = [n for n in fresh.funnel.nodes if n.op == "candidates.precomputed"]
    version = lists.current_version(nearline_suite.client, "follows")
    want = f"list 'follows' has no entry for member {newcomer} (live version {version})"
    assert node.note == want


async def test_pymk_still_serves_its_offline_list_when_scoring_fails(
    nearline_suite: NearlineSuite,
) -> None:
    member = members_with_degree(nearline_suite.graph, 6)[1]
    [stored] = lists.read_lists(nearline_suite.client, "pymk", [member])
    assert stored is not None and stored.mode == "offline"
    svc, server, port = nearline_suite.servers["scoring"]
    await server.stop(None)
    try:
        resp = await nearline_suite.recommend(member, k=20)
    finally:
        server, _, _ = await start_server(svc, f"127.0.0.1:{port}")
        nearline_suite.servers["scoring"] = (svc, server, port)
    assert resp.partial and any(d.startswith("rank: UNAVAILABLE") for d in resp.degraded)
    assert len(resp.edges) == 20
    offline = {int(t): float(s) for t, s in zip(stored.ids, stored.scores, strict=True)}
    for edge in resp.edges:
        assert not edge.HasField("model_score")  # nothing was scored online: absent, not 0
        prov = {p.source: p for p in edge.provenance}
        assert prov["precomputed"].mode == "offline" and prov["precomputed"].age_seconds > 0
        assert prov["precomputed"].score == pytest.approx(offline[edge.target])
    assert int(stored.ids[0]) in {e.target for e in resp.edges}  # its best edge is served


# ---- the worker ------------------------------------------------------------------------------
def _consumers(client: redis.Redis) -> set[str]:
    rows = cast(list[dict[str, Any]], client.xinfo_consumers(keys.EVENTS, keys.NEARLINE_GROUP))
    return {bytes(r["name"]).decode() for r in rows}


async def _start_worker(
    nearline_suite: NearlineSuite, consumer: str, claim_idle_s: float = 30.0
) -> tuple[NearlineWorker, grpc.aio.Server, Any]:
    worker = NearlineWorker(nearline_suite.cfg, consumer=consumer, claim_idle_s=claim_idle_s)
    server, port, health = await start_server(worker, "127.0.0.1:0")
    async with channel(f"127.0.0.1:{port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    groups = cast(list[dict[str, Any]], nearline_suite.client.xinfo_groups(keys.EVENTS))
    assert [g["name"].decode() for g in groups] == [keys.NEARLINE_GROUP]
    return worker, server, health


async def test_a_connect_reaches_stored_lists_graph_and_features(
    nearline_suite: NearlineSuite,
) -> None:
    _fresh_stream(nearline_suite.client)
    member = members_with_degree(nearline_suite.graph, 6)[3]
    target = nearline_suite.stranger(member)
    reader = OnlineReader()
    degree_before = reader.read_sync(nearline_suite.client, [member]).scalars[0, 0]
    worker, server, health = await _start_worker(nearline_suite, "fresh")
    listener = aioredis.Redis.from_url(nearline_suite.cfg.redis_url)
    pubsub = listener.pubsub()
    try:
        await pubsub.subscribe(keys.NEARLINE_STORED)
        published_at = time.time()
        resp = await nearline_suite.publish(Event(type=Event.CONNECT, member=member, target=target))
        [event_id] = resp.event_ids

        async def stored() -> dict[str, Any] | None:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            note = None if msg is None else json.loads(msg["data"])
            return note if note and event_id in note["events"] else None

        note = await _until(stored, "the worker to store the recomputed lists")
        assert note["lists"] == {"pymk": 2, "follows": 2}
    finally:
        await pubsub.aclose()
        await listener.aclose()
        await drain(worker, server, health)
    for name in ("pymk", "follows"):
        mine, theirs = lists.read_lists(nearline_suite.client, name, [member, target])
        assert mine is not None and theirs is not None
        assert mine.mode == theirs.mode == "nearline" and mine.created_at >= published_at
        assert target not in mine.ids and member not in theirs.ids
    # Served: the list's entries carry their nearline mode and age into provenance.
    resp = await nearline_suite.recommend(member)
    modes = {p.mode for e in resp.edges for p in e.provenance if p.source == "precomputed"}
    assert modes == {"nearline"} and target not in {e.target for e in resp.edges}
    # The graph changed for every reader: the delta stream, then the candidates service.
    graph = load_graph(nearline_suite.client)
    assert graph.index_of(target) in set(graph.neighbors(graph.index_of(member)).tolist())

    async def fof_sees_it() -> bool:
        req = candidates_pb2.GenerateRequest(member=member, source="graph", limit=500)
        return target not in (await nearline_suite.candidates.Generate(req, timeout=5)).ids

    await _until(fof_sees_it, "the candidates service to apply the graph delta", 10)
    # The features pushed through Feast's push source: the member's degree is one more.
    degree_after = reader.read_sync(nearline_suite.client, [member]).scalars[0, 0]
    assert degree_after == degree_before + 1
    assert _applied(nearline_suite.client) == 1 and _pending(nearline_suite.client) == {}


async def test_at_least_once_through_a_worker_killed_before_acking(
    nearline_suite: NearlineSuite,
) -> None:
    _fresh_stream(nearline_suite.client)
    nearline_suite.client.xgroup_create(keys.EVENTS, keys.NEARLINE_GROUP, id="0", mkstream=True)
    port = free_port()
    env = dict(
        os.environ, REDIS_URL=nearline_suite.cfg.redis_url,
        EDGEFLOW_HOME=str(nearline_suite.cfg.home),
        EDGEFLOW_WORKFLOWS=str(nearline_suite.cfg.workflows_dir), PORT=str(port),
        FEATURES_ADDR=f"127.0.0.1:{free_port()}",  # nothing listens: every push fails
        NEARLINE_CLAIM_IDLE_S="600", LOG_LEVEL="WARNING",
    )  # fmt: skip
    doomed = subprocess.Popen(
        [sys.executable, "-m", "edgeflow.cli.main", "serve", "nearline"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    members = members_with_degree(nearline_suite.graph, 4)[10:22]
    pairs: list[tuple[int, int]] = []
    taken: set[int] = set()
    for m in members:
        t = nearline_suite.stranger(m, taken | set(members))
        taken |= {m, t}
        pairs.append((m, t))
    events = [Event(type=Event.CONNECT, member=m, target=t, event_id=f"c-{m}-{t}")
              for m, t in pairs]  # fmt: skip
    try:
        first = await nearline_suite.publish(*events)
        assert first.published == len(events)
        # It read every event and acknowledged none of them: then it dies.
        await _until(lambda: sum(_pending(nearline_suite.client).values()) == len(events), "reads")
        [name] = _pending(nearline_suite.client)
        assert doomed.poll() is None
        assert nearline_suite.client.exists(keys.nearline_lease(name))  # alive: it holds its lease
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
    finally:
        if doomed.poll() is None:
            doomed.kill()
    # Retried publishes of the same events add nothing.
    again = await nearline_suite.publish(*events[:3])
    assert again.duplicates == 3 and int(cast(int, nearline_suite.client.xlen(keys.EVENTS))) == len(
        events
    )
    assert _applied(nearline_suite.client) == 0

    # Claiming by idle time is off (600 s): the dead worker's lapsed lease is what lets the
    # rescuer take its events over, and remove it from the group.
    worker, server, health = await _start_worker(nearline_suite, "rescuer", claim_idle_s=600)
    try:
        await _until(lambda: _applied(nearline_suite.client) == len(events), "the claimed events")
        await _until(lambda: _pending(nearline_suite.client) == {}, "every entry acknowledged")
        await _until(
            lambda: _consumers(nearline_suite.client) == {"rescuer"}, "the dead one removed"
        )
        # An entry delivered again (a replayed append) is acknowledged, not applied again.
        fields = {"id": events[0].event_id, "type": "connect", "member": str(pairs[0][0]),
                  "target": str(pairs[0][1]), "time": "1", "features": "{}"}  # fmt: skip
        replay = cast(bytes, nearline_suite.client.xadd(keys.EVENTS, fields))

        def replayed() -> bool:
            [group] = cast(list[dict[str, Any]], nearline_suite.client.xinfo_groups(keys.EVENTS))
            return group["last-delivered-id"] == replay and _pending(nearline_suite.client) == {}

        await _until(replayed, "the replayed entry")
    finally:
        await drain(worker, server, health)
    assert _consumers(nearline_suite.client) == set()  # a worker that stops leaves the group
    assert not nearline_suite.client.exists(keys.nearline_lease("rescuer"))
    assert _applied(nearline_suite.client) == len(events)  # nothing lost, nothing doubled
    assert not nearline_suite.client.exists(keys.EVENTS_DEAD)
    assert name != "rescuer"
    graph = load_graph(nearline_suite.client)
    for (m, t), event in zip(pairs, events, strict=True):
        assert nearline_suite.client.exists(keys.event_done(event.event_id))
        assert graph.index_of(t) in set(graph.neighbors(graph.index_of(m)).tolist())
        stored = lists.read_lists(nearline_suite.client, "pymk", [m])[0]
        assert stored is not None and stored.mode == "nearline" and t not in stored.ids


async def test_graph_deltas_are_followed_and_compacted(nearline_suite: NearlineSuite) -> None:
    client = nearline_suite.client
    store = GraphStore(aioredis.Redis.from_url(nearline_suite.cfg.redis_url))
    await store.load()
    base = store.graph
    a, b = members_with_degree(base, 2)[:2]
    on = a in set(base.ids[base.neighbors(base.index_of(b))].tolist())
    append_deltas(client, np.array([[a, b], [a, b]]), np.array([on, not on]))
    assert await store.load() and not await store.load()  # applied once
    flipped = store.graph
    assert snapshot_of(flipped) == snapshot_of(base) and flipped.version != base.version
    assert (flipped.index_of(b) in set(flipped.neighbors(flipped.index_of(a)).tolist())) != on
    assert flipped.edge_count == base.edge_count + (-1 if on else 1)
    new_version = compact_graph(client, min_deltas=1)
    assert new_version is not None and "+" not in new_version
    assert await store.load()
    assert store.graph.version == new_version
    assert np.array_equal(store.graph.indices, flipped.indices)
    assert compact_graph(client, min_deltas=1) is None  # nothing left to fold
    append_deltas(client, np.array([[a, b]]), np.array([on]))  # restore the edge state
    restored = load_graph(client)
    assert restored.edge_count == base.edge_count
    await store.close()


async def test_past_the_exact_limit_the_worker_searches_the_hnsw_collection(
    nearline_suite: NearlineSuite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large graph's worker does not read every member's embedding into an exact index
    (at start, after a compaction, after an embedding push): EBR searches the live HNSW
    collection through the worker's own copy, which closing the worker deletes."""
    monkeypatch.setattr(worker_module, "EXACT_EBR_MAX", 0)
    processor = worker_module.Processor(nearline_suite.cfg, nearline_suite.client, "ann")
    try:
        processor.refresh(force=True)
        assert processor.sync_graph()
        inputs = processor.inputs
        assert inputs is not None and inputs.index is None
        assert isinstance(inputs.ann, EdgeReplica)
        copy = inputs.ann.path
        processor.rebuild_index()  # an embedding push: the collection stays
        assert inputs.index is None and inputs.ann is not None
        wf = find_workflow(nearline_suite.cfg, "pymk")
        member = members_with_degree(nearline_suite.graph, 6)[5]
        exact = BatchRunner(
            wf, load_inputs(nearline_suite.cfg, nearline_suite.client, wf), per_member=True
        )
        [want], [got] = (
            exact.run(np.array([member])).lists,
            processor.runner(wf).run(np.array([member])).lists,
        )
        assert got[0].size > 0
        assert np.intersect1d(got[0], want[0]).size >= 0.9 * want[0].size
    finally:
        processor.close()
    assert not copy.exists()


def test_the_worker_takes_its_lease_and_claim_times_from_its_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NEARLINE_LEASE_S", "7.5")
    monkeypatch.setenv("NEARLINE_CLAIM_IDLE_S", "90")
    cfg = Config(redis_url=f"redis://127.0.0.1:{free_port()}/0")  # read when made, not imported
    assert (cfg.nearline_lease_s, cfg.nearline_claim_idle_s) == (7.5, 90.0)
    workers = [NearlineWorker(cfg, consumer="c"), NearlineWorker(cfg, "d", claim_idle_s=5.0)]
    try:
        assert (workers[0].lease_s, workers[0].claim_idle_s) == (7.5, 90.0)
        assert workers[1].claim_idle_s == 5.0  # a caller's own value wins
    finally:
        for worker in workers:
            worker.processor.close()
            worker.client.close()
    monkeypatch.setenv("NEARLINE_LEASE_S", "soon")
    with pytest.raises(SystemExit, match="NEARLINE_LEASE_S='soon' is not a number"):
        Config()
