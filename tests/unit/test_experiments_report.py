"""Exposure-to-outcome joins, the delta-method statistics and `edgeflow experiments report`
and `shadow`, over a real Redis."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
import yaml

from edgeflow.cli.main import main
from edgeflow.config import REPO_ROOT
from edgeflow.experiments import stats
from edgeflow.experiments.join import join, read_stream
from edgeflow.experiments.records import EXPOSURES, SHADOW, Exposure, ShadowComparison
from edgeflow.experiments.report import Report, ReportError, report, spec_control
from edgeflow.experiments.shadow_report import summarize
from edgeflow.local.redis_server import RedisProcess
from edgeflow.nearline import events
from edgeflow.stores import keys

HOUR = 3600.0
T0 = 1_700_000_000.0


def expose(
    client: redis.Redis,
    member: int,
    t: float,
    items: tuple[int, ...],
    assignments: str = "exp=control",
    entry_id: str = "*",
) -> None:
    pairs = tuple(tuple(a.split("=")) for a in assignments.split(",") if a)
    e = Exposure(f"r{member}-{t}", t, member, "pymk", "pymk", pairs, items)
    client.xadd(EXPOSURES, e.encode(), id=entry_id)


def outcome(
    client: redis.Redis, member: int, target: int, kind: str, t: float, entry_id: str = "*"
) -> None:
    """An event with the fields Publish writes."""
    fields = {"id": f"{member}-{target}-{kind}-{t}", "type": kind, "member": str(member),
              "target": str(target), "time": repr(t), "features": "{}"}  # fmt: skip
    client.xadd(keys.EVENTS, fields, id=entry_id)


def row(rep: Report, variant: str) -> Any:
    return next(v for v in rep.variants if v.variant == variant)


# --- the join ---------------------------------------------------------------------------


def test_outcome_before_its_exposure_is_not_counted(redis_client: redis.Redis) -> None:
    expose(redis_client, 1, T0, (10, 11))
    outcome(redis_client, 1, 10, "connect", T0 - 1)
    rep = report(redis_client, "exp")
    assert row(rep, "control").accepted == 0
    assert rep.unattributed_outcomes == 1


def test_outcome_outside_the_window_is_not_counted(redis_client: redis.Redis) -> None:
    expose(redis_client, 1, T0, (10, 11))
    outcome(redis_client, 1, 10, "connect", T0 + HOUR)  # on the edge of the window: counts
    outcome(redis_client, 1, 11, "connect", T0 + HOUR + 1)
    rep = report(redis_client, "exp", window_s=HOUR)
    assert row(rep, "control").accepted == 1
    assert rep.unattributed_outcomes == 1
    assert row(report(redis_client, "exp", window_s=2 * HOUR), "control").accepted == 2


def test_target_not_in_the_items_is_not_counted(redis_client: redis.Redis) -> None:
    expose(redis_client, 1, T0, (10, 11))
    outcome(redis_client, 1, 12, "connect", T0 + 1)
    outcome(redis_client, 2, 10, "connect", T0 + 1)  # another member's exposure
    rep = report(redis_client, "exp")
    assert row(rep, "control").accepted == 0
    assert rep.unattributed_outcomes == 2


def test_the_latest_exposure_before_the_outcome_takes_it(redis_client: redis.Redis) -> None:
    expose(redis_client, 1, T0, (10, 11), "exp=control")
    expose(redis_client, 1, T0 + 10, (10,), "exp=v2")
    expose(redis_client, 1, T0 + 20, (11,), "exp=v3")  # later, but without the target
    expose(redis_client, 1, T0 + 40, (10,), "exp=v4")  # after the outcome
    outcome(redis_client, 1, 10, "connect", T0 + 30)
    rep = report(redis_client, "exp")
    assert [v.accepted for v in rep.variants] == [0, 1, 0, 0]
    assert [v.variant for v in rep.variants] == ["control", "v2", "v3", "v4"]


def test_latest_exposure_outside_the_experiment_takes_it(redis_client: redis.Redis) -> None:
    expose(redis_client, 1, T0, (10,), "exp=v2")
    expose(redis_client, 1, T0 + 10, (10,), "")  # in no experiment, yet the latest
    outcome(redis_client, 1, 10, "follow", T0 + 20)
    rep = report(redis_client, "exp", control="v2")
    assert row(rep, "v2").accepted == 0
    assert rep.unattributed_outcomes == 0


def test_duplicates_count_once_and_dismiss_separately(redis_client: redis.Redis) -> None:
    expose(redis_client, 1, T0, (10, 11, 12))
    outcome(redis_client, 1, 10, "connect", T0 + 1)
    outcome(redis_client, 1, 10, "connect", T0 + 2)
    outcome(redis_client, 1, 10, "follow", T0 + 3)  # another type: its own outcome
    outcome(redis_client, 1, 11, "dismiss", T0 + 4)
    outcome(redis_client, 1, 11, "dismiss", T0 + 5)
    outcome(redis_client, 1, 12, "block", T0 + 6)  # not an outcome
    c = row(report(redis_client, "exp"), "control")
    assert (c.exposures, c.requests, c.members) == (3, 1, 1)
    assert (c.accepted, c.dismissed) == (2, 1)
    assert c.acceptance_rate == pytest.approx(2 / 3) and c.dismiss_rate == pytest.approx(1 / 3)


def test_a_member_in_two_experiments_counts_in_both(redis_client: redis.Redis) -> None:
    expose(redis_client, 1, T0, (10, 11), "ranker=v2,source=control")
    expose(redis_client, 2, T0, (10, 11), "ranker=control")
    outcome(redis_client, 1, 11, "connect", T0 + 5)
    ranker = report(redis_client, "ranker")
    assert (row(ranker, "v2").accepted, row(ranker, "control").accepted) == (1, 0)
    assert row(report(redis_client, "source"), "control").accepted == 1


def test_events_written_by_publish_join(
    redis_proc: RedisProcess, redis_client: redis.Redis
) -> None:
    expose(redis_client, 1, T0, (10,))

    async def publish() -> None:
        client = aioredis.Redis.from_url(redis_proc.url)
        await events.publish(client, [events.Event("e1", "connect", 1, 10, T0 + 60)])
        await client.aclose()

    asyncio.run(publish())
    assert row(report(redis_client, "exp"), "control").accepted == 1


def test_malformed_entries_are_skipped_and_counted(redis_client: redis.Redis) -> None:
    expose(redis_client, 1, T0, (10,))
    redis_client.xadd(EXPOSURES, {"member": "1"})
    redis_client.xadd(EXPOSURES, {**Exposure("r", T0, 1, "s", "w", (), (1,)).encode(),
                                  "items": "1,x"})  # fmt: skip
    redis_client.xadd(keys.EVENTS, {"type": "connect", "member": "one", "target": "10"})
    redis_client.xadd(keys.EVENTS, {"type": "follow", "member": "1", "target": "10",
                                    "time": "nan"})  # fmt: skip
    outcome(redis_client, 1, 10, "connect", T0 + 1)
    rep = report(redis_client, "exp")
    assert rep.malformed_entries == 4
    assert row(rep, "control").accepted == 1


def test_an_unknown_experiment_names_the_ones_found(redis_client: redis.Redis) -> None:
    expose(redis_client, 1, T0, (10,), "ranker=v1,source=control")
    with pytest.raises(ReportError, match=r"'nope' has no exposures.*ranker, source"):
        report(redis_client, "nope")


def test_since_and_until_bound_the_stream_ids(redis_client: redis.Redis) -> None:
    for i, t in enumerate((T0, T0 + 100, T0 + 200)):
        expose(redis_client, i, t, (10,), entry_id=f"{int(t * 1000)}-0")
        outcome(redis_client, i, 10, "connect", t + 1, entry_id=f"{int((t + 1) * 1000)}-0")
    rep = report(redis_client, "exp", since=T0 + 50, until=T0 + 150)
    c = row(rep, "control")
    assert (c.members, c.accepted, rep.unattributed_outcomes) == (1, 1, 0)
    assert row(report(redis_client, "exp", since=T0 + 50), "control").accepted == 2


def test_the_stream_is_read_in_chunks(redis_client: redis.Redis) -> None:
    for i in range(10):
        expose(redis_client, i, T0 + i, (10,))
    ids = [entry_id for entry_id, _ in read_stream(redis_client, EXPOSURES, chunk=3)]
    assert len(ids) == len(set(ids)) == 10
    assert sum(len(a.members) for a in join(redis_client, "exp").arms.values()) == 10


def test_control_choice(redis_client: redis.Redis, tmp_path: Path) -> None:
    expose(redis_client, 1, T0, (10,), "exp=b")
    expose(redis_client, 2, T0, (10,), "exp=a")
    rep = report(redis_client, "exp")
    assert rep.control == "a" and row(rep, "a").is_control and row(rep, "a").lift == 0
    assert "no variant named 'control'" in rep.warnings[0]
    assert report(redis_client, "exp", control="b").control == "b"
    with pytest.raises(ReportError, match="'c' is not a variant"):
        report(redis_client, "exp", control="c")

    doc = yaml.safe_load((REPO_ROOT / "workflows" / "pymk.yaml").read_text())
    doc["spec"]["experiments"] = [
        {"name": "exp", "control": "b", "variants": [{"name": "a", "weight": 50},
                                                     {"name": "b", "weight": 50}]}
    ]  # fmt: skip
    (tmp_path / "pymk.yaml").write_text(yaml.safe_dump(doc))
    assert spec_control(tmp_path, "exp") == "b"
    assert spec_control(tmp_path, "other") is None


# --- statistics -------------------------------------------------------------------------


def test_delta_method_with_one_exposure_per_member_is_the_sample_variance() -> None:
    y = np.array([0, 1, 0, 0, 1, 1, 0, 0])
    r = stats.ratio(y, np.ones_like(y))
    assert r.value == pytest.approx(3 / 8)
    assert r.variance == pytest.approx(np.var(y, ddof=1) / len(y))


def _arm(rng: np.random.Generator, n: int, p: float) -> tuple[stats.Ratio, stats.Ratio]:
    """Members with 1..40 exposed edges and an acceptance propensity that varies by member:
    the delta-method ratio, and a naive binomial one that treats every edge as independent."""
    edges = rng.integers(1, 41, size=n)
    propensity = np.minimum(1.0, p * rng.gamma(2.0, 0.5, size=n))
    delta = stats.ratio(rng.binomial(edges, propensity), edges)
    rate = delta.value
    return delta, stats.Ratio(rate, rate * (1 - rate) / edges.sum(), n)


def test_the_lift_interval_covers_the_true_lift_about_95_percent() -> None:
    rng = np.random.default_rng(11)
    runs, covered, naive = 400, 0, 0
    for _ in range(runs):
        (t, t_naive), (c, c_naive) = _arm(rng, 1000, 0.06), _arm(rng, 1000, 0.05)
        lift = stats.relative_lift(t, c)
        covered += lift.low <= 0.2 <= lift.high
        lift = stats.relative_lift(t_naive, c_naive)
        naive += lift.low <= 0.2 <= lift.high
    assert 0.91 <= covered / runs <= 0.99
    assert naive / runs < 0.91  # why the member, not the edge, is the unit


# --- the synthetic experiment -----------------------------------------------------------


def synthetic_run(client: redis.Redis, seed: int, p_treatment: float) -> int:
    """3000 members per arm of ranker-v2 (v1 control, v2 treatment), also split evenly
    between the arms of an A/A experiment; 3 requests of 10 edges per member; acceptance per
    edge p (0.05 on v1) times a member propensity with mean 1. Returns the unattributed
    outcomes written."""
    rng = np.random.default_rng(seed)
    members = 6000
    treated = rng.permutation(members) < members // 2
    aa = rng.integers(0, 2, size=members)
    propensity = rng.gamma(2.0, 0.5, size=members)
    pipe = client.pipeline(transaction=False)
    for m in range(members):
        p = (p_treatment if treated[m] else 0.05) * propensity[m]
        pairs = (
            ("ranker-v2", "v2" if treated[m] else "v1"),
            ("aa", "control" if aa[m] else "twin"),
        )
        for r in range(3):
            t = T0 + m + r * 6 * HOUR
            items = tuple(m * 100 + r * 10 + j for j in range(10))
            e = Exposure(f"{m}-{r}", t, m, "pymk", "pymk", pairs, items)
            pipe.xadd(EXPOSURES, e.encode())
            accepted = rng.random(10) < p
            dismissed = ~accepted & (rng.random(10) < 0.02)
            delays = rng.uniform(0, 3 * 24 * HOUR, size=10)
            for j in range(10):
                kind = ("connect" if j % 2 else "follow") if accepted[j] else "dismiss"
                if accepted[j] or dismissed[j]:
                    fields = {"id": f"{m}-{r}-{j}", "type": kind, "member": m,
                              "target": items[j], "time": repr(t + float(delays[j])),
                              "features": "{}"}  # fmt: skip
                    pipe.xadd(keys.EVENTS, fields)
        if len(pipe) > 2000:
            pipe.execute()
    for i in range(50):  # outcomes on edges never served
        never = {"id": f"u{i}", "type": "connect", "member": i, "target": 999_999_000 + i,
                 "time": repr(T0 + 9 * HOUR), "features": "{}"}  # fmt: skip
        pipe.xadd(keys.EVENTS, never)
    pipe.execute()
    return 50


def test_the_report_recovers_a_known_lift(
    redis_proc: RedisProcess, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    unattributed = synthetic_run(redis_client, seed=7, p_treatment=0.06)
    rep = report(redis_client, "ranker-v2", control="v1")
    v1, v2 = row(rep, "v1"), row(rep, "v2")
    assert (v1.members, v2.members) == (3000, 3000)
    assert (v1.exposures, v1.requests) == (90_000, 9000)
    assert v1.acceptance_rate == pytest.approx(0.05, rel=0.1)
    assert v2.acceptance_rate == pytest.approx(0.06, rel=0.1)
    assert v1.dismiss_rate == pytest.approx(0.02 * 0.95, rel=0.15)
    assert v1.is_control and (v1.lift, v1.lift_ci_low, v1.lift_ci_high) == (0.0, 0.0, 0.0)
    assert not v1.significant
    assert v2.lift_ci_low is not None and v2.lift_ci_high is not None
    assert v2.lift_ci_low <= 0.2 <= v2.lift_ci_high
    assert v2.significant and v2.lift_ci_low > 0
    assert rep.unattributed_outcomes == unattributed and rep.malformed_entries == 0

    # The CLI, as a user runs it: the spec names no control here, so --control.
    code = main(["experiments", "report", "ranker-v2", "--control", "v1", "--json",
                 "--redis-url", redis_proc.url, "--workflows", "/nonexistent"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(json.dumps(rep.to_json()))
    assert set(out["variants"][0]) == {
        "variant", "exposures", "requests", "members", "accepted", "acceptance_rate",
        "dismissed", "dismiss_rate", "lift", "lift_ci_low", "lift_ci_high", "significant",
        "is_control"}  # fmt: skip
    assert out["window_s"] == 7 * 24 * HOUR

    # A/A on the same traffic: equal rates, no significant lift.
    aa = report(redis_client, "aa")
    assert aa.control == "control" and not row(aa, "twin").significant

    code = main(["experiments", "report", "ranker-v2", "--control", "v1", "--window", "24h",
                 "--redis-url", redis_proc.url])  # fmt: skip
    assert code == 0
    table = capsys.readouterr().out
    assert "experiment ranker-v2" in table and "window 1d" in table
    assert "unattributed outcomes" in table and "v2" in table and "yes" in table

    code = main(["experiments", "report", "ranker-v3", "--redis-url", redis_proc.url])
    err = capsys.readouterr().err
    assert code == 2 and "'ranker-v3'" in err and "aa, ranker-v2" in err


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_an_aa_run_is_not_significant(redis_client: redis.Redis, seed: int) -> None:
    synthetic_run(redis_client, seed=seed, p_treatment=0.05)
    lift = row(report(redis_client, "ranker-v2", control="v1"), "v2")
    assert lift.lift_ci_low is not None and lift.lift_ci_high is not None
    assert lift.lift_ci_low <= 0 <= lift.lift_ci_high and not lift.significant


# --- shadows ----------------------------------------------------------------------------


def test_the_shadow_summary(
    redis_proc: RedisProcess, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    def shadow(surface: str, name: str, i: int, corr: float, partial: bool) -> None:
        rec = ShadowComparison(f"r{i}", T0 + i, i, surface, name, 10, 0.5 + 0.1 * (i % 2),
                               corr, 10.0 + i, 20.0 + i, partial, (1, 2), (2, 1))  # fmt: skip
        redis_client.xadd(SHADOW, rec.encode())

    for i in range(100):
        shadow("pymk", "wide", i, math.nan if i % 4 == 0 else 0.8, i < 10)
    shadow("follows", "wide", 0, 0.1, False)
    redis_client.xadd(SHADOW, {"shadow": "broken"})
    summary = summarize(redis_client)
    assert summary.malformed_entries == 1
    assert [(s.surface, s.shadow, s.requests) for s in summary.shadows] == [
        ("follows", "wide", 1), ("pymk", "wide", 100)]  # fmt: skip
    pymk = summary.shadows[1]
    assert pymk.mean_overlap_at_k == pytest.approx(0.55)
    assert pymk.mean_rank_correlation == pytest.approx(0.8)  # NaN ignored
    assert pymk.served_p50_ms == pytest.approx(59.5)
    assert pymk.shadow_p99_ms == pytest.approx(float(np.percentile(np.arange(100) + 20.0, 99)))
    assert pymk.partial_share == pytest.approx(0.1)

    code = main(["experiments", "shadow", "--surface", "pymk", "--json",
                 "--redis-url", redis_proc.url])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["surface"] for s in out["shadows"]] == ["pymk"]
    assert out["shadows"][0]["requests"] == 100

    assert main(["experiments", "shadow", "--redis-url", redis_proc.url]) == 0
    text = capsys.readouterr().out
    assert "wide" in text and "follows" in text
