"""The graph's storage: the snapshot file format, chunked snapshots in a real Redis, the
machine's mapped snapshot file shared by processes, and delta overlays that must equal a
graph built afresh from the same edges."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from edgeflow.build.synthetic import social_graph
from edgeflow.graph import Graph, SnapshotError, friends_of_friends, inverse_log_degree
from edgeflow.local.redis_server import RedisProcess
from edgeflow.stores import graph_store, keys
from edgeflow.stores.graph_store import (
    GraphNotLoaded,
    GraphSnapshotError,
    GraphStore,
    append_deltas,
    compact_graph,
    load_graph,
    open_snapshot,
    save_graph,
)


def sample_graph(members: int = 300, seed: int = 1) -> Graph:
    edges = social_graph(members=members, communities=6, seed=seed)
    return Graph.from_edges(edges[:, 0], edges[:, 1])


def assert_same(got: Graph, want: Graph) -> None:
    """Everything a reader can see of two graphs is equal (the overlay's read paths and the
    merged arrays alike)."""
    assert np.array_equal(got.ids, want.ids)
    assert np.array_equal(got.degree, want.degree)
    assert got.n == want.n and got.edge_count == want.edge_count
    for i in range(want.n):
        assert np.array_equal(got.neighbors(i), want.neighbors(i)), f"row {i}"
    rows = np.random.default_rng(0).integers(0, want.n, size=64)
    for a, b in zip(got.gather(rows), want.gather(rows), strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(got.indptr, want.indptr) and np.array_equal(got.indices, want.indices)
    assert got.data_hash() == want.data_hash()
    assert all(np.array_equal(a, b) for a, b in zip(got.edges(), want.edges(), strict=True))


# ---- the snapshot format -------------------------------------------------------------------
def test_snapshot_bytes_round_trip_as_views_with_the_declared_dtypes(tmp_path: Path) -> None:
    g = sample_graph()
    data = g.to_bytes()
    again = Graph.from_bytes(data, g.version)
    assert_same(again, g)
    assert (again.ids.dtype, again.indptr.dtype, again.indices.dtype) == (
        np.dtype("<i8"), np.dtype("<i8"), np.dtype("<i4"),
    )  # fmt: skip
    path = tmp_path / "g.graph"
    path.write_bytes(data)
    mapped = Graph.open(path, "v")
    assert_same(mapped, g)
    assert not mapped.indices.flags.writeable  # a view of the read-only mapping
    empty = Graph.from_edges(np.zeros(0), np.zeros(0))
    assert Graph.from_bytes(empty.to_bytes()).n == 0


def test_a_damaged_snapshot_is_refused_with_what_is_wrong(tmp_path: Path) -> None:
    data = sample_graph().to_bytes()
    with pytest.raises(SnapshotError, match="bad magic"):
        Graph.from_bytes(b"nonsense" + data)
    with pytest.raises(SnapshotError, match="truncated"):
        Graph.from_bytes(data[: len(data) // 2])
    (tmp_path / "short.graph").write_bytes(data[:100])
    with pytest.raises(SnapshotError, match=r"short\.graph"):
        Graph.open(tmp_path / "short.graph")


# ---- deltas over the overlay ----------------------------------------------------------------
def test_deltas_over_the_overlay_equal_a_fresh_graph_of_the_same_edges() -> None:
    rng = np.random.default_rng(7)
    g = Graph.from_bytes(sample_graph().to_bytes(), "v")  # read-only arrays, as when mapped
    src, dst = g.edges()
    truth = set(zip(src.tolist(), dst.tolist(), strict=True))
    members = set(g.ids.tolist())
    for step in range(30):
        known = np.asarray(sorted(members))
        pairs = rng.choice(known, size=(int(rng.integers(1, 40)), 2))  # self loops included
        state = rng.random(pairs.shape[0]) < 0.6
        old = sorted(truth)
        for k in rng.integers(0, len(old), size=5):  # removals, listed in either order
            pairs = np.vstack([pairs, [old[k][1], old[k][0]]])
            state = np.append(state, False)
        pairs = np.vstack([pairs, pairs[:3]])  # a pair listed twice takes its last state
        state = np.append(state, ~state[:3])
        if step % 4 == 0:  # members joining, with ids above every member's
            top = int(known.max())
            pairs = np.vstack([pairs, [[top + 2, int(known[0])], [top + 1, top + 2]]])
            state = np.append(state, [True, step % 8 == 0])
        g = g.with_edges(pairs, state, version=f"v+{step}")
        for (a, b), on in zip(pairs.tolist(), state.tolist(), strict=True):
            members.update((a, b))
            if a != b:
                (truth.add if on else truth.discard)((min(a, b), max(a, b)))
        u, v = (np.asarray(x, dtype=np.int64) for x in zip(*sorted(truth), strict=True))
        fresh = Graph.from_edges(u, v, members=np.asarray(sorted(members)))
        assert g.changed_rows.size > 0 and g.version == f"v+{step}"
        assert_same(Graph._derived(g._base, g._ov, g.version), fresh)  # read paths, no cache
        assert_same(g, fresh)  # merged arrays
        i = int(np.argmax(fresh.degree))
        for a, b in zip(friends_of_friends(g, i, 50, inverse_log_degree(g)),
                        friends_of_friends(fresh, i, 50, inverse_log_degree(fresh)),
                        strict=True):  # fmt: skip
            assert np.array_equal(a, b)
    # Members whose ids fall between known ones move every dense index after them: a rebuild.
    gap = Graph.from_edges(np.array([0, 10]), np.array([10, 20]))
    between = gap.with_edges(np.array([[5, 20]]), np.array([True]))
    assert between.changed_rows.size == 0 and between.ids.tolist() == [0, 5, 10, 20]
    assert_same(between, Graph.from_edges(np.array([0, 10, 5]), np.array([10, 20, 20])))


def test_a_delta_batch_shares_the_snapshot_arrays() -> None:
    g = sample_graph()
    a, b = int(g.ids[0]), int(g.ids[1])
    after = g.with_edges(np.array([[a, b]]), np.array([True]))
    assert after.shares_snapshot(g)
    assert after._base.indices is g.indices  # the neighbour array was not copied
    assert after.changed_rows.tolist() == [0, 1]
    compacted = after.compacted("v2")
    assert not compacted.shares_snapshot(g) and compacted.changed_rows.size == 0
    assert_same(compacted, after)


# ---- chunked snapshots in Redis ---------------------------------------------------------------
def test_chunked_snapshots_round_trip(redis_client: redis.Redis, tmp_path: Path) -> None:
    g = sample_graph()
    save_graph(redis_client, g, chunk_bytes=1000)  # forced small: many chunks
    meta = redis_client.hgetall(keys.graph_meta(g.version))
    chunks = int(meta[b"chunks"])
    assert chunks == -(-len(g.to_bytes()) // 1000) and chunks > 5
    for i in range(chunks):
        assert redis_client.strlen(keys.graph_chunk(g.version, i)) <= 1000
    # Every graph key shares the {graph} hash tag (one Redis Cluster slot).
    assert all(k.startswith("ef:{graph}:") for k in (keys.graph_meta(g.version),
               keys.graph_deltas(g.version), keys.graph_chunk(g.version, 3)))  # fmt: skip
    loaded = load_graph(redis_client, cache_dir=tmp_path)
    assert loaded.version == g.version
    assert_same(loaded, g)
    assert [p.name for p in tmp_path.glob("*.graph")] == [
        f"{g.version}.{meta[b'sha256'].decode()[:16]}.graph"
    ]


def test_replacing_a_snapshot_lets_the_old_keys_expire(redis_client: redis.Redis) -> None:
    first, second = sample_graph(seed=1), sample_graph(seed=2)
    save_graph(redis_client, first, chunk_bytes=4096)
    append_deltas(redis_client, np.array([[0, 1]]), np.array([True]))
    save_graph(redis_client, second)
    assert redis_client.get(keys.GRAPH_CURRENT) == second.version.encode()
    old = [keys.graph_meta(first.version), keys.graph_chunk(first.version, 0),
           keys.graph_deltas(first.version)]  # fmt: skip
    assert all(0 < int(redis_client.ttl(k)) <= 300 for k in old)
    assert redis_client.ttl(keys.graph_meta(second.version)) == -1


def test_a_missing_or_corrupt_chunk_names_the_key(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    g = sample_graph()
    save_graph(redis_client, g, chunk_bytes=2000)
    key = keys.graph_chunk(g.version, 2)
    good = redis_client.get(key)
    assert good is not None
    redis_client.set(key, good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(GraphSnapshotError, match=f"chunk {re_escape(key)} is corrupt"):
        load_graph(redis_client, cache_dir=tmp_path)
    redis_client.delete(key)
    with pytest.raises(GraphSnapshotError, match=f"chunk {re_escape(key)} is missing"):
        load_graph(redis_client, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.graph"))
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written left behind

    async def follow() -> None:
        store = GraphStore(aioredis.Redis.from_url(redis_url(redis_client)), cache_dir=tmp_path)
        with pytest.raises(GraphSnapshotError, match=re_escape(key)):
            await store.load()

    asyncio.run(follow())
    redis_client.delete(keys.graph_meta(g.version))
    with pytest.raises(GraphNotLoaded, match="missing from Redis"):
        load_graph(redis_client, cache_dir=tmp_path)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def redis_url(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/0"


# ---- one mapped file per machine --------------------------------------------------------------
_READER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import redis
    from edgeflow.stores.graph_store import load_graph
    graph = load_graph(redis.Redis.from_url(sys.argv[1]), cache_dir=Path(sys.argv[2]))
    maps = [ln.split()[-1] for ln in open("/proc/self/maps") if ln.rstrip().endswith(".graph")]
    print(json.dumps({"hash": graph.data_hash(), "maps": sorted(set(maps))}), flush=True)
    sys.stdin.readline()
    """
)


