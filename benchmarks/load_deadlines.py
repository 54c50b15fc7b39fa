#!/usr/bin/env python
"""Concurrent load: do expensive requests stall the others past their deadlines?

Two levels, each on its own graphs, each comparing configurations of the services (their
environment, see CONFIGS) against the first one, the baseline, measured in the same run:

- `candidates`: the candidates service alone, as a real process, on a graph in its own
  Redis (no training needed, so large graphs are cheap). Requests arrive at `--rate` per
  second (Poisson, open loop: a slow answer does not slow the arrivals), each what the
  gateway sends for a request: friends of friends (limit 500, Adamic-Adar, 40 ms), the
  precomputed list (20 ms) and popular (20 ms), in one GenerateMany or one per node timeout
  as the configuration's EDGEFLOW_CANDIDATE_BATCHES says, by the gateway's rule. A node
  counts as answered when its answer arrived while the gateway would still wait for it;
  latency percentiles are over the answers that came in time.
- `recommend`: the whole suite (Redis and the services as real processes, trained once per
  graph), N concurrent callers of `Recommend` (pymk, k=50) in a closed loop, for each N of
  `--concurrency` (4: below saturation on 2 shared cores, 8: past it): throughput,
  p50/p99, the share of partial and failed responses and which nodes degraded and why.

Each graph's configurations alternate over `--rounds`, so drift on a shared machine hits
them alike; the summary is the median over rounds, with ratios to the baseline.

    .venv/bin/python benchmarks/load_deadlines.py --out benchmarks/results/load_deadlines.json
    .venv/bin/python benchmarks/load_deadlines.py --level candidates --rounds 1

Graphs: `facebook` (../shared/data/facebook_combined.txt), `synthetic:N` (the generated
social graph of N members, seed 1), `powerlaw:N[:E]` (a heavy-tailed Chung-Lu graph of N
members, E edges each, 5.4 by default: the shape of SNAP's Email-Enron at N=36692; with
E=15 at N=100000, hubs of 10,000+ and two-hop neighbourhoods of a million), or a path to an
edge list. Load goes to loopback only; every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edgeflow.cli.harness import suite_config
from edgeflow.config import REPO_ROOT
from edgeflow.graph import Graph, read_edge_file
from edgeflow.local import suite as local
from edgeflow.local.redis_server import stop_pid
from edgeflow.shell import auth
from edgeflow.shell.server import channel
from edgeflow.stores import lists
from edgeflow.stores.graph_store import save_graph
from edgeflow.stores.redis_client import connect
from edgeflow.v1 import candidates_pb2, candidates_pb2_grpc, gateway_pb2, gateway_pb2_grpc

FACEBOOK = REPO_ROOT.parent / "shared" / "data" / "facebook_combined.txt"

# Environment of the services per configuration. The first is the baseline: the behaviour
# before this work (request CPU work on the event loop, no friends-of-friends budget, work
# started however late, and every candidate source of a request in one GenerateMany).
BASELINE = {
    "EDGEFLOW_CPU_THREADS": "0",
    "EDGEFLOW_FOF_MAX_VISITS": "0",
    "EDGEFLOW_DEADLINE_CHECKS": "0",
    "EDGEFLOW_CANDIDATE_BATCHES": "all",
}
CONFIGS: dict[str, dict[str, str]] = {
    "baseline": BASELINE,
    # One change at a time on top of the baseline, then all of them (the defaults).
    "batches": {**BASELINE, "EDGEFLOW_CANDIDATE_BATCHES": "timeout"},
    "auto": {**BASELINE, "EDGEFLOW_CANDIDATE_BATCHES": "auto"},
    "deadlines": {**BASELINE, "EDGEFLOW_DEADLINE_CHECKS": "1"},
    "threads": {**BASELINE, "EDGEFLOW_CPU_THREADS": "2"},
    "budget": {**BASELINE, "EDGEFLOW_FOF_MAX_VISITS": "100000"},
    "defaults": {},
}
# What the gateway sends the candidates service for one pymk request (plus popular, the
# cheap source of the popular-source experiment): node, source, limit, params, timeout.
CANDIDATE_NODES = (
    ("fof", "graph", 500, {"weight": "adamic_adar"}, 40),
    ("precomputed", "precomputed", 200, {"list": "pymk"}, 20),
    ("popular", "popular", 50, {}, 20),
)
# Bounds of one measured block, whatever the load does.
BLOCK_TIMEOUT_S = 300.0
CALL_TIMEOUT_S = 5.0
START_TIMEOUT_S = 600.0


def note(msg: str) -> None:
    print(f"[load_deadlines] {msg}", file=sys.stderr, flush=True)


# ---- graphs and members ----------------------------------------------------------------------
def load_graph(spec: str) -> tuple[str, Graph]:
    if spec == "facebook":
        src, dst = read_edge_file(FACEBOOK)
        return "facebook", Graph.from_edges(src, dst)
    kind, _, size = spec.partition(":")
    if kind == "synthetic":
        from edgeflow.build.synthetic import social_graph

        n = int(size.replace("_", ""))
        edges = social_graph(members=n, seed=1)
        return f"synthetic-{n}", Graph.from_edges(edges[:, 0], edges[:, 1])
    if kind == "powerlaw":  # powerlaw:N or powerlaw:N:EDGES_PER_MEMBER
        n_text, _, per = size.partition(":")
        n = int(n_text.replace("_", ""))
        if per:
            return f"powerlaw-{n}x{per}", power_law_graph(n, float(per))
        return f"powerlaw-{n}", power_law_graph(n)
    src, dst = read_edge_file(Path(spec))
    return Path(spec).name, Graph.from_edges(src, dst)


def power_law_graph(n: int, edges_per_member: float = 5.4, alpha: float = 0.7) -> Graph:
    """Chung-Lu: each edge's ends drawn in proportion to rank^-alpha (a degree tail of
    exponent about 1 + 1/alpha), so a few members know thousands."""
    rng = np.random.default_rng(1)
    weights = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    weights /= weights.sum()
    m = int(n * edges_per_member)
    return Graph.from_edges(rng.choice(n, m, p=weights), rng.choice(n, m, p=weights))


def two_hop_visits(graph: Graph) -> np.ndarray:
    """Per member, the neighbour-list entries a full friends-of-friends expansion reads."""
    deg = graph.degree
    out = np.zeros(graph.n, dtype=np.int64)
    out[deg > 0] = np.add.reduceat(deg[graph.indices], graph.indptr[:-1][deg > 0])
    return out


def pick_members(graph: Graph, n: int, hub_share: float, seed: int) -> list[int]:
    """`n` members with at least one connection; `hub_share` of them among the 1% with the
    largest two-hop neighbourhoods (where friends of friends is most expensive)."""
    rng = np.random.default_rng(seed)
    alive = np.flatnonzero(graph.degree > 0)
    hubs = np.argsort(-two_hop_visits(graph))[: max(1, graph.n // 100)]
    k = round(n * hub_share)
    picks = np.concatenate([rng.choice(hubs, k), rng.choice(alive, n - k)])
    rng.shuffle(picks)
    return [int(m) for m in graph.ids[picks]]


def describe(graph: Graph) -> dict[str, Any]:
    visits = two_hop_visits(graph)
    return {
        "members": graph.n,
        "edges": graph.edge_count,
        "max_degree": int(graph.degree.max()),
        "two_hop_visits_p50": int(np.percentile(visits, 50)),
        "two_hop_visits_p99": int(np.percentile(visits, 99)),
        "two_hop_visits_max": int(visits.max()),
    }


# ---- processes -------------------------------------------------------------------------------
@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def redis_suite(graph: Graph, seed: int, train: bool) -> Iterator[local.Suite]:
    """A Redis on a free port with the graph stored (and, with `train`, everything trained
    on it); nothing else started. Stopped and removed afterwards."""
    home = Path(tempfile.mkdtemp(prefix="edgeflow-load-"))
    suite = local.new_suite(home, free_ports=True)
    try:
        local.ensure_redis(suite)
        cfg = suite_config(suite)
        save_graph(connect(cfg.redis_url), graph)
        if train:
            from edgeflow.build.train import train as train_all

            t = time.perf_counter()
            train_all(cfg, seed=seed)
            note(f"trained on {graph.n:,} members in {time.perf_counter() - t:.0f} s")
        yield suite
    finally:
        local.stop_suite(suite)
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def all_services(suite: local.Suite, env: dict[str, str]) -> Iterator[None]:
    """The suite's services, started with `env` added to their environment."""
    with environment(env):
        local.start_services(suite, timeout_s=START_TIMEOUT_S)
    try:
        yield
    finally:
        for name in reversed(local.SERVICES):
            pid = suite.pids.pop(name, 0)
            if pid:
                stop_pid(pid)
        _wait_ports_free([suite.ports[n] for n in local.SERVICES]
                         + list(suite.metrics_ports.values()))  # fmt: skip


