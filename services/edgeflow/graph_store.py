"""The member graph in Redis: versioned snapshots behind an atomically swapped pointer.

`save_graph` writes a snapshot, its meta and the per-member adjacency sets that the merging
filters read, then swaps `ef:graph:current`. `GraphStore` holds the current snapshot in a
service's memory and follows the pointer, so a new ingest reaches running services.

Nearline edge changes go to a delta stream per snapshot (`append_deltas`): each entry holds
edge states (u, v, present), so replaying one twice or late never changes the result.
`GraphStore` applies new deltas on its refresh by building a new immutable graph off the
request path and swapping it in; `compact_graph` folds a long stream into a new snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import cast

import numpy as np
import redis
import redis.asyncio as aioredis

from edgeflow import keys
from edgeflow.graph import Graph

log = logging.getLogger("edgeflow.graph")

_SET_BATCH = 2000
# Snapshots and delta streams replaced by a newer version stay readable this long.
_GRACE_S = 300
_DELTA_COLUMNS = 3  # u, v, present

# KEYS[1] = the graph pointer; ARGV = delta key prefix, packed edge states. Appends to the
# stream of the current snapshot; returns {version, entry id}, or false without a graph.
_APPEND_LUA = """
local v = redis.call('GET', KEYS[1])
if not v then return false end
return {v, redis.call('XADD', ARGV[1] .. v, '*', 'e', ARGV[2])}
"""

# KEYS = pointer, old deltas, new deltas; ARGV = old version, new version, last folded id,
# old snapshot key. Moves the pointer only if no one else did, carrying later deltas over.
_COMPACT_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '(' .. ARGV[3], '+')) do
  redis.call('XADD', KEYS[3], '*', unpack(entry[2]))
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('EXPIRE', ARGV[4], ARGV[5])
return 1
"""


class GraphNotLoaded(RuntimeError):
    """No graph has been ingested into this Redis yet."""


def save_graph(client: redis.Redis, graph: Graph) -> None:
    """Write a snapshot and adjacency sets, then make it current in one atomic step."""
    version = graph.version
    client.set(keys.graph_snapshot(version), graph.to_bytes())
    client.hset(
        keys.graph_meta(version),
        mapping={
            "members": graph.n,
            "edges": graph.edge_count,
            "created_at": time.time(),
            "hash": graph.data_hash(),
        },
    )
    pipe = client.pipeline(transaction=False)
    pending = 0
    for i in range(graph.n):
        member = int(graph.ids[i])
        pipe.delete(keys.adjacency(member))
        nbrs = graph.ids[graph.neighbors(i)]
        if nbrs.size:
            pipe.sadd(keys.adjacency(member), *nbrs.tolist())
        pending += 1
        if pending >= _SET_BATCH:
            pipe.execute()
            pending = 0
    pipe.execute()
    previous = cast(bytes | None, client.getset(keys.GRAPH_CURRENT, version))
    if previous is not None and previous.decode() != version:
        # Readers follow the pointer; the old snapshot is kept a while for in-flight loads.
        client.expire(keys.graph_snapshot(previous.decode()), 300)


def load_graph(client: redis.Redis, deltas: bool = True) -> Graph:
    """The current snapshot, with the nearline edge changes made since it unless `deltas`
    is False."""
    version = cast(bytes | None, client.get(keys.GRAPH_CURRENT))
    if version is None:
        raise GraphNotLoaded("no member graph in Redis: run `edgeflow ingest --edges FILE` first")
    data = cast(bytes | None, client.get(keys.graph_snapshot(version.decode())))
    if data is None:
        raise GraphNotLoaded(f"graph snapshot {version.decode()} is missing from Redis")
    graph = Graph.from_bytes(data, version=version.decode())
    if not deltas:
        return graph
    last, changes = _decode_deltas(cast(_Entries, client.xrange(keys.graph_deltas(graph.version))))
    return graph if last is None else _applied(graph, graph.version, last, changes)


# ---- nearline edge changes -------------------------------------------------------------------
_Entries = list[tuple[bytes, dict[bytes, bytes]]]


def pack_changes(pairs: np.ndarray, present: np.ndarray) -> bytes:
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    rows = np.column_stack([pairs, np.asarray(present, dtype=np.int64).reshape(-1)])
    return rows.astype("<i8").tobytes()


def _decode_deltas(entries: _Entries) -> tuple[str | None, np.ndarray]:
    """(last entry id, (m, 3) int64 rows of u, v, present) of XRANGE entries, in order."""
    if not entries:
        return None, np.zeros((0, _DELTA_COLUMNS), dtype=np.int64)
    blob = b"".join(fields[b"e"] for _, fields in entries)
    rows = np.frombuffer(blob, dtype="<i8").reshape(-1, _DELTA_COLUMNS).astype(np.int64)
    return entries[-1][0].decode(), rows


def _applied(graph: Graph, snapshot: str, last: str, changes: np.ndarray) -> Graph:
    return graph.with_edges(changes[:, :2], changes[:, 2] != 0, version=f"{snapshot}+{last}")


