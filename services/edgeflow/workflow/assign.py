"""Sticky assignment of members to experiment variants.

A member's bucket is a salted hash of its id, so every gateway replica and every restart
puts it in the same variant, and experiments with different salts are independent. A
second hash, salted apart, decides targeting, so a share of 20% is not the first 20% of
the variant buckets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from edgeflow.workflow.model import Experiment

BUCKETS = 10_000


def bucket(salt: str, member: int) -> int:
    """The member's bucket in [0, BUCKETS) for a salt."""
    digest = hashlib.blake2b(f"{salt}:{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


@dataclass(frozen=True)
class Bucketing:
    """An experiment compiled for assignment: cumulative bucket bounds per variant."""

    name: str
    salt: str
    share_buckets: int  # members whose targeting bucket is below this are eligible
    allow: frozenset[int] | None
    bounds: tuple[tuple[int, str], ...]  # (exclusive upper bucket, variant), ascending

    @classmethod
    def of(cls, exp: Experiment) -> Bucketing:
        bounds, total = [], 0.0
        for v in exp.variants:
            total += v.weight
            bounds.append((round(total * BUCKETS / 100), v.name))
        return cls(
            name=exp.name,
            salt=exp.salt or exp.name,
            share_buckets=round(exp.targeting.share * BUCKETS),
            allow=frozenset(exp.targeting.allow_list) if exp.targeting.allow_list else None,
            bounds=tuple(bounds),
        )

    def variant(self, member: int) -> str | None:
        """The member's variant, or None when the targeting leaves it out."""
        if self.allow is not None and member not in self.allow:
            return None
        if self.share_buckets < BUCKETS and bucket(f"{self.salt}#targeting", member) >= (
            self.share_buckets
        ):
            return None
        b = bucket(self.salt, member)
        for upper, name in self.bounds:
            if b < upper:
                return name
        return self.bounds[-1][1]  # weights of 0 at the end


def assign(experiments: tuple[Bucketing, ...], member: int) -> tuple[tuple[str, str], ...]:
    """(experiment, variant) for each experiment the member is in, in spec order."""
    out = []
    for exp in experiments:
        variant = exp.variant(member)
        if variant is not None:
            out.append((exp.name, variant))
    return tuple(out)
