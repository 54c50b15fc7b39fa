"""Capacity: the highest open-loop request rate that still meets the latency objective.

Open loop means arrivals at a fixed rate, whatever the answers do: request i is due at
`start + i / rate` and is sent then even when earlier ones have not returned, as real
traffic would be. (Closed-loop workers slow down with the server and so never see its queue.)
Each request's latency is taken from the moment it was due, so a load generator that falls
behind counts against the rate rather than hiding it.

A rate passes when the p99 latency is at most `p99_ms` and partial plus failed responses are
at most `bad_share` of its requests. The search doubles the rate until one fails (halving
instead when the first fails), then bisects between the highest pass and the lowest failure
to `resolution`. Every step sends a bounded number of requests, each with a deadline, and the
search stops at `max_steps` steps or `budget_s` seconds, saying whether it got there.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

P99_MS = 100.0
BAD_SHARE = 0.01
# A step whose sends ran this late (p99) measured the load generator, not the server: it is
# run once more (a shared machine can stall the generator for a moment).
LAG_RETRY_MS = 25.0


@dataclass
class Step:
    """One rate's result."""

    rate: float  # offered, requests per second
    requests: int
    p50_ms: float
    p99_ms: float
    partial: int
    failed: dict[str, int] = field(default_factory=dict)  # by gRPC status (or error type)
    seconds: float = 0.0  # from the first arrival to the last answer
    send_lag_p99_ms: float = 0.0  # how late the generator sent (p99), a sign it kept up
    retried: bool = False  # run again because the generator fell behind the first time
    repeat: bool = False  # the same rate again after it failed: this run decides (search_capacity)
    degraded: dict[str, int] = field(default_factory=dict)  # partial answers' nodes, counted

    @property
    def bad(self) -> int:
        return self.partial + sum(self.failed.values())

    def passes(self, p99_ms: float = P99_MS, bad_share: float = BAD_SHARE) -> bool:
        return self.p99_ms <= p99_ms and self.bad <= bad_share * self.requests

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def open_loop(
    call: Callable[[int], Awaitable[bool]], rate: float, requests: int, timeout_s: float = 2.0
) -> Step:
    """Send `requests` calls at `rate` per second, not waiting for answers: call(i) returns
    whether the response was partial, and raises when it failed. A call that takes longer
    than `timeout_s` counts as failed (DEADLINE_EXCEEDED); callers should pass the same
    deadline to their RPC so nothing outlives the step."""
    if rate <= 0 or requests <= 0:
        raise ValueError(f"open_loop needs a positive rate and count, got {rate}, {requests}")
    loop = asyncio.get_running_loop()
    lat = np.zeros(requests)
    lag = np.zeros(requests)
    partial = 0
    failed: Counter[str] = Counter()

    async def one(i: int, due: float) -> None:
        nonlocal partial
        try:
            was_partial = await asyncio.wait_for(call(i), timeout_s)
            partial += int(was_partial)  # not `partial += await ...`: that reads it first
        except TimeoutError:
            failed["DEADLINE_EXCEEDED"] += 1
        except Exception as exc:  # a failed request is a measurement, not an error here
            code = getattr(exc, "code", None)
            name = code().name if callable(code) else type(exc).__name__
            failed[str(name)] += 1
        lat[i] = (loop.time() - due) * 1000

    start = loop.time() + 0.01
    tasks = []
    for i in range(requests):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lag[i] = max(0.0, loop.time() - due) * 1000
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    return Step(
        rate=round(rate, 1),
        requests=requests,
        p50_ms=round(float(np.percentile(lat, 50)), 3),
        p99_ms=round(float(np.percentile(lat, 99)), 3),
        partial=partial,
        failed=dict(failed),
        seconds=round(loop.time() - start, 3),
        send_lag_p99_ms=round(float(np.percentile(lag, 99)), 3),
    )


@dataclass
class Capacity:
    rate: float  # the highest passing rate found; 0 when none passed
    passing: Step | None
    failing: Step | None  # the lowest failing rate found (the bound from above)
    steps: list[Step]
    complete: bool  # bracketed to `resolution` (or at `max_rate`) within the bounds
    stopped_by: str  # "resolution", "max_rate", "min_rate", "max_steps" or "budget"

    def as_json(self, prefix: str = "capacity_") -> dict[str, Any]:
        """Flat keys for a bench JSON: the capacity, what held there and at the failing rate."""
        out: dict[str, Any] = {f"{prefix}qps": self.rate}
        for label, step in (("", self.passing), ("fail_", self.failing)):
            keys: tuple[str, ...] = ("p50_ms", "p99_ms", "partial_pct", "failed_pct", "failed")
            if label:
                keys = ("qps", *keys)
            if step is None:
                out.update({f"{prefix}{label}{k}": None for k in keys})
                continue
            values = {
                "qps": step.rate,
                "p50_ms": step.p50_ms,
                "p99_ms": step.p99_ms,
                "partial_pct": round(100 * step.partial / step.requests, 2),
                "failed_pct": round(100 * sum(step.failed.values()) / step.requests, 2),
                "failed": step.failed,
            }
            out.update({f"{prefix}{label}{k}": values[k] for k in keys})
        out[f"{prefix}search_complete"] = self.complete
        out[f"{prefix}stopped_by"] = self.stopped_by
        out[f"{prefix}steps"] = [
            {"qps": s.rate, "requests": s.requests, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms,
             "partial": s.partial, "failed": sum(s.failed.values()),
             "send_lag_p99_ms": s.send_lag_p99_ms, "retried": s.retried,
             "repeat": s.repeat, "degraded": s.degraded, "pass": s.passes()}
            for s in self.steps
        ]  # fmt: skip
        return out


