"""Nearline cost per event and offline cost per pair against the graph's size.

    .venv/bin/python benchmarks/scale_costs.py serve --members 10000 --state /tmp/ef-10k.json &
    .venv/bin/python benchmarks/scale_costs.py serve --members 100000 --state /tmp/ef-100k.json &
    .venv/bin/python benchmarks/scale_costs.py measure /tmp/ef-10k.json /tmp/ef-100k.json
    rm /tmp/ef-10k.json /tmp/ef-100k.json   # stops the suites

`serve` generates `social_graph(members, seed=0)`, stores it, trains on it and starts the
services through the bench harness (`running_suite`), stops the suite's own nearline worker
(`measure` applies the events itself), writes the suite's configuration to --state and keeps
the suite up until that file is deleted, so code changes can be measured against the same
suites. `measure` runs in one process, against each suite in turn:

- offline: `job.run_shard` of the pymk workflow over a fixed random sample of members (one
  shard, one thread, batches of 256 as the job's default): pairs scored per second;
- nearline: connect events published as the gateway does, applied by the worker's
  `Processor.handle` (graph delta, feature push, recompute, store, ack) one per batch, then
  BATCH per batch (as a backlog makes them): ms per event.

It prints each figure and its ratio against the first suite's; `--profile DIR` also writes
cProfile stats of both phases per suite, and `--dump DIR` the offline lists (npz), so two
versions of the code can be checked to store the same lists (run the old one from a
checkout of it, e.g. `git worktree add`, with PYTHONPATH=<checkout>/services). The machine
is shared: compare ratios of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from edgeflow import config
from edgeflow.build.synthetic import social_graph
from edgeflow.cli.harness import running_suite
from edgeflow.graph import Graph
from edgeflow.nearline.events import Event, publish
from edgeflow.nearline.worker import Processor, PushFailed
from edgeflow.offline import job
from edgeflow.offline.context import find_workflow, load_inputs
from edgeflow.offline.executor import BatchRunner
from edgeflow.stores import lists
from edgeflow.stores.redis_client import connect

SAMPLE_MEMBERS = 1500
EVENTS = 40
WARM_EVENTS = 3
BATCH = 16  # events per batch when the worker has a backlog (it reads up to 64)
BATCHES = 4
# What the state file keeps of the suite's configuration (where its Redis and services are).
_SUITE_FIELDS = ("home", "redis_url", "candidates_addr", "features_addr", "scoring_addr",
                 "merging_addr", "gateway_addr")  # fmt: skip


def serve(members: int, state: Path) -> None:
    edges = social_graph(members, seed=0)
    graph = Graph.from_edges(edges[:, 0], edges[:, 1])
    with running_suite(graph, seed=0) as h:
        nearline = h.suite.pids.pop("nearline")
        os.kill(nearline, signal.SIGTERM)
        cfg = {name: str(getattr(h.cfg, name)) for name in _SUITE_FIELDS}
        state.write_text(json.dumps({"members": members, "cfg": cfg}))
        print(f"suite of {members:,} members up: {state}", file=sys.stderr, flush=True)
        while state.exists():
            time.sleep(1.0)


def _config(state: Path) -> tuple[int, config.Config]:
    data = json.loads(state.read_text())
    cfg = dataclasses.replace(config.load(), home=Path(data["cfg"]["home"]))
    fields = {name: data["cfg"][name] for name in _SUITE_FIELDS if name != "home"}
    return int(data["members"]), dataclasses.replace(cfg, **fields)


def _profiled(profile: Path | None, name: str, fn: Any, *args: Any) -> Any:
    if profile is None:
        return fn(*args)
    prof = cProfile.Profile()
    try:
        return prof.runcall(fn, *args)
    finally:
        profile.mkdir(parents=True, exist_ok=True)
        prof.dump_stats(profile / f"{name}.prof")


def offline(
    cfg: config.Config, profile: Path | None, tag: str, dump: Path | None = None
) -> dict[str, float]:
    client = connect(cfg.redis_url)
    wf = find_workflow(cfg, "pymk")
    t = time.perf_counter()
    inputs = load_inputs(cfg, client, wf)
    _ = inputs.pairs
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(5)
    sample = np.sort(rng.choice(inputs.graph.ids, SAMPLE_MEMBERS, replace=False))
    runner = BatchRunner(wf, inputs)
    job.abandon(client, "pymk")
    run = job.begin(client, "pymk", 1, wf.name)
    report = _profiled(profile, f"offline-{tag}", job.run_shard, client, runner, run, 0,
                       sample, 256)  # fmt: skip
    if dump is not None:  # the stored lists, to compare two versions of the code
        stored = [s for s in lists.read_lists(client, "pymk", sample) if s is not None]
        dump.mkdir(parents=True, exist_ok=True)
        np.savez(dump / f"lists-{tag}.npz", members=sample,
                 ids=np.concatenate([s.ids for s in stored]),
                 scores=np.concatenate([s.scores for s in stored]),
                 sizes=np.asarray([s.ids.size for s in stored]))  # fmt: skip
    inputs.close()
    client.close()
    return {
        "offline_load_s": load_s,
        "offline_pairs": report.pairs_scored,
        "offline_pairs_per_s": report.pairs_scored / report.seconds,
        "offline_us_per_pair": 1e6 * report.seconds / report.pairs_scored,
    }


def _events(cfg: config.Config, ids: np.ndarray, adjacency: Any, n: int) -> list[Event]:
    rng = np.random.default_rng(int(time.time()))
    out: list[Event] = []
    while len(out) < n:
        u, v = (int(x) for x in rng.choice(ids, 2, replace=False))
        if not adjacency(u, v):
            out.append(Event(f"scale-{time.time()}-{len(out)}", "connect", u, v, time.time()))
    return out


def nearline(cfg: config.Config, profile: Path | None, tag: str) -> dict[str, float]:
    import redis.asyncio as aioredis

    from edgeflow.stores import keys

    client = connect(cfg.redis_url)
    processor = Processor(cfg, client, f"scale-costs-{os.getpid()}")
    processor.refresh(force=True)
    processor.sync_graph()
    assert processor.graph is not None
    ids = processor.graph.ids
    events = _events(cfg, ids, lambda u, v: client.sismember(keys.adjacency(u), v),
                     WARM_EVENTS + EVENTS + BATCH * BATCHES)  # fmt: skip

    async def publish_all() -> list[str]:
        aclient = aioredis.Redis.from_url(cfg.redis_url)
        try:
            return [(await publish(aclient, [ev]))[0] for ev in events]
        finally:
            await aclient.aclose()

    entry_ids = asyncio.run(publish_all())
    entries = []
    for entry_id in entry_ids:
        (got,) = cast(list[Any], client.xrange(keys.EVENTS, entry_id, entry_id))
        entries.append(got)
    for entry in entries[:WARM_EVENTS]:  # the features service loads Feast's push first
        for attempt in range(12):
            try:
                processor.handle([entry])
                break
            except PushFailed:
                if attempt == 11:
                    raise
    singles = entries[WARM_EVENTS : WARM_EVENTS + EVENTS]
    batched = entries[WARM_EVENTS + EVENTS :]
    took: list[float] = []
    took_batched: list[float] = []

    def apply_all() -> None:
        for entry in singles:
            t = time.perf_counter()
            outcome = processor.handle([entry])
            took.append(time.perf_counter() - t)
            assert len(outcome.applied) == 1 and outcome.lists, outcome
        for start in range(0, len(batched), BATCH):
            t = time.perf_counter()
            outcome = processor.handle(batched[start : start + BATCH])
            took_batched.append((time.perf_counter() - t) / BATCH)
            assert len(outcome.applied) == BATCH and outcome.lists, outcome

    _profiled(profile, f"nearline-{tag}", apply_all)
    processor.close()
    client.close()
    return {
        "nearline_ms_per_event_p50": 1000 * statistics.median(took),
        "nearline_ms_per_event_mean": 1000 * statistics.fmean(took),
        "nearline_events_per_s": len(took) / sum(took),
        f"nearline_ms_per_event_in_{BATCH}s": 1000 * statistics.fmean(took_batched),
    }


def measure(states: list[Path], profile: Path | None, only: str | None, dump: Path | None) -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")  # as the offline shards and the worker do
    results: list[tuple[int, dict[str, float]]] = []
    for state in states:
        members, cfg = _config(state)
        tag = f"{members // 1000}k"
        figures = offline(cfg, profile, tag, dump) if only != "nearline" else {}
        if only != "offline":
            figures.update(nearline(cfg, profile, tag))
        results.append((members, figures))
        print(f"{members:,} members: {json.dumps({k: round(v, 3) for k, v in figures.items()})}",
              flush=True)  # fmt: skip
    first = results[0][1]
    for members, figures in results[1:]:
        ratios = {k: round(v / first[k], 2) for k, v in figures.items() if first[k]}
        print(f"{members:,} against {results[0][0]:,}: {json.dumps(ratios)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--members", type=int, required=True)
    s.add_argument("--state", type=Path, required=True)
    m = sub.add_parser("measure")
    m.add_argument("states", type=Path, nargs="+")
    m.add_argument("--profile", type=Path)
    m.add_argument("--only", choices=("offline", "nearline"))
    m.add_argument("--dump", type=Path, help="save the offline lists here (npz per suite)")
    args = parser.parse_args()
    if args.cmd == "serve":
        serve(args.members, args.state)
    else:
        measure(args.states, args.profile, args.only, args.dump)


if __name__ == "__main__":
    main()
