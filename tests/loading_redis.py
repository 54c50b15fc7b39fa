"""A real Redis that is still loading its data set, as after a restart with a large RDB.

Redis's own test suite slows loading down the same way: `key-load-delay` (microseconds per
key) and `loading-process-events-interval-bytes` (answer clients every N bytes loaded), so
while it loads, every command is answered `-LOADING Redis is loading the dataset in memory`.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from edgeflow.local.ports import free_port
from edgeflow.local.redis_server import RedisProcess, find_redis_server, stop_pid


def _reply(port: int) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET loading-probe\r\n")
            return s.recv(64)
    except OSError:
        return b""


@contextmanager
def loading_redis(workdir: Path, keys: int, delay_us: int) -> Iterator[RedisProcess]:
    """A Redis on a free port that loads `keys` keys at `delay_us` each: it answers LOADING
    for about keys * delay_us, then serves them (key `k0` holds b"v"). Every other key holds
    2 KB of random bytes, so Redis answers clients after each key it loads, not seconds apart."""
    workdir.mkdir(parents=True, exist_ok=True)
    binary = find_redis_server()
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"v=(\d+)\.", version)
    if match is None or int(match.group(1)) < 7:
        pytest.skip(f"{binary} ({version.strip()}) cannot slow its loading down for clients "
                    "to see it (loading-process-events-interval-bytes is Redis 7's)")  # fmt: skip
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "yes",
              "--dir", str(workdir), "--dbfilename", "dump.rdb"]  # fmt: skip
    port = free_port()
    pidfile = workdir / "writer.pid"
    subprocess.run([binary, "--port", str(port), "--pidfile", str(pidfile), *common], check=True)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    pipe = client.pipeline(transaction=False)
    for i in range(keys):
        pipe.set(f"k{i}", b"v" if i == 0 else os.urandom(2048))  # RDB compresses repeats
    pipe.execute()
    client.save()
    client.close()
    stop_pid(int(pidfile.read_text()))
    port = free_port()
    pidfile = workdir / "loader.pid"
    subprocess.run(
        [binary, "--port", str(port), "--pidfile", str(pidfile), *common,
         "--key-load-delay", str(delay_us), "--loading-process-events-interval-bytes", "1024"],
        check=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not _reply(port) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc = RedisProcess(port=port, pid=int(pidfile.read_text()), workdir=workdir)
    try:
        yield proc
    finally:
        stop_pid(proc.pid, timeout_s=5.0)


def is_loading(port: int) -> bool:
    return _reply(port).startswith(b"-LOADING")
