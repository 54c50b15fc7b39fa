"""Remote scoring: `scoring.remote` nodes calling models over the Open Inference Protocol v2.

End to end through the gateway, on real peers on loopback: the scoring service's own OIP
endpoint (the checked-in catch-up workflow) and a real MLServer serving a scikit-learn model
trained on the graph; plus deadlines, retries and fallbacks against real servers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import joblib
import numpy as np
import pytest
import pytest_asyncio
import yaml
from inprocess import start_backends, start_gateway, stop_all
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from world import COMMUNITIES, MEMBERS, SEED, World, clone

from edgeflow import tensor
from edgeflow.build.embeddings import member_embeddings
from edgeflow.build.ranker import build_examples, inner_split
from edgeflow.build.synthetic import social_graph
from edgeflow.config import REPO_ROOT
from edgeflow.features.compute import member_features
from edgeflow.features.schema import EMBEDDING_DIM, MODEL_COLUMNS
from edgeflow.gateway.frame import Frame, SourceInfo
from edgeflow.gateway.remote import RemoteError, RemoteScorer, infer_request, read_scores
from edgeflow.graph import Graph
from edgeflow.local.ports import free_port
from edgeflow.scoring.oip import InferenceServicer
from edgeflow.scoring.service import ScoringService
from edgeflow.shell import tracing
from edgeflow.shell.server import channel
from edgeflow.v1 import (
    features_pb2,
    features_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)
from edgeflow.v1.inference import grpc_predict_v2_pb2 as pb
from edgeflow.v1.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgeflow.workflow import endpoints
from edgeflow.workflow.ops import RemoteParams
from edgeflow.workflow.validate import WorkflowError, check

PEERS = REPO_ROOT / ".cache" / "oip-peers" / "bin"
CATCH_UP = REPO_ROOT / "workflows" / "catch-up.yaml"
SLOW_RUNTIME = '''
import asyncio

from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput


class SlowModel(MLModel):
    """Scores 0.5 for every row, a second late: a model server that misses deadlines."""

    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        await asyncio.sleep(1.0)
        rows = payload.inputs[0].shape[0]
        out = ResponseOutput(name="score", shape=[rows], datatype="FP32", data=[0.5] * rows)
        return InferenceResponse(model_name=self.name, outputs=[out])
'''


# ---- pure logic ----------------------------------------------------------------------------


def test_endpoints_read_the_environment_when_called() -> None:
    env = {"SCORING_ADDR": "10.0.0.7:9000", "BLANK": " "}
    assert endpoints.expand("127.0.0.1:50063", env) == "127.0.0.1:50063"
    assert endpoints.expand("${SCORING_ADDR}", env) == "10.0.0.7:9000"
    assert endpoints.expand("${SCORING_ADDR:-127.0.0.1:1}", env) == "10.0.0.7:9000"
    assert endpoints.expand("${BLANK:-127.0.0.1:1}", env) == "127.0.0.1:1"
    assert endpoints.expand("${HOST:-models.svc}:8081", env) == "models.svc:8081"
    with pytest.raises(ValueError, match="environment variable MISSING is not set"):
        endpoints.expand("${MISSING}", env)
    with pytest.raises(ValueError, match=r"resolved to 'nohost' is not host:port"):
        endpoints.expand("${X}", {"X": "nohost"})
    for bad, why in [
        ("", "an endpoint is required"),
        ("host", "is not host:port"),
        ("host:0", "not in 1..65535"),
        ("$HOST:80", "'$' must start"),
        ("${X:-nope}", "the default of '${X:-nope}' 'nope' is not host:port"),
    ]:
        with pytest.raises(ValueError, match=re.escape(why)):
            endpoints.check(bad)
    assert endpoints.check("[::1]:8081") == "[::1]:8081"


def _spec(**rank: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(CATCH_UP.read_text())["spec"]
    node = next(n for n in doc["nodes"] if n["name"] == "rank")
    for key, value in rank.items():
        if value is None:
            node["params"].pop(key, None)
        else:
            node["params"][key] = value
    return doc


def test_remote_nodes_validate_and_take_the_mode_endpoint() -> None:
    wf = check(_spec())
    params = wf.node("rank").params
    assert isinstance(params, RemoteParams)
    assert params.endpoint == "${SCORING_ADDR:-127.0.0.1:50063}"
    assert (params.model, params.input, params.output, params.retries) == (
        "pymk-ranker", "features", "score", 2,
    )  # fmt: skip
    assert wf.node("rank").fallback == "passthrough"
    own = check(_spec(endpoint="models:9000")).node("rank").params
    assert isinstance(own, RemoteParams) and own.endpoint == "models:9000"

    doc = _spec()
    del doc["modes"]["remote"]
    with pytest.raises(WorkflowError) as err:
        check(doc)
    assert err.value.problems == [
        "node 'rank' field params.endpoint: required: host:port, ${VAR} or ${VAR:-host:port}, "
        "here or in spec.modes.remote.endpoint"
    ]
    with pytest.raises(WorkflowError) as err:
        check(_spec(endpoint="models", retries=9, outputIndex=-1, bogus=1))
    assert sorted(err.value.problems) == [
        "node 'rank' field params.bogus: unknown field",
        "node 'rank' field params.endpoint: endpoint 'models' is not host:port",
        "node 'rank' field params.outputIndex: Input should be greater than or equal to 0",
        "node 'rank' field params.retries: Input should be less than or equal to 5",
    ]
    with pytest.raises(WorkflowError, match=r"field params: unknown feature columns \['nope'\]"):
        check(_spec(columns=["nope"]))
    doc = _spec()
    doc["modes"]["remote"]["endpoint"] = "${X"
    bad = re.escape("spec field modes.remote.endpoint: '${X': '$' must start")
    with pytest.raises(WorkflowError, match=bad):
        check(doc)


def _params(**kw: Any) -> RemoteParams:
    return RemoteParams.model_validate({"endpoint": "h:1", "model": "m", **kw})


def test_request_and_scores_on_the_wire() -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    features = tensor.pack(x, ["a", "b", "c"])
    req = infer_request(_params(), features)
    assert (req.model_name, req.inputs[0].name, list(req.inputs[0].shape)) == (
        "m",
        "features",
        [4, 3],
    )
    assert req.raw_input_contents[0] == features.data and [o.name for o in req.outputs] == ["score"]
    a, b, c = MODEL_COLUMNS[:3]
    wanted = _params(columns=[a, b, c])
    assert infer_request(wanted, tensor.pack(x, [a, b, c])).raw_input_contents[0] == x.tobytes()
    reordered = infer_request(wanted, tensor.pack(x, [c, a, b]))
    assert reordered.raw_input_contents[0] == x[:, [1, 2, 0]].tobytes()
    with pytest.raises(ValueError, match=r"the features have no column\(s\) \['jaccard'\]"):
        infer_request(_params(columns=["jaccard"]), tensor.pack(x, [a, b, c]))

    proba = pb.ModelInferResponse()
    out = proba.outputs.add(name="predict_proba", datatype="FP64", shape=[4, 2])
    out.contents.fp64_contents.extend([0.9, 0.1, 0.2, 0.8, 0.5, 0.5, 0.0, 1.0])
    scores = read_scores(proba, _params(output="predict_proba", outputIndex=1), 4)
    assert scores.dtype == np.float32 and scores.tolist() == pytest.approx([0.1, 0.8, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"shape \[4, 2\], not one score per row: set params"):
        read_scores(proba, _params(output="predict_proba"), 4)
    with pytest.raises(ValueError, match="outputIndex 2 does not pick a column"):
        read_scores(proba, _params(output="predict_proba", outputIndex=2), 4)
    with pytest.raises(ValueError, match=r"no output 'score'; it has \['predict_proba'\]"):
        read_scores(proba, _params(), 4)

    raw = pb.ModelInferResponse()
    raw.outputs.add(name="label", datatype="INT64", shape=[3])
    raw.outputs.add(name="score", datatype="FP32", shape=[3, 1])
    raw.raw_output_contents.extend(
        [np.zeros(3, "<i8").tobytes(), np.float32([0.25, 0.5, 0.75]).tobytes()]
    )
    assert read_scores(raw, _params(), 3).tolist() == [0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="output 'score' has 3 scores for 5 rows"):
        read_scores(raw, _params(), 5)
    del raw.raw_output_contents[1]
    with pytest.raises(ValueError, match="raw_output_contents has 1 entries for 2 output"):
        read_scores(raw, _params(), 3)


async def test_unset_variable_fails_the_node_before_any_call() -> None:
    scorer = RemoteScorer(env={})
    frame = Frame(
        ids=np.array([1, 2], np.int64),
        info={"fof": SourceInfo("online")},
        features=tensor.pack(np.zeros((2, 3), np.float32), ["a", "b", "c"]),
    )
    with pytest.raises(RemoteError, match="environment variable SCORING_ADDR is not set") as err:
        await scorer.score(_params(endpoint="${SCORING_ADDR}"), 50, frame, 0.05)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    await scorer.close()


async def test_an_endpoint_outside_the_allow_list_is_never_called() -> None:
    allow = "scoring.edgeflow.svc:50063,*.models.svc:8001"
    assert endpoints.allow_list({endpoints.ALLOW_ENV: f" {allow}, "}) == (
        "scoring.edgeflow.svc:50063", "*.models.svc:8001")  # fmt: skip
    assert endpoints.allowed("ranker.models.svc:8001", endpoints.allow_list(
        {endpoints.ALLOW_ENV: allow}))  # fmt: skip
    assert endpoints.allowed("anything:1", ())  # no list: any endpoint
    scorer = RemoteScorer(env={endpoints.ALLOW_ENV: allow, "SCORING_ADDR": "10.0.0.9:80"})
    frame = Frame(
        ids=np.array([1, 2], np.int64),
        info={"fof": SourceInfo("online")},
        features=tensor.pack(np.zeros((2, 3), np.float32), ["a", "b", "c"]),
    )
    for endpoint, address in (
        ("${SCORING_ADDR}", "10.0.0.9:80"),
        ("ranker.models.svc:8002", "ranker.models.svc:8002"),
    ):
        with pytest.raises(RemoteError, match=f"{address} is not allowed") as err:
            await scorer.score(_params(endpoint=endpoint), 50, frame, 0.05)
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert scorer._stubs == {}  # no channel was even opened
    await scorer.close()


# ---- real peers ----------------------------------------------------------------------------


class FlakyInference(InferenceServicer):
    """The scoring service's OIP servicer behind injected failures, counting the calls."""

    def __init__(self, registry: Any) -> None:
        super().__init__(registry, thread_rows=20_000)
        self.failures: list[grpc.StatusCode] = []
        self.calls = 0

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        self.calls += 1
        if self.failures:
            await context.abort(self.failures.pop(0), "injected failure")
        return await super().ModelInfer(request, context)


