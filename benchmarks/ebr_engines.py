#!/usr/bin/env python
"""Embedding-based retrieval engines at scale, measured side by side in one run.

For each size it makes one embedding per member and measures, each engine in its own
process (so each RSS is its own):

- `numpy_exact`: the exact search the candidates service did in local mode (VectorIndex:
  a unit-length matrix, one matrix-vector product and a partial sort per query). It is the
  baseline: recall is measured against it and `ratios` divide by it.
- `qdrant_local`: qdrant-client's local mode on a path, as training wrote it before
  (batches of 1,024 points) and as the service queried it (`query_points`). Above
  `--local-max` members it is not run: its upsert time is extrapolated from the smaller
  size's measured rate and marked `estimated`.
- `edge`: qdrant-edge (Qdrant's Rust engine in process), through edgeflow's own code:
  `vectors.EdgeStore` upserts and builds the HNSW index (one process, as `edgeflow train`),
  then another process opens a private copy (`vectors.EdgeReplica.open`: copy + load, as
  the candidates service) and searches it, at several `hnsw_ef`. One row per index
  configuration (`--edge`: m, ef_construct, int8 scalar quantization or none).

Queries: `--queries` members with an embedding, drawn at random, the same for every engine.
Each asks for its top 100 by cosine, twice: without the member itself ("plain"), and
without the member and its connections ("excluded", as EBR serves). In process the
exclusion is measured both ways: a `must_not HasId` filter inside the HNSW search, and
dropping the ids after retrieving 100 + |excluded| (what `EdgeReplica.nearest` does).
recall@100 is the share of the exact top 100 that an engine returns. Latency is per query,
wall clock (`p50_ms`, `p99_ms`) and the process's CPU time (`cpu_p50_ms`, `cpu_p99_ms`):
on a shared machine the wall-clock tail also measures the other tenants.

Data: `spectral` (default) is what training computes, the spectral embeddings
(build/embeddings.py, 32 dimensions) of `social_graph(N, seed=0)`, and a member's
connections are its graph neighbours; at 1M members that takes ~3 minutes and ~3 GB,
so `--cache DIR` keeps them. `clustered` is Gaussian clusters (one per 200 members), with
each query's 20 exact nearest as its "connections".

    .venv/bin/python benchmarks/ebr_engines.py --sizes 100000 1000000 \\
        --cache /tmp/ebr-cache --out benchmarks/results/ebr_engines.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

K = 100
MB = 1024 * 1024
DEFAULT_EDGE = ("m16-efc64-none", "m16-efc32-none", "m16-efc64-int8")


# ---- data -------------------------------------------------------------------------------------
def make_data(n: int, kind: str, cache: Path | None, dim: int) -> dict[str, np.ndarray]:
    """ids, vectors and each member's connections (CSR over rows: indptr, rows)."""
    path = None if cache is None else cache / f"{kind}-{n}-{dim}.npz"
    if path is not None and path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    t = time.perf_counter()
    if kind == "spectral":
        from edgeflow.build.embeddings import member_embeddings
        from edgeflow.build.synthetic import social_graph
        from edgeflow.graph import Graph

        edges = social_graph(n, seed=0)
        graph = Graph.from_edges(edges[:, 0], edges[:, 1])
        data = {
            "ids": graph.ids.astype(np.int64),
            "vectors": member_embeddings(graph, dim, seed=0),
            "indptr": np.asarray(graph.indptr, dtype=np.int64),
            "rows": np.asarray(graph.indices, dtype=np.int64),
        }
    else:
        rng = np.random.default_rng(0)
        centers = rng.normal(size=(max(1, n // 200), dim)).astype(np.float32)
        which = rng.integers(0, centers.shape[0], size=n)
        vecs = centers[which] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
        data = {
            "ids": np.arange(n, dtype=np.int64) * 3 + 7,  # not the row numbers
            "vectors": vecs.astype(np.float32),
            "indptr": np.zeros(n + 1, dtype=np.int64),
            "rows": np.zeros(0, dtype=np.int64),
        }
    print(f"  data: {kind} {n:,} x {dim} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **dict[str, Any](data))
    return data


def queries(data: dict[str, np.ndarray], count: int, kind: str) -> dict[str, np.ndarray]:
    """Query rows and, per query, the sorted ids it must not get (itself, connections)."""
    vecs = data["vectors"]
    rng = np.random.default_rng(1)
    rows = rng.choice(np.flatnonzero(np.any(vecs != 0, axis=1)), size=count, replace=False)
    ids, indptr, nbrs = data["ids"], data["indptr"], data["rows"]
    excluded: list[np.ndarray] = []
    if kind == "clustered":
        unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    for r in rows:
        if kind == "spectral":
            conn = ids[nbrs[indptr[r] : indptr[r + 1]]]
        else:
            sims = unit @ unit[r]
            sims[r] = -np.inf
            conn = ids[np.argpartition(-sims, 20)[:20]]
        excluded.append(np.unique(np.append(conn, ids[r])))
    lengths = np.asarray([e.size for e in excluded], dtype=np.int64)
    return {
        "rows": rows.astype(np.int64),
        "members": ids[rows],
        "ex_indptr": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "ex_ids": np.concatenate(excluded).astype(np.int64),
    }


# ---- measuring helpers ------------------------------------------------------------------------
def rss_mb() -> float:
    return round(psutil.Process().memory_info().rss / MB, 1)


def peak_rss_mb() -> float:
    """This process's peak RSS since exec (VmHWM; ru_maxrss would count the parent's pages
    at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cpu_s() -> float:
    return time.process_time()


def stats(wall: list[float], cpu: list[float]) -> dict[str, float]:
    w, c = np.asarray(wall) * 1000, np.asarray(cpu) * 1000
    return {
        "p50_ms": round(float(np.percentile(w, 50)), 3),
        "p99_ms": round(float(np.percentile(w, 99)), 3),
        "mean_ms": round(float(w.mean()), 3),
        "cpu_p50_ms": round(float(np.percentile(c, 50)), 3),
        "cpu_p99_ms": round(float(np.percentile(c, 99)), 3),
    }


def timed(fn: Any, members: np.ndarray, excl: list[np.ndarray]) -> tuple[dict[str, float], Any]:
    """Run fn(member, excluded) for every query (after 20 unmeasured warm-up calls)."""
    for j in range(min(20, members.size)):
        fn(int(members[j]), excl[j])
    out = np.full((members.size, K), -1, dtype=np.int64)
    wall, cpu = [], []
    for j, m in enumerate(members):
        c, t = time.process_time(), time.perf_counter()
        got = fn(int(m), excl[j])
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        got = np.asarray(got, dtype=np.int64)[:K]
        out[j, : got.size] = got
    return stats(wall, cpu), out


def load_queries(tmp: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    q = np.load(tmp / "queries.npz")
    ex = [q["ex_ids"][q["ex_indptr"][j] : q["ex_indptr"][j + 1]] for j in range(q["members"].size)]
    return q["members"], ex


def load_work(tmp: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    members, ex = load_queries(tmp)
    return np.load(tmp / "ids.npy"), np.load(tmp / "vectors.npy"), members, ex


def itself(member: int) -> np.ndarray:
    return np.asarray([member], dtype=np.int64)


# ---- the engines, each in its own process ---------------------------------------------------
def run_numpy(tmp: Path, params: dict[str, Any]) -> dict[str, Any]:
    from edgeflow.candidates.sources import VectorIndex

    base = rss_mb()  # the interpreter and its imports, before any data
    ids, vecs, members, ex = load_work(tmp)
    t, c = time.perf_counter(), cpu_s()
    index = VectorIndex(ids, vecs)
    load = {"load_s": round(time.perf_counter() - t, 3), "load_cpu_s": round(cpu_s() - c, 3)}
    del ids, vecs  # the index keeps its own copies
    plain, plain_ids = timed(lambda m, e: index.nearest(m, K, itself(m))[0], members, ex)
    excl, excl_ids = timed(lambda m, e: index.nearest(m, K, e)[0], members, ex)
    np.save(tmp / "numpy_plain.npy", plain_ids)
    np.save(tmp / "numpy_excl.npy", excl_ids)
    return {
        **load,
        "plain": plain,
        "excluded": excl,
        "rss_mb": rss_mb(),
        "rss_index_mb": round(rss_mb() - base, 1),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_qdrant_local(tmp: Path, params: dict[str, Any]) -> dict[str, Any]:
    from qdrant_client import QdrantClient, models

    ids, vecs, members, ex = load_work(tmp)
    path = tmp / "qdrant_local"
    client = QdrantClient(path=str(path))
    name = "members"
    client.create_collection(
        name,
        vectors_config=models.VectorParams(size=vecs.shape[1], distance=models.Distance.COSINE),
    )
    t, c = time.perf_counter(), cpu_s()
    for lo in range(0, ids.size, 1024):  # as vectors.write_embeddings did
        client.upsert(
            name,
            points=models.Batch(
                ids=ids[lo : lo + 1024].tolist(), vectors=vecs[lo : lo + 1024].tolist()
            ),
            wait=True,
        )
    upsert = {"upsert_s": round(time.perf_counter() - t, 2), "upsert_cpu_s": round(cpu_s() - c, 2)}
    row = {int(m): j for j, m in enumerate(ids)}

    def search(member: int, excluded: np.ndarray) -> np.ndarray:
        hits = client.query_points(
            name, query=vecs[row[member]].tolist(), limit=K + excluded.size, with_payload=False
        ).points
        got = np.fromiter((p.id for p in hits), dtype=np.int64, count=len(hits))
        return got[~np.isin(got, excluded)][:K]

    plain, plain_ids = timed(lambda m, e: search(m, itself(m)), members, ex)
    excl, excl_ids = timed(search, members, ex)
    np.save(tmp / "qdrant_local_plain.npy", plain_ids)
    np.save(tmp / "qdrant_local_excl.npy", excl_ids)
    client.close()
    out = {
        **upsert,
        "points_per_s": round(ids.size / upsert["upsert_s"]),
        "plain": plain,
        "excluded": excl,
        "rss_mb": rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
        "disk_mb": round(_du(path) / MB, 1),
    }
    shutil.rmtree(path, ignore_errors=True)
    return out


def _hnsw(params: dict[str, Any]) -> Any:
    from edgeflow.stores import vectors

    return vectors.Hnsw(
        m=params["m"], ef_construct=params["efc"], ef=params.get("ef", 128),
        quantization=params["quant"],
    )  # fmt: skip


def run_edge_build(tmp: Path, params: dict[str, Any]) -> dict[str, Any]:
    from edgeflow.stores import vectors

    ids, vecs, _, _ = load_work(tmp)
    store = vectors.EdgeStore(tmp / params["tag"], _hnsw(params))
    t, c = time.perf_counter(), cpu_s()
    build = store.begin("members", ids, vecs)
    upsert = (time.perf_counter() - t, cpu_s() - c)
    t, c = time.perf_counter(), cpu_s()
    written = build.finish()
    index = (time.perf_counter() - t, cpu_s() - c)
    return {
        "points": written.points,
        "upsert_s": round(upsert[0], 2),
        "upsert_cpu_s": round(upsert[1], 2),
        "points_per_s": round(written.points / upsert[0]),
        "index_s": round(index[0], 2),
        "index_cpu_s": round(index[1], 2),
        "disk_mb": round(written.bytes_on_disk / MB, 1),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_edge_serve(tmp: Path, params: dict[str, Any]) -> dict[str, Any]:
    import qdrant_edge as qe

    from edgeflow.stores import vectors

    base = rss_mb()  # the interpreter and its imports, before any data
    members, ex = load_queries(tmp)
    t, c = time.perf_counter(), cpu_s()
    replica = vectors.EdgeReplica.open(tmp / params["tag"], "members", _hnsw(params))
    out: dict[str, Any] = {
        "open_s": round(time.perf_counter() - t, 3),
        "open_cpu_s": round(cpu_s() - c, 3),
        "rss_open_mb": round(rss_mb() - base, 1),
    }
    shard = replica.shard

    def plain(ef: int) -> Any:
        def search(member: int, excluded: np.ndarray) -> np.ndarray:
            vector = replica.vector(member)
            if vector is None:
                return np.zeros(0, dtype=np.int64)
            hits = shard.query(
                qe.QueryRequest(
                    limit=K + 1, query=qe.Query.Nearest(vector), params=_params(replica, ef)
                )
            )
            got = np.fromiter((int(p.id) for p in hits), dtype=np.int64, count=len(hits))
            return got[got != member][:K]

        return search

    def with_filter(member: int, excluded: np.ndarray) -> np.ndarray:
        vector = replica.vector(member)
        if vector is None:
            return np.zeros(0, dtype=np.int64)
        hits = shard.query(
            qe.QueryRequest(
                limit=K,
                query=qe.Query.Nearest(vector),
                filter=qe.Filter(must_not=[qe.HasIdCondition(set(excluded.tolist()))]),
                params=replica.search_params(K),
            )
        )
        return np.fromiter((int(p.id) for p in hits), dtype=np.int64, count=len(hits))

    for ef in params["efs"]:
        res, got = timed(plain(ef), members, ex)
        out[f"plain_ef{ef}"] = res
        np.save(tmp / f"{params['tag']}_plain_ef{ef}.npy", got)
    res, got = timed(lambda m, e: replica.nearest(m, K, e)[0], members, ex)
    out["excluded_after"] = res
    np.save(tmp / f"{params['tag']}_excl_after.npy", got)
    res, got = timed(with_filter, members, ex)
    out["excluded_filter"] = res
    np.save(tmp / f"{params['tag']}_excl_filter.npy", got)
    out["rss_mb"] = rss_mb()
    out["rss_index_mb"] = round(rss_mb() - base, 1)
    out["peak_rss_mb"] = peak_rss_mb()
    replica.close()
    return out


def _params(replica: Any, ef: int) -> Any:
    import qdrant_edge as qe

    quant = qe.QuantizationSearchParams(rescore=True, oversampling=replica.hnsw.oversampling)
    return qe.SearchParams(
        hnsw_ef=max(ef, K + 1), quantization=quant if replica.quantized else None
    )


WORKERS = {
    "numpy": run_numpy,
    "qdrant_local": run_qdrant_local,
    "edge_build": run_edge_build,
    "edge_serve": run_edge_serve,
}


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


def worker(kind: str, tmp: Path, params: dict[str, Any] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", kind, "--dir", str(tmp)]
    cmd += ["--params", json.dumps(params or {})]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-4000:]}")
    print(f"  {kind} {(params or {}).get('tag', '')}: {time.perf_counter() - t:.0f}s",
          file=sys.stderr)  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    hits = [
        len(set(g[g >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, int((t >= 0).sum()))
        for g, t in zip(got, truth, strict=True)
    ]
    return round(float(np.mean(hits)), 4)


def parse_edge(spec: str) -> dict[str, Any]:
    """ "m16-efc64-int8" -> {m: 16, efc: 64, quant: int8}."""
    parts = dict(
        ("quant", p) if p in ("int8", "none") else (p.rstrip("0123456789"), p)
        for p in spec.split("-")
    )
    return {
        "tag": spec,
        "m": int(parts["m"][1:]),
        "efc": int(parts["efc"][3:]),
        "quant": parts.get("quant", "none"),
    }


def measure(n: int, args: argparse.Namespace, local_rate: float | None) -> dict[str, Any]:
    print(f"{n:,} members", file=sys.stderr)
    data = make_data(n, args.data, args.cache, args.dim)
    q = queries(data, args.queries, args.data)
    out: dict[str, Any] = {"members": n, "dim": int(data["vectors"].shape[1])}
    out["mean_excluded"] = round(float(np.diff(q["ex_indptr"]).mean()), 1)
    out["max_excluded"] = int(np.diff(q["ex_indptr"]).max())
    with tempfile.TemporaryDirectory(prefix="ebr-", dir=args.tmp) as name:
        tmp = Path(name)
        np.save(tmp / "ids.npy", data["ids"])
        np.save(tmp / "vectors.npy", data["vectors"].astype(np.float32))
        np.savez(tmp / "queries.npz", **dict[str, Any](q))
        del data
        exact = worker("numpy", tmp)
        truth_plain = np.load(tmp / "numpy_plain.npy")
        truth_excl = np.load(tmp / "numpy_excl.npy")
        exact["recall_at_100"] = 1.0
        out["numpy_exact"] = exact

        if n <= args.local_max:
            local = worker("qdrant_local", tmp)
            local["recall_at_100"] = recall(np.load(tmp / "qdrant_local_plain.npy"), truth_plain)
            local["recall_at_100_excluded"] = recall(
                np.load(tmp / "qdrant_local_excl.npy"), truth_excl
            )
            local_rate = local["points_per_s"]
        else:
            local = {"skipped": f"above --local-max {args.local_max:,}"}
            if local_rate:
                local["upsert_s_estimated"] = round(n / local_rate)
        out["qdrant_local"] = local

        for spec in args.edge:
            params = {**parse_edge(spec), "efs": args.efs}
            row = {"config": params, "build": worker("edge_build", tmp, params)}
            serve = worker("edge_serve", tmp, params)
            tag = params["tag"]
            for ef in args.efs:
                serve[f"plain_ef{ef}"]["recall_at_100"] = recall(
                    np.load(tmp / f"{tag}_plain_ef{ef}.npy"), truth_plain
                )
            for how in ("after", "filter"):
                serve[f"excluded_{how}"]["recall_at_100"] = recall(
                    np.load(tmp / f"{tag}_excl_{how}.npy"), truth_excl
                )
            row["serve"] = serve
            out[f"edge_{tag}"] = row
    out["ratios"] = ratios(out, args.efs)
    return out | {"_local_rate": local_rate}


def ratios(out: dict[str, Any], efs: list[int]) -> dict[str, Any]:
    """Speed-ups against numpy exact in this run (> 1: faster than exact)."""
    exact = out["numpy_exact"]
    res: dict[str, Any] = {}

    def vs(row: dict[str, float], base: dict[str, float]) -> dict[str, float]:
        return {
            f"{key}_speedup": round(base[key] / row[key], 2)
            for key in ("p50_ms", "p99_ms", "cpu_p50_ms")
            if row.get(key)
        }

    local = out["qdrant_local"]
    if "plain" in local:
        res["qdrant_local"] = {
            "plain": vs(local["plain"], exact["plain"]),
            "excluded": vs(local["excluded"], exact["excluded"]),
        }
    for key, row in out.items():
        if not key.startswith("edge_"):
            continue
        serve = row["serve"]
        res[key] = {
            **{f"plain_ef{ef}": vs(serve[f"plain_ef{ef}"], exact["plain"]) for ef in efs},
            "excluded_after": vs(serve["excluded_after"], exact["excluded"]),
            "excluded_filter": vs(serve["excluded_filter"], exact["excluded"]),
            "rss_index_vs_exact": round(serve["rss_index_mb"] / max(exact["rss_index_mb"], 1), 2),
        }
        if "upsert_s" in local:
            res[key]["upsert_speedup_vs_qdrant_local"] = round(
                local["upsert_s"] / row["build"]["upsert_s"], 1
            )
        elif "upsert_s_estimated" in local:
            res[key]["upsert_speedup_vs_qdrant_local_estimated"] = round(
                local["upsert_s_estimated"] / row["build"]["upsert_s"], 1
            )
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--data", choices=["spectral", "clustered"], default="spectral")
    parser.add_argument("--dim", type=int, default=0, help="default: training's (32)")
    parser.add_argument("--cache", type=Path, help="keep generated embeddings here")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--local-max", type=int, default=100_000)
    parser.add_argument("--edge", nargs="+", default=list(DEFAULT_EDGE))
    parser.add_argument("--efs", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--tmp", type=Path, help="directory for the engines' files")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = WORKERS[args.worker](args.dir, json.loads(args.params))
        print(json.dumps(result))
        return
    if not args.dim:
        from edgeflow.features.schema import EMBEDDING_DIM

        args.dim = EMBEDDING_DIM
    started, load_start = time.time(), os.getloadavg()
    local_rate = None
    runs = []
    for n in sorted(args.sizes):
        run = measure(n, args, local_rate)
        local_rate = run.pop("_local_rate")
        runs.append(run)
    report = {
        "benchmark": "ebr_engines",
        "k": K,
        "data": args.data,
        "queries": args.queries,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            # 1-minute load average when the run started and ended: other tenants' share
            "load_avg_1m_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        },
        "versions": {
            "qdrant_client": _version("qdrant-client"),
            "qdrant_edge_py": _version("qdrant-edge-py"),
            "numpy": np.__version__,
        },
        "seconds": round(time.time() - started),
        "sizes": runs,
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


if __name__ == "__main__":
    main()