async def search_capacity(
    measure: Callable[[float], Awaitable[Step]],
    *,
    start: float = 25.0,
    min_rate: float = 1.0,
    max_rate: float = 5000.0,
    resolution: float = 0.1,
    max_steps: int = 14,
    budget_s: float = 180.0,
    passes: Callable[[Step], bool] = Step.passes,
    clock: Callable[[], float] = time.monotonic,
    confirm_failures: bool = True,
) -> Capacity:
    """Double from `start` until a rate fails (or halve until one passes), then bisect until
    the failing rate is within `resolution` (relative) of the passing one. `measure(rate)`
    runs one step; no step starts after `max_steps` steps or `budget_s` seconds. With
    `confirm_failures`, a rate that fails is measured once more and fails only if that run
    fails too: on a shared machine one stall in a step would otherwise set the capacity.
    Every run is in `steps`."""
    if not 0 < min_rate <= start <= max_rate:
        raise ValueError(
            f"need 0 < min_rate <= start <= max_rate, got {min_rate}, {start}, {max_rate}"
        )
    t0 = clock()
    steps: list[Step] = []
    passing: Step | None = None
    failing: Step | None = None

    def out_of_bounds() -> str:
        if len(steps) >= max_steps:
            return "max_steps"
        if clock() - t0 >= budget_s:
            return "budget"
        return ""

    async def step(rate: float) -> Step:
        s = await measure(rate)
        steps.append(s)
        if confirm_failures and not passes(s) and not out_of_bounds():
            s = await measure(rate)
            s.repeat = True
            steps.append(s)
        return s

    stopped = ""
    rate = start
    # Bracket: up by doubling while it passes, down by halving while it fails.
    while not (stopped := out_of_bounds()):
        s = await step(rate)
        if passes(s):
            passing = s
            if failing is not None:
                break
            if rate >= max_rate:
                stopped = "max_rate"
                break
            rate = min(rate * 2, max_rate)
        else:
            failing = s
            if passing is not None:
                break
            if rate <= min_rate:
                stopped = "min_rate"
                break
            rate = max(rate / 2, min_rate)
    # Bisect between the highest pass and the lowest failure.
    while not stopped and passing is not None and failing is not None:
        if failing.rate <= passing.rate * (1 + resolution):
            stopped = "resolution"
            break
        if stopped := out_of_bounds():
            break
        s = await step(round((passing.rate + failing.rate) / 2, 1))
        if passes(s):
            passing = s
        else:
            failing = s
    return Capacity(
        rate=passing.rate if passing is not None else 0.0,
        passing=passing,
        failing=failing,
        steps=steps,
        complete=stopped in ("resolution", "max_rate", "min_rate"),
        stopped_by=stopped,
    )


def step_requests(
    rate: float, seconds: float = 3.0, least: int = 200, most: int = 1500, longest: float = 20.0
) -> int:
    """Requests for one step at `rate`: about `seconds` of traffic, at least `least` (so a
    p99 rests on a few samples past it), at most `most`, and at a low rate no more than
    `longest` seconds of traffic (but never fewer than 20 requests)."""
    n = min(most, max(least, round(rate * seconds)))
    return int(max(20, min(n, round(rate * longest))))


async def recommend_capacity(
    stub: Any,
    members: list[int],
    *,
    surface: str = "pymk",
    k: int = 50,
    timeout_s: float = 2.0,
    budget_s: float = 180.0,
    step_seconds: float = 3.0,
    start: float = 25.0,
    settle_s: float = 1.0,
) -> Capacity:
    """The capacity of `Recommend` (a gateway stub) on loopback, members in turn."""
    from edgeflow.v1 import gateway_pb2

    ring = [int(m) for m in members]

    async def once(rate: float, n: int) -> Step:
        degraded: Counter[str] = Counter()

        async def call(i: int) -> bool:
            req = gateway_pb2.RecommendRequest(surface=surface, member=ring[i % len(ring)], k=k)
            resp = await stub.Recommend(req, timeout=timeout_s)
            degraded.update(line.split(":", 1)[0] for line in resp.degraded)
            return bool(resp.partial)

        s = await open_loop(call, rate, n, timeout_s)
        s.degraded = dict(degraded)
        await asyncio.sleep(settle_s)  # let what the step left behind drain
        return s

    async def measure(rate: float) -> Step:
        n = step_requests(rate, step_seconds)
        s = await once(rate, n)
        if s.send_lag_p99_ms > LAG_RETRY_MS:
            s = await once(rate, n)
            s.retried = True
        return s

    return await search_capacity(measure, start=start, budget_s=budget_s)
