"""Test helpers: a private Mosquitto broker, a recording subscriber, one-shot publish.

Tests talk to a REAL broker so that MQTT semantics (retain, QoS, SUBACK timing,
reconnects) are exercised as in production. Each broker is a separate
``mosquitto`` process on a free loopback port with its own temp config, never
the system broker on 127.0.0.1:1883, which may hold unrelated retained state
or be shared with other users of the machine.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt

__all__ = ["MosquittoBroker", "MqttRecorder", "RecordedMessage", "find_mosquitto", "publish"]

from mosquitto import MosquittoBroker, find_mosquitto  # re-exported (the broker process lives in mosquitto.py)


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
