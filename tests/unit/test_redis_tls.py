"""rediss:// on every path: a real redis-server that speaks only TLS and asks for client
certificates (openssl-made CA, server and client certificates), reached by redis-py's clients,
the hand-encoded pipelines and Feast, and refused to a client without a certificate."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from certs import HAVE_OPENSSL, make_ca, sign

from edgeflow.build.feast_features import feast_connection_string
from edgeflow.build.synthetic import social_graph, write_edge_list
from edgeflow.local.ports import free_port
from edgeflow.local.redis_server import find_redis_server, quick_client, stop_pid
from edgeflow.stores import redis_client
from edgeflow.stores.resp import RespError, encode
from edgeflow.stores.resp_cluster import open_pipeline

pytestmark = pytest.mark.skipif(not HAVE_OPENSSL, reason="needs openssl")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    make_ca(d)
    sign(d, "server", "IP:127.0.0.1")
    sign(d, "client", None)
    return d


@pytest.fixture(scope="module")
def tls_port(certs: Path) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(certs / "server.crt"), "--tls-key-file", str(certs / "server.key"),
         "--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-auth-clients", "yes",
         "--save", "", "--appendonly", "no", "--dir", str(certs)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = _url(certs, port)
    deadline = time.monotonic() + 20
    while True:
        try:
            redis_client.connect(url).ping()
            break
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out = proc.stdout.read().decode() if proc.stdout else ""
                pytest.skip(f"this redis-server does not serve TLS: {out[-300:]}")
            time.sleep(0.1)
    yield port
    stop_pid(proc.pid)


def _url(certs: Path, port: int, client_cert: bool = True) -> str:
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs / 'ca.crt'}"
    if client_cert:
        url += f"&ssl_certfile={certs / 'client.crt'}&ssl_keyfile={certs / 'client.key'}"
    return url


def test_every_client_speaks_tls(certs: Path, tls_port: int) -> None:
    url = _url(certs, tls_port)
    sync = redis_client.connect(url)
    sync.set("tls:k", b"v")
    assert sync.get("tls:k") == b"v"

    async def run() -> None:
        aio = redis_client.connect_async(url)
        assert await aio.get("tls:k") == b"v"
        await aio.aclose()
        pipe = open_pipeline(url)  # the request path's hand-encoded pipeline
        try:
            got = await pipe.execute(encode(b"GET", b"tls:k") + encode(b"PING"), 2)
            assert got == [b"v", b"PONG"]
        finally:
            await pipe.close()
        # Without a client certificate the server refuses the connection.
        bare = open_pipeline(_url(certs, tls_port, client_cert=False))
        with pytest.raises(RespError, match=f"127.0.0.1:{tls_port}"):
            await bare.execute(encode(b"PING"), 1)
        await bare.close()

    asyncio.run(run())
    with pytest.raises(redis.ConnectionError):
        redis_client.connect(_url(certs, tls_port, client_cert=False)).ping()
    # Plain text to the TLS port gets nowhere either.
    with pytest.raises(redis.ConnectionError):
        quick_client(tls_port, timeout_s=1.0).ping()
    feast = feast_connection_string(url)
    assert f"ssl=true,ssl_ca_certs={certs / 'ca.crt'},ssl_certfile=" in feast


def test_ingest_train_and_offline_over_tls(certs: Path, tls_port: int, tmp_path: Path) -> None:
    """The graph store, Feast's materialisation, the embeddings pointer and the offline job's
    list writes, all through rediss://."""
    edges = tmp_path / "edges.txt"
    write_edge_list(edges, social_graph(members=200, communities=4, seed=3))
    env = dict(os.environ, EDGEFLOW_HOME=str(tmp_path / "home"), REDIS_URL=_url(certs, tls_port))
    for args in (("ingest", "--edges", str(edges)), ("train",),
                 ("offline", "run", "--workflow", "pymk")):  # fmt: skip
        run = subprocess.run([sys.executable, "-m", "edgeflow.cli.main", *args], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, (args, run.stderr[-2000:])
    client = redis_client.connect(_url(certs, tls_port))
    assert client.get("ef:list:pymk:current") is not None
    # Feast's online rows: one HASH per member, keyed by the entity key then the project.
    assert sum(k.endswith(b"edgeflow") for k in client.scan_iter(count=1000)) == 200