@dataclasses.dataclass
class Remote:
    graph: Graph
    stub: gateway_pb2_grpc.RecommenderStub
    features: features_pb2_grpc.FeatureServiceStub
    scoring: scoring_pb2_grpc.ScoringServiceStub
    sklearn_model: Any
    flaky: FlakyInference

    async def recommend(
        self, surface: str, member: int, k: int = 10
    ) -> gateway_pb2.RecommendResponse:
        req = gateway_pb2.RecommendRequest(surface=surface, member=member, k=k, debug=True)
        return await self.stub.Recommend(req, timeout=10)

    async def features_of(self, member: int, targets: list[int]) -> tuple[np.ndarray, list[str]]:
        resp = await self.features.GetFeatures(
            features_pb2.GetFeaturesRequest(member=member, entities=targets), timeout=10
        )
        return tensor.unpack(resp.features).copy(), list(resp.features.columns)


def _train_sklearn(graph: Graph) -> Any:
    """A logistic-regression ranker on the graph's own candidates and held-out edges."""
    inner, hidden = inner_split(graph, seed=0)
    embeddings = member_embeddings(inner, EMBEDDING_DIM, 0)
    members = np.flatnonzero(hidden.degree > 0)[:120]
    ex = build_examples(inner, hidden, members, member_features(inner), embeddings)
    model = make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(max_iter=1000))
    return model.fit(ex.x, ex.y)


