"""Impressions: members shown repeatedly without an action are demoted, then suppressed, until
their count lapses; an action on the pair resets it (merging/impressions.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from inprocess import Suite, members_with_degree

from edgeflow.config import REPO_ROOT
from edgeflow.merging import impressions
from edgeflow.shell.server import channel
from edgeflow.stores import keys, lists
from edgeflow.stores.redis_client import SyncClient, connect
from edgeflow.v1 import gateway_pb2, merging_pb2, merging_pb2_grpc, tensor_pb2
from edgeflow.workflow.modes import precomputed_view
from edgeflow.workflow.validate import WorkflowError, parse_document

Event = gateway_pb2.MemberEvent
PYMK = REPO_ROOT / "workflows" / "pymk.yaml"
DAY_S = 86400


def _counts(client: SyncClient, member: int) -> dict[int, int]:
    raw: dict[bytes, bytes] = client.hgetall(keys.impressions(member))  # type: ignore[assignment]
    return {int(t): int(v.split(b":")[0]) for t, v in raw.items()}


async def _exposed(client: SyncClient, member: int, expected: dict[int, int]) -> None:
    """Wait until the gateway's write of the last exposure has landed (it is asynchronous)."""
    for _ in range(400):
        if _counts(client, member) == expected:
            return
        await asyncio.sleep(0.025)
    assert _counts(client, member) == expected


# ---- params -----------------------------------------------------------------------------------
def test_pymk_has_impressions_on_by_default() -> None:
    doc = yaml.safe_load(PYMK.read_text())
    wf = parse_document(doc, "pymk.yaml")
    rule = impressions.Rule.of(wf.node("blend").params.impressions)  # type: ignore[attr-defined]
    assert rule == impressions.Rule(3, 6, 14 * DAY_S, 0.5)


def test_a_surface_served_from_its_list_keeps_its_impressions() -> None:
    doc = yaml.safe_load(PYMK.read_text())
    doc["spec"]["modes"]["online"] = {"enabled": False}
    view = precomputed_view(parse_document(doc, "pymk.yaml"))
    params = view.node("blend").params
    assert impressions.Rule.of(params.impressions) == impressions.Rule(3, 6, 14 * DAY_S, 0.5)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (
            {"demoteAfter": 6, "suppressAfter": 6},
            "suppressAfter (6) must be greater than demoteAfter",
        ),
        ({"demoteFactor": 1.5}, "field params.impressions.demoteFactor:"),
        ({"forDays": 0}, "field params.impressions.forDays:"),
        ({"demoteAfter": 0}, "field params.impressions.demoteAfter:"),
        ({"suppressAfterr": 4}, "field params.impressions.suppressAfterr: unknown field"),
    ],
)
def test_bad_impressions_params_name_the_field(params: dict[str, Any], field: str) -> None:
    doc = yaml.safe_load(PYMK.read_text())
    blend = next(n for n in doc["spec"]["nodes"] if n["name"] == "blend")
    blend["params"]["impressions"] = params
    with pytest.raises(WorkflowError) as err:
        parse_document(doc, "wf.yaml")
    assert any(p.startswith("node 'blend' ") and field in p for p in err.value.problems), (
        err.value.problems
    )


def test_counts_lapse_after_their_lifetime() -> None:
    now = 1_000_000.0
    replies = [b"4:%d" % (now - 10), b"7:%d" % (now - 100), None, b"junk"]
    assert impressions.parse(replies, now, 50.0).tolist() == [4, 0, 0, 0]


