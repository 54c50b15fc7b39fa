"""edgeflow's Redis code on a real 3-master Redis Cluster: hand-encoded pipelines routed by
slot (MOVED after a reshard included), Publish in steps, lists swapped and updated without a
cross-slot script, and every script's keys in one slot."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis
import redis.cluster

from edgeflow.local.redis_server import (
    RedisProcess,
    find_redis_cli,
    free_cluster_ports,
    start_cluster,
)
from edgeflow.nearline import events
from edgeflow.nearline.events import Event
from edgeflow.stores import keys, lists, redis_client
from edgeflow.stores.resp import BitsReply, RawPipeline, RespReplyError, encode
from edgeflow.stores.resp_cluster import (
    ClusterPipeline,
    command_slot,
    open_pipeline,
    split_commands,
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ports = free_cluster_ports(3)
    procs: list[RedisProcess] = start_cluster(tmp_path_factory.mktemp("cluster"), ports)
    try:
        yield redis_client.cluster_url([("127.0.0.1", ports[0])])
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
def client(cluster: str) -> Iterator[redis.cluster.RedisCluster]:
    c = redis_client.connect(cluster)
    assert isinstance(c, redis.cluster.RedisCluster)
    c.flushall()
    yield c
    c.close()


def _ports_holding(client: redis.cluster.RedisCluster, names: list[str]) -> set[int]:
    return {int(cast(Any, client.get_node_from_key(k)).port) for k in names}


def test_urls_say_which_redis() -> None:
    addr = redis_client.parse_url("redis+cluster://u:p%40@10.0.0.1:7000,10.0.0.2:7001")
    assert addr.cluster and addr.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert (addr.username, addr.password, addr.db) == ("u", "p@", 0)
    assert "p@" not in addr.describe()
    assert redis_client.parse_url("rediss://h:6380/2").tls
    for bad, why in (
        ("http://h:1", "scheme 'http' is not supported"),
        ("redis://a:1,b:2", "several hosts need redis+cluster://"),
        ("redis+cluster://a:1/3", "a Redis Cluster has only database 0"),
        ("redis://h:70000", "is not a port"),
    ):
        with pytest.raises(ValueError, match=re.escape(why)):
            redis_client.parse_url(bad)
    assert isinstance(open_pipeline("redis://127.0.0.1:1/0"), RawPipeline)
    assert isinstance(open_pipeline("redis+cluster://127.0.0.1:1"), ClusterPipeline)


def test_a_pipeline_is_split_by_slot() -> None:
    payload = encode(b"GET", b"a") + encode(b"EVALSHA", b"f" * 40, b"1", b"k{x}", b"arg")
    commands = split_commands(payload, 2)
    assert commands == [[b"GET", b"a"], [b"EVALSHA", b"f" * 40, b"1", b"k{x}", b"arg"]]
    assert command_slot(commands[1]) == command_slot([b"GET", b"other{x}"])
    with pytest.raises(ValueError, match="more than 1 commands"):
        split_commands(payload, 1)


def test_script_keys_share_a_slot() -> None:
    """Every key a script names together hashes to one slot, whatever the version or id."""
    from redis.crc import key_slot

    graph = [keys.GRAPH_CURRENT, keys.graph_meta("v1"), keys.graph_chunk("v2", 7),
             keys.graph_deltas("v3")]  # fmt: skip
    stream = [keys.EVENTS, keys.event_seen("a"), keys.event_done("b"), keys.NEARLINE_STATS,
              keys.EVENTS_DEAD]  # fmt: skip
    for group in (graph, stream):
        assert len({key_slot(k.encode()) for k in group}) == 1, group
    # Per-member keys spread out.
    assert len({key_slot(keys.adjacency(m).encode()) for m in range(100)}) > 50


def test_hmget_by_master_reads_hashes_of_every_slot_and_survives_a_stale_slot_map(
    client: redis.cluster.RedisCluster,
) -> None:
    from redis.crc import key_slot

    names = [f"entity:{i}".encode() for i in range(300)]
    assert len(_ports_holding(client, [n.decode() for n in names])) == 3
    for i, name in enumerate(names[:250]):  # the last 50 have no hash
        client.hset(name, mapping={"a": f"a{i}", "b": f"b{i}"})
    fields = ["a", "b", "c"]
    want = [client.hmget(name, fields) for name in names]
    assert want[0] == [b"a0", b"b0", None] and want[-1] == [None, None, None]
    assert redis_client.cluster_hmget(client, names, fields) == want

    # A slot map that names the wrong master (a slot moved since it was read): that master
    # answers MOVED, and the read runs again through the cluster pipeline, which follows it.
    cache = client.nodes_manager.slots_cache
    slot = key_slot(names[0])
    owner = cache[slot]
    wrong = next(n for n in client.get_primaries() if n.name != owner[0].name)
    cache[slot] = [wrong]
    try:
        assert redis_client.cluster_hmget(client, names, fields) == want
        # The cluster pipeline did run: it corrected the client's map on the MOVED.
        assert client.nodes_manager.slots_cache[slot][0].name == owner[0].name
    finally:
        cache[slot] = owner


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[tuple[str, redis.cluster.RedisCluster]]:
    """A cluster of the test's own, for a test that moves its slots."""
    ports = free_cluster_ports(3)
    procs = start_cluster(tmp_path, ports)
    url = redis_client.cluster_url([("127.0.0.1", ports[0])])
    client = redis_client.connect(url)
    assert isinstance(client, redis.cluster.RedisCluster)
    try:
        yield url, client
    finally:
        client.close()
        for proc in procs:
            proc.stop()


