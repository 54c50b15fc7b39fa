"""Member events: validation of Publish requests, the atomic append, and the stream format.

Publish runs one Lua script for the whole request. For each event whose id is new it
updates the keys that decide visibility at request time (the adjacency, blocked, dismissed
and follows SETs, the member's deactivated marker and the SET of deactivated members, and
an action's pair in the member's impression counts) and appends the event to the stream,
so a block or a deactivation is honoured by the next Recommend and the worker sees every
event that changed those keys. A repeated event id changes nothing.

On a Redis Cluster the members' SETs live in other slots than the stream, and no script
spans slots, so the same happens in three steps: new ids are found, their SET changes
(idempotent) are written, then one script over the {events} slot marks each id seen and
appends it. A crash between the steps leaves the id unseen, so the client's retry applies
the same changes again and appends the event: nothing acknowledged is lost, nothing
acknowledged twice.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis

from edgeflow.features.schema import EMBEDDING_DIM, ENTITY_COLUMNS
from edgeflow.stores import keys
from edgeflow.stores.redis_client import AsyncClient, async_script, is_cluster_client
from edgeflow.v1 import gateway_pb2

MAX_EVENTS = 1000
MAX_ID_LENGTH = 128
# An event's time may be at most this far ahead of the gateway's clock (clock skew), and at
# most this far behind it (a replay of old events); the gateway's configuration overrides.
MAX_FUTURE_S = 24 * 3600.0
MAX_AGE_S = 365 * 24 * 3600.0
# How long an event id is remembered for deduplication.
DEDUP_TTL_S = 7 * 24 * 3600
# The stream is capped near this length (an approximate trim, as XADD MAXLEN ~ does it).
STREAM_MAXLEN = 1_000_000

_TYPES = {
    gateway_pb2.MemberEvent.CONNECT: "connect",
    gateway_pb2.MemberEvent.DISCONNECT: "disconnect",
    gateway_pb2.MemberEvent.BLOCK: "block",
    gateway_pb2.MemberEvent.DISMISS: "dismiss",
    gateway_pb2.MemberEvent.FOLLOW: "follow",
    gateway_pb2.MemberEvent.PROFILE_CHANGE: "profile_change",
    gateway_pb2.MemberEvent.DEACTIVATE: "deactivate",
    gateway_pb2.MemberEvent.REACTIVATE: "reactivate",
}
GRAPH_TYPES = ("connect", "disconnect", "block")
# Actions on a (member, target) pair: each resets the pair's impression count.
ACTIONS = ("connect", "dismiss", "block", "follow")
# Events about the member alone: no target, no features.
STATE_TYPES = ("deactivate", "reactivate")
_EMBEDDING = {f"embedding_{j}" for j in range(EMBEDDING_DIM)}

# KEYS[1] = stream, then per event: seen, adj(m), adj(t), blocked(m), blocked(t),
# dismissed(m), follows(m), deactivated(m), impressions(m), the deactivated members' SET.
# ARGV[1..2] = dedup TTL, stream max length, then per event: type, member, target, event id,
# time, features (JSON). Returns an entry id per event, "" where the event id was seen before.
_PUBLISH_LUA = """
local ACTIONS = {connect = true, dismiss = true, block = true, follow = true}
local out = {}
local n = (#ARGV - 2) / 6
for e = 0, n - 1 do
  local k, a = 1 + e * 10, 2 + e * 6
  local typ, m, t = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  if redis.call('SET', KEYS[k + 1], '1', 'NX', 'EX', ARGV[1]) then
    if ACTIONS[typ] then
      redis.call('HDEL', KEYS[k + 9], t)
    end
    if typ == 'connect' then
      redis.call('SADD', KEYS[k + 2], t)
      redis.call('SADD', KEYS[k + 3], m)
    elseif typ == 'disconnect' then
      redis.call('SREM', KEYS[k + 2], t)
      redis.call('SREM', KEYS[k + 3], m)
    elseif typ == 'block' then
      redis.call('SADD', KEYS[k + 4], t)
      redis.call('SADD', KEYS[k + 5], m)
      redis.call('SREM', KEYS[k + 2], t)
      redis.call('SREM', KEYS[k + 3], m)
    elseif typ == 'dismiss' then
      redis.call('SADD', KEYS[k + 6], t)
    elseif typ == 'follow' then
      redis.call('SADD', KEYS[k + 7], t)
    elseif typ == 'deactivate' then
      redis.call('SET', KEYS[k + 8], ARGV[a + 5])
      redis.call('SADD', KEYS[k + 10], m)
    elseif typ == 'reactivate' then
      redis.call('DEL', KEYS[k + 8])
      redis.call('SREM', KEYS[k + 10], m)
    end
    out[e + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*',
      'id', ARGV[a + 4], 'type', typ, 'member', m, 'target', t, 'time', ARGV[a + 5],
      'features', ARGV[a + 6])
  else
    out[e + 1] = ''
  end
end
return out
"""

# The cluster's last step. KEYS[1] = stream, then a seen key per event; ARGV as above.
_APPEND_LUA = """
local out = {}
for e = 0, #KEYS - 2 do
  local a = 2 + e * 6
  if redis.call('SET', KEYS[e + 2], '1', 'NX', 'EX', ARGV[1]) then
    out[e + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*',
      'id', ARGV[a + 4], 'type', ARGV[a + 1], 'member', ARGV[a + 2], 'target', ARGV[a + 3],
      'time', ARGV[a + 5], 'features', ARGV[a + 6])
  else
    out[e + 1] = ''
  end
end
return out
"""


class EventError(ValueError):
    """An invalid event; the message names the field, e.g. events[2].target."""


@dataclass(frozen=True)
class Event:
    id: str
    type: str  # connect, disconnect, block, dismiss, follow, profile_change, (de|re)activate
    member: int
    target: int
    time: float
    features: dict[str, float] = field(default_factory=dict)

    def affected(self) -> tuple[int, ...]:
        """Members whose lists the event changes."""
        if self.type in GRAPH_TYPES:
            return (self.member, self.target)
        return (self.member,)


def from_proto(
    i: int,
    msg: gateway_pb2.MemberEvent,
    now: float,
    max_future_s: float = MAX_FUTURE_S,
    max_age_s: float = MAX_AGE_S,
) -> Event:
    """Validate one event of a Publish request (index `i`)."""
    where = f"events[{i}]"
    kind = _TYPES.get(msg.type)
    if kind is None:
        raise EventError(f"{where}.type: required, one of {', '.join(_TYPES.values())}")
    if msg.member < 0:
        raise EventError(f"{where}.member: must be >= 0, got {msg.member}")
    features = dict(msg.features)
    if kind == "profile_change":
        if not features:
            raise EventError(f"{where}.features: a profile_change carries the new values")
        check_features(features, f"{where}.features")
    else:
        if features:
            raise EventError(f"{where}.features: only a profile_change carries features")
        if kind in STATE_TYPES:
            if msg.target:  # proto3 cannot tell an unset target from member 0
                raise EventError(
                    f"{where}.target: a {kind} is about the member alone and names no target, "
                    f"got {msg.target}"
                )
        elif msg.target < 0:
            raise EventError(f"{where}.target: must be >= 0, got {msg.target}")
        elif msg.target == msg.member:
            raise EventError(f"{where}.target: a member cannot {kind} themselves")
    if len(msg.event_id) > MAX_ID_LENGTH:
        raise EventError(
            f"{where}.event_id: at most {MAX_ID_LENGTH} characters, got {len(msg.event_id)}"
        )
    if not math.isfinite(msg.time) or msg.time < 0:
        raise EventError(f"{where}.time: must be unix seconds >= 0, got {msg.time:.6g}")
    if msg.time and not now - max_age_s <= msg.time <= now + max_future_s:
        raise EventError(
            f"{where}.time: {msg.time:.6g} is {_offset(msg.time - now)} the gateway's clock; "
            f"events may be at most {_offset(max_future_s, 'ahead')} and "
            f"{_offset(-max_age_s, 'behind')} (0: now)"
        )
    return Event(
        id=msg.event_id or uuid.uuid4().hex,
        type=kind,
        member=msg.member,
        target=0 if kind == "profile_change" or kind in STATE_TYPES else msg.target,
        time=msg.time or now,
        features=features,
    )


def _offset(delta_s: float, word: str = "") -> str:
    """A time offset for people: '3.2 days ahead of', or with `word`, '1 day ahead'."""
    size = abs(delta_s)
    if size >= 86400 * 2:
        amount = f"{size / 86400:.4g} days"
    elif size >= 86400:
        amount = "1 day" if size == 86400 else f"{size / 86400:.4g} days"
    else:
        amount = f"{size:.4g} s"
    if word:
        return f"{amount} {word}"
    return f"{amount} {'ahead of' if delta_s > 0 else 'behind'}"


def check_features(features: dict[str, float], where: str) -> None:
    for name, value in features.items():
        if name not in ENTITY_COLUMNS:
            shown = repr(name) if len(name) <= 64 else f"{name[:64]!r}... ({len(name)} characters)"
            raise EventError(
                f"{where}: unknown feature {shown}; expected some of "
                f"{', '.join(ENTITY_COLUMNS[: len(ENTITY_COLUMNS) - EMBEDDING_DIM])} or all of "
                f"embedding_0..embedding_{EMBEDDING_DIM - 1}"
            )
        if not math.isfinite(value):
            raise EventError(f"{where}[{name!r}]: must be finite, got {value}")
    given = _EMBEDDING.intersection(features)
    if given and len(given) != EMBEDDING_DIM:
        raise EventError(
            f"{where}: the embedding changes whole: {len(given)} of {EMBEDDING_DIM} "
            "embedding_* values given"
        )


def parse_request(
    request: gateway_pb2.PublishRequest,
    max_future_s: float = MAX_FUTURE_S,
    max_age_s: float = MAX_AGE_S,
) -> list[Event]:
    n = len(request.events)
    if not 1 <= n <= MAX_EVENTS:
        raise EventError(f"events: between 1 and {MAX_EVENTS} per request, got {n}")
    now = time.time()
    events = [
        from_proto(i, msg, now, max_future_s, max_age_s) for i, msg in enumerate(request.events)
    ]
    ids = [e.id for e in events]
    if len(set(ids)) != n:
        dup = next(x for x in ids if ids.count(x) > 1)
        raise EventError(f"events: event_id {dup!r} appears twice in one request")
    return events


async def publish(client: AsyncClient, events: Sequence[Event]) -> list[str]:
    """Append the events and apply their visibility changes atomically; returns the stream
    entry id of each event, "" for an event id seen before."""
    args: list[str | int | float] = [DEDUP_TTL_S, STREAM_MAXLEN]
    for e in events:
        args += [
            e.type,
            e.member,
            e.target,
            e.id,
            repr(e.time),
            json.dumps(e.features, separators=(",", ":")),
        ]
    if is_cluster_client(client):
        return await _publish_in_steps(client, events, args)
    assert isinstance(client, aioredis.Redis)
    key_list: list[str] = [keys.EVENTS]
    for e in events:
        key_list += [
            keys.event_seen(e.id),
            keys.adjacency(e.member),
            keys.adjacency(e.target),
            keys.blocked(e.member),
            keys.blocked(e.target),
            keys.dismissed(e.member),
            keys.follows(e.member),
            keys.deactivated(e.member),
            keys.impressions(e.member),
            keys.DEACTIVATED_MEMBERS,
        ]
    script = client.register_script(_PUBLISH_LUA)
    reply = cast(list[bytes], await script(keys=key_list, args=args))
    return [bytes(r).decode() for r in reply]


async def _publish_in_steps(
    client: AsyncClient, events: Sequence[Event], args: list[str | int | float]
) -> list[str]:
    """Publish on a Redis Cluster (see the module's docstring)."""
    seen_keys = [keys.event_seen(e.id) for e in events]
    pipe = client.pipeline(transaction=False)
    for k in seen_keys:
        pipe.exists(k)
    fresh = [e for e, hit in zip(events, await pipe.execute(), strict=True) if not hit]
    pipe = client.pipeline(transaction=False)
    for e in fresh:
        _set_changes(pipe, e)
    if len(pipe):
        await pipe.execute()
    script = async_script(client, _APPEND_LUA)
    reply = cast(list[bytes], await script(keys=[keys.EVENTS, *seen_keys], args=args))
    return [bytes(r).decode() for r in reply]


def _set_changes(pipe: Any, e: Event) -> None:
    """The SET writes of one event, as the single-server script makes them."""
    m, t = e.member, e.target
    if e.type in ACTIONS:
        pipe.hdel(keys.impressions(m), t)
    if e.type == "connect":
        pipe.sadd(keys.adjacency(m), t)
        pipe.sadd(keys.adjacency(t), m)
    elif e.type == "disconnect":
        pipe.srem(keys.adjacency(m), t)
        pipe.srem(keys.adjacency(t), m)
    elif e.type == "block":
        pipe.sadd(keys.blocked(m), t)
        pipe.sadd(keys.blocked(t), m)
        pipe.srem(keys.adjacency(m), t)
        pipe.srem(keys.adjacency(t), m)
    elif e.type == "dismiss":
        pipe.sadd(keys.dismissed(m), t)
    elif e.type == "follow":
        pipe.sadd(keys.follows(m), t)
    elif e.type == "deactivate":
        pipe.set(keys.deactivated(m), repr(e.time))
        pipe.sadd(keys.DEACTIVATED_MEMBERS, m)
    elif e.type == "reactivate":
        pipe.delete(keys.deactivated(m))
        pipe.srem(keys.DEACTIVATED_MEMBERS, m)


def from_fields(fields: dict[bytes, bytes]) -> Event:
    """An event as the worker reads it from a stream entry."""
    text = {k.decode(): v.decode() for k, v in fields.items()}
    return Event(
        id=text["id"],
        type=text["type"],
        member=int(text["member"]),
        target=int(text["target"]),
        time=float(text["time"]),
        features={k: float(v) for k, v in json.loads(text.get("features") or "{}").items()},
    )
