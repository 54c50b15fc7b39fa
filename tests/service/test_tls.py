"""TLS between the services (EDGEFLOW_TLS_DIR), with openssl-made certificates: every
backend refuses a client without a certificate signed by the CA, the gateway serves edge
clients over TLS and reaches the backends with its own certificate, a renewed certificate is
served without a restart, and /healthz answers where Kubernetes' gRPC probe cannot."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import shutil
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from certs import HAVE_OPENSSL, make_ca, secret_dir, sign
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inprocess import Servers, start_backends, start_gateway, stop_all
from world import World, clone

from edgeflow.local.ports import free_port
from edgeflow.shell import metrics, tls
from edgeflow.shell.server import channel
from edgeflow.shell.tls import TlsError, TlsFiles
from edgeflow.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.skipif(not HAVE_OPENSSL, reason="needs openssl")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d)
    sign(d, "edgeflow")  # the services' certificate (cert-manager's tls.crt)
    sign(d, "renewed")  # the same names, signed again: a renewal
    (other := d / "other").mkdir()
    make_ca(other)  # a CA edgeflow does not trust
    sign(other, "stranger")
    (rotated := d / "rotated").mkdir()
    make_ca(rotated)  # the CA edgeflow moves to at the end
    sign(rotated, "edgeflow")
    return d


@dataclasses.dataclass
class TlsSuite:
    ports: dict[str, int]
    tls_dir: Path


@pytest_asyncio.fixture(scope="module")
async def tls_suite(
    tmp_path_factory: pytest.TempPathFactory, suite_world: World, pki: Path
) -> AsyncIterator[TlsSuite]:
    home = tmp_path_factory.mktemp("tls-suite")
    tls_dir = secret_dir(pki, "edgeflow", home / "tls")
    cfg, redis = clone(suite_world, home / "world")
    cfg = dataclasses.replace(cfg, tls_dir=tls_dir, reload_interval_s=0.3)
    servers: Servers = {}
    try:
        cfg, servers = await start_backends(cfg)
        await start_gateway(cfg, servers)
        yield TlsSuite({name: port for name, (_, _, port) in servers.items()}, tls_dir)
    finally:
        await stop_all(servers)
        redis.stop()


def _credentials(pki: Path, who: str | None, ca: Path | None = None) -> grpc.ChannelCredentials:
    root = (ca or pki / "ca.crt").read_bytes()
    if who is None:
        return grpc.ssl_channel_credentials(root)
    d = pki / "other" if who == "stranger" else pki
    return grpc.ssl_channel_credentials(
        root, (d / f"{who}.key").read_bytes(), (d / f"{who}.crt").read_bytes()
    )


async def _health(port: int, creds: grpc.ChannelCredentials | None) -> str:
    """The health status, or the gRPC code the call failed with."""
    addr = f"127.0.0.1:{port}"
    ch = grpc.aio.secure_channel(addr, creds) if creds else grpc.aio.insecure_channel(addr)
    try:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=3
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    finally:
        await ch.close()


async def test_backends_take_only_clients_with_our_certificate(
    tls_suite: TlsSuite, pki: Path
) -> None:
    for name in ("candidates", "features", "scoring", "merging"):
        port = tls_suite.ports[name]
        assert await _health(port, None) == "UNAVAILABLE", name  # plaintext
        assert await _health(port, _credentials(pki, None)) == "UNAVAILABLE", name  # no cert
        assert await _health(port, _credentials(pki, "stranger")) == "UNAVAILABLE", name
        assert await _health(port, _credentials(pki, "edgeflow")) == "SERVING", name


async def test_the_gateway_serves_edge_clients_over_tls(tls_suite: TlsSuite, pki: Path) -> None:
    port = tls_suite.ports["gateway"]
    assert await _health(port, None) == "UNAVAILABLE"  # no plaintext
    # An edge client trusts the CA and has no certificate of its own; the gateway's calls to
    # the backends go over mutual TLS with the suite's certificate.
    ch = grpc.aio.secure_channel(f"127.0.0.1:{port}", _credentials(pki, None))
    try:
        stub = gateway_pb2_grpc.RecommenderStub(ch)
        request = gateway_pb2.RecommendRequest(surface="pymk", member=1, k=5)
        reply = await stub.Recommend(request, timeout=10)
    finally:
        await ch.close()
    assert len(reply.edges) == 5 and not reply.partial, reply
    # A client that trusts another CA does not accept the gateway.
    other = _credentials(pki, None, ca=pki / "other" / "ca.crt")
    assert await _health(port, other) == "UNAVAILABLE"
    # The same through edgeflow's own channel helper (what the CLI and eval use).
    files = TlsFiles.load(tls_suite.tls_dir)
    async with channel(f"127.0.0.1:{port}", tls_files=files) as own:
        got = await health_pb2_grpc.HealthStub(own).Check(health_pb2.HealthCheckRequest())
    assert got.status == health_pb2.HealthCheckResponse.SERVING


def _served_certificate(port: int, ca: Path) -> str:
    """The sha256 of the certificate a new TLS connection to `port` is shown."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


