"""Test helpers: a private Mosquitto broker, a recording subscriber, one-shot publish.

Tests talk to a REAL broker so that MQTT semantics (retain, QoS, SUBACK timing,
reconnects) are exercised as in production. Each broker is a separate
``mosquitto`` process on a free loopback port with its own temp config, never
the system broker on 127.0.0.1:1883, which may hold unrelated retained state
or be shared with other users of the machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import IO, Any, NamedTuple

import paho.mqtt.client as mqtt

__all__ = ["MosquittoBroker", "MqttRecorder", "RecordedMessage", "find_mosquitto", "publish"]

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


class RecordedMessage(NamedTuple):
    """One message as received by :class:`MqttRecorder`."""

    topic: str
    payload: bytes
    retain: bool
    qos: int


def _client_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class MqttRecorder:
    """Subscribes to ``topic`` and records every message it receives.

    Entering the context connects, starts paho's network thread and returns
    only after the broker's SUBACK, so anything published afterwards is
    guaranteed to be seen. Recording is thread-safe; use :meth:`wait_for` to
    block until an expected message arrives instead of sleeping.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic: str = "#",
        qos: int = 1,
        timeout: float = 10.0,
        client_id: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.topic = topic
        self.qos = qos
        self.timeout = timeout
        self._messages: list[RecordedMessage] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._sub_error: str | None = None
        self._sub_mid: int | None = None
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or _client_id("recorder"),
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # -- paho callbacks (network thread) -----------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._sub_error = f"CONNACK refused: {reason_code}"
            self._subscribed.set()
            return
        # Subscribing here (not after connect()) also resubscribes on reconnect.
        _, self._sub_mid = client.subscribe(self.topic, qos=self.qos)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed:
            self._sub_error = f"SUBACK for {self.topic!r} refused: {failed}"
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        rec = RecordedMessage(msg.topic, bytes(msg.payload), bool(msg.retain), int(msg.qos))
        with self._cond:
            self._messages.append(rec)
            self._cond.notify_all()

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> MqttRecorder:
        """Connect, start the network loop and wait for the SUBACK."""
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(self.timeout) or self._sub_error:
            self.stop()
            raise AssertionError(
                self._sub_error
                or f"no SUBACK for {self.topic!r} from {self.host}:{self.port} within {self.timeout} s"
            )
        return self

    def stop(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> MqttRecorder:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- inspection -----------------------------------------------------------
    def messages(self, topic_prefix: str | None = None) -> list[RecordedMessage]:
        """A snapshot of received messages, optionally only topics starting with a prefix."""
        with self._cond:
            msgs = list(self._messages)
        if topic_prefix is None:
            return msgs
        return [m for m in msgs if m.topic.startswith(topic_prefix)]

    def clear(self) -> None:
        """Forget everything recorded so far."""
        with self._cond:
            self._messages.clear()

    def wait_for(
        self,
        predicate: Callable[[RecordedMessage], bool],
        timeout: float | None = None,
    ) -> list[RecordedMessage]:
        """Block until a recorded message satisfies ``predicate``; return all that do.

        Messages received before the call count too. Raises AssertionError
        listing what was received if nothing matches within ``timeout``
        seconds (default: the recorder's ``timeout``).
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._cond:
            while True:
                matches = [m for m in self._messages if predicate(m)]
                if matches:
                    return matches
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    received = list(self._messages)
                    break
                self._cond.wait(remaining)
        raise AssertionError(
            f"no message on {self.topic!r} matched within the timeout; "
            f"received {len(received)}:\n" + "\n".join(_describe(m) for m in received[-50:])
        )


def _describe(m: RecordedMessage, limit: int = 200) -> str:
    payload = m.payload if len(m.payload) <= limit else m.payload[:limit] + b"..."
    return f"  {m.topic} qos={m.qos} retain={m.retain} payload={payload!r}"


def publish(
    host: str,
    port: int,
    topic: str,
    payload: str | bytes | bytearray | int | float | None,
    qos: int = 1,
    retain: bool = False,
    timeout: float = 10.0,
) -> None:
    """Connect, publish one message, wait until it is delivered to the broker, disconnect.

    "Delivered" means PUBACK (QoS 1) / PUBCOMP (QoS 2) received, or written
    to the socket for QoS 0. Raises AssertionError on connect/publish failure
    or timeout, so a test fails at the publish rather than later on a missing
    message.
    """
    connected = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        result["rc"] = reason_code
        connected.set()

    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=_client_id("publisher"),
    )
    client.on_connect = on_connect
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise AssertionError(f"no CONNACK from {host}:{port} within {timeout} s")
        if result["rc"].is_failure:
            raise AssertionError(f"connection to {host}:{port} refused: {result['rc']}")
        info = client.publish(topic, payload, qos=qos, retain=retain)
        try:
            info.wait_for_publish(timeout)
        except (ValueError, RuntimeError) as exc:
            raise AssertionError(f"publish to {topic!r} failed: {exc}") from exc
        if not info.is_published():
            raise AssertionError(f"publish to {topic!r} not acknowledged within {timeout} s")
    finally:
        client.disconnect()
        client.loop_stop()
