"""The offline job on a real Redis, a real Feast repo and a trained ONNX ranker: the batch
runner against the per-request functions it vectorises, sharded against unsharded runs,
all-or-nothing visibility, and resume after a shard process is killed mid-run."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import redis
from world import World, clone

from edgeflow.candidates.sources import VectorIndex
from edgeflow.config import REPO_ROOT, Config
from edgeflow.features.compute import cosines, model_matrix, model_rows
from edgeflow.graph import Graph, friends_of_friends, inverse_log_degree
from edgeflow.local.redis_server import RedisProcess
from edgeflow.merging import blend
from edgeflow.offline import job
from edgeflow.offline.context import find_workflow, load_inputs
from edgeflow.offline.executor import (
    BatchRunner,
    OfflineError,
    _Batch,
    best_k,
    most_connected,
)
from edgeflow.offline.pairs import (
    PairIndex,
    TwoHop,
    index_cosines,
    member_friends_of_friends,
    member_measures,
)
from edgeflow.offline.ranking import BlendInput, _exact, blend_batch
from edgeflow.offline.rows import Rows, union
from edgeflow.stores import keys, lists
from edgeflow.stores.redis_client import connect
from edgeflow.stores.vectors import MARKER, EdgeReplica
from edgeflow.workflow.compiled import Workflow
from edgeflow.workflow.modes import list_name, precomputed_view, served_workflows
from edgeflow.workflow.validate import WorkflowError


@dataclasses.dataclass
class Built:
    cfg: Config
    redis: RedisProcess
    graph: Graph
    client: redis.Redis

    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            EDGEFLOW_HOME=str(self.cfg.home),
            REDIS_URL=self.cfg.redis_url,
            EDGEFLOW_WORKFLOWS=str(self.cfg.workflows_dir),
        )

    def workflow(self, name: str = "pymk") -> Workflow:
        return find_workflow(self.cfg, name)

    def runner(self, name: str = "pymk") -> BatchRunner:
        wf = self.workflow(name)
        return BatchRunner(wf, load_inputs(self.cfg, self.client, wf))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, suite_world: World) -> Iterator[Built]:
    """The session's trained world, cloned, with the checked-in pymk and follows graphs."""
    cfg, proc = clone(suite_world, tmp_path_factory.mktemp("offline"))
    workflows = cfg.home / "offline-workflows"
    workflows.mkdir()
    for name in ("pymk.yaml", "follows.yaml"):
        shutil.copy(REPO_ROOT / "workflows" / name, workflows)
    cfg = dataclasses.replace(cfg, workflows_dir=workflows)
    client = connect(proc.url)
    yield Built(cfg, proc, suite_world.graph, client)
    client.close()
    proc.stop()


def _clear_runs(client: redis.Redis, name: str) -> None:
    job.abandon(client, name)
    for key in client.scan_iter(match=f"{keys.PREFIX}list:{name}:*"):
        client.delete(key)


def _ttl(client: redis.Redis, key: str) -> int:
    return int(cast(int, client.ttl(key)))


def _entries(client: redis.Redis, name: str, members: np.ndarray) -> list[lists.StoredList]:
    got = lists.read_lists(client, name, members)
    assert all(s is not None for s in got), "a member has no entry in the live version"
    return [s for s in got if s is not None]


# ---- pure logic: the batch versions against what they vectorise -------------------------------
def test_union_keeps_first_seen_order_and_every_source() -> None:
    a = Rows(np.array([0, 0, 1]), np.array([5, 7, 5]), {"a": np.array([1, 2, 3], np.float32)})
    b = Rows(np.array([0, 0, 1, 1]), np.array([9, 5, 8, 5]), {"b": np.array([4, 5, 6, 7], "f4")})
    u = union([a, b])
    assert u.owner.tolist() == [0, 0, 0, 1, 1]
    assert u.ids.tolist() == [5, 7, 9, 5, 8]
    np.testing.assert_array_equal(u.sources["a"], [1, 2, np.nan, 3, np.nan])
    np.testing.assert_array_equal(u.sources["b"], [5, np.nan, 4, 7, 6])


