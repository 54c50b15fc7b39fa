"""Candidate sources and the candidates service, on a real Redis and real vector engines:
qdrant-edge in process (the default) and qdrant-client's local mode standing in for a server.

The small graph (ids 1..11) has answers worked out by hand:
  1-2 1-3 2-4 3-4 2-5 2-10 2-11 3-9 4-6 5-6 7-8
Member 1 knows 2 and 3; its friends of friends are 4 (via 2 and 3), then 5, 9, 10, 11.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast

import grpc
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from qdrant_client import QdrantClient, models

from edgeflow import tensor
from edgeflow.candidates.service import CandidatesService, create
from edgeflow.candidates.sources import (
    EbrSource,
    Embeddings,
    GraphSource,
    InvalidParam,
    MemberNotFound,
    NotReady,
    PopularSource,
    PrecomputedSource,
    VectorIndex,
)
from edgeflow.config import Config
from edgeflow.graph import Graph, pair_measures, read_edge_file
from edgeflow.local.redis_server import RedisProcess, start_redis
from edgeflow.shell.server import channel, start_server
from edgeflow.stores import keys, lists, vectors
from edgeflow.stores.graph_store import GraphStore, save_graph
from edgeflow.v1 import candidates_pb2, candidates_pb2_grpc

# A QdrantClient for a server that is not there warns (later, from its own thread).
pytestmark = pytest.mark.filterwarnings("ignore:Failed to obtain server version")

EDGES = [(1, 2), (1, 3), (2, 4), (3, 4), (2, 5), (2, 10), (2, 11), (3, 9), (4, 6), (5, 6), (7, 8)]
# Angles of 2-D unit vectors: cosine to member 1 falls with the angle. Member 8 has none.
ANGLES = {1: 0.0, 2: 0.1, 3: 0.2, 7: 0.05, 4: 0.3, 6: 0.4, 5: 0.5, 9: 1.0, 10: 2.0, 11: 3.0}


def small_graph() -> Graph:
    src, dst = (np.asarray(col, dtype=np.int64) for col in zip(*EDGES, strict=True))
    return Graph.from_edges(src, dst)


def embed(angles: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(sorted(angles), dtype=np.int64)
    theta = np.asarray([angles[int(m)] for m in ids])
    return ids, np.stack([np.cos(theta), np.sin(theta)], axis=1).astype(np.float32)


@pytest.fixture
async def aclient(redis_proc: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_proc.url)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_client: redis.Redis, aclient: aioredis.Redis) -> GraphStore:
    save_graph(redis_client, small_graph())
    graph_store = GraphStore(aclient)
    assert await graph_store.load()
    return graph_store


@pytest.fixture
def qdrant(tmp_path: Path) -> Iterator[QdrantClient]:
    client = QdrantClient(path=str(tmp_path / "qdrant"))
    yield client
    client.close()


# ---- sources ------------------------------------------------------------------------------
async def test_graph_source_counts_common_neighbours_and_excludes(store: GraphStore) -> None:
    source = GraphSource(store)
    out = await source.generate(1, 10, {})
    assert out.ids.tolist() == [4, 5, 9, 10, 11]
    assert out.scores.tolist() == [2, 1, 1, 1, 1]
    assert out.column == "common_neighbors" and out.version == store.graph.version
    assert (await source.generate(1, 2, {})).ids.tolist() == [4, 5]
    assert (await source.generate(7, 10, {})).ids.size == 0  # only friend is 8, who knows only 7


async def test_graph_source_adamic_adar_and_min_common(store: GraphStore) -> None:
    source = GraphSource(store)
    # Via 3 (degree 3) weighs more than via 2 (degree 5): 9 overtakes 5, 10 and 11.
    out = await source.generate(1, 10, {"weight": "adamic_adar"})
    assert out.ids.tolist() == [4, 9, 5, 10, 11]
    assert out.scores.tolist() == [2, 1, 1, 1, 1]  # scores stay the counts
    for weight in ("common", "adamic_adar"):
        strict = await source.generate(1, 10, {"weight": weight, "min_common": "2"})
        assert strict.ids.tolist() == [4]


async def test_graph_source_rejects_bad_params_and_unknown_members(store: GraphStore) -> None:
    source = GraphSource(store)
    with pytest.raises(InvalidParam, match=r"params.weight: must be 'common' or 'adamic_adar'"):
        await source.generate(1, 10, {"weight": "pagerank"})
    with pytest.raises(InvalidParam, match=r"params.min_common: must be an integer, got 'x'"):
        await source.generate(1, 10, {"min_common": "x"})
    with pytest.raises(InvalidParam, match=r"params.min_common: must be between 1"):
        await source.generate(1, 10, {"min_common": "0"})
    with pytest.raises(InvalidParam, match=r"params.wieght: unknown parameter for source 'graph'"):
        await source.generate(1, 10, {"wieght": "common"})
    with pytest.raises(MemberNotFound, match="member 999 is not in the graph"):
        await source.generate(999, 10, {})


async def test_popular_excludes_member_and_connections(store: GraphStore) -> None:
    source = PopularSource(store)
    out = await source.generate(1, 5, {})
    assert out.ids.tolist() == [4, 5, 6, 7, 8]  # 2 and 3 are 1's connections
    assert out.scores.tolist() == [3, 2, 2, 1, 1] and out.column == "degree"
    # A member the graph does not know still gets the most connected members.
    assert (await source.generate(999, 4, {})).ids.tolist() == [2, 3, 4, 1]


@pytest.mark.filterwarnings("ignore:Local mode performs exact")  # the stand-in server
@pytest.mark.parametrize("engine", ["server", "in_process"])
async def test_ebr_nearest_by_cosine_after_dropping_self_and_connections(
    store: GraphStore,
    qdrant: QdrantClient,
    redis_client: redis.Redis,
    aclient: aioredis.Redis,
    tmp_path: Path,
    engine: str,
) -> None:
    """Both engines (a Qdrant server's query_points, played by qdrant-client's local mode,
    and qdrant-edge's HNSW in process) give the same answers."""
    root = tmp_path / "vectors"
    writer: vectors.Store
    if engine == "server":
        writer, emb = vectors.ServerStore(qdrant), Embeddings(client=qdrant)
    else:
        writer, emb = vectors.EdgeStore(root), Embeddings(root=root)
    ids, vecs = embed(ANGLES)
    name = vectors.write_embeddings(writer, redis_client, ids, vecs, "v1")
    assert await emb.refresh(aclient) and emb.collection == name
    if engine == "in_process":  # its own copy, never the sealed shard training wrote
        assert isinstance(emb.reader, vectors.EdgeReplica)
        assert emb.reader.path.parent == root / "readers" and (root / "shards" / name).is_dir()
    source = EbrSource(store, emb)
    out = await source.generate(1, 3, {})
    assert out.ids.tolist() == [7, 4, 6]
    np.testing.assert_allclose(out.scores, np.cos([0.05, 0.3, 0.4]), rtol=1e-5)
    assert out.column == "cosine" and out.version == name
    assert (await source.generate(8, 3, {})).ids.size == 0  # in the graph, but no vector
    with pytest.raises(MemberNotFound):
        await source.generate(999, 3, {})

    # A new training run moves the pointer; the source follows it.
    old = emb.reader
    moved = {**ANGLES, 1: 2.0}
    name2 = vectors.write_embeddings(writer, redis_client, *embed(moved), "v2")
    assert await emb.refresh(aclient) and emb.collection == name2
    assert (await source.generate(1, 1, {})).ids.tolist() == [10]
    assert not await emb.refresh(aclient)  # nothing new
    if isinstance(old, vectors.EdgeReplica):
        assert not old.path.exists()  # the previous copy is gone with its replica
    emb.close()


async def test_ebr_without_embeddings_says_what_to_run(store: GraphStore) -> None:
    source = EbrSource(store, Embeddings(problem="storage locked"))
    with pytest.raises(NotReady, match="storage locked"):
        await source.generate(1, 3, {})
    with pytest.raises(NotReady, match=r"run `edgeflow train` first"):
        await EbrSource(store, Embeddings(root=Path("/nonexistent"))).generate(1, 3, {})


def _clustered(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids (not row numbers) and vectors in Gaussian clusters of about 100."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n // 100, dim))
    vecs = centers[rng.integers(0, centers.shape[0], n)] + 0.4 * rng.normal(size=(n, dim))
    return rng.choice(10**7, size=n, replace=False).astype(np.int64), vecs.astype(np.float32)


def test_hnsw_returns_the_exact_top_k_on_clustered_vectors(tmp_path: Path) -> None:
    """The in-process HNSW search against exact cosine (VectorIndex): recall@100 and the
    scores, with the member and its "connections" (its 30 exact nearest) excluded."""
    ids, vecs = _clustered(4000, 32, seed=3)
    vectors.EdgeStore(tmp_path).begin("c", ids, vecs).finish()
    exact = VectorIndex(ids, vecs)
    replica = vectors.EdgeReplica.open(tmp_path, "c")
    try:
        rng = np.random.default_rng(4)
        recalls = []
        for row in rng.choice(ids.size, 40, replace=False):
            member = int(ids[row])
            near, _ = exact.nearest(member, 30, np.asarray([member]))
            exclude = np.sort(np.append(near, member))
            want, _ = exact.nearest(member, 100, exclude)
            got, scores = replica.nearest(member, 100, exclude)
            assert got.size == 100 and not np.isin(got, exclude).any()
            assert np.all(np.diff(scores) <= 1e-6)  # best first
            unit = exact.vectors[exact.rows(np.asarray([member]))][0]
            cos = exact.vectors[exact.rows(got)] @ unit
            np.testing.assert_allclose(scores, cos, atol=1e-4)  # rescored: exact cosine
            recalls.append(np.isin(got, want).mean())
        assert np.mean(recalls) >= 0.95, np.mean(recalls)
        assert replica.nearest(-5, 10, np.zeros(0, np.int64))[0].size == 0  # no such point
    finally:
        replica.close()
    assert not replica.path.exists()


def test_training_writes_a_fresh_shard_while_a_reader_holds_the_previous(tmp_path: Path) -> None:
    """No two processes share a directory: each reader opens its own copy, so a build and
    any number of readers (here two, as two processes would) run side by side."""
    ids, vecs = _clustered(600, 8, seed=1)
    store = vectors.EdgeStore(tmp_path)
    store.begin("a", ids, vecs).finish()
    first = vectors.EdgeReplica.open(tmp_path, "a")
    second = vectors.EdgeReplica.open(tmp_path, "a")  # another reader: another copy
    try:
        assert first.path != second.path and first.path.is_dir() and second.path.is_dir()
        first.close()
        assert not first.path.exists() and second.path.is_dir()
        store.begin("a", ids, vecs[::-1].copy()).finish()  # retrained under the same name
        store.begin("b", ids, vecs).finish()
        store.drop_old("b", "a")
        assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["a", "b"]
        member = int(ids[0])
        got, _ = second.nearest(member, 5, np.asarray([member]))
        assert got.size == 5  # the reader still serves its copy
        fresh = vectors.EdgeReplica.open(tmp_path, "a")
        assert fresh.build != second.build  # the rebuilt shard is a new one
        fresh.close()
    finally:
        second.close()


class _RecordingServer:
    """Just enough of QdrantClient to see what a server would be asked to create."""

    def __init__(self) -> None:
        self.created: dict[str, object] = {}
        self.upserted = 0

    def collection_exists(self, name: str) -> bool:
        return False

    def create_collection(self, name: str, **kwargs: object) -> None:
        self.created = {"name": name, **kwargs}

    def upsert(self, name: str, points: models.Batch, wait: bool) -> None:
        self.upserted += len(points.ids)


def test_server_collection_takes_shards_replicas_and_hnsw_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for var, value in {
        "QDRANT_URL": "http://127.0.0.1:1",  # never called: creating a client connects nothing
        "QDRANT_SHARDS": "3",
        "QDRANT_REPLICAS": "2",
        "QDRANT_HNSW_M": "24",
        "QDRANT_HNSW_EF_CONSTRUCT": "200",
        "QDRANT_HNSW_EF": "300",
    }.items():
        monkeypatch.setenv(var, value)
    store = vectors.open_store(Config(home=tmp_path))
    assert isinstance(store, vectors.ServerStore)
    assert (store.shards, store.replicas) == (3, 2)
    assert store.hnsw == vectors.Hnsw(m=24, ef_construct=200, ef=300, quantization="none")
    store.close()
    server = _RecordingServer()
    ids, vecs = embed(ANGLES)
    build = vectors.ServerStore(cast(QdrantClient, server), 3, 2, store.hnsw).begin("c", ids, vecs)
    assert build.finish().points == ids.size == server.upserted
    assert server.created["shard_number"] == 3 and server.created["replication_factor"] == 2
    hnsw = server.created["hnsw_config"]
    assert isinstance(hnsw, models.HnswConfigDiff) and (hnsw.m, hnsw.ef_construct) == (24, 200)
    monkeypatch.setenv("QDRANT_QUANTIZATION", "int4")
    with pytest.raises(ValueError, match="QDRANT_QUANTIZATION must be 'int8' or 'none'"):
        vectors.open_store(Config(home=tmp_path))
    monkeypatch.setenv("QDRANT_QUANTIZATION", "none")
    monkeypatch.setenv("QDRANT_SHARDS", "0")
    with pytest.raises(ValueError, match="QDRANT_SHARDS and QDRANT_REPLICAS must be at least 1"):
        vectors.open_store(Config(home=tmp_path))


QDRANT_VERSION = importlib.metadata.version("qdrant-client")  # what the client checks for


class _QdrantStub(ThreadingHTTPServer):
    """A Qdrant server's REST answers to `GET /` and `GET /collections`, recording the
    api-key header of every request."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, str | None]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stub.keys.append((self.path, self.headers.get("api-key")))
                body: dict[str, object] = (
                    {"result": {"collections": []}, "status": "ok", "time": 0.0}
                    if self.path.startswith("/collections")
                    else {"title": "qdrant - vector search engine", "version": QDRANT_VERSION}
                )
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self, clients: int) -> None:
        """Stop once the version check of each client made (its own thread) has come."""
        deadline = time.monotonic() + 5
        while sum(p == "/" for p, _ in self.keys) < clients and time.monotonic() < deadline:
            time.sleep(0.01)
        self.shutdown()
        self.server_close()


# Plain http to the stub: the client warns that the key travels unencrypted.
@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_qdrant_api_key_reaches_the_server_in_the_api_key_header(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server, keyless = _QdrantStub(), _QdrantStub()
    try:
        monkeypatch.setenv("QDRANT_URL", server.url)
        monkeypatch.setenv("QDRANT_API_KEY", "k3y-for-qdrant")
        cfg = Config(home=tmp_path)
        assert cfg.qdrant_api_key == "k3y-for-qdrant"
        assert "k3y-for-qdrant" not in repr(cfg)  # a logged Config does not show it
        # Training's store and the candidates service's embeddings both send it.
        store = vectors.open_store(cfg)
        assert isinstance(store, vectors.ServerStore)
        assert store.client.get_collections().collections == []
        store.close()
        embeddings = Embeddings.open(cfg)
        assert embeddings.client is not None
        assert embeddings.client.get_collections().collections == []
        embeddings.close()
        asked = [key for path, key in server.keys if path.startswith("/collections")]
        assert asked == ["k3y-for-qdrant"] * 2
        # (the clients' version checks, from their own threads, send it too)
        assert {key for _, key in server.keys} == {"k3y-for-qdrant"}
        # Without QDRANT_API_KEY, no api-key header at all.
        monkeypatch.delenv("QDRANT_API_KEY")
        monkeypatch.setenv("QDRANT_URL", keyless.url)
        store = vectors.open_store(Config(home=tmp_path))
        assert isinstance(store, vectors.ServerStore)
        store.client.get_collections()
        store.close()
        assert keyless.keys and {key for _, key in keyless.keys} == {None}
    finally:
        server.stop(clients=2)
        keyless.stop(clients=1)


def test_a_missing_or_corrupt_shard_is_refused_naming_its_path(tmp_path: Path) -> None:
    with pytest.raises(vectors.ShardUnavailable, match=rf"{tmp_path}/shards/ghost is missing"):
        vectors.EdgeReplica.open(tmp_path, "ghost")
    ids, vecs = _clustered(300, 8, seed=2)
    vectors.EdgeStore(tmp_path).begin("c", ids, vecs).finish()
    sealed = tmp_path / "shards" / "c"
    for matrix in sealed.glob("segments/*/vector_storage/matrix.dat"):
        matrix.write_bytes(b"\0" * 10)
    with pytest.raises(vectors.ShardUnavailable, match=rf"embedding shard {sealed} is corrupt"):
        vectors.EdgeReplica.open(tmp_path, "c")
    for segment in sealed.glob("segments/*/segment.json"):
        segment.write_text("{garbage")
    with pytest.raises(vectors.ShardUnavailable, match=rf"embedding shard {sealed} is unreadable"):
        vectors.EdgeReplica.open(tmp_path, "c")
    (sealed / vectors.MARKER).unlink()
    with pytest.raises(vectors.ShardUnavailable, match=rf"{sealed} is incomplete"):
        vectors.EdgeReplica.open(tmp_path, "c")
    assert not any((tmp_path / "readers").iterdir())  # no copy is left behind


async def test_a_broken_new_shard_keeps_the_previous_serving_and_says_why(
    store: GraphStore, redis_client: redis.Redis, aclient: aioredis.Redis, tmp_path: Path
) -> None:
    writer = vectors.EdgeStore(tmp_path)
    vectors.write_embeddings(writer, redis_client, *embed(ANGLES), "v1")
    emb = Embeddings(root=tmp_path)
    source = EbrSource(store, emb)
    assert await emb.refresh(aclient)
    redis_client.set(keys.EMBEDDINGS_CURRENT, "members_gone")  # deleted by hand, say
    assert not await emb.refresh(aclient)
    assert (await source.generate(1, 2, {})).ids.tolist() == [7, 4]  # v1 keeps serving
    assert f"{tmp_path}/shards/members_gone is missing" in emb.problem
    emb.close()
    fresh = Embeddings(root=tmp_path)  # a service started now has nothing to serve
    assert not await fresh.refresh(aclient)
    with pytest.raises(NotReady, match=rf"{tmp_path}/shards/members_gone is missing"):
        await EbrSource(store, fresh).generate(1, 2, {})


async def test_precomputed_reads_the_live_list_and_drops_connections(
    store: GraphStore, redis_client: redis.Redis, redis_proc: RedisProcess
) -> None:
    # 2 became a connection after the list was computed, and 1 is the member itself.
    entry = (np.asarray([2, 9, 4, 1]), np.asarray([0.9, 0.8, 0.7, 0.6]))
    version = lists.write_lists(redis_client, "pymk", np.asarray([1]), [entry])
    source = PrecomputedSource(redis_proc.url, store)
    out = await source.generate(1, 10, {"list": "pymk"})
    assert out.ids.tolist() == [9, 4] and out.version == version and out.column == "list_score"
    np.testing.assert_allclose(out.scores, [0.8, 0.7])
    assert 0 <= out.age_seconds < 60
    assert (await source.generate(1, 1, {"list": "pymk"})).ids.tolist() == [9]
    empty = await source.generate(999, 10, {"list": "pymk"})  # no list: empty, not an error
    assert empty.ids.size == 0
    # An empty answer says why: the member has no entry, or the list was never written.
    assert out.note == "" and empty.version == version
    assert empty.note == f"list 'pymk' has no entry for member 999 (live version {version})"
    never = await source.generate(1, 10, {"list": "other"})
    assert never.ids.size == 0 and never.version == ""
    assert never.note == "list 'other' has never been written (no offline run has published it)"
    # An entry left with only connections (and the member itself) after the drop.
    connected_only = (np.asarray([2, 1]), np.asarray([0.5, 0.4]))
    lists.update_lists(redis_client, "pymk", np.asarray([1]), [connected_only])
    stale = await source.generate(1, 10, {"list": "pymk"})
    assert stale.ids.size == 0
    assert stale.note == (
        f"the entry of member 1 in list 'pymk' (version {version}) holds only members it is "
        "now connected to"
    )
    with pytest.raises(InvalidParam, match=r"params\.list: is required"):
        await source.generate(1, 10, {})
    with pytest.raises(InvalidParam, match=r"params\.list: list name 'a:b' is invalid"):
        await source.generate(1, 10, {"list": "a:b"})


async def test_graph_source_on_facebook_matches_pair_measures(
    facebook_edges: Path, redis_client: redis.Redis, aclient: aioredis.Redis
) -> None:
    graph = Graph.from_edges(*read_edge_file(facebook_edges))
    save_graph(redis_client, graph)
    graph_store = GraphStore(aclient)
    await graph_store.load()
    hub = int(graph.ids[np.argmax(graph.degree)])
    out = await GraphSource(graph_store).generate(hub, 500, {})
    i = graph.index_of(hub)
    assert out.ids.size == 500 and hub not in out.ids
    assert not np.isin(out.ids, graph.ids[graph.neighbors(i)]).any()
    assert np.all(np.diff(out.scores) <= 0)
    cn = pair_measures(graph, i, graph.indices_of(out.ids), graph_store.inv_log_degree)[:, 0]
    np.testing.assert_array_equal(out.scores, cn)


# ---- the service over real gRPC ---------------------------------------------------------------
def _config(home: Path, redis_url: str) -> Config:
    return Config(home=home, redis_url=redis_url, qdrant_url="", reload_interval_s=0.1)


def _seed(client: redis.Redis, qdrant_path: Path) -> str:
    """Store the small graph, its embeddings and a list; returns the graph's version."""
    graph = small_graph()
    save_graph(client, graph)
    vectors.write_embeddings(vectors.EdgeStore(qdrant_path), client, *embed(ANGLES), "v1")
    entry = (np.asarray([9, 4, 2]), np.asarray([0.9, 0.8, 0.7]))
    lists.write_lists(client, "pymk", np.asarray([1]), [entry], version="nightly")
    return graph.version


class Running:
    def __init__(self, service: CandidatesService, server: grpc.aio.Server, port: int) -> None:
        self.service, self.server = service, server
        self.channel = channel(f"127.0.0.1:{port}")
        self.stub = candidates_pb2_grpc.CandidateServiceStub(self.channel)

    async def generate(
        self, member: int, source: str, limit: int = 10, **params: str
    ) -> candidates_pb2.GenerateResponse:
        request = candidates_pb2.GenerateRequest(
            member=member, source=source, limit=limit, params=params
        )
        response: candidates_pb2.GenerateResponse = await self.stub.Generate(request, timeout=10)
        return response

    async def error(
        self, member: int, source: str, limit: int = 10, **params: str
    ) -> grpc.RpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await self.generate(member, source, limit, **params)
        return info.value

    async def close(self) -> None:
        await self.channel.close()
        await self.server.stop(None)
        await self.service.stop()


async def _run(cfg: Config) -> Running:
    service = create(cfg)
    assert isinstance(service, CandidatesService)
    server, port, _ = await start_server(service, "127.0.0.1:0")
    return Running(service, server, port)


async def test_service_generates_from_every_source(
    tmp_path: Path, redis_proc: RedisProcess, redis_client: redis.Redis
) -> None:
    cfg = _config(tmp_path, redis_proc.url)
    graph_version = _seed(redis_client, cfg.qdrant_path)
    running = await _run(cfg)
    try:
        health = health_pb2_grpc.HealthStub(running.channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="edgeflow.v1.CandidateService")
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        graph = await running.generate(1, "graph", weight="adamic_adar")
        assert list(graph.ids) == [4, 9, 5, 10, 11]
        assert list(graph.scores.columns) == ["common_neighbors"]
        assert tensor.unpack(graph.scores)[:, 0].tolist() == [2, 1, 1, 1, 1]
        assert graph.version == graph_version

        ebr = await running.generate(1, "ebr", limit=2)
        assert list(ebr.ids) == [7, 4] and list(ebr.scores.columns) == ["cosine"]
        assert ebr.version == vectors.collection_name("v1")

        pre = await running.generate(1, "precomputed", list="pymk")
        assert list(pre.ids) == [9, 4] and pre.version == "nightly"
        assert 0 <= pre.age_seconds < 60

        popular = await running.generate(424242, "popular", limit=3)
        assert list(popular.ids) == [2, 3, 4]
        assert tensor.unpack(popular.scores).shape == (3, 1)
    finally:
        await running.close()
    # stop() closed the service's copy of the shard and deleted it; the sealed one stays.
    assert not any((cfg.qdrant_path / "readers").iterdir())
    assert (cfg.qdrant_path / "shards" / vectors.collection_name("v1")).is_dir()


async def test_running_service_follows_a_new_shard_without_restart(
    tmp_path: Path, redis_proc: RedisProcess, redis_client: redis.Redis
) -> None:
    cfg = _config(tmp_path, redis_proc.url)
    _seed(redis_client, cfg.qdrant_path)
    running = await _run(cfg)
    try:
        assert list((await running.generate(1, "ebr", limit=2)).ids) == [7, 4]
        # `edgeflow train` beside the running service: a fresh shard, then the pointer.
        store = vectors.EdgeStore(cfg.qdrant_path)
        vectors.write_embeddings(store, redis_client, *embed({**ANGLES, 1: 2.0}), "v2")
        for _ in range(100):  # the service polls every 0.1 s
            ebr = await running.generate(1, "ebr", limit=1)
            if ebr.version == vectors.collection_name("v2"):
                break
            await asyncio.sleep(0.05)
        assert list(ebr.ids) == [10] and ebr.version == vectors.collection_name("v2")
        for _ in range(100):  # the old copy is deleted right after the switch
            copies = [p.name for p in (cfg.qdrant_path / "readers").iterdir()]
            if len(copies) == 1:
                break
            await asyncio.sleep(0.02)
        assert len(copies) == 1 and copies[0].endswith("-members_v2")
        assert f"-{os.getpid()}-" in copies[0]
    finally:
        await running.close()


async def test_service_status_codes_name_the_field(
    tmp_path: Path, redis_proc: RedisProcess, redis_client: redis.Redis
) -> None:
    cfg = _config(tmp_path, redis_proc.url)
    _seed(redis_client, cfg.qdrant_path)
    running = await _run(cfg)
    try:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        missing = grpc.StatusCode.NOT_FOUND
        cases: list[tuple[int, str, int, dict[str, str], grpc.StatusCode, str]] = [
            (1, "nope", 10, {}, invalid, "source: unknown candidate source 'nope'"),
            (1, "graph", 0, {}, invalid, "limit: must be between 1 and 5000, got 0"),
            (1, "graph", 5001, {}, invalid, "limit: must be between 1 and 5000, got 5001"),
            (-3, "graph", 10, {}, invalid, "member: ids are non-negative, got -3"),
            (1, "graph", 10, {"weight": "x"}, invalid, "params.weight: must be 'common'"),
            (1, "ebr", 10, {"k": "1"}, invalid, "params.k: unknown parameter for source 'ebr'"),
            (1, "precomputed", 10, {}, invalid, "params.list: is required"),
            (999, "graph", 10, {}, missing, "member 999 is not in the graph"),
            (999, "ebr", 10, {}, missing, "member 999 is not in the graph"),
        ]
        for member, source, limit, params, code, text in cases:
            err = await running.error(member, source, limit, **params)
            assert err.code() == code, (source, params, err.details())
            assert text in (err.details() or ""), (source, params, err.details())
        # The gateway sends workflow params as written in YAML, camelCase included.
        strict = await running.generate(1, "graph", weight="common", minCommon="2")
        assert list(strict.ids) == [4]
    finally:
        await running.close()


async def test_service_starts_without_data_and_follows_a_later_ingest(
    tmp_path: Path, redis_proc: RedisProcess, redis_client: redis.Redis
) -> None:
    running = await _run(_config(tmp_path, redis_proc.url))
    try:
        for source in ("graph", "ebr", "popular"):
            err = await running.error(1, source)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "edgeflow ingest" in (err.details() or "")
        assert list((await running.generate(1, "precomputed", list="pymk")).ids) == []

        save_graph(redis_client, small_graph())
        for _ in range(100):  # the service polls every 0.1 s
            try:
                await running.generate(1, "graph")
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
        assert list((await running.generate(1, "graph")).ids) == [4, 5, 9, 10, 11]
        err = await running.error(1, "ebr")
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "edgeflow train" in (err.details() or "")
    finally:
        await running.close()


async def test_redis_stopped_gives_unavailable_and_memory_sources_keep_serving(
    tmp_path: Path,
) -> None:
    proc = start_redis(tmp_path / "redis")
    killed = False
    try:
        cfg = _config(tmp_path, proc.url)
        client = redis.Redis.from_url(proc.url)
        _seed(client, cfg.qdrant_path)
        client.close()
        running = await _run(cfg)
        try:
            assert list((await running.generate(1, "precomputed", list="pymk")).ids) == [9, 4]
            os.kill(proc.pid, signal.SIGKILL)  # Redis goes away without warning
            killed = True
            for _ in range(3):  # every request fails fast, none hangs
                err = await running.error(1, "precomputed", list="pymk")
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                assert f"Redis at {proc.url} is unavailable" in (err.details() or "")
            # The graph and the embeddings are in memory: those sources still answer.
            assert list((await running.generate(1, "graph")).ids) == [4, 5, 9, 10, 11]
            assert list((await running.generate(1, "ebr", limit=1)).ids) == [7]
        finally:
            await running.close()
    finally:
        if not killed:
            proc.stop()


def test_exact_index_equals_query_points_on_random_vectors(tmp_path: Path) -> None:
    """VectorIndex (the offline job's exact cosine) against qdrant-client's exact search."""
    rng = np.random.default_rng(5)
    ids = rng.choice(10**6, size=600, replace=False).astype(np.int64)
    vecs = rng.normal(size=(600, 16)).astype(np.float32)
    vecs[7] = 0.0  # an isolated member
    client = QdrantClient(path=str(tmp_path / "q"))
    try:
        client.create_collection(
            "c", vectors_config=models.VectorParams(size=16, distance=models.Distance.COSINE)
        )
        client.upsert("c", points=models.Batch(ids=ids.tolist(), vectors=vecs.tolist()))
        index = VectorIndex(ids, vecs)
        for row in (0, 99, 321):
            member = int(ids[row])
            exclude = np.sort(np.append(ids[rng.choice(600, 40, replace=False)], member))
            got_ids, got_scores = index.nearest(member, 25, exclude)
            hits = client.query_points("c", query=vecs[row].tolist(), limit=600).points
            want = [(p.id, p.score) for p in hits if p.id not in set(exclude.tolist())][:25]
            assert got_ids.tolist() == [w[0] for w in want]
            np.testing.assert_allclose(got_scores, [w[1] for w in want], rtol=1e-5, atol=1e-6)
        assert index.nearest(int(ids[7]), 10, np.zeros(0, np.int64))[0].size == 0
        assert index.nearest(-5, 10, np.zeros(0, np.int64))[0].size == 0
    finally:
        client.close()


async def test_generate_many_answers_each_source_on_its_own(
    tmp_path: Path, redis_proc: RedisProcess, redis_client: redis.Redis
) -> None:
    """One call for a workflow's sources: the same answers as Generate, and a source that
    fails or runs out of time fails alone."""
    cfg = _config(tmp_path, redis_proc.url)
    _seed(redis_client, cfg.qdrant_path)
    running = await _run(cfg)
    try:
        req = candidates_pb2.GenerateManyRequest(
            requests=[
                candidates_pb2.GenerateRequest(member=1, source="graph", limit=10),
                candidates_pb2.GenerateRequest(member=1, source="nope", limit=10),
                candidates_pb2.GenerateRequest(
                    member=1, source="precomputed", limit=10, params={"list": "pymk"}
                ),
                candidates_pb2.GenerateRequest(member=1, source="ebr", limit=2),
                candidates_pb2.GenerateRequest(member=999, source="graph", limit=10),
            ]
        )
        many = await running.stub.GenerateMany(req, timeout=10)
        graph, nope, pre, ebr, unknown = many.results
        assert graph.code == 0 and graph.response == await running.generate(1, "graph")
        assert nope.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "unknown candidate source 'nope'" in nope.message
        assert pre.code == 0 and list(pre.response.ids) == [9, 4]
        assert ebr.code == 0 and list(ebr.response.ids) == [7, 4]
        assert unknown.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert "member 999 is not in the graph" in unknown.message

        # A paused Redis holds the list read past its own timeout; the graph still answers.
        redis_client.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        slow = candidates_pb2.GenerateManyRequest(
            requests=[
                candidates_pb2.GenerateRequest(
                    member=1, source="precomputed", limit=10, params={"list": "pymk"},
                    timeout_ms=100,
                ),
                candidates_pb2.GenerateRequest(member=1, source="graph", limit=10),
            ]
        )  # fmt: skip
        pre, graph = (await running.stub.GenerateMany(slow, timeout=10)).results
        assert pre.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert "precomputed: no answer within 100 ms" in pre.message
        assert graph.code == 0 and list(graph.response.ids)[:1] == [4]
        redis_client.execute_command("CLIENT", "UNPAUSE")

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running.stub.GenerateMany(candidates_pb2.GenerateManyRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await running.close()
