"""Precomputed candidate lists in Redis: versioned batches behind an atomically swapped pointer.

The offline job writes a whole batch with `write_lists`: every member's entry goes under a
new version, then the version's meta, and only then the `current` pointer moves, so readers
see the old batch or the new one, never a mix. The nearline worker rewrites single members
inside the live version with `update_lists`. Readers call `read_list`: one round trip (a Lua
script) that follows the pointer and fetches the member's entry.

An entry is one binary value: float64 created_at, then n int64 ids, then n float32 scores
(little-endian), so the age of each member's list travels with the list itself.
"""

from __future__ import annotations

import re
import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
import redis.asyncio as aioredis

from edgeflow import keys

_HEADER = struct.Struct("<d")
_IDS = np.dtype("<i8")
_SCORES = np.dtype("<f4")
_ITEM_BYTES = _IDS.itemsize + _SCORES.itemsize
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SENTINEL = "\x00"

# Entries of a batch carry this TTL until the batch is complete, so a writer that dies
# half-way leaves nothing behind for good.
PENDING_TTL_S = 24 * 3600
# How long a replaced batch stays readable for clients that already resolved its version.
GRACE_S = 300
_PIPELINE_BATCH = 2000

# KEYS[1] = pointer; ARGV = entry key before and after the version. Returns {version, entry}.
_READ_LUA = """
local v = redis.call('GET', KEYS[1])
if not v then return false end
return {v, redis.call('GET', ARGV[1] .. v .. ARGV[2])}
"""


class ListError(ValueError):
    """Bad input to a list write, or a stored entry that cannot be decoded."""


@dataclass(frozen=True)
class StoredList:
    ids: np.ndarray  # int64, best first
    scores: np.ndarray  # float32
    version: str
    created_at: float  # unix seconds when this member's entry was computed
    age_seconds: float


def validate_name(name: str, what: str = "list name") -> str:
    if not _NAME.match(name):
        raise ListError(f"{what} {name!r} is invalid: use 1-64 letters, digits, '_', '.' or '-'")
    return name


def new_version() -> str:
    """A sortable, unique version id: milliseconds since the epoch plus a random suffix."""
    return f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}"


def encode_entry(ids: np.ndarray, scores: np.ndarray, created_at: float) -> bytes:
    ids = np.asarray(ids)
    scores = np.asarray(scores)
    if ids.ndim != 1 or scores.shape != ids.shape:
        raise ListError(
            f"ids and scores must be 1-D arrays of one length, got {ids.shape} and {scores.shape}"
        )
    return (
        _HEADER.pack(created_at)
        + ids.astype(_IDS, copy=False).tobytes()
        + scores.astype(_SCORES, copy=False).tobytes()
    )


def decode_entry(data: bytes, where: str = "list entry") -> tuple[np.ndarray, np.ndarray, float]:
    """(ids, scores, created_at) from an entry; raises ListError naming `where` if corrupt."""
    body = len(data) - _HEADER.size
    if body < 0 or body % _ITEM_BYTES:
        raise ListError(f"{where} is corrupt: {len(data)} bytes is not 8 + 12*n")
    n = body // _ITEM_BYTES
    (created_at,) = _HEADER.unpack_from(data)
    ids = np.frombuffer(data, dtype=_IDS, count=n, offset=_HEADER.size)
    scores = np.frombuffer(data, dtype=_SCORES, count=n, offset=_HEADER.size + n * _IDS.itemsize)
    return ids.astype(np.int64), scores.astype(np.float32), created_at


def _entry_parts(name: str, member: int) -> tuple[str, str]:
    """The entry key split around its version, for the Lua script to splice the live version."""
    before, after = keys.list_entry(name, _SENTINEL, member).split(_SENTINEL)
    return before, after


def _entry_pattern(name: str, version: str) -> str:
    """SCAN pattern matching every member entry of one version."""
    before, after = _entry_parts(name, 0)
    if not after.endswith("0"):
        raise RuntimeError("keys.list_entry must end with the member id")
    return f"{before}{version}{after[:-1]}*"


