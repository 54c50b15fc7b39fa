"""One offline run of a workflow: shards, resumable checkpoints and the all-or-nothing swap.

A run is one new version of the workflow's list. The first shard to start records it as
the list's pending run; every other shard (an Indexed Job's pods, local processes, a
re-run of a crashed shard) joins that run. A shard owns the members whose hashed id falls to
it, handles them in id order and, in one transaction per batch, writes their entries (with the
pending TTL) and its checkpoint (the last member done), so a re-run resumes after it. The
shard that completes the set of finished shards publishes the version: entries become
permanent and the pointer swaps, so readers see the old list or the whole new one.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np

from edgeflow.offline.executor import BatchResult, BatchRunner
from edgeflow.stores import keys, lists
from edgeflow.stores.redis_client import SyncClient, is_cluster_client, script

log = logging.getLogger("edgeflow.offline")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Keys of a finished run's bookkeeping stay this long for `edgeflow offline status` and logs.
_KEEP_S = 7 * 24 * 3600

# KEYS[1] = the list's pending-run hash; ARGV = field/value pairs of a new run. Returns the
# pending run's fields: the existing run's, or the new one's after creating it.
_BEGIN_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV))
end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS[1] = pending hash; ARGV[1] = version. Deletes the record only if it names the run.
_CLEAR_LUA = """
if redis.call('HGET', KEYS[1], 'version') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RunConflict(RuntimeError):
    """A shard does not fit the run in progress; the message says how to go on."""


@dataclass(frozen=True)
class Run:
    list: str
    version: str
    shards: int
    started_at: float
    workflow: str


@dataclass
class ShardReport:
    list: str
    version: str
    shard: int
    shards: int
    members: int  # members this shard owns
    resumed_after: int  # members already done by an earlier attempt
    pairs_scored: int
    seconds: float
    published: bool

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = asdict(self)
        out["pairs_per_s"] = round(self.pairs_scored / self.seconds, 1) if self.seconds else 0.0
        return out