@contextmanager
def candidates_service(suite: local.Suite, env: dict[str, str]) -> Iterator[int]:
    """Only `edgeflow serve candidates`, with `env`; yields its pid once it is SERVING."""
    log = open(suite.home / "candidates.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeflow.cli.main", "serve", "candidates"],
        env={**suite.env(), **env, "PORT": str(suite.ports["candidates"]), "METRICS_PORT": "0"},
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    log.close()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not local._serving(suite.addr("candidates"), "candidates"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (suite.home / "candidates.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the candidates service did not start:\n{tail}")
            time.sleep(0.2)
        yield proc.pid
    finally:
        stop_pid(proc.pid)
        _wait_ports_free([suite.ports["candidates"]])


def _wait_ports_free(ports: list[int], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(local.port_free(p) for p in ports) and time.monotonic() < deadline:
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live descendants."""
    stats: dict[int, tuple[int, int]] = {}  # pid -> (parent, ticks)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:13]))
    total, frontier, seen = 0, [pid], set()
    while frontier:  # bounded: each pid is visited once
        p = frontier.pop()
        if p in seen:
            continue
        seen.add(p)
        total += stats.get(p, (0, 0))[1]
        frontier += [c for c, (parent, _) in stats.items() if parent == p]
    return total / os.sysconf("SC_CLK_TCK")


# ---- load ------------------------------------------------------------------------------------
async def closed_loop(members: list[int], concurrency: int, call: Any) -> float:
    """`concurrency` callers each take the next member and `await call(member)`, until the
    members or BLOCK_TIMEOUT_S run out; returns the wall time."""
    it = iter(members)
    stop_at = time.monotonic() + BLOCK_TIMEOUT_S

    async def caller() -> None:
        for m in it:
            if time.monotonic() > stop_at:
                return
            await call(m)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - t0


async def open_loop(members: list[int], rate: float, call: Any, seed: int) -> float:
    """Start `call(member)` for each member at Poisson arrivals of `rate` per second, however
    many are still in flight (as independent callers would), until the members or
    BLOCK_TIMEOUT_S run out; returns the wall time until the last one finished."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(members))
    t0 = time.perf_counter()
    due = t0
    tasks = []
    for m, gap in zip(members, gaps.tolist(), strict=True):
        due += gap
        if due - t0 > BLOCK_TIMEOUT_S:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.ensure_future(call(m)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - t0


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values or [float("nan")]), q)), 2)


