#!/usr/bin/env python
"""The member graph's storage at scale: the old path against the new one, in the same run.

For each size it generates a social graph (`social_graph(N, seed=0)`), starts its own Redis
and measures, for the old implementation and the new one:

- ingest: `Graph.from_edges` (build) and `save_graph` (snapshot, meta, per-member adjacency
  SETs, pointer swap; the median of `--ingest-rounds` + 1 runs, the first ones alternating
  old and new), the snapshot write alone, and the Redis memory ingest leaves (INFO
  used_memory, MEMORY USAGE of the snapshot's keys, the largest value);
- loading, per process: `--procs` processes started one after the other, each loading the
  current graph through `GraphStore.load()` as the candidates and features services do, then
  reading every byte of it (as serving does over time). Each reports its load time and its
  RSS, USS (private) and PSS (its share of shared pages) while all of them hold the graph;
- a delta batch of 100 edge states (70% new edges, 30% removals): `Graph.with_edges` on the
  loaded graph, batch after batch, and the refresh a service does after one
  (`append_deltas`, then `GraphStore.load()`, which reads the stream and applies it);
- compaction (`compact_graph`) and the load of the compacted snapshot by a process that
  held the previous one: on the compacting machine and (new only) on another machine, which
  builds the snapshot from the one it holds and the folded deltas instead of downloading it.

The old implementation is the code at OLD_COMMIT (graph.py, graph_store.py, keys.py read
with `git show` and imported as separate modules), so both run on this machine in this run;
`ratios` divide new by old. Durations are medians where repeated.

    .venv/bin/python benchmarks/graph_store.py --sizes 100000 1000000 \
        --out benchmarks/results/graph_store.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import redis
import redis.asyncio as aioredis

from edgeflow.build.synthetic import social_graph
from edgeflow.config import REPO_ROOT
from edgeflow.local.redis_server import start_redis

OLD_COMMIT = "94c8056b3ec1ba9fc3209d38b454a1fd4bf95ec9"
DELTA_EDGES = 100
MB = 1024 * 1024


# ---- the two implementations ------------------------------------------------------------------
def _module(name: str, source: str) -> types.ModuleType:
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    exec(compile(source, f"<{name}@{OLD_COMMIT[:8]}>", "exec"), module.__dict__)
    return module


def _git_show(path: str) -> str:
    return subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:{path}"],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


def implementation(name: str) -> tuple[Any, Any]:
    """(graph module, graph_store module) of `old` (OLD_COMMIT) or `new` (this tree)."""
    if name == "new":
        from edgeflow import graph
        from edgeflow.stores import graph_store

        return graph, graph_store
    if "edgeflow_old_graph_store" in sys.modules:
        return sys.modules["edgeflow_old_graph"], sys.modules["edgeflow_old_graph_store"]
    _module("edgeflow_old_keys", _git_show("services/edgeflow/stores/keys.py"))
    graph = _module("edgeflow_old_graph", _git_show("services/edgeflow/graph.py"))
    source = (
        _git_show("services/edgeflow/stores/graph_store.py")
        .replace("from edgeflow import keys", "import edgeflow_old_keys as keys")
        .replace("from edgeflow.graph import", "from edgeflow_old_graph import")
    )
    return graph, _module("edgeflow_old_graph_store", source)


def memory(pid: int | None = None) -> dict[str, float]:
    info = psutil.Process(pid).memory_full_info()
    return {k: round(getattr(info, k) / MB, 1) for k in ("rss", "uss", "pss")}


# ---- a process that holds the graph -------------------------------------------------------------
def child(impl: str, url: str) -> None:
    """Load the graph as a service does, read all of it, report, and hold it until told."""
    before = memory()
    _, store_mod = implementation(impl)

    async def load() -> tuple[float, Any]:
        client = aioredis.Redis.from_url(url)
        store = store_mod.GraphStore(client)
        t0 = time.perf_counter()
        loaded = await store.load()
        took = time.perf_counter() - t0
        await client.aclose()
        assert loaded, "no graph loaded"
        return took, store

    took, store = asyncio.run(load())
    graph = store.graph
    digest = graph.data_hash()  # every byte of ids, indptr and indices, as serving reads them
    report = {"load_s": took, "members": graph.n, "edges": graph.edge_count, "hash": digest,
              "before_load": before, "after_load": memory()}  # fmt: skip
    # Then 20 delta batches, as a service applies them between two snapshots, and the
    # per-member arrays a service reads after each (degree).
    rng = np.random.default_rng(os.getpid())
    for _ in range(20):
        rows = rng.integers(0, graph.n, size=DELTA_EDGES * 3 // 10).tolist()
        nbrs = [(r, graph.neighbors(r)) for r in rows]
        gone = [(int(graph.ids[r]), int(graph.ids[x[0]])) for r, x in nbrs if x.size]
        adds = rng.choice(graph.ids, size=(DELTA_EDGES - len(gone), 2))
        pairs = np.concatenate([adds, np.asarray(gone, dtype=np.int64).reshape(-1, 2)])
        graph = graph.with_edges(pairs, np.arange(len(pairs)) < len(adds), graph.version)
        graph.degree.sum()
    print(json.dumps(report), flush=True)
    sys.stdin.readline()


def processes_holding_graph(impl: str, url: str, procs: int) -> dict[str, Any]:
    env = dict(os.environ)
    children: list[subprocess.Popen[str]] = []
    reports = []
    try:
        for _ in range(procs):
            p = subprocess.Popen(
                [sys.executable, __file__, "--child", impl, "--redis", url],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            children.append(p)
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"{impl} loader process exited with {p.wait()}")
            reports.append(json.loads(line))
        together = [memory(p.pid) for p in children]  # all of them holding the graph
    finally:
        for p in children:
            if p.stdin is not None:
                p.stdin.write("\n")
                p.stdin.flush()
            p.wait(timeout=60)
    return {
        "load_s": [round(r["load_s"], 3) for r in reports],
        "rss_mb_before_load": [r["before_load"]["rss"] for r in reports],
        # Right after loading (and reading every byte), each process on its own:
        "rss_mb": [r["after_load"]["rss"] for r in reports],
        "uss_mb": [r["after_load"]["uss"] for r in reports],
        "graph_uss_mb": [
            round(r["after_load"]["uss"] - r["before_load"]["uss"], 1) for r in reports
        ],
        # After 20 delta batches each, all of them holding their graph at once:
        "rss_mb_after_deltas": [m["rss"] for m in together],
        "uss_mb_after_deltas": [m["uss"] for m in together],
        "pss_mb_after_deltas": [m["pss"] for m in together],
        "same_graph": len({r["hash"] for r in reports}) == 1,
    }


# ---- one implementation at one size ---------------------------------------------------------
def delta_batches(graph: Any, rng: np.random.Generator, batches: int) -> list[tuple[Any, Any]]:
    src, dst = graph.edges()
    out = []
    for _ in range(batches):
        adds = rng.choice(graph.ids, size=(int(DELTA_EDGES * 0.7), 2))
        gone = rng.integers(0, src.size, size=DELTA_EDGES - adds.shape[0])
        pairs = np.concatenate([adds, np.stack([src[gone], dst[gone]], axis=1)])
        present = np.arange(DELTA_EDGES) < adds.shape[0]
        out.append((pairs, present))
    return out


def redis_memory(client: redis.Redis, prefix: str) -> dict[str, float]:
    used = int(client.info("memory")["used_memory"])
    snapshot = sum(
        int(client.memory_usage(k) or 0) for k in client.scan_iter(match=prefix + "*", count=1000)
    )
    return {"used_memory_mb": round(used / MB, 1), "graph_keys_mb": round(snapshot / MB, 1)}


def write_snapshot(impl: str, client: redis.Redis, graph: Any) -> float:
    """Seconds to write the snapshot alone (no adjacency SETs, no pointer swap): the old
    code's two lines for it, or the new chunked writer."""
    _, store_mod = implementation(impl)
    client.flushall()
    t0 = time.perf_counter()
    if impl == "new":
        store_mod._write_snapshot(client, graph, store_mod.CHUNK_BYTES)
    else:
        old_keys = sys.modules["edgeflow_old_keys"]
        client.set(old_keys.graph_snapshot(graph.version), graph.to_bytes())
        client.hset(old_keys.graph_meta(graph.version),
                    mapping={"members": graph.n, "edges": graph.edge_count,
                             "created_at": time.time(), "hash": graph.data_hash()})  # fmt: skip
    took = time.perf_counter() - t0
    client.flushall()
    return took


