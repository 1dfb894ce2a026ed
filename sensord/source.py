"""MQTT source: the broker connection, and turning payloads into readings.

``PayloadParser`` is pure (topic + bytes -> readings) so every payload rule is
unit-testable without a broker. ``MqttConnection`` owns the one paho-mqtt 2.x
client the daemon uses: subscriptions, the availability topic with its last
will, reconnects, and publishing for the sinks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import ConfigError, MqttConfig
from .timeparse import unix_seconds

log = logging.getLogger(__name__)


MAX_DEVICE_ID_BYTES = 128
_TOPIC_SPECIAL = frozenset("#+/")


def device_id_problem(device: str) -> str | None:
    r"""Why ``device`` cannot be a device id, or None if it can: the one rule for every intake path.

    A device id becomes an MQTT topic level (``{prefix}/state/{device}``), a log field and a metric
    label, so it must be non-empty, at most 128 bytes of UTF-8, printable (no NUL, newline or other
    control character), and free of the topic characters ``#``, ``+`` and ``/``.

    >>> [device_id_problem(d) is None for d in ("pump-1", "Pumpe_Ä.2", "", "a/b", "a+", "x\x00", "a\nb")]
    [True, True, False, False, False, False, False]
    """
    if not device:
        return "device id is empty"
    if len(device.encode("utf-8", "surrogatepass")) > MAX_DEVICE_ID_BYTES:
        return f"device id is longer than {MAX_DEVICE_ID_BYTES} bytes"
    if not device.isprintable():
        return "device id contains a control or non-printable character"
    bad = sorted(_TOPIC_SPECIAL.intersection(device))
    if bad:
        return f"device id contains {' '.join(bad)} (MQTT topic characters)"
    return None


def escape(text: object, limit: int = 200) -> str:
    r"""``text`` safe for one log line: non-printable characters and backslashes escaped, length bounded.

    >>> escape("pump\nINFO forged\x00")
    'pump\\nINFO forged\\x00'
    """
    s = str(text)
    out = "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
                  for c in s[:limit])
    return out + ("…" if len(s) > limit else "")


def default_client_id(config_path: str | None) -> str:
    """``sensord-<hostname>-<8 hex of the config file's absolute path>``: unique per host and instance.

    Stable across restarts (same host, same config file), which a persistent session needs, and
    different for two daemons on one host (they have two config files) or on two hosts.
    """
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "host"
    where = os.path.abspath(config_path) if config_path else "-"
    return f"sensord-{host}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


class MessageRejected(ValueError):
    """A whole message is unusable; ``reason`` is a bounded metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)


@dataclass(frozen=True)
class Reading:
    device: str
    timestamp: float
    values: np.ndarray | None  # None when the reading itself is bad (see ``problem``)
    problem: tuple[str, str] | None = None  # (reason, detail) for a rejected reading
    clipped: bool = False  # a value was outside the parser's bounds and was clipped to them


def _timestamp(raw: Any, arrival: float) -> float:
    return arrival if raw is None else unix_seconds(raw)