def test_batch_blend_ranks_as_blend_py_does() -> None:
    rng = np.random.default_rng(3)
    members = 40
    inputs = []
    for name, weight, scored in (("rank", 1.0, True), ("precomputed", 0.5, False)):
        sizes = rng.integers(0, 30, members)
        owner = np.repeat(np.arange(members), sizes)
        ids = rng.integers(0, 60, owner.size)  # repeats within a member are deduplicated
        primary = rng.random(owner.size).astype(np.float32)
        primary[rng.random(owner.size) < 0.05] = np.nan
        inputs.append(
            BlendInput(name, owner, ids, primary, {name: primary.copy()}, {name: "online"},
                       weight, scored)
        )  # fmt: skip
    hidden_owner = rng.integers(0, members, 200)
    hidden_ids = rng.integers(0, 60, 200)
    fast = blend_batch(inputs, members, 15, (hidden_owner, hidden_ids), {})
    for j in range(members):
        ids, scores = _exact(inputs, j, 15, (hidden_owner, hidden_ids), {}, np.zeros(0, np.int64))
        assert fast[j][0].tolist() == ids.tolist(), j
        np.testing.assert_array_equal(fast[j][1], scores)
        assert not set(ids.tolist()) & set(hidden_ids[hidden_owner == j].tolist())


def test_blend_quotas_cap_a_source_per_member() -> None:
    owner = np.zeros(6, np.int64)
    ids = np.arange(6, dtype=np.int64)
    score = np.array([6, 5, 4, 3, 2, 1], np.float32)
    pop = np.array([6, 5, 4, np.nan, np.nan, np.nan], np.float32)
    fof = np.array([np.nan, np.nan, np.nan, 3, 2, 1], np.float32)
    lst = BlendInput("rank", owner, ids, score, {"popular": pop, "fof": fof}, {}, 1.0, True)
    none = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    [(got, _)] = blend_batch([lst], 1, 4, none, {"popular": 1})
    assert got.tolist() == [0, 3, 4, 5]
    reference = blend.blend(
        [blend.ScoredList("rank", ids, np.column_stack([score, pop, fof]),
                          ("score", "source:popular", "source:fof"))]
    )  # fmt: skip
    sel = blend.select(reference, 4, {"popular": 1})
    assert reference.ids[sel.index].tolist() == got.tolist()