def ingest_rounds(
    impls: list[str], edges: np.ndarray, n: int, url: str, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """`save_graph` and the snapshot write alone, impls alternating, `rounds` times: the
    machine's drift hits both alike."""
    client = redis.Redis.from_url(url)
    new_graph = implementation("new")[0].Graph
    base = new_graph.from_edges(edges[:, 0], edges[:, 1], members=np.arange(n))
    graphs = {impl: implementation(impl)[0].Graph(base.ids, base.indptr, base.indices,
                                                  base.version) for impl in impls}  # fmt: skip
    out: dict[str, dict[str, list[float]]] = {i: {"save": [], "snapshot": []} for i in impls}
    for _ in range(rounds):
        for impl in impls:
            _, store_mod = implementation(impl)
            client.flushall()
            t0 = time.perf_counter()
            store_mod.save_graph(client, graphs[impl])
            out[impl]["save"].append(round(time.perf_counter() - t0, 3))
            out[impl]["snapshot"].append(round(write_snapshot(impl, client, graphs[impl]), 3))
    client.flushall()
    client.close()
    return out


def measure(
    impl: str, edges: np.ndarray, n: int, url: str, procs: int, batches: int,
    ingest: dict[str, list[float]],
) -> dict:  # fmt: skip
    graph_mod, store_mod = implementation(impl)
    client = redis.Redis.from_url(url)
    client.flushall()
    client.config_set("save", "")
    base_used = int(client.info("memory")["used_memory"])
    t0 = time.perf_counter()
    graph = graph_mod.Graph.from_edges(edges[:, 0], edges[:, 1], members=np.arange(n))
    out: dict[str, Any] = {"members": graph.n, "edges": graph.edge_count}
    out["build_s"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    store_mod.save_graph(client, graph)
    runs = [*ingest["save"], round(time.perf_counter() - t0, 3)]
    out["ingest_s"] = round(statistics.median(runs), 3)
    out["ingest_s_runs"] = runs
    out["snapshot_write_s"] = round(statistics.median(ingest["snapshot"]), 3)
    mem = redis_memory(client, "ef:graph:")
    mem["graph_total_mb"] = round((int(client.info("memory")["used_memory"]) - base_used) / MB, 1)
    out["redis"] = mem
    out["redis"]["largest_value_mb"] = round(
        max(
            int(client.strlen(k))
            for k in client.scan_iter(match="ef:graph:*", count=1000)
            if client.type(k) == b"string"
        ) / MB, 2,
    )  # fmt: skip
    del graph

    out["processes"] = processes_holding_graph(impl, url, procs)

    # Delta batches on a loaded graph: the Graph call, then the refresh a service runs.
    loaded = store_mod.load_graph(client)
    rng = np.random.default_rng(1)
    times = []
    current = loaded
    for pairs, present in delta_batches(loaded, rng, batches):
        t0 = time.perf_counter()
        current = current.with_edges(pairs, present, version=current.version)
        times.append(time.perf_counter() - t0)
    out["delta_with_edges_ms"] = _stats_ms(times)

    async def refreshes() -> dict[str, Any]:
        aclient = aioredis.Redis.from_url(url)
        store = store_mod.GraphStore(aclient)
        # The new store on another machine (its own snapshot directory); the old one has none.
        other = (
            store_mod.GraphStore(aclient, 2.0, Path(os.environ["EDGEFLOW_HOME"]) / "machine-2")
            if impl == "new"
            else None
        )
        await store.load()
        if other is not None:
            await other.load()
        took = []
        for pairs, present in delta_batches(store.graph, rng, batches):
            store_mod.append_deltas(client, pairs, present)
            t0 = time.perf_counter()
            assert await store.load()
            took.append(time.perf_counter() - t0)
            if other is not None:
                await other.load()
        row: dict[str, Any] = {"delta_refresh_ms": _stats_ms(took)}
        t0 = time.perf_counter()
        assert store_mod.compact_graph(client, min_deltas=1)
        row["compact_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        assert await store.load()
        row["load_after_compaction_s"] = round(time.perf_counter() - t0, 3)
        if other is not None:
            t0 = time.perf_counter()
            assert await other.load()
            row["load_after_compaction_other_machine_s"] = round(time.perf_counter() - t0, 3)
            assert other.graph.data_hash() == store.graph.data_hash()
        await aclient.aclose()
        return row

    out.update(asyncio.run(refreshes()))
    client.flushall()
    client.close()
    return out


def _stats_ms(seconds: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(seconds) * 1000, 2),
        "max": round(max(seconds) * 1000, 2),
    }


def ratios(old: dict, new: dict) -> dict[str, float | list[float]]:
    def r(a: float, b: float) -> float:
        return round(b / a, 3) if a else float("nan")

    def each(key: str) -> list[float]:
        return [r(a, b) for a, b in zip(old["processes"][key], new["processes"][key], strict=True)]

    return {
        "build_s": r(old["build_s"], new["build_s"]),
        "ingest_s": r(old["ingest_s"], new["ingest_s"]),
        "snapshot_write_s": r(old["snapshot_write_s"], new["snapshot_write_s"]),
        "load_s_per_process": each("load_s"),
        "rss_mb_per_process": each("rss_mb"),
        "uss_mb_per_process": each("uss_mb"),
        "uss_mb_per_process_after_deltas": each("uss_mb_after_deltas"),
        "pss_mb_per_process_after_deltas": each("pss_mb_after_deltas"),
        "delta_with_edges_ms_p50": r(old["delta_with_edges_ms"]["p50"],
                                     new["delta_with_edges_ms"]["p50"]),
        "delta_refresh_ms_p50": r(old["delta_refresh_ms"]["p50"], new["delta_refresh_ms"]["p50"]),
        "redis_graph_total_mb": r(old["redis"]["graph_total_mb"], new["redis"]["graph_total_mb"]),
        "compact_s": r(old["compact_s"], new["compact_s"]),
        "load_after_compaction_s": r(old["load_after_compaction_s"],
                                     new["load_after_compaction_s"]),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--impls", nargs="+", default=["old", "new"], choices=["old", "new"])
    ap.add_argument("--procs", type=int, default=2, help="processes holding the graph")
    ap.add_argument("--batches", type=int, default=20, help="delta batches of 100 edges")
    ap.add_argument(
        "--ingest-rounds",
        type=int,
        default=2,
        help="extra save_graph runs per impl, alternating, before the main one",
    )
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    ap.add_argument("--redis", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.redis)
        return

    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "ram_gb": round(psutil.virtual_memory().total / 1024**3, 1)},
        "old_commit": OLD_COMMIT,
        "procs": args.procs,
        "delta_edges": DELTA_EDGES,
        "sizes": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ef-graph-bench-") as tmp:
        os.environ["EDGEFLOW_HOME"] = str(Path(tmp) / "home")  # the machine's graph files
        server = start_redis(Path(tmp) / "redis")
        try:
            for n in args.sizes:
                t0 = time.perf_counter()
                edges = social_graph(n, seed=0)
                row: dict[str, Any] = {"generate_s": round(time.perf_counter() - t0, 1)}
                print(f"[{n:,} members] ingest rounds ...", file=sys.stderr, flush=True)
                ingest = ingest_rounds(args.impls, edges, n, server.url, max(args.ingest_rounds, 1))
                for impl in args.impls:
                    print(f"[{n:,} members] {impl} ...", file=sys.stderr, flush=True)
                    row[impl] = measure(impl, edges, n, server.url, args.procs, args.batches,
                                        ingest[impl])  # fmt: skip
                if "old" in row and "new" in row:
                    row["ratios_new_over_old"] = ratios(row["old"], row["new"])
                result["sizes"][str(n)] = row
        finally:
            server.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
