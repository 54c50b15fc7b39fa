"""Visibility filters: self, connected, blocked, dismissed, followed, deactivated.

They decide what a member may see, so they run before ranking and top-K. The Redis-backed
ones ask only about the candidates, all in one round trip: a pipeline of SMISMEMBER commands
(Redis >= 6.2) against the member's SETs. An item several filters drop is counted once, under
the first of them in request order. `deactivated` is a state of each candidate, not a SET of
the member's: one EXISTS per candidate on its own key (so a Redis Cluster spreads them), which
Merge asks only for the items that reach its top K (see MergingService.merge).

The commands are encoded here with numpy rather than by redis-py, whose pure-Python argument
packing costs about 0.7 ms per command of 1,000 ids; the ids are encoded once for all sets.
They go through a RawPipeline, and the replies (one ":0" or ":1" per id) are read as a byte
matrix whose value bytes are the masks, with no Python object per id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from edgeflow.stores import keys
from edgeflow.stores.resp import BitsReply, RawPipeline
from edgeflow.workflow.ops import SAFETY_FILTERS

# Filter name -> the member's SET of hidden ids (None: decided without a SET of the member's).
_SETS: dict[str, Callable[[int], str] | None] = {
    "self": None,
    "connected": keys.adjacency,
    "blocked": keys.blocked,
    "dismissed": keys.dismissed,
    "followed": keys.follows,
    "deactivated": None,
}
KNOWN: tuple[str, ...] = tuple(_SETS)
DEACTIVATED = "deactivated"
# What every served list goes through, whatever its workflow says.
ALWAYS: tuple[str, ...] = (*SAFETY_FILTERS, DEACTIVATED)


def served(names: Iterable[str]) -> list[str]:
    """The filters of a served list: `names`, then whichever of ALWAYS they lack."""
    return list(dict.fromkeys([*names, *ALWAYS]))


class FilterError(ValueError):
    """An unknown filter name."""


def check(names: Iterable[str], where: str = "filters") -> tuple[str, ...]:
    """Known filter names in request order, without repeats; raises FilterError naming one."""
    out: list[str] = []
    for i, name in enumerate(names):
        if name not in _SETS:
            raise FilterError(f"{where}[{i}]: unknown filter {name!r}; known: {list(KNOWN)}")
        if name not in out:
            out.append(name)
    return tuple(out)


async def visible(
    client: RawPipeline,
    member: int,
    ids: np.ndarray,
    names: Sequence[str],
    why: list[tuple[str, np.ndarray]] | None = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """Keep mask over `ids` and drop counts by filter; `names` must have passed `check`.

    When `why` is a list (explain requests), each filter that hid items appends its name and
    their positions in `ids`, so the items are listed under the filter they are counted under.
    """
    keep = np.ones(ids.size, dtype=bool)
    dropped: dict[str, int] = {}
    if ids.size == 0 or not names:
        return keep, dropped
    remote = [(name, key_of(member)) for name in names if (key_of := _SETS[name]) is not None]
    replies = await smismember(client, [key for _, key in remote], ids) if remote else []
    hidden = dict(zip([name for name, _ in remote], replies, strict=True))
    if DEACTIVATED in names:
        hidden[DEACTIVATED] = await deactivated(client, ids)
    for name in names:
        hit = ids == member if name == "self" else hidden[name]
        newly = hit & keep
        count = int(newly.sum())
        if count:
            dropped[name] = count
            keep &= ~newly
            if why is not None:
                why.append((name, np.flatnonzero(newly)))
    return keep, dropped


async def smismember(
    client: RawPipeline, set_keys: Sequence[str], ids: np.ndarray
) -> list[np.ndarray]:
    """SMISMEMBER of `ids` in each SET, in one pipelined round trip: one bool mask per key.

    Raises RespError when Redis is unreachable and RespReplyError when it refuses a command.
    """
    block = bulk_strings(ids)
    head = b"*%d\r\n$10\r\nSMISMEMBER\r\n" % (ids.size + 2)
    payload = []
    for key in set_keys:
        raw = key.encode()
        payload += [head, b"$%d\r\n%s\r\n" % (len(raw), raw), block]
    shape = _reply_shape(ids.size)
    out = await client.execute_fixed(b"".join(payload), len(set_keys), shape)
    if isinstance(out, np.ndarray):
        # Each reply is "*<n>\r\n" then ":<0|1>\r\n" per id; the digit is the answer.
        start = shape.size - 4 * ids.size + 1
        return list(out[:, start::4] == ord("1"))
    return [np.asarray(rep, dtype=bool) for rep in out]


_EXISTS_HEAD = b"*2\r\n$6\r\nEXISTS\r\n"
_EXISTS_PREFIX = keys.deactivated(0)[:-1].encode()
# The usual reply to one EXISTS: ":0" or ":1".
_EXISTS_SHAPE = BitsReply(b":0\r\n", np.array([0, 1, 0, 0], dtype=np.uint8))


async def deactivated(client: RawPipeline, ids: np.ndarray) -> np.ndarray:
    """Which of `ids` are deactivated: one EXISTS per id on its own key, pipelined (each
    routed to its slot's node on a Redis Cluster). Raises as `smismember` does."""
    if ids.size == 0:
        return np.zeros(0, dtype=bool)
    # Each id once: social proof asks about the same few connections for many items.
    order = np.argsort(ids, kind="stable")
    ranked = ids[order]
    first = np.ones(ids.size, dtype=bool)
    first[1:] = ranked[1:] != ranked[:-1]
    distinct = ranked[first]
    payload = bulk_strings(distinct, head=_EXISTS_HEAD, prefix=_EXISTS_PREFIX)
    out = await client.execute_fixed(payload, distinct.size, _EXISTS_SHAPE)
    found = out[:, 1] == ord("1") if isinstance(out, np.ndarray) else np.asarray(out, dtype=bool)
    answer = np.empty(ids.size, dtype=bool)
    answer[order] = found[np.cumsum(first) - 1]
    return answer


_SHAPES: dict[int, BitsReply] = {}
_SHAPES_MAX = 64


def _reply_shape(n: int) -> BitsReply:
    """The usual reply to an SMISMEMBER of n ids: framing fixed, then ":0" or ":1" per id."""
    shape = _SHAPES.get(n)
    if shape is None:
        head = b"*%d\r\n" % n
        free = np.zeros(len(head) + 4 * n, dtype=np.uint8)
        free[len(head) + 1 :: 4] = 1  # b"0" (0x30) or b"1" (0x31)
        shape = BitsReply(head + b":0\r\n" * n, free)
        if len(_SHAPES) >= _SHAPES_MAX:
            _SHAPES.clear()
        _SHAPES[n] = shape
    return shape


def bulk_strings(ids: np.ndarray, head: bytes = b"", prefix: bytes = b"") -> bytes:
    """RESP bulk strings of the decimal ids ("$<len>\\r\\n<digits>\\r\\n" each), vectorised;
    each preceded by `head` and its digits by `prefix` (a key prefix), when given.

    Each id gets a fixed-width row (head, length, prefix, sign, digits right-aligned); a mask
    keeps the bytes that belong to it, and flattening in row order yields the encoding.
    """
    v = np.asarray(ids, dtype=np.int64)
    if v.size == 0:
        return b""
    neg = v < 0
    mag = np.abs(v).view(np.uint64)  # int64 min wraps to 2**63, exact as uint64
    width = len(str(int(mag.max())))
    h, p = len(head), len(prefix)
    sign = h + 5 + p  # column of the sign; the digits follow
    rows = np.empty((v.size, sign + width + 3), dtype=np.uint8)
    ndig = np.ones(v.size, dtype=np.int64)
    rest = mag
    for j in range(width - 1, -1, -1):  # one pass per digit column, not per id
        rows[:, sign + 1 + j] = 48 + rest % np.uint64(10)
        rest = rest // np.uint64(10)
        ndig += rest != 0
    length = p + ndig + neg
    rows[:, :h] = np.frombuffer(head, dtype=np.uint8)
    rows[:, h] = ord("$")
    rows[:, h + 1] = 48 + length // 10
    rows[:, h + 2] = 48 + length % 10
    rows[:, h + 3], rows[:, h + 4] = 13, 10
    rows[:, h + 5 : sign] = np.frombuffer(prefix, dtype=np.uint8)
    rows[:, sign] = ord("-")
    rows[:, -2], rows[:, -1] = 13, 10
    keep = np.ones(rows.shape, dtype=bool)
    keep[:, h + 1] = length >= 10
    keep[:, sign] = neg
    keep[:, sign + 1 : sign + 1 + width] = np.arange(width) >= (width - ndig)[:, None]
    return rows[keep].tobytes()
