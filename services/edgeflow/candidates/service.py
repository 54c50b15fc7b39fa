"""The candidates service: `Generate` dispatches to a source and packs ids and scores.

It keeps the member graph in memory (following new versions in Redis), owns the Qdrant
local storage while it runs and follows the live embedding collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import redis
import redis.asyncio as aioredis
from qdrant_client import QdrantClient

from edgeflow import tensor, vectors
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
from edgeflow.graph_store import GraphNotLoaded, GraphStore
from edgeflow.lists import ListError
from edgeflow.redis_client import connect_async
from edgeflow.server import RequestError, Service, answer
from edgeflow.v1 import candidates_pb2, candidates_pb2_grpc

log = logging.getLogger("edgeflow.candidates")

# Requests of one GenerateMany (a workflow's candidate nodes).
MAX_BATCH = 64
_WAITS_ON_REDIS = frozenset({"precomputed"})


class CandidatesService(Service):
    name = "candidates"
    service_names = ("edgeflow.v1.CandidateService",)

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._rds: aioredis.Redis | None = None
        self._store: GraphStore | None = None
        self._emb = Embeddings(client=None, problem="the service has not started")
        self._sources: dict[str, Source] = {}
        self._watch: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> None:
        candidates_pb2_grpc.add_CandidateServiceServicer_to_server(_Servicer(self), server)

    async def start(self) -> None:
        self._rds = connect_async(self.cfg.redis_url)
        self._store = GraphStore(self._rds, self.cfg.reload_interval_s)
        try:
            if not await self._store.load():
                log.warning("no member graph yet: run `edgeflow ingest --edges FILE`")
        except (redis.RedisError, OSError) as exc:
            log.warning("graph not loaded, Redis at %s: %s", self.cfg.redis_url, exc)
        self._store.start_watching()
        self._emb.client = await _open_qdrant(self.cfg, self._emb)
        self._emb.local = not self.cfg.qdrant_url
        try:
            await self._emb.refresh(self._rds)
        except (redis.RedisError, OSError) as exc:
            log.warning("embedding pointer not read, Redis at %s: %s", self.cfg.redis_url, exc)
        if self._emb.collection is None:
            log.warning("no member embeddings yet: run `edgeflow train`")
        self._watch = asyncio.create_task(self._follow_embeddings())
        sources: list[Source] = [
            GraphSource(self._store),
            EbrSource(self._store, self._emb),
            PrecomputedSource(self._rds, self._store),
            PopularSource(self._store),
        ]
        self._sources = {s.name: s for s in sources}

    async def _follow_embeddings(self) -> None:
        assert self._rds is not None
        while True:
            await asyncio.sleep(self.cfg.reload_interval_s)
            try:
                await self._emb.refresh(self._rds)
            except (redis.RedisError, OSError) as exc:
                log.warning("embedding pointer refresh failed: %s", exc)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._store is not None:
            await self._store.close()
        precomputed = self._sources.get("precomputed")
        if isinstance(precomputed, PrecomputedSource):
            await precomputed.close()
        if self._emb.client is not None:
            self._emb.client.close()  # releases the local storage lock
            self._emb.client = None
        if self._rds is not None:
            await self._rds.aclose()

    async def generate_many(
        self, request: candidates_pb2.GenerateManyRequest
    ) -> candidates_pb2.GenerateManyResponse:
        """Each request under its own timeout; a failure is that request's result only."""
        if not request.requests:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "requests: empty")
        if len(request.requests) > MAX_BATCH:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"requests: at most {MAX_BATCH}, got {len(request.requests)}",
            )
        results = [candidates_pb2.GenerateResult() for _ in request.requests]
        # Sources that wait on Redis start first, so their round trip overlaps the CPU work
        # of the in-memory ones (which run one after another on this event loop anyway).
        order = sorted(
            range(len(request.requests)),
            key=lambda i: request.requests[i].source not in _WAITS_ON_REDIS,
        )
        await asyncio.gather(*(self._one(request.requests[i], results[i]) for i in order))
        return candidates_pb2.GenerateManyResponse(results=results)

    async def _one(
        self, request: candidates_pb2.GenerateRequest, result: candidates_pb2.GenerateResult
    ) -> None:
        try:
            if request.timeout_ms:
                async with asyncio.timeout(request.timeout_ms / 1000):
                    result.response.CopyFrom(await self.generate(request))
            else:
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
        source = self._sources.get(request.source)
        if source is None:
            known = ", ".join(sorted(self._sources)) or "none (service not started)"
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
            out = await source.generate(request.member, request.limit, request.params)
        except InvalidParam as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        except MemberNotFound as exc:
            raise RequestError(grpc.StatusCode.NOT_FOUND, str(exc)) from exc
        except (NotReady, GraphNotLoaded) as exc:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{source.name}: {exc}"
            ) from exc
        except SourceUnavailable as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"{source.name}: {exc}") from exc
        except (redis.RedisError, OSError) as exc:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"{source.name}: Redis at {self.cfg.redis_url} is unavailable: {exc}",
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


async def _open_qdrant(cfg: Config, emb: Embeddings) -> QdrantClient | None:
    """Open Qdrant; on failure serve the other sources and say why ebr cannot answer."""
    try:
        return await asyncio.to_thread(vectors.open_client, cfg)
    except (RuntimeError, OSError, ValueError) as exc:
        log.error("Qdrant not opened: %s", exc)
        emb.problem = str(exc)
        return None


class _Servicer(candidates_pb2_grpc.CandidateServiceServicer):
    def __init__(self, service: CandidatesService) -> None:
        self._service = service

    async def Generate(
        self, request: candidates_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> candidates_pb2.GenerateResponse:
        return await answer(context, self._service.generate(request))

    async def GenerateMany(
        self, request: candidates_pb2.GenerateManyRequest, context: grpc.aio.ServicerContext
    ) -> candidates_pb2.GenerateManyResponse:
        return await answer(context, self._service.generate_many(request))


def create(cfg: Config) -> Service:
    return CandidatesService(cfg)
