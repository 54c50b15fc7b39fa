"""The hand-encoded pipelines of `resp.py` on a Redis Cluster: each command goes to the node
that owns its key's hash slot.

A pipeline's payload is split into its commands (RESP requests are RESP arrays, so hiredis
parses them), the commands are grouped by node, every node's group is sent at once on that
node's own `RawPipeline`, and the replies are put back in the payload's order. A payload
whose commands all live on one node is sent as it is. A node that answers MOVED (the slot
moved) makes the slot map reload and those commands alone go again; ASK (a slot being
migrated) sends them to the named node after ASKING. A node that cannot be reached fails the
call and makes the next one reload the map, so a failover is followed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import hiredis
import numpy as np
from redis.crc import key_slot

from edgeflow.stores.redis_client import SOCKET_TIMEOUT_S, RedisAddress, parse_url
from edgeflow.stores.resp import (
    LOADING_WAIT_S,
    FixedReply,
    RawPipeline,
    RespError,
    RespReplyError,
    _read,
    _read_fixed,
    encode,
)

SLOTS = 16384
_REDIRECT_ROUNDS = 3  # MOVED/ASK answers followed per call before giving up
_KEYLESS = -1
Node = tuple[str, int]


class ClusterPipeline(RawPipeline):
    """`RawPipeline`'s calls, routed by hash slot over the masters of a Redis Cluster."""

    def __init__(
        self, url: str | RedisAddress, size: int = 4, loading_wait_s: float = LOADING_WAIT_S
    ) -> None:
        addr = parse_url(url) if isinstance(url, str) else url
        super().__init__(addr, size, loading_wait_s)
        self._pool_size = size
        self._pipes: dict[Node, RawPipeline] = {}
        self._slot_owner: list[Node] | None = None
        self._refreshing: asyncio.Lock | None = None
        self._kept: dict[str, tuple[float, bytes | None]] = {}

    # ---- small values kept briefly (pointers read on every request) -------------------------
    def cached(self, key: str) -> bytes | None:
        """The value kept for `key`, or None when none is kept or it expired."""
        kept = self._kept.get(key)
        return kept[1] if kept is not None and kept[0] > time.monotonic() else None

    def cache(self, key: str, value: bytes | None, ttl_s: float) -> None:
        if value is not None:
            self._kept[key] = (time.monotonic() + ttl_s, value)

    # ---- the slot map -----------------------------------------------------------------------
    def _pipe(self, node: Node) -> RawPipeline:
        pipe = self._pipes.get(node)
        if pipe is None:
            pipe = RawPipeline(self._addr, self._pool_size, self._loading_wait_s, node=node)
            self._pipes[node] = pipe
        return pipe

    async def _refresh(self) -> list[Node]:
        """Load the slot map from the first node that answers CLUSTER SLOTS."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            known = [*self._pipes, *(n for n in self._addr.nodes if n not in self._pipes)]
            errors: list[str] = []
            for node in known:
                try:
                    reply = (await self._pipe(node).execute(encode(b"CLUSTER", b"SLOTS"), 1))[0]
                except (RespError, RespReplyError) as exc:
                    errors.append(str(exc))
                    continue
                owner = _slot_map(reply, node)
                if owner is not None:
                    self._slot_owner = owner
                    return owner
                errors.append(f"{node[0]}:{node[1]}: the slots are not all served")
            raise RespError(f"{self._addr.describe()}: no slot map ({'; '.join(errors)})")

    async def _owners(self, slots: np.ndarray) -> list[Node]:
        owner = self._slot_owner or await self._refresh()
        return [owner[s] if s != _KEYLESS else owner[0] for s in slots.tolist()]

    # ---- calls ------------------------------------------------------------------------------
    async def execute(
        self, payload: bytes, replies: int, timeout_s: float = SOCKET_TIMEOUT_S
    ) -> list:
        commands = split_commands(payload, replies)
        out = await self._route(commands, None, timeout_s, payload)
        assert isinstance(out, list)
        return self._checked(out)

    async def execute_fixed(
        self, payload: bytes, replies: int, shape: FixedReply, timeout_s: float = SOCKET_TIMEOUT_S
    ) -> np.ndarray | list:
        commands = split_commands(payload, replies)
        out = await self._route(commands, shape, timeout_s, payload)
        return out if isinstance(out, np.ndarray) else self._checked(out)

    async def execute_rows(
        self,
        rows: np.ndarray,
        keys: np.ndarray,
        shape: FixedReply,
        timeout_s: float = SOCKET_TIMEOUT_S,
    ) -> np.ndarray | list:
        """Each master's rows sent at once, as they are. A reply off `shape` (a missing
        value, or MOVED or ASK while slots move) sends the whole call again the general way,
        which parses the commands and follows redirects: they are reads, so that is safe."""
        slots = np.fromiter((key_slot(k.tobytes()) for k in keys), np.int32, keys.shape[0])
        groups: dict[Node, list[int]] = {}
        for i, node in enumerate(await self._owners(slots)):
            groups.setdefault(node, []).append(i)
        try:
            parts = await asyncio.gather(
                *(self._pipe(node)._exchange(rows[idx].tobytes(), _fixed_reader(len(idx), shape),
                                             timeout_s)
                  for node, idx in groups.items())
            )  # fmt: skip
        except RespError:
            self._slot_owner = None  # as _route: the next call reloads the slot map
            raise
        if all(isinstance(part, np.ndarray) for part in parts):
            matrix = np.empty((rows.shape[0], shape.size), dtype=np.uint8)
            for idx, part in zip(groups.values(), parts, strict=True):
                matrix[idx] = part
            return matrix
        return await self.execute_fixed(rows.tobytes(), rows.shape[0], shape, timeout_s)

    async def _route(
        self,
        commands: list[list[bytes]],
        shape: FixedReply | None,
        timeout_s: float,
        payload: bytes | None = None,
        follow: bool = True,
    ) -> np.ndarray | list:
        """Send each command to its slot's owner; `payload`, the commands encoded, is sent as
        it is when one node owns them all."""
        slots = np.fromiter((command_slot(c) for c in commands), np.int32, len(commands))
        nodes = await self._owners(slots)
        groups: dict[Node, list[int]] = {}
        for i, node in enumerate(nodes):
            groups.setdefault(node, []).append(i)
        try:
            if len(groups) == 1 and payload is not None:
                parts = [await self._send(nodes[0], commands, shape, timeout_s, payload=payload)]
            else:
                parts = await asyncio.gather(
                    *(self._send(node, [commands[i] for i in idx], shape, timeout_s)
                      for node, idx in groups.items())
                )  # fmt: skip
        except RespError:
            # A master that cannot be reached may have failed over: the next call reloads
            # the slot map from a node that answers (this one is not sent again: it may
            # have run in part).
            self._slot_owner = None
            raise
        if shape is not None and all(isinstance(p, np.ndarray) for p in parts):
            matrix = np.empty((len(commands), shape.size), dtype=np.uint8)
            for idx, part in zip(groups.values(), parts, strict=True):
                matrix[idx] = part
            return matrix
        replies: list = [None] * len(commands)
        for idx, part in zip(groups.values(), parts, strict=True):
            for i, rep in zip(idx, _as_list(part), strict=True):
                replies[i] = rep
        return await self._follow_redirects(commands, replies, timeout_s) if follow else replies

    async def _send(
        self, node: Node, commands: Sequence[list[bytes]], shape: FixedReply | None,
        timeout_s: float, asking: bool = False, payload: bytes | None = None,
    ) -> np.ndarray | list:  # fmt: skip
        """Send commands to one node; raw replies, errors included."""
        if payload is None:
            prefix = encode(b"ASKING") if asking else b""
            payload = b"".join(prefix + encode(*c) for c in commands)
        count = len(commands) * (2 if asking else 1)
        if shape is not None and not asking:
            return await self._pipe(node)._exchange(
                payload, lambda r: _read_fixed(r, count, shape), timeout_s
            )
        out = await self._pipe(node)._exchange(
            payload, lambda r: _read(r, hiredis.Reader(), count), timeout_s
        )
        return out[1::2] if asking else out

    async def _follow_redirects(
        self, commands: list[list[bytes]], replies: list, timeout_s: float
    ) -> list:
        for _ in range(_REDIRECT_ROUNDS):
            moved: list[int] = []
            asked: dict[Node, list[int]] = {}
            for i, rep in enumerate(replies):
                if isinstance(rep, hiredis.ReplyError):
                    text = str(rep)
                    if text.startswith("MOVED "):
                        moved.append(i)
                    elif text.startswith("ASK "):
                        asked.setdefault(_redirect_node(text), []).append(i)
            if not moved and not asked:
                return replies
            if moved:
                await self._refresh()
                again = await self._route(
                    [commands[i] for i in moved], None, timeout_s, follow=False
                )
                for i, rep in zip(moved, _as_list(again), strict=True):
                    replies[i] = rep
            for node, idx in asked.items():
                part = await self._send(node, [commands[i] for i in idx], None, timeout_s, True)
                for i, rep in zip(idx, _as_list(part), strict=True):
                    replies[i] = rep
        raise RespError(f"{self._addr.describe()}: slots kept moving during a call")

    async def close(self) -> None:
        for pipe in self._pipes.values():
            await pipe.close()
        await super().close()


def open_pipeline(url: str, size: int = 4) -> RawPipeline:
    """A RawPipeline for the URL's Redis: routed by slot for a redis+cluster:// URL."""
    addr = parse_url(url)
    return ClusterPipeline(addr, size) if addr.cluster else RawPipeline(addr, size)


