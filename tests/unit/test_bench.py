"""`edgeflow bench`: the capacity search, large graphs, and the scale run's plumbing.

Nothing here starts the serving suite: the capacity search runs against synthetic latency
functions, the open loop against fake calls, and `--scale`'s report against made-up records.
One test runs a real size in a child process with a budget it cannot meet, to check that an
over-budget size is reported as such and cleans up after itself.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from edgeflow_bench.bench import entity_features, timed, top_by_cosine, unit_rows
from edgeflow_bench.capacity import Step, open_loop, search_capacity, step_requests
from edgeflow_bench.scale import (
    OverBudget,
    Record,
    StageLog,
    assemble,
    format_edges,
    markdown_table,
    parse_sizes,
    plot,
    run_size,
    stage_key,
    write_edges,
)

from edgeflow import tensor
from edgeflow.cli import CliError
from edgeflow.features import schema
from edgeflow.features.service import MAX_ENTITIES
from edgeflow.graph import read_edge_list
from edgeflow.v1 import features_pb2


# ---- the capacity search --------------------------------------------------------------------
def knee(capacity: float, bad_over: float = 0.0) -> Any:
    """A synthetic server: p99 20 ms up to `capacity`, 300 ms past it; past `bad_over`
    (when set) 5% of the answers are partial while p99 stays low."""
    seen: list[float] = []

    async def measure(rate: float) -> Step:
        seen.append(rate)
        partial = 10 if bad_over and rate > bad_over else 0
        p99 = 20.0 if rate <= capacity else 300.0
        return Step(rate=rate, requests=200, p50_ms=5.0, p99_ms=p99, partial=partial)

    measure.seen = seen  # type: ignore[attr-defined]
    return measure


def knee_with_stall() -> Any:
    """knee(300) whose very first step meets a stall of the machine."""
    inner, stalled = knee(300), [False]

    async def measure(rate: float) -> Step:
        s: Step = await inner(rate)
        if not stalled[0]:
            stalled[0] = True
            s.p99_ms, s.failed = 131.0, {"DEADLINE_EXCEEDED": 1}
        return s

    return measure


async def test_capacity_brackets_the_knee_by_doubling_then_bisection() -> None:
    measure = knee(300)
    cap = await search_capacity(measure, start=25, resolution=0.1)
    assert cap.complete and cap.stopped_by == "resolution"
    assert 300 / 1.1 <= cap.rate <= 300
    assert cap.passing is not None and cap.passing.rate == cap.rate
    assert cap.failing is not None and cap.rate < cap.failing.rate <= cap.rate * 1.1
    assert measure.seen[:5] == [25, 50, 100, 200, 400]  # doubling until the first failure
    assert all(300 / 1.1 <= r <= 400 for r in measure.seen[5:])  # then within the bracket


async def test_capacity_counts_partial_answers_against_the_rate() -> None:
    cap = await search_capacity(knee(1000, bad_over=120), start=25)
    assert 120 / 1.1 <= cap.rate <= 120
    assert cap.failing is not None and cap.failing.p99_ms <= 100 and cap.failing.partial > 0


async def test_capacity_goes_down_when_the_first_rate_fails() -> None:
    measure = knee(7)
    cap = await search_capacity(measure, start=25, min_rate=1)
    assert measure.seen[:5] == [25, 25, 12.5, 12.5, 6.25]  # each failure measured twice
    assert 7 / 1.1 <= cap.rate <= 7 and cap.complete


async def test_one_stalled_step_does_not_set_the_capacity() -> None:
    cap = await search_capacity(knee_with_stall(), start=25, resolution=0.1)
    assert 300 / 1.1 <= cap.rate <= 300 and cap.complete
    first, again = cap.steps[:2]
    assert first.rate == again.rate == 25 and not first.passes() and again.passes()
    assert again.repeat and not first.repeat
    assert [s["repeat"] for s in cap.as_json()["capacity_steps"][:2]] == [False, True]
    without = await search_capacity(knee_with_stall(), start=25, confirm_failures=False)
    assert without.rate < 25  # what one stall did before


async def test_capacity_is_zero_when_nothing_passes() -> None:
    cap = await search_capacity(knee(0.5), start=4, min_rate=1)
    assert cap.rate == 0 and cap.passing is None and cap.stopped_by == "min_rate"
    assert cap.as_json()["capacity_qps"] == 0 and cap.as_json()["capacity_p99_ms"] is None


async def test_capacity_search_stops_at_its_budget_and_step_limit() -> None:
    now = [0.0]
    inner = knee(10_000)

    async def slow(rate: float) -> Step:
        now[0] += 10.0  # each step takes 10 s of a fake clock
        result: Step = await inner(rate)
        return result

    cap = await search_capacity(slow, start=1, budget_s=35, clock=lambda: now[0])
    assert len(cap.steps) == 4 and cap.stopped_by == "budget" and not cap.complete
    assert cap.rate == 8 and cap.failing is None
    cap = await search_capacity(knee(10_000), start=1, max_steps=3)
    assert len(cap.steps) == 3 and cap.stopped_by == "max_steps"
    cap = await search_capacity(knee(10_000), start=1, max_rate=16)
    assert cap.rate == 16 and cap.stopped_by == "max_rate" and cap.complete


async def test_capacity_json_reports_the_capacity_and_the_failing_rate() -> None:
    out = (await search_capacity(knee(300), start=25)).as_json()
    for key in ("capacity_qps", "capacity_p50_ms", "capacity_p99_ms", "capacity_partial_pct",
                "capacity_failed_pct", "capacity_failed", "capacity_fail_qps",
                "capacity_fail_p99_ms", "capacity_fail_partial_pct", "capacity_fail_failed_pct",
                "capacity_search_complete", "capacity_steps"):  # fmt: skip
        assert key in out, key
    assert out["capacity_fail_qps"] > out["capacity_qps"]
    assert out["capacity_fail_p99_ms"] > 100 >= out["capacity_p99_ms"]
    assert json.loads(json.dumps(out)) == out


def test_a_step_passes_on_p99_and_on_the_share_of_bad_answers() -> None:
    ok = Step(rate=10, requests=200, p50_ms=5, p99_ms=100, partial=1, failed={"UNAVAILABLE": 1})
    assert ok.passes()  # 2 of 200 is 1%
    assert not Step(rate=10, requests=200, p50_ms=5, p99_ms=100.5, partial=0).passes()
    assert not Step(rate=10, requests=200, p50_ms=5, p99_ms=9, partial=2,
                    failed={"DEADLINE_EXCEEDED": 1}).passes()  # fmt: skip
    assert step_requests(10) == 200 and step_requests(1e6) == 1500
    assert step_requests(3) == 60 and step_requests(0.1) == 20  # bounded in time, not only count


class FakeRpcError(Exception):
    def code(self) -> Any:
        class Code:
            name = "UNAVAILABLE"

        return Code()


async def test_open_loop_sends_on_schedule_without_waiting_for_answers() -> None:
    in_flight, most = 0, 0
    calls: list[int] = []

    async def call(i: int) -> bool:
        nonlocal in_flight, most
        calls.append(i)
        in_flight += 1
        most = max(most, in_flight)
        try:
            if i % 10 == 3:
                raise FakeRpcError()
            await asyncio.sleep(1.0 if i == 5 else 0.05)  # 50 ms answers, one that hangs
            return i % 10 == 7
        finally:
            in_flight -= 1

    step = await open_loop(call, rate=200, requests=40, timeout_s=0.5)
    assert sorted(calls) == list(range(40))
    assert most > 1  # arrivals did not wait for answers: not a closed loop
    assert step.requests == 40 and step.partial == 4
    assert step.failed == {"UNAVAILABLE": 4, "DEADLINE_EXCEEDED": 1}
    assert step.p99_ms >= step.p50_ms > 0 and not step.passes()


# ---- bench on graphs of any size ------------------------------------------------------------
class FakeFeatures:
    """GetFeatures for entity ids, refusing more than the service's limit as it does."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def GetFeatures(
        self, req: features_pb2.GetFeaturesRequest, timeout: float | None = None
    ) -> features_pb2.GetFeaturesResponse:
        ids = np.asarray(req.entities, dtype=np.float32)
        if ids.size > MAX_ENTITIES:
            raise ValueError(f"entities: {ids.size} requested, at most {MAX_ENTITIES}")
        self.calls.append(ids.size)
        matrix = np.repeat(ids[:, None], len(schema.ENTITY_COLUMNS), axis=1)
        return features_pb2.GetFeaturesResponse(
            features=tensor.pack(matrix, list(schema.ENTITY_COLUMNS))
        )


