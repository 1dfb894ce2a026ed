"""A private Mosquitto broker on a free loopback port, for the demo and the tests.

The demo must not depend on (or disturb) a broker the machine may already run
on 127.0.0.1:1883, so it starts its own ``mosquitto`` process with a temp
config; the end-to-end tests use the same class.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import IO

__all__ = ["MosquittoBroker", "find_mosquitto"]

_FALLBACK_BINARY = "/usr/sbin/mosquitto"
_SYSTEM_PORT = 1883


def find_mosquitto() -> str:
    """Path of the mosquitto binary; RuntimeError with the install hint if absent.

    ``/usr/sbin`` is often not on a non-root PATH, hence the fallback.
    """
    path = shutil.which("mosquitto")
    if path:
        return path
    if os.access(_FALLBACK_BINARY, os.X_OK):
        return _FALLBACK_BINARY
    raise RuntimeError(
        "mosquitto broker binary not found (neither on PATH nor at "
        f"{_FALLBACK_BINARY}); install it with: apt-get install -y mosquitto"
    )


def _free_port(host: str) -> int:
    """A currently free TCP port on ``host`` (the kernel picks it for port 0).

    There is a small race between closing this socket and mosquitto binding
    the port; :meth:`MosquittoBroker.start` retries with a new port if so.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    if port == _SYSTEM_PORT:  # impossible while the system broker holds it
        raise RuntimeError("kernel offered port 1883")
    return port


# MQTT 3.1.1 CONNECT: protocol "MQTT" level 4, clean session, keepalive 10 s,
# empty client id (the broker assigns one), and the CONNACK "accepted" reply.
_PROBE_CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x0a\x00\x00"
_CONNACK_OK = b"\x20\x02\x00\x00"
_DISCONNECT = b"\xe0\x00"


def _mqtt_ping(host: str, port: int, timeout: float) -> bool:
    """True if an MQTT broker accepts a connection on host:port.

    A plain TCP connect is not enough: if another process grabbed the port
    (see :func:`_free_port`), the connect would succeed against *it* while
    our mosquitto fails to bind and exits. Only a CONNACK proves it is a broker.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(_PROBE_CONNECT)
            reply = b""
            while len(reply) < len(_CONNACK_OK):
                chunk = s.recv(len(_CONNACK_OK) - len(reply))
                if not chunk:
                    return False
                reply += chunk
            if reply != _CONNACK_OK:
                return False
            s.sendall(_DISCONNECT)
            return True
    except OSError:  # refused, reset, or timed out (TimeoutError is an OSError)
        return False


class MosquittoBroker:
    """A private mosquitto process on a free 127.0.0.1 port, as a context manager.

    ``with MosquittoBroker() as b: ...`` starts it and waits until it accepts
    MQTT connections; leaving the block stops it and deletes the temp dir.
    The broker log (``log_type all``) is kept and available via
    :meth:`log_text` even after :meth:`stop`, for failure messages.
    """

    host = "127.0.0.1"

    def __init__(self, startup_timeout: float = 10.0, binary: str | None = None) -> None:
        self.startup_timeout = startup_timeout
        self._binary = binary
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: str | None = None
        self._log_file: IO[bytes] | None = None
        self._log_path: str | None = None
        self._final_log: str = ""

    @property
    def port(self) -> int:
        """The TCP port the broker listens on (only valid once started)."""
        if self._port is None:
            raise RuntimeError("broker not started")
        return self._port

    @property
    def running(self) -> bool:
        """True while the mosquitto process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Everything the broker has logged so far (stdout and stderr)."""
        if self._log_path is not None:
            try:
                with open(self._log_path, encoding="utf-8", errors="replace") as f:
                    return f.read()
            except OSError:
                pass
        return self._final_log

    def start(self, attempts: int = 3) -> MosquittoBroker:
        """Start mosquitto and wait until it answers an MQTT CONNECT with CONNACK.

        Retries on a fresh port if mosquitto exits at start-up because another
        process grabbed the chosen port in the meantime. Raises RuntimeError
        (including the broker log) if it does not come up within
        ``startup_timeout`` seconds.
        """
        if self.running:
            return self
        binary = self._binary or find_mosquitto()
        for attempt in range(1, attempts + 1):
            self._launch(binary)
            try:
                self._wait_until_listening()
                return self
            except RuntimeError:
                log = self.log_text()
                self.stop()
                port_taken = "Address already in use" in log
                if attempt < attempts and port_taken:
                    continue
                raise
        raise AssertionError("unreachable")

    def _launch(self, binary: str) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix="mosquitto-test-")
        self._port = _free_port(self.host)
        conf = os.path.join(self._tmpdir, "mosquitto.conf")
        # Log to stderr, redirected into a file we own. Not "log_dest file":
        # mosquitto started as root drops privileges to the "mosquitto" user
        # first and then cannot open a file in our 0700 temp dir. Not
        # "log_dest stdout": stdio buffers a redirected stdout in 4 KiB blocks,
        # so the log would stay empty until exit; stderr is unbuffered.
        with open(conf, "w", encoding="utf-8") as f:
            f.write(
                f"listener {self._port} {self.host}\n"
                "allow_anonymous true\n"
                "persistence false\n"
                # A fast replay must not be thinned by the broker's default per-client queue limit.
                "max_queued_messages 100000\n"
                "log_dest stderr\n"
                "log_type all\n"
                "log_timestamp true\n"
                "connection_messages true\n"
            )
        self._log_path = os.path.join(self._tmpdir, "mosquitto.log")
        self._log_file = open(self._log_path, "wb")  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(
            [binary, "-c", conf],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            cwd=self._tmpdir,
        )

    def _wait_until_listening(self) -> None:
        assert self._proc is not None and self._port is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"mosquitto exited with code {rc} during start-up on port "
                    f"{self._port}; broker log:\n{self.log_text()}"
                )
            if _mqtt_ping(self.host, self._port, timeout=0.5):
                if self._proc.poll() is None:
                    return
                continue  # answered, then died: report the exit above
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mosquitto did not accept MQTT connections on {self.host}:{self._port} "
                    f"within {self.startup_timeout} s; broker log:\n{self.log_text()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL), wait, remove temp files."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._final_log = self.log_text()
        self._log_path = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"{self.host}:{self._port}" if self.running else "stopped"
        return f"<MosquittoBroker {state}>"
