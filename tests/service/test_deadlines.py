"""Expensive requests must not stall the others past their deadlines.

CPU work off the event loop (edgeflow.shell.cpu), late work refused, the friends-of-friends budget
for hubs (exact below it), cheap candidate sources answered while a hub's friends of friends
run, and the gateway's GenerateMany calls split by node timeout. Durations are only ever
compared with each other (the slow call's own duration), never with a fixed number.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from edgeflow.candidates import sources
from edgeflow.candidates.service import CandidatesService
from edgeflow.candidates.sources import GraphSource
from edgeflow.config import REPO_ROOT, Config
from edgeflow.features.service import FeaturesService
from edgeflow.gateway.engine import Clients, Engine
from edgeflow.graph import (
    Graph,
    expansion_budget,
    friends_of_friends,
    inverse_log_degree,
    pair_measures,
    pair_measures_work,
    read_edge_file,
)
from edgeflow.local.redis_server import RedisProcess
from edgeflow.shell import cpu, metrics
from edgeflow.shell.errors import RequestError
from edgeflow.shell.server import channel, start_server
from edgeflow.stores import lists
from edgeflow.stores.graph_store import GraphStore, save_graph
from edgeflow.v1 import candidates_pb2, candidates_pb2_grpc, features_pb2
from edgeflow.workflow.validate import load_workflow


@pytest.fixture(autouse=True)
def default_cpu() -> Iterator[None]:
    """Every test starts and ends with the defaults: 2 threads, late work refused."""
    cpu.configure(threads=2, deadline_checks=True)
    yield
    cpu.configure(threads=2, deadline_checks=True)


def _count(counter: Any, *labels: str) -> float:
    return float(counter.labels(*labels)._value.get() if labels else counter._value.get())


# ---- edgeflow.shell.cpu ------------------------------------------------------------------
async def test_small_work_runs_inline_and_large_work_on_a_pool_thread() -> None:
    here = threading.get_ident()
    assert await cpu.run("t", cpu.INLINE_WORK - 1, threading.get_ident) == here
    assert await cpu.run("t", cpu.INLINE_WORK, threading.get_ident) != here
    cpu.configure(threads=0)  # no pool: everything inline, as before
    assert await cpu.run("t", 10 * cpu.INLINE_WORK, threading.get_ident) == here


async def test_work_past_its_deadline_does_not_start() -> None:
    calls: list[int] = []
    refused = _count(metrics.DEADLINE_REFUSED, "late")
    with cpu.deadline_in(-0.001), pytest.raises(cpu.DeadlineExpired, match="not started"):
        await cpu.run("late", 10 * cpu.INLINE_WORK, calls.append, 1)
    with cpu.deadline_in(-0.001), pytest.raises(cpu.DeadlineExpired):
        await cpu.run("late", 1, calls.append, 2)  # inline work too
    assert calls == [] and _count(metrics.DEADLINE_REFUSED, "late") == refused + 2
    # A shorter inner deadline wins; a longer one does not extend the outer.
    with cpu.deadline_in(10.0):
        with cpu.deadline_in(-1.0):
            assert (cpu.remaining() or 0) < 0
        with cpu.deadline_in(60.0):
            assert 0 < (cpu.remaining() or 0) <= 10.0
    assert cpu.remaining() is None
    # With the checks off, late work still runs (the behaviour before).
    cpu.configure(deadline_checks=False)
    with cpu.deadline_in(-1.0):
        await cpu.run("late", 10 * cpu.INLINE_WORK, calls.append, 3)
    assert calls == [3]


async def test_work_that_waited_past_its_deadline_in_the_queue_does_not_start() -> None:
    cpu.configure(threads=1)
    release = threading.Event()
    started: list[str] = []

    def block() -> None:
        started.append("block")
        release.wait(10)

    busy = asyncio.ensure_future(cpu.run("t", cpu.INLINE_WORK, block))
    while not started:  # bounded by the pool picking the job up
        await asyncio.sleep(0.001)
    with cpu.deadline_in(0.05):
        queued = asyncio.ensure_future(cpu.run("t", cpu.INLINE_WORK, started.append, "late"))
        await asyncio.sleep(0.1)  # its deadline passes while the only thread is busy
    release.set()
    await busy
    with pytest.raises(cpu.DeadlineExpired):
        await queued
    assert started == ["block"]


# ---- the friends-of-friends budget ------------------------------------------------------------
@pytest.fixture(scope="module")
def facebook(facebook_edges: Path) -> Graph:
    return Graph.from_edges(*read_edge_file(facebook_edges))


def test_below_the_budget_the_answer_is_exactly_the_unbounded_one(facebook: Graph) -> None:
    g = facebook
    w = inverse_log_degree(g)
    budget = 20_000
    members = np.random.default_rng(4).choice(g.n, 300, replace=False)
    below = 0
    for i in members.tolist():
        span = expansion_budget(g, i, budget)
        if span.capped:
            continue
        below += 1
        assert span.via is None and span.visits == span.full_visits <= budget
        for weights in (None, w):
            want = friends_of_friends(g, i, 500, weights)
            got = friends_of_friends(g, i, 500, weights, span.via)
            for a, b in zip(want, got, strict=True):
                np.testing.assert_array_equal(a, b)
    assert below > 200  # most members are below the budget
    assert expansion_budget(g, int(np.argmax(g.degree)), 0).via is None  # 0: no budget


def test_above_the_budget_the_least_connected_intermediates_are_expanded(
    facebook: Graph,
) -> None:
    g = facebook
    hub = int(np.argmax(g.degree))
    nbrs = g.neighbors(hub)
    full = int(g.degree[nbrs].sum())
    budget = full // 4
    span = expansion_budget(g, hub, budget)
    assert span.capped and span.full_visits == full and span.connections == nbrs.size
    assert span.via is not None and span.visits <= budget and 0 < span.expanded < nbrs.size
    assert np.all(np.diff(span.via) > 0) and np.isin(span.via, nbrs).all()
    left_out = np.setdiff1d(nbrs, span.via)
    assert g.degree[span.via].max() <= g.degree[left_out].min()  # least-connected first
    ids, counts, _ = friends_of_friends(g, hub, 500, inverse_log_degree(g), span.via)
    assert 0 < ids.size <= 500 and hub not in ids and not np.isin(ids, nbrs).any()
    # Counts are common neighbours among the expanded intermediates.
    mine = np.zeros(g.n, dtype=bool)
    mine[span.via] = True
    for c, n in zip(ids[:50].tolist(), counts[:50].tolist(), strict=True):
        assert mine[g.neighbors(c)].sum() == n
    # A budget below the cheapest intermediate still expands one.
    tiny = expansion_budget(g, hub, 1)
    assert tiny.via is not None and tiny.expanded == 1


async def test_graph_source_says_when_a_hub_was_capped(
    facebook: Graph, redis_client: redis.Redis, redis_proc: RedisProcess
) -> None:
    save_graph(redis_client, facebook)
    client = aioredis.Redis.from_url(redis_proc.url)
    try:
        store = GraphStore(client)
        await store.load()
        g = facebook
        hub = int(np.argmax(g.degree))
        budget = int(g.degree[g.neighbors(hub)].sum()) // 4
        unbounded, bounded = GraphSource(store), GraphSource(store, budget)
        capped = _count(metrics.FOF_CAPPED)
        out = await bounded.generate(int(g.ids[hub]), 200, {"weight": "adamic_adar"})
        assert "hub: friends of friends through" in out.note and f"{budget:,}" in out.note
        assert _count(metrics.FOF_CAPPED) == capped + 1
        assert 0 < out.ids.size <= 200
        # Members below the budget: the very same answer, and no note.
        for i in np.flatnonzero(g.degree < 20)[:40].tolist():
            member = int(g.ids[i])
            a = await unbounded.generate(member, 100, {"weight": "adamic_adar"})
            b = await bounded.generate(member, 100, {"weight": "adamic_adar"})
            assert b.note == "" and a.ids.tolist() == b.ids.tolist()
            np.testing.assert_array_equal(a.scores, b.scores)
        assert _count(metrics.FOF_CAPPED) == capped + 1
    finally:
        await client.aclose()


def test_pair_measures_work_bounds_what_pair_measures_walks(facebook: Graph) -> None:
    g = facebook
    hub = int(np.argmax(g.degree))
    cands, _, _ = friends_of_friends(g, hub, 500)
    work = pair_measures_work(g, hub, cands)
    assert work >= cands.size and work <= int(g.degree[g.neighbors(hub)].sum()) + cands.size
    assert pair_measures_work(g, -1, cands) == cands.size
    pair_measures(g, hub, cands, inverse_log_degree(g))  # what it sizes


async def test_popular_ranking_is_the_stable_degree_order(facebook: Graph) -> None:
    ids, degree = sources._by_degree(facebook)
    order = np.argsort(-facebook.degree, kind="stable")[: ids.size]
    assert ids.tolist() == facebook.ids[order].tolist()
    np.testing.assert_array_equal(degree, facebook.degree[order].astype(np.float32))


# ---- the candidates service under a hub's friends of friends ------------------------------
def hub_graph(seed: int = 3) -> Graph:
    """5,000 members in a random graph of average degree ~200, and member 0, who knows half
    of them: its friends of friends read ~500,000 neighbour-list entries."""
    rng = np.random.default_rng(seed)
    n, m = 5000, 500_000
    src = rng.integers(1, n, m)
    dst = rng.integers(1, n, m)
    hub = np.arange(1, n // 2)
    return Graph.from_edges(np.concatenate([src, np.zeros_like(hub)]), np.concatenate([dst, hub]))


@pytest.fixture
async def hub_service(
    tmp_path: Path, redis_proc: RedisProcess, redis_client: redis.Redis
) -> AsyncIterator[tuple[CandidatesService, candidates_pb2_grpc.CandidateServiceStub]]:
    save_graph(redis_client, hub_graph())
    entry = (np.asarray([9, 4, 2]), np.asarray([0.9, 0.8, 0.7]))
    lists.write_lists(redis_client, "pymk", np.asarray([7]), [entry], version="nightly")
    # No budget: the hub's expansion is as slow as it gets.
    cfg = Config(home=tmp_path, redis_url=redis_proc.url, qdrant_url="", fof_max_visits=0)
    service = CandidatesService(cfg)
    server, port, _ = await start_server(service, "127.0.0.1:0")
    ch = channel(f"127.0.0.1:{port}")
    try:
        yield service, candidates_pb2_grpc.CandidateServiceStub(ch)
    finally:
        await ch.close()
        await server.stop(None)
        await service.stop()


def _hub_requests(copies: int) -> list[candidates_pb2.GenerateRequest]:
    return [
        candidates_pb2.GenerateRequest(
            member=0, source="graph", limit=500, params={"weight": "adamic_adar"}
        )
        for _ in range(copies)
    ]


async def _timed(call: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = await call
    return out, time.perf_counter() - t


async def test_cheap_sources_answer_while_a_hub_is_expanded(
    hub_service: tuple[CandidatesService, candidates_pb2_grpc.CandidateServiceStub],
) -> None:
    """Precomputed and popular, in the same GenerateMany as a dozen of a hub's friends of
    friends, answer within a timeout of half the time those take alone."""
    _, stub = hub_service
    hubs = candidates_pb2.GenerateManyRequest(requests=_hub_requests(12))
    await stub.GenerateMany(hubs, timeout=60)  # warm-up
    _, slow_s = await _timed(stub.GenerateMany(hubs, timeout=60))
    cheap_ms = max(1, int(slow_s * 1000 / 2))
    mixed = candidates_pb2.GenerateManyRequest(requests=_hub_requests(12))
    mixed.requests.add(member=7, source="precomputed", limit=10, params={"list": "pymk"},
                       timeout_ms=cheap_ms)  # fmt: skip
    mixed.requests.add(member=7, source="popular", limit=10, timeout_ms=cheap_ms)
    many, mixed_s = await _timed(stub.GenerateMany(mixed, timeout=60))
    *graph, pre, popular = many.results
    assert all(r.code == 0 and len(r.response.ids) == 500 for r in graph)
    assert pre.code == 0, (pre.message, cheap_ms, slow_s)
    assert list(pre.response.ids) == [9, 4, 2]
    assert popular.code == 0 and len(popular.response.ids) == 10, popular.message
    assert mixed_s > cheap_ms / 1000  # the hub's work did take longer than the cheap timeout

    # A Generate call of its own, sent while the hubs are being expanded, answers before
    # they are done.
    task = asyncio.ensure_future(_timed(stub.GenerateMany(hubs, timeout=60)))
    await asyncio.sleep(0)
    single, single_s = await _timed(
        stub.Generate(
            candidates_pb2.GenerateRequest(member=7, source="popular", limit=5), timeout=60
        )
    )
    _, hubs_s = await task
    assert len(single.ids) == 5
    assert single_s < hubs_s / 2, (single_s, hubs_s)


async def test_a_request_past_its_deadline_does_no_work(
    hub_service: tuple[CandidatesService, candidates_pb2_grpc.CandidateServiceStub],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, _ = hub_service
    ran: list[str] = []
    for name, source in service._sources.items():
        real = source.generate

        async def spy(*args: Any, _real: Any = real, _name: str = name) -> Any:
            ran.append(_name)
            return await _real(*args)

        monkeypatch.setattr(source, "generate", spy)
    req = candidates_pb2.GenerateManyRequest(requests=_hub_requests(2))
    req.requests.add(member=7, source="precomputed", limit=10, params={"list": "pymk"})
    req.requests.add(member=7, source="popular", limit=10, timeout_ms=50)
    many = await service.generate_many(req, time_remaining=0.0)
    for r in many.results:
        assert r.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], r.message
        assert "not started: the request's deadline passed" in r.message
    assert ran == []
    # With time left, the same request does its work.
    many = await service.generate_many(req, time_remaining=30.0)
    assert all(r.code == 0 for r in many.results)
    assert sorted(set(ran)) == ["graph", "popular", "precomputed"]


async def test_late_feature_requests_read_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = FeaturesService(Config(home=tmp_path, redis_url="redis://127.0.0.1:1/0"))
    reads: list[Any] = []
    monkeypatch.setattr(service.reader, "read_pipelined", lambda *a: reads.append(a))
    request = features_pb2.GetFeaturesRequest(member=1, entities=[2, 3])
    with cpu.deadline_in(-0.001), pytest.raises(cpu.DeadlineExpired):
        await service.get_features(request)
    assert reads == []


class _LateContext:
    """A servicer context whose call's deadline has passed."""

    def time_remaining(self) -> float:
        return 0.0


