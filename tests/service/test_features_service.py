"""The features service over a real grpc.aio server, real Redis and a real Feast repo.

One module-scoped publish (Feast's apply + materialize) and one running service back the
tests; the Redis-down tests run their own Redis server and stop it mid-test.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeflow import tensor
from edgeflow.build.feast_features import feature_store, publish_member_features
from edgeflow.config import Config
from edgeflow.features.compute import member_features, model_matrix
from edgeflow.features.schema import (
    EMBEDDING_DIM,
    EMBEDDING_FEATURE,
    ENTITY_COLUMNS,
    FEATURE_SERVICE,
    JOIN_KEY,
    MODEL_COLUMNS,
    SCALAR_FEATURES,
)
from edgeflow.features.service import MAX_ENTITIES, FeaturesService, create
from edgeflow.graph import Graph, inverse_log_degree
from edgeflow.local.ports import free_port
from edgeflow.local.redis_server import RedisProcess, start_redis
from edgeflow.shell.server import channel, start_server
from edgeflow.stores.graph_store import save_graph
from edgeflow.v1 import features_pb2, features_pb2_grpc

ABSENT = 10**9 + 7  # a member with no graph node and no online row
TIMEOUT = 10.0  # a hang fails the call with DEADLINE_EXCEEDED instead of the test run


def random_graph(seed: int = 5, n: int = 50, edges: int = 160) -> Graph:
    rng = np.random.default_rng(seed)
    src, dst = rng.integers(0, n, edges), rng.integers(0, n, edges)
    return Graph.from_edges(src * 3 + 1, dst * 3 + 1, members=np.array([n * 3 + 1]))


class FeaturesUnderTest:
    def __init__(self, cfg: Config, graph: Graph, scalars: np.ndarray, emb: np.ndarray) -> None:
        self.cfg, self.graph, self.scalars, self.embeddings = cfg, graph, scalars, emb
        self.stub: features_pb2_grpc.FeatureServiceStub
        self.port = 0


@pytest.fixture(scope="module")
async def features_suite(
    redis_proc: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[FeaturesUnderTest]:
    client = redis.Redis.from_url(redis_proc.url)
    client.flushall()
    graph = random_graph()
    save_graph(client, graph)
    client.close()
    scalars = member_features(graph)
    emb = np.random.default_rng(6).normal(size=(graph.n, EMBEDDING_DIM)).astype(np.float32)
    cfg = Config(home=tmp_path_factory.mktemp("features"), redis_url=redis_proc.url)
    await asyncio.to_thread(publish_member_features, cfg, graph, scalars, emb)
    s = FeaturesUnderTest(cfg, graph, scalars, emb)
    service = create(cfg)
    server, s.port, _ = await start_server(service, "127.0.0.1:0")
    chan = channel(f"127.0.0.1:{s.port}")
    s.stub = features_pb2_grpc.FeatureServiceStub(chan)
    yield s
    await chan.close()
    await server.stop(0)
    await service.stop()


async def get(stub: features_pb2_grpc.FeatureServiceStub, **kw: Any) -> tuple[np.ndarray, Any]:
    response = await stub.GetFeatures(features_pb2.GetFeaturesRequest(**kw), timeout=TIMEOUT)
    return tensor.unpack(response.features), response


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def expected_model_rows(s: FeaturesUnderTest, member: int, entities: np.ndarray) -> np.ndarray:
    g = s.graph
    mi, pos = g.index_of(member), g.indices_of(entities)
    cand_scalars = np.full((entities.size, len(SCALAR_FEATURES)), np.nan, np.float32)
    cand_emb = np.full((entities.size, EMBEDDING_DIM), np.nan, np.float32)
    cand_scalars[pos >= 0] = s.scalars[pos[pos >= 0]]
    cand_emb[pos >= 0] = s.embeddings[pos[pos >= 0]]
    return model_matrix(
        g, inverse_log_degree(g), mi, pos, s.scalars[mi], cand_scalars, s.embeddings[mi], cand_emb
    )


# ---- GetFeatures --------------------------------------------------------------------------
async def test_serving_once_loaded(features_suite: FeaturesUnderTest) -> None:
    async with channel(f"127.0.0.1:{features_suite.port}") as chan:
        health = health_pb2_grpc.HealthStub(chan)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="edgeflow.v1.FeatureService"), timeout=TIMEOUT
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_entity_features_equal_feast_sdk(features_suite: FeaturesUnderTest) -> None:
    ids = np.concatenate([features_suite.graph.ids[:-1][::-1], [ABSENT]])
    matrix, response = await get(features_suite.stub, entities=ids.tolist())
    assert tuple(response.features.columns) == ENTITY_COLUMNS
    assert list(response.missing) == [ABSENT]
    store = await asyncio.to_thread(feature_store, features_suite.cfg)
    sdk = store.get_online_features(
        features=store.get_feature_service(FEATURE_SERVICE),
        entity_rows=[{JOIN_KEY: int(i)} for i in ids],
    ).to_dict()
    for j, name in enumerate(SCALAR_FEATURES):
        want = np.array([np.nan if v is None else v for v in sdk[name]], np.float32)
        np.testing.assert_array_equal(matrix[:, j], want)
    emb = [e if e is not None else [np.nan] * EMBEDDING_DIM for e in sdk[EMBEDDING_FEATURE]]
    np.testing.assert_array_equal(matrix[:, len(SCALAR_FEATURES) :], np.array(emb, np.float32))


async def test_model_features_for_member_and_candidates(features_suite: FeaturesUnderTest) -> None:
    g = features_suite.graph
    member = int(g.ids[np.argmax(g.degree[:-1])])
    entities = np.concatenate([g.ids[:-1], [ABSENT]])
    matrix, response = await get(features_suite.stub, member=member, entities=entities.tolist())
    assert tuple(response.features.columns) == MODEL_COLUMNS
    assert list(response.missing) == [ABSENT]
    np.testing.assert_array_equal(matrix, expected_model_rows(features_suite, member, entities))
    assert matrix[:, MODEL_COLUMNS.index("common_neighbors")].max() > 0
    absent_row = matrix[-1]
    assert np.isnan(absent_row[2:6]).all() and not absent_row[6:].any()


async def test_column_subset_in_requested_order(features_suite: FeaturesUnderTest) -> None:
    g = features_suite.graph
    member, entities = int(g.ids[0]), g.ids[1:20]
    full, _ = await get(features_suite.stub, member=member, entities=entities.tolist())
    cols = ["jaccard", "cand_degree", "embedding_cosine"]
    part, response = await get(
        features_suite.stub, member=member, entities=entities.tolist(), columns=cols
    )
    assert list(response.features.columns) == cols
    np.testing.assert_array_equal(part, full[:, [MODEL_COLUMNS.index(c) for c in cols]])
    emb, _ = await get(
        features_suite.stub, entities=entities.tolist(), columns=["embedding_3", "degree"]
    )
    np.testing.assert_array_equal(emb[:, 0], features_suite.embeddings[1:20, 3])
    np.testing.assert_array_equal(emb[:, 1], features_suite.scalars[1:20, 0])


async def test_no_entities_gives_an_empty_matrix(features_suite: FeaturesUnderTest) -> None:
    matrix, response = await get(features_suite.stub, member=int(features_suite.graph.ids[0]))
    assert matrix.shape == (0, len(MODEL_COLUMNS)) and not response.missing


async def test_unknown_column_is_named(features_suite: FeaturesUnderTest) -> None:
    err = await rpc_error(
        get(features_suite.stub, member=1, entities=[4], columns=["jaccard", "nope"])
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'nope'" in (err.details() or "")
    err = await rpc_error(get(features_suite.stub, member=1, entities=[4], columns=["degree"]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only available without member" in (err.details() or "")


async def test_too_many_entities(features_suite: FeaturesUnderTest) -> None:
    ids = list(range(MAX_ENTITIES + 1))
    err = await rpc_error(get(features_suite.stub, entities=ids))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{MAX_ENTITIES + 1} requested, at most {MAX_ENTITIES}" in (err.details() or "")


async def test_unknown_member_not_found(features_suite: FeaturesUnderTest) -> None:
    err = await rpc_error(get(features_suite.stub, member=ABSENT, entities=[1, 4]))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert f"member {ABSENT} is not in the member graph" in (err.details() or "")


# ---- Push ---------------------------------------------------------------------------------
async def push(
    s: FeaturesUnderTest, entities: list[int], values: np.ndarray, columns: list[str]
) -> Any:
    request = features_pb2.PushRequest(entities=entities, values=tensor.pack(values, columns))
    return await s.stub.Push(request, timeout=60)


async def test_push_then_read_back(features_suite: FeaturesUnderTest) -> None:
    g = features_suite.graph
    old = int(g.ids[-1])  # the isolated member; other tests leave it alone
    new = 777_000_001  # not in the graph: pushed nearline
    emb = np.linspace(-1, 1, EMBEDDING_DIM, dtype=np.float32)
    full = np.concatenate([np.float32([3, 0.5, 1.25, 2]), emb])[None, :]
    reply = await push(features_suite, [new], full, list(ENTITY_COLUMNS))
    assert reply.pushed == 1
    # A partial push (degree only) keeps the member's other features.
    reply = await push(features_suite, [old], np.float32([[42.0]]), ["degree"])
    assert reply.pushed == 1
    matrix, response = await get(features_suite.stub, entities=[new, old])
    assert not response.missing
    np.testing.assert_array_equal(matrix[0], full[0])
    want_old = np.concatenate(
        [[42.0], features_suite.scalars[-1, 1:], features_suite.embeddings[-1]]
    )
    np.testing.assert_array_equal(matrix[1], want_old.astype(np.float32))
    # Feast's SDK sees the pushed rows too.
    store = await asyncio.to_thread(feature_store, features_suite.cfg)
    sdk = store.get_online_features(
        features=store.get_feature_service(FEATURE_SERVICE),
        entity_rows=[{JOIN_KEY: new}, {JOIN_KEY: old}],
    ).to_dict()
    assert sdk["degree"] == [3.0, 42.0]
    np.testing.assert_array_equal(np.float32(sdk[EMBEDDING_FEATURE][0]), emb)
    # A member with only an online row can now be the viewing member (no pair features).
    matrix, _ = await get(features_suite.stub, member=new, entities=[int(g.ids[0])])
    assert matrix[0, 0] == 3.0 and not matrix[0, 6:11].any()


_PUSH_IN_A_CHILD = """
import asyncio, json, multiprocessing, os, signal, sys
from pathlib import Path
import numpy as np
from edgeflow import tensor
from edgeflow.config import Config
from edgeflow.shell.errors import RequestError
from edgeflow.features.schema import ENTITY_COLUMNS
from edgeflow.features.service import FeaturesService
from edgeflow.v1 import features_pb2

