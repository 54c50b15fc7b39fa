"""Diversity: the served list re-ranked by MMR over the members' mutual connections
(merging/diversity.py), through Merge, the gateway and eval."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
import yaml
from inprocess import Suite, members_with_degree, running, small_eval
from world import World, clone

from edgeflow.build.synthetic import social_graph
from edgeflow.cli.diversity_eval import intra_list_similarity
from edgeflow.config import REPO_ROOT
from edgeflow.graph import Graph, friends_of_friends, inverse_log_degree
from edgeflow.merging import diversity
from edgeflow.merging.service import MergingService
from edgeflow.shell.server import channel
from edgeflow.stores import keys
from edgeflow.stores.graph_store import GraphNotLoaded
from edgeflow.stores.redis_client import connect
from edgeflow.v1 import merging_pb2, merging_pb2_grpc, tensor_pb2
from edgeflow.workflow.modes import precomputed_view
from edgeflow.workflow.validate import WorkflowError, parse_document

PYMK = REPO_ROOT / "workflows" / "pymk.yaml"
DIVERSE = {"lambda": 0.5, "window": 5, "pool": 40}


def _reference(rel: np.ndarray, sim: np.ndarray, lam: float, window: int) -> list[int]:
    """MMR as it is defined, one item at a time in plain Python."""
    items = [i for i in range(rel.size) if not np.isnan(rel[i])]
    if not items:
        return list(range(rel.size))
    lo, hi = min(rel[items]), max(rel[items])
    norm = {i: (rel[i] - lo) / (hi - lo) if hi > lo else 0.0 for i in items}
    placed: list[int] = []
    for _ in range(min(window, len(items))):
        rest = [i for i in items if i not in placed]
        penalty = {i: max((sim[j, i] for j in placed), default=0.0) for i in rest}
        best = max(rest, key=lambda i: (lam * norm[i] - (1 - lam) * penalty[i], -i))
        placed.append(best)
    tail = sorted((i for i in items if i not in placed), key=lambda i: (-norm[i], i))
    return placed + tail + [i for i in range(rel.size) if np.isnan(rel[i])]


# ---- the re-ranking itself ---------------------------------------------------------------------
def test_mmr_is_the_greedy_definition_for_each_row_of_a_batch() -> None:
    rng = np.random.default_rng(7)
    for _ in range(150):
        b, w = int(rng.integers(1, 5)), int(rng.integers(1, 12))
        rel = rng.random((b, w))
        rel[rng.random((b, w)) < 0.2] = np.nan  # padding, anywhere
        x = rng.random((b, w, w))
        sim = (x + x.transpose(0, 2, 1)) / 2
        lam, window = float(rng.random()), int(rng.integers(0, w + 2))
        got = diversity.mmr(rel, sim, lam, window)
        for r in range(b):
            assert got[r].tolist() == _reference(rel[r], sim[r], lam, window)
            assert (diversity.mmr(rel[r : r + 1], sim[r : r + 1], lam, window)[0] == got[r]).all()


def test_lambda_one_keeps_the_blended_order() -> None:
    rel = np.asarray([[0.2, 0.9, np.nan, 0.5]])
    sim = np.ones((1, 4, 4))
    assert diversity.mmr(rel, sim, 1.0, 4).tolist() == [[1, 3, 0, 2]]
    # Below 1, an item like the first placed gives way to a less relevant, different one.
    sim[0, 1, 3] = sim[0, 3, 1] = 1.0
    sim[0, 1, 0] = sim[0, 0, 1] = 0.0
    assert diversity.mmr(rel, sim, 0.5, 2).tolist() == [[1, 0, 3, 2]]


def _two_circles() -> Graph:
    """Member 0 knows 1, 2 (one circle) and 3 (another). Candidates 10, 11, 12 are reached
    through 1 and 2; 20 through 3; 30 through nobody the member knows."""
    edges = [(0, 1), (0, 2), (0, 3), (1, 2), (10, 1), (10, 2), (11, 1), (11, 2), (12, 1),
             (20, 3), (30, 40)]  # fmt: skip
    src, dst = np.asarray(edges).T
    return Graph.from_edges(src, dst)


def test_similarity_is_the_cosine_of_mutual_connection_sets() -> None:
    g = _two_circles()
    cands = g.indices_of(np.asarray([10, 11, 12, 20, 30, 99]))  # 99: not in the graph
    sim = diversity.similarity(g, np.asarray([g.index_of(0)]), cands[None, :])[0]
    half = 1 / np.sqrt(2)
    expected = np.asarray([
        [1, 1, half, 0, 0, 0],
        [1, 1, half, 0, 0, 0],
        [half, half, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0],  # no mutual connection: like nothing
        [0, 0, 0, 0, 0, 0],
    ])  # fmt: skip
    np.testing.assert_allclose(sim, expected, atol=1e-6)
    # An unknown member's candidates are like nothing either.
    assert not diversity.similarity(g, np.asarray([-1]), cands[None, :]).any()


def test_similarity_matches_sets_on_a_social_graph() -> None:
    edges = social_graph(members=300, communities=6, seed=4)
    g = Graph.from_edges(edges[:, 0], edges[:, 1])
    weights = inverse_log_degree(g)
    members = np.flatnonzero(g.degree >= 5)[:6]
    cands = np.full((members.size, 30), -1, dtype=np.int64)
    for row, i in enumerate(members.tolist()):
        found, _, _ = friends_of_friends(g, i, 30, weights)
        cands[row, : found.size] = found
    sims = diversity.similarity(g, members, cands)
    for row, i in enumerate(members.tolist()):
        mine = set(g.neighbors(i).tolist())
        sets = [set(g.neighbors(int(c)).tolist()) & mine if c >= 0 else set() for c in cands[row]]
        for a, sa in enumerate(sets):
            for b, sb in enumerate(sets):
                want = len(sa & sb) / np.sqrt(len(sa) * len(sb)) if sa and sb else 0.0
                assert sims[row, a, b] == pytest.approx(want, abs=1e-6)


def test_intra_list_similarity_averages_pairs_per_list() -> None:
    g = _two_circles()
    vectors = np.eye(g.n, dtype=np.float32)  # every member unlike every other
    recs = {0: [10, 11, 20], 3: [20]}  # member 3's list of one has no pair: left out
    ils = intra_list_similarity(g, recs, vectors, top=3)
    assert ils["mutual_connections"] == pytest.approx(round(2 / 6, 5))  # (10, 11) both ways
    assert ils["embedding_cosine"] == 0.0
    assert intra_list_similarity(g, recs, vectors, top=2)["mutual_connections"] == 1.0


# ---- params --------------------------------------------------------------------------------------
def _pymk_with(diversity_params: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(PYMK.read_text())
    blend = next(n for n in doc["spec"]["nodes"] if n["name"] == "blend")
    blend["params"]["diversity"] = diversity_params
    return doc


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"lambda": 1.5}, "field params.diversity.lambda:"),
        ({"window": 0}, "field params.diversity.window:"),
        ({"pool": 301}, "field params.diversity.pool:"),
        ({"window": 20, "pool": 10}, "pool (10) must be at least window (20)"),
        ({"windw": 3}, "field params.diversity.windw: unknown field"),
    ],
)
def test_bad_diversity_params_name_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(WorkflowError) as err:
        parse_document(_pymk_with(params), "wf.yaml")
    assert any(p.startswith("node 'blend' ") and field in p for p in err.value.problems), (
        err.value.problems
    )


def test_diversity_is_off_in_pymk_and_a_list_served_surface_keeps_it() -> None:
    wf = parse_document(yaml.safe_load(PYMK.read_text()), "pymk.yaml")
    assert wf.node("blend").params.diversity is None  # type: ignore[attr-defined]
    doc = _pymk_with(DIVERSE)
    doc["spec"]["modes"]["online"] = {"enabled": False}
    view = precomputed_view(parse_document(doc, "pymk.yaml"))
    params = view.node("blend").params
    assert params.diversity is not None  # type: ignore[attr-defined]
    assert params.diversity.model_dump(by_alias=True) == DIVERSE  # type: ignore[attr-defined]


# ---- a suite with a diverse pymk ---------------------------------------------------------------
@pytest_asyncio.fixture(scope="module")
async def diverse_suite(
    tmp_path_factory: pytest.TempPathFactory, suite_world: World
) -> AsyncIterator[Suite]:
    """The suite with pymk and "pymk-diverse": pymk with diversity on."""
    root = tmp_path_factory.mktemp("diverse")
    cfg, redis = clone(suite_world, root / "world")
    workflows = root / "workflows"
    shutil.copytree(suite_world.workflows, workflows)
    doc = yaml.safe_load((workflows / "pymk.yaml").read_text())
    doc["metadata"]["name"] = doc["spec"]["surface"] = "pymk-diverse"
    doc["spec"]["modes"] = {"online": {"enabled": True}}
    next(n for n in doc["spec"]["nodes"] if n["name"] == "blend")["params"]["diversity"] = DIVERSE
    (workflows / "pymk-diverse.yaml").write_text(yaml.safe_dump(doc))
    cfg = dataclasses.replace(cfg, workflows_dir=workflows, reload_interval_s=0.3)
    async with running(suite_world.graph, redis, cfg) as suite:
        yield suite


# ---- Merge over gRPC -----------------------------------------------------------------------------
async def _graph_mapped(suite: Suite) -> Graph:
    svc = suite.servers["merging"][0]
    assert isinstance(svc, MergingService)
    for _ in range(400):
        try:
            if svc._store is not None:
                return svc._store.graph
        except GraphNotLoaded:
            pass
        await asyncio.sleep(0.025)
    raise AssertionError("the merging service never mapped the graph")


def _scores(values: np.ndarray) -> tensor_pb2.Tensor:
    data = np.asarray(values, "<f4").reshape(-1, 1)
    return tensor_pb2.Tensor(rows=data.shape[0], cols=1, columns=["score"], data=data.tobytes())


async def test_merge_refuses_bad_diversity_naming_the_field(diverse_suite: Suite) -> None:
    suite = diverse_suite
    ch = channel(f"127.0.0.1:{suite.servers['merging'][2]}")
    stub = merging_pb2_grpc.MergingServiceStub(ch)
    bad = {
        "diversity.k": merging_pb2.Diversity(k=0, window=2, mmr_lambda=0.5, pool=5),
        "diversity.pool": merging_pb2.Diversity(k=3, window=2, mmr_lambda=0.5, pool=6),
        "diversity.window": merging_pb2.Diversity(k=3, window=5, mmr_lambda=0.5, pool=4),
        "diversity.mmr_lambda": merging_pb2.Diversity(k=3, window=2, mmr_lambda=1.5, pool=5),
    }
    try:
        for name, msg in bad.items():
            req = merging_pb2.MergeRequest(member=1, k=5, diversity=msg)
            req.lists.add(name="x", ids=[2, 3], scores=_scores(np.asarray([1.0, 0.5])))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Merge(req, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (err.value.details() or "").startswith(name), err.value.details()
    finally:
        await ch.close()


def _mean_pair_similarity(sim: np.ndarray) -> float:
    n = sim.shape[0]
    return float((sim.sum() - np.trace(sim)) / (n * (n - 1)))


async def test_merge_reranks_its_pool_and_serves_k(diverse_suite: Suite) -> None:
    """Merge re-ranks the best `k` (the pool) by MMR over the mutual connections in the graph
    it maps, as diversity.similarity and diversity.mmr compute here, and serves diversity.k
    of them; the first window is less alike than the blended order's."""
    suite = diverse_suite
    graph = await _graph_mapped(suite)
    weights = inverse_log_degree(graph)
    member = next(
        m for m in members_with_degree(graph, 8)
        if friends_of_friends(graph, graph.index_of(m), 40, weights)[0].size >= 40
    )  # fmt: skip
    i = graph.index_of(member)
    found, score, _ = friends_of_friends(graph, i, 40, weights)
    ids = graph.ids[found]
    req = merging_pb2.MergeRequest(member=member, k=30, filters=["self", "connected"])
    req.lists.add(name="fof", ids=ids.tolist(), scores=_scores(score))
    ch = channel(f"127.0.0.1:{suite.servers['merging'][2]}")
    stub = merging_pb2_grpc.MergingServiceStub(ch)
    try:
        plain = await stub.Merge(req, timeout=10)
        req.diversity.CopyFrom(merging_pb2.Diversity(k=12, window=6, mmr_lambda=0.5, pool=30))
        diverse = await stub.Merge(req, timeout=10)
    finally:
        await ch.close()
    by_score = [e.target for e in plain.edges]
    assert len(by_score) == 30
    pool = np.asarray(by_score)
    rel = np.asarray([e.score for e in plain.edges], dtype=np.float64)
    sim = diversity.similarity(graph, np.asarray([i]), graph.indices_of(pool)[None, :])
    order = diversity.mmr(rel[None, :], sim, 0.5, 6)[0]
    served = [e.target for e in diverse.edges]
    assert served == pool[order][:12].tolist()
    assert served[:6] != by_score[:6]
    first = graph.indices_of(np.asarray(served[:6]))
    top = graph.indices_of(pool[:6])
    ils = diversity.similarity(graph, np.asarray([i, i]), np.stack([first, top]))
    assert _mean_pair_similarity(ils[0]) < _mean_pair_similarity(ils[1])
    # The 18 of the pool not served count as below the top k; scores and social proof ride
    # along as without diversity.
    dropped = {d.reason: d.count for d in diverse.dropped}
    assert dropped["top_k"] == {d.reason: d.count for d in plain.dropped}.get("top_k", 0) + 18
    scores = {e.target: e.score for e in plain.edges}
    proof = {e.target: e.social_proof.mutual_count for e in plain.edges}
    for e in diverse.edges:
        assert e.score == scores[e.target]
        assert e.social_proof.mutual_count == proof[e.target] > 0