# ---- through the suite, over gRPC ---------------------------------------------------------------
async def test_merge_refuses_bad_impressions_naming_the_field(suite: Suite) -> None:
    ch = channel(f"127.0.0.1:{suite.servers['merging'][2]}")
    stub = merging_pb2_grpc.MergingServiceStub(ch)
    scores = tensor_pb2.Tensor(rows=1, cols=1, columns=["score"],
                               data=np.ones((1, 1), "<f4").tobytes())  # fmt: skip
    good = impressions.Rule(3, 6, 60.0, 0.5).message()
    bad = {
        "impressions.demote_factor": merging_pb2.Impressions(
            demote_after=3, suppress_after=6, for_seconds=60, demote_factor=2.0),
        "impressions.suppress_after": merging_pb2.Impressions(
            demote_after=3, suppress_after=3, for_seconds=60, demote_factor=0.5),
        "impressions.for_seconds": merging_pb2.Impressions(
            demote_after=3, suppress_after=6, for_seconds=0, demote_factor=0.5),
    }  # fmt: skip
    try:
        for name, msg in bad.items():
            req = merging_pb2.MergeRequest(member=1, k=5, impressions=msg)
            req.lists.add(name="x", ids=[2], scores=scores)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Merge(req, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (err.value.details() or "").startswith(name), err.value.details()
        req = merging_pb2.MergeRequest(member=1, k=5, impressions=good)
        req.lists.add(name="x", ids=[2], scores=scores)
        assert [e.target for e in (await stub.Merge(req, timeout=10)).edges] == [2]
    finally:
        await ch.close()


async def test_repeated_exposures_demote_then_suppress_and_an_action_resets(
    suite: Suite,
) -> None:
    client = connect(suite.cfg.redis_url)
    member = members_with_degree(suite.graph, 6)[3]
    client.delete(keys.impressions(member))
    # The member's precomputed (offline/nearline) entry leads with a stored member, so the
    # list read at serve time is counted and suppressed as the online ones are.
    adjacent = {int(x) for x in client.smembers(keys.adjacency(member))}  # type: ignore[union-attr]
    stored = next(int(t) for t in suite.graph.ids[::-1] if int(t) not in adjacent | {member})
    lists.write_lists(client, "pymk", np.asarray([member]),
                      [(np.asarray([stored]), np.asarray([9.0], np.float32))])  # fmt: skip

    first: dict[int, float] = {}  # each target's undemoted score, from its first showing
    expected: dict[int, int] = {}
    demoted = suppressed = 0
    for _ in range(9):
        before = dict(expected)
        resp = await suite.recommend(member, k=5, debug=True)
        assert resp.edges and not resp.partial
        shown = [e.target for e in resp.edges]
        for e in resp.edges:
            seen = before.get(e.target, 0)
            assert seen < 6, f"{e.target} shown {seen} times is not suppressed"
            first.setdefault(e.target, e.score)
            if seen >= 3:
                assert e.score == pytest.approx(first[e.target] * 0.5, rel=1e-5)
                demoted += 1
            else:
                assert e.score == pytest.approx(first[e.target], rel=1e-5)
        gone = [t for t, n in before.items() if n >= 6]
        suppressed += len(gone)
        if gone:
            assert resp.funnel.dropped["impressions"] >= 1
        for t in shown:  # counts increase per exposure
            expected[t] = expected.get(t, 0) + 1
        await _exposed(client, member, expected)
    assert demoted and suppressed
    assert stored in expected  # the stored list's lead was counted like the online ones
    pttl = int(client.pttl(keys.impressions(member)))  # type: ignore[arg-type]
    assert 0 < pttl <= 14 * DAY_S * 1000  # the key lapses with its counts: memory is bounded

    # An action on the pair (a follow: not a visibility filter) resets its count, and the
    # member is shown again at its undemoted score.
    target = max((t for t, n in expected.items() if n >= 6), key=lambda t: first[t])
    publish = gateway_pb2.PublishRequest(
        events=[Event(type=Event.FOLLOW, member=member, target=target)]
    )
    assert (await suite.stub.Publish(publish, timeout=10)).published == 1
    assert target not in _counts(client, member)
    again = await suite.recommend(member, k=5)
    scores = {e.target: e.score for e in again.edges}
    assert scores.get(target) == pytest.approx(first[target], rel=1e-5)
    # Dismiss, connect and block reset the pair as well.
    others = [t for t in expected if t != target][:3]
    kinds = (Event.DISMISS, Event.CONNECT, Event.BLOCK)
    publish = gateway_pb2.PublishRequest(
        events=[Event(type=k, member=member, target=t) for k, t in zip(kinds, others, strict=True)]
    )
    assert (await suite.stub.Publish(publish, timeout=10)).published == len(others)
    assert not set(others) & set(_counts(client, member))


async def test_a_lapsed_count_restores_the_member(suite: Suite) -> None:
    client = connect(suite.cfg.redis_url)
    member = members_with_degree(suite.graph, 6)[5]
    client.delete(keys.impressions(member))
    first = await suite.recommend(member, k=3)
    await _exposed(client, member, {e.target: 1 for e in first.edges})
    top = first.edges[0]
    # Seen 7 times, the last time 15 days ago (pymk counts for 14): as if time had passed.
    old = int(time.time()) - 15 * DAY_S
    client.hset(keys.impressions(member), str(top.target), f"7:{old}")
    assert top.target in {e.target for e in (await suite.recommend(member, k=3)).edges}
    # The same count, fresh: suppressed.
    client.hset(keys.impressions(member), str(top.target), f"7:{int(time.time())}")
    resp = await suite.recommend(member, k=3, debug=True)
    assert top.target not in {e.target for e in resp.edges}
    assert resp.funnel.dropped["impressions"] >= 1


async def test_the_count_script_bounds_a_members_targets(suite: Suite) -> None:
    client = connect(suite.cfg.redis_url)
    member = 10**9
    now = time.time()
    many = list(range(impressions.MAX_TARGETS + 1))
    payload = impressions.count_command(member, many, now, 60.0)
    reply = client.execute_command(*_decode(payload))
    assert reply == 0
    size = int(client.hlen(keys.impressions(member)))  # type: ignore[arg-type]
    assert size == impressions.MAX_TARGETS // 2
    # The newest are kept (all of one exposure share a time: the order decides nothing, but
    # the count is bounded); a count goes on from where it was.
    kept = _counts(client, member)
    again = impressions.count_command(member, list(kept)[:2], now, 60.0)
    client.execute_command(*_decode(again))
    assert [(_counts(client, member))[t] for t in list(kept)[:2]] == [2, 2]


async def test_the_count_script_counts_a_repeated_target_twice_and_restarts_a_lapsed_one(
    suite: Suite,
) -> None:
    client = connect(suite.cfg.redis_url)
    member = 10**9 + 1
    now = time.time()
    key = keys.impressions(member)
    client.hset(key, mapping={"5": f"9:{int(now) - 120}", "6": f"2:{int(now) - 10}"})
    payload = impressions.count_command(member, [5, 6, 5, 7, 6, 6], now, 60.0)
    assert client.execute_command(*_decode(payload)) == 0
    # 5 lapsed (120 s > 60 s) so starts again; 6 goes on from 2; 7 is new.
    assert _counts(client, member) == {5: 2, 6: 5, 7: 1}
    times = {int(t): int(v.split(b":")[1]) for t, v in client.hgetall(key).items()}  # type: ignore[union-attr]
    assert set(times.values()) == {int(now)}


def _decode(payload: bytes) -> list[bytes]:
    """The arguments of one RESP-encoded command."""
    parts = payload.split(b"\r\n")
    n = int(parts[0][1:])
    out, i = [], 1
    for _ in range(n):
        size = int(parts[i][1:])
        body = b"\r\n".join(parts[i + 1 :])[:size]
        out.append(body)
        i += 2 + body.count(b"\r\n")
    return out
