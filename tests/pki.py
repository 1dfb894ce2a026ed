"""Throwaway certificates for the TLS tests, made with the ``openssl`` command line tool.

Imported as a top-level module (``from pki import make_ca``), like ``broker.py``. Real files from the real
tool, so a test exercises what a user's certificates go through; ``make test`` installs openssl.
EC P-256 keys (fast to make), valid for two days.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command line tool is needed to make the test certificates: apt-get install -y openssl")
    res = subprocess.run(["openssl", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"openssl {' '.join(args)} failed:\n{res.stderr}"


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: ``(key, certificate)`` as ``{d}/{name}.key`` and ``{d}/{name}.crt``."""
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", f"/CN=sensord test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=d)
    return key, crt


def make_cert(d: Path, name: str, ca_key: Path, ca_crt: Path, usage: str = "serverAuth") -> tuple[Path, Path]:
    """A leaf certificate signed by the CA: ``(key, certificate)`` as ``{d}/{name}.key`` / ``.crt``.

    ``usage`` ``serverAuth`` for 127.0.0.1 and localhost, ``clientAuth`` for a client certificate.
    """
    key, csr, crt, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt", d / f"{name}.ext"
    ext.write_text(("subjectAltName = IP:127.0.0.1, DNS:localhost\n" if usage == "serverAuth" else "")
                   + "basicConstraints = critical, CA:FALSE\n"
                   "keyUsage = critical, digitalSignature, keyEncipherment\n"
                   f"extendedKeyUsage = {usage}\n"
                   "subjectKeyIdentifier = hash\n"
                   "authorityKeyIdentifier = keyid\n")
    cn = "127.0.0.1" if usage == "serverAuth" else name
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}", cwd=d)
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(crt), "-days", "2", "-extfile", str(ext), cwd=d)
    return key, crt


def make_server_cert(d: Path, ca_key: Path, ca_crt: Path) -> tuple[Path, Path]:
    """``server.key`` / ``server.crt`` for 127.0.0.1 and localhost."""
    return make_cert(d, "server", ca_key, ca_crt)