class PayloadParser:
    """JSON payloads -> readings for the model's channels.

    Accepted: one object ``{"ts": ..., "values": {"ch": v, ...}}`` or with the
    channels flat in the object, or a JSON array of such objects (a batch).
    The device comes from the topic template or a payload field.

    >>> p = PayloadParser(("a", "b"), "plant/{device}/telemetry", None, "ts", "values")
    >>> msg = b'{"ts": 5, "a": 1, "b": 2}'
    >>> [(r.device, r.timestamp, r.values.tolist()) for r in p.parse("plant/p1/telemetry", msg)]
    [('p1', 5.0, [1.0, 2.0])]
    """

    def __init__(self, channels: Sequence[str], device_topic: str | None, device_field: str | None,
                 timestamp_field: str, values_field: str, clock: Callable[[], float] = time.time,
                 max_clock_skew: float | None = None,
                 bounds: tuple[Sequence[float], Sequence[float]] | None = None) -> None:
        self.channels = tuple(channels)
        # Finite values outside [low, high] (per channel) are clipped to them; NaN/inf are left for the window
        # buffer to reject. Plain lists: one comparison per value costs less than numpy on 8 numbers.
        self.low, self.high = (list(map(float, bounds[0])), list(map(float, bounds[1]))) if bounds else (None, None)
        self.max_clock_skew = max_clock_skew
        self.device_field = device_field
        self.timestamp_field = timestamp_field
        self.values_field = values_field
        self.clock = clock
        self._topic_re: re.Pattern[str] | None = None
        if device_topic is not None:
            head, _, tail = device_topic.partition("{device}")
            self._topic_re = re.compile("^" + re.escape(head) + "([^/]+)" + re.escape(tail) + "$")

    def device_from_topic(self, topic: str) -> str | None:
        if self._topic_re is None:
            return None
        m = self._topic_re.match(topic)
        return m.group(1) if m else None

    def parse(self, topic: str, payload: bytes) -> list[Reading]:
        arrival = self.clock()
        try:
            doc = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MessageRejected("malformed_json", f"payload is not JSON: {exc}") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits (int_max_str_digits)
            raise MessageRejected("malformed_json", f"payload is not usable JSON: {str(exc)[:80]}") from None
        except RecursionError:
            raise MessageRejected("malformed_json", "payload is nested too deeply") from None
        items = doc if isinstance(doc, list) else [doc]
        if not items:
            raise MessageRejected("bad_payload", "empty JSON array")
        topic_device = self.device_from_topic(topic)
        readings = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise MessageRejected("bad_payload", f"item {i}: expected a JSON object, got {type(item).__name__}")
            device = topic_device
            if self.device_field is not None and self.device_field in item:
                raw = item[self.device_field]
                if isinstance(raw, bool) or not isinstance(raw, (str, int)):
                    readings.append(Reading("?", arrival, None, (
                        "bad_device_id", f"field {self.device_field!r} must be a string, got {type(raw).__name__}")))
                    continue
                device = str(raw)
            if device is None:
                raise MessageRejected("no_device", f"no device id in topic {topic!r}"
                                      + (f" or field {self.device_field!r}" if self.device_field else ""))
            problem = device_id_problem(device)
            if problem is not None:
                readings.append(Reading(device, arrival, None, ("bad_device_id", problem)))
                continue
            readings.append(self._reading(device, item, arrival))
        return readings

    def _reading(self, device: str, item: dict[str, Any], arrival: float) -> Reading:
        try:
            ts = _timestamp(item.get(self.timestamp_field), arrival)
        except (ValueError, OverflowError) as exc:
            return Reading(device, arrival, None, ("bad_timestamp", str(exc)))
        if self.max_clock_skew is not None and ts > arrival + self.max_clock_skew:
            # Never let it become the device's last reading: every later reading would be out of order.
            return Reading(device, arrival, None, (
                "future_timestamp", f"timestamp {ts:.3f} is {ts - arrival:.0f} s ahead of this host's clock "
                f"(daemon.max_clock_skew_seconds={self.max_clock_skew:g})"))
        source = item.get(self.values_field, item)
        if not isinstance(source, dict):
            return Reading(device, ts, None, ("bad_value", f"{self.values_field!r} must be an object"))
        values = np.empty(len(self.channels), dtype=np.float64)  # float64: 1e39 stays finite, to be clipped
        low, high = self.low, self.high
        clipped = False
        for j, ch in enumerate(self.channels):
            v = source.get(ch)
            if v is None:
                return Reading(device, ts, None, ("missing_channel", f"channel {ch!r} missing"))
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return Reading(device, ts, None, ("bad_value", f"channel {ch!r}: not a number: {v!r}"))
            if low is not None and high is not None and (v < low[j] or v > high[j]):
                try:
                    if math.isfinite(v):
                        v, clipped = (low[j] if v < low[j] else high[j]), True
                except OverflowError:  # an int beyond float range
                    v, clipped = (low[j] if v < 0 else high[j]), True
            try:
                values[j] = v
            except OverflowError:  # an int beyond float range, no bounds to clip it to
                return Reading(device, ts, None, ("bad_value", f"channel {ch!r}: number out of range"))
        return Reading(device, ts, values, clipped=clipped)


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


def _refusal_hint(reason: Any) -> str:
    """What to check for a CONNACK refusal (MQTT 5 reason codes; paho maps MQTT 3.1.1 codes onto them)."""
    value = getattr(reason, "value", None)
    if value in (0x86, 0x87, 0x8C):  # bad user name or password, not authorized, bad authentication method
        return "check mqtt.username and mqtt.password, and the broker's password file and ACL"
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

    def __init__(self, cfg: MqttConfig, on_message: Callable[[str, bytes, bool], bool | None],
                 on_connected: Callable[[bool], None] | None = None, client_id: str | None = None,
                 on_acknowledged: Callable[[], object] | None = None) -> None:
        self.cfg = cfg
        self.on_acknowledged = on_acknowledged  # after each PUBACK (network thread; must not call paho)
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
        self.status_topic = f"{cfg.topic_prefix}/status"
        v5 = cfg.protocol == "5"
        self._v5 = v5
        # A persistent session: the broker keeps our subscriptions and queues QoS 1 readings while we
        # are away. Readings are acknowledged only once intake has taken them (manual ack), so one that
        # arrives while we shut down is not acknowledged and the broker delivers it again next time.
        self.persistent = cfg.session_expiry_seconds > 0
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                                  manual_ack=self.persistent,
                                  **({} if v5 else {"clean_session": not self.persistent}))
        if cfg.username is not None:
            self.client.username_pw_set(cfg.username, cfg.password)
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
        self.client.will_set(self.status_topic, "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(cfg.reconnect_min_seconds, cfg.reconnect_max_seconds)
        self.client.on_connect = self._handle_connect
        self.client.on_connect_fail = self._handle_connect_fail
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message
        self.client.on_publish = self._handle_publish
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
            for topic in self.cfg.subscriptions:
                client.subscribe(topic, qos=self.cfg.qos)
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

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if self.on_acknowledged is not None:
            self.on_acknowledged()

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        taken = self._on_message(msg.topic, msg.payload, bool(msg.retain))
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
            self.client.unsubscribe(list(self.cfg.subscriptions))

    def close(self, timeout: float = 2.0) -> None:
        """Publish ``offline`` (the clean-shutdown counterpart of the last will) and disconnect."""
        self._closing = True
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
            self.client.disconnect()
        self.client.loop_stop()
