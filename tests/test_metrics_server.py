"""Unit tests of the /metrics HTTP endpoint: idle connections time out, a connection cap (issue 14); TLS and
basic auth from a web config (issue 7), over real HTTPS with certificates made by openssl."""

from __future__ import annotations

import base64
import http.client
import logging
import shutil
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from conftest import Pki
from e2e_support import wait_until

from sensord.metrics import DaemonMetrics
from sensord.webconfig import load_web_config


@pytest.fixture
def served() -> Iterator[tuple[DaemonMetrics, int]]:
    m = DaemonMetrics()
    port = m.serve("127.0.0.1", 0, timeout=0.5, max_connections=2)
    try:
        yield m, port
    finally:
        m.shutdown()


def closed_by_server(s: socket.socket) -> bool:
    s.settimeout(20)  # generous: the server closes long before, or the test fails here
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_idle_connections_are_closed_and_over_the_cap_refused(served: tuple[DaemonMetrics, int]) -> None:
    m, port = served
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(6)]
    try:
        assert all(closed_by_server(s) for s in socks)
    finally:
        for s in socks:
            s.close()
    assert m.registry.get_sample_value("sensord_metrics_connections_rejected_total") >= 1
    assert "sensord_messages_received_total" in scrape(port)


def test_a_half_sent_request_times_out(served: tuple[DaemonMetrics, int]) -> None:
    _, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        assert closed_by_server(s)
    assert "sensord_threshold" in scrape(port)


# -- TLS and basic auth (metrics.web_config_file), over real HTTPS with openssl-made certificates ---------

PASSWORD = "s3cret"


@pytest.fixture(scope="module")
def prometheus_hash() -> str:
    return bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


@pytest.fixture
def serve_web(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., tuple[DaemonMetrics, int]]]:
    """Start a metrics endpoint with the web config ``doc`` (cert paths relative to it, as a user writes them)."""
    for src, name in ((pki.server_crt, "metrics.crt"), (pki.server_key, "metrics.key"), (pki.ca, "clients-ca.crt")):
        shutil.copy(src, tmp_path / name)
    started: list[DaemonMetrics] = []

    def start(doc: dict[str, Any], timeout: float = 5.0, max_connections: int = 4) -> tuple[DaemonMetrics, int]:
        path = tmp_path / "web.yml"
        path.write_text(yaml.safe_dump(doc))
        m = DaemonMetrics()
        started.append(m)
        return m, m.serve("127.0.0.1", 0, timeout=timeout, max_connections=max_connections,
                          web=load_web_config(path))
    yield start
    for m in started:
        m.shutdown()


TLS = {"cert_file": "metrics.crt", "key_file": "metrics.key"}


