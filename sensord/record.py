"""``sensord record``: collect a healthy period from the machines themselves, one CSV per device.

It takes readings exactly as ``sensord run`` does (the daemon's MQTT connection code, every
subscription's parser, the clock assembler: :class:`sensord.readings.ReadingPath`) but needs no model:
each device's channels are those of the ``daemon.models`` entry that matches it (its bundle's when one
is there, else the entry's ``channels``), else ``data.channels``, else the bundle at ``daemon.model``
(:class:`RecordingChannels`), so a pump and a compressor with other sensors are recorded side by side;
the clock is ``assembly.sample_period_seconds`` (else that bundle's). Each device's rows go to
``<out>/<device>.csv`` in the wide format ``sensord train`` reads (``timestamp`` in Unix seconds, then
one column per channel of that device), each line written whole and flushed as it comes, so a recording
stopped by ``--duration``, SIGINT or SIGTERM (or a power cut) ends on a complete line.

A row is refused for the reasons, under the names, the daemon counts in
``sensord_readings_rejected_total`` / ``sensord_messages_rejected_total``; a row stamped before the
device's last one is refused as ``out_of_order`` (a recording never goes back in time; the daemon's
``clock_resync_after`` does not apply). Values are written as sent: no clipping (there is no model).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

import numpy as np

from .bundle import BundleError, ModelBundle
from .config import ConfigError, SensordConfig
from .errors import UsageError
from .formats.base import Layout, LayoutFor, RebirthRequest, escape
from .ratelimit import RateLimitedLog
from .readings import ReadingPath
from .windows import ReadingRejected, WindowBuffer, WindowSpec

log = logging.getLogger(__name__)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``24h``, ``2d`` or a sum such as ``1h30m``.

    >>> [parse_duration(t) for t in ("90", "2.5s", "15m", "1h30m", "2d")]
    [90.0, 2.5, 900.0, 5400.0, 172800.0]
    """
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    elif re.fullmatch(r"(\d+(\.\d+)?[smhd])+", t):
        seconds = sum(float(n) * _UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)([smhd])", t))
    else:
        raise UsageError(f"--duration: expected a number of seconds or e.g. 90s, 15m, 24h, 1h30m, got {text!r}")
    if not 0 < seconds < math.inf:
        raise UsageError(f"--duration: must be more than 0, got {text!r}")
    return seconds


def hms(seconds: float) -> str:
    """``1:02:03`` for 3723 s (days counted in hours).

    >>> hms(3723.4), hms(90000)
    ('1:02:03', '25:00:00')
    """
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def recording_source(cfg: SensordConfig) -> tuple[tuple[str, ...], float | None]:
    """The channels and the assembly clock a recording uses, without needing a model.

    Channels: ``data.channels``, else those of the bundle at ``daemon.model`` (or the first fixed one of
    ``daemon.models``) if one is there (a model retrained on the recording then has the same). Clock:
    ``assembly.sample_period_seconds``, else that bundle's. Raises :class:`ConfigError` naming the key
    when one is needed and neither gives it.
    """
    bundle = None
    try:
        bundle = ModelBundle.load(cfg.daemon.reference_model(), cfg.data.channels or None)
    except BundleError as exc:
        if not cfg.data.channels:
            raise ConfigError([f"data.channels: is required by sensord record: list the channel names the "
                               f"devices send (no usable model bundle to take them from: {exc})"]) from None
    channels = tuple(cfg.data.channels) if cfg.data.channels else bundle.channels if bundle else ()
    key = "daemon.models" if cfg.daemon.models else "daemon.model"
    where = f"model {bundle.path}" if bundle is not None else \
        f"no model bundle at {key} ({cfg.daemon.reference_model()})"
    return channels, cfg.assembly_period(bundle.sample_period_seconds if bundle else None, where)


