"""What every wire format shares: readings, rejections, device-id rules, and the one parser interface.

A parser is pure (topic + bytes in, readings out; no broker, no clock of its own
beyond the injected one), so every format is unit-testable without Mosquitto.
A format either yields whole rows (:class:`Reading`, one value per model channel)
or single channels (:class:`ChannelUpdate`), which :mod:`sensord.assembly` turns
into rows on a fixed clock.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..timeparse import unix_seconds

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
    """One whole row for a device: a value for every model channel (or why there is none)."""

    device: str
    timestamp: float
    values: np.ndarray | None  # None when the reading itself is bad (see ``problem``)
    problem: tuple[str, str] | None = None  # (reason, detail) for a rejected reading
    clipped: bool = False  # a value was outside the parser's bounds and was clipped to them


@dataclass(frozen=True)
class ChannelUpdate:
    """Some of a device's channels at one time (per-channel topics, report by exception).

    Rows are built from these by :class:`sensord.assembly.Assembler`, never by the parser.
    """

    device: str
    timestamp: float
    values: dict[str, float]
    clipped: bool = False


@dataclass(frozen=True)
class DeviceDeath:
    """The device said it went away (Sparkplug NDEATH/DDEATH): its window restarts, its alert state stays."""

    device: str


@dataclass(frozen=True)
class RebirthRequest:
    """A stateful format lost track of a sender (Sparkplug: a sequence gap, data before its birth) and
    asks it to send its definitions again: ``topic`` and ``payload`` are the command to publish."""

    node: str
    reason: str
    topic: str
    payload: bytes


Item = Reading | ChannelUpdate | DeviceDeath | RebirthRequest


class Parser(Protocol):
    """The one interface of a wire format: bytes on a topic -> readings, pure.

    Raises :class:`MessageRejected` when the whole message is unusable; a bad reading inside
    a good message is a :class:`Reading` with a ``problem``. Never raises anything else.
    """

    def parse(self, topic: str, payload: bytes) -> list[Item]: ...


def timestamp_or_arrival(raw: Any, arrival: float) -> float:
    return arrival if raw is None else unix_seconds(raw)


def topic_pattern(template: str, names: Sequence[str]) -> re.Pattern[str]:
    """A regex for a topic template such as ``plant/{device}/{channel}``: each ``{name}`` is one topic level.

    >>> topic_pattern("p/{device}/{channel}", ("device", "channel")).match("p/a/b").groupdict()
    {'device': 'a', 'channel': 'b'}
    """
    out, rest = "^", template
    while True:
        m = re.search(r"\{(" + "|".join(map(re.escape, names)) + r")\}", rest)
        if m is None:
            return re.compile(out + re.escape(rest) + "$")
        out += re.escape(rest[:m.start()]) + f"(?P<{m.group(1)}>[^/]+)"
        rest = rest[m.end():]


def shared_filter_topic(topic_filter: str) -> str:
    """The filter an MQTT 5 shared subscription (``$share/<group>/<filter>``) matches messages with: the
    broker delivers them on their own topics, without the prefix.

    >>> shared_filter_topic("$share/sensord/sensors/+/telemetry"), shared_filter_topic("sensors/+/telemetry")
    ('sensors/+/telemetry', 'sensors/+/telemetry')
    """
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) == 3:
            return parts[2]
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching (``+`` one level, ``#`` the rest), for choosing a subscription's parser.

    >>> [topic_matches("a/+/c", "a/b/c"), topic_matches("a/#", "a"), topic_matches("a/+", "a/b/c")]
    [True, True, False]
    >>> topic_matches("$share/g/a/+", "a/b")
    True
    """
    f, t = shared_filter_topic(topic_filter).split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def topic_filter_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` is not a valid MQTT topic filter, or None.

    >>> [topic_filter_problem(f) for f in ("a/+/b", "a/#", "a/b#", "", "a/#/b")]
    [None, None, "'#' must be a whole level", 'empty topic filter', "'#' must be the last level"]
    """
    if not topic_filter:
        return "empty topic filter"
    if "\x00" in topic_filter:
        return "contains NUL"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level:
            if level != "#":
                return "'#' must be a whole level"
            if i != len(levels) - 1:
                return "'#' must be the last level"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def filter_meets_template(topic_filter: str, template: str) -> bool:
    """Whether some topic matches both ``topic_filter`` and the topic ``template`` (``{name}`` = one level,
    or part of one): a subscription whose filter never meets the device template cannot find a device id.

    >>> [filter_meets_template(f, "plant/{device}/telemetry") for f in ("plant/+/telemetry", "plant/#", "plant/+")]
    [True, True, False]
    >>> filter_meets_template("plant/pump-7/+", "plant/pump-{device}/{channel}")
    True
    >>> filter_meets_template("$share/sensord/plant/+/telemetry", "plant/{device}/telemetry")
    True
    """
    f_levels, t_levels = shared_filter_topic(topic_filter).split("/"), template.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level == "+":
            continue
        names = re.findall(r"\{(\w+)\}", t_levels[i])
        if not topic_pattern(t_levels[i], names).match(level):
            return False
    return len(f_levels) == len(t_levels)


class Bounds:
    """Per-channel clip bounds: finite values outside [low, high] are clipped; NaN/inf are left for the
    window buffer to reject. Plain lists: one comparison per value costs less than numpy on 8 numbers."""

    def __init__(self, bounds: tuple[Iterable[float], Iterable[float]] | None) -> None:
        self.low: list[float] | None = list(map(float, bounds[0])) if bounds else None
        self.high: list[float] | None = list(map(float, bounds[1])) if bounds else None

    def value(self, j: int, raw: Any, numeric_strings: bool) -> tuple[float, bool] | str:
        """``(value, clipped)`` for channel ``j``, or why ``raw`` is not a usable number."""
        if isinstance(raw, str) and numeric_strings:
            try:
                raw = float(raw.strip())
            except ValueError:
                return f"not a number: {raw[:40]!r}"
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            return f"not a number: {raw!r}"[:80]
        v: int | float = raw
        clipped = False
        low, high = self.low, self.high
        if low is not None and high is not None and (v < low[j] or v > high[j]):
            try:
                if math.isfinite(v):
                    v, clipped = (low[j] if v < low[j] else high[j]), True
            except OverflowError:  # an int beyond float range
                v, clipped = (low[j] if v < 0 else high[j]), True
        try:
            return float(v), clipped
        except OverflowError:  # an int beyond float range, no bounds to clip it to
            return "number out of range"


@dataclass(frozen=True)
class Layout:
    """The channels a device's rows have (its model's, in the model's order), their clip bounds, and the
    clock single channels are assembled on (None: no assembly).

    One daemon may serve models with different channels (a pump and a compressor), so a parser asks for
    the layout of each device it finds (:data:`LayoutFor`) instead of holding one channel list.
    """

    channels: tuple[str, ...]
    bounds: Bounds = field(compare=False)
    period: float | None = None
    index: dict[str, int] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, channels: Sequence[str], bounds: tuple[Iterable[float], Iterable[float]] | None = None,
           period: float | None = None) -> Layout:
        chs = tuple(channels)
        return cls(chs, Bounds(bounds), period, {ch: j for j, ch in enumerate(chs)})


# The layout of a device's rows, or None when no model is bound to it (its readings are ``no_model``).
LayoutFor = Callable[[str], Layout | None]
NO_MODEL = "no_model"


def fixed_layout(channels: Sequence[str], bounds: tuple[Iterable[float], Iterable[float]] | None = None,
                 layouts: LayoutFor | None = None) -> LayoutFor:
    """``layouts`` if given, else one layout for every device (a parser built for one channel list)."""
    if layouts is not None:
        return layouts
    one = Layout.of(channels, bounds)
    return lambda _device: one


def no_model(device: str, timestamp: float) -> Reading:
    """The rejection of a reading of a device that no model serves (no channels to read it with)."""
    return Reading(device, timestamp, None, (NO_MODEL, "no model (daemon.models) serves this device"))
