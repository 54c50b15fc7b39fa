"""`edgeflow offline run --local --shards N`: one process per shard on this machine, with one
progress bar for the whole run (read from the shards' checkpoints in Redis)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import redis

from edgeflow.offline import job
from edgeflow.offline.progress import Bar

_POLL_S = 0.2


class ShardFailed(RuntimeError):
    """A shard process exited with an error; the message holds its shard and stderr tail."""


def run_local(
    client: redis.Redis,
    run: job.Run,
    workflow: str,
    total: int,
    batch_size: int,
    show: bool,
    env: dict[str, str] | None = None,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Run every shard of `run` as a child process; returns each shard's report."""
    logs: list[IO[bytes]] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for shard in range(run.shards):
            logs.append(tempfile.TemporaryFile())  # noqa: SIM115 - closed below
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
            procs.append(
                subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=logs[-1], stdin=subprocess.DEVNULL, env=env
                )
            )
        done, _ = job.progress(client, run)
        with Bar(f"{run.list} {run.version}", total, done, enabled=show) as bar:
            while any(p.poll() is None for p in procs):
                bar.set(job.progress(client, run)[0])
                time.sleep(_POLL_S)
            bar.set(job.progress(client, run)[0])
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


def workflow_argument(value: str) -> str:
    """A workflow path made absolute, so child processes find it from any directory."""
    path = Path(value)
    return str(path.resolve()) if path.exists() else value
