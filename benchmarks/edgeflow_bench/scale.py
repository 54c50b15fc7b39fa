"""`edgeflow bench --scale`: the whole system on generated social graphs of growing size.

For each size, a child process (`python -m edgeflow_bench.scale`) generates a graph with
`social_graph(members, seed)`, writes it as an edge list, and in the same self-contained
harness as `bench` ingests it (as `edgeflow ingest` does), trains (every stage timed), starts
the services and measures: `Recommend` sequential p50/p99 and open-loop capacity, the
per-service calls, EBR recall@100 against exact search, nearline freshness, the offline job
over every member (`--local --shards 2`), and the memory of every process and of Redis.

A size runs under a time budget. Its child records what it measured after every phase, so a
size that fails or runs over is reported with its error, its phase and what it measured
before, and the next size still runs. Over budget, the child stops itself (SIGALRM) and
cleans up its suite; should it not, the parent stops it and every process its suite's
state file names.

The parent writes `scale.json` and `scale.png` (log-log, one line per cost against members)
and prints a Markdown table with ratios against the run's smallest size (10k by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from edgeflow.cli import CliError
from edgeflow.config import REPO_ROOT
from edgeflow.offline.progress import Stage, Stages

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
SEQUENTIAL_REQUESTS = 400
EBR_SAMPLE = 200
EBR_K = 100
CAPACITY_BUDGET_S = 180.0
OFFLINE_SHARDS = 2
# The parent waits this long past a size's budget for its child to clean up.
CLEANUP_GRACE_S = 120.0
# Stated against the run's 10k figures: sequential p50 and p99 at 1M members.
TARGETS = {"recommend_p50_ms": 1.5, "recommend_p99_ms": 2.0}


def default_budget(members: int) -> float:
    """Seconds a size may take: 15 minutes plus 15 s per thousand members (100k: 40 min,
    1M: 4 h 25 min; the offline job over every member is most of it)."""
    return 900.0 + 15.0 * members / 1000


def parse_sizes(text: str) -> list[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if not part:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", part)
        if m is None:
            raise CliError(f"--sizes: {part!r} is not a member count (e.g. 10000, 100k, 1m)")
        value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
        if value < 100 or value != int(value):
            raise CliError(f"--sizes: {part!r}: a size is a whole number of at least 100 members")
        sizes.append(int(value))
    if not sizes:
        raise CliError("--sizes: no size given")
    return sizes


# ---- the edge file ---------------------------------------------------------------------------
def _digits(x: np.ndarray) -> np.ndarray:
    d = np.ones(x.shape, dtype=np.int64)
    t = x.copy()
    while (big := t >= 10).any():
        d += big
        t //= 10
    return d


def format_edges(edges: np.ndarray) -> bytes:
    """`u v` lines of non-negative int64 pairs, formatted by numpy (no loop over edges)."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if edges.size and edges.min() < 0:
        raise ValueError("member ids must be non-negative")
    u, v = edges[:, 0], edges[:, 1]
    du, dv = _digits(u), _digits(v)
    ends = np.cumsum(du + dv + 2)
    starts = ends - (du + dv + 2)
    buf = np.empty(int(ends[-1]) if ends.size else 0, dtype=np.uint8)
    buf[starts + du] = ord(" ")
    buf[ends - 1] = ord("\n")
    for col, d, base in ((u, du, starts), (v, dv, starts + du + 1)):
        x = col.copy()
        for j in range(int(d.max()) if d.size else 0):
            m = d > j
            buf[base[m] + d[m] - 1 - j] = ord("0") + x[m] % 10
            x //= 10
    return buf.tobytes()


