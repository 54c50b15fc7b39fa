"""Merging: blend logic (pure), filters against a real Redis, the service over real gRPC."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeflow import tensor
from edgeflow.config import Config
from edgeflow.graph import Graph
from edgeflow.local.ports import free_port
from edgeflow.local.redis_server import RedisProcess, start_redis
from edgeflow.merging import blend, filters
from edgeflow.merging import service as merging_service
from edgeflow.merging import wire as edge_wire
from edgeflow.merging.blend import BlendError, ScoredList
from edgeflow.merging.filters import FilterError
from edgeflow.merging.service import MergingService, create
from edgeflow.shell.server import channel, start_server
from edgeflow.stores import keys
from edgeflow.stores.graph_store import save_graph
from edgeflow.stores.resp import RawPipeline
from edgeflow.v1 import merging_pb2, merging_pb2_grpc, tensor_pb2

NAN = float("nan")


def scored(
    name: str,
    ids: Sequence[int] | np.ndarray,
    rows: Sequence[Sequence[float]] | Sequence[float] | np.ndarray,
    columns: Sequence[str] = ("score",),
    weight: float = 1.0,
    mode: str = "online",
    age: float = 0.0,
    model_column: int = -1,
) -> ScoredList:
    mat = np.asarray(rows, dtype=np.float32).reshape(len(ids), len(columns))
    return ScoredList(
        name=name,
        ids=np.asarray(ids, dtype=np.int64),
        scores=mat,
        columns=tuple(columns),
        weight=weight,
        mode=mode,
        age_seconds=age,
        model_column=model_column,
    )


def targets(edges: Sequence[tensor_pb2.Edge]) -> list[int]:
    return [e.target for e in edges]


def drops(response: merging_pb2.MergeResponse | merging_pb2.FilterResponse) -> dict[str, int]:
    return {d.reason: d.count for d in response.dropped}


def prov(edge: tensor_pb2.Edge) -> list[tuple[str, float, str, float]]:
    return [(p.source, round(p.score, 4), p.mode, p.age_seconds) for p in edge.provenance]


# --- blend: pure logic --------------------------------------------------------------------


def test_single_list_keeps_its_order() -> None:
    rng = np.random.default_rng(3)
    ids = rng.permutation(500) + 1000
    score = rng.normal(size=500) * 40
    out = blend.merge([scored("fof", ids, score)], k=100)
    assert targets(out.edges) == ids[np.argsort(-score, kind="stable")][:100].tolist()
    assert drops(out) == {"top_k": 400}
    assert out.edges[0].score == pytest.approx(1.0)  # min-max: the best is 1


def test_weights_decide_between_lists() -> None:
    a = ("a", [1, 2], [1.0, 0.0])
    b = ("b", [2, 1], [1.0, 0.0])
    heavy_a = blend.merge([scored(*a, weight=2), scored(*b, weight=1)], k=2)
    heavy_b = blend.merge([scored(*a, weight=1), scored(*b, weight=3)], k=2)
    assert targets(heavy_a.edges) == [1, 2]
    assert [e.score for e in heavy_a.edges] == pytest.approx([2.0, 1.0])
    assert targets(heavy_b.edges) == [2, 1]
    assert [e.score for e in heavy_b.edges] == pytest.approx([3.0, 1.0])


def test_unset_weights_mean_equal_weights() -> None:
    out = blend.merge(
        [scored("a", [1, 2], [5.0, 1.0], weight=0), scored("b", [3], [7.0], weight=0)], k=3
    )
    assert [e.score for e in out.edges] == pytest.approx([1.0, 1.0, 0.0])
    assert targets(out.edges) == [1, 3, 2]


def test_normalisation_blends_differently_scaled_lists() -> None:
    # Common-neighbour counts (0..100) and cosines (0..1): min-max puts both on [0, 1].
    counts = scored("fof", [1, 2, 3], [100.0, 60.0, 0.0])
    cosines = scored("ebr", [3, 2, 1], [0.9, 0.5, 0.1])
    out = blend.merge([counts, cosines], k=3)
    assert targets(out.edges) == [2, 1, 3]  # agreement wins; 1 and 3 tie, lower id first
    assert [e.score for e in out.edges] == pytest.approx([1.1, 1.0, 1.0])
    assert drops(out) == {"duplicate": 3}


def test_normalise_handles_constant_nan_and_inf() -> None:
    assert blend.normalise(np.array([2.0, 2.0])).tolist() == [1.0, 1.0]
    got = blend.normalise(np.array([np.nan, 0.0, 4.0, np.inf, -np.inf, 2.0]))
    assert got.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.5]


def test_dedup_unions_provenance_and_keeps_model_score() -> None:
    cols = ("score", "source:fof", "source:ebr", "model:ranker")
    online = scored(
        "ranked",
        [1, 2, 3],
        [[0.9, 12, NAN, 0.9], [0.5, 4, 0.8, 0.5], [0.1, NAN, 0.6, 0.1]],
        columns=cols,
        model_column=3,
    )
    offline = scored("precomputed", [2, 4], [0.7, 0.3], mode="offline", age=3600.0)
    out = blend.merge([online, offline], k=10)
    by_id = {e.target: e for e in out.edges}
    assert set(by_id) == {1, 2, 3, 4}
    assert prov(by_id[2]) == [
        ("fof", 4.0, "online", 0.0),
        ("ebr", 0.8, "online", 0.0),
        ("precomputed", 0.7, "offline", 3600.0),
    ]
    assert prov(by_id[1]) == [("fof", 12.0, "online", 0.0)]
    assert prov(by_id[3]) == [("ebr", 0.6, "online", 0.0)]
    assert prov(by_id[4]) == [("precomputed", 0.3, "offline", 3600.0)]
    assert by_id[2].model_score == pytest.approx(0.5)
    assert by_id[2].HasField("model_score")
    assert not by_id[4].HasField("model_score")  # never scored by a model: absent, not 0
    assert drops(out) == {"duplicate": 1}
    # Item 2 is in both lists: 0.5 (min-max of 0.1..0.9) + 1.0 (top of the offline list).
    assert by_id[2].score == pytest.approx(1.5)
    assert targets(out.edges)[0] == 2


def reference_response(pool: blend.Blended, sel: blend.Selection) -> merging_pb2.MergeResponse:
    """The response built field by field through the protobuf API."""
    out = merging_pb2.MergeResponse(dropped=blend.drop_counts(sel.dropped))
    for i in sel.index.tolist():
        edge = out.edges.add(target=int(pool.ids[i]), score=pool.score[i])
        if not np.isnan(pool.model[i]):  # unscored: model_score absent
            edge.model_score = np.nan_to_num(pool.model[i : i + 1])[0]
        for c in np.flatnonzero(pool.source_list[i] >= 0).tolist():
            li, name = int(pool.source_list[i, c]), pool.sources[c]
            mode, age = pool.infos[li].get(name) or (pool.modes[li], pool.ages[li])
            edge.provenance.add(source=name, score=pool.source_score[i, c], mode=mode,
                                age_seconds=age)  # fmt: skip
    return out


def test_response_wire_bytes_equal_a_field_by_field_response() -> None:
    rng = np.random.default_rng(11)
    extremes = [0, -1, 127, 128, 16383, 16384, -(2**63), 2**63 - 1, 10**15]
    ids = np.concatenate([extremes, rng.integers(-(2**40), 2**40, 300)]).astype(np.int64)
    long_name = "é" * 80  # a name over 127 bytes: two-byte lengths
    cols = ("score", "source:fof", f"source:{long_name}", "model")
    mat = rng.normal(size=(ids.size, 4)).astype(np.float32)
    mat[rng.random(ids.size) < 0.4, 1] = NAN
    mat[rng.random(ids.size) < 0.4, 2] = NAN
    mat[:5, 3] = [NAN, np.inf, -np.inf, -0.0, 0.0]
    online = scored("ranked", ids, mat, columns=cols, model_column=3)
    online = ScoredList(**{**online.__dict__, "source_info": {"fof": ("nearline", 2.5)}})
    offline = scored("precomputed", ids[::3], rng.random(ids[::3].size), mode="offline", age=9.0)
    pool = blend.blend([online, offline])
    for k, quotas in ((1000, {}), (40, {"fof": 10}), (1, {})):
        sel = blend.select(pool, k, quotas)
        got, want = blend.response(pool, sel), reference_response(pool, sel)
        assert got == want
        assert got.SerializeToString(deterministic=True) == want.SerializeToString(
            deterministic=True
        )
    assert blend.response(pool, blend.select(pool, 5, keep=np.zeros(pool.ids.size, bool))) == (
        merging_pb2.MergeResponse(dropped=[merging_pb2.DropCount(reason="duplicate", count=103)])
    )


def test_rows_without_a_source_are_credited_to_the_list() -> None:
    lst = scored("ranked", [5, 6], [[1.0, 3.0], [0.5, NAN]], columns=("score", "source:fof"))
    out = blend.merge([lst], k=2)
    assert [prov(e) for e in out.edges] == [
        [("fof", 3.0, "online", 0.0)],
        [("ranked", 0.5, "online", 0.0)],
    ]


def test_repeated_id_in_one_list_keeps_its_best_row() -> None:
    out = blend.merge([scored("a", [7, 8, 7], [0.2, 1.0, 0.6])], k=5)
    assert targets(out.edges) == [8, 7]
    assert out.edges[1].score == pytest.approx(0.5)  # (0.6 - 0.2) / (1.0 - 0.2)
    assert prov(out.edges[1]) == [("a", 0.6, "online", 0.0)]
    assert drops(out) == {"duplicate": 1}


def test_quota_counts_each_item_against_its_primary_source() -> None:
    cols = ("score", "source:fof", "source:ebr")
    rows = [
        [0.9, 5, NAN],  # 10: fof
        [0.8, 4, 0.7],  # 11: fof (first column), also ebr
        [0.7, 3, NAN],  # 12: fof
        [0.6, NAN, 0.5],  # 13: ebr
        [0.5, 2, NAN],  # 14: fof
        [0.4, NAN, 0.3],  # 15: ebr
    ]
    lst = scored("ranked", [10, 11, 12, 13, 14, 15], rows, columns=cols)
    out = blend.merge([lst], k=4, quotas={"fof": 2, "nobody": 0})
    assert targets(out.edges) == [10, 11, 13, 15]
    assert drops(out) == {"quota": 2}
    zero = blend.merge([lst], k=6, quotas={"ebr": 0})
    assert targets(zero.edges) == [10, 11, 12, 14]  # 11 counts against fof, so it stays


def test_explain_lists_duplicates_and_quota_drops_by_source() -> None:
    cols = ("score", "source:fof", "source:ebr")
    rows = [[0.9, 5, NAN], [0.8, 4, NAN], [0.7, NAN, 0.5], [0.6, NAN, 0.4], [0.5, 3, NAN]]
    lists = [scored("ranked", [10, 11, 12, 13, 14], rows, columns=cols),
             scored("pre", [11, 11, 20], [1.0, 0.9, 0.8])]  # fmt: skip
    pool = blend.blend(lists)
    sel = blend.select(pool, k=2, quotas={"fof": 1, "ebr": 1}, explain=True)
    out = blend.response(pool, sel)
    blend.explain(out.dropped_items, lists, pool, [], sel)
    items = [(d.target, d.reason, d.node) for d in out.dropped_items]
    # Ranked 11, 10, 12, 13, 14, 20. 11 came in three rows (two merged into one); fof keeps 11,
    # so 10 and 14 go; ebr keeps 12, so 13 goes; 20 is merely below the top 2, so not listed.
    assert items == [
        (11, "duplicate", ""), (11, "duplicate", ""),
        (10, "quota:fof", ""), (14, "quota:fof", ""), (13, "quota:ebr", ""),
    ]  # fmt: skip
    assert drops(out) == {"duplicate": 2, "quota": 3, "top_k": 1}
    assert blend.select(pool, k=2, quotas={"fof": 1}).over_quota == ()  # not without explain


def test_top_k_ties_break_by_lower_id() -> None:
    out = blend.merge([scored("a", [9, 3, 5, 1], [0.5, 0.5, 1.0, 0.0])], k=3)
    assert targets(out.edges) == [5, 3, 9]
    assert drops(out) == {"top_k": 1}


def test_nan_scores_rank_last() -> None:
    out = blend.merge([scored("a", [1, 2, 3], [NAN, 0.3, 0.1])], k=3)
    assert targets(out.edges) == [2, 1, 3]  # NaN counts as the list minimum, tie -> id
    assert [p.source for p in out.edges[1].provenance] == ["a"]  # still credited to its list
    assert targets(blend.merge([scored("a", [1, 2], [NAN, 0.3])], k=2, quotas={"a": 1}).edges) == [
        2
    ]


def test_empty_inputs() -> None:
    assert not blend.merge([], k=10).edges
    no_columns = ScoredList("b", np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
    out = blend.merge([scored("a", [], []), no_columns], k=5)
    assert not out.edges and drops(out) == {}


def test_filters_mask_runs_before_top_k() -> None:
    pool = blend.blend([scored("a", [1, 2, 3, 4], [4.0, 3.0, 2.0, 1.0])])
    keep = np.array([False, True, False, True])
    sel = blend.select(pool, k=1, keep=keep, dropped={"connected": 2})
    assert pool.ids[sel.index].tolist() == [2]
    assert sel.dropped == {"connected": 2, "top_k": 1}


@pytest.mark.parametrize(
    ("lst", "message"),
    [
        (ScoredList("a", np.arange(3), np.zeros((2, 1), np.float32)), "3 ids but scores has 2"),
        (scored("a", [1], [1.0], weight=-1), "weight must be"),
        (scored("a", [1], [1.0], weight=NAN), "weight must be"),
        (scored("a", [1], [1.0], model_column=1), "model_column 1"),
        (scored("a", [1], [[1.0, 2, 3]], columns=("s", "source:x", "source:x")), "'x' has two"),
        (scored("a", [1], [[1.0, 2]], columns=("s", "source:")), "empty source name"),
        (ScoredList("a", np.arange(1), np.zeros((1, 0), np.float32)), "no columns"),
    ],
)
def test_bad_lists_are_named(lst: ScoredList, message: str) -> None:
    good = scored("ok", [1], [1.0])
    with pytest.raises(BlendError, match=r"lists\[1\] \('a'\)") as err:
        blend.blend([good, lst])
    assert message in str(err.value)


def test_bad_k_and_quota() -> None:
    pool = blend.blend([scored("a", [1], [1.0])])
    for k in (0, 1001):
        with pytest.raises(BlendError, match=f"k must be in 1..1000, got {k}"):
            blend.select(pool, k)
    with pytest.raises(BlendError, match="quotas"):
        blend.select(pool, 1, quotas={"": 1})


# --- filters against a real Redis ---------------------------------------------------------


def write_sets(client: redis.Redis, member: int) -> None:
    client.sadd(keys.adjacency(member), 1, 2, 3)
    client.sadd(keys.blocked(member), 3, 4)
    client.sadd(keys.dismissed(member), 5)
    client.sadd(keys.adjacency(member + 1), 6)  # another member's set must not matter


async def test_filters_against_real_redis(
    redis_client: redis.Redis, redis_proc: RedisProcess
) -> None:
    write_sets(redis_client, 7)
    client = RawPipeline(redis_proc.url)
    try:
        ids = np.array([1, 7, 3, 4, 5, 6, 8], dtype=np.int64)
        names = filters.check(["self", "connected", "blocked", "dismissed"])
        keep, dropped = await filters.visible(client, 7, ids, names)
        assert ids[keep].tolist() == [6, 8]
        # 3 is connected and blocked: counted once, under the first filter asked for.
        assert dropped == {"self": 1, "connected": 2, "blocked": 1, "dismissed": 1}
        keep, dropped = await filters.visible(client, 7, ids, ("blocked", "connected"))
        assert ids[keep].tolist() == [7, 5, 6, 8]
        assert dropped == {"blocked": 2, "connected": 1}
        keep, dropped = await filters.visible(client, 99, ids, names)  # no sets at all
        assert keep.all() and dropped == {}
        why: list[tuple[str, np.ndarray]] = []
        await filters.visible(client, 7, ids, names, why)
        assert [(name, ids[rows].tolist()) for name, rows in why] == [
            ("self", [7]), ("connected", [1, 3]), ("blocked", [4]), ("dismissed", [5]),
        ]  # fmt: skip
    finally:
        await client.close()


async def test_filters_match_set_membership_on_many_ids(
    redis_client: redis.Redis, redis_proc: RedisProcess
) -> None:
    # Enough ids that the replies arrive over several reads, with a repeat and a negative id.
    rng = np.random.default_rng(3)
    ids = np.concatenate([rng.integers(-50, 40_000, 30_000), [12, 12, -7]]).astype(np.int64)
    hidden = {name: set(rng.choice(ids, 2_000).tolist()) for name in ("connected", "blocked")}
    redis_client.sadd(keys.adjacency(7), *hidden["connected"])
    redis_client.sadd(keys.blocked(7), *hidden["blocked"], -7)
    client = RawPipeline(redis_proc.url)
    try:
        masks = await filters.smismember(client, [keys.adjacency(7), keys.blocked(7)], ids)
    finally:
        await client.close()
    assert masks[0].tolist() == [i in hidden["connected"] for i in ids.tolist()]
    assert masks[1].tolist() == [i in hidden["blocked"] or i == -7 for i in ids.tolist()]


def test_smismember_reply_shape_accepts_only_flags() -> None:
    shape = filters._reply_shape(3)
    usual = np.frombuffer(b"*3\r\n:0\r\n:1\r\n:1\r\n" * 2, dtype=np.uint8)
    assert shape.matches(usual) and shape.matches(usual[:23]) and shape.matches(usual, 1)
    for bad in (b"*3\r\n:2\r\n", b"*3\r\n;0\r\n", b"-ERR x\r\n"):
        assert not shape.matches(np.frombuffer(bad, dtype=np.uint8))


def test_unknown_filter_is_named() -> None:
    with pytest.raises(FilterError, match=r"filters\[1\]: unknown filter 'muted'"):
        filters.check(["self", "muted"])
    assert filters.check(["self", "blocked", "self"]) == ("self", "blocked")


def test_bulk_strings_match_resp_encoding() -> None:
    rng = np.random.default_rng(5)
    edge = [0, 1, 9, 10, -1, -10, 4038, 10**18, np.iinfo(np.int64).min, np.iinfo(np.int64).max]
    for ids in (
        np.array(edge, dtype=np.int64),
        rng.integers(0, 4039, 1000),
        rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 1000, dtype=np.int64),
        np.array([7], dtype=np.int64),
    ):
        expected = "".join(f"${len(s)}\r\n{s}\r\n" for s in map(str, ids.tolist())).encode()
        assert filters.bulk_strings(ids) == expected
    assert filters.bulk_strings(np.zeros(0, np.int64)) == b""


def test_bulk_strings_take_a_command_head_and_a_key_prefix() -> None:
    ids = np.array([0, 7, 12345678901, -3], dtype=np.int64)
    head, prefix = b"*2\r\n$6\r\nEXISTS\r\n", b"ef:deactivated:"
    expected = b"".join(
        head + f"${len(prefix) + len(str(i))}\r\n".encode() + prefix + str(i).encode() + b"\r\n"
        for i in ids.tolist()
    )
    assert filters.bulk_strings(ids, head=head, prefix=prefix) == expected


def test_every_served_list_keeps_the_safety_filters() -> None:
    assert filters.served(["dismissed"]) == [
        "dismissed", "self", "connected", "blocked", "deactivated",
    ]  # fmt: skip
    assert filters.served(["blocked", "self", "connected", "dismissed"]) == [
        "blocked", "self", "connected", "dismissed", "deactivated",
    ]  # fmt: skip


async def test_deactivated_filter_reads_each_candidates_own_key(
    redis_client: redis.Redis, redis_proc: RedisProcess
) -> None:
    redis_client.set(keys.deactivated(3), "1700000000.0")
    redis_client.set(keys.deactivated(10**12), "1700000000.0")
    redis_client.sadd(keys.adjacency(7), 3)
    client = RawPipeline(redis_proc.url)
    try:
        ids = np.array([1, 3, 5, 10**12, 6], dtype=np.int64)
        keep, dropped = await filters.visible(client, 7, ids, ("deactivated",))
        assert ids[keep].tolist() == [1, 5, 6] and dropped == {"deactivated": 2}
        # 3 is also connected: counted under the first filter asked for.
        keep, dropped = await filters.visible(client, 7, ids, ("connected", "deactivated"))
        assert ids[keep].tolist() == [1, 5, 6]
        assert dropped == {"connected": 1, "deactivated": 1}
        assert (await filters.deactivated(client, np.zeros(0, np.int64))).size == 0
        # Repeated ids (social proof's connections) are asked once and answered for each.
        repeated = np.array([3, 1, 3, 10**12, 1, 3], dtype=np.int64)
        redis_client.config_resetstat()
        gone = await filters.deactivated(client, repeated)
        assert gone.tolist() == [True, False, True, True, False, True]
        stats = redis_client.info("commandstats")["cmdstat_exists"]
        assert stats["calls"] == 3
    finally:
        await client.close()


async def test_followed_hides_whom_the_member_follows_as_the_batch_runner_does(
    redis_client: redis.Redis, redis_proc: RedisProcess
) -> None:
    from edgeflow.offline.ranking import hidden

    redis_client.sadd(keys.adjacency(7), 3)
    redis_client.sadd(keys.follows(7), 5, 6)
    redis_client.sadd(keys.follows(8), 1)
    client = RawPipeline(redis_proc.url)
    try:
        ids = np.array([1, 3, 5, 6, 9], dtype=np.int64)
        keep, dropped = await filters.visible(client, 7, ids, ("connected", "followed"))
        assert ids[keep].tolist() == [1, 9] and dropped == {"connected": 1, "followed": 2}
        keep, dropped = await filters.visible(client, 7, ids, ("connected",))
        assert ids[keep].tolist() == [1, 5, 6, 9]  # following is not being connected
    finally:
        await client.close()
    # The batch runner hides the same pairs, and whom a member follows only under `followed`.
    members = np.array([1, 3, 5, 6, 7, 8, 9])
    graph = Graph.from_edges(np.array([7]), np.array([3]), members=members)
    sync = redis.Redis(port=redis_proc.port)
    owner, hid = hidden(sync, graph, np.array([7, 8]), ["connected", "followed"])
    pairs = sorted(zip(owner.tolist(), hid.tolist(), strict=True))
    assert pairs == [(0, 3), (0, 5), (0, 6), (1, 1)]
    owner, hid = hidden(sync, graph, np.array([7, 8]), ["connected"])
    assert list(zip(owner.tolist(), hid.tolist(), strict=True)) == [(0, 3)]


async def test_self_filter_needs_no_redis() -> None:
    client = RawPipeline(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        keep, dropped = await filters.visible(client, 2, np.array([1, 2, 3]), ("self",))
        assert keep.tolist() == [True, False, True] and dropped == {"self": 1}
    finally:
        await client.close()


# --- the service over real gRPC -----------------------------------------------------------


def wire(
    name: str,
    ids: Sequence[int],
    rows: Sequence[Sequence[float]] | Sequence[float],
    columns: Sequence[str] = ("score",),
    **kw: object,
) -> merging_pb2.ScoredList:
    mat = np.asarray(rows, dtype=np.float32).reshape(len(ids), len(columns))
    return merging_pb2.ScoredList(
        name=name,
        ids=list(ids),
        scores=tensor.pack(mat, columns),
        **kw,  # type: ignore[arg-type]
    )


class Running:
    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self.server = server
        self.channel = channel(f"127.0.0.1:{port}")
        self.stub = merging_pb2_grpc.MergingServiceStub(self.channel)


async def run_service(redis_url: str) -> tuple[MergingService, Running]:
    service = create(Config(redis_url=redis_url))
    assert isinstance(service, MergingService)
    server, port, _ = await start_server(service, "127.0.0.1:0")
    return service, Running(server, port)


async def shut(service: MergingService, running: Running) -> None:
    await running.channel.close()
    await running.server.stop(None)
    await service.stop()


@pytest.fixture
async def merging(redis_proc: RedisProcess) -> AsyncIterator[Running]:
    service, running = await run_service(redis_proc.url)
    yield running
    await shut(service, running)


async def test_merge_rpc(merging: Running, redis_client: redis.Redis) -> None:
    write_sets(redis_client, 7)
    cols = ("score", "source:fof", "source:ebr", "model")
    ranked = wire(
        "ranked",
        [1, 7, 6, 8, 9, 10],
        [[0.9, 9, NAN, 0.9], [0.8, 8, NAN, 0.8], [0.7, 7, 0.4, 0.7],
         [0.6, NAN, 0.3, 0.6], [0.5, 5, NAN, 0.5], [0.4, 4, NAN, 0.4]],
        cols, weight=1.0, mode="online", model_column=3,
    )  # fmt: skip
    pre = wire("precomputed", [5, 8], [1.0, 0.5], weight=0.5, mode="offline", age_seconds=60.0)
    request = merging_pb2.MergeRequest(
        member=7,
        lists=[ranked, pre],
        k=3,
        filters=["self", "connected", "blocked", "dismissed"],
        quotas=[merging_pb2.Quota(source="fof", max=2)],
    )
    response = await merging.stub.Merge(request, timeout=5)
    # 1 connected, 7 self, 5 dismissed; fof allows 6 and 9, so 10 goes; 8 has ebr first.
    assert targets(response.edges) == [6, 8, 9]
    assert drops(response) == {
        "duplicate": 1, "self": 1, "connected": 1, "dismissed": 1, "quota": 1,
    }  # fmt: skip
    eight = response.edges[1]
    assert prov(eight) == [("ebr", 0.3, "online", 0.0), ("precomputed", 0.5, "offline", 60.0)]
    assert eight.model_score == pytest.approx(0.6)
    assert [e.score for e in response.edges] == sorted(
        (e.score for e in response.edges), reverse=True
    )


async def test_merge_and_filter_rpcs_explain_every_drop(
    merging: Running, redis_client: redis.Redis
) -> None:
    write_sets(redis_client, 7)
    cols = ("score", "source:fof", "source:ebr")
    ranked = wire(
        "ranked", [1, 7, 6, 8, 9, 10, 11],
        [[0.9, 9, NAN], [0.8, 8, NAN], [0.7, 7, 0.4], [0.6, NAN, 0.3], [0.5, 5, NAN],
         [0.4, 4, NAN], [0.3, 3, NAN]],
        cols,
    )  # fmt: skip
    pre = wire("precomputed", [5, 8, 4], [1.0, 0.5, 0.2], weight=0.5, mode="offline")
    request = merging_pb2.MergeRequest(
        member=7, lists=[ranked, pre], k=2, quotas=[merging_pb2.Quota(source="fof", max=1)],
        filters=["self", "connected", "blocked", "dismissed"], explain=True,
    )  # fmt: skip
    response = await merging.stub.Merge(request, timeout=5)
    assert targets(response.edges) == [8, 6]
    items = [(d.target, d.reason) for d in response.dropped_items]
    # 8 is in both lists; 6 takes fof's one place (8 counts against ebr), so 9, 10 and 11 go;
    # nothing is left below the top 2.
    assert items == [
        (8, "duplicate"), (7, "self"), (1, "connected"), (4, "blocked"), (5, "dismissed"),
        (9, "quota:fof"), (10, "quota:fof"), (11, "quota:fof"),
    ]  # fmt: skip
    assert all(d.node == "" for d in response.dropped_items)  # the gateway names the node
    assert drops(response) == {
        "duplicate": 1, "self": 1, "connected": 1, "blocked": 1, "dismissed": 1, "quota": 3,
    }  # fmt: skip
    request.explain = False
    plain = await merging.stub.Merge(request, timeout=5)
    assert not plain.dropped_items and list(plain.edges) == list(response.edges)

    filtered = await merging.stub.Filter(
        merging_pb2.FilterRequest(member=7, ids=[8, 3, 7, 5], filters=["blocked", "dismissed"],
                                  explain=True),
        timeout=5,
    )  # fmt: skip
    assert list(filtered.keep) == [0, 2]
    assert [(d.target, d.reason) for d in filtered.dropped_items] == [
        (3, "blocked"), (5, "dismissed"),
    ]  # fmt: skip


async def test_filter_rpc_keeps_order(merging: Running, redis_client: redis.Redis) -> None:
    write_sets(redis_client, 7)
    request = merging_pb2.FilterRequest(
        member=7, ids=[8, 3, 7, 6, 2, 9], filters=["connected", "self"]
    )
    response = await merging.stub.Filter(request, timeout=5)
    assert list(response.keep) == [0, 3, 5]
    assert drops(response) == {"connected": 2, "self": 1}
    empty = await merging.stub.Filter(merging_pb2.FilterRequest(member=7, ids=[1, 2]), timeout=5)
    assert list(empty.keep) == [0, 1] and not empty.dropped


async def test_merge_drops_deactivated_members_and_fills_the_top_k(
    merging: Running, redis_client: redis.Redis
) -> None:
    ranked = wire("ranked", [11, 12, 13, 14, 15, 16], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    for gone in (11, 13, 14):
        redis_client.set(keys.deactivated(gone), "1700000000.0")
    request = merging_pb2.MergeRequest(
        member=7, lists=[ranked], k=3, filters=["self", "deactivated"], explain=True
    )
    response = await merging.stub.Merge(request, timeout=5)
    # The first top 3 held 11 and 13, the next 14: each place went to the next member.
    assert targets(response.edges) == [12, 15, 16]
    assert drops(response)["deactivated"] == 3
    assert [(d.target, d.reason) for d in response.dropped_items] == [
        (11, "deactivated"), (13, "deactivated"), (14, "deactivated"),
    ]  # fmt: skip
    # Not asked for, nothing is read: Merge keeps them.
    del request.filters[:]
    assert targets((await merging.stub.Merge(request, timeout=5)).edges) == [11, 12, 13]
    redis_client.delete(keys.deactivated(13))  # reactivated
    request.filters.append("deactivated")
    assert targets((await merging.stub.Merge(request, timeout=5)).edges) == [12, 13, 15]


def test_social_proof_wire_bytes_equal_a_field_by_field_message() -> None:
    for count, ids in ((0, []), (12, [4, 9, 31]), (1, [2**40]), (3, [-1])):
        edge = tensor_pb2.Edge.FromString(edge_wire.social_proof(count, ids))
        expected = tensor_pb2.Edge(social_proof=tensor_pb2.SocialProof(
            mutual_count=count, mutual_ids=ids))  # fmt: skip
        assert edge == expected and edge.HasField("social_proof")


async def merge_once_mapped(
    running: Running, request: merging_pb2.MergeRequest
) -> merging_pb2.MergeResponse:
    """Merge's answer once its graph is mapped (in the background, after start), known by
    the first edge's social proof."""
    for _ in range(200):
        response = await running.stub.Merge(request, timeout=5)
        if response.edges[0].HasField("social_proof"):
            break
        await asyncio.sleep(0.05)
    return response


