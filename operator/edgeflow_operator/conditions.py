"""Status conditions by the Kubernetes convention (type, status, reason, message,
observedGeneration, lastTransitionTime)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

VALID: Final = "Valid"
DEPLOYED: Final = "Deployed"
READY: Final = "Ready"
ORDER: Final = (VALID, DEPLOYED, READY)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type_: str, status: bool | None, reason: str, message: str, generation: int
) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "Unknown" if status is None else ("True" if status else "False"),
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def merge(
    current: Iterable[Mapping[str, Any]] | None, updates: Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The conditions after `updates`; a condition keeps its lastTransitionTime while its
    status stays the same."""
    by_type = {str(c.get("type")): dict(c) for c in current or []}
    stamp = now()
    for new in updates:
        old = by_type.get(new["type"])
        same = old is not None and old.get("status") == new["status"]
        new["lastTransitionTime"] = old.get("lastTransitionTime", stamp) if same and old else stamp
        by_type[new["type"]] = new
    known = [by_type.pop(t) for t in ORDER if t in by_type]
    return known + sorted(by_type.values(), key=lambda c: str(c.get("type")))


def find(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def changed(before: Iterable[Mapping[str, Any]] | None, after: list[dict[str, Any]]) -> bool:
    """Whether writing `after` would change anything but timestamps."""

    def key(cs: Iterable[Mapping[str, Any]] | None) -> list[tuple[Any, ...]]:
        return [
            (c.get("type"), c.get("status"), c.get("reason"), c.get("message"),
             c.get("observedGeneration"))
            for c in cs or []
        ]  # fmt: skip

    return key(before) != key(after)
