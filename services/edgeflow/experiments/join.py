"""Exposure-to-outcome joins over the Redis Streams.

- An exposure unit is one served edge (request, member, target, position) of ef:exposures.
- Outcomes are the member events of ef:events: connect and follow are acceptances, dismiss a
  negative outcome counted separately; other event types are not outcomes.
- An outcome (member, target, type, time) joins the LATEST exposure of that member at or
  before the event time, at most `window_s` earlier, whose items hold the target, and is
  attributed to that exposure's variants (to every experiment the exposure was in).
- The same (member, target, type) counts once: its earliest event that joins an exposure.
  An outcome that joins no exposure is unattributed.

Outcomes are read first and held (they are far fewer than exposures); the exposures then
stream by once in chunks and are aggregated per (variant, member), so no exposure row is
kept. Malformed entries in either stream are skipped and counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import cast

from edgeflow.experiments.records import EXPOSURES, Exposure
from edgeflow.stores import keys
from edgeflow.stores.redis_client import SyncClient

ACCEPTANCES = frozenset({"connect", "follow"})
DISMISS = "dismiss"
CHUNK = 10_000
DEFAULT_WINDOW_S = 7 * 24 * 3600.0

Fields = Mapping[bytes | str, bytes | str]


def read_stream(
    client: SyncClient,
    key: str,
    since: float | None = None,
    until: float | None = None,
    chunk: int = CHUNK,
) -> Iterator[tuple[bytes, Fields]]:
    """XRANGE in chunks; since/until (unix s) bound the entry ids, which are append times."""
    low = "-" if since is None else str(max(0, math.floor(since * 1000)))
    high = "+" if until is None else str(max(0, math.floor(until * 1000)))
    while True:
        batch = cast(list[tuple[bytes, Fields]], client.xrange(key, low, high, count=chunk))
        yield from batch
        if len(batch) < chunk:
            return
        low = "(" + batch[-1][0].decode()


class _Outcome:
    """One (member, target, type): its event times and, per event, the best exposure so far."""

    __slots__ = ("best_time", "times", "variant")

    def __init__(self) -> None:
        self.times: list[float] = []
        self.best_time: list[float] = []  # -inf: no exposure joined yet
        self.variant: list[str | None] = []  # the experiment's variant on that exposure

    def add(self, t: float) -> None:
        self.times.append(t)
        self.best_time.append(-math.inf)
        self.variant.append(None)

    def offer(self, exposed_at: float, variant: str | None, window_s: float) -> None:
        for i, t in enumerate(self.times):
            # >=: of two exposures at the same time, the later stream entry is the latest.
            if exposed_at <= t <= exposed_at + window_s and exposed_at >= self.best_time[i]:
                self.best_time[i] = exposed_at
                self.variant[i] = variant

    def attribution(self) -> tuple[bool, str | None]:
        """(joined any exposure, the variant of the earliest event's join)."""
        joined = [i for i, b in enumerate(self.best_time) if b > -math.inf]
        if not joined:
            return False, None
        first = min(joined, key=lambda i: self.times[i])
        return True, self.variant[first]


@dataclass
class Arm:
    """One variant's member-level sums, members in first-seen order."""

    members: list[int] = field(default_factory=list)
    edges: list[int] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    dismissed: list[int] = field(default_factory=list)


@dataclass
class JoinResult:
    experiment: str
    arms: dict[str, Arm]  # by variant
    unattributed: int  # outcomes that joined no exposure at all
    malformed: int  # skipped entries of either stream
    experiments_seen: set[str]


def _text(fields: Fields, name: str) -> str:
    value = fields.get(name.encode())
    if value is None:
        raise ValueError(f"field {name!r} is missing")
    return value.decode() if isinstance(value, bytes) else value


def read_outcomes(
    client: SyncClient, since: float | None, until: float | None
) -> tuple[dict[int, dict[int, dict[str, _Outcome]]], int]:
    """member -> target -> type -> outcome, and the count of malformed entries."""
    outcomes: dict[int, dict[int, dict[str, _Outcome]]] = {}
    malformed = 0
    for _, fields in read_stream(client, keys.EVENTS, since, until):
        try:
            kind = _text(fields, "type")
            if kind not in ACCEPTANCES and kind != DISMISS:
                continue
            member, target = int(_text(fields, "member")), int(_text(fields, "target"))
            t = float(_text(fields, "time"))
            if not math.isfinite(t):
                raise ValueError("time is not finite")
        except (ValueError, UnicodeDecodeError):
            malformed += 1
            continue
        by_type = outcomes.setdefault(member, {}).setdefault(target, {})
        by_type.setdefault(kind, _Outcome()).add(t)
    return outcomes, malformed


def join(
    client: SyncClient,
    experiment: str,
    window_s: float = DEFAULT_WINDOW_S,
    since: float | None = None,
    until: float | None = None,
) -> JoinResult:
    """Join the outcomes of [since, until] to the exposures of the same range."""
    outcomes, malformed = read_outcomes(client, since, until)
    # (variant, member) -> [edges, requests]
    units: dict[tuple[str, int], list[int]] = {}
    seen: set[str] = set()
    for _, fields in read_stream(client, EXPOSURES, since, until):
        try:
            exposure = Exposure.decode(fields)
            if not math.isfinite(exposure.time):
                raise ValueError("time is not finite")
        except (ValueError, UnicodeDecodeError):
            malformed += 1
            continue
        seen.update(e for e, _ in exposure.assignments)
        variant = exposure.variant(experiment)
        if variant is not None:
            unit = units.setdefault((variant, exposure.member), [0, 0])
            unit[0] += len(exposure.items)
            unit[1] += 1
        targets = outcomes.get(exposure.member)
        if targets:
            for item in exposure.items:
                by_type = targets.get(item)
                if by_type:
                    for outcome in by_type.values():
                        outcome.offer(exposure.time, variant, window_s)

    arms: dict[str, Arm] = {}
    index: dict[tuple[str, int], int] = {}
    for (variant, member), (edges, requests) in units.items():
        arm = arms.setdefault(variant, Arm())
        index[(variant, member)] = len(arm.members)
        arm.members.append(member)
        arm.edges.append(edges)
        arm.requests.append(requests)
        arm.accepted.append(0)
        arm.dismissed.append(0)
    unattributed = 0
    for member, targets in outcomes.items():
        for by_type in targets.values():
            for kind, outcome in by_type.items():
                joined, variant = outcome.attribution()
                if not joined:
                    unattributed += 1
                elif variant is not None:
                    arm = arms[variant]
                    i = index[(variant, member)]
                    if kind == DISMISS:
                        arm.dismissed[i] += 1
                    else:
                        arm.accepted[i] += 1
    return JoinResult(experiment, arms, unattributed, malformed, seen)