async def main(home, url):
    service = FeaturesService(Config(home=Path(home), redis_url=url))
    await service.start()
    row = tensor.pack(np.ones((1, len(ENTITY_COLUMNS)), np.float32), ENTITY_COLUMNS)
    request = features_pb2.PushRequest(entities=[777000002], values=row)
    out = {"pushed": (await service.push(request)).pushed, "feast": "feast" in sys.modules}
    def signal_children(sig):
        for child in multiprocessing.active_children():
            os.kill(child.pid, sig)
            if sig == signal.SIGKILL:
                child.join()

    signal_children(signal.SIGKILL)  # killed while idle: the next push starts another
    out["again"] = (await service.push(request)).pushed
    signal_children(signal.SIGSTOP)  # killed with a push in flight: that push fails
    pushing = asyncio.ensure_future(service.push(request))
    await asyncio.sleep(0.5)
    signal_children(signal.SIGKILL)
    try:
        await pushing
    except RequestError as exc:
        out["killed"] = [exc.code.name, exc.message]
    out["next"] = (await service.push(request)).pushed
    # A child that stops answering (as when Redis hangs) is killed and replaced.
    service._writer.deadline_s = 2.0
    signal_children(signal.SIGSTOP)
    try:
        await service.push(request)
    except RequestError as exc:
        out["stuck"] = [exc.code.name, exc.message]
    service._writer.deadline_s = 60.0
    out["after"] = (await service.push(request)).pushed
    await service.stop()
    out["children"] = len(multiprocessing.active_children())
    print(json.dumps(out))

