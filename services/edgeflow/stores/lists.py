"""Precomputed candidate lists in Redis: versioned batches behind an atomically swapped pointer.

The offline job writes a whole batch with `write_lists`: every member's entry goes under a
new version, then the version's meta, and only then the `current` pointer moves, so readers
see the old batch or the new one, never a mix. The nearline worker rewrites single members
inside the live version with `update_lists`. Readers call `read_list`: one round trip (a Lua
script, sent by its SHA) that follows the pointer and fetches the member's entry.

An entry is one binary value: float64 created_at, one mode byte (0 offline, 1 nearline),
then n int64 ids, then n float32 scores (little-endian), so the age and the origin of each
member's list travel with the list itself. Entries written before the mode byte existed
(8 + 12*n bytes) read as offline.

A sharded offline run writes its entries with `queue_entries` from several processes and the
last shard calls `publish_version`. The swap carries over entries the nearline worker wrote
into the live version after the run started, so a bulk run never undoes a fresher update.
"""

from __future__ import annotations

import hashlib
import re
import struct
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import redis

from edgeflow.stores import keys
from edgeflow.stores.redis_client import AsyncClient, SyncClient, is_cluster_client, script
from edgeflow.stores.resp import RawPipeline, RespReplyError, encode
from edgeflow.stores.resp_cluster import ClusterPipeline

_HEADER = struct.Struct("<dB")
_LEGACY_HEADER = struct.Struct("<d")
MODES = ("offline", "nearline")  # an entry's mode byte indexes this
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
# On a Redis Cluster, how long the request path keeps a list's resolved version.
POINTER_TTL_S = 1.0
_PIPELINE_BATCH = 2000

# KEYS[1] = pointer; ARGV = entry key before and after the version. Returns {version, entry}.
_READ_LUA = """
local v = redis.call('GET', KEYS[1])
if not v then return false end
return {v, redis.call('GET', ARGV[1] .. v .. ARGV[2])}
"""
_READ_SHA = hashlib.sha1(_READ_LUA.encode()).hexdigest()

