"""The `scoring.remote` op: score a frame's features with a model on another server over the
Open Inference Protocol v2 (gRPC `ModelInfer`), with retries inside the node's deadline.

One channel per endpoint, reused by every request and every workflow that names it.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np
from opentelemetry import trace

from edgeflow import oip_tensor, tensor
from edgeflow.gateway.frame import Frame, SourceInfo
from edgeflow.shell import tls, tracing
from edgeflow.shell.server import channel
from edgeflow.v1 import tensor_pb2
from edgeflow.v1.inference import grpc_predict_v2_pb2 as pb
from edgeflow.v1.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgeflow.workflow import endpoints
from edgeflow.workflow.ops import RemoteParams

# Worth another attempt: the server was not reached or shed load. Anything else (a bad
# request, an unknown model, a deadline) fails the same way again.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class RemoteError(Exception):
    """The remote node could not score; the message names the endpoint, model and cause."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        super().__init__(message)
        self.code = code


class RemoteScorer:
    """Calls model servers for `scoring.remote` nodes; endpoints resolve against `env`."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = os.environ if env is None else env
        self._allow = endpoints.allow_list(self._env)
        # With TLS between the processes, model servers are called over it too (the
        # release's own scoring service requires this process's certificate).
        tls_dir = self._env.get("EDGEFLOW_TLS_DIR")
        self._tls = tls.load(Path(tls_dir)) if tls_dir else None
        self._retired: list[grpc.aio.Channel] = []
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.GRPCInferenceServiceStub]] = {}

    def stub(self, address: str) -> pb_grpc.GRPCInferenceServiceStub:
        entry = self._stubs.get(address)
        if entry is None:
            ch = channel(address, tls_files=self._tls)
            entry = self._stubs[address] = (ch, pb_grpc.GRPCInferenceServiceStub(ch))
        return entry[1]

    def use(self, tls_files: tls.TlsFiles) -> None:
        """Call model servers with a renewed certificate: new channels from the next call on;
        the old ones are closed with the scorer."""
        self._tls = tls_files
        self._retired.extend(ch for ch, _ in self._stubs.values())
        self._stubs = {}

    async def close(self) -> None:
        for ch in self._retired:
            await ch.close()
        self._retired = []
        stubs, self._stubs = self._stubs, {}
        for ch, _ in stubs.values():
            await ch.close()

    async def score(
        self, params: RemoteParams, timeout_ms: int, frame: Frame, timeout: float
    ) -> Frame:
        """The frame with a model score per row; its online sources become remote ones."""
        if not frame.ids.size:
            return frame
        if frame.features is None:
            raise RemoteError("no features to score (the features node fell back)")
        try:
            address = endpoints.expand(params.endpoint, self._env)
        except ValueError as exc:
            raise RemoteError(
                f"params.endpoint: {exc}", grpc.StatusCode.FAILED_PRECONDITION
            ) from None
        if not endpoints.allowed(address, self._allow):
            raise RemoteError(
                f"params.endpoint: {address} is not allowed ({endpoints.ALLOW_ENV}: "
                f"{', '.join(self._allow)})",
                grpc.StatusCode.PERMISSION_DENIED,
            )
        where = f"{address} model {params.model!r}"
        try:
            request = infer_request(params, frame.features)
        except ValueError as exc:
            raise RemoteError(str(exc), grpc.StatusCode.FAILED_PRECONDITION) from None
        span = trace.get_current_span()
        span.set_attributes({"edgeflow.remote.endpoint": address, "model": params.model})
        resp = await self._infer(self.stub(address), request, params, timeout_ms, timeout, where)
        try:
            scores = read_scores(resp, params, frame.ids.size)
        except ValueError as exc:
            raise RemoteError(f"{where}: {exc}") from None
        info = {
            s: SourceInfo("remote", i.age_seconds) if i.mode == "online" else i
            for s, i in frame.info.items()
        }
        return Frame(ids=frame.ids, sources=frame.sources, info=info, score=scores)

    async def _infer(
        self,
        stub: pb_grpc.GRPCInferenceServiceStub,
        request: pb.ModelInferRequest,
        params: RemoteParams,
        timeout_ms: int,
        timeout: float,
        where: str,
    ) -> pb.ModelInferResponse:
        deadline = time.monotonic() + timeout
        attempts = 1 + params.retries
        for attempt in range(1, attempts + 1):
            left = deadline - time.monotonic()
            try:
                resp: pb.ModelInferResponse = await stub.ModelInfer(
                    request, timeout=left, metadata=tracing.outgoing_metadata()
                )
                trace.get_current_span().set_attribute("edgeflow.remote.attempts", attempt)
                return resp
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise RemoteError(
                        f"{where}: timed out after {int(timeout * 1000)} ms "
                        f"(node timeout {timeout_ms} ms, attempt {attempt} of {attempts})",
                        code,
                    ) from None
                failure = f"{where}: {code.name}: {exc.details()}"
                if code not in RETRYABLE or attempt == attempts:
                    raise RemoteError(
                        f"{failure} (attempt {attempt} of {attempts})", code
                    ) from None
            # Exponential backoff with jitter, so callers that failed together spread out.
            wait = params.backoff_ms / 1000 * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
            if time.monotonic() + wait >= deadline:
                raise RemoteError(
                    f"{failure} (attempt {attempt} of {attempts}; no time left in the node "
                    f"timeout of {timeout_ms} ms for another)",
                    code,
                )
            await asyncio.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")


def infer_request(params: RemoteParams, features: tensor_pb2.Tensor) -> pb.ModelInferRequest:
    """One FP32 [rows, columns] input in raw form, asking for the scores' output only."""
    matrix = tensor.unpack(features)
    # The feature tensor already holds row-major little-endian float32: send it as is
    # unless the model takes other columns or another order.
    raw = features.data
    if params.columns and tuple(params.columns) != tuple(features.columns):
        have = {c: i for i, c in enumerate(features.columns)}
        missing = [c for c in params.columns if c not in have]
        if missing:
            raise ValueError(
                f"params.columns: the features have no column(s) {missing} "
                f"(they have {list(features.columns)})"
            )
        matrix = matrix[:, [have[c] for c in params.columns]]
        raw = oip_tensor.to_raw(matrix)
    req = pb.ModelInferRequest(model_name=params.model, model_version=params.version)
    req.inputs.add(name=params.input, datatype="FP32", shape=list(matrix.shape))
    req.outputs.add(name=params.output)
    req.raw_input_contents.append(raw)
    return req


