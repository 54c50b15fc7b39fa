"""Candidate sources: graph (friends of friends), ebr (Qdrant), precomputed lists, popular.

Each source answers `generate(member, limit, params)` with ids best first and one score per
id, never the member itself or its existing connections. Errors are typed so the service
maps them to precise status codes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import quote

import numpy as np
import redis.asyncio as aioredis
from qdrant_client import QdrantClient
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from edgeflow import keys, lists, metrics
from edgeflow.graph import Graph, friends_of_friends
from edgeflow.graph_store import GraphNotLoaded, GraphStore
from edgeflow.resp import RawPipeline

log = logging.getLogger("edgeflow.candidates")

MAX_LIMIT = 5000
_EMPTY_IDS = np.zeros(0, dtype=np.int64)
_EMPTY_SCORES = np.zeros(0, dtype=np.float32)
_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")


class MemberNotFound(LookupError):
    def __init__(self, member: int) -> None:
        super().__init__(f"member {member} is not in the graph")
        self.member = member


class InvalidParam(ValueError):
    """A bad request parameter; `field` names it (e.g. "params.weight")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotReady(RuntimeError):
    """Data the source needs does not exist yet; the message says what to run."""


class SourceUnavailable(RuntimeError):
    """A backing store (Qdrant server) did not answer."""


@dataclass(frozen=True)
class Generated:
    ids: np.ndarray  # int64, best first
    scores: np.ndarray  # float32, one per id
    column: str  # name of the score's measure
    age_seconds: float = 0.0
    version: str = ""
    mode: str = "online"  # a precomputed list's entry says "offline" or "nearline"
    note: str = ""  # why there are no candidates, when the source knows


class Source(Protocol):
    name: str
    params: tuple[str, ...]  # the parameter names it accepts

    async def generate(self, member: int, limit: int, params: Mapping[str, str]) -> Generated: ...


def check_params(source: Source, params: Mapping[str, str]) -> dict[str, str]:
    """The params with snake_case keys (workflow YAML may spell them in camelCase)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = _CAMEL.sub(r"_\1", key).lower()
        if name not in source.params:
            allowed = ", ".join(source.params) or "none"
            raise InvalidParam(
                f"params.{key}",
                f"unknown parameter for source {source.name!r} (allowed: {allowed})",
            )
        out[name] = value
    return out


def _int_param(params: Mapping[str, str], key: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidParam(f"params.{key}", f"must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise InvalidParam(f"params.{key}", f"must be between {lo} and {hi}, got {value}")
    return value


def _graph(store: GraphStore) -> Graph:
    try:
        return store.graph
    except GraphNotLoaded:
        raise NotReady(
            "no member graph is loaded: run `edgeflow ingest --edges FILE` first"
        ) from None


def _excluded(graph: Graph, member: int) -> np.ndarray:
    """Sorted external ids the member must never get: itself and its connections."""
    i = graph.index_of(member)
    if i < 0:
        return np.asarray([member], dtype=np.int64)
    conn = graph.ids[graph.neighbors(i)]  # sorted: ids and neighbour indices both are
    pos = int(np.searchsorted(conn, member))
    return np.insert(conn, pos, member)


def _drop(ids: np.ndarray, sorted_excluded: np.ndarray) -> np.ndarray:
    """Mask of ids not in `sorted_excluded`."""
    if sorted_excluded.size == 0 or ids.size == 0:
        return np.ones(ids.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_excluded, ids), sorted_excluded.size - 1)
    return sorted_excluded[pos] != ids


class GraphSource:
    """Friends of friends ranked by common neighbours or Adamic-Adar weighting."""

    name = "graph"
    params: tuple[str, ...] = ("weight", "min_common")

    def __init__(self, store: GraphStore) -> None:
        self._store = store

    async def generate(self, member: int, limit: int, params: Mapping[str, str]) -> Generated:
        params = check_params(self, params)
        weight = params.get("weight") or "common"
        if weight not in ("common", "adamic_adar"):
            raise InvalidParam(
                "params.weight", f"must be 'common' or 'adamic_adar', got {weight!r}"
            )
        min_common = _int_param(params, "min_common", 1, 1, 1_000_000)
        graph = _graph(self._store)
        i = graph.index_of(member)
        if i < 0:
            raise MemberNotFound(member)
        weights = self._store.inv_log_degree if weight == "adamic_adar" else None
        # With a weighted ranking, the count filter must see every candidate before the cut.
        fetch = graph.n if (weights is not None and min_common > 1) else limit
        idx, counts, _ = friends_of_friends(graph, i, fetch, weights)
        if min_common > 1:
            keep = counts >= min_common
            idx, counts = idx[keep][:limit], counts[keep][:limit]
        return Generated(graph.ids[idx], counts, "common_neighbors", 0.0, graph.version)


class VectorIndex:
    """Every vector of one collection as a unit-length matrix, for Qdrant local mode.

    qdrant-client's local mode is itself an exact brute-force search in Python that builds an
    object per returned point (about 5 us each, and EBR must over-fetch by the member's
    degree). The same exact search over a matrix read from the collection once per version
    returns the same neighbours in a fraction of the time. A Qdrant server keeps answering
    through `query_points`.
    """

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        order = np.argsort(ids)
        self.ids = ids[order]
        unit = vectors[order].astype(np.float32)
        norms = np.linalg.norm(unit, axis=1, keepdims=True)
        self.vectors = np.divide(unit, norms, out=np.zeros_like(unit), where=norms > 0)
        self.nonzero = norms[:, 0] > 0

    @classmethod
    def load(cls, client: QdrantClient, collection: str, batch: int = 2048) -> VectorIndex:
        ids: list[int] = []
        vecs: list[list[float]] = []
        offset = None
        while True:
            points, offset = client.scroll(
                collection, limit=batch, offset=offset, with_vectors=True, with_payload=False
            )
            for p in points:
                if not isinstance(p.vector, list):
                    raise NotReady(f"collection {collection} has named or sparse vectors")
                ids.append(int(p.id))
                vecs.append(cast(list[float], p.vector))
            if offset is None:
                break
        dim = len(vecs[0]) if vecs else 0
        return cls(np.asarray(ids, np.int64), np.asarray(vecs, np.float32).reshape(-1, dim))

    def rows(self, members: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(self.ids, members), max(self.ids.size - 1, 0))
        return np.where(self.ids[pos] == members, pos, -1) if self.ids.size else pos - 1

    def nearest(
        self, member: int, limit: int, exclude: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top `limit` by cosine, never the member or `exclude` (sorted ids)."""
        [row] = self.rows(np.asarray([member], np.int64))
        if row < 0 or not self.nonzero[row]:
            return _EMPTY_IDS, _EMPTY_SCORES
        sims = self.vectors @ self.vectors[row]
        sims[~self.nonzero] = -np.inf
        sims[row] = -np.inf
        gone = self.rows(exclude)
        sims[gone[gone >= 0]] = -np.inf
        k = min(limit, int(np.isfinite(sims).sum()))
        if k <= 0:
            return _EMPTY_IDS, _EMPTY_SCORES
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.lexsort((self.ids[top], -sims[top]))]
        return self.ids[top], sims[top].astype(np.float32)


