"""Messages -> whole rows per device, without a model: the reading path ``run`` and ``record`` share.

Both take a message the same way: screened (retained, too large), parsed by the first subscription
whose topic filter matches, single channels assembled into rows on the clock of
:class:`sensord.assembly.Assembler`. What becomes of a row (a window buffer and the scorer for the
daemon, a CSV line for ``sensord record``) and what a rejection costs (a metric, a summary line) is
the caller's, behind :class:`RowSink`; the rejection reasons are the same names on every path, so a
count in ``record``'s summary means what the daemon's ``sensord_readings_rejected_total`` means.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from typing import Protocol

import numpy as np

from .assembly import Assembler
from .config import SensordConfig
from .formats.base import (
    ChannelUpdate,
    DeviceDeath,
    Layout,
    LayoutFor,
    MessageRejected,
    Parser,
    RebirthRequest,
    escape,
    topic_matches,
)
from .formats.build import build_parser
from .formats.sparkplug_b import SparkplugParser
from .ratelimit import RateLimitedLog

log = logging.getLogger("sensord.pipeline")

Bounds = tuple[Iterable[float], Iterable[float]]


class RowSink(Protocol):
    """Where the reading path delivers; every method is called with the caller's lock held, if any."""

    def message_rejected(self, reason: str) -> None:
        """A whole message was unusable (``reason`` as in ``sensord_messages_rejected_total``); logged here."""

    def reject(self, reason: str, device: str, detail: str) -> None:
        """A reading was unusable (``reason`` as in ``sensord_readings_rejected_total``); count and log it."""

    def admit(self, device: str) -> bool:
        """Whether single channels of ``device`` go to the assembler (a refusal is counted by the sink)."""

    def touch(self, device: str, timestamp: float | None = None) -> None:
        """``device`` sent something usable stamped ``timestamp`` (it is alive)."""

    def row(self, device: str, timestamp: float, values: np.ndarray, clipped: bool) -> None:
        """One whole row of ``device``: a value for every channel, in the path's channel order."""

    def died(self, device: str) -> None:
        """The device announced its death (Sparkplug NDEATH/DDEATH); its held values are already gone."""

    def rebirth(self, request: RebirthRequest) -> None:
        """A stateful format asks a sender to define itself again (Sparkplug NCMD Rebirth): publish it."""


