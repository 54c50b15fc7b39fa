"""The member graph model, edge-list parsing and the graph measures, checked against
straightforward Python on small graphs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edgeflow.build.synthetic import social_graph
from edgeflow.graph import (
    PAIR_COLUMNS,
    EdgeFileError,
    Graph,
    friends_of_friends,
    inverse_log_degree,
    mutual_connections,
    pair_measures,
    parse_edge_lines,
    parse_edge_list,
    read_edge_file,
    read_edge_list,
    split_edges,
)
from edgeflow.offline.pairs import PairIndex, TwoHop


def adjacency(edges: np.ndarray) -> dict[int, set[int]]:
    adj: dict[int, set[int]] = {}
    for u, v in edges.tolist():
        if u != v:
            adj.setdefault(u, set()).add(v)
            adj.setdefault(v, set()).add(u)
    return adj


@pytest.fixture(scope="module")
def sample() -> tuple[Graph, dict[int, set[int]]]:
    edges = social_graph(members=300, communities=6, seed=11)
    return Graph.from_edges(edges[:, 0], edges[:, 1]), adjacency(edges)


def test_parse_accepts_comments_blank_lines_and_extra_columns() -> None:
    src, dst = parse_edge_lines(["# a comment", "", "1 2", "2\t3  0.5 # weight", "  4 1  "])
    assert src.tolist() == [1, 2, 4] and dst.tolist() == [2, 3, 1]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["1 2", "3"], "<edges>:2: expected two member ids"),
        (["1 2", "# c", "a b"], "<edges>:3: member ids must be integers, got 'a' 'b'"),
        (["-1 2"], "<edges>:1: member ids must be non-negative"),
        (["1 99999999999999999999"], "<edges>:1: member ids must be non-negative 64-bit"),
    ],
)
def test_parse_errors_name_the_line(lines: list[str], message: str) -> None:
    with pytest.raises(EdgeFileError, match=message):
        parse_edge_lines(lines)


def test_parse_counts_what_the_graph_does_not_keep_with_first_lines() -> None:
    lines = [
        "# members",  # 1
        "1 2",  # 2
        "2 3 0.5",  # 3: a weight, not read
        "4 4",  # 4: self loop
        "",  # 5
        "3 2",  # 6: 2-3 again, reversed
        "1 2 7 9",  # 7: 1-2 again, and extra columns
        "5 5",  # 8: self loop
        "6 1",  # 9
    ]
    parsed = parse_edge_list(lines, source="f.txt")
    assert parsed.edge_lines == 7 and parsed.edges == 3
    assert (parsed.self_loops, parsed.first_self_loop, parsed.loop_only_members) == (2, 4, 2)
    assert (parsed.duplicates, parsed.first_duplicate) == (2, 6)
    assert (parsed.extra_columns, parsed.first_extra_columns) == (2, 3)
    assert Graph.from_edges(parsed.src, parsed.dst).edge_count == parsed.edges
    assert parsed.notes() == [
        "dropped 2 self loops (first on line 4): a member is not a connection of itself; "
        "2 members named only in self loops are kept, without an edge",
        "dropped 2 duplicate edges (first on line 6): the graph is undirected, so a pair "
        "listed again, in either order, is the same edge",
        "ignored the columns after the first two on 2 lines (first on line 3): only the two "
        "member ids are read; weights, times and other columns are not used",
    ]


def test_a_clean_edge_list_has_no_notes() -> None:
    parsed = parse_edge_list(["1 2", "2 3", "# 2 1"])
    assert parsed.notes() == [] and parsed.edges == 2
    parsed.require_edges()


def test_a_self_loop_of_a_connected_member_adds_no_member() -> None:
    parsed = parse_edge_list(["1 2", "2 2", "3 3"])
    assert (parsed.self_loops, parsed.loop_only_members) == (2, 1)
    kept = "; 1 member named only in self loops is kept, without an edge"
    assert parsed.notes()[0].endswith(kept)
    assert Graph.from_edges(parsed.src, parsed.dst).n == 3  # 3 is kept, isolated


def test_duplicates_count_every_repeat_after_the_first() -> None:
    parsed = parse_edge_list(["9 8", "8 9", "9 8", "1 2"])
    assert (parsed.duplicates, parsed.first_duplicate, parsed.edges) == (2, 2, 2)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("7 7\n", "its 1 edge line is a self loop (first on line 1), which the graph drops"),
        ("# only\n\n3 3\n4 4 1\n", "its 2 edge lines are all self loops (first on line 3)"),
        ("# nothing but comments\n", "it has no edge lines"),
        ("", "it has no edge lines"),
    ],
)
def test_an_edge_file_without_an_edge_is_refused_by_name(
    tmp_path: Path, text: str, why: str
) -> None:
    path = tmp_path / "loops.txt"
    path.write_text(text)
    with pytest.raises(EdgeFileError) as err:
        read_edge_list(path)
    assert str(err.value).startswith(f"{path}: no edges: ")
    assert why in str(err.value)
    with pytest.raises(EdgeFileError, match="no edges"):
        read_edge_file(path)


def test_read_edge_file_errors(tmp_path: Path) -> None:
    with pytest.raises(EdgeFileError, match="edge file not found"):
        read_edge_file(tmp_path / "missing.txt")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(EdgeFileError, match="not a text edge list"):
        read_edge_file(binary)


def test_from_edges_dedups_and_drops_self_loops() -> None:
    g = Graph.from_edges(
        np.array([5, 7, 5, 9, 9]), np.array([7, 5, 5, 5, 12]), members=np.array([40])
    )
    assert g.ids.tolist() == [5, 7, 9, 12, 40]
    assert g.edge_count == 3
    assert g.degree.tolist() == [2, 1, 2, 1, 0]  # 40 is isolated
    assert g.index_of(40) == 4 and g.index_of(6) == -1
    assert g.indices_of(np.array([12, 3, 5])).tolist() == [3, -1, 0]
    u, v = g.edges()
    assert sorted(zip(u.tolist(), v.tolist(), strict=True)) == [(5, 7), (5, 9), (9, 12)]
    again = Graph.from_bytes(g.to_bytes(), g.version)
    assert np.array_equal(again.indices, g.indices) and again.data_hash() == g.data_hash()


def test_split_hides_the_requested_share_without_overlap() -> None:
    edges = social_graph(members=200, seed=2)
    (ku, kv), (hu, hv) = split_edges(edges[:, 0], edges[:, 1], 0.1, seed=4)
    kept = set(zip(ku.tolist(), kv.tolist(), strict=True))
    hidden = set(zip(hu.tolist(), hv.tolist(), strict=True))
    assert not kept & hidden and len(kept) + len(hidden) == len(edges)
    assert 0.07 < len(hidden) / len(edges) < 0.13
    again = split_edges(edges[:, 0], edges[:, 1], 0.1, seed=4)[1]
    assert np.array_equal(again[0], hu)
    with pytest.raises(ValueError, match="holdout"):
        split_edges(edges[:, 0], edges[:, 1], 1.5, seed=0)


def test_friends_of_friends_matches_brute_force(sample: tuple[Graph, dict[int, set[int]]]) -> None:
    g, adj = sample
    w = inverse_log_degree(g)
    for member in (int(g.ids[0]), int(g.ids[77]), int(g.ids[int(np.argmax(g.degree))])):
        i = g.index_of(member)
        cands, counts, score = friends_of_friends(g, i, 10_000, w)
        mine = adj[member]
        expected = {
            v: len(mine & adj[v]) for f in mine for v in adj[f] if v != member and v not in mine
        }
        got = dict(zip(g.ids[cands].tolist(), counts.tolist(), strict=True))
        assert got == expected
        aa = {v: sum(1 / math.log(len(adj[z])) for z in mine & adj[v]) for v in expected}
        for v, s in zip(g.ids[cands].tolist(), score.tolist(), strict=True):
            assert s == pytest.approx(aa[v], rel=1e-5)
        assert list(score) == sorted(score, reverse=True)
        # A limit cuts that order, ties at the cut by lowest id, as the batch runner does.
        for limit in (1, 5, 20, 60):
            top, top_counts, top_score = friends_of_friends(g, i, limit, w)
            assert top.tolist() == cands[:limit].tolist()
            assert top_score.tolist() == score[:limit].tolist()
            assert top_counts.tolist() == counts[:limit].tolist()


def test_a_limit_cuts_friends_of_friends_ties_by_lowest_id() -> None:
    """Many candidates share one connection and so one score: which of them a limit keeps
    must not depend on the partial sort, or the candidates service and the batch runner
    (which cuts by score, then id) would serve different lists to the same member."""
    edges = social_graph(members=3000, communities=12, seed=4)
    g = Graph.from_edges(edges[:, 0], edges[:, 1])
    w = inverse_log_degree(g)
    cut_ties = 0
    for i in range(0, g.n, 7):
        every, _, score = friends_of_friends(g, i, g.n, w)
        for weights, limit in ((w, 50), (None, 50), (w, 200)):
            full = every if weights is w else friends_of_friends(g, i, g.n, None)[0]
            top = friends_of_friends(g, i, limit, weights)[0]
            assert top.tolist() == full[:limit].tolist(), (i, limit)
        cut_ties += int(score.size > 50 and score[49] == score[50])
    assert cut_ties > 10  # the graph does tie at the cut
    # The two executors: the batch runner's sparse two-hop products cut the same lists.
    members = np.arange(0, g.n, 7)
    two_hop = TwoHop.build(PairIndex(g, w), members)
    for weighted, limit in ((True, 50), (False, 50), (True, 200)):
        owner, cand, _ = two_hop.friends_of_friends(limit, weighted, 1)
        for j, i in enumerate(members.tolist()):
            want = friends_of_friends(g, i, limit, w if weighted else None)[0]
            assert cand[owner == j].tolist() == want.tolist(), (i, weighted, limit)


def test_pair_measures_match_definitions(sample: tuple[Graph, dict[int, set[int]]]) -> None:
    g, adj = sample
    w = inverse_log_degree(g)
    member = int(g.ids[3])
    i = g.index_of(member)
    others = [int(x) for x in g.ids[::7]]
    matrix = pair_measures(g, i, np.append(g.indices_of(np.array(others)), -1), w)
    assert matrix.shape == (len(others) + 1, len(PAIR_COLUMNS))
    assert matrix[-1].tolist() == [0.0] * len(PAIR_COLUMNS)  # unknown candidate
    for row, v in zip(matrix, others, strict=False):
        common = adj[member] & adj.get(v, set())
        du, dv = len(adj[member]), len(adj.get(v, set()))
        want = [
            len(common),
            sum(1 / math.log(len(adj[z])) for z in common),
            sum(1 / len(adj[z]) for z in common),
            len(common) / len(adj[member] | adj.get(v, set())),
            math.log1p(du * dv),
        ]
        assert row.tolist() == pytest.approx(want, rel=1e-5)


def test_measures_on_isolated_and_unknown_members() -> None:
    g = Graph.from_edges(np.array([1, 2]), np.array([2, 3]), members=np.array([9]))
    w = inverse_log_degree(g)
    assert np.isfinite(w).all() and w[g.index_of(9)] == 0.0
    cands, counts, _ = friends_of_friends(g, g.index_of(9), 10, w)
    assert cands.size == 0 and counts.size == 0
    assert pair_measures(g, -1, np.array([0, 1]), w).sum() == 0.0


def test_mutual_connections_match_set_intersections(
    sample: tuple[Graph, dict[int, set[int]]],
) -> None:
    g, adj = sample
    member = int(g.ids[np.argmax(g.degree)])
    others = [int(m) for m in g.ids[:60] if m != member]
    cands = np.append(g.indices_of(np.array(others)), -1)  # and one member the graph lacks
    counts, owner, mutual = mutual_connections(g, g.index_of(member), cands, 3)
    for pos, other in enumerate(others):
        shared = sorted(adj[member] & adj[other])
        assert counts[pos] == len(shared)
        assert g.ids[mutual[owner == pos]].tolist() == shared[:3]
    assert counts[-1] == 0 and not (owner == len(others)).any()
    assert mutual_connections(g, -1, cands, 3)[0].sum() == 0
    # A graph with an overlay (nearline deltas) answers from it: a new shared connection.
    other = next(o for o in others if not adj[member] & adj[o] and o not in adj[member])
    via = next(iter(adj[member]))
    moved = g.with_edges(np.array([[via, other]]), np.array([True]))
    counts, owner, mutual = mutual_connections(
        moved, moved.index_of(member), moved.indices_of(np.array([other])), 3
    )
    assert counts.tolist() == [1] and moved.ids[mutual].tolist() == [via]
