"""Generated graphs of three kinds, for checking quality on more than one kind of graph."""

from __future__ import annotations

import numpy as np
import pytest

from edgeflow.build.synthetic import KINDS
from edgeflow.features.compute import member_features
from edgeflow.graph import Graph


def _graph(kind: str, members: int, seed: int) -> Graph:
    edges = KINDS[kind](members, seed=seed)
    assert edges.dtype == np.int64 and edges.shape[1] == 2
    assert (edges[:, 0] < edges[:, 1]).all() and edges.max(initial=0) < members  # u < v
    assert np.unique(edges, axis=0).shape == edges.shape
    return Graph.from_edges(edges[:, 0], edges[:, 1], members=np.arange(members))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_is_deterministic_per_seed(kind: str) -> None:
    a, b = KINDS[kind](500, seed=3), KINDS[kind](500, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, KINDS[kind](500, seed=4))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("members", [2, 3, 40])
def test_tiny_graphs_are_valid(kind: str, members: int) -> None:
    _graph(kind, members, seed=0)


def test_the_kinds_differ_as_their_real_counterparts_do() -> None:
    """Collaboration graphs are cliquish, communication graphs have hubs and few triangles."""
    clustering, top_share = {}, {}
    for kind in KINDS:
        g = _graph(kind, 3000, seed=1)
        deg = g.degree
        clustering[kind] = float(member_features(g)[deg > 1, 1].mean())
        top_share[kind] = float(np.sort(deg)[-30:].sum() / deg.sum())  # the top 1%'s edges
    assert clustering["collaboration"] > 2 * clustering["social"] > 4 * clustering["communication"]
    assert top_share["communication"] > 2 * top_share["social"]
