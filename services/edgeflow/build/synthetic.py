"""A generated social graph for machines without a real one: communities of members with
power-law-ish degrees and triadic closure, so friends of friends are meaningful."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def social_graph(members: int = 2000, communities: int = 40, seed: int = 0) -> np.ndarray:
    """Edges (m, 2) int64 over member ids 0..members-1."""
    rng = np.random.default_rng(seed)
    community = rng.integers(0, communities, size=members)
    activity = rng.pareto(2.5, size=members) + 1.0  # heavy-tailed sociability
    edges: set[tuple[int, int]] = set()
    by_comm = [np.flatnonzero(community == c) for c in range(communities)]
    for u in range(members):
        want = int(min(3 + activity[u] * 4, 80))
        local = by_comm[community[u]]
        for _ in range(want):
            v = int(rng.choice(local)) if rng.random() < 0.85 else int(rng.integers(members))
            if v != u:
                edges.add((min(u, v), max(u, v)))
    # Triadic closure: connect some friends of friends.
    adj: dict[int, list[int]] = {}
    for u, v in edges:
        adj.setdefault(u, []).append(v)
        adj.setdefault(v, []).append(u)
    for u in range(members):
        nbrs = adj.get(u, [])
        for _ in range(len(nbrs) // 3):
            w = nbrs[int(rng.integers(len(nbrs)))]
            far = adj.get(w, [])
            if far:
                v = far[int(rng.integers(len(far)))]
                if v != u:
                    edges.add((min(u, v), max(u, v)))
    return np.asarray(sorted(edges), dtype=np.int64)


def write_edge_list(path: Path, edges: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("# generated social graph: member member\n")
        np.savetxt(fh, edges, fmt="%d")