def _check_batch(members: np.ndarray, lists: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    members = np.asarray(members)
    if members.ndim != 1 or not np.issubdtype(members.dtype, np.integer):
        raise ListError(f"members must be a 1-D integer array, got {members.dtype} {members.shape}")
    if members.size != len(lists):
        raise ListError(f"{members.size} members but {len(lists)} lists")
    if np.unique(members).size != members.size:
        dup = members[np.flatnonzero(np.diff(np.sort(members)) == 0)[0]]
        raise ListError(f"member {int(dup)} appears more than once in the batch")
    return members.astype(np.int64)


def _text(raw: Any) -> str | None:
    return None if raw is None else bytes(raw).decode()


def current_version(client: redis.Redis, name: str) -> str | None:
    return _text(client.get(keys.list_current(validate_name(name))))


def write_lists(
    client: redis.Redis,
    name: str,
    members: np.ndarray,
    lists: Sequence[tuple[np.ndarray, np.ndarray]],
    version: str | None = None,
    grace_s: int = GRACE_S,
) -> str:
    """Write a whole batch under a new version, then make it current; returns the version.

    `lists[i]` is (ids, scores) for `members[i]`, best first. The previous version's keys
    expire `grace_s` seconds after the swap.
    """
    validate_name(name)
    version = validate_name(version or new_version(), "list version")
    members = _check_batch(members, lists)
    if client.exists(keys.list_meta(name, version)):
        raise ListError(f"list {name!r} version {version!r} already exists")
    created_at = time.time()
    written: list[str] = []
    candidates = 0
    pipe = client.pipeline(transaction=False)
    for i, (member, (ids, scores)) in enumerate(zip(members.tolist(), lists, strict=True)):
        try:
            value = encode_entry(ids, scores, created_at)
        except ListError as exc:
            raise ListError(f"list for member {member} (index {i}): {exc}") from None
        candidates += (len(value) - _HEADER.size) // _ITEM_BYTES
        key = keys.list_entry(name, version, member)
        pipe.set(key, value, ex=PENDING_TTL_S)
        written.append(key)
        if len(pipe) >= _PIPELINE_BATCH:
            pipe.execute()
    pipe.execute()
    # Complete: make the entries permanent, record the meta, then swap the pointer.
    for start in range(0, len(written), _PIPELINE_BATCH):
        for key in written[start : start + _PIPELINE_BATCH]:
            pipe.persist(key)
        pipe.execute()
    client.hset(
        keys.list_meta(name, version),
        mapping={
            "created_at": created_at,
            "members": members.size,
            "candidates": candidates,
        },
    )
    previous = _text(client.set(keys.list_current(name), version, get=True))
    if previous is not None and previous != version:
        expire_version(client, name, previous, grace_s)
    return version


def expire_version(client: redis.Redis, name: str, version: str, ttl_s: int) -> int:
    """Give every key of one version a TTL; returns how many entries were found."""
    count = 0
    pipe = client.pipeline(transaction=False)
    pipe.expire(keys.list_meta(name, version), ttl_s)
    for key in client.scan_iter(match=_entry_pattern(name, version), count=1000):
        pipe.expire(key, ttl_s)
        count += 1
        if len(pipe) >= _PIPELINE_BATCH:
            pipe.execute()
    pipe.execute()
    return count


def update_lists(
    client: redis.Redis,
    name: str,
    members: np.ndarray,
    lists: Sequence[tuple[np.ndarray, np.ndarray]],
) -> str | None:
    """Replace some members' entries inside the live version (the nearline path).

    Atomic with respect to a batch swap: the pointer is watched, so entries never land in
    a version that was replaced meanwhile. Returns the version written, or None when the
    list has no live version yet (then there is nothing to update).
    """
    validate_name(name)
    members = _check_batch(members, lists)
    now = time.time()
    values = [encode_entry(ids, scores, now) for ids, scores in lists]
    pointer = keys.list_current(name)
    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(pointer)
                version = _text(pipe.get(pointer))
                if version is None:
                    return None
                pipe.multi()
                for member, value in zip(members.tolist(), values, strict=True):
                    pipe.set(keys.list_entry(name, version, member), value)
                pipe.execute()
                return version
            except redis.WatchError:
                continue  # a batch swapped the pointer meanwhile: write into the new one


async def read_list(client: aioredis.Redis, name: str, member: int) -> StoredList | None:
    """The member's entry in the live version, in one round trip; None when there is none."""
    before, after = _entry_parts(validate_name(name), member)
    script = client.register_script(_READ_LUA)
    reply = await script(keys=[keys.list_current(name)], args=[before, after])
    if not reply or len(reply) < 2 or reply[1] is None:
        return None
    version = reply[0].decode()
    ids, scores, created_at = decode_entry(
        reply[1], f"list {name!r} version {version} entry for member {member}"
    )
    return StoredList(
        ids=ids,
        scores=scores,
        version=version,
        created_at=created_at,
        age_seconds=max(0.0, time.time() - created_at),
    )
