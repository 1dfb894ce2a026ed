"""Unit tests of the /metrics HTTP endpoint: idle connections time out, a connection cap (issue 14)."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest

from sensord.metrics import DaemonMetrics


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