def _model_repository(root: Path, model: Any) -> tuple[Path, int]:
    """MLServer's model repository: the graph's ranker and a slow custom runtime."""
    port = free_port()
    root.mkdir(parents=True)
    (root / "settings.json").write_text(json.dumps({
        "debug": False, "parallel_workers": 0, "host": "127.0.0.1", "grpc_port": port,
        "http_port": free_port(), "metrics_port": free_port(),
    }))  # fmt: skip
    ranker = root / "graph-ranker"
    ranker.mkdir()
    joblib.dump(model, ranker / "model.joblib")
    (ranker / "model-settings.json").write_text(json.dumps({
        "name": "graph-ranker", "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"},
    }))  # fmt: skip
    slow = root / "slow-ranker"
    slow.mkdir()
    (slow / "slow_runtime.py").write_text(SLOW_RUNTIME)
    (slow / "model-settings.json").write_text(
        json.dumps({"name": "slow-ranker", "implementation": "slow_runtime.SlowModel"})
    )
    return root, port


@pytest.fixture(scope="module")
def mlserver_proc(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[bytes], int, Any, Graph, Path]]:
    """MLServer starts on the graph's ranker while the rest of the suite is built."""
    if not (PEERS / "mlserver").exists():
        pytest.fail(f"no MLServer at {PEERS}: run scripts/setup_oip_peers.sh")
    home = tmp_path_factory.mktemp("remote")
    edges = social_graph(members=MEMBERS, communities=COMMUNITIES, seed=SEED)  # the world's
    graph = Graph.from_edges(edges[:, 0], edges[:, 1])
    model = _train_sklearn(graph)
    repo, port = _model_repository(home / "mlserver", model)
    log = (home / "mlserver.log").open("wb")
    proc = subprocess.Popen(
        [str(PEERS / "mlserver"), "start", str(repo)], cwd=home, stdout=log, stderr=log
    )
    yield proc, port, model, graph, home
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


