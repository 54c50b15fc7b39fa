"""CPU-heavy request work off the event loop, under the request's deadline.

A service process serves every request on one event loop. A few milliseconds of numpy on it
(friends of friends of a hub, pair features for thousands of candidates, a large batch to
score) delay every other request's Redis reads and replies by as much, and `asyncio.timeout`
cannot interrupt it. `run` hands such work to a small thread pool shared by the process
(numpy and onnxruntime release the GIL in their inner loops, so the loop keeps answering)
and keeps small work inline, where a thread hop would cost more than the work.

Each request carries its deadline in a context variable (`deadline_in`), so the code that
computes needs no extra argument. Work whose deadline has passed does not start: not when
it is submitted, and not when a thread picks it up after waiting in the pool's queue.

`edgeflow serve` configures both from the environment (`EDGEFLOW_CPU_THREADS`,
`EDGEFLOW_DEADLINE_CHECKS`, see config.py); the defaults are 2 threads and checks on.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

from edgeflow.shell import metrics

P = ParamSpec("P")
T = TypeVar("T")

# Work below this many units (neighbour visits, matrix cells) runs inline: about 0.2 ms of
# numpy, the order of a thread hop and the loop's wake-up.
INLINE_WORK = 40_000

# time.perf_counter() at which the current request's answer is due; None: no deadline.
_DEADLINE: ContextVar[float | None] = ContextVar("edgeflow_deadline", default=None)


class DeadlineExpired(Exception):
    """The request's deadline passed before its work started: the work was not done."""

    def __init__(self, what: str, late_s: float) -> None:
        super().__init__(
            f"not started: the request's deadline passed {late_s * 1000:.1f} ms before"
        )
        self.what = what


class _Settings:
    threads = 2  # 0: every piece of work runs inline, on the event loop
    deadline_checks = True  # False: work starts however late


_settings = _Settings()
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def settings() -> _Settings:
    return _settings


def configure(threads: int | None = None, deadline_checks: bool | None = None) -> None:
    """Set the pool's size and whether late work is refused; a new pool is made on next
    use (the old one finishes what it has started)."""
    global _pool
    s = settings()
    if threads is not None:
        s.threads = max(0, threads)
    if deadline_checks is not None:
        s.deadline_checks = deadline_checks
    with _lock:
        old, _pool = _pool, None
    if old is not None:
        old.shutdown(wait=False)


def _executor() -> ThreadPoolExecutor | None:
    global _pool
    threads = settings().threads
    if threads <= 0:
        return None
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="edgeflow-cpu")
        return _pool


# ---- deadlines -------------------------------------------------------------------------------
@contextlib.contextmanager
def deadline_in(seconds: float | None) -> Iterator[None]:
    """Within the block, the request's work is due `seconds` from now (or sooner, if an
    enclosing block said so). None adds no deadline."""
    if seconds is None:
        yield
        return
    due = time.perf_counter() + seconds
    current = _DEADLINE.get()
    token = _DEADLINE.set(due if current is None else min(due, current))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def remaining() -> float | None:
    """Seconds left until the current request's deadline (negative once passed), or None."""
    due = _DEADLINE.get()
    return None if due is None else due - time.perf_counter()


def check(what: str) -> None:
    """Raise DeadlineExpired when the current request's deadline has passed."""
    due = _DEADLINE.get()
    if due is not None and settings().deadline_checks:
        late = time.perf_counter() - due
        if late >= 0:
            metrics.deadline_refused(what).inc()
            raise DeadlineExpired(what, late)


# ---- running work ----------------------------------------------------------------------------
async def run(what: str, work: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` for the current request: inline when `work` (its size in the
    caller's units) is small or there is no pool, else on the pool's threads. Raises
    DeadlineExpired, without running it, when the request's deadline has passed first."""
    check(what)
    pool = _executor() if work >= INLINE_WORK else None
    if pool is None:
        return fn(*args, **kwargs)
    due = _DEADLINE.get() if settings().deadline_checks else None
    metrics.cpu_offloaded(what).inc()

    def job() -> T:
        if due is not None and time.perf_counter() >= due:  # waited past it in the queue
            metrics.deadline_refused(what).inc()
            raise DeadlineExpired(what, time.perf_counter() - due)
        return fn(*args, **kwargs)

    # A cancelled await (the request's own timeout) also cancels the job if it has not
    # started; once started it runs to its end and its result is dropped.
    return await asyncio.get_running_loop().run_in_executor(pool, job)
