"""A private Mosquitto broker on a free loopback port, for the tests and the demo.

Test infrastructure, not part of the service: it lives with the tests, outside the ``sensord`` package (the
package an edge box installs does not have it) and the daemon never imports it. ``sensord demo`` (``make
demo``) loads this file from the source checkout it runs in; the benchmarks import it from here too.

The demo must not depend on (or disturb) a broker the machine may already run
on 127.0.0.1:1883, so it starts its own ``mosquitto`` process with a temp
config; the end-to-end tests use the same class (through ``broker.py``). Optional keyword arguments
give the variants those tests need: a password file (anonymous access then
off), a TLS listener, extra config lines, a fixed port, and :meth:`restart`
on the same port.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
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
# CONNACK "refused: bad user name or password" / "not authorized" (MQTT 3.1.1 return codes 4 and 5).
_CONNACK_AUTH_REFUSED = (b"\x20\x02\x00\x04", b"\x20\x02\x00\x05")
_DISCONNECT = b"\xe0\x00"


def _probe(s: socket.socket, auth_refusal_ok: bool) -> bool:
    s.sendall(_PROBE_CONNECT)
    reply = b""
    while len(reply) < len(_CONNACK_OK):
        chunk = s.recv(len(_CONNACK_OK) - len(reply))
        if not chunk:
            return False
        reply += chunk
    if reply in _CONNACK_AUTH_REFUSED and auth_refusal_ok:
        return True  # the broker closes the connection itself
    if reply != _CONNACK_OK:
        return False
    s.sendall(_DISCONNECT)
    return True


def _mqtt_ping(host: str, port: int, timeout: float, tls: bool = False, auth_refusal_ok: bool = False) -> bool:
    """True if an MQTT broker accepts a connection on host:port.

    A plain TCP connect is not enough: if another process grabbed the port
    (see :func:`_free_port`), the connect would succeed against *it* while
    our mosquitto fails to bind and exits. Only a CONNACK proves it is a broker.
    ``tls`` speaks TLS first (without verifying the certificate: this only
    checks liveness); ``auth_refusal_ok`` also counts a CONNACK that refuses the
    anonymous probe for want of credentials (a broker with a password file).
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            if not tls:
                return _probe(raw, auth_refusal_ok)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                return _probe(s, auth_refusal_ok)
    except OSError:  # refused, reset, or timed out (TimeoutError is an OSError)
        return False