def write_edges(path: Path, edges: np.ndarray, chunk: int = 1_000_000) -> int:
    """Write the edge list (a comment line, then `u v` lines); returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(b"# generated social graph: member member\n")
        for start in range(0, edges.shape[0], chunk):
            fh.write(format_edges(edges[start : start + chunk]))
    return path.stat().st_size


# ---- training stages -------------------------------------------------------------------------
class StageLog(Stages):
    """Stages that also keep each finished stage's text and seconds, and do not start one
    once the size's `deadline` (time.monotonic) has passed."""

    def __init__(self, enabled: bool, deadline: float | None = None) -> None:
        super().__init__(enabled=enabled, live=False)
        self.times: list[tuple[str, float]] = []
        self.deadline = deadline

    @contextmanager
    def stage(
        self,
        text: str,
        total: float | None = None,
        *,
        done: float = 0,
        unit: str = "",
        rates: tuple[str, ...] | None = None,
    ) -> Iterator[Stage]:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OverBudget(f"over the time budget before '{text}'")
        with super().stage(text, total, done=done, unit=unit, rates=rates) as st:
            yield st
        self.times.append((st.text, round(st.seconds, 3)))


def stage_key(text: str) -> str:
    """A stage's text without its counts, the same at every size ("... on N rows")."""
    return re.sub(r"\d[\d,]*(\.\d+)?", "N", text)


# ---- one size (the child process) -------------------------------------------------------------
class OverBudget(BaseException):
    """The size's time is up (BaseException: no measuring phase may swallow it)."""


class Stopped(BaseException):
    """The size's process was told to stop."""