async def test_entity_features_of_more_members_than_one_request_takes() -> None:
    stub = FakeFeatures()
    ids = np.arange(3 * MAX_ENTITIES + 17, dtype=np.int64)
    out = await entity_features(stub, ids)  # type: ignore[arg-type]
    assert stub.calls == [MAX_ENTITIES] * 3 + [17]
    assert out.shape == (ids.size, len(schema.ENTITY_COLUMNS))
    assert np.array_equal(out[:, 0], ids.astype(np.float32))


def test_top_by_cosine_is_exact_and_leaves_out_what_it_is_told() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 8)).astype(np.float32)
    vectors[17] = 0  # a member without an embedding is never returned
    unit = unit_rows(vectors)
    queries = np.asarray([3, 40])
    excl = [np.asarray([3, 5, 6]), np.asarray([40])]
    got = top_by_cosine(unit, unit[queries], 20, excl)
    for j, q in enumerate(queries):
        sims = unit @ unit[q]
        sims[excl[j]] = -np.inf
        sims[17] = -np.inf
        assert np.array_equal(got[j], np.argsort(-sims, kind="stable")[:20])
    assert top_by_cosine(unit, unit[:1], 1000).shape == (1, 500)
    assert (top_by_cosine(unit, unit[:1], 1000)[0] == -1).sum() == 1  # the zero row


