"""Impressions: members shown to a member again and again without an action are demoted,
then suppressed, for a while.

Counting. Each served Recommend response is an exposure (the gateway's exposure stream);
beside its XADD the gateway sends one script per response that adds 1 to each served
target's count in the member's HASH (keys.impressions). A field is "<count>:<unix seconds of
the pair's last exposure>" and counts only while that is under `for_seconds` old, so a
suppressed member (no longer shown, so no longer counted) returns `for_seconds` after it was
last shown. An action on the pair through Publish (connect, dismiss, block, follow) deletes
the field (nearline/events.py).

Memory. One HASH per member that was served, expiring `for_seconds` after the member's last
exposure; each write that finds more than MAX_TARGETS fields deletes the stale ones and then
the oldest, down to half of it. So a member costs at most MAX_TARGETS fields (measured:
about 64 bytes each, 64 KB in all; 22 bytes each below 128 fields), and only while it keeps
being served.

Reading. Merge asks only about its best 2K items, with one HMGET on the member's key, then
about any item a drop or demotion brings into its top K (MergingService._settle_top_k): at
demote_after exposures an item's blended score is multiplied by demote_factor, at
suppress_after it is dropped ("impressions").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeflow.stores import keys
from edgeflow.stores.resp import RawPipeline, encode
from edgeflow.v1 import merging_pb2
from edgeflow.workflow.ops import ImpressionsParams

REASON = "impressions"
MAX_TARGETS = 1000
DAY_S = 86400.0

# KEYS[1] = impressions(member); ARGV = now (whole seconds), lifetime (s), most fields, then
# the targets shown.
_COUNT_LUA = b"""
local now, life, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if #ARGV >= 4 then
  -- One HMGET and one HSET for all the targets (at most MAX_K of them, well within what
  -- unpack takes); a target named twice counts twice.
  local old = redis.call('HMGET', KEYS[1], unpack(ARGV, 4))
  local counted, fields = {}, {}
  for i = 4, #ARGV do
    local target = ARGV[i]
    local n = counted[target]
    if not n then
      n = 0
      local v = old[i - 3]
      if v then
        local c, t = string.match(v, '^(%d+):(%d+)$')
        if c and now - tonumber(t) < life then n = tonumber(c) end
      end
      fields[#fields + 1] = target
    end
    counted[target] = n + 1
  end
  local args = {}
  for _, target in ipairs(fields) do
    args[#args + 1] = target
    args[#args + 1] = string.format('%d:%d', counted[target], now)
  end
  redis.call('HSET', KEYS[1], unpack(args))
end
if redis.call('HLEN', KEYS[1]) > most then
  local all = redis.call('HGETALL', KEYS[1])
  local rows = {}
  for j = 1, #all, 2 do
    rows[#rows + 1] = {all[j], tonumber(string.match(all[j + 1], ':(%d+)$')) or 0}
  end
  table.sort(rows, function(a, b) return a[2] < b[2] end)
  local keep = math.floor(most / 2)
  for j = 1, #rows do
    if #rows - j + 1 > keep or now - rows[j][2] >= life then
      redis.call('HDEL', KEYS[1], rows[j][1])
    end
  end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(life * 1000))
return 0
"""


class ImpressionsError(ValueError):
    """A malformed MergeRequest.impressions; the message names the field."""


@dataclass(frozen=True)
class Rule:
    demote_after: int
    suppress_after: int
    for_seconds: float
    demote_factor: float

    @classmethod
    def of(cls, params: ImpressionsParams) -> Rule:
        return cls(
            params.demote_after, params.suppress_after, params.for_days * DAY_S,
            params.demote_factor,
        )  # fmt: skip

    def message(self) -> merging_pb2.Impressions:
        return merging_pb2.Impressions(
            demote_after=self.demote_after, suppress_after=self.suppress_after,
            for_seconds=self.for_seconds, demote_factor=self.demote_factor,
        )  # fmt: skip

    @classmethod
    def from_request(cls, request: merging_pb2.MergeRequest) -> Rule | None:
        """The request's rule (None: off); raises ImpressionsError naming the field."""
        if not request.HasField("impressions"):
            return None
        msg = request.impressions
        if msg.demote_after < 1:
            raise ImpressionsError(
                f"impressions.demote_after: must be >= 1, got {msg.demote_after}"
            )
        if msg.suppress_after <= msg.demote_after:
            raise ImpressionsError(
                f"impressions.suppress_after: must be greater than demote_after "
                f"({msg.demote_after}), got {msg.suppress_after}"
            )
        if not (math.isfinite(msg.for_seconds) and msg.for_seconds > 0):
            raise ImpressionsError(
                f"impressions.for_seconds: must be a finite number > 0, got {msg.for_seconds}"
            )
        if not 0 <= msg.demote_factor <= 1:
            raise ImpressionsError(
                f"impressions.demote_factor: must be in [0, 1], got {msg.demote_factor}"
            )
        return cls(msg.demote_after, msg.suppress_after, msg.for_seconds, msg.demote_factor)


def count_command(member: int, targets: Sequence[int], now: float, for_seconds: float) -> bytes:
    """The script call that counts one exposure of `targets` to `member` (one reply)."""
    return encode(
        b"EVAL", _COUNT_LUA, b"1", keys.impressions(member).encode(),
        b"%d" % math.floor(now), repr(float(for_seconds)).encode(), b"%d" % MAX_TARGETS,
        *(b"%d" % t for t in targets),
    )  # fmt: skip


def parse(replies: Sequence[bytes | None], now: float, for_seconds: float) -> np.ndarray:
    """Counts (int64) from the HASH's fields; 0 where absent, stale or malformed."""
    out = np.zeros(len(replies), dtype=np.int64)
    for i, value in enumerate(replies):
        if value is None:
            continue
        count, _, when = bytes(value).partition(b":")
        try:
            if now - int(when) < for_seconds:
                out[i] = int(count)
        except ValueError:
            continue
    return out


async def counts(
    client: RawPipeline, member: int, ids: np.ndarray, for_seconds: float, now: float
) -> np.ndarray:
    """How often each of `ids` was shown to `member` within its lifetime, in one HMGET.
    Raises as filters.smismember does."""
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    cmd = encode(b"HMGET", keys.impressions(member).encode(), *(b"%d" % i for i in ids.tolist()))
    [reply] = await client.execute(cmd, 1)
    return parse(reply, now, for_seconds)
