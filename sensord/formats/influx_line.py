"""``influx_line``: InfluxDB line protocol, Telegraf's default MQTT output format.

``measurement,tag=value,... field=value,... [timestamp]``, one point per line. Escapes: ``\\,`` ``\\=``
``\\ `` in measurement, tag keys/values and field keys; string field values in double quotes. Field
values: floats (``1.5``, ``1e3``), integers ``12i`` and unsigned ``12u`` (read as numbers), booleans
(``t``, ``true``, ...) and strings. A model channel given as a boolean or string is a ``bad_value``;
other fields are ignored. The timestamp is an integer in ``precision`` units (``ns`` by default, as
Telegraf writes it); without one the arrival time is used. The device is the ``device_tag`` tag
(``host`` by default), else the topic template's ``{device}``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from .base import (
    ChannelUpdate,
    Item,
    LayoutFor,
    MessageRejected,
    Reading,
    device_id_problem,
    fixed_layout,
    no_model,
    topic_pattern,
)

PRECISION_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
_BOOLEANS = frozenset({"t", "T", "true", "True", "TRUE", "f", "F", "false", "False", "FALSE"})
_UNESCAPE = re.compile(r"\\(.)")
_MAX_LINES = 10_000


def split(text: str, sep: str, quotes: bool = False) -> list[str]:
    r"""``text`` cut at every ``sep`` that is not escaped (``\``) nor, with ``quotes``, inside "...".

    >>> split(r'a\,b,c="x,y",d', ",", quotes=True)
    ['a\\,b', 'c="x,y"', 'd']
    """
    out, start, i, quoted = [], 0, 0, False
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if quotes and c == '"':
            quoted = not quoted
        elif c == sep and not quoted:
            out.append(text[start:i])
            start = i + 1
        i += 1
    out.append(text[start:])
    return out


def unescape(text: str) -> str:
    return _UNESCAPE.sub(r"\1", text)


def field_value(raw: str) -> float | str | bool:
    """A field's value: a number (``1.5``, ``3i``, ``3u``), a boolean, or a string (quoted).

    >>> [field_value(v) for v in ("1.5", "-3i", "7u", "true", '"ok"')]
    [1.5, -3.0, 7.0, True, 'ok']
    """
    if raw.startswith('"'):
        if len(raw) < 2 or not raw.endswith('"'):
            raise ValueError(f"unterminated string {raw[:40]!r}")
        return raw[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if raw in _BOOLEANS:
        return raw[0] in "tT"
    if raw[-1:] in ("i", "u"):
        return float(int(raw[:-1]))
    return float(raw)


class InfluxLineParser:
    r"""Line protocol -> readings; each line a whole row, or (``partial``) the channels it carries.

    >>> p = InfluxLineParser(("temp", "flow"), precision="s")
    >>> r = p.parse("telegraf/pumps", b"pump,host=p\\ 1,line=1 temp=21.5,flow=3i,state=\"ok\" 1700000000\n")[0]
    >>> r.device, r.timestamp, r.values.tolist()
    ('p 1', 1700000000.0, [21.5, 3.0])
    """

    def __init__(self, channels: Sequence[str], device_tag: str = "host", device_topic: str | None = None,
                 precision: str = "ns", clock: Callable[[], float] = time.time,
                 max_clock_skew: float | None = None,
                 bounds: tuple[Iterable[float], Iterable[float]] | None = None,
                 measurement: str | None = None, partial: bool = False, layouts: LayoutFor | None = None) -> None:
        self.layout_for = fixed_layout(channels, bounds, layouts)
        self.device_tag = device_tag
        self.topic_re = topic_pattern(device_topic, ("device",)) if device_topic else None
        self.unit = PRECISION_SECONDS[precision]
        self.clock = clock
        self.max_clock_skew = max_clock_skew
        self.measurement = measurement
        self.partial = partial

    def parse(self, topic: str, payload: bytes) -> list[Item]:
        arrival = self.clock()
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise MessageRejected("bad_payload", "payload is not UTF-8 text") from None
        lines = [ln for ln in (raw.strip() for raw in text.splitlines()) if ln and not ln.startswith("#")]
        if not lines:
            raise MessageRejected("bad_payload", "no line-protocol points in the payload")
        if len(lines) > _MAX_LINES:
            raise MessageRejected("bad_payload", f"more than {_MAX_LINES} points in one message")
        m = self.topic_re.match(topic) if self.topic_re is not None else None
        topic_device = m.group("device") if m else None
        out: list[Item] = []
        for n, line in enumerate(lines, 1):
            item = self._line(n, line, topic_device, arrival)
            if item is not None:
                out.append(item)
        if not out:
            raise MessageRejected("bad_payload", f"no point of measurement {self.measurement!r}")
        return out

    def _line(self, n: int, line: str, topic_device: str | None, arrival: float) -> Item | None:
        first = split(line, " ")[0]  # measurement and tags: quotes mean nothing there
        parts = [first, *(p for p in split(line[len(first) + 1:], " ", quotes=True) if p)]
        if len(parts) not in (2, 3):
            return Reading("?", arrival, None, ("malformed_line", f"line {n}: expected 'measurement,tags fields "
                                                                    f"[timestamp]': {line[:80]!r}"))
        head = split(parts[0], ",")
        if self.measurement is not None and unescape(head[0]) != self.measurement:
            return None
        tags = {}
        for tag in head[1:]:
            kv = split(tag, "=")
            if len(kv) != 2 or not kv[0]:
                return Reading("?", arrival, None, ("malformed_line", f"line {n}: bad tag {tag[:40]!r}"))
            tags[unescape(kv[0])] = unescape(kv[1])
        device = tags.get(self.device_tag, topic_device)
        if device is None:
            return Reading("?", arrival, None, ("bad_device_id", f"line {n}: no tag {self.device_tag!r}"))
        problem = device_id_problem(device)
        if problem is not None:
            return Reading(device, arrival, None, ("bad_device_id", problem))
        ts = arrival
        if len(parts) == 3:
            try:
                ts = int(parts[2]) * self.unit
            except ValueError:
                return Reading(device, arrival, None, ("bad_timestamp", f"line {n}: not an integer: "
                                                                         f"{parts[2][:30]!r}"))
            if self.max_clock_skew is not None and ts > arrival + self.max_clock_skew:
                return Reading(device, arrival, None, ("future_timestamp", f"line {n}: timestamp {ts:.3f} is "
                                                       f"{ts - arrival:.0f} s ahead of this host's clock"))
        layout = self.layout_for(device)
        if layout is None:
            return no_model(device, ts)
        values: dict[str, float] = {}
        clipped = False
        for fld in split(parts[1], ",", quotes=True):
            kv = split(fld, "=", quotes=True)
            if len(kv) != 2 or not kv[0] or not kv[1]:
                return Reading(device, ts, None, ("malformed_line", f"line {n}: bad field {fld[:40]!r}"))
            key = unescape(kv[0])
            try:
                value = field_value(kv[1])
            except (ValueError, OverflowError) as exc:
                return Reading(device, ts, None, ("malformed_line", f"line {n}: field {key[:40]!r}: {exc}"))
            j = layout.index.get(key)
            if j is None:
                continue
            got = layout.bounds.value(j, value, numeric_strings=False)
            if isinstance(got, str):
                return Reading(device, ts, None, ("bad_value", f"line {n}: channel {key!r}: {got}"))
            values[key], c = got
            clipped = clipped or c
        if self.partial:
            if not values:
                return Reading(device, ts, None, ("missing_channel", f"line {n}: none of the model's channels"))
            return ChannelUpdate(device, ts, values, clipped)
        missing = [ch for ch in layout.channels if ch not in values]
        if missing:
            return Reading(device, ts, None, ("missing_channel", f"line {n}: channel {missing[0]!r} missing"))
        return Reading(device, ts, np.array([values[ch] for ch in layout.channels], dtype=np.float64),
                       clipped=clipped)
