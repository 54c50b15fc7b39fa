"""`edgeflow ingest`: load an edge list into the member graph in Redis."""

from __future__ import annotations

from pathlib import Path

import redis

from edgeflow.graph import Graph, read_edge_file
from edgeflow.graph_store import save_graph


def ingest_file(client: redis.Redis, path: Path) -> Graph:
    """Parse, build and store the graph; raises EdgeFileError naming the bad line."""
    src, dst = read_edge_file(path)
    if src.size == 0:
        from edgeflow.graph import EdgeFileError

        raise EdgeFileError(f"{path}: no edges found")
    graph = Graph.from_edges(src, dst)
    save_graph(client, graph)
    return graph