def test_two_processes_share_one_mapped_file(
    redis_client: redis.Redis, redis_proc: RedisProcess, tmp_path: Path
) -> None:
    g = sample_graph(members=2000)
    save_graph(redis_client, g, chunk_bytes=50_000)
    cache = tmp_path / "graph"
    readers = []
    try:
        reports, stats = [], []
        for _ in range(2):
            p = subprocess.Popen(
                [sys.executable, "-c", _READER, redis_proc.url, str(cache)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            readers.append(p)
            assert p.stdout is not None
            reports.append(json.loads(p.stdout.readline()))
            [path] = cache.glob("*.graph")
            stats.append(os.stat(path))
        # The second process mapped the file the first wrote: same inode, not written again.
        assert stats[0].st_ino == stats[1].st_ino and stats[0].st_mtime_ns <= stats[1].st_mtime_ns
        assert reports[0]["maps"] == reports[1]["maps"] == [str(path)]
        assert reports[0]["hash"] == reports[1]["hash"] == g.data_hash()
    finally:
        for p in readers:
            assert p.stdin is not None
            p.stdin.write("\n")
            p.stdin.close()
            p.wait(timeout=30)


def test_open_snapshot_uses_the_machine_file_without_redis_reads(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    g = sample_graph()
    save_graph(redis_client, g, chunk_bytes=3000)
    open_snapshot(redis_client, g.version, tmp_path)
    for i in range(int(redis_client.hget(keys.graph_meta(g.version), "chunks") or 0)):
        redis_client.delete(keys.graph_chunk(g.version, i))  # only the file can serve now
    assert_same(open_snapshot(redis_client, g.version, tmp_path), g)


# ---- the store following deltas and compactions ----------------------------------------------
def test_store_follows_deltas_and_compaction_with_concurrent_appends(
    redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = sample_graph()
    save_graph(redis_client, g, chunk_bytes=5000)
    url = redis_url(redis_client)
    rng = np.random.default_rng(3)
    truth = {(int(a), int(b)) for a, b in zip(*g.edges(), strict=True)}

    def batch(n: int) -> None:
        pairs = rng.choice(g.ids, size=(n, 2))
        state = rng.random(n) < 0.5
        append_deltas(redis_client, pairs, state)
        for (a, b), on in zip(pairs.tolist(), state.tolist(), strict=True):
            if a != b:
                (truth.add if on else truth.discard)((min(a, b), max(a, b)))

    def fresh() -> Graph:
        u, v = (np.asarray(x, dtype=np.int64) for x in zip(*sorted(truth), strict=True))
        return Graph.from_edges(u, v, members=g.ids)

    here, worker = tmp_path / "here", tmp_path / "worker"  # two machines' cache directories

    async def follow() -> None:
        store = GraphStore(aioredis.Redis.from_url(url), cache_dir=here)
        assert await store.load()
        for _ in range(3):
            batch(20)
            assert await store.load() and not await store.load()
            assert_same(store.graph, fresh())
            assert np.array_equal(store.inv_log_degree, inverse_log_degree(store.graph))
        # Appends that land while the compaction builds its snapshot are carried over.
        real = graph_store._write_snapshot

        def write_then_append(*args: Any, **kw: Any) -> Any:
            meta = real(*args, **kw)
            batch(7)
            return meta

        with monkeypatch.context() as patch:
            patch.setattr(graph_store, "_write_snapshot", write_then_append)
            version = compact_graph(redis_client, min_deltas=1, cache_dir=worker)
        assert version is not None and redis_client.xlen(keys.graph_deltas(version)) == 1
        assert len(list(worker.glob(f"{version}.*.graph"))) == 1  # the compactor's machine
        # This machine builds the new snapshot from the one it holds and the folded deltas,
        # so it reads no chunk: take them away to be sure.
        chunks = int(redis_client.hget(keys.graph_meta(version), "chunks") or 0)
        redis_client.delete(*(keys.graph_chunk(version, i) for i in range(chunks)))
        assert await store.load()
        assert len(list(here.glob(f"{version}.*.graph"))) == 1
        assert store.graph.version.startswith(version + "+")  # the carried entry, applied
        assert_same(store.graph, fresh())
        assert np.array_equal(store.inv_log_degree, inverse_log_degree(store.graph))
        assert_same(load_graph(redis_client, cache_dir=here), fresh())
        # Replaying an entry (the same edge states again) changes nothing.
        [(_, fields)] = redis_client.xrange(keys.graph_deltas(version))
        redis_client.xadd(keys.graph_deltas(version), fields)
        assert await store.load()
        assert_same(store.graph, fresh())
        await store.close()

    asyncio.run(follow())


def test_a_compaction_that_cannot_be_rebuilt_here_is_downloaded(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    g = sample_graph()
    save_graph(redis_client, g)
    url = redis_url(redis_client)
    a, b, c = (int(x) for x in g.ids[:3])

    async def follow() -> None:
        store = GraphStore(aioredis.Redis.from_url(url), cache_dir=tmp_path / "here")
        assert await store.load()
        first = append_deltas(redis_client, np.array([[a, b]]), np.array([True]))
        append_deltas(redis_client, np.array([[a, c]]), np.array([True]))
        assert await store.load()
        version = compact_graph(redis_client, min_deltas=1, cache_dir=tmp_path / "worker")
        assert version is not None
        # A meta that names an earlier fold than the snapshot's bytes hold: the build here
        # gives other bytes, the chunk digests say so, and the snapshot is downloaded.
        redis_client.hset(keys.graph_meta(version), "folded", str(first))
        assert await store.load()
        assert store.graph.version == version
        assert b in store.graph.ids[store.graph.neighbors(store.graph.index_of(a))]
        assert c in store.graph.ids[store.graph.neighbors(store.graph.index_of(a))]
        await store.close()

    asyncio.run(follow())


def test_adjacency_sets_hold_each_members_connections(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encoded pipeline writes what one SADD per member through redis-py writes."""
    monkeypatch.setattr(graph_store, "_ADJ_BATCH", 3)  # many round trips, a hub across one
    big = 2**63 - 1
    g = Graph.from_edges(
        np.array([0, 9, 10, 99_999, big, 7]),
        np.array([9, 10, 123_456_789_012, big, 5, 5]),
        members=np.array([3, 10**18]),  # isolated members: no SET at all
    )
    redis_client.sadd(keys.adjacency(3), 42)  # a stale SET of an earlier graph is replaced
    graph_store._write_adjacency(redis_client, g)
    encoded = {k: redis_client.smembers(k) for k in redis_client.scan_iter("ef:adj:*")}
    redis_client.flushall()
    graph_store._write_adjacency_commands(redis_client, g)
    plain = {k: redis_client.smembers(k) for k in redis_client.scan_iter("ef:adj:*")}
    assert encoded == plain
    for i in range(g.n):
        want = {str(x).encode() for x in g.ids[g.neighbors(i)].tolist()}
        assert encoded.get(keys.adjacency(int(g.ids[i])).encode(), set()) == want
    flat, ends = graph_store._bulk_ints(np.array([0, 7, 10, big]))
    assert flat.tobytes() == b"$1\r\n0\r\n$1\r\n7\r\n$2\r\n10\r\n$19\r\n9223372036854775807\r\n"
    assert ends.tolist() == [7, 14, 22, 48]
