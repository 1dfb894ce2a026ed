"""``topic_per_channel``: one topic per sensor (``plant/line1/pump1/temperature`` -> ``21.5``).

What Node-RED flows, Tasmota and many PLC gateways publish. The topic template names the device and
the channel (``plant/line1/{device}/{channel}``); the payload is a number, a numeric string, or a JSON
object ``{"value": ..., "ts": ...}`` (``ts`` optional: the arrival time otherwise). Each message is a
:class:`ChannelUpdate`; the assembler builds the device's rows on a fixed clock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .base import (
    ChannelUpdate,
    Item,
    LayoutFor,
    MessageRejected,
    Reading,
    device_id_problem,
    fixed_layout,
    no_model,
    timestamp_or_arrival,
    topic_pattern,
)


class TopicPerChannelParser:
    """One channel's value per message; device and channel from the topic.

    >>> p = TopicPerChannelParser(("temp", "flow"), "plant/{device}/{channel}", clock=lambda: 100.0)
    >>> p.parse("plant/p1/temp", b"21.5")
    [ChannelUpdate(device='p1', timestamp=100.0, values={'temp': 21.5}, clipped=False)]
    >>> u = p.parse("plant/p1/flow", b'{"value": "3", "ts": 90}')[0]
    >>> u.values, u.timestamp
    ({'flow': 3.0}, 90.0)
    """

    def __init__(self, channels: Sequence[str], template: str, clock: Callable[[], float] = time.time,
                 max_clock_skew: float | None = None,
                 bounds: tuple[Iterable[float], Iterable[float]] | None = None,
                 value_field: str = "value", timestamp_field: str = "ts",
                 layouts: LayoutFor | None = None) -> None:
        self.layout_for = fixed_layout(channels, bounds, layouts)
        self.pattern = topic_pattern(template, ("device", "channel"))
        self.clock = clock
        self.max_clock_skew = max_clock_skew
        self.value_field = value_field
        self.timestamp_field = timestamp_field

    def parse(self, topic: str, payload: bytes) -> list[Item]:
        arrival = self.clock()
        m = self.pattern.match(topic)
        if m is None:
            raise MessageRejected("no_device", f"topic {topic!r} does not match the topic template")
        device, channel = m.group("device"), m.group("channel")
        problem = device_id_problem(device)
        if problem is not None:
            return [Reading(device, arrival, None, ("bad_device_id", problem))]
        layout = self.layout_for(device)
        if layout is None:
            return [no_model(device, arrival)]
        j = layout.index.get(channel)
        if j is None:
            return [Reading(device, arrival, None, ("unknown_channel", f"channel {channel[:60]!r} is not a model "
                                                                        "channel"))]
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise MessageRejected("bad_payload", "payload is not UTF-8 text") from None
        raw_value: Any = text
        raw_ts: Any = None
        if text.startswith("{"):
            try:
                doc = json.loads(text)
            except (ValueError, RecursionError) as exc:
                raise MessageRejected("malformed_json", f"payload is not JSON: {str(exc)[:80]}") from None
            if not isinstance(doc, dict) or self.value_field not in doc:
                raise MessageRejected("bad_payload", f"JSON payload without {self.value_field!r}")
            raw_value, raw_ts = doc[self.value_field], doc.get(self.timestamp_field)
        try:
            ts = timestamp_or_arrival(raw_ts, arrival)
        except (ValueError, OverflowError) as exc:
            return [Reading(device, arrival, None, ("bad_timestamp", str(exc)[:120]))]
        if self.max_clock_skew is not None and ts > arrival + self.max_clock_skew:
            return [Reading(device, arrival, None, (
                "future_timestamp", f"timestamp {ts:.3f} is {ts - arrival:.0f} s ahead of this host's clock"))]
        got = layout.bounds.value(j, raw_value, numeric_strings=True)
        if isinstance(got, str):
            return [Reading(device, ts, None, ("bad_value", f"channel {channel!r}: {got}"))]
        return [ChannelUpdate(device, ts, {channel: got[0]}, got[1])]
