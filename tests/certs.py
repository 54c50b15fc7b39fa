"""openssl-made certificates for the TLS tests: a CA, and certificates it signs for
127.0.0.1 and localhost, written in a cert-manager Secret's layout when asked."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

HAVE_OPENSSL = shutil.which("openssl") is not None


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca(d: Path) -> None:
    """ca.key and ca.crt in `d`."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "ca.key",
             "-out", d / "ca.crt", "-days", "1", "-subj", "/CN=edgeflow test CA")  # fmt: skip


def sign(d: Path, name: str, san: str | None = "IP:127.0.0.1,DNS:localhost") -> None:
    """`name`.key and `name`.crt in `d`, signed by the CA in `d`."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", d / f"{name}.key",
             "-out", d / f"{name}.csr", "-subj", f"/CN={name}")  # fmt: skip
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.crt", "-CAkey",
             d / "ca.key", "-CAcreateserial", "-days", "1", "-out", d / f"{name}.crt",
             "-extfile", ext)  # fmt: skip


def secret_dir(d: Path, name: str, into: Path) -> Path:
    """A cert-manager Secret's layout (ca.crt, tls.crt, tls.key) for `name` in `into`."""
    into.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(d / "ca.crt", into / "ca.crt")
    shutil.copyfile(d / f"{name}.crt", into / "tls.crt")
    shutil.copyfile(d / f"{name}.key", into / "tls.key")
    return into