async def test_late_score_requests_are_not_scored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression
    from test_scoring import FEATURES, card

    from edgeflow import tensor
    from edgeflow.scoring.registry import ModelRegistry, publish_model
    from edgeflow.scoring.service import _Servicer
    from edgeflow.v1 import scoring_pb2

    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, len(FEATURES))).astype(np.float32)
    model = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    onx = to_onnx(model, x[:1], options={"zipmap": False}, target_opset=17)
    publish_model(tmp_path, "ranker", onx.SerializeToString(), card())
    registry = ModelRegistry(tmp_path)
    registry.refresh()
    scored: list[Any] = []
    loaded = registry.get("ranker")
    monkeypatch.setattr(type(loaded), "score", lambda self, *a: scored.append(a))
    request = scoring_pb2.ScoreRequest(model="ranker", features=tensor.pack(x[:5], FEATURES))
    with pytest.raises(RequestError) as info:
        await _Servicer(registry).Score(request, _LateContext())  # type: ignore[arg-type]
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "score: not started" in info.value.message
    assert scored == []


# ---- the gateway: one GenerateMany per node timeout -------------------------------------------
class _RecordingCandidates:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], float]] = []
        self.futures: list[asyncio.Future[candidates_pb2.GenerateManyResponse]] = []

    def GenerateMany(
        self, req: candidates_pb2.GenerateManyRequest, timeout: float, metadata: Any
    ) -> asyncio.Future[candidates_pb2.GenerateManyResponse]:
        self.calls.append(([r.source for r in req.requests], timeout))
        self.futures.append(asyncio.get_running_loop().create_future())
        return self.futures[-1]


