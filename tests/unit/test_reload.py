"""The services' reload loop goes on after any failed look, and closing ends it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from edgeflow.shell.reload import Reloader


async def test_a_failed_look_is_logged_and_the_next_one_comes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    looks: list[int] = []
    failures = [OSError("Redis went away"), ValueError("half-written file")]

    async def look() -> None:
        looks.append(len(looks))
        if failures:
            raise failures.pop(0)

    log = logging.getLogger("edgeflow.test-reload")
    reloader = Reloader("pointer refresh", 0.01, look, log, expected=(OSError,))
    with caplog.at_level(logging.WARNING, logger=log.name):
        reloader.start()
        for _ in range(500):
            if len(looks) >= 4:
                break
            await asyncio.sleep(0.01)
        await reloader.close()
    assert len(looks) >= 4  # both failures were followed by more looks
    expected, unexpected = (r for r in caplog.records if r.name == log.name)
    assert expected.getMessage() == "pointer refresh failed: Redis went away"
    assert expected.exc_info is None  # an expected failure: one line
    assert unexpected.getMessage() == "pointer refresh failed" and unexpected.exc_info
    after = len(looks)
    await asyncio.sleep(0.05)
    assert len(looks) == after  # closed: no more looks


async def test_a_non_positive_interval_never_looks() -> None:
    looks: list[int] = []

    async def look() -> None:
        looks.append(1)

    reloader = Reloader("registry scan", 0, look, logging.getLogger("edgeflow.test-reload"))
    reloader.start()
    await asyncio.sleep(0.05)
    await reloader.close()
    assert looks == []
