"""The features service: entity features from Feast's online store plus pair features.

`GetFeatures` reads the member and every entity from Feast's Redis layout in one round trip
(stores/feast_online.py) and joins them with request-time pair measures from the in-memory
graph. `Push` writes rows through Feast's push source from a child process
(features/feast_writer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

import grpc
import numpy as np
import redis

from edgeflow import tensor
from edgeflow.config import Config
from edgeflow.features.compute import model_matrix
from edgeflow.features.feast_writer import FeastWriter
from edgeflow.features.schema import (
    EMBEDDING_DIM,
    EMBEDDING_FEATURE,
    ENTITY_COLUMNS,
    MODEL_COLUMNS,
    SCALAR_FEATURES,
)
from edgeflow.graph import pair_measures, pair_measures_work
from edgeflow.shell import cpu, metrics
from edgeflow.shell.errors import RequestError
from edgeflow.shell.server import Service
from edgeflow.stores.feast_online import OnlineReader, OnlineRows, OnlineValueError
from edgeflow.stores.graph_store import GraphNotLoaded, GraphStore, warm_sample
from edgeflow.stores.redis_client import AsyncClient, connect_async
from edgeflow.stores.resp import RespError, RespReplyError
from edgeflow.stores.resp_cluster import open_pipeline
from edgeflow.v1 import features_pb2, features_pb2_grpc

log = logging.getLogger("edgeflow.features")

MAX_ENTITIES = 5000
_EMBEDDING_COLUMNS = ENTITY_COLUMNS[len(SCALAR_FEATURES) :]
_MODEL_INDEX = {name: i for i, name in enumerate(MODEL_COLUMNS)}
_ENTITY_INDEX = {name: i for i, name in enumerate(ENTITY_COLUMNS)}


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def select_columns(
    requested: list[str], with_member: bool
) -> tuple[tuple[str, ...], np.ndarray | None]:
    """The response's column names and their indices (None: every column, in order)."""
    names, index = (MODEL_COLUMNS, _MODEL_INDEX) if with_member else (ENTITY_COLUMNS, _ENTITY_INDEX)
    if not requested:
        return names, None
    for name in requested:
        if name not in index:
            kind = "with member set" if with_member else "without member"
            other = _ENTITY_INDEX if with_member else _MODEL_INDEX
            hint = (
                f" ({name!r} is only available {'without' if with_member else 'with'} member)"
                if name in other
                else ""
            )
            raise _invalid(
                f"columns: unknown column {name!r} for a request {kind}{hint}; "
                f"expected some of {', '.join(names)}"
            )
    return tuple(requested), np.fromiter((index[c] for c in requested), np.int64, len(requested))


