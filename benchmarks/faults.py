#!/usr/bin/env python
"""Kill each process of a running suite under load, and count what callers saw.

It starts a suite as a user would (`edgeflow quickstart` on a generated social graph, in a
temporary home on free ports, so the supervisor of `edgeflow up` runs), blocks one member's
top recommendation, then for each fault: drives `Recommend` open loop at `--rate` requests
per second (10% of them for the member with the block), SIGKILLs the process after
`--before` seconds and keeps driving for `--after` seconds. Per fault it reports requests,
failed (any status but OK), partial, whether the blocked member was ever shown, and the
recovery time: from the kill until the supervisor's new process reports SERVING. For Redis
it also publishes events one after another through the kill and counts acknowledged events
missing afterwards.

    .venv/bin/python benchmarks/faults.py --out benchmarks/results/faults.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edgeflow.build.synthetic import social_graph, write_edge_list
from edgeflow.local.ports import free_port
from edgeflow.local.suite import SERVICES, Suite, _alive, _serving, free_service_addrs
from edgeflow.shell import auth
from edgeflow.shell.server import channel
from edgeflow.stores import keys
from edgeflow.stores.redis_client import connect
from edgeflow.v1 import gateway_pb2, gateway_pb2_grpc

FAULTS = ("candidates", "features", "scoring", "merging", "nearline", "redis")


def edgeflow(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    done = subprocess.run([sys.executable, "-m", "edgeflow.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"edgeflow {' '.join(args)}: {done.stderr[-2000:]}")
    return done.stdout


async def drive(stub: Any, members: list[int], blocked: tuple[int, int], rate: float,
                seconds: float, rng: np.random.Generator) -> dict[str, Any]:  # fmt: skip
    """Open loop: one Recommend every 1/rate s, each on its own task."""
    counts = {"requests": 0, "failed": 0, "partial": 0, "blocked_shown": 0}
    codes: dict[str, int] = {}
    who, hidden = blocked

    async def one(member: int) -> None:
        req = gateway_pb2.RecommendRequest(surface="pymk", member=member, k=20)
        try:
            resp = await stub.Recommend(req, timeout=1.0)
        except grpc.aio.AioRpcError as exc:
            counts["failed"] += 1
            codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
            return
        counts["partial"] += int(resp.partial)
        if member == who and any(e.target == hidden for e in resp.edges):
            counts["blocked_shown"] += 1

    tasks = []
    start = time.perf_counter()
    n = 0
    while (now := time.perf_counter() - start) < seconds:
        due = n / rate
        if now < due:
            await asyncio.sleep(due - now)
        member = who if rng.random() < 0.1 else int(rng.choice(members))
        tasks.append(asyncio.ensure_future(one(member)))
        counts["requests"] += 1
        n += 1
    await asyncio.gather(*tasks)
    return counts | {"codes": codes}


def wait_back(state: Path, name: str, old_pid: int, timeout: float = 60) -> float | None:
    """Seconds until the process has a new pid that reports SERVING (Redis: answers)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        suite = Suite.load(state.parent.parent)
        pid = suite.pids.get(name, 0) if suite else 0
        if pid and pid != old_pid and _alive(pid):
            if name == "redis":
                try:
                    connect(suite.redis_url).ping()  # type: ignore[union-attr]
                    return time.monotonic() - t0
                except Exception:
                    pass
            elif suite is not None and _serving(suite.addr(name), name):
                return time.monotonic() - t0
        time.sleep(0.05)
    return None


async def publish_through(stub: Any, metadata: Any, seconds: float) -> list[str]:
    """Publish dismiss events one after another for `seconds`; the acknowledged event ids."""
    acked = []
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        n += 1
        event = gateway_pb2.MemberEvent(type=gateway_pb2.MemberEvent.DISMISS, member=1,
                                        target=10_000_000 + n, event_id=f"fault-{n}")  # fmt: skip
        try:
            await stub.Publish(gateway_pb2.PublishRequest(events=[event]), timeout=1.0,
                               metadata=metadata)  # fmt: skip
            acked.append(event.event_id)
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.05)
    return acked


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=2000)
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--before", type=float, default=3.0)
    p.add_argument("--after", type=float, default=12.0)
    p.add_argument("--settle", type=float, default=2.0, help="pause between faults (s)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="edgeflow-faults-") as tmp:
        home = Path(tmp) / "home"
        redis_url = f"redis://127.0.0.1:{free_port()}/0"
        env = dict(os.environ, EDGEFLOW_HOME=str(home), REDIS_URL=redis_url, **free_service_addrs())
        edges = social_graph(args.members, seed=1)
        path = Path(tmp) / "edges.txt"
        write_edge_list(path, edges)
        members = sorted({int(x) for x in edges.ravel()})
        try:
            edgeflow(env, "quickstart", "--edges", str(path), "--members", "1")
            results = asyncio.run(run_faults(env, home, members, args, rng))
        finally:
            subprocess.run([sys.executable, "-m", "edgeflow.cli.main", "down"], env=env,
                           capture_output=True, timeout=120)  # fmt: skip
    report = {"members": args.members, "rate": args.rate, "before_s": args.before,
              "after_s": args.after, "faults": results}  # fmt: skip
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


async def run_faults(
    env: dict[str, str], home: Path, members: list[int], args: argparse.Namespace,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:  # fmt: skip
    state = home / "run" / "suite.json"
    suite = Suite.load(home)
    assert suite is not None
    key = auth.local_key(home)
    ch = channel(suite.addr("gateway"), key)
    stub = gateway_pb2_grpc.RecommenderStub(ch)
    who = members[len(members) // 3]
    top = (await stub.Recommend(gateway_pb2.RecommendRequest(surface="pymk", member=who, k=5),
                                timeout=5)).edges[0].target  # fmt: skip
    block = gateway_pb2.MemberEvent(type=gateway_pb2.MemberEvent.BLOCK, member=who, target=top)
    await stub.Publish(gateway_pb2.PublishRequest(events=[block]), timeout=5)
    out = []
    for name in FAULTS:
        suite = Suite.load(home)
        assert suite is not None
        pid = suite.pids[name]
        load = asyncio.ensure_future(drive(stub, members, (who, top), args.rate,
                                           args.before + args.after, rng))  # fmt: skip
        publish = None
        if name == "redis":
            publish = asyncio.ensure_future(publish_through(stub, None, args.before + args.after))
        await asyncio.sleep(args.before)
        os.kill(pid, signal.SIGKILL)
        recovery = await asyncio.to_thread(wait_back, state, name, pid)
        counts = await load
        back = None if recovery is None else round(recovery, 2)
        row: dict[str, Any] = {"fault": name, **counts, "recovery_s": back}
        if publish is not None:
            acked = await publish
            after = Suite.load(home)
            assert after is not None
            stored = {f[b"id"].decode() for _, f in connect(after.redis_url).xrange(keys.EVENTS)}
            row["events_acked"] = len(acked)
            row["events_lost"] = len([e for e in acked if e not in stored])
        row["failed_share"] = round(row["failed"] / max(row["requests"], 1), 4)
        print(json.dumps(row), flush=True)
        out.append(row)
        await asyncio.sleep(args.settle)  # let the restarted process settle
    await ch.close()
    return out


if __name__ == "__main__":
    assert set(FAULTS) <= {*SERVICES, "redis"}
    main()
