"""Redis clients with short timeouts, so Redis going away fails a call fast, never hangs it.

A REDIS_URL names either one server (`redis://[user:pass@]host:port/db`) or a Redis Cluster
(`redis+cluster://[user:pass@]host:port[,host:port...]`, any of its masters; the rest are
discovered). `rediss://` and `rediss+cluster://` are the same over TLS, verified against the
system's CAs or `?ssl_ca_certs=FILE`, with `&ssl_certfile=FILE&ssl_keyfile=FILE` for a
server that asks for client certificates (`tls-auth-clients yes`). Every client of
edgeflow is made here or in `resp.py` / `resp_cluster.py`, from the URL alone, so the URL is
the one setting that says which kind of Redis a suite runs on.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast
from urllib.parse import parse_qs, unquote

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript, Script
from redis.retry import Retry

CONNECT_TIMEOUT_S = 0.5
SOCKET_TIMEOUT_S = 2.0
# A request-path call retries a refused connection, or a Redis still loading its data set
# (BusyLoadingError, "-LOADING"), 4 times over about 0.5 s, then fails (callers answer
# UNAVAILABLE). redis-py's own default waits up to 10 s per retry, and also retries a
# timeout, which would multiply SOCKET_TIMEOUT_S.
RETRIES = 4
RETRY_BACKOFF = ExponentialBackoff(cap=0.2, base=0.025)  # 0.05, 0.1, 0.2, 0.2 s

CLUSTER_SCHEME = "redis+cluster"
_SCHEMES = {  # scheme -> (cluster, TLS)
    "": (False, False),
    "redis": (False, False),
    "rediss": (False, True),
    CLUSTER_SCHEME: (True, False),
    "rediss+cluster": (True, True),
}

# Either kind of client: single-server code paths and cluster code paths take the same calls,
# except that a cluster refuses keys of different slots in one script or multi-key command.
SyncClient: TypeAlias = "redis.Redis | redis.cluster.RedisCluster"
AsyncClient: TypeAlias = "aioredis.Redis | aiocluster.RedisCluster"


@dataclass(frozen=True)
class RedisAddress:
    """A parsed REDIS_URL: its nodes (one for a single server), credentials and database."""

    nodes: tuple[tuple[str, int], ...]
    cluster: bool
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line
    db: int = 0
    ca_certs: str | None = None  # TLS: the CA bundle that signed the server's certificate
    certfile: str | None = None  # TLS: this client's certificate and key, when asked for
    keyfile: str | None = None

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context of a rediss:// URL, for connections made by hand."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.ca_certs)
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        return context

    @property
    def where(self) -> str:
        """host:port of every node named (never the credentials)."""
        return ",".join(f"{h}:{p}" for h, p in self.nodes)

    def describe(self) -> str:
        return f"Redis Cluster at {self.where}" if self.cluster else f"Redis at {self.where}"


def parse_url(url: str) -> RedisAddress:
    """Parse a REDIS_URL; a ValueError says what is wrong with it."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if scheme not in _SCHEMES:
        raise ValueError(
            f"REDIS_URL {url!r}: scheme {scheme!r} is not supported; use redis[s]://host:port/db "
            f"or redis[s]+cluster://host:port[,host:port...]"
        )
    cluster, tls = _SCHEMES[scheme]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    creds, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pwd = creds.partition(":")
        username, password = (
            (unquote(user) or None, unquote(pwd)) if colon else (None, unquote(user))
        )
    nodes = tuple(_host_port(part, url) for part in hosts.split(",") if part)
    if not nodes:
        nodes = (("127.0.0.1", 6379),)
    if len(nodes) > 1 and not cluster:
        raise ValueError(f"REDIS_URL {url!r}: several hosts need {CLUSTER_SCHEME}://")
    tls_files = _tls_files(query, url)
    if tls_files and not tls:
        raise ValueError(f"REDIS_URL {url!r}: TLS files need rediss:// or rediss+cluster://")
    db_text = path or "0"
    if not db_text.isdigit():
        raise ValueError(f"REDIS_URL {url!r}: database {db_text!r} must be a number")
    db = int(db_text)
    if cluster and db:
        raise ValueError(f"REDIS_URL {url!r}: a Redis Cluster has only database 0")
    return RedisAddress(nodes, cluster, tls, username, password, db, **tls_files)


_TLS_PARAMS = {"ssl_ca_certs": "ca_certs", "ssl_certfile": "certfile", "ssl_keyfile": "keyfile"}


