"""The entity features a few members get nearline are those the whole-graph computation gives."""

from __future__ import annotations

import numpy as np

from edgeflow.build.synthetic import social_graph
from edgeflow.features.compute import LOCAL_FEATURES, local_member_features, member_features
from edgeflow.features.schema import SCALAR_FEATURES
from edgeflow.graph import Graph


def test_local_features_equal_the_whole_graphs_for_those_members() -> None:
    edges = social_graph(members=600, communities=6, seed=4)
    graph = Graph.from_edges(edges[:, 0], edges[:, 1], members=np.array([10_000]))  # isolated
    whole = member_features(graph)
    picked = np.concatenate([graph.ids[::37], [10_000, 123_456_789]])  # and one unknown
    members, local = local_member_features(graph, picked)
    assert members.tolist() == picked[:-1].tolist()  # the unknown id has no row
    cols = [SCALAR_FEATURES.index(name) for name in LOCAL_FEATURES]
    np.testing.assert_allclose(local, whole[graph.indices_of(members)][:, cols], rtol=1e-6)
    assert local[-1].tolist() == [0.0, 0.0, 0.0]  # the isolated member
