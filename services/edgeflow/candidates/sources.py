"""Candidate sources: graph (friends of friends), ebr (Qdrant), precomputed lists, popular.

Each source answers `generate(member, limit, params)` with ids best first and one score per
id, never the member itself or its existing connections. Errors are typed so the service
maps them to precise status codes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from edgeflow.config import Config
from edgeflow.graph import Graph, expansion_budget, friends_of_friends, top_positions
from edgeflow.shell import cpu, metrics
from edgeflow.stores import keys, lists, vectors
from edgeflow.stores.graph_store import GraphNotLoaded, GraphStore
from edgeflow.stores.redis_client import AsyncClient
from edgeflow.stores.resp_cluster import open_pipeline

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
    """Friends of friends ranked by common neighbours or Adamic-Adar weighting.

    A hub's two-hop expansion is bounded to `max_visits` neighbour visits (0: unbounded):
    above it the hub's least-connected connections are expanded, as many as fit, and the
    answer's note says so (graph.expansion_budget). Below it the answer is exact. A large
    expansion runs on the process's CPU threads (cpu.run), not on the event loop.
    """

    name = "graph"
    params: tuple[str, ...] = ("weight", "min_common")

    def __init__(self, store: GraphStore, max_visits: int = 0) -> None:
        self._store = store
        self.max_visits = max_visits

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
        span = expansion_budget(graph, i, self.max_visits)
        note = ""
        if span.capped:
            metrics.FOF_CAPPED.inc()
            note = (
                f"hub: friends of friends through {span.expanded:,} of its "
                f"{span.connections:,} connections, the least-connected first "
                f"({span.visits:,} of {span.full_visits:,} neighbour visits; the budget, "
                f"EDGEFLOW_FOF_MAX_VISITS, is {self.max_visits:,})"
            )
        idx, counts, _ = await cpu.run(
            "fof", span.visits, friends_of_friends, graph, i, fetch, weights, span.via
        )
        if min_common > 1:
            keep = counts >= min_common
            idx, counts = idx[keep][:limit], counts[keep][:limit]
        return Generated(graph.ids[idx], counts, "common_neighbors", 0.0, graph.version,
                         note=note)  # fmt: skip


class VectorIndex:
    """Every member's vector as a unit-length matrix, for exact cosine in memory.

    The offline job and the nearline worker build it from the embeddings in Feast's rows and
    score whole batches of members with matrix products. The candidates service answers
    one member at a time from an HNSW index instead (Embeddings).
    """

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        order = np.argsort(ids)
        self.ids = ids[order]
        unit = vectors[order].astype(np.float32)
        norms = np.linalg.norm(unit, axis=1, keepdims=True)
        self.vectors = np.divide(unit, norms, out=np.zeros_like(unit), where=norms > 0)
        self.nonzero = norms[:, 0] > 0

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
        top = top_positions(sims, k)  # self.ids ascend: ties at the cut by lowest id
        top = top[np.lexsort((self.ids[top], -sims[top]))]
        return self.ids[top], sims[top].astype(np.float32)


class ServerCollection:
    """A collection on a Qdrant server (QDRANT_URL), searched there by HNSW; the member and
    its connections are dropped after retrieval."""

    def __init__(
        self, client: QdrantClient, name: str, hnsw: vectors.Hnsw, owns_client: bool = False
    ) -> None:
        self.client, self.name, self.hnsw = client, name, hnsw
        self._owns_client = owns_client

    def nearest(
        self, member: int, limit: int, exclude: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        fetch = limit + int(exclude.size)
        ids, scores = _nearest(self.client, self.name, member, fetch, self.hnsw)
        keep = _drop(ids, exclude)
        return ids[keep][:limit], scores[keep][:limit]

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


Reader = ServerCollection | vectors.EdgeReplica
_RETRY_S = 30.0  # a shard that failed to open is tried again after this, or when it changes


class Embeddings:
    """The live member embeddings, followed via `ef:embeddings:current`: a collection on a
    Qdrant server (QDRANT_URL), or this process's replica of the in-process shard that
    training sealed (vectors.EdgeReplica), opened off the event loop. A shard that cannot be
    opened is reported (`problem`, naming its path) and the previous one keeps serving."""

    def __init__(
        self,
        *,
        client: QdrantClient | None = None,
        root: Path | None = None,
        hnsw: vectors.Hnsw | None = None,
        problem: str = "",
    ) -> None:
        self.client, self.root = client, root
        self.hnsw = hnsw or vectors.Hnsw()
        self.problem = problem  # why the live embeddings cannot be searched, when known
        self.reader: Reader | None = None
        self._failed: tuple[str, str | None] | None = None
        self._retry_at = 0.0

    @classmethod
    def open(cls, cfg: Config) -> Embeddings:
        """The server's client with QDRANT_URL, else the in-process shards' directory."""
        try:
            hnsw = vectors.Hnsw.from_config(cfg)
            if cfg.qdrant_url:
                return cls(client=vectors.server_client(cfg), hnsw=hnsw)
        except (ValueError, OSError, RuntimeError) as exc:
            log.error("member embeddings not opened: %s", exc)
            return cls(problem=str(exc))
        return cls(root=cfg.qdrant_path, hnsw=hnsw)

    @property
    def collection(self) -> str | None:
        return None if self.reader is None else self.reader.name

    async def refresh(self, rds: AsyncClient) -> bool:
        """Follow the pointer (and, in process, a shard rebuilt under the same name); True
        when the live collection changed."""
        raw = await rds.get(keys.EMBEDDINGS_CURRENT)
        name = None if raw is None else raw.decode()
        if name is None:
            return await self._switch(None)
        if self.root is None:
            if self.reader is not None and self.reader.name == name:
                return False
            if self.client is None:
                return False  # `problem` says why
            return await self._switch(ServerCollection(self.client, name, self.hnsw))
        build = await asyncio.to_thread(_sealed_build, self.root, name)
        reader = self.reader
        if isinstance(reader, vectors.EdgeReplica) and (reader.name, reader.build) == (name, build):
            return False
        if self._failed == (name, build) and time.monotonic() < self._retry_at:
            return False
        try:
            replica = await asyncio.to_thread(vectors.EdgeReplica.open, self.root, name, self.hnsw)
        except vectors.ShardUnavailable as exc:
            self._failed, self._retry_at = (name, build), time.monotonic() + _RETRY_S
            self.problem = str(exc)
            keeps = f"; {reader.name} keeps serving" if reader is not None else ""
            log.error("embedding collection %s not opened: %s%s", name, exc, keeps)
            return False
        return await self._switch(replica)

    async def _switch(self, reader: Reader | None) -> bool:
        old, self.reader = self.reader, reader
        if old is None and reader is None:
            return False
        self.problem, self._failed = "", None
        log.info("embedding collection is now %s", None if reader is None else reader.name)
        if old is not None:
            await asyncio.to_thread(old.close)  # in process: deletes its copy
        return True

    def close(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.close()
        if self.client is not None:
            self.client.close()
            self.client = None


def open_collection(cfg: Config, name: str) -> Reader:
    """The embedding collection `name` as the candidates service reads it, opened now (a
    batch run's own reader: close it when the run ends). Raises vectors.ShardUnavailable,
    or the server client's error, naming what could not be opened."""
    hnsw = vectors.Hnsw.from_config(cfg)
    if cfg.qdrant_url:
        return ServerCollection(vectors.server_client(cfg), name, hnsw, owns_client=True)
    return vectors.EdgeReplica.open(cfg.qdrant_path, name, hnsw)


def _sealed_build(root: Path, name: str) -> str | None:
    """The build id of the sealed shard `name`; None if it cannot be read (opening it
    then says why)."""
    try:
        return str(vectors.read_marker(root / "shards" / name).get("build", ""))
    except vectors.ShardUnavailable:
        return None


class EbrSource:
    """Embedding-based retrieval: nearest members by cosine, never the member itself or its
    connections (dropped after retrieval)."""

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
        excluded = _excluded(graph, member)
        for _ in range(2):  # once more if training swapped the replica under this request
            reader = self._emb.reader
            if reader is None:
                raise NotReady(
                    f"member embeddings are not available: {self._emb.problem}"
                    if self._emb.problem
                    else "no member embeddings: run `edgeflow train` first"
                )
            try:
                ids, scores = await _search(reader, member, limit, excluded)
            except vectors.ReplicaClosed:
                continue
            return Generated(ids, scores, "cosine", 0.0, reader.name)
        raise SourceUnavailable("the embedding replica was replaced twice during one request")


async def _search(
    reader: Reader, member: int, limit: int, excluded: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(reader, ServerCollection):  # waits on the network, not the CPU
        return await asyncio.to_thread(reader.nearest, member, limit, excluded)
    # An HNSW search visits about ef x 2m vectors; a tiny shard is searched inline.
    fetch = limit + int(excluded.size)
    work = min(reader.points, max(reader.hnsw.ef, fetch) * 2 * reader.hnsw.m)
    try:
        return await cpu.run(
            "ebr", work * int(reader.marker.get("dim", 1)), reader.nearest, member, limit,
            excluded,
        )  # fmt: skip
    except (vectors.ReplicaClosed, cpu.DeadlineExpired):
        raise
    except Exception as exc:  # the engine's own error types
        raise SourceUnavailable(f"search in {reader.path} failed: {exc}") from exc


def _nearest(
    client: QdrantClient, collection: str, member: int, fetch: int, hnsw: vectors.Hnsw
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
        quantization = (
            models.QuantizationSearchParams(rescore=True, oversampling=hnsw.oversampling)
            if hnsw.quantized
            else None
        )
        points = client.query_points(
            collection,
            query=vector,
            limit=fetch,
            with_payload=False,
            search_params=models.SearchParams(
                hnsw_ef=max(hnsw.ef, fetch), quantization=quantization
            ),
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

    def __init__(self, redis_url: str, store: GraphStore) -> None:
        # Hand-encoded reads: a list read costs about half the CPU of redis-py's.
        self._pipe = open_pipeline(redis_url)
        self._store = store

    async def close(self) -> None:
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
        live, stored = await lists.read_list_entry(self._pipe, name, member)
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


# "Popular within what is known of the member" (PopularSource, within=neighbourhood): the
# member's neighbourhood is its connections (or, with none, its SEEDS nearest members by
# embedding) and at most RING of their connections; a candidate's score is how many of the
# neighbourhood it is connected to. Bounded: at most RING members' adjacency is read.
SEEDS = 16
RING = 128
WITHIN = ("all", "neighbourhood")


def popular_near(
    graph: Graph, seeds: np.ndarray, excluded: np.ndarray, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """Members best connected into the neighbourhood of `seeds` (dense indices), best first:
    (external ids, counts). Never one of `excluded` (sorted external ids); the seeds
    themselves may be candidates. Ties go to the better-connected member, then the lower id.
    The candidates service and the batch runner both rank with this."""
    seeds = np.unique(np.asarray(seeds, dtype=np.int64))
    if not seeds.size or limit <= 0:
        return _EMPTY_IDS, _EMPTY_SCORES
    degree = graph.degree
    _, first = graph.gather(seeds)
    hop, touches = np.unique(first, return_counts=True)
    hop_order = np.lexsort((graph.ids[hop], -degree[hop], -touches))
    ring = np.union1d(seeds, hop[hop_order][: max(RING - seeds.size, 0)])
    _, second = graph.gather(ring)
    cand, counts = np.unique(second, return_counts=True)
    ids = graph.ids[cand]
    keep = _drop(ids, excluded)
    cand, ids, counts = cand[keep], ids[keep], counts[keep]
    order = np.lexsort((ids, -degree[cand], -counts))[:limit]
    return ids[order], counts[order].astype(np.float32)


def fill_popular(
    near: tuple[np.ndarray, np.ndarray], ranked: tuple[np.ndarray, np.ndarray],
    excluded: np.ndarray, limit: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The neighbourhood's list, then the best-connected members (`ranked`: ids and degrees,
    best first) it lacks, to `limit`; a filler scores below 1 (degree over top degree + 1),
    so the scores keep the order."""
    ids, scores = near
    room = limit - ids.size
    if room <= 0:
        return ids[:limit], scores[:limit]
    gone = np.union1d(excluded, ids)
    head, degree = ranked[0][: room + gone.size], ranked[1][: room + gone.size]
    keep = _drop(head, gone)
    extra = head[keep][:room]
    top = float(ranked[1][0]) if ranked[1].size else 0.0
    extra_scores = (degree[keep][:room] / (top + 1.0)).astype(np.float32)
    return np.concatenate([ids, extra]), np.concatenate([scores, extra_scores])


class PopularSource:
    """Highest-degree members, for cold start; also serves members unknown to the graph.

    The ranking is made once per graph version (a nearline edge change makes a new one), in
    O(members), on the CPU threads; a request then only drops the member's connections.
    With `within: neighbourhood` a member's list starts with the members popular within
    its neighbourhood (popular_near: through its connections, else its embedding's nearest
    members), and the best-connected members fill the rest. With `max_degree` a member
    with more connections than that gets none (its other sources serve it)."""

    name = "popular"
    params: tuple[str, ...] = ("within", "max_degree")

    def __init__(self, store: GraphStore, embeddings: Embeddings | None = None) -> None:
        self._store = store
        self._emb = embeddings
        self._ranked: tuple[str, np.ndarray, np.ndarray] | None = None  # version, ids, degree

    async def _ranking(self, graph: Graph) -> tuple[np.ndarray, np.ndarray]:
        ranked = self._ranked
        if ranked is None or ranked[0] != graph.version:
            ids, degree = await cpu.run("popular", graph.n, _by_degree, graph)
            ranked = self._ranked = (graph.version, ids, degree)
        return ranked[1], ranked[2]

    async def generate(self, member: int, limit: int, params: Mapping[str, str]) -> Generated:
        params = check_params(self, params)
        within = params.get("within") or "all"
        if within not in WITHIN:
            raise InvalidParam(
                "params.within", f"must be one of {', '.join(WITHIN)}, got {within!r}"
            )
        max_degree = _int_param(params, "max_degree", -1, -1, 1_000_000_000)
        graph = _graph(self._store)
        i = graph.index_of(member)
        degree = int(graph.degree[i]) if i >= 0 else 0
        if 0 <= max_degree < degree:
            return Generated(
                _EMPTY_IDS, _EMPTY_SCORES, "degree", 0.0, graph.version,
                note=f"member {member} has {degree} connections; popular serves members "
                f"with at most {max_degree}",
            )  # fmt: skip
        ids, ranked_degree = await self._ranking(graph)
        excluded = _excluded(graph, member)
        if within == "neighbourhood" and i >= 0:
            seeds = graph.neighbors(i) if degree else await self._nearest(graph, member)
            if seeds.size:
                near = popular_near(graph, seeds, excluded, limit)
                out, scores = fill_popular(near, (ids, ranked_degree), excluded, limit)
                return Generated(out, scores, "popularity", 0.0, graph.version)
        head = ids[: limit + excluded.size]
        keep = _drop(head, excluded)
        return Generated(
            head[keep][:limit], ranked_degree[: head.size][keep][:limit], "degree", 0.0,
            graph.version,
        )  # fmt: skip

    async def _nearest(self, graph: Graph, member: int) -> np.ndarray:
        """Dense indices of the member's nearest members by embedding; none when it has no
        vector or the embeddings are not available (the global ranking serves it then)."""
        reader = None if self._emb is None else self._emb.reader
        if reader is None:
            return _EMPTY_IDS
        try:
            ids, _ = await _search(reader, member, SEEDS, np.asarray([member], np.int64))
        except (vectors.ReplicaClosed, SourceUnavailable) as exc:
            log.warning("popular: no embedding neighbours for member %s: %s", member, exc)
            return _EMPTY_IDS
        dense = graph.indices_of(ids)
        return dense[dense >= 0]


def _by_degree(graph: Graph) -> tuple[np.ndarray, np.ndarray]:
    """The best-connected members, by degree then id: enough of them for the largest limit
    after dropping the best-connected member's own links. Equal to the head of a stable
    argsort by -degree, found in O(members) by a partition rather than a full sort."""
    degree = graph.degree
    keep = min(graph.n, MAX_LIMIT + int(degree.max(initial=0)) + 1)
    if keep < graph.n:
        kth = np.partition(degree, graph.n - keep)[graph.n - keep]  # the keep-th largest
        above = np.flatnonzero(degree > kth)
        tied = np.flatnonzero(degree == kth)[: keep - above.size]  # the lowest ids first
        pick = np.concatenate([above, tied])
    else:
        pick = np.arange(graph.n)
    order = pick[np.lexsort((pick, -degree[pick]))]
    return graph.ids[order], degree[order].astype(np.float32)