class FeaturesService(Service):
    name = "features"
    service_names = ("edgeflow.v1.FeatureService",)

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.reader = OnlineReader()
        self._rds: AsyncClient | None = None
        self._pipe = open_pipeline(cfg.redis_url)
        self._store: GraphStore | None = None
        self._writer = FeastWriter(cfg.feature_repo, cfg.redis_url)

    def register(self, server: grpc.aio.Server) -> None:
        features_pb2_grpc.add_FeatureServiceServicer_to_server(_Servicer(self), server)

    async def start(self) -> None:
        self._rds = connect_async(self.cfg.redis_url)
        self._store = GraphStore(self._rds, self.cfg.reload_interval_s, self.cfg.graph_dir)
        try:
            if not await self._store.load():
                log.warning("no member graph yet: run `edgeflow ingest --edges FILE`")
        except (redis.RedisError, OSError) as exc:
            log.warning("not loaded yet, Redis at %s: %s", self.cfg.redis_url, exc)
        self._store.start_watching()

    async def warm(self) -> None:
        member, ids = warm_sample(self._store)
        request = features_pb2.GetFeaturesRequest(member=member, entities=ids.tolist())
        with contextlib.suppress(RequestError):  # e.g. nothing materialised yet
            await self.get_features(request)

    async def stop(self) -> None:
        self._writer.close()
        if self._store is not None:
            await self._store.close()
        if self._rds is not None:
            await self._rds.aclose()
        await self._pipe.close()

    # ---- GetFeatures ---------------------------------------------------------------------
    async def get_features(
        self, request: features_pb2.GetFeaturesRequest
    ) -> features_pb2.GetFeaturesResponse:
        n = len(request.entities)
        if n > MAX_ENTITIES:
            raise _invalid(f"entities: {n} requested, at most {MAX_ENTITIES} per request")
        cpu.check("features")  # a request already late reads nothing
        metrics.FEATURES_ENTITIES.observe(n)
        with_member = request.HasField("member")
        names, select = select_columns(list(request.columns), with_member)
        entities = np.asarray(request.entities, dtype=np.int64)
        if with_member:
            matrix, missing = await self._model_rows(request.member, entities)
        else:
            rows = await self._read(entities)
            matrix = np.hstack([rows.scalars, rows.embeddings])
            missing = rows.missing
        if select is not None:
            matrix = matrix[:, select]
        return features_pb2.GetFeaturesResponse(
            features=tensor.pack(matrix, names), missing=entities[missing].tolist()
        )

    async def _model_rows(self, member: int, entities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        store = self._graph_store()
        try:
            graph, inv_log_degree = store.graph, store.inv_log_degree
        except GraphNotLoaded as exc:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"features: {exc} (pair features need the member graph)",
            ) from exc
        read = asyncio.ensure_future(self._read(np.concatenate(([member], entities))))
        try:
            # The read sends its commands at once; the pair features are computed while
            # Redis answers (on the CPU threads when they are many: a hub's candidates).
            await asyncio.sleep(0)
            member_index = graph.index_of(member)
            cand_indices = graph.indices_of(entities)
            pairs = await cpu.run(
                "pair_features",
                pair_measures_work(graph, member_index, cand_indices),
                pair_measures, graph, member_index, cand_indices, inv_log_degree,
            )  # fmt: skip
            rows = await read
        finally:
            read.cancel()  # a no-op once done; a cancelled request leaves no read behind
        if member_index < 0 and rows.missing[0]:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"member {member} is not in the member graph ({graph.n} members, version "
                f"{graph.version}) and has no row in the online feature store",
            )
        matrix = await cpu.run(
            "model_matrix",
            entities.size * len(MODEL_COLUMNS),
            model_matrix,
            graph,
            inv_log_degree,
            member_index,
            cand_indices,
            rows.scalars[0],
            rows.scalars[1:],
            rows.embeddings[0],
            rows.embeddings[1:],
            pairs,
        )
        return matrix, rows.missing[1:]

    def _graph_store(self) -> GraphStore:
        if self._store is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "features: the service has not started")
        return self._store

    def _client(self) -> AsyncClient:
        if self._rds is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "features: the service has not started")
        return self._rds

    async def _read(self, members: np.ndarray) -> OnlineRows:
        self._client()  # raises until the service has started
        try:
            return await self.reader.read_pipelined(self._pipe, members)
        except RespReplyError as exc:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"features: Redis at {self.cfg.redis_url} rejected the online read: {exc}",
            ) from exc
        except RespError as exc:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"features: Redis at {self.cfg.redis_url} is unavailable while reading "
                f"online features: {exc}",
            ) from exc
        except OnlineValueError as exc:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"features: online store row is invalid: {exc} (republish with `edgeflow train`)",
            ) from exc

    # ---- Push ----------------------------------------------------------------------------
    async def push(self, request: features_pb2.PushRequest) -> features_pb2.PushResponse:
        entities = np.asarray(request.entities, dtype=np.int64)
        if entities.size == 0:
            return features_pb2.PushResponse(pushed=0)
        if entities.size > MAX_ENTITIES:
            raise _invalid(f"entities: {entities.size} pushed, at most {MAX_ENTITIES} per request")
        scalars, embeddings, given = _push_values(request, entities)
        if not given.all() or embeddings is None:
            scalars, embeddings = await self._complete(entities, scalars, embeddings, given)
        await self._writer.push(entities, scalars, embeddings, datetime.now(UTC))
        return features_pb2.PushResponse(pushed=int(entities.size))

    async def _complete(
        self,
        entities: np.ndarray,
        scalars: np.ndarray,
        embeddings: np.ndarray | None,
        given: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fill features a push leaves out from the current online rows (Feast writes whole
        rows); a member without a row must get every feature."""
        current = await self._read(entities)
        absent = [f for f, g in zip(SCALAR_FEATURES, given, strict=True) if not g]
        if embeddings is None:
            absent.append(EMBEDDING_FEATURE)
        if current.missing.any():
            first = int(entities[np.flatnonzero(current.missing)[0]])
            raise _invalid(
                f"values: member {first} has no online row yet, so a push must carry every "
                f"feature; missing {', '.join(absent)}"
            )
        scalars = np.where(given, scalars, current.scalars)
        return scalars, current.embeddings if embeddings is None else embeddings


def _push_values(
    request: features_pb2.PushRequest, entities: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Validate a push: (scalars with zeros where not given, embeddings or None, given mask)."""
    try:
        values = tensor.unpack(request.values)
    except ValueError as exc:
        raise _invalid(f"values: {exc}") from exc
    columns = list(request.values.columns)
    if values.shape[0] != entities.size:
        raise _invalid(f"values: {values.shape[0]} rows for {entities.size} entities")
    if not columns:
        raise _invalid(f"values.columns: name every column (some of {', '.join(ENTITY_COLUMNS)})")
    seen: set[str] = set()
    for name in columns:
        if name not in _ENTITY_INDEX:
            raise _invalid(
                f"values.columns: unknown feature {name!r}; expected some of "
                f"{', '.join(SCALAR_FEATURES)} and all of "
                f"embedding_0..embedding_{EMBEDDING_DIM - 1}"
            )
        if name in seen:
            raise _invalid(f"values.columns: {name!r} appears twice")
        seen.add(name)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(x) for x in np.argwhere(bad)[0])
        raise _invalid(
            f"values: member {int(entities[row])}, column {columns[col]!r} is "
            f"{values[row, col]} (values must be finite)"
        )
    emb_given = [c for c in columns if c in _EMBEDDING_COLUMNS]
    if emb_given and len(emb_given) != EMBEDDING_DIM:
        raise _invalid(
            f"values.columns: the embedding is pushed whole: {len(emb_given)} of "
            f"{EMBEDDING_DIM} embedding_* columns given"
        )
    position = {name: j for j, name in enumerate(columns)}
    scalars = np.zeros((entities.size, len(SCALAR_FEATURES)), dtype=np.float32)
    given = np.array([f in position for f in SCALAR_FEATURES])
    for j, name in enumerate(SCALAR_FEATURES):
        if name in position:
            scalars[:, j] = values[:, position[name]]
    embeddings = None
    if emb_given:
        embeddings = np.ascontiguousarray(values[:, [position[c] for c in _EMBEDDING_COLUMNS]])
    return scalars, embeddings, given


class _Servicer(features_pb2_grpc.FeatureServiceServicer):
    def __init__(self, service: FeaturesService) -> None:
        self._service = service

    async def GetFeatures(
        self, request: features_pb2.GetFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.GetFeaturesResponse:
        with cpu.deadline_in(context.time_remaining()):
            return await self._service.get_features(request)

    async def Push(
        self, request: features_pb2.PushRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.PushResponse:
        return await self._service.push(request)


def create(cfg: Config) -> Service:
    return FeaturesService(cfg)