class MosquittoBroker:
    """A private mosquitto process on a free 127.0.0.1 port, as a context manager.

    ``with MosquittoBroker() as b: ...`` starts it and waits until it accepts
    MQTT connections; leaving the block stops it and deletes the temp dir.
    The broker log (``log_type all``) is kept and available via
    :meth:`log_text` even after :meth:`stop`, for failure messages.

    Optional keyword-only variants (the defaults give the plain anonymous broker):

    * ``port``: listen on this port instead of a free one (no retry on another port);
    * ``password_file``: a ``mosquitto_passwd`` file; anonymous access is then off
      unless ``allow_anonymous=True`` is passed explicitly;
    * ``tls_certfile``/``tls_keyfile`` (and optionally ``tls_cafile``): the listener
      speaks TLS only;
    * ``extra_config``: lines appended verbatim to the generated mosquitto.conf.

    Files given are copied into the broker's temp dir and made readable there,
    because mosquitto started as root drops privileges to the ``mosquitto`` user
    right after reading its config and loads them as that user.
    """

    host = "127.0.0.1"

    def __init__(self, startup_timeout: float = 10.0, binary: str | None = None, *,
                 port: int | None = None, extra_config: str = "", password_file: str | os.PathLike[str] | None = None,
                 allow_anonymous: bool | None = None, tls_cafile: str | os.PathLike[str] | None = None,
                 tls_certfile: str | os.PathLike[str] | None = None,
                 tls_keyfile: str | os.PathLike[str] | None = None) -> None:
        if (tls_certfile is None) != (tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile must be given together")
        if tls_cafile is not None and tls_certfile is None:
            raise ValueError("tls_cafile needs tls_certfile and tls_keyfile")
        if port == _SYSTEM_PORT:
            raise ValueError("refusing port 1883: that is the system broker's")
        self.startup_timeout = startup_timeout
        self._binary = binary
        self._fixed_port = port
        self.extra_config = extra_config
        self.password_file = None if password_file is None else os.fspath(password_file)
        self.allow_anonymous = (password_file is None) if allow_anonymous is None else allow_anonymous
        self.tls_cafile = None if tls_cafile is None else os.fspath(tls_cafile)
        self.tls_certfile = None if tls_certfile is None else os.fspath(tls_certfile)
        self.tls_keyfile = None if tls_keyfile is None else os.fspath(tls_keyfile)
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
    def tls(self) -> bool:
        """True if the listener speaks TLS."""
        return self.tls_certfile is not None

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
        process grabbed the chosen port in the meantime (with a fixed ``port``,
        on that port after a short pause). Raises RuntimeError
        (including the broker log) if it does not come up within
        ``startup_timeout`` seconds.
        """
        return self._start(attempts, self._fixed_port)

    def restart(self, attempts: int = 10) -> MosquittoBroker:
        """Stop the broker and start a new process on the same port (clients can reconnect).

        The new process starts empty (no retained messages, no sessions). A port
        still held by the old process is retried a few times before giving up.
        After :meth:`stop` it starts again on the port the broker last used.
        """
        port = self.port
        self.stop()
        return self._start(attempts, port)

    def _start(self, attempts: int, port: int | None) -> MosquittoBroker:
        if self.running:
            return self
        binary = self._binary or find_mosquitto()
        for attempt in range(1, attempts + 1):
            self._launch(binary, port)
            try:
                self._wait_until_listening()
                return self
            except RuntimeError:
                log = self.log_text()
                self.stop()
                port_taken = "Address already in use" in log
                if attempt < attempts and port_taken:
                    if port is not None:  # a fixed port: wait for it to become free
                        time.sleep(0.2)
                    continue
                raise
        raise AssertionError("unreachable")

    def _install(self, src: str, name: str) -> str:
        """Copy ``src`` into the temp dir, readable by the user mosquitto drops privileges to."""
        assert self._tmpdir is not None
        os.chmod(self._tmpdir, 0o711)  # traversable (not listable) by that user
        dst = os.path.join(self._tmpdir, name)
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o644)  # throwaway test material only
        return dst

    def _extra_lines(self) -> str:
        lines = ""
        if self.password_file is not None:
            lines += f"password_file {self._install(self.password_file, 'passwd')}\n"
        if self.tls_certfile is not None and self.tls_keyfile is not None:
            if self.tls_cafile is not None:
                lines += f"cafile {self._install(self.tls_cafile, 'ca.crt')}\n"
            lines += f"certfile {self._install(self.tls_certfile, 'server.crt')}\n"
            lines += f"keyfile {self._install(self.tls_keyfile, 'server.key')}\n"
        if self.extra_config:
            lines += self.extra_config.rstrip("\n") + "\n"
        return lines

    def _launch(self, binary: str, port: int | None = None) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix="mosquitto-test-")
        self._port = _free_port(self.host) if port is None else port
        conf = os.path.join(self._tmpdir, "mosquitto.conf")
        # Log to stderr, redirected into a file we own. Not "log_dest file":
        # mosquitto started as root drops privileges to the "mosquitto" user
        # first and then cannot open a file in our 0700 temp dir. Not
        # "log_dest stdout": stdio buffers a redirected stdout in 4 KiB blocks,
        # so the log would stay empty until exit; stderr is unbuffered.
        with open(conf, "w", encoding="utf-8") as f:
            f.write(
                f"listener {self._port} {self.host}\n"
                f"allow_anonymous {'true' if self.allow_anonymous else 'false'}\n"
                "persistence false\n"
                # A fast replay must not be thinned by the broker's default per-client queue limit.
                "max_queued_messages 100000\n"
                "log_dest stderr\n"
                "log_type all\n"
                "log_timestamp true\n"
                "connection_messages true\n"
                + self._extra_lines()
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
            if _mqtt_ping(self.host, self._port, timeout=0.5, tls=self.tls,
                          auth_refusal_ok=not self.allow_anonymous):
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