asyncio.run(main(*sys.argv[1:]))
"""


def test_push_runs_feast_in_a_child_process(features_suite: FeaturesUnderTest) -> None:
    """Importing Feast and its pushes hold the GIL for seconds: they run in a child process,
    so the service's own process never imports Feast; a child that died or stopped answering
    is replaced."""
    script = [
        sys.executable,
        "-c",
        _PUSH_IN_A_CHILD,
        str(features_suite.cfg.home),
        features_suite.cfg.redis_url,
    ]
    run = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["pushed"] == 1 and out["feast"] is False, out
    assert out["killed"] == ["UNAVAILABLE", "push: the Feast writer process died; retry"], out
    assert out["again"] == 1 and out["next"] == 1, out
    assert out["stuck"][0] == "UNAVAILABLE" and "did not answer within 2s" in out["stuck"][1]
    assert out["after"] == 1 and out["children"] == 0, out


@pytest.mark.parametrize(
    ("entities", "values", "columns", "message"),
    [
        ([1], np.zeros((1, 1)), ["size"], "unknown feature 'size'"),
        ([1], np.zeros((1, 2)), ["degree", "degree"], "'degree' appears twice"),
        ([1, 4], np.zeros((1, 1)), ["degree"], "1 rows for 2 entities"),
        ([1], np.float32([[np.nan]]), ["degree"], "member 1, column 'degree' is nan"),
        ([1], np.zeros((1, 2)), ["embedding_0", "embedding_1"], "2 of 32 embedding_* columns"),
        ([888_000_001], np.zeros((1, 1)), ["degree"], "member 888000001 has no online row"),
    ],
)
async def test_bad_push_is_named(
    features_suite: FeaturesUnderTest,
    entities: list[int],
    values: np.ndarray,
    columns: list[str],
    message: str,
) -> None:
    err = await rpc_error(push(features_suite, entities, values, columns))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.details() or "")


# ---- no graph, no Feast repo, Redis going away --------------------------------------------
async def test_no_graph_then_redis_down(tmp_path: Path) -> None:
    proc = start_redis(tmp_path / "redis")
    cfg = Config(home=tmp_path / "home", redis_url=proc.url, reload_interval_s=0.05)
    service = FeaturesService(cfg)
    server, port, _ = await start_server(service, "127.0.0.1:0")
    try:
        async with channel(f"127.0.0.1:{port}") as chan:
            stub = features_pb2_grpc.FeatureServiceStub(chan)
            # Entity features need no graph; pair features do.
            _, response = await get(stub, entities=[1, 2])
            assert list(response.missing) == [1, 2]
            err = await rpc_error(get(stub, member=1, entities=[2]))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "edgeflow ingest" in (err.details() or "")
            # Pushing needs the Feast repo that `edgeflow train` renders.
            row = tensor.pack(np.zeros((1, len(ENTITY_COLUMNS))), ENTITY_COLUMNS)
            request = features_pb2.PushRequest(entities=[1], values=row)
            err = await rpc_error(stub.Push(request, timeout=TIMEOUT))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "run `edgeflow train`" in (err.details() or "")
            # The service follows a graph ingested after it started.
            client = redis.Redis.from_url(proc.url)
            save_graph(client, random_graph())
            client.close()
            for _ in range(200):
                try:
                    await get(stub, member=1, entities=[4])
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                    await asyncio.sleep(0.05)
            matrix, _ = await get(stub, member=1, entities=[4])
            assert matrix.shape == (1, len(MODEL_COLUMNS))

            proc.stop()
            for kw in ({"member": 1, "entities": [4]}, {"entities": [1, 4]}):
                err = await rpc_error(get(stub, **kw))
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                assert f"Redis at {proc.url} is unavailable" in (err.details() or "")
            partial = features_pb2.PushRequest(
                entities=[1], values=tensor.pack(np.ones((1, 1)), ["degree"])
            )
            err = await rpc_error(stub.Push(partial, timeout=TIMEOUT))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.stop()
        await server.stop(0)
        await service.stop()


async def test_redis_down_from_the_start(features_suite: FeaturesUnderTest, tmp_path: Path) -> None:
    """The service starts without Redis and answers UNAVAILABLE, for reads and for a
    push through Feast (a copy of the module's repo pointing at the dead Redis)."""
    dead = f"127.0.0.1:{free_port()}"
    shutil.copytree(features_suite.cfg.feature_repo, tmp_path / "feature_repo")
    yaml_path = tmp_path / "feature_repo" / "feature_store.yaml"
    live = features_suite.cfg.redis_url.removeprefix("redis://").split("/")[0]
    yaml_path.write_text(yaml_path.read_text().replace(live, dead))
    service = FeaturesService(Config(home=tmp_path, redis_url=f"redis://{dead}/0"))
    server, port, _ = await start_server(service, "127.0.0.1:0")
    try:
        async with channel(f"127.0.0.1:{port}") as chan:
            stub = features_pb2_grpc.FeatureServiceStub(chan)
            err = await rpc_error(get(stub, entities=[1]))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            row = tensor.pack(np.zeros((1, len(ENTITY_COLUMNS))), ENTITY_COLUMNS)
            request = features_pb2.PushRequest(entities=[1], values=row)
            err = await rpc_error(stub.Push(request, timeout=60))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert f"push: Redis at redis://{dead}/0 is unavailable" in (err.details() or "")
    finally:
        await server.stop(0)
        await service.stop()