@dataclass
class Embeddings:
    """The Qdrant client and the live collection (followed via `ef:embeddings:current`)."""

    client: QdrantClient | None
    collection: str | None = None
    problem: str = ""  # why the client could not be opened, when it could not
    local: bool = False  # Qdrant local mode: search the collection's vectors in memory
    index: VectorIndex | None = None

    async def refresh(self, rds: aioredis.Redis) -> bool:
        """Follow the pointer; True when the live collection changed."""
        raw = await rds.get(keys.EMBEDDINGS_CURRENT)
        name = None if raw is None else raw.decode()
        if name == self.collection:
            return False
        index = None
        if self.local and self.client is not None and name is not None:
            try:
                index = await asyncio.to_thread(VectorIndex.load, self.client, name)
            except ValueError as exc:  # local mode: the collection does not exist
                log.warning("embedding collection %s not readable: %s", name, exc)
        self.collection, self.index = name, index
        log.info("embedding collection is now %s", name)
        return True


class EbrSource:
    """Embedding-based retrieval: nearest members by cosine, filtered after retrieval."""

    name = "ebr"
    params: tuple[str, ...] = ()

    def __init__(self, store: GraphStore, embeddings: Embeddings) -> None:
        self._store = store
        self._emb = embeddings

    async def generate(self, member: int, limit: int, params: Mapping[str, str]) -> Generated:
        params = check_params(self, params)
        graph = _graph(self._store)
        i = graph.index_of(member)
        if i < 0:
            raise MemberNotFound(member)
        client, collection = self._emb.client, self._emb.collection
        if client is None:
            raise NotReady(f"Qdrant is not open: {self._emb.problem}")
        if collection is None:
            raise NotReady("no member embeddings in Qdrant: run `edgeflow train` first")
        if self._emb.index is not None:
            ids, scores = self._emb.index.nearest(member, limit, _excluded(graph, member))
            return Generated(ids, scores, "cosine", 0.0, collection)
        # Self and connections are dropped after retrieval: fetch enough to fill `limit`.
        fetch = limit + int(graph.degree[i]) + 1
        ids, scores = await asyncio.to_thread(_nearest, client, collection, member, fetch)
        keep = _drop(ids, _excluded(graph, member))
        return Generated(ids[keep][:limit], scores[keep][:limit], "cosine", 0.0, collection)


