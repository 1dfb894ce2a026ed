"""``json``: one JSON object per reading, a JSON array of them, or Telegraf's ``{"metrics": [...]}`` batch.

The device comes from the topic template or a payload field; device, timestamp and values fields may be
dotted paths (``tags.host``, ``fields``), so Telegraf's JSON output is read with
``device_field: tags.host, values_field: fields, timestamp_field: timestamp``. Numbers sent as strings
(``"2.57"``) are accepted. With ``partial`` (report by exception) a reading may carry only the channels
that changed: it becomes a :class:`ChannelUpdate` for the assembler instead of a whole row.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec
import numpy as np

from .base import (
    ChannelUpdate,
    Item,
    Layout,
    LayoutFor,
    MessageRejected,
    Reading,
    device_id_problem,
    fixed_layout,
    no_model,
    timestamp_or_arrival,
    topic_pattern,
)

_MISSING = object()

# msgspec's decoder is about 7x faster than json.loads on a reading (0.7 against 5.4 us); whatever it
# refuses (NaN, numbers out of float range, integers past 4300 digits, a BOM or UTF-16, lone surrogates,
# deep nesting, malformed text) goes to json.loads, which decides exactly as before: what it accepts is
# accepted and what it refuses is rejected with its own message.
_fast_decode = msgspec.json.Decoder().decode

# Device ids already checked by device_id_problem (a bounded cache: hostile ids cannot grow it for ever).
_KNOWN_IDS_MAX = 100_000


def lookup(doc: dict[str, Any], path: str) -> Any:
    """``doc[path]``, or following a dotted path (``tags.host``); ``_MISSING`` when absent.

    A key that itself contains the dot wins, so a flat ``{"tags.host": ...}`` still reads.

    >>> lookup({"tags": {"host": "p1"}}, "tags.host"), lookup({"a.b": 1}, "a.b")
    ('p1', 1)
    """
    if path in doc:
        return doc[path]
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


class JsonParser:
    """JSON payloads -> readings for the model's channels.

    >>> p = JsonParser(("a", "b"), "plant/{device}/telemetry", None, "ts", "values")
    >>> msg = b'{"ts": 5, "a": 1, "b": "2"}'
    >>> [(r.device, r.timestamp, r.values.tolist()) for r in p.parse("plant/p1/telemetry", msg)]
    [('p1', 5.0, [1.0, 2.0])]
    """

    def __init__(self, channels: Sequence[str], device_topic: str | None, device_field: str | None,
                 timestamp_field: str, values_field: str, clock: Callable[[], float] = time.time,
                 max_clock_skew: float | None = None,
                 bounds: tuple[Iterable[float], Iterable[float]] | None = None,
                 partial: bool = False, layouts: LayoutFor | None = None) -> None:
        self.channels = tuple(channels)  # (the channels of every device unless ``layouts`` says otherwise)
        self.layout_for = fixed_layout(channels, bounds, layouts)
        self.max_clock_skew = max_clock_skew
        self.device_field = device_field
        self.timestamp_field = timestamp_field
        self.values_field = values_field
        self.clock = clock
        self.partial = partial
        self._topic_re: re.Pattern[str] | None = None
        self._known_ids: set[str] = set()  # device ids that passed device_id_problem
        if device_topic is not None:
            self._topic_re = topic_pattern(device_topic, ("device",))

    def device_from_topic(self, topic: str) -> str | None:
        if self._topic_re is None:
            return None
        m = self._topic_re.match(topic)
        return m.group("device") if m else None

    def parse(self, topic: str, payload: bytes) -> list[Item]:
        arrival = self.clock()
        try:
            doc = _fast_decode(payload)
        except Exception:  # noqa: BLE001 - the standard library decides, see _fast_decode
            doc = _MISSING
        try:
            if doc is _MISSING:
                doc = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MessageRejected("malformed_json", f"payload is not JSON: {exc}") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits (int_max_str_digits)
            raise MessageRejected("malformed_json", f"payload is not usable JSON: {str(exc)[:80]}") from None
        except RecursionError:
            raise MessageRejected("malformed_json", "payload is nested too deeply") from None
        if isinstance(doc, dict) and isinstance(doc.get("metrics"), list) and len(doc) == 1:
            doc = doc["metrics"]  # Telegraf's JSON batch
        items = doc if isinstance(doc, list) else [doc]
        if not items:
            raise MessageRejected("bad_payload", "empty JSON array")
        topic_device = self.device_from_topic(topic)
        readings: list[Item] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise MessageRejected("bad_payload", f"item {i}: expected a JSON object, got {type(item).__name__}")
            device = topic_device
            if self.device_field is not None:
                raw = lookup(item, self.device_field)
                if raw is not _MISSING:
                    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
                        readings.append(Reading("?", arrival, None, (
                            "bad_device_id",
                            f"field {self.device_field!r} must be a string, got {type(raw).__name__}")))
                        continue
                    device = str(raw)
            if device is None:
                raise MessageRejected("no_device", f"no device id in topic {topic!r}"
                                      + (f" or field {self.device_field!r}" if self.device_field else ""))
            if device not in self._known_ids:
                problem = device_id_problem(device)
                if problem is not None:
                    readings.append(Reading(device, arrival, None, ("bad_device_id", problem)))
                    continue
                if len(self._known_ids) >= _KNOWN_IDS_MAX:
                    self._known_ids.clear()
                self._known_ids.add(device)
            readings.append(self._reading(device, item, arrival))
        return readings

    def _reading(self, device: str, item: dict[str, Any], arrival: float) -> Item:
        raw_ts = lookup(item, self.timestamp_field)
        try:
            ts = timestamp_or_arrival(None if raw_ts is _MISSING else raw_ts, arrival)
        except (ValueError, OverflowError) as exc:
            return Reading(device, arrival, None, ("bad_timestamp", str(exc)))
        if self.max_clock_skew is not None and ts > arrival + self.max_clock_skew:
            # Never let it become the device's last reading: every later reading would be out of order.
            return Reading(device, arrival, None, (
                "future_timestamp", f"timestamp {ts:.3f} is {ts - arrival:.0f} s ahead of this host's clock "
                f"(daemon.max_clock_skew_seconds={self.max_clock_skew:g})"))
        layout = self.layout_for(device)
        if layout is None:
            return no_model(device, ts)
        source = lookup(item, self.values_field)
        if source is _MISSING:
            source = item
        if not isinstance(source, dict):
            return Reading(device, ts, None, ("bad_value", f"{self.values_field!r} must be an object"))
        if not self.partial:
            row = self._row(source, layout)
            if row is not None:
                return Reading(device, ts, np.array(row, dtype=np.float64))
        values = np.empty(len(layout.channels), dtype=np.float64)  # float64: 1e39 stays finite, to be clipped
        present: dict[str, float] = {}
        clipped = False
        bounds = layout.bounds
        for j, ch in enumerate(layout.channels):
            v = source.get(ch)
            if v is None:
                if self.partial:
                    continue
                return Reading(device, ts, None, ("missing_channel", f"channel {ch!r} missing"))
            got = bounds.value(j, v, numeric_strings=True)
            if isinstance(got, str):
                return Reading(device, ts, None, ("bad_value", f"channel {ch!r}: {got}"))
            values[j], c = got
            present[ch] = got[0]
            clipped = clipped or c
        if self.partial:
            if not present:
                return Reading(device, ts, None, ("missing_channel", "none of the model's channels present"))
            return ChannelUpdate(device, ts, present, clipped)
        return Reading(device, ts, values, clipped=clipped)

    @staticmethod
    def _row(source: dict[str, Any], layout: Layout) -> list[float] | None:
        """The common case cheaply: every channel a JSON float (or, within the bounds, an integer) that
        needs no clipping; None for anything else, which the general loop above decides (and words)."""
        low, high = layout.bounds.low, layout.bounds.high
        row: list[float] = []
        for j, ch in enumerate(layout.channels):
            v: Any = source.get(ch)
            t = type(v)
            if t is float:
                if low is not None and high is not None and (v < low[j] or v > high[j]):
                    return None
            elif t is int and low is not None and high is not None:
                if not low[j] <= v <= high[j]:
                    return None
            else:
                return None
            row.append(v)
        return row