async def _wait_ready(proc: subprocess.Popen[bytes], address: str, log: Path) -> None:
    async with channel(address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"mlserver exited {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                ready = [
                    (await stub.ModelReady(pb.ModelReadyRequest(name=m), timeout=1)).ready
                    for m in ("graph-ranker", "slow-ranker")
                ]
                if all(ready):
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    pytest.fail(f"mlserver not ready at {address}: {log.read_text()[-3000:]}")


def _variant(workflows: Path, surface: str, budget_ms: int = 5000, **rank: Any) -> None:
    """A copy of catch-up whose rank node differs; generous budgets unless a test needs less."""
    doc: dict[str, Any] = yaml.safe_load(CATCH_UP.read_text())
    doc["metadata"]["name"] = doc["spec"]["surface"] = surface
    doc["spec"]["budgetMs"] = budget_ms
    for node in doc["spec"]["nodes"]:
        node["timeoutMs"] = 2000
        if node["name"] == "rank":
            for key in ("timeoutMs", "fallback"):
                if key in rank:
                    node[key] = rank.pop(key)
            node["params"].update(rank)
    (workflows / f"{surface}.yaml").write_text(yaml.safe_dump(doc))


@pytest_asyncio.fixture(scope="module")
async def remote(
    mlserver_proc: tuple[subprocess.Popen[bytes], int, Any, Graph, Path],
    suite_world: World,
) -> AsyncIterator[Remote]:
    """The session's trained world (MLServer's ranker was trained on the same graph)."""
    proc, mls_port, model, graph, home = mlserver_proc
    cfg, redis = clone(suite_world, home / "world")
    workflows = home / "workflows"
    workflows.mkdir()
    _variant(workflows, "catch-up")  # the checked-in graph, with generous deadlines
    cfg = dataclasses.replace(cfg, reload_interval_s=0.3, workflows_dir=workflows)
    cfg, servers = await start_backends(cfg)
    addr = {n: f"127.0.0.1:{p}" for n, (_, _, p) in servers.items()}
    scoring_service = servers["scoring"][0]
    assert isinstance(scoring_service, ScoringService)
    flaky = FlakyInference(scoring_service.registry)
    # The server shell's handler wrapper: it turns a RequestError into the call's status.
    flaky_server = grpc.aio.server(interceptors=[tracing.ServerTracing("flaky")])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(flaky, flaky_server)
    flaky_port = flaky_server.add_insecure_port("127.0.0.1:0")
    await flaky_server.start()

    mlserver = f"127.0.0.1:{mls_port}"
    unreachable = f"127.0.0.1:{free_port()}"
    columns = list(MODEL_COLUMNS)
    _variant(
        workflows,
        "catch-up-mlserver",
        endpoint=mlserver,
        model="graph-ranker",
        version="v1",
        output="predict_proba",
        outputIndex=1,
        columns=columns,
    )
    _variant(workflows, "catch-up-slow", endpoint=mlserver, model="slow-ranker", timeoutMs=80)
    _variant(workflows, "catch-up-down", endpoint=unreachable, retries=2, backoffMs=5)
    _variant(workflows, "catch-up-strict", endpoint=unreachable, retries=0, fallback="fail")
    _variant(workflows, "catch-up-flaky", endpoint=f"127.0.0.1:{flaky_port}", backoffMs=5)
    _variant(workflows, "catch-up-bad-input", endpoint=f"127.0.0.1:{flaky_port}",
             input="not-features")  # fmt: skip

    # The checked-in catch-up reads SCORING_ADDR from the gateway's environment.
    env = pytest.MonkeyPatch()
    env.setenv("SCORING_ADDR", addr["scoring"])
    port = await start_gateway(cfg, servers)
    await _wait_ready(proc, mlserver, home / "mlserver.log")
    chans = [channel(f"127.0.0.1:{port}"), channel(addr["features"]), channel(addr["scoring"])]
    yield Remote(
        graph,
        gateway_pb2_grpc.RecommenderStub(chans[0]),
        features_pb2_grpc.FeatureServiceStub(chans[1]),
        scoring_pb2_grpc.ScoringServiceStub(chans[2]),
        model,
        flaky,
    )
    env.undo()
    await asyncio.wait_for(asyncio.gather(*(ch.close() for ch in chans)), 20)
    await asyncio.wait_for(flaky_server.stop(None), 20)
    await stop_all(servers)
    redis.stop()


