#!/usr/bin/env python
"""What diversity adds to one Merge, in CPU time: merging/diversity.py's re-ranking (the
request's rule, the mutual-connection similarity of the pool, MMR and the cut to k) on the
Facebook graph, for the members' friends-of-friends lists as pools.

For each (k, window, pool) it runs `diversity.rerank_on` (BLAS on one thread, as the merging
service runs it) on a blended, selected pool of `max(k, pool)` items for `--members` members
drawn at random (with at least that many friends of friends), and reports the median, p90
and p99 of the process CPU time per call, in milliseconds. Run it under the benchmark lock
on a shared machine:

    flock /tmp/edgeflow-bench.lock .venv/bin/python benchmarks/diversity_cost.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from edgeflow.graph import Graph, friends_of_friends, inverse_log_degree, read_edge_file
from edgeflow.merging import blend, diversity
from edgeflow.v1 import merging_pb2

FACEBOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "facebook_combined.txt"
CASES = ((20, 10, 50), (30, 10, 50), (50, 10, 50), (50, 10, 100), (50, 20, 100), (50, 50, 100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=Path, default=FACEBOOK)
    parser.add_argument("--members", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    threadpool_limits(limits=1, user_api="blas")  # as Merge runs it (diversity.rerank)
    src, dst = read_edge_file(args.edges)
    graph = Graph.from_edges(src, dst)
    weights = inverse_log_degree(graph)
    rng = np.random.default_rng(0)
    out = []
    for k, window, pool in CASES:
        wide = max(k, pool)
        times: list[float] = []
        for i in rng.permutation(graph.n)[: args.members * 3].tolist():
            found, score, _ = friends_of_friends(graph, i, wide, weights)
            if found.size < wide:
                continue
            lists = [blend.ScoredList("fof", graph.ids[found], score.reshape(-1, 1))]
            merged = blend.blend(lists)
            sel = blend.select(merged, wide)
            req = merging_pb2.MergeRequest(member=int(graph.ids[i]), k=wide)
            req.diversity.CopyFrom(
                merging_pb2.Diversity(k=k, window=window, mmr_lambda=0.7, pool=pool)
            )
            for _ in range(args.repeat):
                t = time.process_time()
                diversity.rerank_on(req, merged, sel, graph)
                times.append(time.process_time() - t)
            if len(times) >= args.members * args.repeat:
                break
        ms = np.asarray(times) * 1000
        out.append({
            "k": k, "window": window, "pool": pool, "calls": len(times),
            "cpu_p50_ms": round(float(np.median(ms)), 3),
            "cpu_p90_ms": round(float(np.percentile(ms, 90)), 3),
            "cpu_p99_ms": round(float(np.percentile(ms, 99)), 3),
        })  # fmt: skip
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
