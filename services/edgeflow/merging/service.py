"""The merging service over gRPC: Merge (blend, filters, quotas, top-K, social proof) and
Filter.

Input errors are INVALID_ARGUMENT naming the field; Redis going away during the filters is
UNAVAILABLE within a bounded time, and a Redis that refuses SMISMEMBER is FAILED_PRECONDITION.
Social proof comes from the member graph, mapped as the other services map it; until one is
loaded (or in the gateway's in-process fallback, which maps none) edges carry none.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence

import grpc
import numpy as np
import redis

from edgeflow import tensor
from edgeflow.config import Config
from edgeflow.graph import mutual_connections
from edgeflow.graph_store import CLOSE_WAIT_S, GraphNotLoaded, GraphStore
from edgeflow.merging import blend, filters, wire
from edgeflow.merging.blend import MAX_K, BlendError, ScoredList
from edgeflow.merging.filters import FilterError
from edgeflow.redis_client import AsyncClient, connect_async, parse_url
from edgeflow.resp import RawPipeline, RespError, RespReplyError
from edgeflow.resp_cluster import open_pipeline
from edgeflow.server import RequestError, Service, answer
from edgeflow.v1 import merging_pb2, merging_pb2_grpc

log = logging.getLogger("edgeflow.merging")

# Upper bound on the filters' Redis round trip, below any sensible request budget.
REDIS_BUDGET_S = 1.0
# Mutual connections named per edge, and how many are looked at to find them (some may be
# deactivated).
MUTUALS_SHOWN = 3
_MUTUALS_READ = 2 * MUTUALS_SHOWN


def to_list(i: int, msg: merging_pb2.ScoredList) -> ScoredList:
    """A ScoredList message as a blend input; raises BlendError naming the field."""
    where = f"lists[{i}] ({msg.name!r})"
    if not msg.name:
        raise BlendError(f"lists[{i}].name is empty")
    if not math.isfinite(msg.age_seconds) or msg.age_seconds < 0:
        raise BlendError(f"{where}.age_seconds must be a finite number >= 0, got {msg.age_seconds}")
    try:
        scores = tensor.unpack(msg.scores)
    except ValueError as exc:
        raise BlendError(f"{where}.scores: {exc}") from exc
    return ScoredList(
        name=msg.name,
        ids=tensor.ids(msg.ids),
        scores=scores,
        columns=tuple(msg.scores.columns),
        weight=msg.weight,
        mode=msg.mode or "online",  # copied into provenance as given
        age_seconds=msg.age_seconds,
        model_column=msg.model_column,
        source_info={i.name: (i.mode or "online", i.age_seconds) for i in msg.sources},
    )


def to_quotas(quotas: Sequence[merging_pb2.Quota]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, q in enumerate(quotas):
        if not q.source:
            raise BlendError(f"quotas[{i}].source is empty")
        if q.source in out:
            raise BlendError(f"quotas[{i}]: source {q.source!r} already has a quota")
        out[q.source] = q.max
    return out


class MergingService(Service):
    name = "merging"
    service_names = ("edgeflow.v1.MergingService",)

    def __init__(self, cfg: Config, graph: bool = True) -> None:
        """`graph`: map the member graph for social proof (the gateway's fallback does not)."""
        self._cfg = cfg
        self._redis_at = parse_url(cfg.redis_url).where  # never the credentials
        self._redis: RawPipeline | None = None
        self._with_graph = graph
        self._rds: AsyncClient | None = None
        self._store: GraphStore | None = None
        self._loading: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> None:
        merging_pb2_grpc.add_MergingServiceServicer_to_server(_Servicer(self), server)

    async def start(self) -> None:
        # Nothing to load; the client connects on first use, so Merge works without Redis
        # whenever no Redis-backed filter is asked for.
        self._redis = open_pipeline(self._cfg.redis_url)
        if not self._with_graph:
            return
        self._rds = connect_async(self._cfg.redis_url)
        self._store = GraphStore(self._rds, self._cfg.reload_interval_s, self._cfg.graph_dir)
        # In the background: Merge serves at once, with social proof once the graph is mapped.
        self._loading = asyncio.create_task(self._load_graph(self._store))

    @staticmethod
    async def _load_graph(store: GraphStore) -> None:
        try:
            await store.load()
        except (redis.RedisError, OSError, GraphNotLoaded) as exc:
            log.warning("no member graph for social proof yet: %s", exc)
        store.start_watching()

    async def stop(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
            await asyncio.wait({self._loading}, timeout=CLOSE_WAIT_S)
        if self._store is not None:
            await self._store.close()
        if self._rds is not None:
            await self._rds.aclose()
        if self._redis is not None:
            await self._redis.close()
            self._redis = None

    async def merge(
        self, request: merging_pb2.MergeRequest, deadline_s: float | None
    ) -> merging_pb2.MergeResponse:
        try:
            if not 1 <= request.k <= MAX_K:
                raise BlendError(f"k must be in 1..{MAX_K}, got {request.k}")
            names = filters.check(request.filters)
            quotas = to_quotas(request.quotas)
            lists = [to_list(i, m) for i, m in enumerate(request.lists)]
            pool = blend.blend(lists)
        except (BlendError, FilterError) as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        why: list[tuple[str, np.ndarray]] | None = [] if request.explain else None
        sets = [n for n in names if n != filters.DEACTIVATED]
        keep, dropped = await self.visible(request.member, pool.ids, sets, deadline_s, why)
        sel = blend.select(pool, request.k, quotas, keep, dropped, explain=request.explain)
        if filters.DEACTIVATED in names:
            sel = await self._drop_deactivated(request, pool, quotas, keep, dropped, why, sel,
                                               deadline_s)  # fmt: skip
        proof = await self._social_proof(
            request.member, pool.ids[sel.index], filters.DEACTIVATED in names, deadline_s
        )
        out = blend.response(pool, sel, proof)
        if why is not None:
            blend.explain(out.dropped_items, lists, pool, why, sel)
        return out

    async def _social_proof(
        self, member: int, targets: np.ndarray, hide_deactivated: bool, deadline_s: float | None
    ) -> list[bytes]:
        """Each served edge's wire.social_proof: the connections the member and the target
        share, counted in the graph, and the first few of them that are not deactivated.
        Nothing (no field) without a graph."""
        try:
            graph = self._store.graph if self._store is not None else None
        except GraphNotLoaded:
            graph = None
        if graph is None or not targets.size:
            return []
        most = _MUTUALS_READ if hide_deactivated else MUTUALS_SHOWN
        counts, owner, mutual = mutual_connections(
            graph, graph.index_of(member), graph.indices_of(targets), most
        )
        named = graph.ids[mutual]
        if hide_deactivated and named.size:
            shown, _ = await self.visible(member, named, (filters.DEACTIVATED,), deadline_s)
            owner, named = owner[shown], named[shown]
        per_edge: list[list[int]] = [[] for _ in range(targets.size)]
        for edge, m in zip(owner.tolist(), named.tolist(), strict=True):
            if len(per_edge[edge]) < MUTUALS_SHOWN:
                per_edge[edge].append(m)
        return [wire.social_proof(c, ids) for c, ids in zip(counts.tolist(), per_edge, strict=True)]

    async def _drop_deactivated(
        self,
        request: merging_pb2.MergeRequest,
        pool: blend.Blended,
        quotas: dict[str, int],
        keep: np.ndarray,
        dropped: dict[str, int],
        why: list[tuple[str, np.ndarray]] | None,
        sel: blend.Selection,
        deadline_s: float | None,
    ) -> blend.Selection:
        """The selection without deactivated members. Deactivation is rare and checked per
        candidate, so only the items that reach the top K are asked about; each one found
        is dropped and the selection made again, until a top K holds none."""
        asked = np.zeros(pool.ids.size, dtype=bool)
        while True:
            fresh = sel.index[~asked[sel.index]]
            if not fresh.size:
                return sel
            asked[fresh] = True
            shown, _ = await self.visible(
                request.member, pool.ids[fresh], (filters.DEACTIVATED,), deadline_s
            )
            gone = fresh[~shown]
            if not gone.size:
                return sel
            keep[gone] = False
            dropped[filters.DEACTIVATED] = dropped.get(filters.DEACTIVATED, 0) + gone.size
            if why is not None:
                why.append((filters.DEACTIVATED, gone))
            sel = blend.select(pool, request.k, quotas, keep, dropped, explain=why is not None)

    async def filter(
        self, request: merging_pb2.FilterRequest, deadline_s: float | None
    ) -> merging_pb2.FilterResponse:
        try:
            names = filters.check(request.filters)
        except FilterError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        ids = tensor.ids(request.ids)
        why: list[tuple[str, np.ndarray]] | None = [] if request.explain else None
        keep, dropped = await self.visible(request.member, ids, names, deadline_s, why)
        out = merging_pb2.FilterResponse(
            keep=np.flatnonzero(keep).tolist(), dropped=blend.drop_counts(dropped)
        )
        for name, rows in why or ():
            blend.add_dropped(out.dropped_items, ids[rows], name)
        return out

    async def visible(
        self,
        member: int,
        ids: np.ndarray,
        names: Sequence[str],
        deadline_s: float | None,
        why: list[tuple[str, np.ndarray]] | None = None,
    ) -> tuple[np.ndarray, dict[str, int]]:
        """Apply the filters (see filters.visible for `why`), mapping Redis failures to
        UNAVAILABLE or FAILED_PRECONDITION."""
        if self._redis is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "merging: service is not started")
        budget = REDIS_BUDGET_S if deadline_s is None else min(REDIS_BUDGET_S, deadline_s)
        try:
            async with asyncio.timeout(budget):
                return await filters.visible(self._redis, member, ids, names, why)
        except RespReplyError as exc:
            msg = f"merging: redis at {self._redis_at} refused the filters {list(names)}: {exc}"
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, msg) from exc
        except (RespError, OSError, TimeoutError) as exc:
            reason = str(exc) or f"no reply within {budget:.2f}s"
            msg = f"merging: redis at {self._redis_at} unavailable for filters {list(names)}: "
            log.warning("%s%s", msg, reason)
            raise RequestError(grpc.StatusCode.UNAVAILABLE, msg + reason) from exc


class _Servicer(merging_pb2_grpc.MergingServiceServicer):
    def __init__(self, service: MergingService) -> None:
        self._svc = service

    async def Merge(
        self, request: merging_pb2.MergeRequest, context: grpc.aio.ServicerContext
    ) -> merging_pb2.MergeResponse:
        return await answer(context, self._svc.merge(request, context.time_remaining()))

    async def Filter(
        self, request: merging_pb2.FilterRequest, context: grpc.aio.ServicerContext
    ) -> merging_pb2.FilterResponse:
        return await answer(context, self._svc.filter(request, context.time_remaining()))


def create(cfg: Config) -> Service:
    return MergingService(cfg)