# ---- through the gateway -------------------------------------------------------------------------
async def test_the_gateway_serves_k_from_the_pool_less_alike(diverse_suite: Suite) -> None:
    """A workflow with diversity serves k edges picked from its pool (the best 40 that pymk
    without it ranks), and its first window is less alike than pymk's first window."""
    suite = diverse_suite
    graph = await _graph_mapped(suite)
    client = connect(suite.cfg.redis_url)
    members = members_with_degree(graph, 6)[:24]
    ils: dict[str, list[float]] = {"pymk": [], "pymk-diverse": []}
    changed = 0
    for member in members:
        client.delete(keys.impressions(member))  # each list below is its first showing
        resp = await suite.recommend(member, k=10, surface="pymk-diverse", debug=True)
        assert not resp.partial, resp.degraded
        served = [e.target for e in resp.edges]
        client.delete(keys.impressions(member))
        pool = [e.target for e in (await suite.recommend(member, k=40)).edges]
        if len(pool) < 40:
            continue
        assert len(served) == 10 and set(served) <= set(pool), (served, pool)
        assert resp.funnel.dropped["top_k"] >= 30
        changed += served != pool[:10]
        i = np.asarray([graph.index_of(member)])
        for surface, ranked in (("pymk-diverse", served), ("pymk", pool)):
            sim = diversity.similarity(graph, i, graph.indices_of(np.asarray(ranked[:5]))[None])
            ils[surface].append(_mean_pair_similarity(sim[0]))
    assert len(ils["pymk"]) >= 10 and changed
    assert np.mean(ils["pymk-diverse"]) < np.mean(ils["pymk"]), ils