def _tls_files(query: str, url: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if name not in _TLS_PARAMS:
            raise ValueError(
                f"REDIS_URL {url!r}: parameter {name!r} is not supported; use "
                + ", ".join(_TLS_PARAMS)
            )
        out[_TLS_PARAMS[name]] = values[-1]
    return out


def _host_port(part: str, url: str) -> tuple[str, int]:
    host, colon, port = part.rpartition(":")
    if not colon:
        return part, 6379
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"REDIS_URL {url!r}: port {port!r} of {part!r} is not a port")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_cluster(url: str) -> bool:
    return parse_url(url).cluster


def cluster_url(nodes: list[tuple[str, int]], tls: bool = False) -> str:
    scheme = "rediss+cluster" if tls else CLUSTER_SCHEME
    return f"{scheme}://" + ",".join(f"{h}:{p}" for h, p in nodes)


def _common(addr: RedisAddress) -> dict[str, Any]:
    out: dict[str, Any] = {"username": addr.username, "password": addr.password}
    if addr.tls:
        out.update(ssl=True, ssl_ca_certs=addr.ca_certs, ssl_certfile=addr.certfile,
                   ssl_keyfile=addr.keyfile)  # fmt: skip
    return out


def connect_async(url: str) -> AsyncClient:
    addr = parse_url(url)
    retry = AsyncRetry(RETRY_BACKOFF, RETRIES, supported_errors=(redis.ConnectionError,))
    timeouts: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "health_check_interval": 0,
    }
    if addr.cluster:
        return aiocluster.RedisCluster(
            startup_nodes=[aiocluster.ClusterNode(h, p) for h, p in addr.nodes],
            retry=retry,
            **_common(addr),
            **timeouts,
        )
    host, port = addr.nodes[0]
    return aioredis.Redis(
        host=host, port=port, db=addr.db, retry=retry, **_common(addr), **timeouts
    )


def connect(url: str, socket_timeout_s: float = 30.0) -> SyncClient:
    """A blocking client for the CLI and batch jobs (longer timeout for bulk writes)."""
    addr = parse_url(url)
    timeouts: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": socket_timeout_s,
    }
    if addr.cluster:
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in addr.nodes],
            retry=Retry(RETRY_BACKOFF, RETRIES),
            **_common(addr),
            **timeouts,
        )
    host, port = addr.nodes[0]
    return redis.Redis(host=host, port=port, db=addr.db, **_common(addr), **timeouts)


def is_cluster_client(client: object) -> bool:
    return isinstance(client, (redis.cluster.RedisCluster, aiocluster.RedisCluster))


def script(client: SyncClient, lua: str) -> Script:
    """A Lua script on either kind of client (EVALSHA, loading it on NOSCRIPT). On a cluster
    its keys must share a slot."""
    return Script(cast(Any, client), lua)


def async_script(client: AsyncClient, lua: str) -> AsyncScript:
    return AsyncScript(cast(Any, client), lua)


def cluster_hmget(
    client: redis.cluster.RedisCluster, keys: list[bytes], fields: list[Any]
) -> list[list[bytes | None]]:
    """HMGET `fields` of every key, in key order, on a cluster whose keys are spread over
    many slots (Feast's entity hashes): one plain pipeline per master, the keys routed with
    the client's slot map. redis-py's cluster pipeline spends about 50 µs routing each
    command, which made a batch of a few thousand rows cost a quarter of a second. A slot
    that moved (MOVED, ASK) or a master that went away runs the whole read again through
    the cluster pipeline, which follows redirects and reloads the map."""
    from redis.crc import key_slot

    slots = client.nodes_manager.slots_cache
    groups: dict[str, tuple[redis.cluster.ClusterNode, list[int]]] = {}
    try:
        for i, key in enumerate(keys):
            node = slots[key_slot(key)][0]
            groups.setdefault(node.name, (node, []))[1].append(i)
        out: list[list[bytes | None]] = [[] for _ in keys]
        for node, index in groups.values():
            conn = client.get_redis_connection(node)
            with conn.pipeline(transaction=False) as pipe:
                for i in index:
                    pipe.hmget(cast(Any, keys[i]), fields)
                for i, reply in zip(index, pipe.execute(), strict=True):
                    out[i] = reply
        return out
    except (KeyError, IndexError, redis.ResponseError, redis.ConnectionError, redis.TimeoutError):
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(cast(Any, key), fields)
            return cast(list[list[bytes | None]], pipe.execute())