class RecordingChannels:
    """Each device's channels and clock for ``record`` (a :data:`~sensord.formats.base.LayoutFor`), without
    serving any model.

    The first ``daemon.models`` entry that matches the device and names its channels decides: its bundle
    for the device (a per-device directory, else the fallback; a fixed path) if one is there, else the
    entry's ``channels``; an entry that gives neither is passed over, as the daemon passes over an entry
    without a bundle. Otherwise the config's channels (:func:`recording_source`). None: no channels for
    the device (its readings are rejected as ``no_model``).
    """

    def __init__(self, cfg: SensordConfig) -> None:
        self.cfg = cfg
        self.default: Layout | None = None
        try:
            channels, period = recording_source(cfg)
            self.default = Layout.of(channels, None, period)
        except ConfigError as exc:
            from .models import per_device_dirs
            models = cfg.daemon.models
            if not any(e.channels for e in models) and not any(per_device_dirs(e.path) for e in models
                                                               if e.per_device):
                if models and exc.errors[-1].startswith("data.channels"):
                    raise ConfigError([*exc.errors[:-1], exc.errors[-1] + " (or give each daemon.models entry "
                                       "its channels)"]) from None
                raise
            # No channels for devices that match no entry; the clock, if needed, must be set in the config.
            cfg.assembly_period(None, f"no model bundle at daemon.models ({cfg.daemon.reference_model()})")
        self._bundles: dict[str, ModelBundle | None] = {}
        self._devices: dict[str, Layout | None] = {}

    def _bundle(self, path: str, entry: int) -> ModelBundle | None:
        if path not in self._bundles:
            from .models import expected_channels
            want, key = expected_channels(self.cfg, entry)
            try:
                self._bundles[path] = ModelBundle.load(path, want or None, key)
            except BundleError:
                self._bundles[path] = None  # (not trained yet: the entry's channels stand for it)
        return self._bundles[path]

    def _resolve(self, device: str) -> Layout | None:
        for i, entry in enumerate(self.cfg.daemon.models):
            if not fnmatch.fnmatchcase(device, entry.match):
                continue
            paths = [entry.path] if not entry.per_device else \
                [entry.path.replace("{device}", device), *([entry.fallback] if entry.fallback else [])]
            for path in paths:
                bundle = self._bundle(path, i)
                if bundle is not None:
                    return Layout.of(bundle.channels, None, self.cfg.assembly.period(bundle.sample_period_seconds))
            if entry.channels:
                return Layout.of(entry.channels, None, self.cfg.assembly.period(None))
        return self.default

    def __call__(self, device: str) -> Layout | None:
        try:
            return self._devices[device]
        except KeyError:
            pass
        layout = self._devices[device] = self._resolve(device)
        if len(self._devices) > 10 * self.cfg.daemon.max_devices:  # bounded: hostile ids
            self._devices.clear()
        return layout


@dataclass
class _Recording:
    """One device's CSV file and the checks its rows pass (the daemon's :class:`WindowBuffer` checks)."""

    path: Path
    file: IO[str]
    check: WindowBuffer
    channels: tuple[str, ...]
    rows: int = 0
    first: float = math.nan
    last: float = math.nan


@dataclass
class RecordSummary:
    devices: dict[str, tuple[int, float, float, Path]] = field(default_factory=dict)  # rows, first, last, file
    device_channels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    messages: int = 0
    messages_rejected: Counter[str] = field(default_factory=Counter)
    readings_rejected: Counter[str] = field(default_factory=Counter)
    ignored_devices: int = 0
    channels: tuple[str, ...] = ()
    seconds: float = 0.0
    stopped_by: str = ""

    @property
    def rows(self) -> int:
        return sum(r for r, _, _, _ in self.devices.values())

    @property
    def rejected(self) -> int:
        return sum(self.messages_rejected.values()) + sum(self.readings_rejected.values())


