"""Keeps the processes of `edgeflow up` running: a crashed service, worker or Redis is
started again on its port (a Redis Cluster node in its own directory, where it rejoins the
cluster from its nodes-PORT.conf), with a backoff that doubles from 1 s to 30 s while it keeps
crashing (and starts over once it ran for a minute).

`edgeflow up` starts one supervisor per suite (`python -m edgeflow.local.supervisor HOME`),
after every process reported SERVING. It records each new pid and restart count in the
suite's state file, and `edgeflow down` stops it first, then whatever it last started. It
exits when that file is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from types import FrameType

from edgeflow.local.redis_server import start_cluster_node, start_redis
from edgeflow.local.suite import SERVICES, Suite, _alive, spawn_service

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
HEALTHY_S = 60.0  # a process that ran this long starts its backoff over
POLL_S = 0.5


def _say(text: str) -> None:
    print(f"{datetime.now().isoformat(timespec='seconds')} {text}", flush=True)


def _reap() -> None:
    """Collect the exit status of children that ended (the processes this one restarted)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _start(suite: Suite, name: str) -> int:
    if suite.redis_cluster and name in suite.redis_names:
        node = start_cluster_node(suite.redis_dir, suite.ports[name], persist=suite.persist)
        return node.pid
    if name == "redis":
        proc = start_redis(suite.home / "redis", port=suite.ports["redis"], persist=suite.persist)
        return proc.pid
    return spawn_service(suite, name)


def supervise(home: Path) -> None:
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    suite = Suite.load(home)
    if suite is None:
        _say(f"no suite under {home}")
        return
    names = [*(suite.redis_names if suite.redis_started else []), *SERVICES]
    now = time.monotonic()
    backoff = dict.fromkeys(names, BACKOFF_START_S)
    started = dict.fromkeys(names, now)
    next_try = dict.fromkeys(names, 0.0)
    _say(f"supervising {', '.join(names)} under {home}")
    while not stopping:
        if not suite.state_file.exists():
            _say("the suite's state file is gone: stopping")
            return
        _reap()
        now = time.monotonic()
        for name in names:
            pid = suite.pids.get(name, 0)
            if _alive(pid):
                if now - started[name] >= HEALTHY_S:
                    backoff[name] = BACKOFF_START_S
                continue
            if now < next_try[name] or stopping:
                continue
            count = suite.restarts.get(name, 0) + 1
            _say(f"{name} (pid {pid}) is not running: starting it again (restart {count})")
            try:
                suite.pids[name] = _start(suite, name)
            except Exception as exc:  # tried again after the backoff
                _say(f"{name} did not start: {exc}")
                suite.pids[name] = 0
            suite.restarts[name] = count
            suite.save()
            started[name] = now
            next_try[name] = now + backoff[name]
            backoff[name] = min(backoff[name] * 2, BACKOFF_MAX_S)
        time.sleep(POLL_S)
    _say("stopped")


if __name__ == "__main__":
    supervise(Path(sys.argv[1]))