class Record:
    """What one size measured so far, saved to `path` after every phase."""

    def __init__(self, path: Path, members: int, seed: int, budget_s: float) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "members": members, "seed": seed, "status": "running", "phase": None,
            "error": None, "budget_s": budget_s, "phase_seconds": {}, "phase_errors": {},
        }  # fmt: skip
        self.t0 = time.perf_counter()

    def save(self) -> None:
        self.data["wall_s"] = round(time.perf_counter() - self.t0, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable))
        tmp.replace(self.path)

    def update(self, values: dict[str, Any]) -> None:
        self.data.update(values)

    @contextmanager
    def phase(self, name: str, log: bool, soft: bool = False) -> Iterator[None]:
        """Time a phase. A `soft` phase that fails has its error recorded in `phase_errors`
        and the size goes on to its next phase (it ends `failed` all the same). A phase does
        not start once the budget is spent (the alarm can land in an event loop, which
        swallows it)."""
        self.data["phase"] = name
        budget_s = self.data["budget_s"]
        if time.perf_counter() - self.t0 > budget_s:
            raise OverBudget(f"over the time budget of {budget_s:.0f}s before '{name}'")
        self.save()
        if log:
            print(f"[{self.data['members']:,} members] {name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            yield
        except Exception as exc:
            if not soft:
                raise
            self.data["phase_errors"][name] = f"{type(exc).__name__}: {exc}"[-2000:]
            if log:
                print(f"[{self.data['members']:,} members] {name} failed: {exc}",
                      file=sys.stderr, flush=True)  # fmt: skip
        self.data["phase_seconds"][name] = round(time.perf_counter() - t, 3)
        self.save()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def run_one(
    members: int,
    seed: int,
    result: Path,
    home_root: Path,
    budget_s: float,
    log: bool,
    redis_cluster: int = 0,
) -> int:
    """Everything for one size, in this process, on one Redis server or on a Redis Cluster
    of `redis_cluster` masters; the record goes to `result`."""
    from edgeflow.build.synthetic import social_graph
    from edgeflow.cli.harness import running_suite

    rec = Record(result, members, seed, budget_s)
    rec.update({"redis_cluster": redis_cluster})

    def over(signum: int, frame: FrameType | None) -> None:
        raise OverBudget(f"over the time budget of {budget_s:.0f}s")

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Stopped(f"stopped by signal {signum}")

    signal.signal(signal.SIGALRM, over)
    signal.signal(signal.SIGTERM, stop)
    signal.setitimer(signal.ITIMER_REAL, budget_s)
    deadline = time.monotonic() + budget_s
    try:
        with tempfile.TemporaryDirectory(prefix="edges-", dir=home_root) as tmp:
            path = Path(tmp) / f"social-{members}.txt"
            with rec.phase("generate", log):
                t = time.perf_counter()
                edges = social_graph(members, seed=seed)
                rec.update({"generate_s": round(time.perf_counter() - t, 3),
                            "edges": int(edges.shape[0])})  # fmt: skip
            with rec.phase("write", log):
                t = time.perf_counter()
                size = write_edges(path, edges)
                rec.update({"write_s": round(time.perf_counter() - t, 3),
                            "edge_file_mb": round(size / 2**20, 1)})  # fmt: skip
                del edges
            stages = StageLog(enabled=log, deadline=deadline)
            rec.data["phase"] = "ingest, train, start the services"
            rec.save()
            try:
                with running_suite(
                    None, seed=seed, log=log, edges=path, stages=stages, home_root=home_root,
                    redis_cluster=redis_cluster,
                ) as h:  # fmt: skip
                    _setup_times(rec, h.seconds, h.train_report, stages)
                    rec.save()
                    assert h.graph is not None
                    measure_serving(h, h.graph, rec, seed, deadline, log)
            finally:
                if "train_s" not in rec.data:  # failed during set-up: keep the stages done
                    rec.update({"train_stages": _stage_list(stages)})
        errors = rec.data["phase_errors"]
        if errors:
            first = next(iter(errors))
            rec.update({"status": "failed", "phase": first, "error": f"{first}: {errors[first]}"})
        else:
            rec.update({"status": "ok", "phase": None})
    except OverBudget as exc:
        rec.update({"status": "over_budget", "error": str(exc)})
    except BaseException as exc:
        rec.update({"status": "failed", "error": f"{type(exc).__name__}: {exc}"[-4000:]})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        rec.save()
    return 0 if rec.data["status"] == "ok" else 1


def _stage_list(stages: StageLog) -> list[dict[str, Any]]:
    return [{"stage": text, "key": stage_key(text), "seconds": s} for text, s in stages.times]


def _setup_times(rec: Record, seconds: dict[str, float], report: Any, stages: StageLog) -> None:
    rec.update({
        "ingest_s": seconds.get("ingest"),
        "train_s": seconds.get("train"),
        "services_start_s": seconds.get("services"),
        "train_seconds": dict(report.seconds) if report is not None else {},
        "train_stages": _stage_list(stages),
        "graph_members": report.members if report is not None else None,
        "graph_edges": report.edges if report is not None else None,
    })  # fmt: skip


def measure_serving(h: Any, graph: Any, rec: Record, seed: int, deadline: float, log: bool) -> None:
    """The measurements on the running suite, each phase recorded as it ends."""
    from edgeflow.shell import auth
    from edgeflow.v1 import gateway_pb2_grpc
    from edgeflow_bench.bench import nearline_freshness, per_service
    from edgeflow_bench.capacity import recommend_capacity

    rng = np.random.default_rng(seed + 1)
    pool = graph.ids[graph.degree > 0]
    members = rng.choice(pool, size=min(SEQUENTIAL_REQUESTS, pool.size), replace=False)

    async def serving() -> None:
        gw = h.channel("gateway", auth.local_key(h.suite.home))
        stub = gateway_pb2_grpc.RecommenderStub(gw)
        try:
            with rec.phase("recommend sequential", log, soft=True):
                rec.update(await sequential(stub, members.tolist(), SEQUENTIAL_REQUESTS))
            with rec.phase("per service", log, soft=True):
                rec.update(await per_service(h, graph, members))
            with rec.phase("ebr recall", log, soft=True):
                rec.update(await ebr_recall(h, graph, rng))
            with rec.phase("capacity", log, soft=True):
                budget = min(CAPACITY_BUDGET_S, max(30.0, (deadline - time.monotonic()) / 3))
                cap = await recommend_capacity(stub, members.tolist(), budget_s=budget)
                rec.update(cap.as_json())
        finally:
            await gw.close()

    async def nearline() -> None:
        gw = h.channel("gateway", auth.local_key(h.suite.home))
        try:
            rec.update(await nearline_freshness(h, graph, gateway_pb2_grpc.RecommenderStub(gw)))
        finally:
            await gw.close()

    asyncio.run(serving())
    # Memory while serving, before the batch work; the peaks are read again at the end.
    with rec.phase("memory", log, soft=True):
        rec.update(memory(h))
    # The offline run first: the nearline worker refreshes entries of the live list it wrote.
    with rec.phase("offline", log, soft=True):
        rec.update(offline_run(h, deadline - time.monotonic()))
    with rec.phase("nearline", log, soft=True):
        asyncio.run(nearline())
    with rec.phase("memory peaks", log, soft=True):
        end = memory(h)
        rec.update(
            {k: end[k] for k in PEAK_KEYS}
            | {"redis_used_memory_end_mb": end["redis_used_memory_mb"]}
        )


async def sequential(stub: Any, members: list[int], requests: int) -> dict[str, Any]:
    """`Recommend` one after another (after 50 warm-up calls): latency of the answered
    ones, and how many were partial or failed (a failed request is counted, not fatal)."""
    import grpc

    from edgeflow.v1 import gateway_pb2

    ring = np.resize(np.asarray(members), requests + 50).tolist()
    lat, partial, degraded, failed = [], 0, Counter[str](), Counter[str]()
    for n, m in enumerate(ring):
        t = time.perf_counter()
        req = gateway_pb2.RecommendRequest(surface="pymk", member=m, k=50)
        try:
            resp = await stub.Recommend(req, timeout=5)
        except grpc.aio.AioRpcError as exc:
            if n >= 50:
                failed[exc.code().name] += 1
            continue
        if n >= 50:
            lat.append((time.perf_counter() - t) * 1000)
            partial += int(resp.partial)
            degraded.update(line.split(":", 1)[0] for line in resp.degraded)
    return {
        "recommend_p50_ms": _pct(lat, 50),
        "recommend_p99_ms": _pct(lat, 99),
        "recommend_requests": requests,
        "recommend_partial": partial,
        "recommend_failed": dict(failed),
        "recommend_degraded": dict(degraded),
    }


async def ebr_recall(h: Any, graph: Any, rng: np.random.Generator) -> dict[str, Any]:
    """Recall@100 of `Generate` source=ebr against exact cosine search with numpy over the
    embeddings training wrote (read back through the features service), and its latency.
    Both sides leave out the member and its connections."""
    from edgeflow.features import schema
    from edgeflow.v1 import candidates_pb2, candidates_pb2_grpc, features_pb2_grpc
    from edgeflow_bench.bench import entity_features, top_by_cosine, unit_rows

    fch = h.channel("features")
    try:
        feats = await entity_features(features_pb2_grpc.FeatureServiceStub(fch), graph.ids)
    finally:
        await fch.close()
    unit = unit_rows(feats[:, len(schema.SCALAR_FEATURES) :])
    del feats
    pool = np.flatnonzero((graph.degree > 0) & unit.any(axis=1))
    rows = np.sort(rng.choice(pool, size=min(EBR_SAMPLE, pool.size), replace=False))
    exact: list[np.ndarray] = []
    for start in range(0, rows.size, 16):  # (16, n) similarities at a time
        chunk = rows[start : start + 16]
        excl = [np.append(graph.neighbors(i), i) for i in chunk.tolist()]
        exact += list(top_by_cosine(unit, unit[chunk], EBR_K, excl))
    cch = h.channel("candidates")
    stub = candidates_pb2_grpc.CandidateServiceStub(cch)
    try:
        for i in rows[:10].tolist():  # warm-up
            await stub.Generate(
                candidates_pb2.GenerateRequest(member=int(graph.ids[i]), source="ebr", limit=EBR_K),
                timeout=10,
            )
        lat, hits, total, returned = [], 0, 0, 0
        for i, want in zip(rows.tolist(), exact, strict=True):
            req = candidates_pb2.GenerateRequest(
                member=int(graph.ids[i]), source="ebr", limit=EBR_K
            )
            t = time.perf_counter()
            resp = await stub.Generate(req, timeout=10)
            lat.append((time.perf_counter() - t) * 1000)
            truth = graph.ids[want[want >= 0]]
            hits += int(np.isin(np.asarray(resp.ids, dtype=np.int64), truth).sum())
            total += truth.size
            returned += len(resp.ids)
    finally:
        await cch.close()
    return {
        f"ebr_recall_at_{EBR_K}": round(hits / total, 4) if total else None,
        "ebr_p50_ms": _pct(lat, 50),
        "ebr_p99_ms": _pct(lat, 99),
        "ebr_members_sampled": int(rows.size),
        "ebr_mean_returned": round(returned / max(rows.size, 1), 1),
    }


def offline_run(h: Any, timeout_s: float) -> dict[str, Any]:
    """The offline job for pymk over every member, `--local --shards 2`, as a process: its
    pairs per second, wall time, and the peak memory of its processes (sampled)."""
    import psutil

    if timeout_s <= 0:
        raise OverBudget("over the time budget: no time left for the offline run")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeflow.cli.main", "offline", "run", "--workflow", "pymk",
             "--local", "--shards", str(OFFLINE_SHARDS), "--json", "--quiet"],
            env=h.suite.env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        peak_total, peak_one = 0.0, 0.0
        try:
            top = psutil.Process(proc.pid)
            while proc.poll() is None:
                if time.perf_counter() - t > timeout_s:
                    raise OverBudget(f"the offline run took over {timeout_s:.0f}s")
                total = 0.0
                try:
                    for p in [top, *top.children(recursive=True)]:
                        rss = p.memory_info().rss / 2**20
                        total += rss
                        peak_one = max(peak_one, rss)
                except psutil.Error:
                    pass
                peak_total = max(peak_total, total)
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                _kill_tree(proc.pid)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"offline run failed ({proc.returncode}):\n{stderr[-2000:]}")
    summary = json.loads(stdout.splitlines()[-1])
    # The shards score at the same time: their longest scoring time (start-up excluded).
    scoring_s = max((float(s["seconds"]) for s in summary["shards"]), default=0.0)
    return {
        "offline_members": summary["members"],
        "offline_pairs": summary["pairs_scored"],
        "offline_job_seconds": summary["seconds"],
        "offline_wall_s": round(wall, 3),
        "offline_pairs_per_s": round(summary["pairs_scored"] / summary["seconds"]),
        "offline_shards": OFFLINE_SHARDS,
        "offline_shard_seconds": [s["seconds"] for s in summary["shards"]],
        "offline_scoring_pairs_per_s": (
            round(summary["pairs_scored"] / scoring_s) if scoring_s else None
        ),
        "offline_peak_rss_mb_total": round(peak_total, 1),
        "offline_peak_rss_mb_process": round(peak_one, 1),
    }


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        top = psutil.Process(pid)
        procs = [*top.children(recursive=True), top]
    except psutil.Error:
        return
    for p in procs:
        with suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


