"""Shadow traffic: a variant of the graph run on a share of requests, compared with the
served ranking and recorded, never served.

A shadow starts only once the served response has been sent, runs in the background with
a bounded number in flight (further ones are skipped and counted), and its failures never
reach the caller.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import grpc

from edgeflow.experiments.records import ShadowComparison, overlap_at_k, rank_correlation
from edgeflow.experiments.stream_log import StreamLog
from edgeflow.gateway.engine import Engine, NodeFailed, UnknownMember
from edgeflow.shell import metrics
from edgeflow.workflow.compiled import Workflow
from edgeflow.workflow.model import Shadow

log = logging.getLogger("edgeflow.gateway")

MAX_IN_FLIGHT = 2


class ShadowRunner:
    def __init__(
        self,
        engine: Engine,
        records: StreamLog,
        max_in_flight: int = MAX_IN_FLIGHT,
        chance: Callable[[], float] = random.random,
    ) -> None:
        self._engine = engine
        self._records = records
        self._max = max_in_flight
        self._chance = chance
        self._tasks: set[asyncio.Task[None]] = set()

    def chosen(self, wf: Workflow) -> list[tuple[Shadow, Workflow]]:
        """The shadows this request runs: each by its own share of requests."""
        return [(s, g) for s, g in wf.shadows if self._chance() < s.share]

    def start(
        self,
        shadows: list[tuple[Shadow, Workflow]],
        member: int,
        k: int,
        request_id: str,
        served: tuple[int, ...],
        served_ms: float,
    ) -> None:
        for shadow, graph in shadows:
            if len(self._tasks) >= self._max:
                metrics.SHADOW_RUNS.labels(graph.surface, shadow.name, "skipped").inc()
                continue
            task = asyncio.create_task(
                self._run(shadow, graph, member, k, request_id, served, served_ms)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(
        self,
        shadow: Shadow,
        graph: Workflow,
        member: int,
        k: int,
        request_id: str,
        served: tuple[int, ...],
        served_ms: float,
    ) -> None:
        surface = graph.surface
        try:
            outcome = await self._engine.run(graph, member, k, graph.spec.budget_ms / 1000.0)
        except (UnknownMember, NodeFailed, grpc.aio.AioRpcError) as exc:
            metrics.SHADOW_RUNS.labels(surface, shadow.name, "failed").inc()
            log.info("shadow %s of %s failed: %s", shadow.name, surface, exc)
            return
        items = tuple(int(e.target) for e in outcome.frame.edges)
        record = ShadowComparison(
            request_id=request_id,
            time=time.time(),
            member=member,
            surface=surface,
            shadow=shadow.name,
            k=k,
            overlap_at_k=overlap_at_k(served, items, k),
            rank_correlation=rank_correlation(served, items),
            served_ms=served_ms,
            shadow_ms=outcome.total_ms,
            shadow_partial=outcome.partial,
            served_items=served,
            shadow_items=items,
        )
        self._records.put(record.encode())
        outcome_label = "partial" if outcome.partial else "compared"
        metrics.SHADOW_RUNS.labels(surface, shadow.name, outcome_label).inc()
        metrics.SHADOW_OVERLAP.labels(surface, shadow.name).observe(record.overlap_at_k)
        metrics.SHADOW_SECONDS.labels(surface, shadow.name).observe(outcome.total_ms / 1000)