def _nearest(
    client: QdrantClient, collection: str, member: int, fetch: int
) -> tuple[np.ndarray, np.ndarray]:
    """The `fetch` nearest members to the member's own vector (which is among them)."""
    try:
        found = client.retrieve(collection, ids=[member], with_vectors=True, with_payload=False)
        if not found or found[0].vector is None:
            return _EMPTY_IDS, _EMPTY_SCORES
        vector = found[0].vector
        if not isinstance(vector, list):
            raise NotReady(f"collection {collection} has named or sparse vectors, not one dense")
        if not any(vector):  # an isolated member: it has no neighbourhood to search near
            return _EMPTY_IDS, _EMPTY_SCORES
        points = client.query_points(
            collection, query=vector, limit=fetch, with_payload=False
        ).points
    except (ValueError, UnexpectedResponse) as exc:
        # Local mode raises ValueError and a server answers 404 for a missing collection.
        if _missing(client, collection):
            raise NotReady(
                f"embedding collection {collection} is missing from Qdrant: "
                "run `edgeflow train` again"
            ) from None
        raise SourceUnavailable(f"Qdrant query on {collection} failed: {exc}") from exc
    except (ResponseHandlingException, OSError) as exc:
        raise SourceUnavailable(f"Qdrant did not answer for {collection}: {exc}") from exc
    n = len(points)
    ids = np.fromiter((p.id for p in points), dtype=np.int64, count=n)
    scores = np.fromiter((p.score for p in points), dtype=np.float32, count=n)
    return ids, scores


def _missing(client: QdrantClient, collection: str) -> bool:
    try:
        return not client.collection_exists(collection)
    except (ResponseHandlingException, UnexpectedResponse, OSError):
        return False


class PrecomputedSource:
    """Lists written by the offline job or the nearline worker (`params.list` names them)."""

    name = "precomputed"
    params: tuple[str, ...] = ("list",)

    def __init__(self, rds: aioredis.Redis, store: GraphStore) -> None:
        self._pipe = _raw_pipeline(rds)
        self._reader: RawPipeline | aioredis.Redis = self._pipe or rds
        self._store = store

    async def close(self) -> None:
        if self._pipe is not None:
            await self._pipe.close()

    async def generate(self, member: int, limit: int, params: Mapping[str, str]) -> Generated:
        params = check_params(self, params)
        name = params.get("list", "")
        if not name:
            raise InvalidParam("params.list", "is required: the name of a precomputed list")
        try:
            lists.validate_name(name)
        except lists.ListError as exc:
            raise InvalidParam("params.list", str(exc)) from None
        live, stored = await lists.read_list_entry(self._reader, name, member)
        if stored is None:
            note = (
                f"list {name!r} has no entry for member {member} (live version {live})"
                if live
                else f"list {name!r} has never been written (no offline run has published it)"
            )
            return Generated(
                _EMPTY_IDS, _EMPTY_SCORES, "list_score", version=live or "", mode="offline",
                note=note,
            )  # fmt: skip
        metrics.list_age(name).observe(stored.age_seconds)
        try:
            # Connections made since the list was computed are dropped too.
            excluded = _excluded(self._store.graph, member)
        except GraphNotLoaded:
            excluded = np.asarray([member], dtype=np.int64)
        keep = _drop(stored.ids, excluded)
        note = ""
        if not keep.any():
            note = (
                f"the entry of member {member} in list {name!r} (version {stored.version}) "
                + ("is empty" if not stored.ids.size else
                   "holds only members it is now connected to")
            )  # fmt: skip
        return Generated(
            stored.ids[keep][:limit],
            stored.scores[keep][:limit],
            "list_score",
            stored.age_seconds,
            stored.version,
            stored.mode,
            note,
        )


def _raw_pipeline(rds: aioredis.Redis) -> RawPipeline | None:
    """A hand-encoded pipeline to the client's Redis (a list read then costs about half the
    CPU); None for a Unix socket or TLS, which only redis-py speaks."""
    pool = rds.connection_pool
    if pool.connection_class is not aioredis.Connection:
        return None
    kw = pool.connection_kwargs
    host = str(kw.get("host", "localhost"))
    auth = ""
    if kw.get("password") is not None:
        auth = f"{quote(kw.get('username') or '', safe='')}:{quote(kw['password'], safe='')}@"
    host = f"[{host}]" if ":" in host else host
    return RawPipeline(f"redis://{auth}{host}:{kw.get('port', 6379)}/{kw.get('db', 0)}")


class PopularSource:
    """Highest-degree members, for cold start; also serves members unknown to the graph."""

    name = "popular"
    params: tuple[str, ...] = ()

    def __init__(self, store: GraphStore) -> None:
        self._store = store
        self._version: str | None = None
        self._ids = _EMPTY_IDS
        self._degree = _EMPTY_SCORES

    def _ranking(self, graph: Graph) -> tuple[np.ndarray, np.ndarray]:
        if self._version != graph.version:
            degree = graph.degree
            # Enough for the largest limit after dropping the best-connected member's links.
            keep = min(graph.n, MAX_LIMIT + int(degree.max(initial=0)) + 1)
            order = np.argsort(-degree, kind="stable")[:keep]
            self._ids, self._degree = graph.ids[order], degree[order].astype(np.float32)
            self._version = graph.version
        return self._ids, self._degree

    async def generate(self, member: int, limit: int, params: Mapping[str, str]) -> Generated:
        params = check_params(self, params)
        graph = _graph(self._store)
        ids, degree = self._ranking(graph)
        excluded = _excluded(graph, member)
        head = ids[: limit + excluded.size]
        keep = _drop(head, excluded)
        return Generated(
            head[keep][:limit], degree[: head.size][keep][:limit], "degree", 0.0, graph.version
        )