PEAK_KEYS = ("peak_rss_mb", "redis_used_memory_peak_mb", "bench_process_peak_rss_mb")


def memory(h: Any) -> dict[str, Any]:
    """RSS now and at its peak of every process of the suite, and Redis's own accounting."""
    import psutil

    from edgeflow.local.suite import is_redis_name
    from edgeflow.stores.redis_client import connect

    rss: dict[str, float] = {}
    peak: dict[str, float | None] = {}
    nodes: dict[str, float] = {}
    for name, pid in sorted(h.suite.pids.items()):
        try:
            p = psutil.Process(pid)
            mb = round(p.memory_info().rss / 2**20, 1)
        except psutil.Error:
            continue
        if is_redis_name(name):  # a cluster's masters, summed as one "redis"
            nodes[name] = mb
            rss["redis"] = round(rss.get("redis", 0.0) + mb, 1)
            peak["redis"] = round((peak.get("redis") or 0.0) + (_peak_rss_mb(pid) or 0.0), 1)
        else:
            rss[name], peak[name] = mb, _peak_rss_mb(pid)
            # e.g. the features service's Feast writer: counted, under its parent's name
            children = sum(_rss_mb(c) for c in p.children(recursive=True))
            if children:
                rss[f"{name}.children"] = round(children, 1)
    client = connect(h.cfg.redis_url)
    try:
        used, used_peak = _redis_memory(client)
    finally:
        client.close()
    return {
        "rss_mb": rss,
        "peak_rss_mb": peak,
        "rss_mb_total": round(sum(rss.values()), 1),
        **({"redis_nodes_rss_mb": nodes} if len(nodes) > 1 else {}),
        "redis_used_memory_mb": round(used / 2**20, 1),
        "redis_used_memory_peak_mb": round(used_peak / 2**20, 1),
        "bench_process_peak_rss_mb": _peak_rss_mb(os.getpid()),
    }