async def drive_recommend(
    addr: str, members: list[int], concurrency: int, pids: dict[str, int], key: str | None
) -> dict[str, Any]:
    """Closed-loop Recommend over `members` (each once, after 20 to warm up)."""
    ch = channel(addr, key)
    stub = gateway_pb2_grpc.RecommenderStub(ch)
    for m in members[:20]:
        await stub.Recommend(gateway_pb2.RecommendRequest(surface="pymk", member=m, k=50),
                             timeout=CALL_TIMEOUT_S)  # fmt: skip
    lats: list[float] = []
    partial = 0
    failed: Counter[str] = Counter()
    failed_why: Counter[str] = Counter()
    degraded: Counter[str] = Counter()

    async def call(m: int) -> None:
        nonlocal partial
        t = time.perf_counter()
        req = gateway_pb2.RecommendRequest(surface="pymk", member=m, k=50)
        try:
            resp = await stub.Recommend(req, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            failed[exc.code().name] += 1
            failed_why[(exc.details() or "")[:90]] += 1
            return
        lats.append((time.perf_counter() - t) * 1000)
        if resp.partial:
            partial += 1
            for d in resp.degraded:
                degraded[_reason(d)] += 1

    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    wall = await closed_loop(members[20:], concurrency, call)
    cpu = {name: round((cpu_seconds(pid) - cpu0[name]) / wall, 2) for name, pid in pids.items()}
    await ch.close()
    done = len(lats) + sum(failed.values())
    return {
        "requests": done,
        "qps": round(len(lats) / wall, 1),
        "p50_ms": _pct(lats, 50),
        "p99_ms": _pct(lats, 99),
        "partial": partial,
        "failed": sum(failed.values()),
        "partial_share": round(partial / max(done, 1), 4),
        "failed_share": round(sum(failed.values()) / max(done, 1), 4),
        "failed_codes": dict(failed),
        "failed_why": dict(failed_why.most_common(4)),
        "degraded": dict(degraded.most_common(8)),
        "cpu_cores": cpu,  # each process's CPU time over the block's wall time
    }


def _reason(text: str) -> str:
    """`fof: timed out after 40 ms (node ...) (fallback: empty)` -> `fof: timed out`."""
    node, _, rest = text.partition(": ")
    return f"{node}: {rest.split(' after ')[0].split(' (')[0][:60]}"


async def drive_candidates(
    addr: str, members: list[int], rate: float, batching: str, pid: int, seed: int
) -> dict[str, Any]:
    """One request's candidate nodes (CANDIDATE_NODES) at `rate` requests per second (open
    loop), batched as the gateway batches them; a node is answered when its result came
    within its own timeout."""
    ch = channel(addr)
    stub = candidates_pb2_grpc.CandidateServiceStub(ch)
    # As the gateway batches pymk's sources (and popular, which the popular-source
    # experiment feeds to features like them): "all" and "auto" in one call, "timeout" in
    # one per timeout. With "auto" every node may wait for the whole call, since what
    # consumes the faster ones waits on friends of friends anyway (gateway/engine.py).
    groups: dict[int, list[tuple[str, str, int, dict[str, str], int]]] = {}
    for node in CANDIDATE_NODES:
        groups.setdefault(node[4] if batching == "timeout" else 0, []).append(node)
    lat: dict[str, list[float]] = {n[0]: [] for n in CANDIDATE_NODES}
    ok: Counter[str] = Counter()
    why: Counter[str] = Counter()
    partial = capped = finished = 0

    async def call(m: int) -> None:
        nonlocal partial, capped, finished
        t = time.perf_counter()
        tasks = []
        for group in groups.values():
            req = candidates_pb2.GenerateManyRequest()
            for _, source, limit, params, timeout_ms in group:
                req.requests.add(member=m, source=source, limit=limit, params=params,
                                 timeout_ms=timeout_ms)  # fmt: skip
            longest = max(n[4] for n in group)
            tasks.append(asyncio.ensure_future(stub.GenerateMany(req, timeout=longest / 1000)))
        # Each node waits for its own call, at most its own timeout, all at once (as the
        # gateway's nodes do).
        waits = [
            _node_answer(task, j, node, wait_ms / 1000, t)
            for group, task in zip(groups.values(), tasks, strict=True)
            for j, (node, *_, timeout_ms) in enumerate(group)
            for wait_ms in [max(n[4] for n in group) if batching == "auto" else timeout_ms]
        ]
        missed = False
        for node, result, at_ms, error in await asyncio.gather(*waits):
            if error:
                why[f"{node}: {error}"] += 1
                missed = True
                continue
            lat[node].append(at_ms)
            ok[node] += 1
            capped += int(node == "fof" and result.response.note.startswith("hub:"))
        for task in tasks:
            task.cancel()
            with suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
        partial += int(missed)
        finished += 1

    for m in members[:20]:  # warm-up
        await call(m)
    lat = {k: [] for k in lat}
    ok.clear()
    why.clear()
    partial = capped = finished = 0
    cpu0 = cpu_seconds(pid)
    wall = await open_loop(members[20:], rate, call, seed)
    cpu = round((cpu_seconds(pid) - cpu0) / wall, 2)
    await ch.close()
    done = finished
    return {
        "requests": done,
        "qps": round(done / wall, 1),
        "partial_share": round(partial / max(done, 1), 4),
        "failed_share": 0.0,
        **{f"{node}_answered_share": round(ok[node] / max(done, 1), 4) for node in lat},
        **{f"{node}_p50_ms": _pct(v, 50) for node, v in lat.items()},
        **{f"{node}_p99_ms": _pct(v, 99) for node, v in lat.items()},
        "p50_ms": _pct([x for v in lat.values() for x in v], 50),
        "p99_ms": _pct([x for v in lat.values() for x in v], 99),
        "fof_capped": capped,
        "missed": dict(why.most_common(8)),
        "cpu_cores": cpu,
    }


_CODES = {code.value[0]: code for code in grpc.StatusCode}


async def _node_answer(
    task: asyncio.Future[candidates_pb2.GenerateManyResponse],
    j: int,
    node: str,
    timeout_s: float,
    t0: float,
) -> tuple[str, Any, float, str]:
    """(node, its result, ms since t0, why it missed or "") once its call answered or its
    timeout passed, whichever came first."""
    try:
        many = await asyncio.wait_for(asyncio.shield(task), timeout_s - (time.perf_counter() - t0))
    except TimeoutError:
        return node, None, 0.0, "timed out"
    except grpc.aio.AioRpcError as exc:
        return node, None, 0.0, exc.code().name
    result = many.results[j]
    if result.code:
        return node, result, 0.0, _CODES[result.code].name
    return node, result, (time.perf_counter() - t0) * 1000, ""


def write_lists_for(suite: local.Suite, graph: Graph, members: list[int]) -> None:
    """A precomputed pymk list entry (200 members) for every member the load asks for."""
    rng = np.random.default_rng(5)
    uniq = np.unique(np.asarray(members, dtype=np.int64))
    entries = [
        (rng.choice(graph.ids, 200, replace=False), np.sort(rng.random(200))[::-1])
        for _ in range(uniq.size)
    ]
    lists.write_lists(connect(suite.redis_url), "pymk", uniq, entries)


# ---- summary ---------------------------------------------------------------------------------
_SUMMARY_KEYS = ("qps", "p50_ms", "p99_ms", "partial_share", "failed_share")


def summarise(blocks: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per configuration: the median over rounds of each measure, then ratios to the first."""
    out: dict[str, Any] = {}
    for name, runs in blocks.items():
        keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
        med = {k: round(float(np.median([r[k] for r in runs])), 4) for k in keys}
        out[name] = {**med, "rounds": runs}
    base_name = next(iter(blocks))
    base = out[base_name]
    for name in blocks:
        if name != base_name:
            out[name]["vs_" + base_name] = {
                f"{k}_ratio": _ratio(out[name][k], base[k]) for k in _SUMMARY_KEYS
            }
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


# ---- main ------------------------------------------------------------------------------------
def run_level(
    level: str, spec: str, configs: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    name, graph = load_graph(spec)
    info = describe(graph)
    note(f"{level} on {name}: {json.dumps(info)}")
    members = pick_members(graph, args.requests + 20, args.hub_share, args.seed)
    callers = args.concurrency if level == "recommend" else [0]
    # Per number of callers (recommend level; one open-loop entry for candidates), per
    # configuration, one block per round.
    blocks: dict[int, dict[str, list[dict[str, Any]]]] = {
        n: {c: [] for c in configs} for n in callers
    }
    with redis_suite(graph, args.seed, train=level == "recommend") as suite:
        if level == "candidates":
            write_lists_for(suite, graph, members)
        for r in range(args.rounds):
            for c in configs:
                env = CONFIGS[c]
                if level == "candidates":
                    with candidates_service(suite, env) as pid:
                        batching = env.get("EDGEFLOW_CANDIDATE_BATCHES", "auto")
                        block = asyncio.run(drive_candidates(
                            suite.addr("candidates"), members, args.rate, batching, pid,
                            args.seed + r,
                        ))  # fmt: skip
                    note(f"{level} {name} round {r + 1} {c}: {json.dumps(block)}")
                    blocks[0][c].append(block)
                    continue
                with all_services(suite, env):
                    for n in callers:
                        block = asyncio.run(drive_recommend(
                            suite.addr("gateway"), members, n, dict(suite.pids),
                            auth.local_key(suite.home),
                        ))  # fmt: skip
                        note(f"{level} {name} round {r + 1} {c} c{n}: {json.dumps(block)}")
                        blocks[n][c].append(block)
    if level == "candidates":
        return {"graph": name, "rate": args.rate, **info, **summarise(blocks[0])}
    return {
        "graph": name,
        **info,
        "by_callers": {f"c{n}": summarise(by_config) for n, by_config in blocks.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--level", choices=("candidates", "recommend", "both"), default="both")
    ap.add_argument(
        "--candidates-graphs",
        default="facebook,powerlaw:36692,powerlaw:100000:15,synthetic:200000",
        help="graphs of the candidates level (comma-separated)",
    )
    ap.add_argument(
        "--graphs",
        default="facebook,synthetic:100000,powerlaw:100000:15",
        help="graphs of the recommend level: facebook, synthetic:N, powerlaw:N[:E] or a path",
    )
    ap.add_argument(
        "--configs",
        default="baseline,defaults",
        help=f"comma-separated, the first is the baseline (known: {', '.join(CONFIGS)})",
    )
    ap.add_argument(
        "--concurrency",
        default="4,8",
        help="recommend level: numbers of concurrent callers (comma-separated)",
    )
    ap.add_argument(
        "--rate", type=float, default=150.0, help="candidates level: requests per second"
    )
    ap.add_argument("--requests", type=int, default=600, help="per configuration and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hub-share", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s): {', '.join(unknown)}")
    args.concurrency = [int(n) for n in str(args.concurrency).split(",") if n.strip()]
    if not all(1 <= n <= 64 for n in args.concurrency) or not 20 < args.requests <= 20_000:
        ap.error("--concurrency must be 1..64 and --requests 21..20000")
    if not 1 <= args.rate <= 5000:
        ap.error("--rate must be 1..5000")
    if not 1 <= args.rounds <= 10:
        ap.error("--rounds must be 1..10")

    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "concurrency": args.concurrency,
        "rate": args.rate,
        "requests": args.requests,
        "rounds": args.rounds,
        "hub_share": args.hub_share,
        "configs": {c: CONFIGS[c] for c in configs},
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, "
        f"python {platform.python_version()}",
        "candidates": [],
        "recommend": [],
    }
    levels = ("candidates", "recommend") if args.level == "both" else (args.level,)
    for level in levels:
        specs = args.candidates_graphs if level == "candidates" else args.graphs
        for spec in [g.strip() for g in specs.split(",") if g.strip()]:
            result[level].append(run_level(level, spec, configs, args))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
