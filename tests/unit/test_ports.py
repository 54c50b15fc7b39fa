"""Free ports for local suites: below the kernel's ephemeral range, leased across processes."""

from __future__ import annotations

import multiprocessing
import socket
import time
from pathlib import Path

import pytest

from edgeflow.local import ports
from edgeflow.local.ports import ephemeral_low, free_port


def _pick(n: int) -> list[int]:
    return [free_port(1000) for _ in range(n)]


def test_processes_side_by_side_are_never_handed_the_same_port() -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        picked = [p for chunk in pool.map(_pick, [40, 40, 40]) for p in chunk]
    grouped = picked + [p + 1000 for p in picked]
    assert len(set(grouped)) == len(grouped)  # not a port twice, nor as another's offset
    assert all(p >= ports.FLOOR and p + 1000 < ephemeral_low() for p in picked)


def _only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, low: int, high: int) -> None:
    """Choose from [low, high) only, with leases of this test's own."""
    monkeypatch.setattr(ports, "lease_file", lambda: tmp_path / "leases")
    monkeypatch.setattr(ports, "FLOOR", low)
    monkeypatch.setattr(ports, "ephemeral_low", lambda: high)
    monkeypatch.setattr(ports, "MIN_SPAN", 0)


def test_a_port_whose_offset_is_taken_is_not_handed_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
        held = listener.getsockname()[1]
        _only(monkeypatch, tmp_path, held - 1, held + 1)  # the held port and the one below
        with pytest.raises(RuntimeError, match="no free loopback port"):
            free_port(1)  # held - 1 is free, but its offset is the held port
        assert free_port() == held - 1


def test_a_leased_port_waits_for_its_lease_to_expire(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first = free_port()
    _only(monkeypatch, tmp_path, first, first + 1)
    assert free_port() == first
    with pytest.raises(RuntimeError, match="no free loopback port"):
        free_port()  # leased above
    (tmp_path / "leases").write_text(f"{first} {time.time() - 1:.0f}\n")  # expired
    assert free_port() == first
