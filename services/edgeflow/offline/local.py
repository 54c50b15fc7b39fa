"""`edgeflow offline run --local --shards N`: one process per shard on this machine, with one
progress bar for the whole run (read from the shards' checkpoints in Redis), after one for
the shards' start-up (read from the stages they record in Redis)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

from edgeflow.offline import job
from edgeflow.offline.progress import Stages
from edgeflow.stores.redis_client import SyncClient

_POLL_S = 0.2
# A shard process that has recorded no stage yet is starting Python and importing.
LOADING_CODE = "loading Python modules"


class ShardFailed(RuntimeError):
    """A shard process exited with an error; the message holds its shard and stderr tail."""


def run_local(
    client: SyncClient,
    run: job.Run,
    workflow: str,
    total: int,
    batch_size: int,
    stages: Stages,
    env: dict[str, str] | None = None,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Run every shard of `run` as a child process; returns each shard's report.

    `stages` shows the start-up (each shard's own step, as it records it in Redis) and then
    the members done over all shards."""
    logs: list[IO[bytes]] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        job.clear_stages(client, run)
        starting = f"starting {run.shards} shard processes"
        with stages.stage(starting, run.shards, unit="ready") as st:
            for shard in range(run.shards):
                logs.append(tempfile.TemporaryFile())  # noqa: SIM115 - closed below
                procs.append(_spawn(run, shard, workflow, batch_size, threads, logs[-1], env))
            while True:
                ready, doing = _start_up(client, run, procs)
                st.update(ready, text=f"{starting} ({doing})" if doing else starting)
                if ready >= run.shards:
                    break
                time.sleep(_POLL_S)
            st.update(text=starting)
        done, _ = job.progress(client, run)
        with stages.stage(
            f"{run.list} {run.version}", total, done=done, unit="members", rates=()
        ) as bar:
            while any(p.poll() is None for p in procs):
                bar.update(job.progress(client, run)[0])
                time.sleep(_POLL_S)
            bar.update(job.progress(client, run)[0])
        reports = []
        for shard, (proc, err) in enumerate(zip(procs, logs, strict=True)):
            out = proc.stdout.read() if proc.stdout is not None else b""
            if proc.returncode != 0:
                err.seek(0)
                tail = "\n".join(err.read().decode(errors="replace").splitlines()[-15:])
                raise ShardFailed(f"shard {shard} exited with {proc.returncode}:\n{tail}")
            reports.extend(json.loads(out.decode().strip().splitlines()[-1])["shards"])
        return reports
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        for err in logs:
            err.close()


def _spawn(
    run: job.Run,
    shard: int,
    workflow: str,
    batch_size: int,
    threads: int,
    log: IO[bytes],
    env: dict[str, str] | None,
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "edgeflow.cli.main",
        "offline",
        "run",
        "--workflow",
        workflow,
        "--shard",
        str(shard),
        "--shards",
        str(run.shards),
        "--batch-size",
        str(batch_size),
        "--threads",
        str(threads),
        "--json",
        "--quiet",
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env
    )


def _start_up(
    client: SyncClient, run: job.Run, procs: list[subprocess.Popen[bytes]]
) -> tuple[int, str]:
    """(shards ready: scoring or exited, what the others are doing: '3 loading code')."""
    recorded = job.stages(client, run)
    ready = 0
    doing: Counter[str] = Counter()
    for shard, proc in enumerate(procs):
        stage = recorded.get(shard, LOADING_CODE)
        if proc.poll() is not None or stage == job.STAGE_SCORING:
            ready += 1
        else:
            doing[stage] += 1
    return ready, ", ".join(f"{n} {stage}" for stage, n in doing.items())


def workflow_argument(value: str) -> str:
    """A workflow path made absolute, so child processes find it from any directory."""
    path = Path(value)
    return str(path.resolve()) if path.exists() else value
