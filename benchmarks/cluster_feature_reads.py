#!/usr/bin/env python
"""GetFeatures' row reads on a Redis Cluster: the general pipeline path against rows routed
by key, in the same run.

It starts a local cluster of three `redis-server` masters, publishes the member features of
`social_graph(--members)` into it through Feast (as `edgeflow train` does), and reads the rows
of `--rows` random members again and again with the features service's reader:

- general: the encoded pipeline handed to `ClusterPipeline.execute_fixed`, which parses it
  back into commands, finds each command's slot and encodes each command again;
- rows: `OnlineReader.read_pipelined`, which hands the encoded rows and their keys to
  `ClusterPipeline.execute_rows`, so each master gets its rows as they are.

Both give the same values (checked). Times are medians of `--rounds` alternating rounds of
`--reads` reads, in one process; `ratio` divides rows by general.

    .venv/bin/python benchmarks/cluster_feature_reads.py \
        --out benchmarks/results/cluster_feature_reads.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeflow.build.feast_features import publish_member_features
from edgeflow.build.synthetic import social_graph
from edgeflow.config import Config
from edgeflow.features.compute import member_features
from edgeflow.features.schema import EMBEDDING_DIM
from edgeflow.graph import Graph
from edgeflow.local.redis_server import free_cluster_ports, start_cluster
from edgeflow.stores import redis_client
from edgeflow.stores.feast_online import USUAL_REPLY, OnlineReader, OnlineRows, decode_usual
from edgeflow.stores.resp import RawPipeline
from edgeflow.stores.resp_cluster import open_pipeline


async def _measure(pipe: RawPipeline, graph: Graph, args: argparse.Namespace) -> dict[str, float]:
    reader = OnlineReader()
    rng = np.random.default_rng(1)
    reads = [rng.choice(graph.ids, args.rows, replace=False) for _ in range(args.reads)]

    async def general(ids: np.ndarray) -> OnlineRows:
        out = await pipe.execute_fixed(reader.payload(ids), ids.size, USUAL_REPLY)
        assert isinstance(out, np.ndarray), "a row off the usual shape"
        return decode_usual(out)

    async def rows(ids: np.ndarray) -> OnlineRows:
        return await reader.read_pipelined(pipe, ids)

    a, b = await general(reads[0]), await rows(reads[0])
    for x, y in ((a.scalars, b.scalars), (a.embeddings, b.embeddings)):
        if not np.array_equal(x, y, equal_nan=True):
            raise SystemExit("cluster_feature_reads: the two paths read different values")
    times: dict[str, list[float]] = {"general": [], "rows": []}
    for _ in range(args.rounds):
        for name, read in (("general", general), ("rows", rows)):
            start = time.perf_counter()
            for ids in reads:
                await read(ids)
            times[name].append((time.perf_counter() - start) / len(reads) * 1e3)
    med = {name: statistics.median(xs) for name, xs in times.items()}
    return {
        "general_ms": round(med["general"], 3),
        "rows_ms": round(med["rows"], 3),
        "ratio": round(med["rows"] / med["general"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3000)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--reads", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgeflow-cluster-reads-") as tmp:
        work = Path(tmp)
        ports = free_cluster_ports(3)
        nodes = start_cluster(work / "cluster", ports)
        url = redis_client.cluster_url([("127.0.0.1", p) for p in ports])
        try:
            edges = social_graph(members=args.members, seed=1)
            graph = Graph.from_edges(edges[:, 0], edges[:, 1])
            rng = np.random.default_rng(0)
            emb = rng.normal(size=(graph.n, EMBEDDING_DIM)).astype(np.float32)
            cfg = Config(home=work / "home", redis_url=url)
            publish_member_features(cfg, graph, member_features(graph), emb)

            async def run() -> dict[str, float]:
                pipe = open_pipeline(url)
                try:
                    return await _measure(pipe, graph, args)
                finally:
                    await pipe.close()

            result = {**vars(args), "out": None, "masters": 3, **asyncio.run(run())}
        finally:
            for node in nodes:
                node.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