def _fixed_reader(
    count: int, shape: FixedReply
) -> Callable[[asyncio.StreamReader], Awaitable[np.ndarray | list]]:
    return lambda reader: _read_fixed(reader, count, shape)


def split_commands(payload: bytes, count: int) -> list[list[bytes]]:
    """The commands of an encoded pipeline (each a list of its arguments)."""
    reader = hiredis.Reader()
    reader.feed(payload)
    out = []
    for _ in range(count):
        command = reader.gets()
        if not isinstance(command, list):
            raise ValueError(f"pipeline payload holds fewer than {count} commands")
        out.append(command)
    if reader.gets() is not False:
        raise ValueError(f"pipeline payload holds more than {count} commands")
    return out


def command_slot(command: list[bytes]) -> int:
    """The hash slot of a command's key; -1 for a command without one."""
    name = command[0].upper()
    if name in (b"EVALSHA", b"EVAL", b"EVALSHA_RO", b"EVAL_RO"):
        return key_slot(command[3]) if int(command[2]) > 0 else _KEYLESS
    return key_slot(command[1]) if len(command) > 1 else _KEYLESS


def _slot_map(reply: object, asked: Node) -> list[Node] | None:
    """Owner of every slot from a CLUSTER SLOTS reply; None while some slot has none."""
    owner: list[Node | None] = [None] * SLOTS
    if not isinstance(reply, list):
        return None
    for start, end, master, *_ in reply:
        host = master[0].decode() or asked[0]  # an empty host means the node asked
        for s in range(int(start), int(end) + 1):
            owner[s] = (host, int(master[1]))
    if any(o is None for o in owner):
        return None
    return [o for o in owner if o is not None]


def _redirect_node(error: str) -> Node:
    """The node of a "MOVED <slot> <host>:<port>" or "ASK ..." error."""
    host, _, port = error.split()[2].rpartition(":")
    return host, int(port)


def _as_list(part: np.ndarray | list) -> list:
    """Replies as parsed objects: a byte matrix's rows are whole replies, so hiredis reads
    them back."""
    if isinstance(part, list):
        return part
    reader = hiredis.Reader()
    reader.feed(part.tobytes())
    return [reader.gets() for _ in range(part.shape[0])]