def snapshot_of(graph: Graph) -> str:
    """The snapshot version a graph was loaded from (its version before any `+delta`)."""
    return graph.version.split("+", 1)[0]


def append_deltas(client: redis.Redis, pairs: np.ndarray, present: np.ndarray) -> str | None:
    """Record edge states against the current snapshot; returns the entry id (None without a
    graph). The adjacency SETs are the truth these states were read from."""
    prefix = keys.graph_deltas("")
    reply = client.register_script(_APPEND_LUA)(
        keys=[keys.GRAPH_CURRENT], args=[prefix, pack_changes(pairs, present)]
    )
    return None if not reply else bytes(reply[1]).decode()


def read_deltas(client: redis.Redis, graph: Graph) -> Graph:
    """`graph` with the deltas appended since it was loaded (the same graph when none)."""
    snapshot = snapshot_of(graph)
    after = graph.version.split("+", 1)[1] if "+" in graph.version else "0-0"
    entries = cast(_Entries, client.xrange(keys.graph_deltas(snapshot), f"({after}", "+"))
    last, changes = _decode_deltas(entries)
    return graph if last is None else _applied(graph, snapshot, last, changes)


def compact_graph(client: redis.Redis, min_deltas: int) -> str | None:
    """Fold the current delta stream into a new snapshot once it holds `min_deltas` entries;
    returns the new version, or None when there was nothing (or someone else) to do it."""
    current = cast(bytes | None, client.get(keys.GRAPH_CURRENT))
    if current is None:
        return None
    old = current.decode()
    if int(cast(int, client.xlen(keys.graph_deltas(old)))) < max(min_deltas, 1):
        return None
    graph = load_graph(client)
    folded = graph.version.split("+", 1)[1]
    fresh = Graph.from_edges(*graph.edges(), members=graph.ids)
    fresh = Graph(fresh.ids, fresh.indptr, fresh.indices,
                  f"{int(time.time() * 1000)}-{fresh.data_hash()[:12]}")  # fmt: skip
    if fresh.version == old:
        return None
    client.set(keys.graph_snapshot(fresh.version), fresh.to_bytes())
    client.hset(
        keys.graph_meta(fresh.version),
        mapping={"members": fresh.n, "edges": fresh.edge_count, "created_at": time.time(),
                 "hash": fresh.data_hash(), "compacted_from": old},
    )  # fmt: skip
    moved = client.register_script(_COMPACT_LUA)(
        keys=[keys.GRAPH_CURRENT, keys.graph_deltas(old), keys.graph_deltas(fresh.version)],
        args=[old, fresh.version, folded, keys.graph_snapshot(old), _GRACE_S],
    )
    if not moved:
        client.delete(keys.graph_snapshot(fresh.version), keys.graph_meta(fresh.version))
        return None
    return fresh.version


class GraphStore:
    """The current graph in memory, refreshed when the pointer in Redis moves."""

    def __init__(self, client: aioredis.Redis, reload_interval_s: float = 2.0) -> None:
        self._client = client
        self._interval = reload_interval_s
        self._graph: Graph | None = None
        self._snapshot = ""  # the snapshot version the graph was built from
        self._inv_log_deg: np.ndarray | None = None
        self._task: asyncio.Task[None] | None = None
        self.on_reload: list = []  # callbacks(graph) run after a swap

    @property
    def graph(self) -> Graph:
        if self._graph is None:
            raise GraphNotLoaded("no member graph loaded: run `edgeflow ingest --edges FILE`")
        return self._graph

    @property
    def inv_log_degree(self) -> np.ndarray:
        if self._inv_log_deg is None:
            raise GraphNotLoaded("no member graph loaded")
        return self._inv_log_deg

    async def load(self) -> bool:
        """Load the current snapshot if it changed, then the edge changes made since; True
        when a new graph was swapped in."""
        version = await self._client.get(keys.GRAPH_CURRENT)
        if version is None:
            return False
        v = version.decode()
        graph = self._graph
        if graph is None or self._snapshot != v:
            data = await self._client.get(keys.graph_snapshot(v))
            if data is None:
                return False
            graph = await asyncio.to_thread(Graph.from_bytes, data, v)
        after = graph.version.split("+", 1)[1] if "+" in graph.version else "0-0"
        entries = await self._client.xrange(keys.graph_deltas(v), f"({after}", "+")
        last, changes = _decode_deltas(entries)
        if last is not None:
            graph = await asyncio.to_thread(_applied, graph, v, last, changes)
        if graph is self._graph:
            return False
        new_snapshot, self._snapshot = self._snapshot != v, v
        from edgeflow.graph import inverse_log_degree

        self._inv_log_deg = inverse_log_degree(graph)
        self._graph = graph
        for callback in self.on_reload:
            callback(graph)
        # Snapshots are rare; edge deltas arrive all the time.
        (log.info if new_snapshot else log.debug)(
            "graph %s loaded: %d members, %d edges", graph.version, graph.n, graph.edge_count
        )
        return True

    def start_watching(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.load()
            except (redis.RedisError, OSError) as exc:
                log.warning("graph refresh failed: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
