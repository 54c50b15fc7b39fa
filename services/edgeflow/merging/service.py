"""The merging service over gRPC: Merge (blend, filters, quotas, top-K, social proof) and
Filter.

Input errors are INVALID_ARGUMENT naming the field; Redis going away during the filters is
UNAVAILABLE within a bounded time, and a Redis that refuses SMISMEMBER is FAILED_PRECONDITION.
Social proof comes from the member graph, mapped as the other services map it; until one is
loaded (or in the gateway's in-process fallback, which maps none) edges carry none.

Merge reads Redis once in the usual case: the member's SETs over the pool and, in the same
round trip, each likely top-K item's own state (deactivated, impressions) and that of the
mutual connections it would name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
import redis

from edgeflow import tensor
from edgeflow.config import Config
from edgeflow.graph import Graph, mutual_connections
from edgeflow.merging import blend, diversity, filters, impressions, wire
from edgeflow.merging.blend import MAX_K, BlendError, ScoredList
from edgeflow.merging.filters import FilterError
from edgeflow.shell.errors import RequestError
from edgeflow.shell.reload import CLOSE_WAIT_S
from edgeflow.shell.server import Service
from edgeflow.stores.graph_store import GraphNotLoaded, GraphStore, warm_sample
from edgeflow.stores.redis_client import AsyncClient, connect_async, parse_url
from edgeflow.stores.resp import RawPipeline, RespError, RespReplyError
from edgeflow.stores.resp_cluster import open_pipeline
from edgeflow.v1 import merging_pb2, merging_pb2_grpc

log = logging.getLogger("edgeflow.merging")
T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")

# Upper bound on the filters' Redis round trip, below any sensible request budget.
REDIS_BUDGET_S = 1.0
# Mutual connections named per edge, and how many are looked at to find them (some may be
# deactivated).
MUTUALS_SHOWN = 3
_MUTUALS_READ = 2 * MUTUALS_SHOWN


# Items read beyond the likely top K in the first round trip, for the few the SETs hide.
_SLACK = 4
_NONE = np.zeros(0, dtype=np.int64)


@dataclasses.dataclass
class _Answers:
    """What Redis said about single items of a pool (by position): asked yet, deactivated,
    and the member's impression count of it, read at `now`."""

    asked: np.ndarray
    gone: np.ndarray
    seen: np.ndarray
    now: float

    def __init__(self, size: int, now: float) -> None:
        self.asked = np.zeros(size, dtype=bool)
        self.gone = np.zeros(size, dtype=bool)
        self.seen = np.zeros(size, dtype=np.int64)
        self.now = now


@dataclasses.dataclass
class _Mutuals:
    """The connections a member shares with some items of a pool (`pos`, positions): the
    count per item, and the first few of them per item (`owner` row into `pos`, member
    `ids`), with which of those may be named (`shown`: not deactivated)."""

    pos: np.ndarray
    counts: np.ndarray
    owner: np.ndarray
    ids: np.ndarray
    shown: np.ndarray

    @classmethod
    def of(
        cls, graph: Graph | None, member: int, ids: np.ndarray, pos: np.ndarray, hide: bool
    ) -> _Mutuals | None:
        """From the graph (None without one); with `hide`, more are read than are named,
        since some may turn out to be deactivated."""
        if graph is None:
            return None
        most = _MUTUALS_READ if hide else MUTUALS_SHOWN
        counts, owner, mutual = mutual_connections(
            graph, graph.index_of(member), graph.indices_of(ids[pos]), most
        )
        named = graph.ids[mutual]
        return cls(pos, counts, owner, named, np.ones(named.size, dtype=bool))

    def named(self) -> dict[int, tuple[int, list[int]]]:
        """Position -> (count, the first MUTUALS_SHOWN ids that may be named)."""
        out: dict[int, tuple[int, list[int]]] = {
            p: (c, []) for p, c in zip(self.pos.tolist(), self.counts.tolist(), strict=True)
        }
        rows = self.pos[self.owner[self.shown]].tolist()
        for p, m in zip(rows, self.ids[self.shown].tolist(), strict=True):
            if len(out[p][1]) < MUTUALS_SHOWN:
                out[p][1].append(m)
        return out