def test_two_hop_products_equal_the_graph_functions(built: Built) -> None:
    g = built.graph
    inv = inverse_log_degree(g)
    rng = np.random.default_rng(8)
    members = np.append(rng.choice(g.ids, 20, replace=False), 10**9)  # the last is unknown
    dense = g.indices_of(members)
    two_hop = TwoHop.build(PairIndex(g, inv), dense)
    for weighted, min_common, limit in ((True, 1, 40), (False, 1, 25), (True, 2, 500)):
        owner, cand, counts = two_hop.friends_of_friends(limit, weighted, min_common)
        for j, i in enumerate(dense.tolist()):
            mine = owner == j
            want, want_counts = member_friends_of_friends(
                g, i, limit, inv if weighted else None, min_common
            )
            assert cand[mine].tolist() == want.tolist()  # the same cut, ties by member id
            np.testing.assert_array_equal(counts[mine], want_counts)
            if i >= 0 and min_common == 1:  # and the online ranking, up to ties at the cut
                idx, fof_counts, fof_score = friends_of_friends(
                    g, i, limit, inv if weighted else None
                )
                np.testing.assert_array_equal(np.sort(fof_counts), np.sort(counts[mine]))
                sure = fof_score > fof_score.min()
                assert set(idx[sure].tolist()) <= set(cand[mine].tolist())
    cands = [rng.choice(g.ids, rng.integers(1, 40)) for _ in members]
    owner = np.repeat(np.arange(members.size), [c.size for c in cands])
    cand_dense = g.indices_of(np.concatenate(cands))
    got = two_hop.measures(owner, cand_dense)
    np.testing.assert_array_equal(got, member_measures(g, inv, dense, owner, cand_dense))
    scal = rng.random((members.size, 4)).astype(np.float32)
    cscal = rng.random((owner.size, 4)).astype(np.float32)
    universe = np.append(g.ids, 10**9)  # one embedding per member
    vectors = rng.normal(size=(universe.size, 32)).astype(np.float32)
    emb = vectors[np.searchsorted(universe, members)]
    cemb = vectors[np.searchsorted(universe, np.concatenate(cands))]
    rows = model_rows(owner, got, scal, cscal, cosines(owner, emb, cemb))
    for j in range(members.size):
        mine = owner == j
        want = model_matrix(g, inv, int(dense[j]), cand_dense[mine], scal[j], cscal[mine],
                            emb[j], cemb[mine])  # fmt: skip
        np.testing.assert_array_equal(rows[mine, :-1], want[:, :-1])  # the very same sums
        np.testing.assert_allclose(rows[mine, -1], want[:, -1], rtol=1e-5, atol=1e-6)
    # The EBR index's unit vectors give the same cosines (rows it lacks use the formula).
    lacking = [int(members[0]), int(cands[-1][-1])]  # rows with these use the formula
    held = ~np.isin(universe, lacking)
    index = VectorIndex(universe[held], vectors[held])
    np.testing.assert_allclose(
        index_cosines(index, members, owner, np.concatenate(cands), emb, cemb),
        cosines(owner, emb, cemb), rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def test_best_k_finds_each_rows_k_best_ties_by_lowest_column() -> None:
    rng = np.random.default_rng(3)
    for n, k in ((20_000, 50), (3_000, 200), (150, 100)):
        sims = rng.normal(size=(6, n)).astype(np.float32)
        sims[:, rng.random(n) < 0.1] = -np.inf  # members without an embedding
        sims[1] = np.round(sims[1], 1)  # ties at the k-th value
        sims[2, k // 2 :] = -np.inf  # fewer than k finite values
        sims[3, :] = np.round(sims[3], 0)  # many ties
        # The stable sort by value, highest first: ties go to the lowest column.
        want = np.sort(np.argsort(-sims, axis=1, kind="stable")[:, :k], axis=1)
        np.testing.assert_array_equal(np.sort(best_k(sims, k), axis=1), want)


def test_exact_ebr_cuts_ties_by_lowest_id_for_the_nearline_worker_and_the_batch() -> None:
    """Members with one connection, to the same member, have the same spectral embedding:
    exact EBR ties at its cut, and both exact searches keep the lowest ids."""
    rng = np.random.default_rng(5)
    ids = rng.permutation(np.arange(1_000, 1_300)).astype(np.int64)
    vectors = rng.normal(size=(ids.size, 8)).astype(np.float32)
    twins = rng.choice(ids.size, 60, replace=False)
    vectors[twins] = vectors[twins[0]]  # 60 members share one direction
    index = VectorIndex(ids, vectors)
    member = int(ids[twins[1]])
    got, _ = index.nearest(member, 20, np.zeros(0, np.int64))
    want = sorted(int(i) for i in ids[twins] if i != member)[:20]
    assert sorted(got.tolist()) == want
    [row] = index.rows(np.array([member]))
    sims = index.vectors @ index.vectors[row]
    sims[row] = -np.inf
    top = best_k(sims[None, :], 20)[0]
    assert sorted(index.ids[top].tolist()) == want


def test_most_connected_is_the_stable_sort_by_degree() -> None:
    degree = np.random.default_rng(4).integers(0, 30, 5_000)
    for head in (1, 100, 4_999, 5_000, 6_000):
        want = np.argsort(-degree, kind="stable")[:head]
        np.testing.assert_array_equal(most_connected(degree, head), want)


def test_member_by_member_runs_give_the_batch_lists_without_the_pair_index(built: Built) -> None:
    """The nearline worker's runner: its graph changes every batch, so it must not build the
    whole-graph pair index for each; its lists are the bulk path's."""
    wf = built.workflow()
    inputs = load_inputs(built.cfg, built.client, wf)
    members = np.sort(built.graph.ids)[:40]
    per_member = BatchRunner(wf, inputs, per_member=True).run(members)
    assert inputs._pairs is None
    bulk = BatchRunner(wf, inputs).run(members)
    assert inputs._pairs is not None
    assert per_member.pairs_scored == bulk.pairs_scored > 0
    for (ids_a, sc_a), (ids_b, sc_b) in zip(per_member.lists, bulk.lists, strict=True):
        assert ids_a.tolist() == ids_b.tolist()
        np.testing.assert_array_equal(sc_a, sc_b)


def test_served_workflows_serve_offline_only_surfaces_from_their_list(built: Built) -> None:
    pymk, follows = built.workflow("pymk"), built.workflow("follows")
    served = served_workflows({"pymk": pymk, "follows": follows})
    assert served["pymk"] is pymk
    view = served["follows"]
    assert [(n.node.name, n.node.op) for n in view.nodes] == [
        ("precomputed", "candidates.precomputed"), ("blend", "merge.blend")
    ]  # fmt: skip
    assert view.nodes[0].params.model_dump()["list"] == list_name(follows) == "follows"
    assert view.spec.modes.offline is not None and not view.spec.modes.online.enabled
    assert served_workflows({"follows": view})["follows"].nodes == view.nodes  # idempotent
    off = follows.spec.model_copy(update={"modes": follows.spec.modes.model_copy(
        update={"offline": None, "nearline": None})})  # fmt: skip
    assert served_workflows({"x": Workflow("x", off, follows.nodes)}) == {}
    assert precomputed_view(follows).surface == "follows"


# ---- runs against Redis ----------------------------------------------------------------------
def test_lists_are_ranked_filtered_and_batch_invariant(built: Built) -> None:
    runner = built.runner()
    client, g = built.client, built.graph
    members = np.sort(g.ids)[:60]
    member = int(members[5])
    i = g.index_of(member)
    first = runner.run(members[:5])
    blocked = int(runner.run(members[5:6]).lists[0][0][0])
    client.sadd(keys.blocked(member), blocked)
    try:
        whole = runner.run(members)
        in_parts = [runner.run(members[s : s + 23]) for s in range(0, members.size, 23)]
    finally:
        client.delete(keys.blocked(member))
    parts = [lst for r in in_parts for lst in r.lists]
    assert whole.pairs_scored == sum(r.pairs_scored for r in in_parts) > 0
    for j, ((ids, scores), (pids, pscores)) in enumerate(zip(whole.lists, parts, strict=True)):
        assert ids.tolist() == pids.tolist(), j
        np.testing.assert_array_equal(scores, pscores)
        assert np.all(np.diff(scores) <= 0) and 0 < ids.size <= runner.k
    ids = set(whole.lists[5][0].tolist())
    assert blocked not in ids and member not in ids
    assert not ids & set(g.ids[g.neighbors(i)].tolist())
    # A batch of a few members takes the per-member feature path: the same lists.
    for (ids_a, sc_a), (ids_b, sc_b) in zip(first.lists, whole.lists[:5], strict=True):
        assert ids_a.tolist() == ids_b.tolist()
        np.testing.assert_array_equal(sc_a, sc_b)


def test_a_missing_model_fails_before_the_first_batch(built: Built, tmp_path: Path) -> None:
    doc = (
        (built.cfg.workflows_dir / "pymk.yaml")
        .read_text()
        .replace("model: pymk-ranker", "model: no-such-model")
    )
    path = tmp_path / "nomodel.yaml"
    path.write_text(doc)
    with pytest.raises(
        OfflineError, match=r"node 'rank' field params\.model: model 'no-such-model'"
    ):
        load_inputs(built.cfg, built.client, find_workflow(built.cfg, str(path)))
    with pytest.raises(WorkflowError, match="no workflow 'nope'"):
        find_workflow(built.cfg, "nope")


def test_sharded_run_equals_unsharded_and_swaps_once(built: Built) -> None:
    client, name = built.client, "pymk"
    _clear_runs(client, name)
    runner = built.runner()
    ids = built.graph.ids
    whole = job.begin(client, name, 1, "pymk")
    report = job.run_shard(client, runner, whole, 0, ids, batch_size=64)
    assert report.published and report.members == ids.size
    assert lists.current_version(client, name) == whole.version
    one = _entries(client, name, ids)

    sharded = job.begin(client, name, 3, "pymk")
    assert sharded.version != whole.version
    owned = [job.shard_members(ids, s, 3) for s in range(3)]
    assert sum(m.size for m in owned) == ids.size
    assert np.array_equal(np.sort(np.concatenate(owned)), np.sort(ids))
    for s in range(3):
        rep = job.run_shard(client, runner, sharded, s, owned[s], batch_size=17, threads=2)
        live = lists.current_version(client, name)
        assert rep.published == (s == 2)
        assert live == (sharded.version if s == 2 else whole.version)  # all or nothing
    three = _entries(client, name, ids)
    assert all(e.version == sharded.version and e.mode == "offline" for e in three)
    for a, b in zip(one, three, strict=True):
        assert a.ids.tolist() == b.ids.tolist()
        np.testing.assert_array_equal(a.scores, b.scores)
    meta = client.hgetall(keys.list_meta(name, sharded.version))
    assert int(meta[b"members"]) == ids.size and int(meta[b"shards"]) == 3
    assert job.pending(client, name) is None
    # The replaced version expires after the grace period; readers of it had time.
    assert 0 < _ttl(client, keys.list_meta(name, whole.version)) <= lists.GRACE_S


def test_a_run_that_does_not_fit_the_pending_one_is_refused(built: Built) -> None:
    client = built.client
    _clear_runs(client, "follows")
    first = job.begin(client, "follows", 2, "follows")
    assert job.begin(client, "follows", 2, "follows") == first  # shards join the run
    with pytest.raises(job.RunConflict, match=r"2 shards.*pass --restart"):
        job.begin(client, "follows", 3, "follows")
    assert job.abandon(client, "follows") == first.version
    assert job.begin(client, "follows", 3, "follows").version != first.version
    _clear_runs(client, "follows")


def test_nearline_entries_newer_than_the_run_survive_its_swap(built: Built) -> None:
    client, name = built.client, "carry"
    members = np.asarray([1, 2, 3])
    old = [(np.asarray([m + 10]), np.asarray([0.5], np.float32)) for m in members]
    lists.write_lists(client, name, members, old)
    run = job.begin(client, name, 1, "pymk")
    fresh = [(np.asarray([42]), np.asarray([0.9], np.float32))]
    lists.update_lists(client, name, np.asarray([2]), fresh)  # the worker, during the run
    pipe = client.pipeline()
    new = [(np.asarray([m + 20]), np.asarray([0.1], np.float32)) for m in members]
    lists.queue_entries(pipe, name, run.version, members, new, run.started_at)
    pipe.execute()
    job.finish_shard(client, run, 0)
    got = _entries(client, name, members)
    assert [e.ids.tolist() for e in got] == [[21], [42], [23]]
    assert [e.mode for e in got] == ["offline", "nearline", "offline"]
    assert all(e.version == run.version for e in got)


def _cli(built: Built, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgeflow.cli.main", "offline", "run", "--workflow", "pymk",
         "--json", "--quiet", *args],
        env=built.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_a_killed_shard_leaves_the_old_list_live_and_resumes(built: Built) -> None:
    client, name, ids = built.client, "pymk", built.graph.ids
    _clear_runs(client, name)
    old = lists.write_lists(
        client, name, ids, [(np.asarray([7]), np.asarray([1.0], np.float32))] * ids.size
    )
    shard0 = job.shard_members(ids, 0, 2)
    proc = _cli(built, "--shards", "2", "--shard", "0", "--batch-size", "3", "--threads", "1")
    try:
        deadline = time.monotonic() + 60
        run = None
        while time.monotonic() < deadline:
            run = job.pending(client, name)
            if run is not None and job.checkpoint(client, run, 0)[1] >= 9:
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.01)
        assert run is not None
        client.execute_command("CLIENT", "PAUSE", 5000, "WRITE")  # its next batch blocks
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
        if proc.poll() is None:
            proc.kill()
    last, done, _ = job.checkpoint(client, run, 0)
    assert 9 <= done < shard0.size and last == int(shard0[done - 1])
    # Half a run is in Redis, yet every reader still gets the old batch.
    assert client.exists(keys.list_entry(name, run.version, int(shard0[0])))
    assert all(e.version == old for e in _entries(client, name, ids))
    assert (
        0 < _ttl(client, keys.list_entry(name, run.version, int(shard0[0]))) <= lists.PENDING_TTL_S
    )

    # Both shards as local processes: shard 0 resumes after its checkpoint.
    local = _cli(built, "--local", "--shards", "2", "--batch-size", "16")
    out, err = local.communicate(timeout=120)
    assert local.returncode == 0, err.decode()
    summary = json.loads(out.decode().splitlines()[-1])
    assert summary["live"] and summary["version"] == run.version
    by_shard = {r["shard"]: r for r in summary["shards"]}
    assert by_shard[0]["resumed_after"] == done and by_shard[1]["resumed_after"] == 0
    assert by_shard[0]["members"] + by_shard[1]["members"] == ids.size
    got = _entries(client, name, ids)
    assert all(e.version == run.version for e in got)
    # What the killed and the resumed processes wrote is what one batch of all computes.
    want = built.runner().run(np.sort(ids))
    for (ids_want, _), entry in zip(want.lists, _entries(client, name, np.sort(ids)), strict=True):
        assert entry.ids.tolist() == ids_want.tolist()


def test_cli_names_bad_arguments(built: Built) -> None:
    env = dict(built.env(), JOB_COMPLETION_INDEX="5")
    out = subprocess.run(
        [sys.executable, "-m", "edgeflow.cli.main", "offline", "run", "--workflow", "pymk",
         "--shards", "2"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "JOB_COMPLETION_INDEX 5 is outside 0..1" in out.stderr


# ---- what the command line shows ----------------------------------------------------------
TOOK = r"\((\d+\.\ds|\d+m \d\ds|\d+h \d\dm)\)"
WHEN = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \((just now|\d+ s ago)\)"


def _offline(built: Built, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeflow.cli.main", "offline", *args],
        env=built.env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_status_prints_times_and_ages_people_read(built: Built) -> None:
    client, name, ids = built.client, "pymk", built.graph.ids
    _clear_runs(client, name)
    run = job.begin(client, name, 2, "pymk")
    job.set_stage(client, run, 0, job.STAGE_LOADING)
    job.set_stage(client, run, 1, job.STAGE_SCORING)
    pending = _offline(built, "status", "--workflow", "pymk")
    assert pending.returncode == 0, pending.stderr
    assert re.search(
        rf"^run in progress: version {run.version}, started {WHEN}, ", pending.stdout, re.M
    )
    assert f"  shard 0: {job.STAGE_LOADING}\n  shard 1: scoring\n" in pending.stdout

    runner = built.runner()
    for s in range(2):
        job.run_shard(client, runner, run, s, job.shard_members(ids, s, 2), batch_size=64)
    status = _offline(built, "status", "--workflow", "pymk")
    assert status.returncode == 0, status.stderr
    out = status.stdout
    assert re.search(rf"^  created_at: +{WHEN}$", out, re.M), out
    assert re.search(rf"^  published_at: +{WHEN}$", out, re.M), out
    assert re.search(rf"^  members: +{ids.size:,}$", out, re.M), out
    assert not re.search(r"\d{9,}\.\d", out), out  # no unix seconds as floats
    assert "no run in progress" in out


def test_offline_run_says_what_it_does_from_the_start(built: Built) -> None:
    client, name, n = built.client, "pymk", built.graph.ids.size
    _clear_runs(client, name)
    local = _offline(built, "run", "--workflow", "pymk", "--local", "--shards", "2", "--json")
    assert local.returncode == 0, local.stderr
    version = json.loads(local.stdout)["version"]
    # Not a terminal: one line per stage with its duration, in order, no bars.
    stages = [
        r"loading workflow pymk: writes list 'pymk'",
        rf"counting the members: {n:,} members in 2 shards",
        r"starting 2 shard processes: 2/2 ready",
        rf"pymk {version}: {n:,}/{n:,} members, [\d,]+ members/s",
    ]
    lines = local.stderr.splitlines()
    assert len(lines) == len(stages), lines
    for pattern, line in zip(stages, lines, strict=True):
        assert re.fullmatch(rf"{pattern} {TOOK}", line), (pattern, line)
    assert "\x1b[" not in local.stderr and "\u2501" not in local.stderr
    # Each shard process said what it was doing, which is what the parent's bar read.
    done = job.Run(name, version, 2, 0.0, "pymk")
    assert job.stages(client, done) == {0: job.STAGE_SCORING, 1: job.STAGE_SCORING}

    _clear_runs(client, name)
    one = _offline(built, "run", "--workflow", "pymk", "--shards", "2", "--json")
    assert one.returncode == 0, one.stderr
    lines = one.stderr.splitlines()
    assert len(lines) == 4, lines
    assert re.fullmatch(rf"loading workflow pymk: writes list 'pymk' {TOOK}", lines[0]), lines
    loading = rf"{job.STAGE_LOADING}: {n:,} members, [\d,]+ edges {TOOK}"
    assert re.fullmatch(loading, lines[1]), lines
    for s, line in enumerate(lines[2:]):
        shard = rf"pymk shard {s}/2: (\d+)/\1 members, [\d,]+ members/s, [\d,]+ pairs/s {TOOK}"
        assert re.fullmatch(shard, line), lines


def test_large_graphs_search_ebr_on_the_live_hnsw_collection(
    built: Built, caplog: pytest.LogCaptureFixture
) -> None:
    """Past EXACT_EBR_MAX members (here 0), EBR searches the candidates service's HNSW
    collection through the run's own copy of the shard: what the exact search finds, never
    the member or its connections; closing the inputs deletes the copy; a collection that
    cannot be opened leaves the run on the exact search, with a warning that says why."""
    wf = built.workflow()
    [ebr] = [cn for cn in wf.nodes if cn.node.op == "candidates.ebr"]
    members = np.sort(built.graph.ids)[::7]
    exact = load_inputs(built.cfg, built.client, wf)
    assert exact.ann is None
    ann = load_inputs(built.cfg, built.client, wf, exact_ebr_max=0)
    assert isinstance(ann.ann, EdgeReplica)
    copy = ann.ann.path
    assert copy.is_dir()
    want = BatchRunner(wf, exact)._ebr(ebr, [], _Batch(exact, members, per_member=True))
    got = BatchRunner(wf, ann)._ebr(ebr, [], _Batch(ann, members, per_member=True))
    assert got.ids.size > 0 and got.modes == {"ebr": "offline"}
    g = built.graph
    for j, i in enumerate(g.indices_of(members).tolist()):
        found = got.ids[got.owner == j]
        assert members[j] not in found and not np.isin(found, g.ids[g.neighbors(i)]).any()
    hits = sum(
        np.intersect1d(got.ids[got.owner == j], want.ids[want.owner == j]).size
        for j in range(members.size)
    )
    assert hits / want.ids.size >= 0.95
    ann.close()
    assert ann.ann is None and not copy.exists()

    name = cast(bytes, built.client.get(keys.EMBEDDINGS_CURRENT)).decode()
    marker = built.cfg.qdrant_path / "shards" / name / MARKER
    saved = marker.read_bytes()
    marker.write_text("{not json")
    try:
        with caplog.at_level("WARNING", logger="edgeflow.offline"):
            fallback = load_inputs(built.cfg, built.client, wf, exact_ebr_max=0)
    finally:
        marker.write_bytes(saved)
    assert fallback.ann is None and fallback.index is not None
    assert f"embedding collection {name} not opened, EBR searches exactly" in caplog.text
    assert str(built.cfg.qdrant_path / "shards" / name) in caplog.text