# ---- eval ----------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_eval_compares_lists_with_and_without_diversity(tmp_path: Path) -> None:
    params = {"lambda": 0.5, "window": 10, "pool": 40}
    result = small_eval(tmp_path, "--diversity", json.dumps(params))
    report = result["diversity"]
    assert report["arm_params"] == params
    assert report["arm_failed_requests"] == 0 and result["failed_requests"] == 0
    on, off = report["with"], report["without"]
    assert off["recall_at_k"] == result["recall_at_k"]  # pymk itself is the arm without
    assert off["intra_list_similarity_at_10"] == result["intra_list_similarity_at_10"]
    mutual = "mutual_connections"
    assert on["intra_list_similarity_at_10"][mutual] < off["intra_list_similarity_at_10"][mutual]
    assert report["recall_lost_at_k"] == round(1 - on["recall_at_k"] / off["recall_at_k"], 5)
    # A bad param is refused before anything starts, naming it.
    bad = subprocess.run(
        [sys.executable, "-m", "edgeflow.cli.main", "eval", "--edges", str(tmp_path / "social.txt"),
         "--diversity", '{"lambda": 2}'],
        env=dict(os.environ, EDGEFLOW_HOME=str(tmp_path / "home")), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0 and "lambda" in bad.stderr, bad.stderr[-2000:]
