"""Cold start on the real suite (Redis, the five services, the nearline worker) and the batch
runner: a member with no connections gets a list of members popular within what is known
of it, never itself, a blocked or a deactivated member; an id never seen stays NOT_FOUND."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
import redis
import yaml
from inprocess import clone_serving, start_backends, start_gateway, stop_all
from world import COMMUNITIES, MEMBERS, SEED, World

from edgeflow.candidates.sources import fill_popular, popular_near
from edgeflow.config import Config
from edgeflow.graph import Graph, inverse_log_degree
from edgeflow.nearline.worker import NearlineWorker
from edgeflow.offline.context import find_workflow, load_inputs
from edgeflow.offline.executor import BatchRunner
from edgeflow.shell.server import channel, drain, start_server
from edgeflow.stores.graph_store import load_graph
from edgeflow.v1 import candidates_pb2, candidates_pb2_grpc, gateway_pb2, gateway_pb2_grpc

Event = gateway_pb2.MemberEvent
TIMEOUT_S = 60.0


@dataclasses.dataclass
class ColdStartSuite:
    """The suite's gateway and candidates service, its graph as ingested and its Redis."""

    graph: Graph
    cfg: Config
    client: redis.Redis
    stub: gateway_pb2_grpc.RecommenderStub
    candidates: candidates_pb2_grpc.CandidateServiceStub

    async def recommend(self, member: int, k: int = 50) -> gateway_pb2.RecommendResponse:
        req = gateway_pb2.RecommendRequest(surface="pymk", member=member, k=k, debug=True)
        return await self.stub.Recommend(req, timeout=10)

    async def publish(self, *events: gateway_pb2.MemberEvent) -> None:
        await self.stub.Publish(gateway_pb2.PublishRequest(events=events), timeout=10)

    async def degree(self, member: int) -> int | None:
        """The member's degree in the candidates service's graph; None when it is unknown."""
        req = candidates_pb2.GenerateRequest(
            member=member, source="popular", limit=1, params={"max_degree": "0"}
        )
        resp = await self.candidates.Generate(req, timeout=5)
        if not resp.note:
            return 0  # served: at most 0 connections (or not in the graph, see known())
        return int(resp.note.split(" has ", 1)[1].split(" ", 1)[0])

    async def known(self, member: int) -> bool:
        req = candidates_pb2.GenerateRequest(member=member, source="graph", limit=1)
        try:
            await self.candidates.Generate(req, timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True


@pytest_asyncio.fixture(scope="module")
async def cold_suite(
    tmp_path_factory: pytest.TempPathFactory, suite_world: World
) -> AsyncIterator[ColdStartSuite]:
    """The session's trained world, cloned, with pymk."""
    cfg, proc, client = clone_serving(suite_world, tmp_path_factory.mktemp("cold"), ("pymk",))
    graph = suite_world.graph
    cfg, servers = await start_backends(cfg)
    port = await start_gateway(cfg, servers)
    worker = NearlineWorker(cfg, consumer="cold")
    wserver, _, health = await start_server(worker, "127.0.0.1:0")
    gch, cch = channel(f"127.0.0.1:{port}"), channel(cfg.candidates_addr)
    yield ColdStartSuite(graph, cfg, client, gateway_pb2_grpc.RecommenderStub(gch),
                candidates_pb2_grpc.CandidateServiceStub(cch))  # fmt: skip
    await drain(worker, wserver, health)
    await gch.close()
    await cch.close()
    await stop_all(servers)
    client.close()
    proc.stop()


async def _until(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _connections(graph: Graph, member: int) -> list[int]:
    return [int(x) for x in graph.ids[graph.neighbors(graph.index_of(member))]]


async def test_a_member_whose_connections_were_all_removed_gets_a_safe_list(
    cold_suite: ColdStartSuite,
) -> None:
    member = int(
        cold_suite.graph.ids[np.argsort(cold_suite.graph.degree)[len(cold_suite.graph.ids) // 2]]
    )
    friends = _connections(cold_suite.graph, member)
    await cold_suite.publish(
        *(Event(type=Event.DISCONNECT, member=member, target=f) for f in friends)
    )
    await _until(lambda: _is(cold_suite.degree(member), 0), "the graph to drop its connections")
    # Someone it blocks, someone who blocks it and a deactivated member: all best connected,
    # so a list of popular members would otherwise hold them.
    by_degree = [
        int(x) for x in cold_suite.graph.ids[np.argsort(-cold_suite.graph.degree, kind="stable")]
    ]
    shown = {e.target for e in (await cold_suite.recommend(member)).edges}
    blocked, blocker, gone = [m for m in by_degree if m in shown and m not in friends][:3]
    await cold_suite.publish(
        Event(type=Event.BLOCK, member=member, target=blocked),
        Event(type=Event.BLOCK, member=blocker, target=member),
        Event(type=Event.DEACTIVATE, member=gone),
    )
    after = await cold_suite.recommend(member)
    targets = [e.target for e in after.edges]
    assert len(targets) == 50 and not after.partial, after.degraded
    assert member not in targets and not {blocked, blocker, gone} & set(targets)
    assert {p.source for e in after.edges for p in e.provenance} >= {"popular"}
    # Popular within what is known of it: its embedding still places it in its community
    # (social_graph draws the communities first from its seed), so more of its list is
    # from there than of the best-connected members'.
    community = np.random.default_rng(SEED).integers(0, COMMUNITIES, size=MEMBERS)
    globally = [m for m in by_degree if m not in {member, blocked, blocker, gone}][:50]
    mine = [community[t] == community[member] for t in targets]
    assert sum(mine) > sum(community[t] == community[member] for t in globally)
    await cold_suite.publish(Event(type=Event.REACTIVATE, member=gone))


async def test_a_member_who_joined_by_a_connect_and_lost_it_gets_a_list(
    cold_suite: ColdStartSuite,
) -> None:
    newcomer = int(cold_suite.graph.ids.max()) + 1000
    friend = int(cold_suite.graph.ids[int(np.argmax(cold_suite.graph.degree))])
    assert not await cold_suite.known(newcomer)
    await cold_suite.publish(Event(type=Event.CONNECT, member=newcomer, target=friend))
    await _until(lambda: cold_suite.known(newcomer), "the graph to add the newcomer")
    # One connection: popular within its neighbourhood (its friend and their connections)
    # (pymk serves popular to members with no connection; the source serves any).
    req = candidates_pb2.GenerateRequest(
        member=newcomer, source="popular", limit=50, params={"within": "neighbourhood"}
    )
    near = (await cold_suite.candidates.Generate(req, timeout=5)).ids
    graph = load_graph(cold_suite.client)
    seeds = np.asarray([graph.index_of(friend)])
    expected, _ = popular_near(graph, seeds, np.asarray([friend, newcomer]), 50)
    assert list(near) == expected.tolist() and not {newcomer, friend} & set(near)
    assert (await cold_suite.recommend(newcomer)).edges
    await cold_suite.publish(Event(type=Event.DISCONNECT, member=newcomer, target=friend))
    await _until(lambda: _is(cold_suite.degree(newcomer), 0), "the graph to drop the connection")
    # No connection and no embedding: the best-connected members, never itself.
    resp = await cold_suite.recommend(newcomer)
    targets = [e.target for e in resp.edges]
    assert len(targets) == 50 and newcomer not in targets and not resp.partial
    sources = {p.source for e in resp.edges for p in e.provenance}
    assert "popular" in sources and not sources & {"fof", "ebr"}, sources


async def test_an_id_never_seen_is_not_found(cold_suite: ColdStartSuite) -> None:
    stranger = int(cold_suite.graph.ids.max()) + 5000
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cold_suite.recommend(stranger)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"member {stranger} is not in the graph" in (err.value.details() or "")


def test_the_batch_runner_serves_cold_members_and_keeps_connected_lists(
    cold_suite: ColdStartSuite, tmp_path: Path
) -> None:
    """Offline: a member with no connections gets a list; a connected member's list is the
    same as the workflow's without the popular node (it serves degree 0 only)."""
    graph = cold_suite.graph
    cold = int(graph.ids[0])
    gone = _connections(graph, cold)
    changed = graph.with_edges(np.asarray([[cold, f] for f in gone]),
                               np.zeros(len(gone), dtype=bool))  # fmt: skip
    wf = find_workflow(cold_suite.cfg, "pymk")
    inputs = dataclasses.replace(
        load_inputs(cold_suite.cfg, cold_suite.client, wf), graph=changed,
        inv_log_degree=inverse_log_degree(changed),
    )  # fmt: skip
    connected = [int(m) for m in changed.ids[changed.degree > 0][:24]]
    members = np.asarray([cold, *connected], dtype=np.int64)
    served = BatchRunner(wf, inputs).run(members).lists
    assert served[0][0].size > 0 and cold not in served[0][0].tolist()
    doc = yaml.safe_load((cold_suite.cfg.workflows_dir / "pymk.yaml").read_text())
    doc["spec"]["nodes"] = [n for n in doc["spec"]["nodes"] if n["name"] != "popular"]
    for node in doc["spec"]["nodes"]:
        node["inputs"] = [i for i in node.get("inputs", []) if i != "popular"]
        node.get("params", {}).get("weights", {}).pop("popular", None)
    (tmp_path / "pymk.yaml").write_text(yaml.safe_dump(doc))
    plain = find_workflow(dataclasses.replace(cold_suite.cfg, workflows_dir=tmp_path), "pymk")
    without = BatchRunner(plain, inputs).run(members).lists
    for (mine, _), (theirs, _) in zip(served[1:], without[1:], strict=True):
        assert mine.size > 0 and mine.tolist() == theirs.tolist()


def test_popular_near_ranks_by_links_into_the_neighbourhood() -> None:
    # 0-1, 0-2; 3 is linked to both 1 and 2, 4 to 1 only, 5 is a hub elsewhere.
    src = np.asarray([0, 0, 1, 2, 1, 5, 5, 5, 5])
    dst = np.asarray([1, 2, 3, 3, 4, 6, 7, 8, 9])
    graph = Graph.from_edges(src, dst)
    excluded = np.asarray([0, 1, 2])
    ids, counts = popular_near(graph, graph.indices_of(np.asarray([1, 2])), excluded, 10)
    assert ids.tolist() == [3, 4] and counts.tolist() == [2.0, 1.0]
    ranked = (np.asarray([5, 1, 3]), np.asarray([4.0, 3.0, 2.0], dtype=np.float32))
    out, scores = fill_popular((ids[:1], counts[:1]), ranked, excluded, 3)
    assert out.tolist() == [3, 5] and scores[0] > 1 > scores[1]


async def _is(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)
