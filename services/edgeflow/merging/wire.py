"""MergeResponse edges encoded straight to protobuf wire bytes, then parsed in one call.

Building one Edge and one Provenance message per output item through the protobuf API costs
about 2 us each in Python. The response's shape is fixed (tensor.proto, merging.proto), so
its bytes are assembled here from numpy buffers and a few cached pieces, and the C parser
turns them into the message. Fields may appear in any order on the wire and a parsed zero
equals an unset proto3 field, so the message is the same as one built field by field.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

import numpy as np

_F32_MAX = float(np.finfo(np.float32).max)
# Edge.score (field 2, fixed32) and Edge.model_score (field 3, fixed32, optional), per edge.
_EDGE_FLOATS = np.dtype([("t2", "u1"), ("score", "<f4"), ("t3", "u1"), ("model", "<f4")])
_VARINTS = [bytes((v,)) if v < 0x80 else bytes((v & 0x7F | 0x80, v >> 7)) for v in range(1 << 14)]
_F64 = struct.Struct("<d")


def varint(value: int) -> bytes:
    """Base-128 varint; a negative int64 is its 64-bit two's complement (ten bytes)."""
    if 0 <= value < 1 << 14:
        return _VARINTS[value]
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(tag: int, text: str) -> bytes:
    raw = text.encode()
    return bytes((tag,)) + varint(len(raw)) + raw


def provenance_head(source: str, mode: str, age_seconds: float) -> bytes:
    """Edge.provenance (field 4) framing and every Provenance field but the score, which
    follows as its fixed32 value (4 bytes) to complete the entry."""
    body = _string(0x0A, source) + _string(0x1A, mode) + b"\x21" + _F64.pack(age_seconds)
    body += b"\x15"  # Provenance.score, fixed32: its 4 bytes come last
    return b"\x22" + varint(len(body) + 4) + body


def social_proof(count: int, mutual_ids: Sequence[int]) -> bytes:
    """Edge.social_proof (field 5): SocialProof{mutual_count, mutual_ids (packed)}."""
    body = (b"\x08" + varint(count)) if count else b""
    if mutual_ids:
        packed = b"".join(varint(m) for m in mutual_ids)
        body += b"\x12" + varint(len(packed)) + packed
    return b"\x2a" + varint(len(body)) + body


def edges(
    ids: np.ndarray,
    score: np.ndarray,
    model: np.ndarray,
    prov_edge: np.ndarray,
    prov_head: Sequence[bytes],
    prov_score: np.ndarray,
    proof: Sequence[bytes] = (),
) -> bytes:
    """Repeated MergeResponse.edges (field 1) for edges in order.

    `model` is NaN where unscored: Edge.model_score is then left out (absent, so a reader
    can tell it from a score of 0); ±inf is sent as ±float32 max, as numpy's nan_to_num.
    Each provenance entry p belongs to edge `prov_edge[p]` (ascending), with `prov_head[p]`
    from provenance_head and the float32 score `prov_score[p]`. `proof`, when given, holds
    each edge's `social_proof` bytes.
    """
    n = ids.size
    if n == 0:
        return b""
    floats = np.empty(n, dtype=_EDGE_FLOATS)
    floats["t2"], floats["t3"] = 0x15, 0x1D
    floats["score"] = score
    m = np.clip(model, -_F32_MAX, _F32_MAX)
    scored = ~np.isnan(m)
    floats["model"] = np.where(scored, m, 0.0)
    fixed = floats.tobytes()
    # Each edge's bytes of `fixed`: both floats (10), or the score alone (5) when unscored.
    width = np.where(scored, 10, 5).tolist()
    scores = np.asarray(prov_score, dtype="<f4").tobytes()
    ends = np.searchsorted(prov_edge, np.arange(1, n + 1)).tolist()
    out: list[bytes] = []
    p = 0
    for e, target in enumerate(ids.tolist()):
        parts = [b"\x08", varint(target), fixed[10 * e : 10 * e + width[e]]]
        end = ends[e]
        while p < end:
            parts += (prov_head[p], scores[4 * p : 4 * p + 4])
            p += 1
        if proof:
            parts.append(proof[e])
        body = b"".join(parts)
        out += (b"\x0a", varint(len(body)), body)
    return b"".join(out)


def drop_counts(dropped: Mapping[str, int]) -> bytes:
    """Repeated MergeResponse.dropped (field 2): DropCount{reason, count} per entry."""
    out: list[bytes] = []
    for reason, count in dropped.items():
        body = _string(0x0A, reason) + b"\x10" + varint(count)
        out += (b"\x12", varint(len(body)), body)
    return b"".join(out)
