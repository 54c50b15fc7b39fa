"""TLS between edgeflow's processes, from one certificate directory (EDGEFLOW_TLS_DIR).

The directory holds `ca.crt`, `tls.crt` and `tls.key`, the layout of a cert-manager
Certificate's Secret. With it, every gRPC server serves TLS only: the backends and the
nearline worker also require a client certificate signed by the CA (mutual TLS), so only
edgeflow's own processes reach them; the gateway, which edge surfaces call with API keys,
does not. Every client presents the same certificate and checks the server's against the CA.

A server reads the files again when they change (cert-manager renews them in place), so a
renewed certificate is served without a restart. A channel keeps the certificate it was made
with, so the long-lived clients (the gateway's channels to the backends and model servers,
the nearline worker's to features) watch the files with `Renewal` and make new channels when
they change, closing the old ones once calls on them have had time to finish.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("edgeflow.tls")

FILES = ("ca.crt", "tls.crt", "tls.key")


class TlsError(RuntimeError):
    """The certificate directory is unusable; the message names the file."""


@dataclass(frozen=True)
class TlsFiles:
    directory: Path
    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, directory: Path) -> TlsFiles:
        found: list[bytes] = []
        for name in FILES:
            path = directory / name
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise TlsError(
                    f"EDGEFLOW_TLS_DIR {directory}: cannot read {name} ({exc.strerror or exc}); "
                    f"it must hold {', '.join(FILES)}"
                ) from None
            if b"-----BEGIN " not in data:
                raise TlsError(f"EDGEFLOW_TLS_DIR {directory}: {name} is not PEM")
            found.append(data)
        return cls(directory, *found)

    def stamp(self) -> tuple[float, ...]:
        """The files' modification times, to notice a renewal."""
        return stamp(self.directory)


def stamp(directory: Path) -> tuple[float, ...]:
    return tuple(_mtime(directory / name) for name in FILES)


class Renewal:
    """Notices new certificate files for a client: `check()` returns them once per change
    (None while unchanged, TLS is off, or the files are half-written)."""

    def __init__(self, files: TlsFiles | None) -> None:
        self._files = files
        self._stamp = files.stamp() if files is not None else ()

    def check(self) -> TlsFiles | None:
        if self._files is None:
            return None
        now = stamp(self._files.directory)
        if now == self._stamp:
            return None
        try:
            fresh = TlsFiles.load(self._files.directory)
        except TlsError as exc:
            log.warning("client certificate not renewed yet: %s", exc)
            return None
        self._files, self._stamp = fresh, now
        log.info("client channels take the renewed certificate from %s", fresh.directory)
        return fresh


def _mtime(path: Path) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def load(directory: Path | None) -> TlsFiles | None:
    """The certificate directory's files, or None when TLS is off (no directory)."""
    return None if directory is None else TlsFiles.load(directory)


def server_credentials(files: TlsFiles, require_client_cert: bool) -> grpc.ServerCredentials:
    """Credentials that reload the certificate when its files change."""
    current = {"files": files, "stamp": files.stamp()}

    def config(f: TlsFiles) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(f.key, f.cert)], f.ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        stamp = files.stamp()
        if stamp == current["stamp"]:
            return None  # unchanged: keep serving the current one
        try:
            fresh = TlsFiles.load(files.directory)
        except TlsError as exc:  # half-written during a renewal: try again on the next call
            log.warning("certificate not reloaded: %s", exc)
            return None
        current.update(files=fresh, stamp=stamp)
        log.info("serving the renewed certificate from %s", files.directory)
        return config(fresh)

    return grpc.dynamic_ssl_server_credentials(
        config(files), fetch, require_client_authentication=require_client_cert
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(files.ca, files.key, files.cert)
