"""Generated graphs, for machines without a real one, for the scale benchmark and for
checking quality on more than one kind of graph (`edgeflow eval` on each of KINDS):

- social: communities of members with heavy-tailed degrees and triadic closure, so friends
  of friends are meaningful. Vectorised: a million members with ~12M edges take seconds;
- collaboration: papers whose authors all link to each other (a bipartite projection:
  cliques, high clustering), authors drawn from a field by productivity;
- communication: who writes to whom, with heavy-tailed hubs (a few members reach many) and
  low clustering, mostly within a department.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

_LOCAL_SHARE = 0.85  # of a member's own links, the share that stays in its community
_MAX_WANT = 80  # cap on the links one member starts (hubs still gain links from others)


def social_graph(
    members: int = 2000, communities: int | None = None, seed: int = 0, links: float = 5.0
) -> np.ndarray:
    """Edges (m, 2) int64 over member ids 0..members-1, each pair once with u < v.

    Each member starts about `links` x a Pareto(2.5) activity links (85% inside its
    community, the rest to members chosen in proportion to their activity, which gives the
    heavy tail), then closes a triangle for every third link it has. With the default
    `links` the graph has about 10 edges per member on average; `communities` defaults to
    one per 200 members.
    """
    if members < 2:
        raise ValueError(f"a social graph needs at least 2 members, got {members}")
    rng = np.random.default_rng(seed)
    communities = communities or max(1, members // 200)
    community = rng.integers(0, communities, size=members)
    activity = rng.pareto(2.5, size=members) + 1.0
    want = np.minimum(np.rint(links * activity).astype(np.int64), _MAX_WANT)

    # Members sorted by community: a community is a contiguous slice of `order`.
    order = np.argsort(community, kind="stable")
    starts = np.searchsorted(community[order], np.arange(communities + 1))
    u = np.repeat(np.arange(members, dtype=np.int64), want)
    cu = community[u]
    size = starts[cu + 1] - starts[cu]
    local = order[starts[cu] + (rng.random(u.size) * size).astype(np.int64)]
    weights = np.cumsum(activity)
    far = np.searchsorted(weights, rng.random(u.size) * weights[-1]).clip(0, members - 1)
    v = np.where(rng.random(u.size) < _LOCAL_SHARE, local, far)
    edges = _unique_pairs(u, v, members)

    # Triadic closure: for every third link of u (to w), link u to a neighbour of w.
    indptr, nbrs = _csr(edges, members)
    degree = np.diff(indptr)
    u = np.repeat(np.arange(members, dtype=np.int64), degree // 3)
    w = nbrs[indptr[u] + (rng.random(u.size) * degree[u]).astype(np.int64)]
    v = nbrs[indptr[w] + (rng.random(w.size) * degree[w]).astype(np.int64)]
    return _unique_pairs(np.concatenate([edges[:, 0], u]), np.concatenate([edges[:, 1], v]),
                         members)  # fmt: skip


def collaboration_graph(members: int = 3000, seed: int = 0, papers_per_member: float = 1.2
) -> np.ndarray:  # fmt: skip
    """Edges (m, 2) of the co-author graph of about `papers_per_member` x members papers.

    A paper has 2 + Geometric(0.45) - 1 authors (mostly 2-4, a few large teams, capped at
    12), from one field (one per 150 members) with probability 0.9 and from anywhere
    otherwise, each chosen in proportion to a Pareto(2) productivity; all of them link to
    each other.
    """
    rng, fields, field, productivity = _grouped("collaboration", members, 150, 2.0, seed)
    papers = max(1, round(papers_per_member * members))
    size = np.minimum(1 + rng.geometric(0.45, size=papers), 12)
    paper_field = rng.integers(0, fields, size=papers)
    paper = np.repeat(np.arange(papers), size)
    local = _weighted_pick(field, productivity, paper_field[paper], rng)
    far = _weighted_pick(np.zeros(members, np.int64), productivity, np.zeros_like(paper), rng)
    author = np.where(rng.random(paper.size) < 0.9, local, far)
    a_idx, b_idx = _clique_pairs(size)  # every pair of authors of each paper
    return _unique_pairs(author[a_idx], author[b_idx], members)


def _grouped(
    kind: str, members: int, per_group: int, pareto: float, seed: int
) -> tuple[np.random.Generator, int, np.ndarray, np.ndarray]:
    """(rng, groups, each member's group, each member's Pareto(`pareto`) + 1 weight)."""
    if members < 2:
        raise ValueError(f"a {kind} graph needs at least 2 members, got {members}")
    rng = np.random.default_rng(seed)
    groups = max(1, members // per_group)
    group = rng.integers(0, groups, size=members)
    return rng, groups, group, rng.pareto(pareto, size=members) + 1.0


def _weighted_pick(
    group: np.ndarray, weight: np.ndarray, wanted: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One member per entry of `wanted` (a group id), drawn from that group's members in
    proportion to `weight`; `group` is each member's group. An empty group yields a member
    of the group before it (or the first member)."""
    groups = max(int(group.max()), int(wanted.max(initial=0))) + 1
    order = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[order], np.arange(groups + 1))
    cum = np.cumsum(weight[order])  # per group: a slice of this cumulative sum
    first, last = starts[wanted], starts[wanted + 1] - 1
    lo = np.where(first > 0, cum[np.maximum(first - 1, 0)], 0.0)
    pick = np.searchsorted(cum, lo + rng.random(wanted.size) * (cum[last] - lo), side="right")
    return order[np.clip(pick, np.minimum(first, last).clip(0), last.clip(0))]