def _engine(batching: str) -> tuple[Engine, _RecordingCandidates]:
    fake = _RecordingCandidates()
    clients = Clients(candidates=fake, features=None, scoring=None, merging=None)  # type: ignore[arg-type]
    return Engine(clients, batching=batching), fake


PYMK = REPO_ROOT / "workflows" / "pymk.yaml"


def _calls(fake: _RecordingCandidates) -> list[list[str]]:
    return sorted(sources for sources, _ in fake.calls)


@pytest.mark.parametrize("batching", ["auto", "timeout", "all"])
async def test_gateway_batches_candidate_sources_as_configured(batching: str) -> None:
    engine, fake = _engine(batching)
    batches = engine._start_batches(load_workflow(PYMK), 7, 0.15)
    assert set(batches) == {"fof", "ebr", "precomputed", "popular"}
    if batching == "timeout":  # fof and ebr: 40 ms; precomputed and popular: 20 ms
        assert _calls(fake) == [["graph", "ebr"], ["precomputed", "popular"]]
        assert sorted(t for _, t in fake.calls) == [0.02, 0.04]
    else:
        assert _calls(fake) == [["graph", "ebr", "precomputed", "popular"]]
        assert [t for _, t in fake.calls] == [0.04]
    # auto: pymk's features and blend, which take the precomputed list, wait on friends of
    # friends and EBR anyway, so the list's node may wait for the whole call.
    waits = {"precomputed", "popular"} if batching == "auto" else set()
    assert set(batches["fof"].wait_until) == waits
    for batch in batches.values():
        batch.task.cancel()
    with pytest.raises(ValueError, match="EDGEFLOW_CANDIDATE_BATCHES must be one of"):
        _engine("sometimes")


