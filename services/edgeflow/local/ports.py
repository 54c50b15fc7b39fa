"""Free loopback ports for local suites, Redis servers and tests.

A port is chosen some time before the process meant for it binds it (a quickstart trains
first), so a free port is not enough. Ports come from below the kernel's ephemeral range,
where no outgoing connection and no bind to port 0 lands, and each is leased for LEASE_S in
a file every edgeflow process of this user shares, so two suites started side by side
(parallel tests, benchmarks) are never handed the same port."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

FLOOR = 10000  # below it: the ports of well-known services
LEASE_S = 900.0
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_LOW = 32768  # Linux's default
MIN_SPAN = 2000  # fewer ports than this below the ephemeral range: choose above FLOOR anywhere


def port_bindable(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a process could bind `host`:`port` now. As Redis and gRPC do, with
    SO_REUSEADDR: connections of a suite just stopped, left in TIME_WAIT, do not hold the
    port, while a listener still does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(*offsets: int) -> int:
    """A loopback port that is bindable now and leased to no other caller, with the ports
    `offsets` above it (a metrics port, a cluster bus) bindable and leased along with it."""
    top = max(offsets, default=0)
    low, high = FLOOR, ephemeral_low() - top
    if high - low < MIN_SPAN:
        high = 65536 - top
    with _leases() as leased:
        now = time.time()
        for _ in range(1000):
            port = random.randrange(low, high)
            group = [port, *(port + o for o in offsets)]
            if any(leased.get(p, 0.0) > now for p in group) or not all(map(port_bindable, group)):
                continue
            leased.update(dict.fromkeys(group, now + LEASE_S))
            return port
    raise RuntimeError(f"found no free loopback port between {low} and {high}")


def ephemeral_low() -> int:
    """The lowest port the kernel hands out by itself (outgoing connections, bind to 0)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_LOW


def lease_file() -> Path:
    return Path(tempfile.gettempdir()) / f"edgeflow-port-leases-{os.getuid()}"


@contextlib.contextmanager
def _leases() -> Iterator[dict[int, float]]:
    """The unexpired leases (port -> expiry), under an exclusive lock; written back after."""
    with open(lease_file(), "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        now = time.time()
        leased: dict[int, float] = {}
        for line in fh.read().splitlines():
            with contextlib.suppress(ValueError):
                port, expiry = line.split()
                if float(expiry) > now:
                    leased[int(port)] = float(expiry)
        yield leased
        fh.seek(0)
        fh.truncate()
        fh.write("".join(f"{p} {e:.0f}\n" for p, e in leased.items() if e > now))