def shard_of(members: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each member: a multiplicative hash of its id, so ids in runs spread out."""
    mixed = np.asarray(members, dtype=np.int64).astype(np.uint64) * _GOLDEN
    return ((mixed >> np.uint64(32)) % np.uint64(shards)).astype(np.int64)


def shard_members(ids: np.ndarray, shard: int, shards: int) -> np.ndarray:
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    return ids[shard_of(ids, shards) == shard]


def _text(fields: dict[bytes, bytes], name: str) -> str:
    return fields[name.encode()].decode()


def begin(client: SyncClient, name: str, shards: int, workflow: str, _retry: bool = True) -> Run:
    """Join the pending run of list `name`, or start one; raises RunConflict when the run in
    progress has another shard count or workflow."""
    lists.validate_name(name)
    fresh = {
        "version": lists.new_version(),
        "shards": shards,
        "started_at": repr(time.time()),
        "workflow": workflow,
    }
    args = [str(x) for pair in fresh.items() for x in pair]
    flat = cast(
        list[bytes],
        script(client, _BEGIN_LUA)(keys=[keys.offline_pending(name)], args=args),
    )
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    run = Run(
        list=name,
        version=_text(fields, "version"),
        shards=int(_text(fields, "shards")),
        started_at=float(_text(fields, "started_at")),
        workflow=_text(fields, "workflow"),
    )
    if run.started_at < time.time() - lists.PENDING_TTL_S * 0.9 and _retry:
        # Its first entries expire soon: a run that old is not worth finishing.
        log.warning("abandoning list %s run %s started at %s", name, run.version, run.started_at)
        abandon(client, name)
        return begin(client, name, shards, workflow, _retry=False)
    if run.shards != shards or run.workflow != workflow:
        raise RunConflict(
            f"list {name!r} has a run in progress (version {run.version}, workflow "
            f"{run.workflow!r}, {run.shards} shards) that this one ({workflow!r}, {shards} "
            "shards) does not fit: finish it with the same shard count, or pass --restart "
            "to abandon it"
        )
    return run


def pending(client: SyncClient, name: str) -> Run | None:
    fields = cast(dict[bytes, bytes], client.hgetall(keys.offline_pending(name)))
    if not fields:
        return None
    return Run(
        name,
        _text(fields, "version"),
        int(_text(fields, "shards")),
        float(_text(fields, "started_at")),
        _text(fields, "workflow"),
    )


def abandon(client: SyncClient, name: str) -> str | None:
    """Drop the list's pending run (its entries expire with the pending TTL); returns it."""
    run = pending(client, name)
    if run is None:
        return None
    script(client, _CLEAR_LUA)(keys=[keys.offline_pending(name)], args=[run.version])
    lists.expire_version(client, name, run.version, 60)
    for key in (keys.offline_progress(name, run.version), keys.offline_done(name, run.version)):
        client.expire(key, 60)
    return run.version


def checkpoint(client: SyncClient, run: Run, shard: int) -> tuple[int | None, int, int]:
    """(last member done or None, members done, candidates written) of a shard."""
    last, done, cands = cast(
        list[bytes | None],
        client.hmget(
            keys.offline_progress(run.list, run.version),
            [f"{shard}:last", f"{shard}:members", f"{shard}:candidates"],
        ),
    )
    return (
        None if last is None else int(last),
        int(done or 0),
        int(cands or 0),
    )


# What a shard process is doing before its first batch, as `set_stage` records it.
STAGE_LOADING = "loading the graph, features and models"
STAGE_SCORING = "scoring"


def set_stage(client: SyncClient, run: Run, shard: int, text: str) -> None:
    """Record what a shard is doing (its start-up steps), for the local runner and status."""
    key = keys.offline_progress(run.list, run.version)
    pipe = client.pipeline(transaction=True)
    pipe.hset(key, f"{shard}:stage", text)
    pipe.expire(key, lists.PENDING_TTL_S)
    pipe.execute()


def clear_stages(client: SyncClient, run: Run) -> None:
    """Forget the shards' recorded stages (those of an earlier attempt of the run)."""
    client.hdel(
        keys.offline_progress(run.list, run.version), *[f"{s}:stage" for s in range(run.shards)]
    )


def stages(client: SyncClient, run: Run) -> dict[int, str]:
    """Each shard's recorded stage; shards that recorded none are missing."""
    fields = cast(dict[bytes, bytes], client.hgetall(keys.offline_progress(run.list, run.version)))
    return {
        int(k[: -len(b":stage")]): v.decode() for k, v in fields.items() if k.endswith(b":stage")
    }


def progress(client: SyncClient, run: Run) -> tuple[int, int]:
    """(members done over all shards, shards finished)."""
    fields = cast(dict[bytes, bytes], client.hgetall(keys.offline_progress(run.list, run.version)))
    done = sum(int(v) for k, v in fields.items() if k.endswith(b":members"))
    return done, int(cast(int, client.scard(keys.offline_done(run.list, run.version))))


def run_shard(
    client: SyncClient,
    runner: BatchRunner,
    run: Run,
    shard: int,
    members: np.ndarray,
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
    threads: int = 1,
) -> ShardReport:
    """Compute and store the lists of the shard's members not done yet, then finish the
    shard (publishing the run when it is the last). `on_batch(members, pairs)` reports.

    With `threads` > 1, that many batches are computed at once (model scoring and most numpy
    work release the GIL); they are still stored, and checkpointed, in member order."""
    if not 0 <= shard < run.shards:
        raise RunConflict(f"shard {shard} is outside 0..{run.shards - 1}")
    t0 = time.perf_counter()
    members = np.sort(np.asarray(members, dtype=np.int64))
    last, done, cands = checkpoint(client, run, shard)
    todo = members if last is None else members[members > last]
    resumed = members.size - todo.size
    if resumed:
        log.info("shard %d resumes after member %d (%d members done)", shard, last, resumed)
    progress_key = keys.offline_progress(run.list, run.version)
    pairs = 0
    batches = [todo[i : i + batch_size] for i in range(0, todo.size, batch_size)]
    # A batch's entries and its checkpoint are stored in one transaction; on a Redis Cluster,
    # where the entries span slots, the entries first and then the checkpoint, so a crash
    # between the two only makes the resumed shard write the batch again.
    cluster = is_cluster_client(client)
    for batch, result in _results(runner, batches, threads):
        pipe = client.pipeline(transaction=not cluster)
        cands += lists.queue_entries(
            pipe, run.list, run.version, batch, result.lists, run.started_at
        )
        if cluster:
            pipe.execute()
            pipe = client.pipeline(transaction=True)
        done += batch.size
        pipe.hset(
            progress_key,
            mapping={
                f"{shard}:last": int(batch[-1]),
                f"{shard}:members": done,
                f"{shard}:candidates": cands,
            },
        )
        pipe.expire(progress_key, lists.PENDING_TTL_S)
        pipe.execute()
        pairs += result.pairs_scored
        if on_batch is not None:
            on_batch(batch.size, result.pairs_scored)
    published = finish_shard(client, run, shard)
    return ShardReport(
        run.list,
        run.version,
        shard,
        run.shards,
        int(members.size),
        resumed,
        pairs,
        time.perf_counter() - t0,
        published,
    )


def _results(
    runner: BatchRunner, batches: list[np.ndarray], threads: int
) -> Iterator[tuple[np.ndarray, BatchResult]]:
    """Each batch with its result, in order."""
    if threads <= 1:
        for batch in batches:
            yield batch, runner.run(batch)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="offline") as pool:
        ahead: deque[tuple[np.ndarray, Future[BatchResult]]] = deque()
        for batch in batches:
            ahead.append((batch, pool.submit(runner.run, batch)))
            if len(ahead) > threads:
                done, future = ahead.popleft()
                yield done, future.result()
        while ahead:
            done, future = ahead.popleft()
            yield done, future.result()


def finish_shard(client: SyncClient, run: Run, shard: int) -> bool:
    """Record the shard as finished; the one that completes the set publishes. True when
    this call published the run."""
    done_key = keys.offline_done(run.list, run.version)
    pipe = client.pipeline(transaction=True)
    pipe.sadd(done_key, shard)
    pipe.expire(done_key, lists.PENDING_TTL_S)
    pipe.scard(done_key)
    finished = int(pipe.execute()[-1])
    if finished < run.shards:
        return False
    publish(client, run)
    return True


def publish(client: SyncClient, run: Run) -> None:
    fields = cast(dict[bytes, bytes], client.hgetall(keys.offline_progress(run.list, run.version)))
    members = sum(int(v) for k, v in fields.items() if k.endswith(b":members"))
    candidates = sum(int(v) for k, v in fields.items() if k.endswith(b":candidates"))
    meta: dict[str, str | int | float] = {
        "created_at": run.started_at,
        "members": members,
        "candidates": candidates,
        "shards": run.shards,
        "workflow": run.workflow,
        "published_at": time.time(),
    }
    previous = lists.publish_version(client, run.list, run.version, meta, run.started_at)
    script(client, _CLEAR_LUA)(keys=[keys.offline_pending(run.list)], args=[run.version])
    for key in (
        keys.offline_progress(run.list, run.version),
        keys.offline_done(run.list, run.version),
    ):
        client.expire(key, _KEEP_S)
    log.info(
        "list %s version %s is live (%d members, replaced %s)",
        run.list,
        run.version,
        members,
        previous,
    )