async def test_a_cheap_source_answered_in_a_slow_call_is_not_given_up() -> None:
    """The list answers in the call that also carries friends of friends, after 30 ms: its
    node (timeout 20 ms) takes it when its consumers wait for that call anyway, and gives
    it up when every node waits its own timeout (batching "all")."""
    wf = load_workflow(PYMK)
    node = next(cn for cn in wf.nodes if cn.node.name == "precomputed")
    outcome: dict[str, str] = {}
    for batching in ("auto", "all"):
        engine, fake = _engine(batching)
        batches = engine._start_batches(wf, 7, 0.15)
        answer = candidates_pb2.GenerateManyResponse()
        for _ in range(3):
            answer.results.add().response.ids.append(42)
        asyncio.get_running_loop().call_later(0.03, fake.futures[0].set_result, answer)
        try:
            resp = await engine._batched(node, batches["precomputed"], 7, 0.02)
            outcome[batching] = f"answered {list(resp.ids) if resp else None}"
        except Exception as exc:
            outcome[batching] = type(exc).__name__
        await asyncio.sleep(0.05)
    assert outcome == {"auto": "answered [42]", "all": "NodeError"}


async def test_a_source_needed_sooner_gets_its_own_call(tmp_path: Path) -> None:
    """A filter that takes only the precomputed list cannot wait for friends of friends:
    with "auto" the list goes in a call of its own."""
    import yaml

    doc = yaml.safe_load(PYMK.read_text())
    nodes = doc["spec"]["nodes"]
    nodes.insert(3, {"name": "quick", "op": "filter.self", "inputs": ["precomputed"],
                     "timeoutMs": 20, "fallback": "fail"})  # fmt: skip
    blend = next(n for n in nodes if n["name"] == "blend")
    blend["inputs"] = ["rank", "quick"]
    blend["params"]["weights"] = {"rank": 1.0, "quick": 0.5}
    path = tmp_path / "pymk.yaml"
    path.write_text(yaml.safe_dump(doc))
    engine, fake = _engine("auto")
    batches = engine._start_batches(load_workflow(path), 7, 0.15)
    assert _calls(fake) == [["graph", "ebr", "popular"], ["precomputed"]]
    # popular's consumers wait on friends of friends and EBR anyway; the list's do not.
    assert not batches["precomputed"].wait_until
    assert set(batches["fof"].wait_until) == {"popular"}
    for batch in batches.values():
        batch.task.cancel()
