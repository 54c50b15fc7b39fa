"""The member graph in Redis: versioned snapshots behind an atomically swapped pointer.

`save_graph` writes a snapshot, its meta and the per-member adjacency sets that the merging
filters read, then swaps `ef:graph:current`. `GraphStore` holds the current snapshot in a
service's memory and follows the pointer, so a new ingest reaches running services.
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


def load_graph(client: redis.Redis) -> Graph:
    version = cast(bytes | None, client.get(keys.GRAPH_CURRENT))
    if version is None:
        raise GraphNotLoaded("no member graph in Redis: run `edgeflow ingest --edges FILE` first")
    data = cast(bytes | None, client.get(keys.graph_snapshot(version.decode())))
    if data is None:
        raise GraphNotLoaded(f"graph snapshot {version.decode()} is missing from Redis")
    return Graph.from_bytes(data, version=version.decode())


class GraphStore:
    """The current graph in memory, refreshed when the pointer in Redis moves."""

    def __init__(self, client: aioredis.Redis, reload_interval_s: float = 2.0) -> None:
        self._client = client
        self._interval = reload_interval_s
        self._graph: Graph | None = None
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
        """Load the current snapshot if it changed; True when a new graph was swapped in."""
        version = await self._client.get(keys.GRAPH_CURRENT)
        if version is None:
            return False
        v = version.decode()
        if self._graph is not None and self._graph.version == v:
            return False
        data = await self._client.get(keys.graph_snapshot(v))
        if data is None:
            return False
        graph = await asyncio.to_thread(Graph.from_bytes, data, v)
        from edgeflow.graph import inverse_log_degree

        self._inv_log_deg = inverse_log_degree(graph)
        self._graph = graph
        for callback in self.on_reload:
            callback(graph)
        log.info("graph %s loaded: %d members, %d edges", v, graph.n, graph.edge_count)
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