def _redis_memory(client: Any) -> tuple[int, int]:
    """used_memory and used_memory_peak in bytes, summed over a cluster's masters (a cluster
    client's plain INFO answers from one node only)."""
    from redis.cluster import RedisCluster

    from edgeflow.stores.redis_client import is_cluster_client

    if not is_cluster_client(client):
        info = client.info("memory")
        return int(info["used_memory"]), int(info["used_memory_peak"])
    per_node = client.info("memory", target_nodes=RedisCluster.PRIMARIES).values()
    return (sum(int(i["used_memory"]) for i in per_node),
            sum(int(i["used_memory_peak"]) for i in per_node))  # fmt: skip


def _rss_mb(p: Any) -> float:
    import psutil

    try:
        return float(p.memory_info().rss / 2**20)
    except psutil.Error:  # gone since it was listed
        return 0.0


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values), q)), 3) if values else None


# ---- the run (the parent) ----------------------------------------------------------------------
def run_size(
    members: int, seed: int, budget_s: float, work: Path, log: bool, redis_cluster: int = 0
) -> dict[str, Any]:
    """One size in a child process, bounded by `budget_s` (plus time to clean up)."""
    from edgeflow.cli.harness import stop_leftovers

    result = work / f"size-{members}.json"
    home_root = work / f"homes-{members}"
    home_root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "edgeflow_bench.scale", "--members", str(members),
           "--seed", str(seed), "--result", str(result), "--home-root", str(home_root),
           "--budget", str(budget_s), "--redis-cluster", str(redis_cluster),
           *([] if log else ["--quiet"])]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr)
    killed = ""
    try:
        proc.wait(timeout=budget_s + CLEANUP_GRACE_S)
    except subprocess.TimeoutExpired:
        killed = f"over the time budget of {budget_s:.0f}s, and it did not stop by itself"
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    finally:
        left = stop_leftovers(home_root)
    try:
        record: dict[str, Any] = json.loads(result.read_text())
    except (OSError, ValueError):
        record = {
            "members": members,
            "seed": seed,
            "status": "failed",
            "budget_s": budget_s,
            "redis_cluster": redis_cluster,
            "error": f"the size's process exited ({proc.returncode}) without a result",
        }
    if killed:
        record.update({"status": "over_budget", "error": killed})
    elif record.get("status") == "running":
        why = f"the size's process exited ({proc.returncode}) mid-run"
        record.update({"status": "failed", "error": why})
    if left:
        record["stopped_leftovers"] = left
    record["wall_s"] = round(time.perf_counter() - t, 1)
    return record