class ReadingPath:
    """The parsers of every subscription and the clock assemblers, for each device's channels.

    Without ``layouts`` every device has ``channels`` (a model's or the config's), clipped to ``bounds``
    and assembled on ``period``. With ``layouts`` (the daemon's models, ``record``'s per-device channels)
    each device has the channels, bounds and clock of its own layout, and a device with none is rejected
    as ``no_model``; ``channels`` and ``period`` then only name the first layout (:attr:`assembler`).

    ``period`` is the assembly clock (``SensordConfig.assembly_period``); None means no assembler, and
    single channels are then rejected as ``missing_channel``. ``bounds`` clip values (the daemon's
    ``scoring.clip_spreads``); ``record`` gives none and writes what the machines sent.
    """

    def __init__(self, cfg: SensordConfig, channels: Sequence[str], period: float | None,
                 bounds: Bounds | None = None, warn: RateLimitedLog | None = None,
                 layouts: LayoutFor | None = None) -> None:
        self.cfg = cfg
        self.channels = tuple(channels)
        self.period = period
        self.warn = warn if warn is not None else RateLimitedLog(log, cfg.logging.rate_limit_seconds)
        if layouts is None:
            one = Layout.of(self.channels, bounds, period)
            layouts = lambda _device: one  # noqa: E731
        self.layout_for: LayoutFor = layouts
        self.parsers: list[tuple[str, Parser]] = [
            (sub.topic, build_parser(sub, cfg.mqtt, self.channels, cfg.daemon.max_clock_skew_seconds, bounds,
                                     layouts))
            for sub in cfg.mqtt.subscription_list()]
        # One assembler per (channels, clock): devices of one model kind share it.
        self.assemblers: dict[tuple[object, ...], Assembler] = {}
        if period is not None:
            self._assembler_for(self.channels, period)

    def _clock(self, channels: tuple[str, ...], period: float) -> tuple[object, ...]:
        a = self.cfg.assembly
        return channels, period, a.staleness(period), a.late_tolerance_seconds

    def _assembler_for(self, channels: tuple[str, ...], period: float) -> Assembler:
        key = self._clock(channels, period)
        assembler = self.assemblers.get(key)
        if assembler is None:
            a = self.cfg.assembly
            assembler = self.assemblers[key] = Assembler(channels, period, a.staleness(period),
                                                         a.late_tolerance_seconds)
        return assembler

    @property
    def assembler(self) -> Assembler | None:
        """The assembler of ``channels`` on ``period`` (the only one when every device has those)."""
        return None if self.period is None else self.assemblers.get(self._clock(self.channels, self.period))

    def carry_over(self, old: ReadingPath) -> None:
        """After a reload: keep what the old path learnt that the new one cannot know yet: the held values
        of each assembler whose channels and clock are unchanged (minus the devices whose channels or clock
        changed), and Sparkplug aliases (named only at BIRTH)."""
        for key, assembler in old.assemblers.items():
            if key in self.assemblers and self.assemblers[key].devices:
                continue
            for device in list(assembler.devices):
                layout = self.layout_for(device)
                if layout is None or layout.period is None or self._clock(layout.channels, layout.period) != key:
                    assembler.forget(device)
            self.assemblers[key] = assembler
        for (topic, parser), (old_topic, old_parser) in zip(self.parsers, old.parsers, strict=False):
            if topic == old_topic and isinstance(parser, SparkplugParser) and isinstance(old_parser, SparkplugParser):
                parser.aliases = old_parser.aliases

    def parser_for(self, topic: str) -> Parser:
        """The parser of the first subscription whose filter matches ``topic`` (else the first one's)."""
        if len(self.parsers) == 1:  # (the usual case: no matching needed)
            return self.parsers[0][1]
        for topic_filter, parser in self.parsers:
            if topic_matches(topic_filter, topic):
                return parser
        return self.parsers[0][1]

    def tracks(self, device: str) -> bool:
        """Whether an assembler holds values of ``device``."""
        return any(device in a for a in self.assemblers.values())

    def assembling(self) -> list[str]:
        """The devices the assemblers hold values of."""
        return list(dict.fromkeys(d for a in self.assemblers.values() for d in a.devices))

    def refusal(self, device: str, known: Collection[str]) -> tuple[str, str] | None:
        """Why ``device`` may not become a tracked device, as ``(reason, detail)``, or None if it may.

        The one admission rule of ``run`` and ``record`` (``daemon.max_device_id_bytes``, then
        ``daemon.max_devices``): ``known`` are the devices the caller already tracks; a device the
        assembler already holds values of counts as tracked too.
        """
        if device in known or self.tracks(device):
            return None
        limit = self.cfg.daemon.max_device_id_bytes
        if len(device.encode("utf-8", "surrogatepass")) > limit:
            return "bad_device_id", f"device id is longer than daemon.max_device_id_bytes={limit}"
        tracked = len(known) + sum(d not in known for d in self.assembling())
        if tracked >= self.cfg.daemon.max_devices:
            return "device_limit", f"max_devices={self.cfg.daemon.max_devices} already tracked"
        return None

    def forget(self, device: str) -> None:
        for a in self.assemblers.values():
            a.forget(device)

    def take(self, topic: str, payload: bytes, retained: bool, sink: RowSink) -> None:
        """One message: screened, parsed, assembled; everything it yields goes to ``sink``.

        Raises only what a parser or the sink raises by mistake (the caller guards against that).
        """
        if retained:
            # The broker's stored copy, from before we subscribed: an old reading (or one from a glitched
            # clock) that would be replayed on every restart. Live readings never arrive retained.
            sink.message_rejected("retained")
            self.warn.warning("message:retained", "retained message on topic=%s ignored: telemetry must "
                              "not be published with retain", escape(topic))
            return
        limit = self.cfg.mqtt.max_payload_bytes
        if len(payload) > limit:
            sink.message_rejected("too_large")
            self.warn.warning("message:too_large", "message rejected reason=too_large topic=%s: %d bytes, "
                              "mqtt.max_payload_bytes is %d", escape(topic), len(payload), limit)
            return
        try:
            readings = self.parser_for(topic).parse(topic, payload)
        except MessageRejected as exc:
            sink.message_rejected(exc.reason)
            self.warn.warning(f"message:{exc.reason}", "message rejected reason=%s topic=%s: %s",
                              exc.reason, escape(topic), escape(exc))
            return
        for r in readings:
            if isinstance(r, ChannelUpdate):
                self._assemble(r, sink)
            elif isinstance(r, DeviceDeath):
                self.forget(r.device)
                sink.died(r.device)
            elif isinstance(r, RebirthRequest):
                sink.rebirth(r)
            elif r.problem is not None:
                sink.reject(r.problem[0], r.device, r.problem[1])
            else:
                assert r.values is not None
                sink.row(r.device, r.timestamp, r.values, r.clipped)

    def _assemble(self, update: ChannelUpdate, sink: RowSink) -> None:
        """Single channels -> rows on the assembly clock -> the sink."""
        layout = self.layout_for(update.device)
        if layout is None:  # (the parser has said so already)
            return
        if layout.period is None:  # (start-up requires the period for every format that sends these)
            sink.reject("missing_channel", update.device, "channels arrive separately but "
                        "assembly.sample_period_seconds is not set")
            return
        if not sink.admit(update.device):
            return
        done = self._assembler_for(layout.channels, layout.period).add(update.device, update.timestamp,
                                                                        update.values)
        if not done.problems or done.rows:
            sink.touch(update.device, update.timestamp)
        for reason, detail in done.problems:
            sink.reject(reason, update.device, detail)
        for ts, values in done.rows:
            sink.row(update.device, ts, values, update.clipped)