class Recorder:
    """Rows of every device (matching ``devices``, a glob) into ``out/<device>.csv``; the reading path's sink.

    Thread-safe: paho's network thread calls :meth:`on_message`, the main thread :meth:`summary` and
    :meth:`close`. After :meth:`close` nothing more is written (messages are refused, not half-taken).
    """

    def __init__(self, cfg: SensordConfig, out: Path, channels: tuple[str, ...], period: float | None,
                 devices: str | None = None, layouts: LayoutFor | None = None) -> None:
        self.cfg = cfg
        self.out = out
        self.channels = channels  # (every device's, unless ``layouts`` gives each its own)
        self.devices_glob = devices
        self._warn = RateLimitedLog(log, cfg.logging.rate_limit_seconds)
        self.path = ReadingPath(cfg, channels, period, None, self._warn, layouts)
        self.files: dict[str, _Recording] = {}
        self._ignored: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.stats = RecordSummary(channels=channels)
        self.send_command: Callable[[str, bytes], object] | None = None  # set once connected (Sparkplug rebirth)

    # -- intake ----------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes, retained: bool = False, redelivered: bool = False) -> bool:
        """Take one message (paho's network thread); never raises, like the daemon's intake. A redelivered
        one (MQTT DUP) needs no care here: a row not newer than the device's last is refused anyway."""
        with self._lock:
            if self._closed:
                return False
            self.stats.messages += 1
            try:
                self.path.take(topic, payload, retained, self)
            except OSError as exc:  # the disk: say so once a while, keep the files that are whole
                self.stats.messages_rejected["write_error"] += 1
                self._warn.warning("write_error", "cannot write the recording: %s", exc)
            except Exception:  # counted and logged: one bad message must not end the recording
                self.stats.messages_rejected["internal_error"] += 1
                if self._warn.allow("internal_error"):
                    log.exception("message on topic=%s could not be processed; recording continues", escape(topic))
        return True

    def _wanted(self, device: str) -> bool:
        if self.devices_glob is None or fnmatch.fnmatchcase(device, self.devices_glob):
            return True
        self._ignored.add(device)
        return False

    # -- RowSink (sensord/readings.py) --------------------------------------------------------------

    def message_rejected(self, reason: str) -> None:
        self.stats.messages_rejected[reason] += 1

    def reject(self, reason: str, device: str, detail: str) -> None:
        if device != "?" and not self._wanted(device):
            return
        self.stats.readings_rejected[reason] += 1
        self._warn.warning(f"reading:{reason}", "reading rejected reason=%s device=%s: %s", reason,
                           escape(device), escape(detail))

    def admit(self, device: str) -> bool:
        """The daemon's admission rules (``bad_device_id``, ``device_limit``), after the ``--devices`` filter."""
        if device in self.files or self.path.tracks(device):
            return True
        if not self._wanted(device):
            return False
        refusal = self.path.refusal(device, self.files)
        if refusal is not None:
            self.reject(refusal[0], device, refusal[1])
            return False
        return True

    def touch(self, device: str, timestamp: float | None = None) -> None:
        pass

    def died(self, device: str) -> None:
        log.info("device=%s announced its death: rows resume with its next readings", escape(device))

    def rebirth(self, request: RebirthRequest) -> None:
        """Ask a Sparkplug edge node for its births, as the daemon does (its aliases name the channels)."""
        if self.send_command is None:
            return
        self.send_command(request.topic, request.payload)
        self._warn.warning("rebirth", "asked Sparkplug edge node %s for a rebirth: %s", escape(request.node),
                           escape(request.reason))

    def row(self, device: str, timestamp: float, values: np.ndarray, clipped: bool) -> None:
        rec = self.files.get(device)
        if rec is None:
            if not self.admit(device):
                return
            rec = self._open(device)
        try:
            with np.errstate(over="ignore"):  # beyond float32 (no model to clip to): rejected as non_finite
                rec.check.push(timestamp, values)  # non_finite, wrong_shape, out_of_order: the daemon's checks
        except ReadingRejected as exc:
            self.reject(exc.reason.value, device, str(exc))
            return
        line = repr(float(timestamp)) + "," + ",".join(repr(float(v)) for v in values) + "\n"
        rec.file.write(line)
        rec.file.flush()  # whole lines only reach the file: a stop at any moment leaves valid CSV
        rec.rows += 1
        if rec.rows == 1:
            rec.first = timestamp
        rec.last = timestamp

    def _open(self, device: str) -> _Recording:
        layout = self.path.layout_for(device)
        channels = layout.channels if layout is not None else self.channels  # (rows come only with a layout)
        path = self.out / f"{device}.csv"
        f = path.open("x", encoding="utf-8", newline="")  # never over a file (checked empty at start)
        header = io.StringIO()
        csv.writer(header, lineterminator="\n").writerow(["timestamp", *channels])
        f.write(header.getvalue())
        f.flush()
        rec = self.files[device] = _Recording(path, f, WindowBuffer(WindowSpec(2), len(channels), device), channels)
        log.info("new device=%s: recording to %s", escape(device), path)
        return rec

    # -- the end ---------------------------------------------------------------------------------

    def summary(self) -> RecordSummary:
        with self._lock:
            s = self.stats
            s.devices = {d: (r.rows, r.first, r.last, r.path) for d, r in sorted(self.files.items())}
            s.device_channels = {d: r.channels for d, r in sorted(self.files.items())}
            s.ignored_devices = len(self._ignored)
            return replace(s, messages_rejected=Counter(s.messages_rejected),
                           readings_rejected=Counter(s.readings_rejected), devices=dict(s.devices),
                           device_channels=dict(s.device_channels))

    def close(self) -> None:
        """Stop taking messages; flush, sync and close every file (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for rec in self.files.values():
                rec.file.flush()
                os.fsync(rec.file.fileno())
                rec.file.close()


def prepare_out(out: Path) -> None:
    """``--out`` must be a directory without recordings in it: a recording never overwrites or extends one."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in out.glob("*.csv"))
    if existing:
        raise UsageError(f"--out {out}: already holds recordings ({', '.join(existing[:3])}"
                         f"{', ...' if len(existing) > 3 else ''}): record into a new directory")


