"""The records experiments leave in Redis Streams, and their one encoding.

Exposures (`ef:exposures`): one entry per served Recommend response, with the variants that
served it and the edges in position order. Shadow comparisons (`ef:shadow`): one entry per
request that also ran a shadow variant. Outcomes are the member events of `ef:events`
(connect, follow, dismiss), joined to exposures at analysis time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from edgeflow.stores import keys

EXPOSURES = keys.PREFIX + "exposures"
SHADOW = keys.PREFIX + "shadow"
# Both streams are capped near this length (approximate trim, as XADD MAXLEN ~ does it).
STREAM_MAXLEN = 1_000_000

Assignments = tuple[tuple[str, str], ...]  # (experiment, variant), in spec order


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _field(fields: Mapping[bytes | str, bytes | str], name: str) -> str:
    value = fields.get(name.encode())
    if value is None:
        value = fields.get(name)
    if value is None:
        raise ValueError(f"field {name!r} is missing")
    return _text(value)


def encode_assignments(assignments: Assignments) -> str:
    return ",".join(f"{e}={v}" for e, v in assignments)


def decode_assignments(text: str) -> Assignments:
    if not text:
        return ()
    out = []
    for part in text.split(","):
        exp, sep, variant = part.partition("=")
        if not sep or not exp or not variant:
            raise ValueError(f"assignment {part!r} is not experiment=variant")
        out.append((exp, variant))
    return tuple(out)


def _ids(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",")) if text else ()


@dataclass(frozen=True)
class Exposure:
    """Which variants served which edges to whom, and when."""

    request_id: str
    time: float  # unix seconds
    member: int
    surface: str
    workflow: str
    assignments: Assignments
    items: tuple[int, ...]  # served targets; the position of an item is its index
    partial: bool = False

    def variant(self, experiment: str) -> str | None:
        return next((v for e, v in self.assignments if e == experiment), None)

    def encode(self) -> dict[str, str]:
        return {
            "request_id": self.request_id,
            "time": repr(self.time),
            "member": str(self.member),
            "surface": self.surface,
            "workflow": self.workflow,
            "assignments": encode_assignments(self.assignments),
            "items": ",".join(map(str, self.items)),
            "partial": "1" if self.partial else "0",
        }

    @classmethod
    def decode(cls, fields: Mapping[bytes | str, bytes | str]) -> Exposure:
        """Raises ValueError naming the field that is missing or malformed."""
        return cls(
            request_id=_field(fields, "request_id"),
            time=float(_field(fields, "time")),
            member=int(_field(fields, "member")),
            surface=_field(fields, "surface"),
            workflow=_field(fields, "workflow"),
            assignments=decode_assignments(_field(fields, "assignments")),
            items=_ids(_field(fields, "items")),
            partial=_field(fields, "partial") == "1",
        )


@dataclass(frozen=True)
class ShadowComparison:
    """A shadow variant's ranking against the served one, for one request."""

    request_id: str
    time: float
    member: int
    surface: str
    shadow: str
    k: int
    overlap_at_k: float  # |served top-k ∩ shadow top-k| / k
    rank_correlation: float  # Spearman over the items both ranked; NaN under two
    served_ms: float
    shadow_ms: float
    shadow_partial: bool
    served_items: tuple[int, ...]
    shadow_items: tuple[int, ...]

    def encode(self) -> dict[str, str]:
        return {
            "request_id": self.request_id,
            "time": repr(self.time),
            "member": str(self.member),
            "surface": self.surface,
            "shadow": self.shadow,
            "k": str(self.k),
            "overlap_at_k": repr(self.overlap_at_k),
            "rank_correlation": repr(self.rank_correlation),
            "served_ms": repr(self.served_ms),
            "shadow_ms": repr(self.shadow_ms),
            "shadow_partial": "1" if self.shadow_partial else "0",
            "served_items": ",".join(map(str, self.served_items)),
            "shadow_items": ",".join(map(str, self.shadow_items)),
        }

    @classmethod
    def decode(cls, fields: Mapping[bytes | str, bytes | str]) -> ShadowComparison:
        return cls(
            request_id=_field(fields, "request_id"),
            time=float(_field(fields, "time")),
            member=int(_field(fields, "member")),
            surface=_field(fields, "surface"),
            shadow=_field(fields, "shadow"),
            k=int(_field(fields, "k")),
            overlap_at_k=float(_field(fields, "overlap_at_k")),
            rank_correlation=float(_field(fields, "rank_correlation")),
            served_ms=float(_field(fields, "served_ms")),
            shadow_ms=float(_field(fields, "shadow_ms")),
            shadow_partial=_field(fields, "shadow_partial") == "1",
            served_items=_ids(_field(fields, "served_items")),
            shadow_items=_ids(_field(fields, "shadow_items")),
        )


def overlap_at_k(served: tuple[int, ...], shadow: tuple[int, ...], k: int) -> float:
    """Share of the served top-k that the shadow's top-k also holds."""
    if k <= 0:
        return math.nan
    return len(set(served[:k]) & set(shadow[:k])) / k


def rank_correlation(served: tuple[int, ...], shadow: tuple[int, ...]) -> float:
    """Spearman's rho between the two orders of the items both lists hold (NaN under two)."""
    pos = {item: i for i, item in enumerate(shadow)}
    common = [pos[item] for item in served if item in pos]
    n = len(common)
    if n < 2:
        return math.nan
    # Ranks among the common items: served order is 0..n-1; shadow order re-ranked.
    shadow_rank = {p: r for r, p in enumerate(sorted(common))}
    d2 = sum((i - shadow_rank[p]) ** 2 for i, p in enumerate(common))
    return 1.0 - 6.0 * d2 / (n * (n * n - 1))