def _member(graph: Graph, nth: int) -> int:
    return int(graph.ids[np.flatnonzero(graph.degree >= 8)[nth]])


def _assert_remote_provenance(resp: gateway_pb2.RecommendResponse) -> None:
    for edge in resp.edges:
        assert edge.provenance and {p.mode for p in edge.provenance} == {"remote"}, edge


async def test_catch_up_scores_over_the_scoring_services_oip(remote: Remote) -> None:
    member = _member(remote.graph, 0)
    await remote.recommend("catch-up", member)  # connects the gateway to scoring's OIP
    resp = await remote.recommend("catch-up", member, k=20)
    assert not resp.partial, resp.degraded
    assert len(resp.edges) == 20
    nodes = {n.node: n for n in resp.funnel.nodes}
    assert nodes["rank"].status == "ok" and nodes["rank"].op == "scoring.remote"
    _assert_remote_provenance(resp)
    targets = [e.target for e in resp.edges]
    x, columns = await remote.features_of(member, targets)
    score = await remote.scoring.Score(
        scoring_pb2.ScoreRequest(model="pymk-ranker", features=tensor.pack(x, columns))
    )
    expected = tensor.unpack(score.scores)[:, 0]
    np.testing.assert_allclose([e.model_score for e in resp.edges], expected, rtol=1e-6)


