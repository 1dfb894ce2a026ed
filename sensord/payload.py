"""MQTT payloads -> readings: the pure part of intake (topic + bytes in, readings out, no broker).

Kept apart from the broker connection (:mod:`sensord.source`) so every payload
rule is unit-testable without a broker and the parser does not import paho.
Timestamps go through :func:`sensord.timeparse.unix_seconds`, the parser CSV
files use too.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .timeparse import unix_seconds

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
                 bounds: tuple[Iterable[float], Iterable[float]] | None = None) -> None:
        self.channels = tuple(channels)
        # Finite values outside [low, high] (per channel) are clipped to them; NaN/inf are left for the window
        # buffer to reject. Plain lists: one comparison per value costs less than numpy on 8 numbers.
        self.low: list[float] | None = list(map(float, bounds[0])) if bounds else None
        self.high: list[float] | None = list(map(float, bounds[1])) if bounds else None
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