def read_scores(resp: pb.ModelInferResponse, params: RemoteParams, rows: int) -> np.ndarray:
    """One float32 score per row from the requested output; ValueError says what is wrong."""
    names = [o.name for o in resp.outputs]
    if params.output not in names:
        raise ValueError(f"the response has no output {params.output!r}; it has {names}")
    index = names.index(params.output)
    raws = oip_tensor.raw_entries(resp.raw_output_contents, len(resp.outputs), "output")
    values = oip_tensor.decode(resp.outputs[index], raws[index], "output")
    shape, column = list(values.shape), params.output_index
    if values.dtype.kind not in "fiu":
        raise ValueError(f"output {params.output!r} is {resp.outputs[index].datatype}, not numbers")
    if column is None:
        if not (values.ndim == 1 or (values.ndim == 2 and values.shape[1] == 1)):
            raise ValueError(
                f"output {params.output!r} has shape {shape}, not one score per row: set "
                "params.outputIndex to the column that holds the score"
            )
        scores = values.reshape(-1)
    else:
        if values.ndim != 2 or column >= values.shape[1]:
            raise ValueError(
                f"params.outputIndex {column} does not pick a column of output "
                f"{params.output!r} with shape {shape}"
            )
        scores = values[:, column]
    if scores.shape[0] != rows:
        raise ValueError(f"output {params.output!r} has {scores.shape[0]} scores for {rows} rows")
    return np.ascontiguousarray(scores, dtype=np.float32)