async def test_remote_node_scores_with_mlserver(remote: Remote) -> None:
    member = _member(remote.graph, 1)
    resp = await remote.recommend("catch-up-mlserver", member, k=25)
    assert not resp.partial, resp.degraded
    assert len(resp.edges) == 25
    _assert_remote_provenance(resp)
    targets = [e.target for e in resp.edges]
    x, columns = await remote.features_of(member, targets)
    x = x[:, [columns.index(c) for c in MODEL_COLUMNS]]
    expected = remote.sklearn_model.predict_proba(x)[:, 1]
    np.testing.assert_allclose([e.model_score for e in resp.edges], expected, rtol=1e-4, atol=1e-6)
    scores = [e.model_score for e in resp.edges]
    assert len(set(scores)) > 1 and all(0.0 <= s <= 1.0 for s in scores)


async def test_remote_timeout_falls_back_to_source_order(remote: Remote) -> None:
    member = _member(remote.graph, 2)
    resp = await remote.recommend("catch-up-slow", member)
    assert resp.partial and len(resp.edges) == 10
    [line] = resp.degraded
    assert line.startswith("rank: 127.0.0.1:") and "model 'slow-ranker': timed out after" in line
    assert "(node timeout 80 ms, attempt 1 of 3)" in line and line.endswith(
        "(fallback: passthrough)"
    )
    nodes = {n.node: n for n in resp.funnel.nodes}
    assert nodes["rank"].status == "fallback" and nodes["blend"].status == "ok"
    assert all(e.model_score == 0.0 for e in resp.edges)  # ranked by the sources' own scores


async def test_unreachable_endpoint_is_retried_then_falls_back(remote: Remote) -> None:
    member = _member(remote.graph, 3)
    resp = await remote.recommend("catch-up-down", member)
    assert resp.partial and len(resp.edges) == 10
    [line] = resp.degraded
    assert line.startswith("rank: 127.0.0.1:") and ": UNAVAILABLE: " in line
    assert "(attempt 3 of 3)" in line and line.endswith("(fallback: passthrough)")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await remote.recommend("catch-up-strict", member)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "node 'rank'" in (err.value.details() or "")


@pytest.mark.parametrize(
    "failures",
    [[grpc.StatusCode.UNAVAILABLE], [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2],
)
async def test_retries_recover_from_transient_failures(
    remote: Remote, failures: list[grpc.StatusCode]
) -> None:
    member = _member(remote.graph, 4)
    await remote.recommend("catch-up-flaky", member)  # connect first
    remote.flaky.calls, remote.flaky.failures = 0, list(failures)
    resp = await remote.recommend("catch-up-flaky", member)
    assert not resp.partial, resp.degraded
    assert remote.flaky.calls == len(failures) + 1
    assert len({e.model_score for e in resp.edges}) > 1


async def test_errors_that_would_repeat_are_not_retried(remote: Remote) -> None:
    member = _member(remote.graph, 5)
    remote.flaky.calls, remote.flaky.failures = 0, []
    resp = await remote.recommend("catch-up-bad-input", member)
    assert remote.flaky.calls == 1
    [line] = resp.degraded
    assert ": INVALID_ARGUMENT: model pymk-ranker v1: input 'not-features' is not an input" in line
    assert "(attempt 1 of 3)" in line
