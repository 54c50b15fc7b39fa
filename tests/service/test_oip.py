"""The scoring service's Open Inference Protocol v2 endpoint over real gRPC: Triton's own
client (tritonclient, in the OIP peers' environment) and the generated stub in process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

from edgeflow import tensor
from edgeflow.config import REPO_ROOT, Config
from edgeflow.scoring.registry import publish_model
from edgeflow.scoring.service import ScoringService
from edgeflow.shell.server import channel, drain, start_server
from edgeflow.v1 import scoring_pb2, scoring_pb2_grpc
from edgeflow.v1.inference import grpc_predict_v2_pb2 as pb
from edgeflow.v1.inference import grpc_predict_v2_pb2_grpc as pb_grpc

PEER_PYTHON = REPO_ROOT / ".cache" / "oip-peers" / "bin" / "python"
TRITON_CALLS = REPO_ROOT / "tests" / "peers" / "tritonclient_calls.py"
FEATURES = ["common_neighbors", "adamic_adar", "jaccard", "cand_degree", "embedding_cosine"]
MODEL = "ranker"


@dataclasses.dataclass
class Scoring:
    address: str
    oip: pb_grpc.GRPCInferenceServiceStub
    score: scoring_pb2_grpc.ScoringServiceStub
    channel: grpc.aio.Channel
    x: np.ndarray


def _model(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, len(FEATURES))).astype(np.float32)
    y = (x[:, 0] - 0.8 * x[:, 2] + rng.normal(0, 0.5, 300) > 0).astype(int)
    onx = to_onnx(LogisticRegression().fit(x, y), x[:1], options={"zipmap": False})
    return onx.SerializeToString()


def _card() -> dict[str, Any]:
    return {"features": FEATURES, "input": "X", "output": "probabilities", "output_index": 1}


@pytest_asyncio.fixture(scope="module")
async def scoring(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Scoring]:
    home = tmp_path_factory.mktemp("oip")
    cfg = dataclasses.replace(Config(), home=home, reload_interval_s=0)
    for seed in (1, 2):  # v1 and v2, which differ
        publish_model(cfg.model_dir, MODEL, _model(seed), _card())
    service = ScoringService(cfg)
    server, port, health_servicer = await start_server(service, "127.0.0.1:0")
    ch = channel(f"127.0.0.1:{port}")
    x = np.random.default_rng(5).normal(size=(64, len(FEATURES))).astype(np.float32)
    yield Scoring(
        f"127.0.0.1:{port}",
        pb_grpc.GRPCInferenceServiceStub(ch),
        scoring_pb2_grpc.ScoringServiceStub(ch),
        ch,
        x,
    )
    await ch.close()
    await drain(service, server, health_servicer)


async def _score(s: Scoring, x: np.ndarray, version: str = "") -> np.ndarray:
    reply = await s.score.Score(
        scoring_pb2.ScoreRequest(model=MODEL, version=version, features=tensor.pack(x, FEATURES))
    )
    return tensor.unpack(reply.scores)[:, 0]


def _infer(
    x: np.ndarray, version: str = "", raw: bool = True, name: str = "X", model: str = MODEL
) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version, id="req-7")
    tensor_in = req.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    if raw:
        req.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        tensor_in.contents.fp32_contents.extend(x.ravel().tolist())
    return req


def _scores(resp: pb.ModelInferResponse) -> np.ndarray:
    (out,) = resp.outputs
    assert (out.name, out.datatype) == ("score", "FP32")
    if resp.raw_output_contents:
        values = np.frombuffer(resp.raw_output_contents[0], dtype="<f4")
    else:
        values = np.asarray(out.contents.fp32_contents, dtype=np.float32)
    assert list(out.shape) == [values.size]
    return values


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def test_tritonclient_reads_metadata_and_infers_like_score(
    scoring: Scoring, tmp_path: Path
) -> None:
    if not PEER_PYTHON.exists():
        pytest.fail(f"no OIP peers at {PEER_PYTHON}: run scripts/setup_oip_peers.sh")
    rows = tmp_path / "rows.npy"
    np.save(rows, scoring.x)
    # A subprocess, so this event loop keeps serving while Triton's client calls it.
    proc = await asyncio.create_subprocess_exec(
        str(PEER_PYTHON), str(TRITON_CALLS), scoring.address, MODEL, "X", str(rows),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    seen = json.loads(stdout)

    assert seen["live"] and seen["ready"] and seen["model_ready"] and seen["model_v1_ready"]
    assert seen["unknown_ready"] is False
    assert seen["server"]["name"] == "edgeflow-scoring"
    meta = seen["metadata"]
    assert meta["name"] == MODEL and meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "X", "datatype": "FP32", "shape": ["-1", "5"]}]
    assert meta["outputs"] == [{"name": "score", "datatype": "FP32", "shape": ["-1"]}]

    latest, v1 = await _score(scoring, scoring.x), await _score(scoring, scoring.x, "v1")
    assert not np.allclose(latest, v1)  # the versions differ, so each check below means something
    np.testing.assert_array_equal(np.float32(seen["scores"]), latest)
    np.testing.assert_array_equal(np.float32(seen["scores_v1"]), v1)

    errors = seen["errors"]
    assert errors["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "no-such-model" in errors["unknown_model"]["message"]
    assert errors["unknown_version"]["status"] == "StatusCode.NOT_FOUND"
    assert "no loaded version 'v99'" in errors["unknown_version"]["message"]
    for case, detail in (
        ("bad_shape", "has shape [2, 6]; the model takes one FP32 input 'X' of shape [-1, 5]"),
        ("bad_datatype", "input 'X' is FP64; it must be FP32"),
        ("bad_input_name", "input 'not-X' is not an input of the model"),
    ):
        assert errors[case]["status"] == "StatusCode.INVALID_ARGUMENT", (case, errors[case])
        assert detail in errors[case]["message"], (case, errors[case])


async def test_raw_and_typed_contents_give_the_same_scores(scoring: Scoring) -> None:
    x = scoring.x
    raw = await scoring.oip.ModelInfer(_infer(x, raw=True))
    typed = await scoring.oip.ModelInfer(_infer(x, raw=False))
    assert raw.raw_output_contents and not typed.raw_output_contents  # answered in kind
    assert (raw.model_name, raw.model_version, raw.id) == (MODEL, "2", "req-7")
    np.testing.assert_array_equal(_scores(raw), await _score(scoring, x))
    np.testing.assert_array_equal(_scores(typed), _scores(raw))
    empty = await scoring.oip.ModelInfer(_infer(x[:0]))
    assert _scores(empty).size == 0


@pytest.mark.parametrize(("version", "served"), [("", "2"), ("1", "1"), ("v1", "1"), ("2", "2")])
async def test_versions_are_numbers_or_v_numbers(
    scoring: Scoring, version: str, served: str
) -> None:
    resp = await scoring.oip.ModelInfer(_infer(scoring.x[:3], version))
    assert resp.model_version == served
    np.testing.assert_array_equal(_scores(resp), await _score(scoring, scoring.x[:3], f"v{served}"))


async def test_bad_requests_name_what_is_wrong(scoring: Scoring) -> None:
    x, oip = scoring.x[:4], scoring.oip
    cases: list[tuple[pb.ModelInferRequest, grpc.StatusCode, str]] = [
        (_infer(x, model=""), grpc.StatusCode.INVALID_ARGUMENT, "model_name is empty"),
        (_infer(x, model="nope"), grpc.StatusCode.NOT_FOUND, "model 'nope' is not loaded"),
        (_infer(x, "3"), grpc.StatusCode.NOT_FOUND, "no loaded version 'v3'"),
        (_infer(x, "x1"), grpc.StatusCode.INVALID_ARGUMENT, "version 'x1' is not N or vN"),
        (_infer(x[:, :4]), grpc.StatusCode.INVALID_ARGUMENT, "has shape [4, 4]"),
    ]
    both = _infer(x)
    both.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    cases.append((both, grpc.StatusCode.INVALID_ARGUMENT, "has both raw contents and typed"))
    short = _infer(x)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    cases.append((short, grpc.StatusCode.INVALID_ARGUMENT, "raw contents are 76 bytes"))
    typed = _infer(x, raw=False)
    del typed.inputs[0].contents.fp32_contents[-1]
    cases.append((typed, grpc.StatusCode.INVALID_ARGUMENT, "fp32_contents holds 19 values"))
    two = _infer(x)
    two.inputs.add(name="Y", datatype="FP32", shape=[4, 5])
    cases.append((two, grpc.StatusCode.INVALID_ARGUMENT, "got 2 inputs ['X', 'Y']"))
    wrong_output = _infer(x)
    wrong_output.outputs.add(name="probabilities")
    cases.append(
        (wrong_output, grpc.StatusCode.INVALID_ARGUMENT, "requested output 'probabilities'")
    )
    for req, code, detail in cases:
        got, message = await _code(oip.ModelInfer(req))
        assert got == code, (detail, message)
        assert detail in message, message


async def test_readiness_metadata_health_and_reflection(scoring: Scoring) -> None:
    oip = scoring.oip
    assert (await oip.ServerLive(pb.ServerLiveRequest())).live
    assert (await oip.ServerReady(pb.ServerReadyRequest())).ready
    assert (await oip.ModelReady(pb.ModelReadyRequest(name=MODEL, version="v2"))).ready
    assert not (await oip.ModelReady(pb.ModelReadyRequest(name=MODEL, version="7"))).ready
    code, _ = await _code(oip.ModelReady(pb.ModelReadyRequest(name=MODEL, version="latest!")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, message = await _code(oip.ModelMetadata(pb.ModelMetadataRequest(name="nope")))
    assert code == grpc.StatusCode.NOT_FOUND and "ranker (v1, v2)" in message

    health = health_pb2_grpc.HealthStub(scoring.channel)
    check = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
    assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(scoring.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    services = [s.name async for r in call for s in r.list_services_response.service]
    assert "inference.GRPCInferenceService" in services