# ---- the scale run --------------------------------------------------------------------------
def test_edge_lists_are_written_as_numpy_formats_them(tmp_path: Path) -> None:
    edges = np.asarray([[0, 1], [9, 10], [99, 100], [12345, 7], [2**62, 0]], dtype=np.int64)
    buf = io.StringIO()
    np.savetxt(buf, edges, fmt="%d")
    assert format_edges(edges).decode() == buf.getvalue()
    path = tmp_path / "e.txt"
    write_edges(path, edges, chunk=2)
    parsed = read_edge_list(path)
    assert parsed.src.tolist() == edges[:, 0].tolist()
    assert parsed.dst.tolist() == edges[:, 1].tolist()
    with pytest.raises(ValueError):
        format_edges(np.asarray([[-1, 2]]))


def test_sizes_parse_and_bad_ones_are_named() -> None:
    assert parse_sizes("10000,100k, 1m,2_000") == [10000, 100000, 1000000, 2000]
    for bad in ("", "ten", "50", "1.5"):
        with pytest.raises(CliError):
            parse_sizes(bad)


def test_stage_log_keeps_every_stage_with_its_seconds() -> None:
    stages = StageLog(enabled=False)
    with stages.stage("ranker: gradient boosting on 74,697 rows", 100, unit="trees"):
        pass
    with stages.stage("model registry"):
        pass
    assert [t for t, _ in stages.times] == [
        "ranker: gradient boosting on 74,697 rows",
        "model registry",
    ]
    assert all(s >= 0 for _, s in stages.times)
    assert stage_key(stages.times[0][0]) == "ranker: gradient boosting on N rows"


def record(members: int, scale: float, status: str = "ok") -> dict[str, Any]:
    if status != "ok":
        return {"members": members, "status": status, "phase": "offline",
                "error": "over the time budget of 10s", "generate_s": 1.0}  # fmt: skip
    return {
        "members": members, "status": status, "phase": None, "error": None,
        "edges": members * 12, "generate_s": 0.1 * scale, "ingest_s": 0.2 * scale,
        "train_s": 10 * scale, "train_seconds": {"embeddings": 1.0 * scale, "total": 10 * scale},
        "recommend_p50_ms": 10.0 * scale, "recommend_p99_ms": 20.0 * scale,
        "capacity_qps": 100.0 / scale, "ebr_recall_at_100": 0.99,
        "rss_mb": {"gateway": 90.0, "redis": 20.0 * scale}, "rss_mb_total": 110.0,
        "offline_pairs_per_s": 500000,
    }  # fmt: skip


def test_scale_report_has_ratios_targets_and_failed_sizes(tmp_path: Path) -> None:
    results = [record(10_000, 1.0), record(100_000, 1.4), record(1_000_000, 1.0, "over_budget")]
    report = assemble(results, seed=0, started="now", seconds=1.0)
    assert report["sizes"] == [10_000, 100_000, 1_000_000]
    assert report["baseline_members"] == 10_000
    r = report["ratios"]["100000"]
    assert r["recommend_p50_ms"] == pytest.approx(1.4)
    assert r["capacity_qps"] == pytest.approx(1 / 1.4, abs=1e-3)
    assert r["rss_redis"] == pytest.approx(1.4)
    assert "1000000" not in report["ratios"]
    p50 = report["targets"]["recommend_p50_ms"]["by_members"]["100000"]
    assert p50 == {"ratio": pytest.approx(1.4), "met": True}
    assert report["targets"]["recommend_p99_ms"]["by_members"]["100000"]["met"] is True
    failed = report["results"][2]
    assert failed["status"] == "over_budget" and "budget" in failed["error"]
    json.loads(json.dumps(report))

    table = markdown_table(report)
    assert table.splitlines()[0] == "| measure | 10,000 | 100,000 | 1,000,000 |"
    assert "**over_budget** (offline)" in table
    assert "| `Recommend` p50, sequential (ms) | 10.0 | 14.0 (1.40x) | - |" in table

    png = tmp_path / "scale.png"
    assert plot(report, png) == str(png)
    with open(png, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24])[0] > 500