def _clique_pairs(size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (a, b), a < b, of every pair within consecutive groups of these sizes."""
    offset = np.cumsum(size) - size
    a_parts, b_parts = [], []
    for s in np.unique(size).tolist():
        groups = offset[size == s]
        a, b = np.triu_indices(s, k=1)
        a_parts.append((groups[:, None] + a[None, :]).ravel())
        b_parts.append((groups[:, None] + b[None, :]).ravel())
    return np.concatenate(a_parts), np.concatenate(b_parts)


def communication_graph(members: int = 3000, seed: int = 0, links: float = 4.0) -> np.ndarray:
    """Edges (m, 2) of who writes to whom: each member writes to about `links` x a
    Pareto(2) activity others, chosen in proportion to a Pareto(1.5) popularity (heavy-tailed
    hubs), 70% of them within its department (one per 250 members). No triadic closure, so
    clustering stays low.
    """
    rng, _, dept, popularity = _grouped("communication", members, 250, 1.5, seed)
    want = np.minimum(np.rint(links * (rng.pareto(2.0, size=members) + 1.0) / 2), 60)
    u = np.repeat(np.arange(members, dtype=np.int64), want.astype(np.int64))
    local = _weighted_pick(dept, popularity, dept[u], rng)
    far = _weighted_pick(np.zeros(members, np.int64), popularity, np.zeros_like(u), rng)
    v = np.where(rng.random(u.size) < 0.7, local, far)
    return _unique_pairs(u, v, members)


KINDS: dict[str, Callable[..., np.ndarray]] = {
    "social": social_graph,
    "collaboration": collaboration_graph,
    "communication": communication_graph,
}


def _unique_pairs(u: np.ndarray, v: np.ndarray, members: int) -> np.ndarray:
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    keep = lo != hi
    codes = np.sort(lo[keep] * members + hi[keep])  # sort + diff: np.unique hashes, slower
    codes = codes[np.concatenate((codes[:1] >= 0, codes[1:] != codes[:-1]))]
    return np.stack([codes // members, codes % members], axis=1).astype(np.int64)


def _csr(edges: np.ndarray, members: int) -> tuple[np.ndarray, np.ndarray]:
    src = np.concatenate([edges[:, 0], edges[:, 1]])
    dst = np.concatenate([edges[:, 1], edges[:, 0]])
    by_src = np.argsort(src, kind="stable")
    indptr = np.zeros(members + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=members), out=indptr[1:])
    return indptr, dst[by_src]


def write_edge_list(path: Path, edges: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("# generated social graph: member member\n")
        np.savetxt(fh, edges, fmt="%d")


if __name__ == "__main__":  # python -m edgeflow.build.synthetic KIND MEMBERS SEED FILE
    import sys

    kind, n, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    write_edge_list(out, KINDS[kind](n, seed=seed))
