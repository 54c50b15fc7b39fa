#!/usr/bin/env python
"""What the AOF's fsync policy costs `Publish`, against Redis without an AOF, in one run.

For each policy (no AOF as the baseline, then appendfsync no, everysec and always) it starts
its own Redis on the same disk and measures the atomic append `Publish` runs
(`nearline.events.publish`, one block event per call):

- sequential: `--requests` calls one after another, p50 and p99 in ms;
- concurrent: `--callers` callers at once, `--requests` calls in all, calls per second
  (Redis fsyncs once per event-loop turn under "always", so concurrent writers share one);
- a bulk write (a 1,000-entry pipeline of SETs, `--bulk` times), as training and the
  offline job write: seconds.

The policies run interleaved for `--rounds` rounds and the medians are reported, with each
measure's ratio to the no-AOF baseline of the same run.

    .venv/bin/python benchmarks/publish_durability.py \
        --out benchmarks/results/publish_durability.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeflow.local.redis_server import start_redis
from edgeflow.nearline.events import Event, publish
from edgeflow.stores.redis_client import connect, connect_async

POLICIES = ("off", "no", "everysec", "always")  # off: no AOF (the baseline)


def _event(n: int) -> Event:
    return Event(id=f"e{n}-{time.monotonic_ns()}", type="block", member=n % 50_000,
                 target=10**6 + n, time=time.time())  # fmt: skip


async def _sequential(url: str, requests: int) -> list[float]:
    client = connect_async(url)
    lat = []
    try:
        for n in range(requests):
            t = time.perf_counter()
            await publish(client, [_event(n)])
            lat.append((time.perf_counter() - t) * 1000)
    finally:
        await client.aclose()
    return lat


async def _concurrent(url: str, requests: int, callers: int) -> float:
    client = connect_async(url)
    per = requests // callers

    async def caller(c: int) -> None:
        for n in range(per):
            await publish(client, [_event(c * per + n)])

    try:
        t = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(callers)))
        return callers * per / (time.perf_counter() - t)
    finally:
        await client.aclose()


def _bulk(url: str, times: int) -> float:
    client = connect(url)
    t = time.perf_counter()
    for b in range(times):
        pipe = client.pipeline(transaction=False)
        for n in range(1000):
            pipe.set(f"bulk:{b}:{n}", "x" * 64)
        pipe.execute()
    client.close()
    return time.perf_counter() - t


def measure(policy: str, work: Path, args: argparse.Namespace) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix=f"redis-{policy}-", dir=work))
    if policy == "off":
        proc = start_redis(workdir)
    else:
        proc = start_redis(workdir, persist=True, fsync=policy)
    try:
        lat = asyncio.run(_sequential(proc.url, args.requests))
        rate = asyncio.run(_concurrent(proc.url, args.requests, args.callers))
        bulk = _bulk(proc.url, args.bulk)
    finally:
        proc.stop()
    return {
        "publish_p50_ms": float(np.percentile(lat, 50)),
        "publish_p99_ms": float(np.percentile(lat, 99)),
        "publish_concurrent_per_s": rate,
        "bulk_write_s": bulk,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--bulk", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in POLICIES}
    with tempfile.TemporaryDirectory(prefix="durability-") as tmp:
        for r in range(args.rounds):
            for policy in POLICIES:
                runs[policy].append(measure(policy, Path(tmp), args))
                print(f"round {r + 1} {policy}: {runs[policy][-1]}", flush=True)
    medians = {
        policy: {k: round(statistics.median(m[k] for m in ms), 3) for k in ms[0]}
        for policy, ms in runs.items()
    }
    base = medians["off"]
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "requests": args.requests, "callers": args.callers, "rounds": args.rounds,
        "medians": medians,
        "ratios_to_no_aof": {
            policy: {k: round(v / base[k], 2) for k, v in m.items()}
            for policy, m in medians.items() if policy != "off"
        },
    }  # fmt: skip
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