def run(args: argparse.Namespace) -> int:
    sizes = parse_sizes(args.sizes)
    if args.size_budget is not None and args.size_budget <= 0:
        raise CliError(f"--size-budget must be positive, got {args.size_budget}")
    out_dir: Path = args.out or DEFAULT_OUT
    if out_dir.suffix == ".json":
        raise CliError(
            f"--out with --scale names a directory (for scale.json, scale.png): {out_dir}"
        )
    log = not args.json
    cluster = getattr(args, "redis_cluster", 0) or 0
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results = []
    with tempfile.TemporaryDirectory(prefix="edgeflow-scale-") as tmp:
        for members in sizes:
            budget = args.size_budget or default_budget(members)
            if log:
                print(f"== {members:,} members (budget {budget:.0f}s)", file=sys.stderr, flush=True)
            record = run_size(members, args.seed, budget, Path(tmp), log, cluster)
            results.append(record)
            if log:
                print(f"== {members:,} members: {record['status']} in {record['wall_s']}s"
                      + (f": {record['error']}" if record.get("error") else ""),
                      file=sys.stderr, flush=True)  # fmt: skip
    report = assemble(results, args.seed, started, time.perf_counter() - t0)
    report["redis_cluster"] = cluster
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"scale-cluster{cluster}" if cluster else "scale"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    report["plot"] = plot(report, out_dir / f"{stem}.png")
    if args.json:
        print(json.dumps(report, default=_jsonable))
    else:
        print(markdown_table(report))
        wrote = [str(out_dir / f"{stem}.json"), *([report["plot"]] if report["plot"] else [])]
        print(f"\nwrote {' and '.join(wrote)}")
    return 0 if all(r.get("status") == "ok" for r in results) else 1


