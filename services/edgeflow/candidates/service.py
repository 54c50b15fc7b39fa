"""The candidates service: `Generate` dispatches to a source and packs ids and scores.

It keeps the member graph in memory (following new versions in Redis) and follows the live
embedding collection: on a Qdrant server, or its own copy of the in-process shard that
training sealed (vectors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

import grpc
import redis

from edgeflow import tensor
from edgeflow.candidates.sources import (
    MAX_LIMIT,
    EbrSource,
    Embeddings,
    GraphSource,
    InvalidParam,
    MemberNotFound,
    NotReady,
    PopularSource,
    PrecomputedSource,
    Source,
    SourceUnavailable,
)
from edgeflow.config import Config
from edgeflow.shell import cpu
from edgeflow.shell.errors import RequestError
from edgeflow.shell.reload import Reloader
from edgeflow.shell.server import Service
from edgeflow.stores.graph_store import GraphNotLoaded, GraphStore, warm_sample
from edgeflow.stores.lists import ListError
from edgeflow.stores.redis_client import AsyncClient, connect_async
from edgeflow.v1 import candidates_pb2, candidates_pb2_grpc

log = logging.getLogger("edgeflow.candidates")

# Requests of one GenerateMany (a workflow's candidate nodes).
MAX_BATCH = 64
# Where a source starts within one GenerateMany: the one that waits on Redis, then the one
# that answers from memory in microseconds, then the CPU-heavy ones (graph, ebr).
_START_ORDER = {"precomputed": 0, "popular": 1}


class CandidatesService(Service):
    name = "candidates"
    service_names = ("edgeflow.v1.CandidateService",)

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._rds: AsyncClient | None = None
        self._store: GraphStore | None = None
        self._emb = Embeddings(problem="the service has not started")
        self._sources: dict[str, Source] = {}
        self._follow = Reloader(
            "embedding pointer refresh", cfg.reload_interval_s, self._refresh_embeddings, log,
            expected=(redis.RedisError, OSError),
        )  # fmt: skip

    def register(self, server: grpc.aio.Server) -> None:
        candidates_pb2_grpc.add_CandidateServiceServicer_to_server(_Servicer(self), server)

    async def start(self) -> None:
        self._rds = connect_async(self.cfg.redis_url)
        self._store = GraphStore(self._rds, self.cfg.reload_interval_s, self.cfg.graph_dir)
        try:
            if not await self._store.load():
                log.warning("no member graph yet: run `edgeflow ingest --edges FILE`")
        except (redis.RedisError, OSError) as exc:
            log.warning("graph not loaded, Redis at %s: %s", self.cfg.redis_url, exc)
        self._store.start_watching()
        self._emb = await asyncio.to_thread(Embeddings.open, self.cfg)
        try:
            await self._emb.refresh(self._rds)
        except (redis.RedisError, OSError) as exc:
            log.warning("embedding pointer not read, Redis at %s: %s", self.cfg.redis_url, exc)
        if self._emb.collection is None:
            log.warning("no member embeddings yet: run `edgeflow train`")
        self._follow.start()
        sources: list[Source] = [
            GraphSource(self._store, self.cfg.fof_max_visits),
            EbrSource(self._store, self._emb),
            PrecomputedSource(self.cfg.redis_url, self._store),
            PopularSource(self._store, self._emb),
        ]
        self._sources = {s.name: s for s in sources}

    async def warm(self) -> None:
        await warm_sources(self._sources, warm_sample(self._store)[0], self.cfg.redis_url)

    async def _refresh_embeddings(self) -> None:
        assert self._rds is not None
        await self._emb.refresh(self._rds)

    async def stop(self) -> None:
        await self._follow.close()
        if self._store is not None:
            await self._store.close()
        precomputed = self._sources.get("precomputed")
        if isinstance(precomputed, PrecomputedSource):
            await precomputed.close()
        await asyncio.to_thread(self._emb.close)  # in process: deletes its shard copy
        if self._rds is not None:
            await self._rds.aclose()

    async def generate_many(
        self, request: candidates_pb2.GenerateManyRequest, time_remaining: float | None = None
    ) -> candidates_pb2.GenerateManyResponse:
        """Each request under its own timeout (and the call's deadline, `time_remaining`
        seconds from now); a failure is that request's result only."""
        if not request.requests:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "requests: empty")
        if len(request.requests) > MAX_BATCH:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"requests: at most {MAX_BATCH}, got {len(request.requests)}",
            )
        results = [candidates_pb2.GenerateResult() for _ in request.requests]
        # Cheap sources start first: a list read's round trip to Redis overlaps the others'
        # work, and popular answers before friends of friends or EBR take the loop.
        order = sorted(
            range(len(request.requests)),
            key=lambda i: _START_ORDER.get(request.requests[i].source, len(_START_ORDER)),
        )
        await asyncio.gather(
            *(self._one(request.requests[i], results[i], time_remaining) for i in order)
        )
        return candidates_pb2.GenerateManyResponse(results=results)

    async def _one(
        self,
        request: candidates_pb2.GenerateRequest,
        result: candidates_pb2.GenerateResult,
        time_remaining: float | None,
    ) -> None:
        timeout = request.timeout_ms / 1000 if request.timeout_ms else None
        if cpu.settings().deadline_checks and time_remaining is not None:
            # Time the call spent before it reached this service counts too.
            timeout = time_remaining if timeout is None else min(timeout, time_remaining)
        try:
            with cpu.deadline_in(timeout):
                if timeout is None:
                    result.response.CopyFrom(await self.generate(request))
                else:
                    async with asyncio.timeout(max(timeout, 0.0)):
                        result.response.CopyFrom(await self.generate(request))
        except RequestError as exc:
            result.code, result.message = exc.code.value[0], exc.message
        except TimeoutError:
            result.code = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            result.message = f"{request.source}: no answer within {request.timeout_ms} ms"

    async def generate(
        self, request: candidates_pb2.GenerateRequest
    ) -> candidates_pb2.GenerateResponse:
        """Run one request; raises RequestError with the status code for the caller."""
        return await generate_from(self._sources, request, self.cfg.redis_url)