def client_context(pki: Pki, cert: tuple[Path, Path] | None = None,
                   max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """What Prometheus does with ``tls_config: {ca_file, cert_file, key_file}``: verify the server by the CA."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def get(url: str, ctx: ssl.SSLContext | None = None, auth: tuple[str, str] | None = None) -> tuple[int, dict[str, str],
                                                                                                   str]:
    req = urllib.request.Request(url)
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def value(m: DaemonMetrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_https_with_basic_auth_right_wrong_and_no_credentials(
        serve_web: Callable[..., tuple[DaemonMetrics, int]], pki: Pki, prometheus_hash: str) -> None:
    m, port = serve_web({"tls_server_config": TLS, "basic_auth_users": {"prometheus": prometheus_hash}})
    url = f"https://127.0.0.1:{port}/metrics"
    ctx = client_context(pki)
    status, _, body = get(url, ctx, ("prometheus", PASSWORD))
    assert status == 200 and "sensord_messages_received_total" in body
    for creds, reason in ((("prometheus", "wrong"), "bad_credentials"), (("nobody", PASSWORD), "bad_credentials"),
                          (None, "no_credentials")):
        before = value(m, "sensord_metrics_auth_failures_total", reason=reason)
        status, headers, body = get(url, ctx, creds)
        assert status == 401, creds
        assert value(m, "sensord_metrics_auth_failures_total", reason=reason) == before + 1
        assert headers["WWW-Authenticate"] == 'Basic realm="sensord"'
        assert "sensord_" not in body
    assert value(m, "sensord_metrics_auth_failures_total", reason="bad_credentials") == 2
    assert value(m, "sensord_metrics_auth_failures_total", reason="no_credentials") == 1
    # Still served after the refusals, and the failures are in what a scrape sees.
    status, _, body = get(url, ctx, ("prometheus", PASSWORD))
    assert status == 200 and 'sensord_metrics_auth_failures_total{reason="bad_credentials"} 2.0' in body


def test_the_tls_port_does_not_speak_plain_http(serve_web: Callable[..., tuple[DaemonMetrics, int]],
                                                pki: Pki) -> None:
    m, port = serve_web({"tls_server_config": TLS})
    with pytest.raises((OSError, http.client.HTTPException)):
        get(f"http://127.0.0.1:{port}/metrics")
    wait_until(lambda: value(m, "sensord_metrics_tls_handshake_failures_total") == 1, 10, "the failure counted")
    status, _, body = get(f"https://127.0.0.1:{port}/metrics", client_context(pki))
    assert status == 200 and "sensord_threshold" in body  # no authentication configured: open to TLS clients


def test_the_server_certificate_is_checked_by_the_client(serve_web: Callable[..., tuple[DaemonMetrics, int]],
                                                         pki: Pki) -> None:
    """A client that trusts another CA refuses the endpoint: Prometheus's tls_config.ca_file means something."""
    _, port = serve_web({"tls_server_config": TLS})
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        get(f"https://127.0.0.1:{port}/metrics", ssl.create_default_context(cafile=str(pki.other_ca)))


def test_a_required_client_certificate(serve_web: Callable[..., tuple[DaemonMetrics, int]], pki: Pki) -> None:
    m, port = serve_web({"tls_server_config": {**TLS, "client_auth_type": "RequireAndVerifyClientCert",
                                               "client_ca_file": "clients-ca.crt"}})
    url = f"https://127.0.0.1:{port}/metrics"
    for cert in (None, (pki.stranger_crt, pki.stranger_key)):  # no certificate; one from another CA
        with pytest.raises((OSError, http.client.HTTPException)):
            get(url, client_context(pki, cert))
    wait_until(lambda: value(m, "sensord_metrics_tls_handshake_failures_total") == 2, 10, "both failures counted")
    status, _, body = get(url, client_context(pki, (pki.client_crt, pki.client_key)))
    assert status == 200 and "sensord_threshold" in body


def test_a_client_certificate_verified_if_given(serve_web: Callable[..., tuple[DaemonMetrics, int]],
                                                pki: Pki) -> None:
    _, port = serve_web({"tls_server_config": {**TLS, "client_auth_type": "VerifyClientCertIfGiven",
                                               "client_ca_file": "clients-ca.crt"}})
    url = f"https://127.0.0.1:{port}/metrics"
    assert get(url, client_context(pki))[0] == 200
    assert get(url, client_context(pki, (pki.client_crt, pki.client_key)))[0] == 200
    with pytest.raises((OSError, http.client.HTTPException)):
        get(url, client_context(pki, (pki.stranger_crt, pki.stranger_key)))


def test_min_version_tls13_refuses_a_tls12_client(serve_web: Callable[..., tuple[DaemonMetrics, int]],
                                                  pki: Pki) -> None:
    _, port = serve_web({"tls_server_config": {**TLS, "min_version": "TLS13"}})
    url = f"https://127.0.0.1:{port}/metrics"
    with pytest.raises(urllib.error.URLError):
        get(url, client_context(pki, max_version=ssl.TLSVersion.TLSv1_2))
    assert get(url, client_context(pki))[0] == 200


def test_a_stalled_handshake_does_not_block_other_scrapes(serve_web: Callable[..., tuple[DaemonMetrics, int]],
                                                          pki: Pki, prometheus_hash: str) -> None:
    """Clients that connect and never finish (or never start) a TLS handshake each hold one connection, in their
    own thread, until metrics.timeout_seconds; scrapes meanwhile are served at once. The stalled sockets being
    still open when the scrape is answered shows the scrape did not wait for them."""
    m, port = serve_web({"tls_server_config": TLS, "basic_auth_users": {"prometheus": prometheus_hash}},
                        timeout=5.0, max_connections=4)
    silent = socket.create_connection(("127.0.0.1", port), timeout=10)  # TCP only, no ClientHello
    half = socket.create_connection(("127.0.0.1", port), timeout=10)
    half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello, never finished
    try:
        status, _, body = get(f"https://127.0.0.1:{port}/metrics", client_context(pki), ("prometheus", PASSWORD))
        assert status == 200 and "sensord_threshold" in body
        for s in (silent, half):
            s.setblocking(False)
            with pytest.raises(BlockingIOError):  # nothing to read and not closed: the handshake still waits
                s.recv(1)
            s.setblocking(True)
        assert all(closed_by_server(s) for s in (silent, half))  # ... until the timeout closes it
    finally:
        silent.close()
        half.close()
    wait_until(lambda: value(m, "sensord_metrics_tls_handshake_failures_total") == 2, 10, "both timeouts counted")


def test_basic_auth_without_tls(serve_web: Callable[..., tuple[DaemonMetrics, int]], prometheus_hash: str,
                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sensord.metrics"):
        _, port = serve_web({"basic_auth_users": {"prometheus": prometheus_hash}})
    assert "basic auth without TLS sends the password in clear text" in caplog.text
    url = f"http://127.0.0.1:{port}/metrics"
    assert get(url, auth=("prometheus", PASSWORD))[0] == 200
    assert get(url)[0] == 401