async def test_merge_names_the_mutual_connections_of_each_edge(
    redis_proc: RedisProcess, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # 7 knows 1..5; 20 shares all five, 21 shares 5, 22 none; 1 is deactivated.
    pairs = [(7, m) for m in range(1, 6)] + [(20, m) for m in range(1, 6)] + [(21, 5), (22, 30)]
    edges = np.array(pairs, dtype=np.int64)
    save_graph(redis_client, Graph.from_edges(edges[:, 0], edges[:, 1]))
    redis_client.set(keys.deactivated(1), "1700000000.0")
    service = MergingService(Config(redis_url=redis_proc.url, home=tmp_path))
    server, port, _ = await start_server(service, "127.0.0.1:0")
    running = Running(server, port)
    try:
        request = merging_pb2.MergeRequest(
            member=7, lists=[wire("fof", [20, 21, 22, 99], [0.9, 0.8, 0.7, 0.6])], k=4,
            filters=["self", "deactivated"],
        )  # fmt: skip
        response = await merge_once_mapped(running, request)
        proofs = {e.target: (e.social_proof.mutual_count, list(e.social_proof.mutual_ids))
                  for e in response.edges}  # fmt: skip
        # The count is the graph's; the ones named skip the deactivated member.
        assert proofs == {20: (5, [2, 3, 4]), 21: (1, [5]), 22: (0, []), 99: (0, [])}
        assert all(e.HasField("social_proof") for e in response.edges)
        del request.filters[:]  # without the deactivated filter nothing is looked up
        response = await running.stub.Merge(request, timeout=5)
        assert list(response.edges[0].social_proof.mutual_ids) == [1, 2, 3]
    finally:
        await shut(service, running)


async def test_items_past_the_first_read_are_asked_about_and_named_too(
    redis_proc: RedisProcess, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # Merge reads the per-item state of its likely top K beside the member's SETs. Here that
    # guess is all wrong: 30..37 are deactivated and 38 blocked, so the served 39 and 40 are
    # asked about in later rounds, and 40's mutual connections (1 deactivated) read then.
    pairs = [(7, m) for m in range(1, 6)] + [(40, m) for m in range(1, 5)] + [(39, 50)]
    edges = np.array(pairs, dtype=np.int64)
    save_graph(redis_client, Graph.from_edges(edges[:, 0], edges[:, 1]))
    for gone in (1, *range(30, 38)):
        redis_client.set(keys.deactivated(gone), "1700000000.0")
    redis_client.sadd(keys.blocked(7), 38)
    service = MergingService(Config(redis_url=redis_proc.url, home=tmp_path))
    server, port, _ = await start_server(service, "127.0.0.1:0")
    running = Running(server, port)
    try:
        ids = list(range(30, 42))
        request = merging_pb2.MergeRequest(
            member=7, lists=[wire("fof", ids, [1.0 - i / 100 for i in range(len(ids))])], k=2,
            filters=["self", "blocked", "deactivated"], explain=True,
        )  # fmt: skip
        response = await merge_once_mapped(running, request)
        assert targets(response.edges) == [39, 40]
        assert drops(response) == {"deactivated": 8, "blocked": 1, "top_k": 1}
        proofs = [(e.social_proof.mutual_count, list(e.social_proof.mutual_ids))
                  for e in response.edges]  # fmt: skip
        assert proofs == [(0, []), (4, [2, 3, 4])]
    finally:
        await shut(service, running)


async def test_wrong_redis_type_is_failed_precondition(
    merging: Running, redis_client: redis.Redis
) -> None:
    redis_client.set(keys.blocked(7), "not a set")
    redis_client.sadd(keys.adjacency(7), 1)
    request = merging_pb2.FilterRequest(member=7, ids=[1, 2], filters=["connected", "blocked"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await merging.stub.Filter(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "WRONGTYPE" in (err.value.details() or "")
    redis_client.delete(keys.blocked(7))  # the next call gets a clean connection and answer
    assert list((await merging.stub.Filter(request, timeout=5)).keep) == [1]


async def test_health_is_serving(merging: Running) -> None:
    health = health_pb2_grpc.HealthStub(merging.channel)
    reply = await health.Check(
        health_pb2.HealthCheckRequest(service="edgeflow.v1.MergingService"), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _bad_tensor() -> merging_pb2.ScoredList:
    lst = wire("fof", [1, 2], [1.0, 0.5])
    lst.scores.data = lst.scores.data[:4]
    return lst


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (merging_pb2.MergeRequest(k=0), "k must be in 1..1000, got 0"),
        (merging_pb2.MergeRequest(k=1001), "k must be in 1..1000, got 1001"),
        (
            merging_pb2.MergeRequest(k=5, lists=[wire("fof", [1, 2], [1.0, 0.5])], filters=["x"]),
            "filters[0]: unknown filter 'x'",
        ),
        (
            merging_pb2.MergeRequest(k=5, lists=[merging_pb2.ScoredList(name="fof", ids=[1, 2])]),
            "lists[0] ('fof'): 2 ids but scores has 0 rows",
        ),
        (merging_pb2.MergeRequest(k=5, lists=[_bad_tensor()]), "lists[0] ('fof').scores: tensor"),
        (
            merging_pb2.MergeRequest(k=5, lists=[wire("fof", [1], [1.0], weight=-0.5)]),
            "lists[0] ('fof'): weight must be a finite number >= 0, got -0.5",
        ),
        (
            merging_pb2.MergeRequest(k=5, lists=[wire("fof", [1], [1.0], age_seconds=-1.0)]),
            "lists[0] ('fof').age_seconds must be a finite number >= 0, got -1.0",
        ),
        (
            merging_pb2.MergeRequest(k=5, lists=[wire("", [1], [1.0])]),
            "lists[0].name is empty",
        ),
        (
            merging_pb2.MergeRequest(k=5, quotas=[merging_pb2.Quota(source="a", max=1)] * 2),
            "quotas[1]: source 'a' already has a quota",
        ),
    ],
)
async def test_merge_invalid_argument(
    merging: Running, request_: merging_pb2.MergeRequest, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await merging.stub.Merge(request_, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")


async def test_filter_invalid_argument(merging: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await merging.stub.Filter(
            merging_pb2.FilterRequest(member=1, ids=[2], filters=["blocked", "spam"]), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filters[1]: unknown filter 'spam'" in (err.value.details() or "")


async def test_redis_stopped_mid_test_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(merging_service, "REDIS_BUDGET_S", 0.2)
    proc = start_redis(tmp_path / "redis")
    service, running = await run_service(proc.url)
    stopped = False
    try:
        with redis.Redis.from_url(proc.url) as direct:
            direct.sadd(keys.adjacency(1), 2)
        request = merging_pb2.MergeRequest(
            member=1, lists=[wire("fof", [2, 3], [2.0, 1.0])], k=5, filters=["self", "connected"]
        )
        assert targets((await running.stub.Merge(request, timeout=5)).edges) == [3]

        # A Redis that hangs: the filters give up within their budget, then recover.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await running.stub.Merge(request, timeout=5)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no reply within 0.20s" in (err.value.details() or "")
        assert targets((await running.stub.Merge(request, timeout=5)).edges) == [3]

        # A Redis that is gone.
        proc.stop()
        stopped = True
        blocked = merging_pb2.FilterRequest(member=1, ids=[2], filters=["blocked"])
        for call, req in ((running.stub.Merge, request), (running.stub.Filter, blocked)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(req, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"redis at 127.0.0.1:{proc.port} unavailable" in (err.value.details() or "")
        # Without a Redis-backed filter, merging still serves.
        del request.filters[:]
        request.filters.append("self")
        assert targets((await running.stub.Merge(request, timeout=5)).edges) == [2, 3]
    finally:
        if not stopped:
            proc.stop()
        await shut(service, running)


async def test_a_redis_still_loading_is_unavailable_not_failed_precondition(
    tmp_path: Path,
) -> None:
    from loading_redis import is_loading, loading_redis

    with loading_redis(tmp_path, keys=3000, delay_us=200_000) as proc:
        service, running = await run_service(proc.url)
        try:
            request = merging_pb2.MergeRequest(
                member=1, lists=[wire("fof", [2, 3], [2.0, 1.0])], k=5, filters=["connected"]
            )
            blocked = merging_pb2.FilterRequest(member=1, ids=[2], filters=["blocked"])
            for call, req in ((running.stub.Merge, request), (running.stub.Filter, blocked)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(req, timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
                assert "still loading its data set (LOADING)" in (err.value.details() or "")
            assert is_loading(proc.port)
        finally:
            await shut(service, running)


def _largest_merge() -> merging_pb2.MergeRequest:
    """The largest Merge a valid workflow sends: 16 inputs of 5,000 candidates, each with the
    list's score and 16 source columns, member ids of 10 bytes on the wire."""
    from edgeflow.shell import guard

    n, sources = guard.MAX_CANDIDATES, guard.MAX_NODE_INPUTS
    req = merging_pb2.MergeRequest(member=1, k=1000)
    names = [f"source-{j:02d}-{'x' * 52}" for j in range(sources)]  # 63-character node names
    for i in range(guard.MAX_NODE_INPUTS):
        lst = req.lists.add(name=names[i], weight=1.0, mode="online", age_seconds=1.0)
        lst.ids.extend(range(2**62 + i * n, 2**62 + (i + 1) * n))
        mat = np.random.default_rng(i).random((n, 1 + sources), dtype=np.float32)
        lst.scores.CopyFrom(tensor.pack(mat, ["score", *(f"source:{s}" for s in names)]))
        for s in names:
            lst.sources.add(name=s, mode="offline", age_seconds=3600.0)
    return req


async def test_the_largest_legitimate_merge_fits_and_a_larger_one_is_refused(
    merging: Running,
) -> None:
    from edgeflow.shell.guard import limits_for

    largest = _largest_merge()
    limit = limits_for("merging").max_receive_bytes
    assert largest.ByteSize() <= limit < 64 * 1024 * 1024
    resp = await merging.stub.Merge(largest, timeout=60)
    assert len(resp.edges) == 1000
    largest.lists.append(largest.lists[0])
    largest.lists.append(largest.lists[1])
    assert largest.ByteSize() > limit
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await merging.stub.Merge(largest, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(err.value.details() or "") < 200
