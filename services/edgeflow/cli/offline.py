"""`edgeflow offline run` and `edgeflow offline status`: the offline job from the command line.

`run` computes a workflow's list for every member, one shard (`--shard I --shards N`, or
JOB_COMPLETION_INDEX in a Kubernetes Indexed Job), every shard one after another, or every
shard as a local process (`--local`). The list goes live when all shards are done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, cast

import redis
from threadpoolctl import threadpool_limits

from edgeflow import config
from edgeflow.cli import CliError
from edgeflow.offline.progress import Stages, timestamp
from edgeflow.stores import lists
from edgeflow.stores.redis_client import SyncClient, connect

# With --progress and no terminal, a count line at most this often (Kubernetes logs, CI).
PROGRESS_EVERY_S = 10.0


def _client(cfg: config.Config) -> SyncClient:
    client = connect(cfg.redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise CliError(
            f"cannot reach Redis at {cfg.redis_url} ({exc}); start the suite with `edgeflow up` "
            "or set REDIS_URL"
        ) from None
    return client


def _shard(args: argparse.Namespace, shards: int) -> int | None:
    raw: Any = args.shard
    where = "--shard"
    if raw is None and (index := config.job_completion_index()):
        raw, where = index, "JOB_COMPLETION_INDEX"
    if raw is None:
        return None
    try:
        shard = int(raw)
    except ValueError:
        raise CliError(f"{where} must be an integer, got {raw!r}") from None
    if not 0 <= shard < shards:
        raise CliError(f"{where} {shard} is outside 0..{shards - 1} (--shards {shards})")
    return shard


def run(args: argparse.Namespace) -> int:
    running = args.action == "run"
    stages = Stages(
        enabled=running and not args.quiet,
        every=PROGRESS_EVERY_S if running and args.progress else None,
    )
    with stages.stage(f"loading workflow {args.workflow}") as st:
        from edgeflow.offline import job
        from edgeflow.offline.context import find_workflow, load_inputs
        from edgeflow.offline.executor import BatchRunner, OfflineError
        from edgeflow.offline.local import ShardFailed, run_local, workflow_argument
        from edgeflow.stores.graph_store import GraphNotLoaded
        from edgeflow.workflow.modes import list_name
        from edgeflow.workflow.validate import WorkflowError

        # The batches' matrix products are small: BLAS threads would only spin against the
        # batch threads and the model.
        threadpool_limits(limits=1, user_api="blas")
        cfg = config.load()
        try:
            wf = find_workflow(cfg, args.workflow)
        except WorkflowError as exc:
            raise CliError(str(exc)) from None
        name = list_name(wf)
        client = _client(cfg)
        st.note = f"writes list {name!r}"
    if args.action == "status":
        return _status(client, name)
    offline = wf.spec.modes.offline
    shards = args.shards or (offline.shards if offline is not None else 1)
    if shards < 1:
        raise CliError(f"--shards must be at least 1, got {shards}")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.threads < 1:
        raise CliError(f"--threads must be at least 1, got {args.threads}")
    shard = None if args.local else _shard(args, shards)
    if args.restart:
        if shard is not None:
            raise CliError("--restart abandons the whole run: use it without --shard")
        dropped = job.abandon(client, name)
        if dropped and not args.quiet:
            print(f"abandoned run {dropped} of list {name!r}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        run_ = job.begin(client, name, shards, wf.name)
    except (job.RunConflict, lists.ListError) as exc:
        raise CliError(str(exc)) from None
    try:
        if args.local:
            from edgeflow.stores.graph_store import load_graph

            with stages.stage("counting the members") as st:
                total = load_graph(client, deltas=False).n
                st.note = f"{total:,} members in {shards} shards"
            reports = run_local(
                client,
                run_,
                workflow_argument(args.workflow),
                total,
                args.batch_size,
                stages,
                threads=args.threads,
            )
        else:
            if shard is not None:
                job.set_stage(client, run_, shard, job.STAGE_LOADING)
            with stages.stage(job.STAGE_LOADING) as st:
                inputs = load_inputs(cfg, client, wf)
                _ = inputs.pairs  # the two-hop index, built once before the first batch
                runner = BatchRunner(wf, inputs)
                st.note = f"{inputs.graph.n:,} members, {inputs.graph.edge_count:,} edges"
            if shard is not None:
                job.set_stage(client, run_, shard, job.STAGE_SCORING)
            try:
                ids = inputs.graph.ids
                reports = []
                for s in range(shards) if shard is None else [shard]:
                    members = job.shard_members(ids, s, shards)
                    _, done, _ = job.checkpoint(client, run_, s)
                    label = f"{name} shard {s}/{shards}" if shards > 1 else name
                    with stages.stage(
                        label, int(members.size), done=done, unit="members", rates=("pairs",)
                    ) as bar:
                        report = job.run_shard(
                            client,
                            runner,
                            run_,
                            s,
                            members,
                            args.batch_size,
                            lambda n, pairs: bar.advance(n, pairs=pairs),
                            args.threads,
                        )
                    reports.append(report.as_dict())
            finally:
                inputs.close()
    except (OfflineError, ShardFailed, job.RunConflict, GraphNotLoaded) as exc:
        raise CliError(str(exc)) from None
    except redis.RedisError as exc:
        raise CliError(f"Redis at {cfg.redis_url} failed during the run: {exc}") from None
    _print(reports, time.perf_counter() - t0, args.json, name)
    return 0


def _print(reports: list[dict[str, Any]], seconds: float, as_json: bool, name: str) -> None:
    published = any(r["published"] for r in reports)
    pairs = sum(int(r["pairs_scored"]) for r in reports)
    summary = {
        "list": name,
        "version": reports[0]["version"] if reports else "",
        "live": published,
        "members": sum(int(r["members"]) for r in reports),
        "pairs_scored": pairs,
        "seconds": round(seconds, 3),
        "shards": reports,
    }
    if as_json:
        print(json.dumps(summary))
        return
    for r in reports:
        resumed = f", resumed after {r['resumed_after']:,}" if r["resumed_after"] else ""
        print(
            f"shard {r['shard']}/{r['shards']}: {r['members']:,} members{resumed}, "
            f"{r['pairs_scored']:,} pairs scored in {r['seconds']:.1f}s"
        )
    state = "is live" if published else "waits for the other shards before it goes live"
    print(f"list {name!r} version {summary['version']} {state}")


def _status(client: SyncClient, name: str) -> int:
    from edgeflow.offline import job
    from edgeflow.stores import keys

    now = time.time()
    live = lists.current_version(client, name)
    meta = cast(dict[bytes, bytes], client.hgetall(keys.list_meta(name, live))) if live else {}
    print(f"list {name!r}: live version {live or '(none)'}")
    fields = {k.decode(): _meta_value(k.decode(), v.decode(), now) for k, v in meta.items()}
    width = max((len(k) for k in fields), default=0) + 1
    for k, v in sorted(fields.items()):
        print(f"  {k + ':':<{width}} {v}")
    run = job.pending(client, name)
    if run is None:
        print("no run in progress")
        return 0
    done, finished = job.progress(client, run)
    print(
        f"run in progress: version {run.version}, started {timestamp(run.started_at, now)}, "
        f"{finished}/{run.shards} shards finished, {done:,} members done"
    )
    for shard, stage in sorted(job.stages(client, run).items()):
        print(f"  shard {shard}: {stage}")
    return 0


def _meta_value(key: str, value: str, now: float) -> str:
    """A list's meta value for people: times (`*_at`, unix seconds) as local time and age,
    counts with thousands separators, anything else as stored."""
    try:
        number = float(value)
    except ValueError:
        return value
    if key.endswith("_at"):
        return timestamp(number, now)
    return f"{int(number):,}" if number.is_integer() else value
