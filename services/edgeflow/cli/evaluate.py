"""`edgeflow eval`: recall@k end to end through Recommend, against Adamic-Adar on the same
split and the same members."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import cast

import grpc
import numpy as np

from edgeflow.cli import CliError, ceiling, diversity_eval
from edgeflow.cli.harness import running_suite
from edgeflow.experiments import records
from edgeflow.graph import (
    EdgeFileError,
    Graph,
    friends_of_friends,
    inverse_log_degree,
    read_edge_file,
    split_edges,
)
from edgeflow.shell import auth
from edgeflow.stores.redis_client import SyncClient, connect
from edgeflow.v1 import gateway_pb2, gateway_pb2_grpc
from edgeflow.workflow.validate import load_directory

CONCURRENCY = 2  # a quality run, not a load test: keep every request within its deadlines
MAX_SESSIONS = 20
EXPOSURE_WAIT_S = 30.0
SURFACE = "pymk"


def hidden_by_member(hidden: tuple[np.ndarray, np.ndarray]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for u, v in zip(hidden[0].tolist(), hidden[1].tolist(), strict=True):
        out.setdefault(u, set()).add(v)
        out.setdefault(v, set()).add(u)
    return out


def adamic_adar_top_k(graph: Graph, member: int, k: int, weights: np.ndarray) -> list[int]:
    i = graph.index_of(member)
    if i < 0:
        return []
    cands, _, _ = friends_of_friends(graph, i, k, weights)
    return [int(x) for x in graph.ids[cands]]


async def recommend_all(
    connect: Callable[[], grpc.aio.Channel], members: list[int], k: int, surface: str = SURFACE
) -> tuple[dict[int, list[int]], Counter[str], list[str]]:
    ch = connect()  # made on this event loop: a grpc.aio channel belongs to one
    stub = gateway_pb2_grpc.RecommenderStub(ch)
    sem = asyncio.Semaphore(CONCURRENCY)
    results: dict[int, list[int]] = {}
    degraded: Counter[str] = Counter()
    errors: list[str] = []

    async def one(m: int) -> None:
        async with sem:
            req = gateway_pb2.RecommendRequest(surface=surface, member=m, k=k)
            try:
                resp = await stub.Recommend(req, timeout=10)
            except Exception as exc:  # recorded, and the member counts as zero hits
                errors.append(f"member {m}: {exc}")
                results[m] = []
                return
            degraded.update(line.split(":", 1)[0] for line in resp.degraded)
            degraded["responses"] += int(resp.partial)
            results[m] = [e.target for e in resp.edges]

    await asyncio.gather(*(one(m) for m in members))
    await ch.close()
    return results, degraded, errors


def recall(recs: dict[int, list[int]], truth: dict[int, set[int]]) -> float:
    hits = sum(len(truth[m].intersection(r)) for m, r in recs.items())
    total = sum(len(truth[m]) for m in recs)
    return hits / total if total else 0.0


# Members by their degree in the training graph (what serving sees): 0 is a cold start (every
# edge hidden), 1-2 nearly one.
DEGREE_BUCKETS = ((0, 0), (1, 2), (3, 9), (10, 49), (50, None))


def bucket_name(lo: int, hi: int | None) -> str:
    return str(lo) if hi == lo else f"{lo}+" if hi is None else f"{lo}-{hi}"


def recall_by_degree(
    graph: Graph,
    recs: dict[int, list[int]],
    baseline: dict[int, list[int]],
    truth: dict[int, set[int]],
) -> dict[str, dict[str, float | int]]:
    """recall@k of Recommend and of Adamic-Adar per training-degree bucket of the members."""
    degree = {m: int(graph.degree[graph.index_of(m)]) for m in recs}
    out: dict[str, dict[str, float | int]] = {}
    for lo, hi in DEGREE_BUCKETS:
        mine = [m for m, d in degree.items() if d >= lo and (hi is None or d <= hi)]
        out[bucket_name(lo, hi)] = {
            "members": len(mine),
            "hidden_edges": sum(len(truth[m]) for m in mine),
            "recall_at_k": round(recall({m: recs[m] for m in mine}, truth), 5),
            "baseline_adamic_adar_recall_at_k": round(
                recall({m: baseline[m] for m in mine}, truth), 5
            ),
        }
    return out


def still_shown(first: dict[int, list[int]], later: dict[int, list[int]]) -> float:
    """Share of the first session's recommendations that a later session shows again."""
    shown = sum(len(first[m]) for m in first)
    again = sum(len(set(first[m]) & set(later.get(m, ()))) for m in first)
    return round(again / shown, 5) if shown else 0.0


def repeat_sessions(
    first: dict[int, list[int]], later: list[dict[int, list[int]]], truth: dict[int, set[int]]
) -> dict[str, object]:
    """Impressions, measured: the same members asked again with no action in between."""
    return {
        "sessions": 1 + len(later),
        "session_1_recall_at_k": round(recall(first, truth), 5),
        "still_shown_by_session": [1.0, *(still_shown(first, s) for s in later)],
        "still_shown_at_last_session": still_shown(first, later[-1]),
        "recall_at_k_by_session": [
            round(recall(first, truth), 5),
            *(round(recall(s, truth), 5) for s in later),
        ],
    }


