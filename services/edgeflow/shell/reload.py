"""The reload loop of every service: look again every interval, whatever one look raised.

What a look reads (a graph version, a workflow file, a model directory, a pointer in Redis)
may be missing, half-written or unreachable for a while, so a failed look is logged and the
next one comes as usual; only closing ends the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

# A look cancelled inside a Redis call may take the client's whole timeout to unwind, longer
# than a drain may last: closing waits this long at most.
CLOSE_WAIT_S = 1.0


class Reloader:
    def __init__(
        self,
        what: str,
        interval_s: float,
        look: Callable[[], Awaitable[object]],
        log: logging.Logger,
        expected: tuple[type[Exception], ...] = (),
    ) -> None:
        """`what` names the look in the log; `expected` failures are logged in one line,
        any other with its traceback."""
        self.what, self._interval, self._look, self._log = what, interval_s, look, log
        self._expected = expected
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Look every interval from now on (a non-positive interval: never)."""
        if self._task is None and self._interval > 0:
            self._task = asyncio.create_task(self._run(), name=f"reload: {self.what}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=CLOSE_WAIT_S)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._look()
            except self._expected as exc:
                self._log.warning("%s failed: %s", self.what, exc)
            except Exception:
                self._log.exception("%s failed", self.what)