class ListsOnly:
    """The precomputed source alone, for a process that is not the candidates service (the
    gateway, while that service is unreachable): lists are read from Redis and no graph is
    held, so only the member itself is left out (merging's filters do the rest)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._rds = connect_async(cfg.redis_url)  # connects on first use
        self._source = PrecomputedSource(cfg.redis_url, GraphStore(self._rds))
        self.sources: dict[str, Source] = {self._source.name: self._source}

    async def generate(
        self, request: candidates_pb2.GenerateRequest
    ) -> candidates_pb2.GenerateResponse:
        return await generate_from(self.sources, request, self.cfg.redis_url)

    async def warm(self) -> None:
        """It stands in while the candidates service is down: the worst moment to open its
        connections for the first time."""
        await warm_sources(self.sources, 0, self.cfg.redis_url)

    async def close(self) -> None:
        await self._source.close()
        await self._rds.aclose()


async def warm_sources(sources: Mapping[str, Source], member: int, redis_url: str) -> None:
    """One Generate per source for `member`, whatever it answers (Service.warm)."""
    for name in sources:
        params = {"list": "warm-up"} if name == "precomputed" else {}  # absent: read, empty
        request = candidates_pb2.GenerateRequest(
            member=member, source=name, limit=100, params=params
        )
        with contextlib.suppress(RequestError):  # e.g. no embeddings yet
            await generate_from(sources, request, redis_url)


async def generate_from(
    sources: Mapping[str, Source], request: candidates_pb2.GenerateRequest, redis_url: str
) -> candidates_pb2.GenerateResponse:
    """One Generate request against `sources`; RequestError carries the status code."""
    source = sources.get(request.source)
    if source is None:
        known = ", ".join(sorted(sources)) or "none (service not started)"
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"source: unknown candidate source {request.source!r} (expected one of {known})",
        )
    if not 1 <= request.limit <= MAX_LIMIT:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"limit: must be between 1 and {MAX_LIMIT}, got {request.limit}",
        )
    if request.member < 0:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"member: ids are non-negative, got {request.member}",
        )
    try:
        cpu.check(source.name)  # a request already late does no work at all
        out = await source.generate(request.member, request.limit, request.params)
    except cpu.DeadlineExpired as exc:
        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{source.name}: {exc}") from exc
    except InvalidParam as exc:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
    except MemberNotFound as exc:
        raise RequestError(grpc.StatusCode.NOT_FOUND, str(exc)) from exc
    except (NotReady, GraphNotLoaded) as exc:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"{source.name}: {exc}") from exc
    except SourceUnavailable as exc:
        raise RequestError(grpc.StatusCode.UNAVAILABLE, f"{source.name}: {exc}") from exc
    except (redis.RedisError, OSError) as exc:
        raise RequestError(
            grpc.StatusCode.UNAVAILABLE,
            f"{source.name}: Redis at {redis_url} is unavailable: {exc}",
        ) from exc
    except ListError as exc:
        raise RequestError(grpc.StatusCode.INTERNAL, f"{source.name}: {exc}") from exc
    return candidates_pb2.GenerateResponse(
        ids=out.ids.tolist(),
        scores=tensor.pack(out.scores, (out.column,)),
        age_seconds=out.age_seconds,
        version=out.version,
        mode=out.mode,
        note=out.note,
    )


class _Servicer(candidates_pb2_grpc.CandidateServiceServicer):
    def __init__(self, service: CandidatesService) -> None:
        self._service = service

    async def Generate(
        self, request: candidates_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> candidates_pb2.GenerateResponse:
        with cpu.deadline_in(context.time_remaining()):
            return await self._service.generate(request)

    async def GenerateMany(
        self, request: candidates_pb2.GenerateManyRequest, context: grpc.aio.ServicerContext
    ) -> candidates_pb2.GenerateManyResponse:
        return await self._service.generate_many(request, context.time_remaining())


def create(cfg: Config) -> Service:
    return CandidatesService(cfg)