def _await_exposures(client: SyncClient, count: int) -> None:
    """Wait (at most EXPOSURE_WAIT_S) until the exposure stream holds `count` entries."""
    give_up = time.monotonic() + EXPOSURE_WAIT_S
    while cast(int, client.xlen(records.EXPOSURES)) < count and time.monotonic() < give_up:
        time.sleep(0.05)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.holdout < 1:
        raise CliError(f"--holdout must be between 0 and 1, got {args.holdout}")
    if not 1 <= args.k <= 500:
        raise CliError(f"--k must be between 1 and 500, got {args.k}")
    t0 = time.perf_counter()
    try:
        src, dst = read_edge_file(args.edges)
    except EdgeFileError as exc:
        raise CliError(str(exc)) from None
    kept, hidden = split_edges(src, dst, args.holdout, args.seed)
    members_all = np.unique(np.concatenate([src, dst]))
    graph = Graph.from_edges(kept[0], kept[1], members=members_all)
    truth = hidden_by_member(hidden)
    rng = np.random.default_rng(args.seed)
    pool = np.asarray(sorted(truth), dtype=np.int64)
    chosen = rng.choice(pool, size=min(args.max_members, pool.size), replace=False)
    members = sorted(int(m) for m in chosen)
    if not members:
        raise CliError("no member has a hidden edge: the edge list is too small for this holdout")

    weights = inverse_log_degree(graph)
    baseline = {m: adamic_adar_top_k(graph, m, args.k, weights) for m in members}
    cluster = getattr(args, "redis_cluster", 0) or 0
    sessions = getattr(args, "sessions", 1) or 1
    if not 1 <= sessions <= MAX_SESSIONS:
        raise CliError(f"--sessions must be between 1 and {MAX_SESSIONS}, got {sessions}")
    with (
        diversity_eval.arm_workflows(getattr(args, "diversity", None)) as arm,
        running_suite(graph, seed=args.seed, log=not args.json, redis_cluster=cluster) as h,
    ):
        key = auth.local_key(h.suite.home)
        recs, partial, errors = asyncio.run(
            recommend_all(lambda: h.channel("gateway", key), members, args.k)
        )
        sources, source_errors = asyncio.run(
            ceiling.generate_all(
                lambda: h.channel("candidates", key),
                ceiling.candidate_requests(load_directory(h.cfg.workflows_dir)[0]["pymk"]),
                members,
            )
        )
        later: list[dict[int, list[int]]] = []
        failed = [len(errors)]
        partial_by_session = [partial["responses"]]
        client = connect(h.cfg.redis_url)
        for n in range(2, sessions + 1):
            # Each session starts once the last one's exposures (and so its impressions,
            # written beside them) are in Redis.
            _await_exposures(client, (n - 1) * len(members))
            again, more_partial, more_errors = asyncio.run(
                recommend_all(lambda: h.channel("gateway", key), members, args.k)
            )
            later.append(again)
            failed.append(len(more_errors))
            partial_by_session.append(more_partial["responses"])
            partial.update(more_partial)
            errors += more_errors

        def serve_arm(surface: str) -> tuple[dict[int, list[int]], int, int]:
            lists, arm_partial, arm_errors = asyncio.run(
                recommend_all(lambda: h.channel("gateway", key), members, args.k, surface)
            )
            return lists, len(arm_errors), arm_partial["responses"]

        arm.serve(client, members, lambda: _await_exposures(client, sessions * len(members)),
                  serve_arm)  # fmt: skip
    result = {
        "recall_at_k": round(recall(recs, truth), 5),
        "baseline_adamic_adar_recall_at_k": round(recall(baseline, truth), 5),
        "members": len(members),
        "k": args.k,
        "recall_at_k_by_degree": recall_by_degree(graph, recs, baseline, truth),
        "candidate_recall_ceiling": {
            **ceiling.ceiling(sources, truth, members),
            "failed_requests": len(source_errors),
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "holdout": args.holdout,
        "seed": args.seed,
        "hidden_edges_of_members": sum(len(truth[m]) for m in members),
        "graph_members": graph.n,
        "train_edges": graph.edge_count,
        "partial_responses": partial.pop("responses", 0),
        "fallbacks_by_node": dict(partial),
        "failed_requests": len(errors),
        "failed_examples": errors[:5],
    }
    result.update(arm.report(graph, recs, truth, args.k, args.seed))
    if sessions > 1:
        result["repeat_sessions"] = {
            **repeat_sessions(recs, later, truth),
            "failed_requests_by_session": failed,
            "partial_responses_by_session": partial_by_session,
        }
    base = result["baseline_adamic_adar_recall_at_k"]
    result["lift_vs_baseline"] = round(result["recall_at_k"] / base - 1, 4) if base else None
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key in ("recall_at_k_by_degree", "repeat_sessions", "candidate_recall_ceiling",
                       "diversity"):  # fmt: skip
                continue
            print(f"{key:>34}: {value}")
        for name, row in result["recall_at_k_by_degree"].items():
            print(
                f"{'recall_at_k, degree ' + name:>34}: {row['recall_at_k']} "
                f"(Adamic-Adar {row['baseline_adamic_adar_recall_at_k']}, "
                f"{row['members']} members, {row['hidden_edges']} hidden edges)"
            )
        for key, value in result["candidate_recall_ceiling"].items():
            print(f"{'candidate recall ceiling, ' + key:>34}: {value}")
        for key, value in result.get("repeat_sessions", {}).items():
            print(f"{key:>34}: {value}")
        for key, value in result.get("diversity", {}).items():
            print(f"{'diversity, ' + key:>34}: {value}")
        for line in errors[:5]:
            print(f"  error: {line}")
    return 0
