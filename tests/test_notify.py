"""sd_notify protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from sensord.notify import SystemdNotifier, WatchdogPinger, watchdog_interval


class FakeSystemd:
    """A bound SOCK_DGRAM socket that collects notification datagrams."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)

    def recv(self, timeout: float = 2.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(65536)

    def recv_all(self, quiet: float = 0.0) -> list[bytes]:
        """Everything queued now, plus whatever arrives within ``quiet`` seconds."""
        out: list[bytes] = []
        deadline = time.monotonic() + quiet
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                if remaining:
                    self.sock.settimeout(remaining)
                    out.append(self.sock.recv(65536))
                else:
                    self.sock.setblocking(False)
                    out.append(self.sock.recv(65536))
            except (BlockingIOError, TimeoutError):
                return out

    def close(self) -> None:
        self.sock.close()


class CountedCheck:
    """A health check that counts its calls, so a test can wait for the pinger's ticks instead of sleeping.

    The pinger sends a tick's ping before it starts the next tick's check, so once a check has been
    counted every earlier tick's datagram is already in the socket's queue.
    """

    def __init__(self, answer: bool | Exception = True) -> None:
        self.answer = answer
        self.calls = 0
        self._cond = threading.Condition()

    def __call__(self) -> bool:
        with self._cond:
            self.calls += 1
            self._cond.notify_all()
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def wait_calls(self, n: int, timeout: float = 10.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.calls >= n, timeout), f"{self.calls} checks, waited for {n}"


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Not tmp_path: AF_UNIX paths are limited to 107 bytes and pytest's
    # per-test directories (named after the test) can exceed that.
    path = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def systemd(sock_dir: str) -> Iterator[tuple[str, FakeSystemd]]:
    path = os.path.join(sock_dir, "notify")
    fake = FakeSystemd(path)
    yield path, fake
    fake.close()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


def test_ready_stopping_watchdog_status_exact_datagrams(systemd: tuple[str, FakeSystemd]) -> None:
    path, fake = systemd
    n = SystemdNotifier(path)
    assert n.enabled
    assert n.socket_path == path

    assert n.ready() is True
    assert fake.recv() == b"READY=1\n"
    assert n.ready("subscribed to sensors/#") is True
    assert fake.recv() == b"READY=1\nSTATUS=subscribed to sensors/#\n"
    assert n.stopping() is True
    assert fake.recv() == b"STOPPING=1\n"
    assert n.watchdog() is True
    assert fake.recv() == b"WATCHDOG=1\n"
    assert n.status("scoring 12 windows/s") is True
    assert fake.recv() == b"STATUS=scoring 12 windows/s\n"
    assert n.notify(STATUS="x", ERRNO="5") is True
    assert fake.recv() == b"STATUS=x\nERRNO=5\n"
    assert fake.recv_all() == []


def test_status_newlines_are_flattened_and_raw_newlines_rejected(
    systemd: tuple[str, FakeSystemd],
) -> None:
    path, fake = systemd
    n = SystemdNotifier(path)
    assert n.status("broker down\nretrying") is True
    assert fake.recv() == b"STATUS=broker down retrying\n"
    with pytest.raises(ValueError):
        n.notify(STATUS="a\nREADY=1")
    assert n.notify() is False
    assert fake.recv_all() == []


def test_reloading_sends_monotonic_usec(systemd: tuple[str, FakeSystemd]) -> None:
    path, fake = systemd
    n = SystemdNotifier(path)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    data = fake.recv()
    lines = data.decode().split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert lines[2:] == [""]  # exactly two lines, newline-terminated
    usec = int(lines[1].removeprefix("MONOTONIC_USEC="))
    assert before <= usec <= after


def test_reads_notify_socket_from_environment(
    systemd: tuple[str, FakeSystemd], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, fake = systemd
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = SystemdNotifier()
    assert n.enabled
    assert n.ready() is True
    assert fake.recv() == b"READY=1\n"


def test_abstract_namespace_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"sensord-test-{uuid.uuid4().hex}"
    fake = FakeSystemd("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        n = SystemdNotifier()
        assert n.enabled
        assert n.ready("up") is True
        assert fake.recv() == b"READY=1\nSTATUS=up\n"
        assert SystemdNotifier("@" + name).watchdog() is True
        assert fake.recv() == b"WATCHDOG=1\n"
    finally:
        fake.close()


def test_no_socket_is_a_noop() -> None:
    n = SystemdNotifier()
    assert n.enabled is False
    assert n.socket_path is None
    assert n.notify(READY="1") is False
    assert n.ready("x") is False
    assert n.stopping() is False
    assert n.reloading() is False
    assert n.watchdog() is False
    assert n.status("x") is False
    assert SystemdNotifier("").enabled is False


def test_missing_socket_returns_false_and_warns_once(
    sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    n = SystemdNotifier(os.path.join(sock_dir, "does-not-exist"))
    assert n.enabled
    with caplog.at_level(logging.DEBUG, logger="sensord.notify"):
        assert n.ready() is False
        assert n.watchdog() is False
        assert n.watchdog() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "does-not-exist" in warnings[0].getMessage()


def test_unbound_abstract_socket_returns_false() -> None:
    n = SystemdNotifier(f"@sensord-test-nobody-{uuid.uuid4().hex}")
    assert n.ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),  # unset
        ("", None, None),
        ("30000000", None, 15.0),  # WatchdogSec=30 -> ping every 15 s
        ("30000000", "self", 15.0),
        ("100000", "self", 0.05),
        ("30000000", "other", None),  # inherited from a parent process
        ("30000000", "garbage", None),
        ("abc", None, None),
        ("1.5", None, None),
        ("0", None, None),
        ("-5", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    result = watchdog_interval()
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


def test_pinger_pings_while_healthy_and_stops_when_unhealthy(
    systemd: tuple[str, FakeSystemd],
) -> None:
    path, fake = systemd
    check = CountedCheck(True)
    pinger = WatchdogPinger(SystemdNotifier(path), 0.05, check)
    pinger.start()
    try:
        assert pinger.running
        pings = [fake.recv(), fake.recv(), fake.recv()]
        assert pings == [b"WATCHDOG=1\n"] * 3

        check.answer = False
        unhealthy_from = check.calls + 1  # every check counted after this one answers False
        check.wait_calls(unhealthy_from + 1)  # the ticks that were still healthy have sent their pings
        fake.recv_all()
        check.wait_calls(check.calls + 3)  # three more ticks, each checked and none pinged
        assert fake.recv_all() == []

        check.answer = True  # recovery resumes pings
        assert fake.recv() == b"WATCHDOG=1\n"
    finally:
        pinger.stop()
    assert not pinger.running


def test_pinger_treats_exception_as_unhealthy(systemd: tuple[str, FakeSystemd]) -> None:
    path, fake = systemd
    boom = CountedCheck(RuntimeError("scorer wedged"))
    with WatchdogPinger(SystemdNotifier(path), 0.05, boom):
        boom.wait_calls(3)  # three ticks: the first ping would have been immediate
        assert fake.recv_all() == []


def test_pinger_stop_is_prompt_and_ends_pings(systemd: tuple[str, FakeSystemd]) -> None:
    path, fake = systemd
    pinger = WatchdogPinger(SystemdNotifier(path), 3600.0, lambda: True)
    pinger.start()
    assert fake.recv() == b"WATCHDOG=1\n"  # first ping is immediate
    # Joined without a timeout: had stop() to wait out the interval, it would block for an hour.
    stopper = threading.Thread(target=pinger.stop, kwargs={"timeout": None}, daemon=True)
    stopper.start()
    stopper.join(30)  # a liveness bound, not a speed test
    assert not stopper.is_alive(), "stop() waits for the next tick instead of waking the thread"
    assert not pinger.running
    assert fake.recv_all() == []  # the thread has ended: nothing can follow
    pinger.stop()  # idempotent


def test_pinger_rejects_bad_interval() -> None:
    with pytest.raises(ValueError):
        WatchdogPinger(SystemdNotifier(""), 0, lambda: True)
