"""The scoring service: `Score` and `ListModels` over the model registry, with hot reload, and
the same models over the Open Inference Protocol v2 (scoring/oip.py)."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from opentelemetry import trace

from edgeflow import tensor
from edgeflow.config import Config
from edgeflow.scoring import oip
from edgeflow.scoring.registry import ModelNotFoundError, ModelRegistry
from edgeflow.shell import cpu, metrics
from edgeflow.shell.errors import RequestError
from edgeflow.shell.reload import Reloader
from edgeflow.shell.server import Service
from edgeflow.v1 import scoring_pb2, scoring_pb2_grpc

log = logging.getLogger("edgeflow.scoring")

# OIP batches above this run in a worker thread; below, the session call is sub-millisecond
# and a thread hop would cost more than it saves. (Score hands its batches to cpu.run, which
# decides by the matrix's size.)
THREAD_ROWS = 20_000
SCORE_COLUMNS = ("score",)


class _Servicer(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    async def Score(
        self, request: scoring_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.ScoreResponse:
        registry = self._registry
        if not request.model:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"ScoreRequest.model is empty; loaded models: {registry.describe()}",
            )
        try:
            member = request.member if request.HasField("member") else None
            model = registry.get(request.model, request.version, member)
        except ModelNotFoundError as exc:
            raise RequestError(grpc.StatusCode.NOT_FOUND, str(exc)) from exc
        features = request.features
        try:
            if not features.columns:
                raise ValueError(f"it has no column names; the model needs {list(model.features)}")
            matrix = tensor.unpack(features)
            started = time.perf_counter()
            with cpu.deadline_in(context.time_remaining()):
                # A large batch runs on the CPU threads (onnxruntime releases the GIL); a
                # call whose deadline has passed is not scored at all.
                scores = await cpu.run("score", matrix.size, model.score, matrix, features.columns)
            inference_s = time.perf_counter() - started
        except cpu.DeadlineExpired as exc:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"score: {exc}") from exc
        except ValueError as exc:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"ScoreRequest.features for model {model.name} {model.version}: {exc}",
            ) from exc
        except Exception as exc:
            log.exception("scoring with %s %s failed", model.name, model.version)
            raise RequestError(
                grpc.StatusCode.INTERNAL,
                f"model {model.name} {model.version} failed on {features.rows} rows: {exc}",
            ) from exc
        metrics.scoring_inference(model.name, model.version).observe(inference_s)
        trace.get_current_span().set_attributes(
            {"model": model.name, "model.version": model.version, "rows": int(features.rows)}
        )
        return scoring_pb2.ScoreResponse(
            scores=tensor.pack(scores, SCORE_COLUMNS), model=model.name, version=model.version
        )

    async def ListModels(
        self, request: scoring_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.ListModelsResponse:
        registry = self._registry
        infos = []
        for m in registry.models():
            aliases, share = registry.rollout(m)
            infos.append(
                scoring_pb2.ModelInfo(
                    name=m.name,
                    version=m.version,
                    features=list(m.features),
                    training_data_hash=str(m.card.get("training_data_hash", "")),
                    metrics=m.metrics,
                    latest=registry.is_latest(m),
                    aliases=aliases,
                    traffic_share=share,
                )
            )
        return scoring_pb2.ListModelsResponse(models=infos)


class ScoringService(Service):
    """Serves every model version under cfg.model_dir; re-scans every reload_interval_s."""

    name = "scoring"
    service_names = ("edgeflow.v1.ScoringService", oip.SERVICE_NAME)

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.registry = ModelRegistry(cfg.model_dir)
        self._reloader = Reloader(
            f"model registry refresh at {self.registry.root}", cfg.reload_interval_s,
            lambda: asyncio.to_thread(self.registry.refresh), log,
        )  # fmt: skip

    def register(self, server: grpc.aio.Server) -> None:
        scoring_pb2_grpc.add_ScoringServiceServicer_to_server(_Servicer(self.registry), server)
        oip.pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            oip.InferenceServicer(self.registry, THREAD_ROWS), server
        )

    async def start(self) -> None:
        # Session creation and warm-up take milliseconds each: keep them off the event loop.
        await asyncio.to_thread(self.registry.refresh)
        if not self.registry.models():
            log.warning("no models loaded yet from %s", self.registry.root)
        self._reloader.start()

    async def stop(self) -> None:
        await self._reloader.close()


def create(cfg: Config) -> Service:
    return ScoringService(cfg)
