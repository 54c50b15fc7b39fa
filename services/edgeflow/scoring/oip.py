"""The scoring service's Open Inference Protocol v2 endpoint (`inference.GRPCInferenceService`).

Triton and KServe clients call the registry's models here. A model is named as in the
registry; its version is "N", "vN" or empty (the newest). It takes one FP32 input
[-1, F], the card's features in the card's order, under the card's input name, and returns
one FP32 output `score` [-1]: the same scores as `Score`.
"""

from __future__ import annotations

import asyncio
import logging
import re

import grpc
import numpy as np
from opentelemetry import trace

from edgeflow import __version__, oip_tensor
from edgeflow.scoring.registry import LoadedModel, ModelNotFoundError, ModelRegistry
from edgeflow.shell.errors import RequestError
from edgeflow.v1.inference import grpc_predict_v2_pb2 as pb
from edgeflow.v1.inference import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger("edgeflow.scoring")

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "edgeflow-scoring"
PLATFORM = "onnxruntime_onnx"
OUTPUT = "score"

_VERSION_RE = re.compile(r"^v?([1-9][0-9]*)$")


def registry_version(version: str) -> str:
    """The registry's "vN" for an OIP version "N" or "vN"; "" stays "" (the newest)."""
    if not version:
        return ""
    match = _VERSION_RE.match(version)
    if match is None:
        raise ValueError(f"version {version!r} is not N or vN (e.g. 3 or v3), or empty")
    return f"v{match.group(1)}"


def oip_version(model: LoadedModel) -> str:
    """OIP versions are plain numbers, as in Triton and KServe model repositories."""
    return str(model.number)


def input_name(model: LoadedModel) -> str:
    return str(model.card["input"])


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, registry: ModelRegistry, thread_rows: int) -> None:
        self._registry = registry
        self._thread_rows = thread_rows  # batches above this run in a worker thread

    def _model(self, name: str, version: str, field: str) -> LoadedModel:
        if not name:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{field} is empty; loaded models: {self._registry.describe()}",
            )
        try:
            return self._registry.get(name, registry_version(version))
        except ValueError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"model {name!r}: {exc}") from exc
        except ModelNotFoundError as exc:
            raise RequestError(grpc.StatusCode.NOT_FOUND, str(exc)) from exc

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self._registry.models()))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._registry.get(request.name, registry_version(request.version))
        except ValueError as exc:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"model {request.name!r}: {exc}"
            ) from exc
        except ModelNotFoundError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self._model(request.name, request.version, "name")
        versions = [oip_version(m) for m in self._registry.models() if m.name == model.name]
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=versions,
            platform=PLATFORM,
            inputs=[meta(name=input_name(model), datatype="FP32", shape=[-1, len(model.features)])],
            outputs=[meta(name=OUTPUT, datatype="FP32", shape=[-1])],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        model = self._model(request.model_name, request.model_version, "model_name")
        try:
            matrix = _input_matrix(request, model)
        except ValueError as exc:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"model {model.name} v{model.number}: {exc}",
            ) from exc
        try:
            if matrix.shape[0] > self._thread_rows:
                scores = await asyncio.to_thread(model.score, matrix, model.features)
            else:
                scores = model.score(matrix, model.features)
        except Exception as exc:
            log.exception("OIP inference with %s %s failed", model.name, model.version)
            raise RequestError(
                grpc.StatusCode.INTERNAL,
                f"model {model.name} v{model.number} failed on {matrix.shape[0]} rows: {exc}",
            ) from exc
        trace.get_current_span().set_attributes(
            {"model": model.name, "model.version": model.version, "rows": int(matrix.shape[0])}
        )
        resp = pb.ModelInferResponse(
            model_name=model.name, model_version=oip_version(model), id=request.id
        )
        out = resp.outputs.add(name=OUTPUT, datatype="FP32", shape=[int(scores.shape[0])])
        # Answer in the form the caller used: raw bytes for raw inputs (what Triton's clients
        # send), typed contents otherwise.
        if request.raw_input_contents:
            resp.raw_output_contents.append(oip_tensor.to_raw(scores))
        else:
            oip_tensor.fill_contents(out.contents, scores)
        return resp


def _input_matrix(request: pb.ModelInferRequest, model: LoadedModel) -> np.ndarray:
    """The request's one FP32 [rows, F] input; ValueError names what is wrong."""
    width, name = len(model.features), input_name(model)
    wanted = f"one FP32 input {name!r} of shape [-1, {width}] (features {list(model.features)})"
    if len(request.inputs) != 1:
        names = [t.name for t in request.inputs]
        raise ValueError(f"got {len(request.inputs)} inputs {names}; the model takes {wanted}")
    tensor = request.inputs[0]
    if tensor.name != name:
        raise ValueError(f"input {tensor.name!r} is not an input of the model; it takes {wanted}")
    for out in request.outputs:
        if out.name != OUTPUT:
            raise ValueError(
                f"requested output {out.name!r} does not exist; the model has {OUTPUT!r}"
            )
    if tensor.datatype != "FP32":
        raise ValueError(
            f"input {tensor.name!r} is {tensor.datatype or 'untyped'}; it must be FP32"
        )
    shape = list(tensor.shape)
    if len(shape) != 2 or shape[1] != width:
        raise ValueError(f"input {tensor.name!r} has shape {shape}; the model takes {wanted}")
    raw = oip_tensor.raw_entries(request.raw_input_contents, 1, "input")[0]
    return oip_tensor.decode(tensor, raw, "input")
