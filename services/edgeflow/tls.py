"""TLS between edgeflow's processes, from one certificate directory (EDGEFLOW_TLS_DIR).

The directory holds `ca.crt`, `tls.crt` and `tls.key`, the layout of a cert-manager
Certificate's Secret. With it, every gRPC server serves TLS only: the backends and the
nearline worker also require a client certificate signed by the CA (mutual TLS), so only
edgeflow's own processes reach them; the gateway, which edge surfaces call with API keys,
does not. Every client presents the same certificate and checks the server's against the CA.

A server reads the files again when they change (cert-manager renews them in place), so a
renewed certificate is served without a restart; a client channel keeps the files it was made
with, and channels are made per process start.
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
        return tuple(_mtime(self.directory / name) for name in FILES)


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