def _reasons(counts: Counter[str]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in counts.most_common())


class Progress:
    """One progress line: rewritten in place on a terminal, a log line every ``interval`` seconds otherwise."""

    def __init__(self, duration: float, interval: float | None = None, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.duration = duration
        self.interval = interval if interval is not None else (1.0 if self.tty else 10.0)
        self._last = -math.inf

    def line(self, s: RecordSummary, elapsed: float, connected: bool) -> str:
        rejected = f"{s.rejected} rejected" + (f" ({_reasons(s.messages_rejected + s.readings_rejected)})"
                                               if s.rejected else "")
        return (f"recording {hms(elapsed)} elapsed, {hms(max(0.0, self.duration - elapsed))} remaining: "
                f"{len(s.devices)} devices, {s.rows} readings, {rejected}"
                + ("" if connected else ", broker not connected"))

    def maybe(self, rec: Recorder, elapsed: float, connected: bool, force: bool = False) -> None:
        if not force and elapsed - self._last < self.interval:
            return
        self._last = elapsed
        text = self.line(rec.summary(), elapsed, connected)
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
        else:
            log.info("%s", text)

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z") \
        if math.isfinite(ts) else "-"


def print_summary(s: RecordSummary, out: Path, stream: IO[str] | None = None) -> None:
    """What was recorded where, and every rejection by reason (the daemon's names), with a hint when
    nothing could be recorded: a wrong field or channel name shows up here at once."""
    w = stream or sys.stdout
    kinds = sorted(set(s.device_channels.values())) or [s.channels]
    channels = kinds[0]
    what = f"{len(channels)} channels ({', '.join(channels)})" if len(kinds) == 1 else \
        f"{len(kinds)} sets of channels (below)"
    print(f"recorded {len(s.devices)} devices, {s.rows} readings of {what} in {hms(s.seconds)} into {out} "
          f"(stopped: {s.stopped_by})", file=w)
    if s.devices:
        width = max(6, *(len(d) for d in s.devices))
        print(f"  {'device':<{width}} {'readings':>9}  {'first':<20}  {'last':<20}  file", file=w)
        for device, (rows, first, last, path) in s.devices.items():
            print(f"  {device:<{width}} {rows:>9}  {_iso(first):<20}  {_iso(last):<20}  {path}", file=w)
    if len(kinds) > 1:
        for kind in kinds:
            names = [d for d, chs in s.device_channels.items() if chs == kind]
            print(f"  channels of {', '.join(names)}: {', '.join(kind)}", file=w)
    taken = s.messages - sum(s.messages_rejected.values())
    print(f"messages: {s.messages} received, {taken} taken, {sum(s.messages_rejected.values())} rejected"
          + (f" ({_reasons(s.messages_rejected)})" if s.messages_rejected else ""), file=w)
    print(f"readings rejected: {sum(s.readings_rejected.values())}"
          + (f" ({_reasons(s.readings_rejected)})" if s.readings_rejected else ""), file=w)
    if s.ignored_devices:
        print(f"ignored: {s.ignored_devices} devices not matching --devices", file=w)
    if not s.rows:
        top = (s.messages_rejected + s.readings_rejected).most_common(1)
        if top and top[0][0] == "no_model":
            print("nothing recorded: most readings were rejected as no_model: no daemon.models entry matching "
                  "these devices names their channels, and data.channels is not set", file=w)
        elif top:
            print(f"nothing recorded: most readings were rejected as {top[0][0]}; check that the subscriptions' "
                  "field names and data.channels (or the daemon.models entries' channels) match what the devices "
                  "send (see README, Input formats)", file=w)
        else:
            print("nothing recorded: no message arrived on the configured subscriptions", file=w)


def record(cfg: SensordConfig, config_path: str, out: Path, duration: float, devices: str | None = None,
           progress_interval: float | None = None) -> RecordSummary:
    """Record until ``duration`` has passed or SIGINT/SIGTERM; the files are complete either way."""
    from .source import MqttConnection, default_client_id

    layouts = RecordingChannels(cfg)
    channels, period = (layouts.default.channels, layouts.default.period) if layouts.default else ((), None)
    prepare_out(out)
    recorder = Recorder(cfg, out, channels, period, devices, layouts)
    stop = threading.Event()
    stopped_by = ["duration reached"]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped_by[0] = signal.Signals(signum).name
        stop.set()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Its own client id and a clean session: a recorder must neither take over the daemon's session nor
    # leave a persistent one behind that the broker fills for ever.
    mqtt_cfg = replace(cfg.mqtt, session_expiry_seconds=0)
    client_id = f"{cfg.mqtt.client_id or default_client_id(config_path)}-record-{os.getpid()}"
    subscribed = threading.Event()

    def on_subscribed(topic_filter: str, granted: bool) -> None:
        if not granted:
            return  # a refusal is logged as an ERROR by the connection; a disconnect resets every filter
        if not subscribed.is_set():
            subscribed.set()
            each = "" if not cfg.daemon.models else " (or those of the daemon.models entry a device matches)"
            log.info("subscribed to %s: recording %d channels (%s)%s%s", ", ".join(cfg.mqtt.topic_filters()),
                     len(channels), ", ".join(channels), each,
                     f" on a {period:g} s clock" if recorder.path.assembler is not None and period else "")

    try:
        conn = MqttConnection(mqtt_cfg, recorder.on_message, client_id=client_id, announce=False,
                              on_subscribed=on_subscribed)
    except ConfigError as exc:
        raise ConfigError(exc.errors, config_path) from None
    recorder.send_command = lambda topic, payload: conn.publish(topic, payload, qos=0)
    progress = Progress(duration, progress_interval)
    t0 = time.monotonic()
    log.info("recording for %s into %s%s", hms(duration), out, f" (devices {devices!r})" if devices else "")
    conn.start()
    try:
        while not stop.is_set():
            elapsed = time.monotonic() - t0
            if elapsed >= duration:
                break
            progress.maybe(recorder, elapsed, conn.connected.is_set())
            stop.wait(min(0.2, max(0.0, duration - elapsed)))
    finally:
        conn.stop_intake()
        recorder.close()
        conn.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    elapsed = time.monotonic() - t0
    progress.maybe(recorder, elapsed, True, force=True)
    progress.done()
    summary = recorder.summary()
    summary.seconds = elapsed
    summary.stopped_by = stopped_by[0]
    return summary


def cli_record(args: Any) -> int:
    """``sensord record``: exit 0 when something was recorded, 65 (EX_DATAERR) when nothing could be."""
    from .config import load_config
    from .daemon import check_referenced_files
    from .errors import EX_DATAERR, EX_OK

    duration = parse_duration(args.duration)
    cfg = load_config(args.config)
    check_referenced_files(cfg, args.config)
    logging.getLogger().setLevel(args.log_level or cfg.logging.level)
    out = Path(args.out)
    summary = record(cfg, args.config, out, duration, args.devices)
    print_summary(summary, out)
    return EX_OK if summary.rows else EX_DATAERR