@pytest.mark.parametrize("cluster", [0, 3])
def test_a_size_over_its_budget_is_reported_and_cleans_up(tmp_path: Path, cluster: int) -> None:
    rec = run_size(2000, seed=0, budget_s=1.0, work=tmp_path, log=False, redis_cluster=cluster)
    assert rec["status"] == "over_budget", rec
    assert "budget" in rec["error"] and rec["members"] == 2000
    assert rec["redis_cluster"] == cluster  # the size's own process was told
    assert rec["phase"] is not None  # where it was when the budget ran out
    assert not list((tmp_path / "homes-2000").glob("*/run/suite.json"))  # its suite is gone
    assert "stopped_leftovers" not in rec  # the child cleaned up by itself


def test_a_failed_measurement_is_recorded_and_the_next_one_runs(tmp_path: Path) -> None:
    rec = Record(tmp_path / "r.json", members=100, seed=0, budget_s=10)
    with rec.phase("capacity", log=False, soft=True):
        raise RuntimeError("the gateway went away")
    with rec.phase("offline", log=False, soft=True):
        rec.update({"offline_pairs_per_s": 5})
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["phase_errors"] == {"capacity": "RuntimeError: the gateway went away"}
    assert saved["offline_pairs_per_s"] == 5 and set(saved["phase_seconds"]) == {
        "capacity",
        "offline",
    }
    with pytest.raises(OverBudget), rec.phase("nearline", log=False, soft=True):
        raise OverBudget("over the time budget of 10s")  # never swallowed
    with pytest.raises(ValueError), rec.phase("write", log=False):
        raise ValueError("not soft")


async def test_timed_counts_failed_end_to_end_calls_when_asked() -> None:
    n = 0

    async def call() -> None:
        nonlocal n
        n += 1
        if n % 4 == 0:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata()
            )

    failed: Counter[str] = Counter()
    lat = await timed(call, 20, warmup=2, failures=failed)
    assert len(lat) == 15 and failed == {"DEADLINE_EXCEEDED": 5}
    with pytest.raises(grpc.aio.AioRpcError):
        await timed(call, 20, warmup=0)


def test_the_command_line_takes_the_scale_options(tmp_path: Path) -> None:
    from edgeflow_bench import scale

    from edgeflow.cli.main import build_parser

    args = build_parser().parse_args(
        ["bench", "--scale", "--sizes", "2000,5k", "--out", str(tmp_path), "--size-budget", "60"]
    )
    assert args.scale and args.sizes == "2000,5k" and args.out == tmp_path
    assert args.size_budget == 60 and args.seed == 0
    args.out = tmp_path / "scale.json"
    with pytest.raises(CliError, match="directory"):
        scale.run(args)
    assert scale.default_budget(1_000_000) > scale.default_budget(10_000) >= 900


def test_cpu_seconds_reads_a_process_cpu_time_and_nan_once_it_is_gone() -> None:
    import math
    import os
    import subprocess
    import sys

    import psutil

    from edgeflow.local.suite import cpu_seconds

    me = psutil.Process(os.getpid())
    before = cpu_seconds(os.getpid())
    sum(i * i for i in range(2_000_000))  # some CPU
    after, times = cpu_seconds(os.getpid()), me.cpu_times()
    assert after > before
    assert after == pytest.approx(times.user + times.system, abs=0.05)  # a clock tick or two
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert math.isnan(cpu_seconds(child.pid))


def test_bench_without_its_package_says_where_it_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The serving image installs edgeflow without benchmarks/: `edgeflow bench` says so."""
    from edgeflow.cli import main

    class NotInstalled:  # finds no edgeflow_bench, as where it was not installed
        @staticmethod
        def find_spec(name: str, *_: object) -> None:
            if name.partition(".")[0] == "edgeflow_bench":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    for name in [m for m in sys.modules if m.partition(".")[0] == "edgeflow_bench"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [NotInstalled, *sys.meta_path])
    assert main.main(["bench"]) == 2
    assert capsys.readouterr().err == (
        "edgeflow bench: edgeflow_bench is not installed here: it runs from a source "
        "checkout, where scripts/setup.sh installs it\n"
    )
