"""Sinks: where decisions go — MQTT alert/state/score topics and the Prometheus metrics.

Alerts are QoS 1 (an operator must get them); the per-device state is
retained so a dashboard or a freshly started consumer sees the current state
at once; per-window scores are optional QoS 0 telemetry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from .detector import AlertEvent, Decision
from .metrics import DaemonMetrics
from .outbox import Outbox


class Publisher(Protocol):
    def publish(self, topic: str, payload: str | bytes, qos: int = 0, retain: bool = False) -> Any: ...


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def number(x: float, digits: int) -> float | None:
    """Rounded for a payload; ``null`` rather than NaN/Infinity, which strict JSON parsers refuse."""
    return round(x, digits) if math.isfinite(x) else None


def dumps(body: dict[str, Any]) -> str:
    """Strict JSON: raises rather than writing NaN or Infinity."""
    return json.dumps(body, allow_nan=False)


def alert_payload(event: AlertEvent, model_id: str) -> dict[str, Any]:
    return {
        "alert_id": event.alert_id,
        "device": event.device,
        "state": event.state,
        "window_start": iso(event.window_start),
        "window_end": iso(event.window_end),
        "raised_at": iso(event.raised_at),
        "score": number(event.score, 6),
        "error": number(event.error, 8),
        "threshold": number(event.threshold, 8),
        "top_channels": [{"channel": ch, "share": number(share, 4)} for ch, share in event.top_channels],
        "model_id": model_id,
    }


class AlertPublisher:
    """Publishes alert events, the retained per-device state and (optionally) every window's score."""

    def __init__(self, publisher: Publisher, prefix: str, publish_scores: bool = False,
                 outbox: Outbox | None = None) -> None:
        self.publisher = publisher
        self.prefix = prefix
        self.publish_scores = publish_scores
        self.outbox = outbox

    def alert(self, event: AlertEvent, model_id: str, before_publish: Callable[[], object] | None = None) -> None:
        """Publish an alert (through the outbox if there is one) and the device's new retained state.

        ``before_publish`` runs once the alert is safe in the outbox and before it is sent: the scoring
        loop saves the detector state there, so a crash at any point neither loses the alert nor
        raises it a second time.
        """
        body = alert_payload(event, model_id)
        topic = f"{self.prefix}/alerts/{event.device}"
        if self.outbox is not None:  # on disk until the broker acknowledges it
            self.outbox.send(topic, dumps(body), before_publish)
        else:
            if before_publish is not None:
                before_publish()
            self.publisher.publish(topic, dumps(body), qos=1)
        self.state(event.device, event.state == "raised", event.window_end, event.score, model_id)

    def state(self, device: str, active: bool, since: float, score: float, model_id: str) -> None:
        body = {"device": device, "state": "alert" if active else "normal", "since": iso(since),
                "score": number(score, 6), "model_id": model_id}
        self.publisher.publish(f"{self.prefix}/state/{device}", dumps(body), qos=1, retain=True)

    def stale(self, device: str, since: float, alert: bool, model_id: str) -> None:
        """The device went silent: retained state ``stale`` (``alert`` keeps its alert state) and availability
        ``offline``, Zigbee2MQTT style."""
        body = {"device": device, "state": "stale", "since": iso(since), "alert": alert, "model_id": model_id}
        self.publisher.publish(f"{self.prefix}/state/{device}", dumps(body), qos=1, retain=True)
        self.availability(device, False)

    def availability(self, device: str, online: bool) -> None:
        self.publisher.publish(f"{self.prefix}/availability/{device}",
                               dumps({"state": "online" if online else "offline"}), qos=1, retain=True)

    def score(self, device: str, window_end: float, error: float, decision: Decision) -> None:
        if self.publish_scores:
            body = {"device": device, "window_end": iso(window_end), "error": number(error, 8),
                    "score": number(decision.score, 6), "over": decision.over, "alert": decision.active}
            self.publisher.publish(f"{self.prefix}/scores/{device}", dumps(body), qos=0)


class MetricsSink:
    """Per-window metric updates, kept here so the scoring loop only calls one thing per window.

    The per-device series are plain values in :class:`~sensord.metrics.DaemonMetrics` (read when scraped),
    so a window costs a few dict stores, not a dozen locked label children (``bench/throughput.py
    --profile``: that was most of the scoring thread's time). Forgetting a device and a change of
    channels go through here too (:meth:`forget`, :meth:`channels_changed`).
    """

    def __init__(self, metrics: DaemonMetrics) -> None:
        self.m = metrics

    def window(self, device: str, error: float, decision: Decision, channels: tuple[str, ...] = (),
               shares: Sequence[float] = ()) -> None:
        """One scored window: its error, score and state, and each channel's share of its error (the "why"
        an operator and an alert's text need: which sensors drive the score)."""
        self.m.window_scored(device, error, decision.score, decision.active, channels, shares)
        if decision.event is not None and decision.event.state == "raised":
            self.m.alerts_raised.labels(device).inc()

    def forget(self, device: str) -> None:
        """Drop every series of ``device``."""
        self.m.forget_device(device)

    def channels_changed(self) -> None:
        """The model now has other channels: the old channels' shares would be stale forever, so every
        share series goes; each device's come back with its next window."""
        self.m.channel_error_share.clear()
