"""The Feast repo, publishing with Feast's own CLI, and the direct Redis reader.

One module-scoped publish (feast apply + materialize on the session's real Redis) backs
every test here; the reader's values are compared with FeatureStore.get_online_features.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from edgeflow.build.feast_features import (
    FeastError,
    feast_connection_string,
    feature_store,
    publish_member_features,
    render_repo,
)
from edgeflow.config import REPO_ROOT, Config
from edgeflow.features.compute import member_features
from edgeflow.features.schema import (
    EMBEDDING_DIM,
    EMBEDDING_FEATURE,
    FEAST_PROJECT,
    FEATURE_SERVICE,
    FEATURE_VIEW,
    JOIN_KEY,
    PUSH_SOURCE,
    SCALAR_FEATURES,
)
from edgeflow.graph import Graph
from edgeflow.local.redis_server import RedisProcess
from edgeflow.stores.feast_online import (
    USUAL_REPLY,
    OnlineReader,
    OnlineRows,
    OnlineValueError,
    decode_usual,
    decode_value,
    entity_keys,
    field_key,
)

ABSENT = [10**9 + 7, 123_456_789_012, 5]  # never published


def random_graph(seed: int = 3, n: int = 60, edges: int = 180) -> Graph:
    """Sparse ids (7k + 11) so id and dense index differ; a few isolated members."""
    rng = np.random.default_rng(seed)
    src, dst = rng.integers(0, n, edges), rng.integers(0, n, edges)
    isolated = np.arange(n, n + 4)
    return Graph.from_edges(src * 7 + 11, dst * 7 + 11, members=isolated * 7 + 11)


class Published:
    def __init__(self, cfg: Config, graph: Graph, scalars: np.ndarray, emb: np.ndarray) -> None:
        self.cfg, self.graph, self.scalars, self.embeddings = cfg, graph, scalars, emb


@pytest.fixture(scope="module")
def published(redis_proc: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Published:
    redis.Redis.from_url(redis_proc.url).flushall()
    graph = random_graph()
    scalars = member_features(graph)
    emb = np.random.default_rng(4).normal(size=(graph.n, EMBEDDING_DIM)).astype(np.float32)
    cfg = Config(home=tmp_path_factory.mktemp("feast"), redis_url=redis_proc.url)
    publish_member_features(cfg, graph, scalars, emb)
    return Published(cfg, graph, scalars, emb)


@pytest.fixture(scope="module")
def store(published: Published) -> Any:
    return feature_store(published.cfg)


@pytest.fixture
def client(redis_proc: RedisProcess) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_proc.url)
    yield c
    c.close()


def sdk_rows(store: Any, ids: np.ndarray) -> OnlineRows:
    """Feast's own answer, in the reader's shape (None -> NaN)."""
    service = store.get_feature_service(FEATURE_SERVICE)
    rows = [{JOIN_KEY: int(i)} for i in ids]
    out = store.get_online_features(features=service, entity_rows=rows).to_dict()
    scalars = np.array(
        [[np.nan if v is None else v for v in out[f]] for f in SCALAR_FEATURES], dtype=np.float32
    ).T.reshape(len(ids), len(SCALAR_FEATURES))
    nan_row = [np.nan] * EMBEDDING_DIM
    emb = np.array([nan_row if e is None else e for e in out[EMBEDDING_FEATURE]], np.float32)
    missing = np.array(
        [all(out[f][k] is None for f in out if f != JOIN_KEY) for k in range(len(ids))]
    )
    return OnlineRows(
        scalars=scalars, embeddings=emb.reshape(len(ids), EMBEDDING_DIM), missing=missing
    )


def assert_rows_equal(ours: OnlineRows, theirs: OnlineRows) -> None:
    np.testing.assert_array_equal(ours.scalars, theirs.scalars)  # NaN == NaN here
    np.testing.assert_array_equal(ours.embeddings, theirs.embeddings)
    np.testing.assert_array_equal(ours.missing, theirs.missing)


# ---- keys and rendering (no Feast CLI) ----------------------------------------------------
def test_keys_equal_feasts_own(store: Any) -> None:
    from feast.infra.online_stores.helpers import _mmh3, _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    ids = np.array([0, 1, 11, -3, 2**40 + 5, 2**63 - 1], dtype=np.int64)
    expected = [
        _redis_key(
            FEAST_PROJECT,
            EntityKey(join_keys=[JOIN_KEY], entity_values=[Value(int64_val=int(i))]),
            3,
        )
        for i in ids
    ]
    assert entity_keys(ids) == expected
    assert entity_keys(ids[::2]) == expected[::2]  # strided input
    for feature in (*SCALAR_FEATURES, EMBEDDING_FEATURE):
        assert field_key(FEATURE_VIEW, feature) == _mmh3(f"{FEATURE_VIEW}:{feature}")


def test_connection_string_from_url() -> None:
    base = "socket_connect_timeout=0.5,socket_timeout=5"
    assert feast_connection_string("redis://127.0.0.1:6390/2") == f"127.0.0.1:6390,db=2,{base}"
    assert (
        feast_connection_string("rediss://u:p%40ss@cache:7000")
        == f"cache:7000,db=0,username=u,password=p@ss,ssl=true,{base}"
    )
    assert (
        feast_connection_string("redis+cluster://127.0.0.1:7001,127.0.0.1:7002")
        == f"127.0.0.1:7001,127.0.0.1:7002,{base}"
    )
    with pytest.raises(ValueError, match="scheme 'http' is not supported"):
        feast_connection_string("http://127.0.0.1:6390")
    with pytest.raises(ValueError, match="database 'x' must be a number"):
        feast_connection_string("redis://127.0.0.1:6390/x")


def test_render_fills_in_this_suites_redis(tmp_path: Path) -> None:
    cfg = Config(home=tmp_path, redis_url="redis://127.0.0.1:7777/3")
    repo = render_repo(cfg)
    assert repo == tmp_path / "feature_repo"
    text = (repo / "feature_store.yaml").read_text()
    assert 'connection_string: "127.0.0.1:7777,db=3,' in text
    assert "${EDGEFLOW_FEAST_REDIS}" not in text
    assert (repo / "definitions.py").read_text() == (
        REPO_ROOT / "feature_repo" / "definitions.py"
    ).read_text()
    assert "redis_type" not in text
    cluster = Config(home=tmp_path / "c", redis_url="redis+cluster://127.0.0.1:7001,127.0.0.1:7002")
    text = (render_repo(cluster) / "feature_store.yaml").read_text()
    assert '  connection_string: "127.0.0.1:7001,127.0.0.1:7002,' in text
    assert "\n  redis_type: redis_cluster\n" in text
    missing = Config(home=tmp_path, feature_repo_template=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nowhere/feature_store\.yaml"):
        render_repo(missing)


def test_publish_checks_shapes(tmp_path: Path) -> None:
    graph = random_graph()
    cfg = Config(home=tmp_path, redis_url="redis://127.0.0.1:1/0")
    bad = np.zeros((graph.n, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"scalars have shape \(64, 3\)"):
        publish_member_features(cfg, graph, bad, np.zeros((graph.n, EMBEDDING_DIM)))


def test_feature_store_without_repo_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run `edgeflow train`"):
        feature_store(Config(home=tmp_path))


# ---- Feast's CLI --------------------------------------------------------------------------
def test_failed_feast_command_names_it_and_its_error(tmp_path: Path) -> None:
    template = tmp_path / "template"
    template.mkdir()
    for name in ("feature_store.yaml", ".feastignore"):
        (template / name).write_text((REPO_ROOT / "feature_repo" / name).read_text())
    (template / "definitions.py").write_text("raise RuntimeError('broken definitions here')\n")
    cfg = Config(
        home=tmp_path / "home", redis_url="redis://127.0.0.1:1/0", feature_repo_template=template
    )
    graph = random_graph()
    with pytest.raises(FeastError) as info:
        publish_member_features(
            cfg, graph, member_features(graph), np.zeros((graph.n, EMBEDDING_DIM), np.float32)
        )
    assert "apply" in str(info.value) and "broken definitions here" in str(info.value)


def test_apply_registers_the_repos_objects(published: Published, store: Any) -> None:
    view = store.get_feature_view(FEATURE_VIEW)
    assert [f.name for f in view.features] == [*SCALAR_FEATURES, EMBEDDING_FEATURE]
    assert view.entities == ["member"]
    assert view.ttl.days == 3650
    assert store.get_data_source(PUSH_SOURCE).name == PUSH_SOURCE
    assert [
        p.name for p in store.get_feature_service(FEATURE_SERVICE).feature_view_projections
    ] == [FEATURE_VIEW]


# ---- the direct reader against Feast's SDK ------------------------------------------------
def test_reader_equals_feast_sdk_for_every_member(
    published: Published, store: Any, client: redis.Redis
) -> None:
    ids = np.concatenate([published.graph.ids, ABSENT, published.graph.ids[:5]])
    np.random.default_rng(0).shuffle(ids)
    ours = OnlineReader().read_sync(client, ids)
    assert_rows_equal(ours, sdk_rows(store, ids))
    assert set(ids[ours.missing].tolist()) == set(ABSENT) - set(published.graph.ids.tolist())
    # And both equal what was published, bit for bit.
    pos = published.graph.indices_of(ids)
    known = pos >= 0
    np.testing.assert_array_equal(ours.scalars[known], published.scalars[pos[known]])
    np.testing.assert_array_equal(ours.embeddings[known], published.embeddings[pos[known]])
    assert np.isnan(ours.scalars[~known]).all() and np.isnan(ours.embeddings[~known]).all()


async def test_pipelined_reader_equals_script_reader(
    published: Published, redis_proc: RedisProcess, client: redis.Redis
) -> None:
    from edgeflow.stores.resp import RawPipeline

    pipe = RawPipeline(redis_proc.url)
    try:
        reader = OnlineReader()
        ids = np.concatenate([published.graph.ids[::3], ABSENT])
        client.script_flush()  # the script reader reloads its script when Redis lost it
        assert_rows_equal(await reader.read_pipelined(pipe, ids), reader.read_sync(client, ids))
        empty = reader.read_sync(client, [])
        assert empty.scalars.shape == (0, len(SCALAR_FEATURES)) and empty.missing.size == 0
    finally:
        await pipe.close()


def test_fallback_decoder_matches_feast_for_other_layouts(
    published: Published, store: Any, client: redis.Redis
) -> None:
    """Values Feast could hold but the fast path does not expect: doubles, ints, nulls, an
    unpacked float list, a double list, an absent field."""
    from feast.protos.feast.types.Value_pb2 import DoubleList, FloatList, Null, Value

    key = entity_keys(np.array([900_001]))[0]
    vec = np.linspace(-1, 1, EMBEDDING_DIM)
    client.hset(
        key,
        mapping={
            field_key(FEATURE_VIEW, "degree"): Value(double_val=3.25).SerializeToString(),
            field_key(FEATURE_VIEW, "clustering"): Value(int64_val=-7).SerializeToString(),
            field_key(FEATURE_VIEW, "pagerank"): Value(null_val=Null.NULL).SerializeToString(),
            field_key(FEATURE_VIEW, EMBEDDING_FEATURE): Value(
                double_list_val=DoubleList(val=vec.tolist())
            ).SerializeToString(),
        },
    )
    ids = np.array([900_001, int(published.graph.ids[0])])
    ours = OnlineReader().read_sync(client, ids)
    assert_rows_equal(ours, sdk_rows(store, ids))
    # An explicit null reads as 0, as Feast's SDK returns it; an absent field is NaN.
    np.testing.assert_array_equal(ours.scalars[0], np.float32([3.25, -7, 0, np.nan]))
    # The wire decoder also takes an unpacked FloatList (protobuf parsers must accept it).
    unpacked = b"\x82\x01\x0a" + b"".join(b"\x0d" + np.float32(v).tobytes() for v in (1.5, -2))
    np.testing.assert_array_equal(decode_value(unpacked), np.float32([1.5, -2]))
    assert decode_value(Value(float_list_val=FloatList(val=[])).SerializeToString()).size == 0


def test_bad_stored_values_are_named(published: Published, client: redis.Redis) -> None:
    from feast.protos.feast.types.Value_pb2 import FloatList, Value

    short = entity_keys(np.array([900_002]))[0]
    client.hset(
        short,
        field_key(FEATURE_VIEW, EMBEDDING_FEATURE),
        Value(float_list_val=FloatList(val=[1.0] * 7)).SerializeToString(),
    )
    with pytest.raises(OnlineValueError, match="member 900002, feature embedding: embedding has 7"):
        OnlineReader().read_sync(client, [900_002])
    garbage = entity_keys(np.array([900_003]))[0]
    client.hset(garbage, field_key(FEATURE_VIEW, "degree"), b"\xff\xff\xff")
    with pytest.raises(OnlineValueError, match="member 900003, feature degree"):
        OnlineReader().read_sync(client, [900_003])
    client.delete(short, garbage)


async def test_pipelined_reader_equals_feast_sdk(
    published: Published, store: Any, redis_proc: RedisProcess
) -> None:
    from edgeflow.stores.resp import RawPipeline

    pipe = RawPipeline(redis_proc.url)
    try:
        ids = np.concatenate([published.graph.ids[::2], ABSENT, published.graph.ids[:3]])
        reader = OnlineReader()
        assert_rows_equal(await reader.read_pipelined(pipe, ids), sdk_rows(store, ids))
        # A second read reuses the pooled connection and gives the same rows.
        assert_rows_equal(await reader.read_pipelined(pipe, ids), sdk_rows(store, ids))
        assert (await reader.read_pipelined(pipe, [])).missing.size == 0
    finally:
        await pipe.close()


async def test_usual_replies_read_as_a_matrix_equal_feast_sdk(
    published: Published, store: Any, redis_proc: RedisProcess, client: redis.Redis
) -> None:
    """Members published in Feast's usual layouts read as one byte matrix of replies; an
    absent member or a value in another 5-byte layout, first or last, reads through the
    parser, and every read equals Feast's SDK."""
    from feast.protos.feast.types.Value_pb2 import FloatList, Value

    from edgeflow.stores.resp import RawPipeline

    odd = 900_004
    client.hset(
        entity_keys(np.array([odd]))[0],
        mapping={
            **{field_key(FEATURE_VIEW, f): Value(float_val=0.5).SerializeToString()
               for f in SCALAR_FEATURES},
            # A 5-byte value like a Float32's, with another tag (int64, 4-byte varint).
            field_key(FEATURE_VIEW, "clustering"): Value(int64_val=2**22).SerializeToString(),
            field_key(FEATURE_VIEW, EMBEDDING_FEATURE): Value(
                float_list_val=FloatList(val=[0.25] * EMBEDDING_DIM)
            ).SerializeToString(),
        },
    )  # fmt: skip
    pipe = RawPipeline(redis_proc.url)
    reader = OnlineReader()
    try:
        ids = np.resize(published.graph.ids, 3000)  # many socket reads
        replies = await pipe.execute_fixed(reader.payload(ids), ids.size, USUAL_REPLY)
        assert isinstance(replies, np.ndarray)
        assert_rows_equal(decode_usual(replies), sdk_rows(store, ids))
        assert_rows_equal(await reader.read_pipelined(pipe, ids), sdk_rows(store, ids))
        some = published.graph.ids[:40].tolist()
        for unusual in ([ABSENT[0], *some], [*some, ABSENT[0]], [odd, *some], [*some, odd]):
            got = np.array(unusual, dtype=np.int64)
            replies = await pipe.execute_fixed(reader.payload(got), got.size, USUAL_REPLY)
            assert isinstance(replies, list)
            assert_rows_equal(await reader.read_pipelined(pipe, got), sdk_rows(store, got))
        assert (await reader.read_pipelined(pipe, [odd])).scalars[0, 1] == 2**22
    finally:
        await pipe.close()
        client.delete(entity_keys(np.array([odd]))[0])



def test_the_suite_does_not_inherit_feasts_metrics_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Importing feast points prometheus_client at a directory it deletes when the importing
    process exits (feast/metrics.py); the services `quickstart` starts after training
    outlive it, so they must not use it."""
    from edgeflow.local.suite import new_suite

    for name in ("PROMETHEUS_MULTIPROCESS_DIR", "PROMETHEUS_MULTIPROC_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "feast_metrics_x1y2"))
    monkeypatch.setenv("OTHER", "kept")
    env = new_suite(tmp_path, free_ports=True).env()
    assert not [k for k in env if k.startswith("PROMETHEUS_MULTIPROC")]
    assert env["OTHER"] == "kept"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "mine"))  # a user's own
    assert new_suite(tmp_path, free_ports=True).env()["PROMETHEUS_MULTIPROC_DIR"].endswith("mine")