async def test_a_renewed_certificate_is_served_without_a_restart(
    tls_suite: TlsSuite, pki: Path
) -> None:
    port = tls_suite.ports["gateway"]
    before = _served_certificate(port, pki / "ca.crt")
    # cert-manager renews in place: same directory, new files.
    shutil.copyfile(pki / "renewed.crt", tls_suite.tls_dir / "tls.crt")
    shutil.copyfile(pki / "renewed.key", tls_suite.tls_dir / "tls.key")
    for _ in range(50):
        if _served_certificate(port, pki / "ca.crt") != before:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the gateway still serves the old certificate")
    assert await _health(tls_suite.ports["scoring"], _credentials(pki, "edgeflow")) == "SERVING"


def test_a_bad_certificate_directory_is_named(tmp_path: Path, pki: Path) -> None:
    with pytest.raises(TlsError, match=rf"{tmp_path}: cannot read ca\.crt"):
        tls.load(tmp_path)
    secret_dir(pki, "edgeflow", tmp_path)
    (tmp_path / "tls.key").write_text("not a key\n")
    with pytest.raises(TlsError, match=r"tls\.key is not PEM"):
        tls.load(tmp_path)
    assert tls.load(None) is None


def test_healthz_on_the_metrics_port() -> None:
    serving = [False]
    endpoint = metrics.Endpoint("probe", free_port(), "127.0.0.1", healthy=lambda: serving[0])
    url = f"http://127.0.0.1:{endpoint.port}"
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}/healthz", timeout=5)
        assert err.value.code == 503
        serving[0] = True
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as ok:
            assert ok.status == 200 and ok.read() == b"SERVING\n"
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as page:
            assert b"# HELP" in page.read()
    finally:
        endpoint.close()


async def test_a_new_ca_reaches_servers_and_clients_without_a_restart(
    tls_suite: TlsSuite, pki: Path
) -> None:
    """Every file replaced by those of another CA: the backends now take only the new CA's
    certificates, so the gateway's calls to them work only if it renewed its channels too.
    (Last in the module: it moves the suite to the new CA.)"""
    rotated = pki / "rotated"
    secret_dir(rotated, "edgeflow", tls_suite.tls_dir)
    port = tls_suite.ports["gateway"]
    request = gateway_pb2.RecommendRequest(surface="pymk", member=1, k=5)
    reply = None
    for _ in range(100):
        ch = grpc.aio.secure_channel(
            f"127.0.0.1:{port}", _credentials(pki, None, ca=rotated / "ca.crt")
        )
        try:
            reply = await gateway_pb2_grpc.RecommenderStub(ch).Recommend(request, timeout=5)
        except grpc.aio.AioRpcError:
            reply = None  # the gateway still shows the old certificate
        finally:
            await ch.close()
        if reply is not None and not reply.partial:
            break
        await asyncio.sleep(0.1)
    assert reply is not None and len(reply.edges) == 5 and not reply.partial, reply
    # The old CA's certificate is refused everywhere now.
    assert await _health(tls_suite.ports["merging"], _credentials(pki, "edgeflow")) != "SERVING"
