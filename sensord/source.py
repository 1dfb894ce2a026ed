"""The broker connection: the one paho-mqtt 2.x client the daemon uses.

``MqttConnection`` owns subscriptions, the availability topic with its last
will, reconnects, and publishing for the sinks (inputs and outputs share one
connection, and so one last will). What a payload means is
:mod:`sensord.payload`'s business; this module only moves bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import ConfigError, MqttConfig
from .credentials import read_secret

log = logging.getLogger(__name__)


class BufferedSocket:
    """The broker socket with reads served from one buffer: one ``recv`` system call brings many messages.

    paho-mqtt reads each packet with three calls (its first byte, its length, the rest), and every system
    call hands the interpreter lock to the scoring thread if it wants it, so that the network thread then
    waits for the lock again, three times a message. Here those reads come from a 64 KiB buffer,
    refilled with one call when it runs dry. ``pending()`` tells paho's loop that bytes are buffered, as an
    SSL socket's does, so it reads them before it waits on the socket again (:meth:`pending` is what paho
    asks any socket for). Everything else goes to the wrapped socket.
    """

    CHUNK = 65536

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._buf):
            data = self._sock.recv(max(bufsize, self.CHUNK))  # BlockingIOError and the like go to paho
            if len(data) <= bufsize:
                return data
            self._buf, self._pos = data, 0
        end = self._pos + bufsize
        out = self._buf[self._pos:end]
        self._pos = min(end, len(self._buf))
        return out

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._buf) - self._pos + inner

    def __getattr__(self, name: str) -> Any:  # send, setblocking, fileno, close, ...: the socket's own
        return getattr(self._sock, name)


class _Client(mqtt.Client):
    """paho's client on a :class:`BufferedSocket` (``_create_socket`` is where paho 2.x makes its socket;
    a paho without it simply reads unbuffered)."""

    def _create_socket(self) -> Any:
        return BufferedSocket(super()._create_socket())


def default_client_id(config_path: str | None) -> str:
    """``sensord-<hostname>-<8 hex of the config file's absolute path>``: unique per host and instance.

    Stable across restarts (same host, same config file), which a persistent session needs, and
    different for two daemons on one host (they have two config files) or on two hosts.
    """
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "host"
    where = os.path.abspath(config_path) if config_path else "-"
    return f"sensord-{host}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


def tls_file_problems(cfg: MqttConfig) -> list[str]:
    """The configured TLS files that cannot be read, each as ``mqtt.tls.<key>: ...`` (empty if all can)."""
    problems = []
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(cfg.tls, key) if cfg.tls is not None else None
        if path is not None:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                problems.append(f"mqtt.tls.{key}: cannot read {path}: {exc.strerror or exc}")
    return problems


def mqtt_password(cfg: MqttConfig) -> tuple[str | None, list[str]]:
    """The broker password from ``password``, ``password_file`` or ``password_env``, and the problems."""
    if cfg.password is not None:
        return cfg.password, []
    if cfg.password_file is not None:
        return read_secret("mqtt.password_file", file=cfg.password_file)
    return read_secret("mqtt.password_env", env=cfg.password_env)


def _refusal_hint(reason: Any) -> str:
    """What to check for a CONNACK refusal (MQTT 5 reason codes; paho maps MQTT 3.1.1 codes onto them)."""
    value = getattr(reason, "value", None)
    if value in (0x86, 0x87, 0x8C):  # bad user name or password, not authorized, bad authentication method
        return ("check mqtt.username and the password (mqtt.password, password_file or password_env), and the "
                "broker's password file and ACL")
    if value == 0x85:
        return "the broker refuses the client id: set mqtt.client_id"
    if value == 0x84:
        return "the broker does not speak this MQTT version: set mqtt.protocol"
    if value == 0x8A:
        return "the broker bans this client"
    return ""


_SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason code: another client connected with this client id
_PROMPT_RECONNECT_SECONDS = 10.0


class MqttConnection:
    """The daemon's single broker connection (inputs and outputs share it, and its last will)."""

    def __init__(self, cfg: MqttConfig, on_message: Callable[[str, bytes, bool, bool], bool | None],
                 on_connected: Callable[[bool], None] | None = None, client_id: str | None = None,
                 on_acknowledged: Callable[[], object] | None = None, announce: bool = True,
                 on_subscribed: Callable[[str, bool], None] | None = None) -> None:
        """``announce=False`` (``sensord record``): no retained online/offline status and no last will, so a
        recorder never speaks for the daemon on ``{prefix}/status``. ``on_subscribed(filter, granted)`` runs
        at each SUBACK and, with False for every filter, at each disconnect (network thread; must not call
        paho)."""
        self.cfg = cfg
        self.announce = announce
        self.on_acknowledged = on_acknowledged  # after each PUBACK (network thread; must not call paho)
        # topic filter -> granted by the broker on the current connection (a refusal, e.g. by an ACL, would
        # otherwise look like a quiet plant); read by the daemon for sensord_mqtt_subscribed.
        self.subscribed: dict[str, bool] = dict.fromkeys(cfg.topic_filters(), False)
        self._suback_waiting: dict[int, str] = {}
        self.on_subscribed = on_subscribed
        self.client_id = client_id or cfg.client_id or default_client_id(None)
        self.takeovers = 0
        self._takeover_logged = -1e9
        self._last_takeover = -1e9
        self._dropped_at: float | None = None
        self._answered = False  # a CONNACK came for the current connection attempt
        self._prompt_drops: list[float] = []
        self._on_message = on_message
        self._on_connected_cb = on_connected
        self.connected = threading.Event()
        self.ever_connected = False
        self.reconnects = 0
        self.status_topic = cfg.status()
        v5 = cfg.protocol == "5"
        self._v5 = v5
        # A persistent session: the broker keeps our subscriptions and queues QoS 1 readings while we
        # are away. Readings are acknowledged only once intake has taken them (manual ack), so one that
        # arrives while we shut down is not acknowledged and the broker delivers it again next time.
        self.persistent = cfg.session_expiry_seconds > 0
        self.client = _Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                                  manual_ack=self.persistent,
                                  clean_session=None if v5 else not self.persistent)  # (v5: clean_start)
        if cfg.username is not None:
            password, problems = mqtt_password(cfg)
            if problems:
                raise ConfigError(problems)
            self.client.username_pw_set(cfg.username, password)
        if cfg.tls is not None:
            t = cfg.tls
            problems = tls_file_problems(cfg)
            if problems:
                raise ConfigError(problems)
            try:
                self.client.tls_set(ca_certs=t.ca_file, certfile=t.cert_file, keyfile=t.key_file,
                                    cert_reqs=ssl.CERT_REQUIRED)
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError([f"mqtt.tls: cannot use the certificate files: {exc}"]) from None
            self.client.tls_insecure_set(t.insecure)
        if announce:
            self.client.will_set(self.status_topic, "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(int(cfg.reconnect_min_seconds), int(cfg.reconnect_max_seconds))
        self.client.on_connect = self._handle_connect
        self.client.on_connect_fail = self._handle_connect_fail
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message
        self.client.on_publish = self._handle_publish
        self.client.on_subscribe = self._handle_subscribe
        self._subscribed = True
        self._closing = False
        self._last_failure: str | None = None

    def start(self) -> None:
        """Connect in the background; paho's loop thread reconnects with backoff."""
        kwargs: dict[str, Any] = {}
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.cfg.session_expiry_seconds
            kwargs = {"clean_start": not self.persistent, "properties": props}
        self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive, **kwargs)
        self.client.loop_start()

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._answered = True
        if reason.is_failure:
            self._failed(f"refused: {reason}", _refusal_hint(reason), logging.ERROR)
            return
        self._last_failure = None
        if self.ever_connected:
            self.reconnects += 1
        self._check_dropped()
        fighting = time.monotonic() - self._last_takeover < 60.0  # over one client id: the ERROR says it
        resumed = bool(getattr(flags, "session_present", False))
        session = "session resumed" if resumed else ("new persistent session" if self.persistent else "clean session")
        log.log(logging.DEBUG if fighting else logging.INFO, "mqtt connected to %s:%d (%s, %s) as client id %s",
                self.cfg.host, self.cfg.port, "MQTT 5" if self._v5 else "MQTT 3.1.1", session, self.client_id)
        # Subscribe before announcing "online": the broker handles one client's packets in order, so
        # whoever sees "online" can publish readings and be sure the subscription is already in place.
        if self._subscribed:
            for topic in self.cfg.topic_filters():
                _, mid = client.subscribe(topic, qos=self.cfg.qos)
                if mid is not None:
                    self._suback_waiting[mid] = topic
        if self.announce:
            client.publish(self.status_topic, "online", qos=1, retain=True)
        self.ever_connected = True
        self.connected.set()
        if self._on_connected_cb:
            self._on_connected_cb(True)

    def _taken_over(self, what: str) -> None:
        self.takeovers += 1
        now = self._last_takeover = time.monotonic()
        if now - self._takeover_logged >= 30.0:  # a fight between two clients would flood the log
            self._takeover_logged = now
            log.error("mqtt session taken over: %s (%d times so far); give every sensord its own mqtt.client_id "
                      "(or leave it unset for the per-host default)", what, self.takeovers)

    def _check_dropped(self) -> None:
        """After a reconnect: was the last connection closed by a broker that is clearly up?

        Mosquitto before 2.0.? closes the older of two connections with one client id without an MQTT 5
        reason code, and paho reports only "Unspecified error". A broker that closes a healthy connection
        and accepts the reconnect at once, twice within a minute, is taken as a session takeover.
        """
        now = time.monotonic()
        dropped, self._dropped_at = self._dropped_at, None
        if dropped is None or now - dropped > _PROMPT_RECONNECT_SECONDS:
            return
        self._prompt_drops = [t for t in self._prompt_drops if now - t <= 60.0] + [now]
        if len(self._prompt_drops) >= 2:
            self._taken_over(f"the broker {self.cfg.host}:{self.cfg.port} closed our connection "
                             f"{len(self._prompt_drops)} times within a minute and accepted us again at once: "
                             f"another client is probably using client id {self.client_id!r}")

    def _handle_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        """A (re)connect attempt failed before any CONNACK: refused, unreachable, TLS handshake.

        paho calls this from inside its ``except OSError`` and then retries with backoff,
        so the exception is still the one being handled. The first failure of a kind is
        logged (ERROR for TLS, which will not fix itself); identical repeats go to DEBUG.
        """
        exc = sys.exc_info()[1]
        detail = f"failed: {type(exc).__name__}: {exc}" if exc is not None else "failed: unknown error"
        hint = ""
        if isinstance(exc, ssl.SSLError) and "wrong version number" in str(exc).lower():
            hint = "is this a plain (non-TLS) MQTT port? remove mqtt.tls or use the broker's TLS port"
        self._failed(detail, hint, logging.ERROR if isinstance(exc, ssl.SSLError) else logging.WARNING)

    def _failed(self, detail: str, hint: str, level: int) -> None:
        """Log a failed (re)connect attempt once per kind; identical repeats go to DEBUG (paho retries)."""
        if detail == self._last_failure:
            log.debug("mqtt connect to %s:%d %s (again)", self.cfg.host, self.cfg.port, detail)
            return
        self._last_failure = detail
        log.log(level, "mqtt connect to %s:%d %s%s (retrying every %g-%g s; repeats are logged at DEBUG)",
                self.cfg.host, self.cfg.port, detail, f" -- {hint}" if hint else "",
                self.cfg.reconnect_min_seconds, self.cfg.reconnect_max_seconds)

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self.subscribed = dict.fromkeys(self.subscribed, False)
        self._suback_waiting.clear()
        if self.on_subscribed is not None:
            for topic in self.subscribed:
                self.on_subscribed(topic, False)
        if getattr(reason, "value", None) == _SESSION_TAKEN_OVER:
            self._taken_over(f"another client connected to {self.cfg.host}:{self.cfg.port} with client id "
                             f"{self.client_id!r}")
        elif was and not self._closing:
            self._dropped_at = time.monotonic()
        elif not was and not self._closing and not self._answered:  # closed before any CONNACK
            self._failed("failed: the broker closed the connection without answering CONNECT",
                         "is the port TLS-only (then set mqtt.tls), or does the broker refuse MQTT "
                         f"{self.cfg.protocol}? The broker's log says why", logging.ERROR)
        self._answered = False
        if was and self._closing:
            log.info("mqtt disconnected from %s:%d", self.cfg.host, self.cfg.port)
        elif was:  # while two clients fight over one client id, the ERROR above says it all
            fighting = time.monotonic() - self._last_takeover < 60.0
            log.log(logging.DEBUG if fighting else logging.WARNING, "mqtt disconnected from %s:%d: %s",
                    self.cfg.host, self.cfg.port, reason)
        if self._on_connected_cb:
            self._on_connected_cb(False)

    def _handle_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        topic = self._suback_waiting.pop(mid, None)
        if topic is None or not reasons:
            return
        reason = reasons[0]
        granted = not getattr(reason, "is_failure", False)
        self.subscribed[topic] = granted
        if self.on_subscribed is not None:
            self.on_subscribed(topic, granted)
        if not granted:
            log.error("mqtt broker %s:%d refused the subscription to %s: %s; nothing on it reaches sensord "
                      "(does the broker's ACL let user %s read it?)", self.cfg.host, self.cfg.port, topic, reason,
                      self.cfg.username or "(anonymous)")

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if self.on_acknowledged is not None:
            self.on_acknowledged()

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        taken = self._on_message(msg.topic, msg.payload, bool(msg.retain), bool(msg.dup))
        if self.persistent and taken is not False and msg.qos > 0:
            client.ack(msg.mid, msg.qos)

    def publish(self, topic: str, payload: str | bytes, qos: int = 0, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def stop_intake(self) -> None:
        """Stop taking readings while buffered windows are finished.

        With a clean session: unsubscribe. With a persistent session the subscriptions stay (they are
        the session); what arrives from now on is left unacknowledged and redelivered next time.
        """
        self._subscribed = False
        if self.connected.is_set() and not self.persistent:
            self.client.unsubscribe(self.cfg.topic_filters())

    def close(self, timeout: float = 2.0) -> None:
        """Publish ``offline`` (the clean-shutdown counterpart of the last will) and disconnect."""
        self._closing = True
        if self.connected.is_set():
            if self.announce:
                info = self.client.publish(self.status_topic, "offline", qos=1, retain=True)
                try:
                    info.wait_for_publish(timeout)
                except (RuntimeError, ValueError):
                    pass
            self.client.disconnect()
        self.client.loop_stop()