# ---- the report ---------------------------------------------------------------------------------
# (key, label, unit) of the per-size figures the table, the ratios and the plot show.
TIMES = [
    ("generate_s", "generate the graph", "s"),
    ("write_s", "write the edge list", "s"),
    ("ingest_s", "ingest (parse + store in Redis)", "s"),
    ("train_s", "train, total", "s"),
    ("services_start_s", "start the services", "s"),
    ("offline_wall_s", "offline job, every member (2 shards), wall", "s"),
]
LATENCIES = [
    ("recommend_p50_ms", "`Recommend` p50, sequential", "ms"),
    ("recommend_p99_ms", "`Recommend` p99, sequential", "ms"),
    ("capacity_p99_ms", "`Recommend` p99 at capacity", "ms"),
    ("generate_graph_typical_p50_ms", "`Generate` graph, typical member, p50", "ms"),
    ("generate_graph_hub_p50_ms", "`Generate` graph, hub, p50", "ms"),
    ("generate_ebr_p50_ms", "`Generate` ebr (limit 100), p50", "ms"),
    ("ebr_p50_ms", "`Generate` ebr over the recall sample, p50", "ms"),
    ("ebr_p99_ms", "`Generate` ebr over the recall sample, p99", "ms"),
    ("features_pairs_500_p50_ms", "`GetFeatures` 500 candidates with pairs, p50", "ms"),
    ("score_500_p50_ms", "`Score` 500 rows, p50", "ms"),
    ("merge_500_p50_ms", "`Merge` 500 rows, p50", "ms"),
    ("nearline_freshness_p50_ms", "nearline freshness p50", "ms"),
    ("nearline_freshness_p99_ms", "nearline freshness p99", "ms"),
]
RATES = [
    ("capacity_qps", "capacity (open loop, p99 <= 100 ms, <= 1% partial+failed)", "QPS"),
    ("offline_pairs_per_s", "offline pairs scored per second, job (start-up included)", "pairs/s"),
    ("offline_scoring_pairs_per_s", "offline pairs scored per second, shards scoring", "pairs/s"),
]
QUALITY = [("ebr_recall_at_100", "EBR recall@100 against exact search", "")]
QUALITY_KEYS = {key for key, _, _ in QUALITY}
MEMORY = [
    ("rss_mb_total", "RSS of the suite's processes, total", "MiB"),
    ("redis_used_memory_mb", "Redis used_memory", "MiB"),
    ("offline_peak_rss_mb_process", "offline job, largest process peak RSS", "MiB"),
]
PROCESSES = ("redis", "candidates", "features", "scoring", "merging", "gateway", "nearline")


def train_steps(results: list[dict[str, Any]]) -> list[str]:
    """The training steps (TrainReport.seconds) the records name, in their order."""
    steps: list[str] = []
    for r in results:
        steps += [k for k in r.get("train_seconds") or {} if k != "total" and k not in steps]
    return steps


