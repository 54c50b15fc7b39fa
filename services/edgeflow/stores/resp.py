"""Hand-encoded Redis pipelines on a connection of their own, replies parsed by hiredis.

redis-py spends most of a 500-command pipeline packing arguments and awaiting one reply at a
time. The hot paths know their commands' exact shape, so they encode them with numpy and
read every reply from one buffer here. When they also know the exact bytes of their usual
replies (`FixedReply`), the replies come back as one byte matrix, with no Python object per
value; anything else is parsed by hiredis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import hiredis
import numpy as np

from edgeflow.stores.redis_client import (
    CONNECT_TIMEOUT_S,
    SOCKET_TIMEOUT_S,
    RedisAddress,
    parse_url,
)

_READ_CHUNK = 1 << 16
T = TypeVar("T")
# A Redis that is still loading its data set answers every command "-LOADING ...". A call
# waits this long for it (resending, with backoff) before it gives up with RespLoading.
LOADING_WAIT_S = 0.5
_LOADING_FIRST_DELAY_S = 0.01
_LOADING_MAX_DELAY_S = 0.1


class RespError(ConnectionError):
    """Redis could not be reached or stopped answering."""


class RespLoading(RespError):
    """Redis is still loading its data set (a restart): unavailable for now, not an error of
    the request, so callers map it like any other RespError (UNAVAILABLE)."""

    def __init__(self, message: str, resendable: bool = False) -> None:
        super().__init__(message)
        self.resendable = resendable  # every reply was LOADING: none of the commands ran


class RespReplyError(RuntimeError):
    """Redis answered a command with an error (WRONGTYPE, NOAUTH, ...)."""


class FixedReply:
    """The usual bytes of every reply of a pipeline: `template`, where `mask` marks the bytes
    that must match it (RESP framing, value tags); the other bytes are values."""

    def __init__(self, template: bytes, mask: np.ndarray) -> None:
        if len(template) != mask.size:
            raise ValueError(f"template is {len(template)} bytes but the mask {mask.size}")
        self.size = len(template)
        self._template = np.frombuffer(template, dtype=np.uint8)
        self._fixed = np.flatnonzero(mask)
        self._expected = self._template[self._fixed]

    def matches(self, data: np.ndarray, first_row: int = 0) -> bool:
        """Whether `data` (replies from row 0, the last one maybe partial) has the usual bytes
        from `first_row` on. Matching framing proves a whole reply: RESP is self-delimiting."""
        full = data.size // self.size
        rows = data[first_row * self.size : full * self.size].reshape(-1, self.size)
        if not (rows[:, self._fixed] == self._expected).all():
            return False
        tail = data[full * self.size :]
        fixed = self._fixed[self._fixed < tail.size]
        return bool((tail[fixed] == self._template[fixed]).all())


class BitsReply(FixedReply):
    """A FixedReply whose value bytes may differ from the template only in the bits set in
    `free` (one uint8 per byte, 0 for framing), such as the b"0"/b"1" of an integer flag
    (free bit 0x01): checked with one XOR over the bytes instead of a gather."""

    def __init__(self, template: bytes, free: np.ndarray) -> None:
        super().__init__(template, free == 0)
        self._keep = ~np.asarray(free, dtype=np.uint8)

    def matches(self, data: np.ndarray, first_row: int = 0) -> bool:
        part = data[first_row * self.size :]
        full = part.size // self.size
        rows = part[: full * self.size].reshape(full, self.size)
        if ((rows ^ self._template) & self._keep).any():
            return False
        tail = part[full * self.size :]
        return not ((tail ^ self._template[: tail.size]) & self._keep[: tail.size]).any()


class RawPipeline:
    """A small pool of dedicated connections to one Redis server, one pipeline in flight on
    each. `open_pipeline` makes the cluster variant for a redis+cluster:// URL."""

    def __init__(
        self,
        url: str | RedisAddress,
        size: int = 4,
        loading_wait_s: float = LOADING_WAIT_S,
        node: tuple[str, int] | None = None,
    ) -> None:
        addr = parse_url(url) if isinstance(url, str) else url
        self._addr = addr
        self._host, self._port = node or addr.nodes[0]
        self._password = addr.password
        self._user = addr.username
        self._db = addr.db
        self._tls = addr.tls_context()
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._size = size
        self._loading_wait_s = loading_wait_s

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self._host, self._port, ssl=self._tls), CONNECT_TIMEOUT_S
        )
        hello: list[bytes] = []
        if self._password is not None:
            args = [self._user, self._password] if self._user else [self._password]
            hello.append(encode(b"AUTH", *(a.encode() for a in args)))
        if self._db:
            hello.append(encode(b"SELECT", str(self._db).encode()))
        if hello:
            writer.write(b"".join(hello))
            for rep in await _read(reader, hiredis.Reader(), len(hello)):
                if isinstance(rep, hiredis.ReplyError):
                    writer.close()
                    raise RespReplyError(f"Redis at {self._host}:{self._port}: {rep}")
        return reader, writer

    async def execute(
        self, payload: bytes, replies: int, timeout_s: float = SOCKET_TIMEOUT_S
    ) -> list:
        """Send encoded commands and return their `replies` replies, in order."""

        def send() -> Awaitable[list]:
            return self._exchange(
                payload, lambda reader: _read(reader, hiredis.Reader(), replies), timeout_s
            )

        try:
            return self._checked(await send())
        except RespLoading as exc:
            out = await self._resend_while_loading(exc, send)
        assert isinstance(out, list)
        return out

    async def execute_fixed(
        self, payload: bytes, replies: int, shape: FixedReply, timeout_s: float = SOCKET_TIMEOUT_S
    ) -> np.ndarray | list:
        """Like `execute`, but when every reply has `shape`'s usual bytes, the replies as one
        (replies, shape.size) uint8 matrix."""

        def send() -> Awaitable[np.ndarray | list]:
            return self._exchange(
                payload, lambda reader: _read_fixed(reader, replies, shape), timeout_s
            )

        out = await send()
        if isinstance(out, np.ndarray):
            return out
        try:
            return self._checked(out)
        except RespLoading as exc:
            return await self._resend_while_loading(exc, send)

    async def execute_rows(
        self,
        rows: np.ndarray,
        keys: np.ndarray,
        shape: FixedReply,
        timeout_s: float = SOCKET_TIMEOUT_S,
    ) -> np.ndarray | list:
        """`execute_fixed` of read-only commands given as the rows of a uint8 matrix (one
        encoded command a row, all as long), with each command's key as a row of `keys`: a
        Redis Cluster routes the rows by key without parsing them back into commands."""
        return await self.execute_fixed(rows.tobytes(), rows.shape[0], shape, timeout_s)

    async def _resend_while_loading(
        self, first: RespLoading, send: Callable[[], Awaitable[np.ndarray | list]]
    ) -> np.ndarray | list:
        """Send again, with backoff, while Redis answers that it is still loading its data
        (every reply LOADING, so none of the commands ran), for up to the loading wait;
        then raise RespLoading."""
        deadline = time.monotonic() + self._loading_wait_s
        delay = _LOADING_FIRST_DELAY_S
        exc = first
        while exc.resendable and time.monotonic() + delay <= deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _LOADING_MAX_DELAY_S)
            out = await send()
            if isinstance(out, np.ndarray):
                return out
            try:
                return self._checked(out)
            except RespLoading as again:
                exc = again
        raise exc

    async def _exchange(
        self,
        payload: bytes,
        read: Callable[[asyncio.StreamReader], Awaitable[T]],
        timeout_s: float,
    ) -> T:
        conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = await self._connect()
            reader, writer = conn
            writer.write(payload)
            async with asyncio.timeout(timeout_s):  # unlike wait_for, no task per call
                out = await read(reader)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, hiredis.ProtocolError) as exc:
            if conn is not None:
                conn[1].close()  # replies may be left unread: never reuse this connection
            raise RespError(
                f"Redis at {self._host}:{self._port}: {exc or type(exc).__name__}"
            ) from exc
        except BaseException:
            if conn is not None:
                conn[1].close()
            raise
        if len(self._idle) < self._size:
            self._idle.append(conn)
        else:
            writer.close()
        return out

    def _checked(self, replies: list) -> list:
        loading = 0
        for rep in replies:
            if isinstance(rep, hiredis.ReplyError):
                if str(rep).startswith("LOADING"):
                    loading += 1
                    continue
                raise RespReplyError(f"Redis at {self._host}:{self._port} answered: {rep}")
        if loading:
            raise RespLoading(
                f"Redis at {self._host}:{self._port} is still loading its data set (LOADING)",
                loading == len(replies),
            )
        return replies

    async def close(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _read(reader: asyncio.StreamReader, parser: hiredis.Reader, count: int) -> list:
    """`count` replies, starting with any the parser already holds."""
    out: list = []
    while True:
        while len(out) < count:
            reply = parser.gets()
            if reply is False:
                break
            out.append(reply)
        if len(out) == count:
            return out
        chunk = await reader.read(_READ_CHUNK)
        if not chunk:
            raise asyncio.IncompleteReadError(b"", None)
        parser.feed(chunk)


async def _read_fixed(
    reader: asyncio.StreamReader, count: int, shape: FixedReply
) -> np.ndarray | list:
    """`count` replies as a byte matrix while every byte so far is as usual; from the first
    unusual one, hiredis parses them all."""
    size = count * shape.size
    buf = bytearray()
    checked = 0  # rows already found usual
    while len(buf) < size:
        chunk = await reader.read(_READ_CHUNK)
        if not chunk:
            raise asyncio.IncompleteReadError(b"", None)
        buf += chunk
        data = np.frombuffer(buf, dtype=np.uint8)
        if data.size > size or not shape.matches(data, checked):
            del data  # a bytearray with a live view cannot grow
            parser = hiredis.Reader()
            parser.feed(bytes(buf))
            return await _read(reader, parser, count)
        checked = data.size // shape.size
        del data
    return np.frombuffer(buf, dtype=np.uint8).reshape(count, shape.size)


def encode(*parts: bytes) -> bytes:
    """One command in RESP."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