# KEYS[1] = pointer; ARGV = new version, entry key before the version, between version and
# member, the nearline set's suffix, the run's start time. Swaps the pointer after copying
# the old version's nearline entries written since the start; returns the old version.
_SWAP_LUA = """
local new, before, mid, nearline = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local old = redis.call('GET', KEYS[1])
if old == new then return old end
if old then
  for _, m in ipairs(redis.call('SMEMBERS', before .. old .. nearline)) do
    local e = redis.call('GET', before .. old .. mid .. m)
    if e and #e >= 8 and struct.unpack('<d', e) >= tonumber(ARGV[5]) then
      redis.call('SET', before .. new .. mid .. m, e)
      redis.call('SADD', before .. new .. nearline, m)
    end
  end
end
redis.call('SET', KEYS[1], new)
return old
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
    mode: str = "offline"  # who computed the entry: the offline job or the nearline worker


def validate_name(name: str, what: str = "list name") -> str:
    if not _NAME.match(name):
        raise ListError(f"{what} {name!r} is invalid: use 1-64 letters, digits, '_', '.' or '-'")
    return name


def new_version() -> str:
    """A sortable, unique version id: milliseconds since the epoch plus a random suffix."""
    return f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}"


def encode_entry(
    ids: np.ndarray, scores: np.ndarray, created_at: float, mode: str = "offline"
) -> bytes:
    if mode not in MODES:
        raise ListError(f"mode {mode!r} is not one of {MODES}")
    ids = np.asarray(ids)
    scores = np.asarray(scores)
    if ids.ndim != 1 or scores.shape != ids.shape:
        raise ListError(
            f"ids and scores must be 1-D arrays of one length, got {ids.shape} and {scores.shape}"
        )
    return (
        _HEADER.pack(created_at, MODES.index(mode))
        + ids.astype(_IDS, copy=False).tobytes()
        + scores.astype(_SCORES, copy=False).tobytes()
    )


def decode_entry(
    data: bytes, where: str = "list entry"
) -> tuple[np.ndarray, np.ndarray, float, str]:
    """(ids, scores, created_at, mode) from an entry; raises ListError naming `where` if corrupt."""
    if len(data) >= _HEADER.size and (len(data) - _HEADER.size) % _ITEM_BYTES == 0:
        created_at, code = _HEADER.unpack_from(data)
        if code >= len(MODES):
            raise ListError(f"{where} is corrupt: unknown mode byte {code}")
        head, mode = _HEADER.size, MODES[code]
    elif len(data) >= _LEGACY_HEADER.size and (len(data) - _LEGACY_HEADER.size) % _ITEM_BYTES == 0:
        (created_at,), head, mode = _LEGACY_HEADER.unpack_from(data), _LEGACY_HEADER.size, "offline"
    else:
        raise ListError(f"{where} is corrupt: {len(data)} bytes is not 9 + 12*n")
    n = (len(data) - head) // _ITEM_BYTES
    ids = np.frombuffer(data, dtype=_IDS, count=n, offset=head)
    scores = np.frombuffer(data, dtype=_SCORES, count=n, offset=head + n * _IDS.itemsize)
    return ids.astype(np.int64), scores.astype(np.float32), created_at, mode


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


def current_version(client: SyncClient, name: str) -> str | None:
    return _text(client.get(keys.list_current(validate_name(name))))


def write_lists(
    client: SyncClient,
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
    previous = _swap(client, name, version, created_at)
    if previous is not None and previous != version:
        expire_version(client, name, previous, grace_s)
    return version


def queue_entries(
    pipe: redis.client.Pipeline,
    name: str,
    version: str,
    members: np.ndarray,
    lists: Sequence[tuple[np.ndarray, np.ndarray]],
    created_at: float,
) -> int:
    """Queue some members' offline entries of a version that is not live yet on `pipe`
    (with the pending TTL, lifted by `publish_version`); returns how many candidates."""
    members = _check_batch(members, lists)
    values = []
    for i, (member, (ids, scores)) in enumerate(zip(members.tolist(), lists, strict=True)):
        try:
            values.append(encode_entry(ids, scores, created_at))
        except ListError as exc:
            raise ListError(f"list for member {member} (index {i}): {exc}") from None
    for member, value in zip(members.tolist(), values, strict=True):
        pipe.set(keys.list_entry(name, version, member), value, ex=PENDING_TTL_S)
    return sum((len(v) - _HEADER.size) // _ITEM_BYTES for v in values)


def publish_version(
    client: SyncClient,
    name: str,
    version: str,
    meta: dict[str, str | int | float],
    started_at: float,
    grace_s: int = GRACE_S,
) -> str | None:
    """Make a version written with `queue_entries` permanent and current; returns the version
    it replaced. Idempotent: publishing the live version again changes nothing.

    Nearline entries written into the replaced version since `started_at` are carried over.
    """
    validate_name(name)
    pipe = client.pipeline(transaction=False)
    for key in client.scan_iter(match=_entry_pattern(name, version), count=1000):
        pipe.persist(key)
        if len(pipe) >= _PIPELINE_BATCH:
            pipe.execute()
    pipe.execute()
    client.hset(keys.list_meta(name, version), mapping=meta)
    previous = _swap(client, name, version, started_at)
    if previous is not None and previous != version:
        expire_version(client, name, previous, grace_s)
    return previous


def _swap(client: SyncClient, name: str, version: str, started_at: float) -> str | None:
    if is_cluster_client(client):
        return _swap_in_steps(client, name, version, started_at)
    before, _ = _entry_parts(name, 0)
    mid = keys.list_entry(name, _SENTINEL, 0).split(_SENTINEL)[1][:-1]
    nearline = keys.list_nearline(name, _SENTINEL).split(_SENTINEL)[1]
    if not keys.list_nearline(name, _SENTINEL).startswith(before):
        raise RuntimeError("keys.list_nearline must share the entry keys' prefix")
    swap = script(client, _SWAP_LUA)
    return _text(
        swap(keys=[keys.list_current(name)], args=[version, before, mid, nearline, started_at])
    )


def _swap_in_steps(client: SyncClient, name: str, version: str, started_at: float) -> str | None:
    """`_SWAP_LUA` on a Redis Cluster, where the entries live in other slots than the pointer:
    carry the nearline entries over, swap, then carry over those the worker wrote into the old
    version meanwhile (it writes into the new one once it sees the swap)."""
    old = current_version(client, name)
    if old == version:
        return old
    if old is not None:
        _carry_nearline(client, name, old, version, started_at)
    client.set(keys.list_current(name), version)
    if old is not None:
        _carry_nearline(client, name, old, version, started_at)
    return old


def _carry_nearline(client: SyncClient, name: str, old: str, new: str, since: float) -> None:
    """Copy the old version's nearline entries made since `since` into the new version,
    unless the new version holds a newer entry for the member."""
    held = cast(set[bytes], client.smembers(keys.list_nearline(name, old)))
    members = sorted(int(m) for m in held)
    for start in range(0, len(members), _PIPELINE_BATCH):
        part = members[start : start + _PIPELINE_BATCH]
        pipe = client.pipeline(transaction=False)
        for m in part:
            pipe.get(keys.list_entry(name, old, m))
            pipe.get(keys.list_entry(name, new, m))
        got = pipe.execute()
        for m, entry, there in zip(part, got[0::2], got[1::2], strict=True):
            made = _created_at(entry)
            if made is not None and made >= since and made > (_created_at(there) or -1.0):
                pipe.set(keys.list_entry(name, new, m), entry)
                pipe.sadd(keys.list_nearline(name, new), m)
        pipe.execute()


def _created_at(entry: bytes | None) -> float | None:
    return None if entry is None or len(entry) < 8 else float(struct.unpack_from("<d", entry)[0])


def expire_version(client: SyncClient, name: str, version: str, ttl_s: int) -> int:
    """Give every key of one version a TTL; returns how many entries were found."""
    count = 0
    pipe = client.pipeline(transaction=False)
    pipe.expire(keys.list_meta(name, version), ttl_s)
    pipe.expire(keys.list_nearline(name, version), ttl_s)
    for key in client.scan_iter(match=_entry_pattern(name, version), count=1000):
        pipe.expire(key, ttl_s)
        count += 1
        if len(pipe) >= _PIPELINE_BATCH:
            pipe.execute()
    pipe.execute()
    return count


def update_lists(
    client: SyncClient,
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
    values = [encode_entry(ids, scores, now, "nearline") for ids, scores in lists]
    pointer = keys.list_current(name)
    if is_cluster_client(client):
        return _update_in_steps(client, name, members, values)
    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(pointer)
                version = _text(pipe.get(pointer))
                if version is None:
                    return None
                pipe.multi()
                _queue_update(pipe, name, version, members, values)
                pipe.execute()
                return version
            except redis.WatchError:
                continue  # a batch swapped the pointer meanwhile: write into the new one


def _update_in_steps(
    client: SyncClient, name: str, members: np.ndarray, values: list[bytes]
) -> str | None:
    """`update_lists` on a Redis Cluster, where no transaction spans the pointer and the
    entries: write into the live version, then again if a swap moved the pointer meanwhile
    (the swap carries what it saw over; this carries what it missed)."""
    version = current_version(client, name)
    while version is not None:
        pipe = client.pipeline(transaction=False)
        _queue_update(pipe, name, version, members, values)
        pipe.execute()
        now = current_version(client, name)
        if now == version:
            return version
        version = now
    return None


def _queue_update(
    pipe: Any, name: str, version: str, members: np.ndarray, values: list[bytes]
) -> None:
    for member, value in zip(members.tolist(), values, strict=True):
        pipe.set(keys.list_entry(name, version, member), value)
    if members.size:
        pipe.sadd(keys.list_nearline(name, version), *members.tolist())


async def read_list(client: RawPipeline | AsyncClient, name: str, member: int) -> StoredList | None:
    """The member's entry in the live version, in one round trip; None when there is none.

    The request path passes a RawPipeline: the same EVALSHA costs a fraction of redis-py's.
    """
    return (await read_list_entry(client, name, member))[1]


async def read_list_entry(
    client: RawPipeline | AsyncClient, name: str, member: int
) -> tuple[str | None, StoredList | None]:
    """The list's live version (None when it was never published) and the member's entry in
    it (None when it has none), in the same one round trip as `read_list`."""
    before, after = _entry_parts(validate_name(name), member)
    args = (keys.list_current(name), before, after)
    try:
        if isinstance(client, ClusterPipeline) or is_cluster_client(client):
            reply = await _read_in_steps(client, name, member)
        elif isinstance(client, RawPipeline):
            reply = await _eval_raw(client, *(a.encode() for a in args))
        else:
            reply = await _eval_redis(client, *args)
    except (RespReplyError, redis.ResponseError) as exc:
        raise ListError(f"list {name!r} could not be read for member {member}: {exc}") from exc
    if not reply:
        return None, None
    version = reply[0].decode()
    if len(reply) < 2 or reply[1] is None:
        return version, None
    ids, scores, created_at, mode = decode_entry(
        reply[1], f"list {name!r} version {version} entry for member {member}"
    )
    return version, StoredList(
        ids=ids,
        scores=scores,
        version=version,
        created_at=created_at,
        age_seconds=max(0.0, time.time() - created_at),
        mode=mode,
    )


async def _read_in_steps(client: RawPipeline | AsyncClient, name: str, member: int) -> Any:
    """`_READ_LUA`'s reply on a Redis Cluster, where the pointer and the entry live in other
    slots: the pointer (a RawPipeline keeps it for POINTER_TTL_S, which the GRACE_S a
    replaced version stays readable covers), then the entry."""
    pointer = keys.list_current(name)
    if isinstance(client, ClusterPipeline):
        version = client.cached(pointer)
        if version is None:
            version = (await client.execute(encode(b"GET", pointer.encode()), 1))[0]
            client.cache(pointer, version, POINTER_TTL_S)
        if version is None:
            return None
        entry_key = keys.list_entry(name, version.decode(), member).encode()
        return [version, (await client.execute(encode(b"GET", entry_key), 1))[0]]
    assert not isinstance(client, RawPipeline)
    version = await cast(Awaitable[Any], client.get(pointer))
    if version is None:
        return None
    return [version, await cast(Awaitable[Any], client.get(
        keys.list_entry(name, version.decode(), member)))]  # fmt: skip


async def _eval_raw(pipe: RawPipeline, *args: bytes) -> Any:
    try:
        return (await pipe.execute(encode(b"EVALSHA", _READ_SHA.encode(), b"1", *args), 1))[0]
    except RespReplyError as exc:
        if "NOSCRIPT" not in str(exc):
            raise
    # Redis restarted or its scripts were flushed: EVAL runs the script and caches it again.
    return (await pipe.execute(encode(b"EVAL", _READ_LUA.encode(), b"1", *args), 1))[0]


async def _eval_redis(client: AsyncClient, *args: str) -> Any:
    try:
        return await cast(Awaitable[Any], client.evalsha(_READ_SHA, 1, *args))
    except redis.exceptions.NoScriptError:
        return await cast(Awaitable[Any], client.eval(_READ_LUA, 1, *args))


def read_lists(
    client: SyncClient, name: str, members: Sequence[int] | np.ndarray
) -> list[StoredList | None]:
    """Many members' entries of the live version with a blocking client (batch jobs, tests);
    None where a member has none."""
    version = current_version(client, name)
    ids = np.asarray(members, dtype=np.int64).tolist()
    if version is None or not ids:
        return [None] * len(ids)
    entry_keys = [keys.list_entry(name, version, m) for m in ids]
    if is_cluster_client(client):
        raw = cast(list[bytes | None], cast(Any, client).mget_nonatomic(entry_keys))
    else:
        raw = cast(list[bytes | None], client.mget(entry_keys))
    now = time.time()
    out: list[StoredList | None] = []
    for member, data in zip(ids, raw, strict=True):
        if data is None:
            out.append(None)
            continue
        where = f"list {name!r} version {version} entry for member {member}"
        e_ids, scores, created_at, mode = decode_entry(data, where)
        out.append(StoredList(e_ids, scores, version, created_at, max(0.0, now - created_at), mode))
    return out