def test_raw_pipeline_routes_by_slot_and_follows_a_reshard(
    own_cluster: tuple[str, redis.cluster.RedisCluster],
) -> None:
    cluster, client = own_cluster
    names = [f"member:{i}" for i in range(300)]
    assert len(_ports_holding(client, names)) == 3

    async def run() -> None:
        pipe = open_pipeline(cluster)
        try:
            sets = b"".join(encode(b"SET", k.encode(), b"%08d" % i) for i, k in enumerate(names))
            assert await pipe.execute(sets, len(names)) == [b"OK"] * len(names)
            gets = b"".join(encode(b"GET", k.encode()) for k in names)
            assert await pipe.execute(gets, len(names)) == [b"%08d" % i for i in range(300)]
            # Replies of one usual shape come back as one matrix, in the payload's order.
            shape = BitsReply(b"$8\r\n00000000\r\n", np.array([0] * 4 + [0xFF] * 8 + [0, 0]))
            matrix = await pipe.execute_fixed(gets, len(names), shape)
            assert isinstance(matrix, np.ndarray) and matrix.shape == (300, shape.size)
            assert [bytes(r[4:12]) for r in matrix] == [b"%08d" % i for i in range(300)]
            # A reply that differs (a missing key) falls back to parsed replies, in order.
            mixed = gets + encode(b"GET", b"nobody")
            out = await pipe.execute_fixed(mixed, 301, shape)
            assert isinstance(out, list) and out[-1] is None and out[5] == b"00000005"
            with pytest.raises(RespReplyError, match="WRONGTYPE"):
                await pipe.execute(encode(b"SADD", names[0].encode(), b"x"), 1)

            # Move every slot of one master to another: the pipeline's map is stale, so the
            # moved keys answer MOVED, the map is reloaded and they go again.
            nodes = cast(Any, client).get_primaries()
            source, target = nodes[0], nodes[1]
            subprocess.run(
                [find_redis_cli(), "--cluster", "reshard", f"127.0.0.1:{source.port}",
                 "--cluster-from", _node_id(source.port), "--cluster-to", _node_id(target.port),
                 "--cluster-slots", "16384", "--cluster-yes"],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
            assert await pipe.execute(gets, len(names)) == [b"%08d" % i for i in range(300)]
        finally:
            await pipe.close()

    asyncio.run(run())


def _node_id(port: int) -> str:
    return redis.Redis(port=port).execute_command("CLUSTER MYID").decode()


def _event(eid: str, typ: str, member: int, target: int) -> Event:
    return Event(id=eid, type=typ, member=member, target=target, time=time.time(), features={})


def test_publish_in_steps_applies_once_and_survives_a_crash_between_steps(
    cluster: str, client: redis.cluster.RedisCluster
) -> None:
    async def run() -> None:
        aio = redis_client.connect_async(cluster)
        try:
            first = [_event("c1", "connect", 1, 2), _event("b1", "block", 3, 4),
                     _event("d1", "dismiss", 5, 6), _event("f1", "follow", 7, 8)]  # fmt: skip
            ids = await events.publish(aio, first)
            assert all(ids) and len(set(ids)) == 4
            assert await events.publish(aio, first) == [""] * 4  # duplicates store nothing
            # A disconnect after the connect; a late retry of the connect stays a duplicate.
            assert (await events.publish(aio, [_event("x1", "disconnect", 1, 2)]))[0]
            assert await events.publish(aio, [first[0]]) == [""]
            # A crash after the SET writes, before the append: the retry appends it.
            pipe = aio.pipeline(transaction=False)
            events._set_changes(pipe, _event("b2", "block", 9, 10))
            await pipe.execute()
            assert (await events.publish(aio, [_event("b2", "block", 9, 10)]))[0]
            # A state change keeps the SET of deactivated members too.
            states = [_event("s1", "deactivate", 11, 0), _event("s2", "deactivate", 12, 0),
                      _event("s3", "reactivate", 11, 0)]  # fmt: skip
            assert all(await events.publish(aio, states))
        finally:
            await aio.aclose()

    asyncio.run(run())
    assert client.smembers(keys.adjacency(1)) == set() == client.smembers(keys.adjacency(2))
    assert client.smembers(keys.blocked(3)) == {b"4"} and client.smembers(keys.blocked(4)) == {b"3"}
    assert client.smembers(keys.dismissed(5)) == {b"6"}
    assert client.smembers(keys.follows(7)) == {b"8"}
    assert client.smembers(keys.blocked(10)) == {b"9"}
    assert client.smembers(keys.DEACTIVATED_MEMBERS) == {b"12"}
    assert not client.exists(keys.deactivated(11)) and client.exists(keys.deactivated(12))
    stream = cast(list[Any], client.xrange(keys.EVENTS))
    ids = [b"c1", b"b1", b"d1", b"f1", b"x1", b"b2", b"s1", b"s2", b"s3"]
    assert [f[b"id"] for _, f in stream] == ids
    # The members' SETs live on other masters than the stream.
    spread = [keys.adjacency(1), keys.blocked(3), keys.blocked(4), keys.adjacency(2),
              keys.dismissed(5), keys.follows(7), keys.blocked(9), keys.blocked(10)]  # fmt: skip
    assert len(_ports_holding(client, [*spread, keys.EVENTS])) == 3


def _lists(members: np.ndarray, offset: int) -> list[tuple[np.ndarray, np.ndarray]]:
    score = np.array([0.5, 0.4], dtype=np.float32)
    return [(np.array([m + offset, m + offset + 1]), score) for m in members.tolist()]


def test_lists_swap_update_and_read_without_cross_slot_scripts(
    cluster: str, client: redis.cluster.RedisCluster
) -> None:
    members = np.arange(200, dtype=np.int64)
    first = lists.write_lists(client, "pymk", members, _lists(members, 1))
    entry_keys = [keys.list_entry("pymk", first, m) for m in range(200)]
    assert len(_ports_holding(client, entry_keys)) == 3
    # A batch run starts; a nearline update lands in the live version meanwhile; the batch
    # is published: the swap carries the newer nearline entry over, the batch's own entries
    # win elsewhere.
    started = time.time()
    second = lists.new_version()
    pipe = client.pipeline(transaction=False)
    lists.queue_entries(pipe, "pymk", second, members, _lists(members, 1000), started)
    pipe.execute()
    assert lists.update_lists(client, "pymk", np.array([5]), _lists(np.array([5]), 100)) == first
    assert lists.publish_version(client, "pymk", second, {"members": 200}, started) == first
    got = lists.read_lists(client, "pymk", [5, 6, 999])
    assert got[0] is not None and got[0].mode == "nearline" and got[0].ids.tolist() == [105, 106]
    assert got[1] is not None and got[1].ids.tolist() == [1006, 1007] and got[2] is None
    assert got[0].created_at >= started and got[0].version == second

    async def read() -> None:
        pipe = open_pipeline(cluster)
        aio = redis_client.connect_async(cluster)
        try:
            for reader in (pipe, aio):
                version, entry = await lists.read_list_entry(reader, "pymk", 6)
                assert version == second and entry is not None
                assert entry.ids.tolist() == [1006, 1007]
            assert await lists.read_list_entry(pipe, "nothing", 6) == (None, None)
        finally:
            await pipe.close()
            await aio.aclose()

    asyncio.run(read())


def test_graph_snapshots_deltas_and_compaction_on_a_cluster(
    cluster: str, client: redis.cluster.RedisCluster, tmp_path: Path
) -> None:
    from edgeflow.graph import Graph
    from edgeflow.stores.graph_store import append_deltas, compact_graph, load_graph, save_graph

    graph = Graph.from_edges(np.array([1, 2, 3, 4, 1]), np.array([2, 3, 4, 1, 3]), version="g1")
    save_graph(client, graph)
    assert load_graph(client, cache_dir=tmp_path).edge_count == 5
    assert client.smembers(keys.adjacency(1)) == {b"2", b"3", b"4"}
    append_deltas(client, np.array([[2, 4]]), np.array([True]))  # edge 2-4 appears
    compact_graph(client, 1, tmp_path)  # the compaction script moves pointer and deltas
    again = load_graph(client, cache_dir=tmp_path)
    assert again.edge_count == 6 and again.version != graph.version


def test_feature_rows_are_routed_by_key_without_parsing_the_pipeline(
    cluster: str, client: redis.cluster.RedisCluster, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """GetFeatures' read on a cluster: each master gets its rows as they were encoded; a row
    Redis lacks sends the call again the general way, with the same answer."""
    from edgeflow.build.feast_features import publish_member_features
    from edgeflow.config import Config
    from edgeflow.features.compute import member_features
    from edgeflow.features.schema import EMBEDDING_DIM
    from edgeflow.graph import Graph
    from edgeflow.stores.feast_online import OnlineReader

    edges = np.array([[i, (i * 7 + 1) % 300] for i in range(300)], dtype=np.int64)
    graph = Graph.from_edges(edges[:, 0], edges[:, 1])
    emb = np.random.default_rng(2).normal(size=(graph.n, EMBEDDING_DIM)).astype(np.float32)
    cfg = Config(home=tmp_path, redis_url=cluster)
    publish_member_features(cfg, graph, member_features(graph), emb)
    general: list[int] = []
    fixed = ClusterPipeline.execute_fixed

    async def counted(self: ClusterPipeline, *args: Any, **kwargs: Any) -> Any:
        general.append(1)
        return await fixed(self, *args, **kwargs)

    monkeypatch.setattr(ClusterPipeline, "execute_fixed", counted)
    reader = OnlineReader()

    async def run() -> None:
        pipe = open_pipeline(cluster)
        try:
            present = graph.ids[::2]
            rows = await reader.read_pipelined(pipe, present)
            assert not general  # the rows went out as encoded, one group per master
            want = reader.read_sync(client, present)
            np.testing.assert_array_equal(rows.scalars, want.scalars)
            np.testing.assert_array_equal(rows.embeddings, want.embeddings)
            with_missing = np.append(present[:20], 10**9)
            rows = await reader.read_pipelined(pipe, with_missing)
            assert general == [1] and rows.missing.tolist() == [False] * 20 + [True]
            want = reader.read_sync(client, with_missing)
            np.testing.assert_array_equal(rows.scalars, want.scalars)
        finally:
            await pipe.close()

    asyncio.run(run())