def table_rows(results: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(key, label, unit) of every row of the table, in order."""
    train = [(f"train_{k}_s", f"train: {k}", "s") for k in train_steps(results)]
    procs = [(f"rss_{p}", f"RSS {p}", "MiB") for p in PROCESSES]
    return TIMES[:4] + train + TIMES[4:] + LATENCIES + RATES + QUALITY + MEMORY + procs


def _rows(r: dict[str, Any]) -> dict[str, Any]:
    """A record's figures flat, with the per-process RSS as rss_<name>."""
    flat = dict(r)
    for name, mb in (r.get("rss_mb") or {}).items():
        flat[f"rss_{name}"] = mb
    for key, s in (r.get("train_seconds") or {}).items():
        flat[f"train_{key}_s"] = s
    return flat


def assemble(
    results: list[dict[str, Any]], seed: int, started: str, seconds: float
) -> dict[str, Any]:
    ok = [r for r in results if r.get("status") == "ok"]
    base = min(ok, key=lambda r: r["members"]) if ok else None
    ratios: dict[str, dict[str, float | None]] = {}
    targets: dict[str, Any] = {}
    if base is not None:
        b = _rows(base)
        for r in ok:
            flat = _rows(r)
            ratios[str(r["members"])] = {
                key: _ratio(flat.get(key), b.get(key)) for key, _, _ in table_rows(results)
            }
        for key, limit in TARGETS.items():
            targets[key] = {
                "limit_ratio": limit,
                "by_members": {
                    str(r["members"]): {
                        "ratio": ratios[str(r["members"])].get(key),
                        "met": _met(ratios[str(r["members"])].get(key), limit),
                    }
                    for r in ok
                    if r is not base
                },
            }
    return {
        "sizes": [r["members"] for r in results],
        "seed": seed,
        "started": started,
        "seconds": round(seconds, 1),
        "machine": f"{platform.machine()} {os.cpu_count() or 0} cpus, "
        f"python {platform.python_version()}",
        "baseline_members": base["members"] if base is not None else None,
        "ratios": ratios,
        "targets": targets,
        "results": results,
    }


def _ratio(value: Any, base: Any) -> float | None:
    if not isinstance(value, int | float) or not isinstance(base, int | float) or not base:
        return None
    return round(float(value) / float(base), 3)


def _met(ratio: float | None, limit: float) -> bool | None:
    return None if ratio is None else ratio <= limit


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if value < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(report: dict[str, Any]) -> str:
    """One row per figure, one column per size; past the baseline size, its ratio to it."""
    results = report["results"]
    base = report.get("baseline_members")
    head = ["measure"] + [f"{r['members']:,}" for r in results]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    status = ["status"] + [
        r["status"] if r["status"] == "ok" else f"**{r['status']}** ({r.get('phase')})"
        for r in results
    ]
    lines.append("| " + " | ".join(status) + " |")
    lines.append("| edges | " + " | ".join(_fmt(r.get("edges")) for r in results) + " |")
    for key, label, unit in table_rows(results):
        cells = []
        for r in results:
            flat = _rows(r)
            value = flat.get(key)
            cell = f"{value:.4f}" if key in QUALITY_KEYS and value is not None else _fmt(value)
            ratio = report["ratios"].get(str(r["members"]), {}).get(key)
            if ratio is not None and r["members"] != base:
                cell += f" ({ratio:.2f}x)"
            cells.append(cell)
        if all(c == "-" for c in cells):
            continue
        lines.append(f"| {label}{f' ({unit})' if unit else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> str | None:
    """Log-log panels, one line per cost against members; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    results = [_rows(r) for r in report["results"]]
    stage_keys = [f"train_{k}_s" for k in train_steps(report["results"])]
    panels: list[tuple[str, list[tuple[str, str, str]]]] = [
        ("build and batch time (s)", TIMES),
        ("training stages (s)", [(k, k[6:-2], "s") for k in stage_keys]),
        ("serving latency (ms)", LATENCIES),
        ("throughput", RATES),
        ("memory (MiB)", MEMORY + [(f"rss_{p}", f"RSS {p}", "MiB") for p in PROCESSES]),
        ("EBR recall@100", QUALITY),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    colors = [plt.get_cmap("tab10")(i) for i in range(10)]
    for ax, (title, series) in zip(axes.flat, panels, strict=True):
        for n, (key, label, _) in enumerate(series):
            pts = [(r["members"], r.get(key)) for r in results]
            pts = [(x, y) for x, y in pts if isinstance(y, int | float) and y > 0]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=label.replace("`", ""),
                        color=colors[n % 10], linestyle=("-", "--", ":")[n // 10 % 3])  # fmt: skip
        ax.set_xscale("log")
        if series is QUALITY:  # a share, not a cost: linear
            ax.set_ylim(0, 1.05)
        else:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("members")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    failed = [r for r in report["results"] if r.get("status") != "ok"]
    note = "; ".join(f"{r['members']:,}: {r['status']} in {r.get('phase')}" for r in failed)
    fig.suptitle(
        "edgeflow at scale (generated social graphs)" + (f" (not complete: {note})" if note else "")
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---- the child's command line -------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeflow_bench.scale",
                                description="one size of `edgeflow bench --scale`")  # fmt: skip
    p.add_argument("--members", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--home-root", type=Path, required=True)
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--redis-cluster", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    return run_one(a.members, a.seed, a.result, a.home_root, a.budget, not a.quiet, a.redis_cluster)


if __name__ == "__main__":
    sys.exit(main())
