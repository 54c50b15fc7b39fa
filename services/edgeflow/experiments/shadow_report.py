"""`edgeflow experiments shadow`: per shadow, how its ranking and latency compare with the
served one, from the ShadowComparison records of ef:shadow."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeflow.experiments.join import read_stream
from edgeflow.experiments.records import SHADOW, ShadowComparison
from edgeflow.stores.redis_client import SyncClient


@dataclass
class _Acc:
    overlap: array[float] = field(default_factory=lambda: array("d"))
    correlation: array[float] = field(default_factory=lambda: array("d"))
    served_ms: array[float] = field(default_factory=lambda: array("d"))
    shadow_ms: array[float] = field(default_factory=lambda: array("d"))
    partial: int = 0


@dataclass(frozen=True)
class ShadowRow:
    surface: str
    shadow: str
    requests: int
    mean_overlap_at_k: float | None  # None when no request had a defined value
    mean_rank_correlation: float | None  # NaN correlations (under two common items) ignored
    served_p50_ms: float
    served_p99_ms: float
    shadow_p50_ms: float
    shadow_p99_ms: float
    partial_share: float  # share of requests where the shadow's own result was partial


@dataclass(frozen=True)
class ShadowSummary:
    shadows: list[ShadowRow]
    malformed_entries: int

    def to_json(self) -> dict[str, Any]:
        return {
            "shadows": [
                {
                    k: None if isinstance(v, float) and math.isnan(v) else v
                    for k, v in row.__dict__.items()
                }
                for row in self.shadows
            ],
            "malformed_entries": self.malformed_entries,
        }


def _mean(values: array[float]) -> float | None:
    a = np.frombuffer(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if len(a) else None


def _pct(values: array[float], q: float) -> float:
    a = np.frombuffer(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.percentile(a, q)) if len(a) else math.nan


def summarize(
    client: SyncClient,
    surface: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> ShadowSummary:
    accs: dict[tuple[str, str], _Acc] = {}
    malformed = 0
    for _, fields in read_stream(client, SHADOW, since, until):
        try:
            rec = ShadowComparison.decode(fields)
        except (ValueError, UnicodeDecodeError):
            malformed += 1
            continue
        if surface is not None and rec.surface != surface:
            continue
        acc = accs.setdefault((rec.surface, rec.shadow), _Acc())
        acc.overlap.append(rec.overlap_at_k)
        acc.correlation.append(rec.rank_correlation)
        acc.served_ms.append(rec.served_ms)
        acc.shadow_ms.append(rec.shadow_ms)
        acc.partial += rec.shadow_partial
    rows = []
    for (surf, name), acc in sorted(accs.items()):
        n = len(acc.served_ms)
        rows.append(
            ShadowRow(
                surface=surf,
                shadow=name,
                requests=n,
                mean_overlap_at_k=_mean(acc.overlap),
                mean_rank_correlation=_mean(acc.correlation),
                served_p50_ms=_pct(acc.served_ms, 50),
                served_p99_ms=_pct(acc.served_ms, 99),
                shadow_p50_ms=_pct(acc.shadow_ms, 50),
                shadow_p99_ms=_pct(acc.shadow_ms, 99),
                partial_share=acc.partial / n,
            )
        )
    return ShadowSummary(rows, malformed)