async def _both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Both results, awaited together; a failure is raised once both are done, so that
    neither is left running with an exception nobody reads."""
    one, two = await asyncio.gather(first, second, return_exceptions=True)
    for result in (one, two):
        if isinstance(result, BaseException):
            raise result
    return one, two  # type: ignore[return-value]


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

    async def warm(self) -> None:
        member, ids = warm_sample(self._store)
        request = merging_pb2.MergeRequest(
            member=member, k=10, filters=filters.KNOWN,
            impressions=merging_pb2.Impressions(
                demote_after=3, suppress_after=6, for_seconds=impressions.DAY_S,
                demote_factor=0.5,
            ),
        )  # fmt: skip
        scores = np.linspace(1.0, 0.0, ids.size, dtype=np.float32)[:, None]
        request.lists.add(name="warm-up", ids=ids.tolist(), weight=1.0, model_column=-1,
                          scores=tensor.pack(scores, ("score",)))  # fmt: skip
        await self.merge(request, None)

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
            rule = impressions.Rule.from_request(request)
            lists = [to_list(i, m) for i, m in enumerate(request.lists)]
            pool = blend.blend(lists)
        except (BlendError, FilterError, impressions.ImpressionsError) as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        why: list[tuple[str, np.ndarray]] | None = [] if request.explain else None
        sets = [n for n in names if n != filters.DEACTIVATED]
        hide = filters.DEACTIVATED in names
        graph = self._graph()
        answers = _Answers(pool.ids.size, time.time())
        # One round trip in the usual case: the member's SETs over the whole pool and, beside
        # them, the per-item reads (deactivated, impressions, the state of the mutual
        # connections shown as social proof) for the items likely to reach the top K, picked
        # before the SETs answer. A later round asks only about what that guess missed.
        likely = np.zeros(0, dtype=np.int64)
        if hide or rule is not None:
            width = min(2 * request.k, MAX_K) if rule is not None else request.k
            width = min(width + max(_SLACK, width // 4), MAX_K)
            likely = blend.select(pool, width, quotas, pool.ids != request.member).index
        mutuals = _Mutuals.of(graph, request.member, pool.ids, likely, hide)
        (keep, dropped), _ = await _both(
            self.visible(request.member, pool.ids, sets, deadline_s, why),
            self._answer(answers, request.member, pool.ids, likely, hide, rule, mutuals,
                         deadline_s),
        )  # fmt: skip
        sel = blend.select(pool, request.k, quotas, keep, dropped, explain=request.explain)
        if hide or rule is not None:
            if rule is not None:  # demotion lowers scores: on this request's own copy
                pool = dataclasses.replace(pool, score=pool.score.copy())
            sel = await self._settle_top_k(request, pool, quotas, keep, dropped, why, sel,
                                           hide, rule, answers, deadline_s)  # fmt: skip
        sel = diversity.rerank(request, pool, sel, self._store)  # cut to the k served
        proof = await self._social_proof(
            graph, request.member, pool.ids, sel.index, hide, mutuals, deadline_s
        )
        out = blend.response(pool, sel, proof)
        if why is not None:
            blend.explain(out.dropped_items, lists, pool, why, sel)
        return out

    def _graph(self) -> Graph | None:
        try:
            return self._store.graph if self._store is not None else None
        except GraphNotLoaded:
            return None

    async def _social_proof(
        self,
        graph: Graph | None,
        member: int,
        ids: np.ndarray,
        index: np.ndarray,
        hide_deactivated: bool,
        known: _Mutuals | None,
        deadline_s: float | None,
    ) -> list[bytes]:
        """Each served edge's wire.social_proof: the connections the member and the target
        (`ids[index]`) share, counted in the graph, and the first few of them that are not
        deactivated; from `known` where it covers the edge, else read now. Nothing (no
        field) without a graph."""
        if graph is None or not index.size:
            return []
        parts = [known] if known is not None else []
        missing = index
        if known is not None:  # a mask, not np.isin: its np.unique imports numpy.ma at first use
            covered = np.zeros(ids.size, dtype=bool)
            covered[known.pos] = True
            missing = index[~covered[index]]
        if missing.size:
            extra = _Mutuals.of(graph, member, ids, missing, hide_deactivated)
            assert extra is not None
            if hide_deactivated and extra.ids.size:
                extra.shown = ~await self._deactivated(extra.ids, deadline_s)
            parts.append(extra)
        per_edge: dict[int, tuple[int, list[int]]] = {}
        for part in parts:
            per_edge.update(part.named())
        return [wire.social_proof(*per_edge[i]) for i in index.tolist()]

    async def _settle_top_k(
        self,
        request: merging_pb2.MergeRequest,
        pool: blend.Blended,
        quotas: dict[str, int],
        keep: np.ndarray,
        dropped: dict[str, int],
        why: list[tuple[str, np.ndarray]] | None,
        sel: blend.Selection,
        hide_deactivated: bool,
        rule: impressions.Rule | None,
        answers: _Answers,
        deadline_s: float | None,
    ) -> blend.Selection:
        """The selection without deactivated members, and with the member's impressions
        applied (see merging/impressions.py). Both are read per candidate, so only the items
        that reach the top K are asked about (`answers` holds what was read already); a drop
        or a demotion makes the selection again, until a top K holds no item not yet looked
        at. Each item is looked at once, so this ends. With impressions, the first round
        looks at the best 2K: a member shown the same list again has most of its top K
        demoted at once, and the items that replace them are then known without another
        round."""
        looked = np.zeros(pool.ids.size, dtype=bool)
        wide = None
        if rule is not None and sel.index.size == request.k:
            wide = blend.select(pool, min(2 * request.k, MAX_K), quotas, keep).index
        while True:
            ask = sel.index if wide is None else wide
            wide = None
            fresh = ask[~looked[ask]]
            if not fresh.size:
                return sel
            looked[fresh] = True
            await self._answer(answers, request.member, pool.ids, fresh, hide_deactivated,
                               rule, None, deadline_s)  # fmt: skip
            shown = ~answers.gone[fresh]
            changed = self._drop(fresh[~shown], filters.DEACTIVATED, keep, dropped, why)
            if rule is not None:
                seen = answers.seen[fresh]
                over = shown & (seen >= rule.suppress_after)
                changed |= self._drop(fresh[over], impressions.REASON, keep, dropped, why)
                demote = fresh[shown & ~over & (seen >= rule.demote_after)]
                if demote.size and rule.demote_factor < 1:
                    pool.score[demote] *= np.float32(rule.demote_factor)
                    changed = True
            if not changed:
                return sel
            sel = blend.select(pool, request.k, quotas, keep, dropped, explain=why is not None)

    async def _answer(
        self,
        answers: _Answers,
        member: int,
        ids: np.ndarray,
        index: np.ndarray,
        hide_deactivated: bool,
        rule: impressions.Rule | None,
        mutuals: _Mutuals | None,
        deadline_s: float | None,
    ) -> None:
        """Read into `answers` what is not known yet of the items `ids[index]`: whether each
        is deactivated (when hiding them) and the member's impression count (with a rule);
        and, with `mutuals`, which of its connections are deactivated. One round trip."""
        index = index[~answers.asked[index]]
        answers.asked[index] = True
        also = mutuals.ids if mutuals is not None and hide_deactivated else _NONE
        todo = np.concatenate([ids[index], also]) if hide_deactivated else _NONE
        gone, seen = await _both(
            self._deactivated(todo, deadline_s),
            self._impressions(member, ids[index], rule, answers.now, deadline_s),
        )
        if hide_deactivated:
            answers.gone[index] = gone[: index.size]
            if mutuals is not None:
                mutuals.shown = ~gone[index.size :]
        answers.seen[index] = seen

    async def _deactivated(self, ids: np.ndarray, deadline_s: float | None) -> np.ndarray:
        if not ids.size:
            return np.zeros(0, dtype=bool)
        return await self._redis_read(
            filters.deactivated(self._pipeline(), ids), (filters.DEACTIVATED,), deadline_s
        )

    @staticmethod
    def _drop(
        gone: np.ndarray,
        reason: str,
        keep: np.ndarray,
        dropped: dict[str, int],
        why: list[tuple[str, np.ndarray]] | None,
    ) -> bool:
        if not gone.size:
            return False
        keep[gone] = False
        dropped[reason] = dropped.get(reason, 0) + gone.size
        if why is not None:
            why.append((reason, gone))
        return True

    async def _impressions(
        self,
        member: int,
        ids: np.ndarray,
        rule: impressions.Rule | None,
        now: float,
        deadline_s: float | None,
    ) -> np.ndarray:
        """The member's impression counts of `ids` (zeros without a rule)."""
        if rule is None or not ids.size:
            return np.zeros(ids.size, dtype=np.int64)
        return await self._redis_read(
            impressions.counts(self._pipeline(), member, ids, rule.for_seconds, now),
            (impressions.REASON,), deadline_s,
        )  # fmt: skip

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
        return await self._redis_read(
            filters.visible(self._pipeline(), member, ids, names, why), names, deadline_s
        )

    def _pipeline(self) -> RawPipeline:
        if self._redis is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "merging: service is not started")
        return self._redis

    async def _redis_read(
        self, work: Coroutine[Any, Any, T], names: Sequence[str], deadline_s: float | None
    ) -> T:
        """`work`'s result within the filters' Redis budget, mapping Redis failures to
        UNAVAILABLE or FAILED_PRECONDITION."""
        budget = REDIS_BUDGET_S if deadline_s is None else min(REDIS_BUDGET_S, deadline_s)
        try:
            async with asyncio.timeout(budget):
                return await work
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
        return await self._svc.merge(request, context.time_remaining())

    async def Filter(
        self, request: merging_pb2.FilterRequest, context: grpc.aio.ServicerContext
    ) -> merging_pb2.FilterResponse:
        return await self._svc.filter(request, context.time_remaining())


def create(cfg: Config) -> Service:
    return MergingService(cfg)
