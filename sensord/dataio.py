"""Reading CSV files of readings for training, evaluation and the benchmark.

Both SKAB's ``;``-separated files and ordinary comma CSV are accepted; the
delimiter is detected from the header unless configured. Bad cells are reported
with file, line and column rather than turned into NaN, because a model fitted
on silently corrupted rows is worse than no model.

Two layouts: wide (a timestamp column, then one column per channel: what ``sensord record`` writes)
and long (columns ``timestamp, channel, value`` and optionally ``device``: one value a line, as
historians and ``SELECT time, tag, value`` export them). Long files are turned into rows by the
daemon's own :class:`sensord.assembly.Assembler`, with the same period, staleness and tolerance, so
a recording read offline gives the rows the daemon made live. The lines are taken in file order, as
if they arrived in that order (a file written as readings arrived replays exactly what the daemon
saw; one in which a quarter of the values or more would come too late, e.g. exported channel by
channel, is read in time order instead). The gap policy is the daemon's: a channel's last value is held for at most
``assembly.max_staleness_seconds``, a tick without a fresh value of every channel has no row (the
series has a gap there, and windows do not span gaps longer than ``window.max_gap_seconds``), a
value stamped at or before a tick already decided is dropped (``late_value``).

A wide file with empty cells (a channel not sampled on that line, as exports of report-by-exception
data have) follows the same rule, through the same code: each non-empty cell is a value, and rows are
made on the clock as for a long file (resampled to the sampling period, a value held for at most
``assembly.max_staleness_seconds``, no row where a channel has no value that fresh, so the series splits
there). A wide file without empty cells gives its rows as written. A cell that is neither empty nor a
finite number is an error naming its line and column.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .assembly import Assembler
from .config import AssemblyConfig, DataConfig
from .errors import DataError  # raised here; its home is sensord.errors
from .timeparse import unix_seconds

TIMESTAMP_NAMES = ("timestamp", "datetime", "time", "ts", "date")
LONG_COLUMNS = ("channel", "value")  # with a timestamp column (and optionally "device"): the long layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Series:
    timestamps: np.ndarray  # float64 unix seconds
    values: np.ndarray  # float32 (rows, channels)
    channels: tuple[str, ...]
    labels: np.ndarray | None  # int8 (rows,) when the label column is present
    path: str = ""

    def __len__(self) -> int:
        return len(self.timestamps)

    def slice(self, start: int, stop: int | None = None) -> Series:
        labels = None if self.labels is None else self.labels[start:stop]
        return Series(self.timestamps[start:stop], self.values[start:stop], self.channels, labels, self.path)


def parse_timestamp(text: str) -> float:
    """Unix seconds from an epoch number (s/ms/µs/ns by magnitude) or an ISO-8601 date-time (naive means UTC).

    The same parser as the daemon's payloads (:func:`sensord.timeparse.unix_seconds`).
    """
    return unix_seconds(text)


def _load_long(p: Path, header: list[str], numbered: list[tuple[int, list[str]]], cfg: DataConfig,
               channels: Sequence[str] | None, require_labels: bool, assembly: AssemblyConfig,
               model_period: float | None) -> list[Series]:
    """The long layout through the daemon's assembler: one series per device (see the module doc)."""
    lower = [h.lower() for h in header]
    ts_name = cfg.timestamp_column or next((h for h in header if h.lower() in TIMESTAMP_NAMES), None)
    if ts_name is None or ts_name not in header:
        raise DataError(f"{p}: no timestamp column (looked for {cfg.timestamp_column or ', '.join(TIMESTAMP_NAMES)}); "
                        f"set data.timestamp_column; header is {header}")
    ts_i, ch_i, v_i = header.index(ts_name), lower.index("channel"), lower.index("value")
    dev_i = lower.index("device") if "device" in lower else None
    label = cfg.label_column
    skip = {label, *cfg.ignore_columns}
    per_device: dict[str, list[tuple[float, int, str, float]]] = {}
    seen: dict[str, None] = {}  # channel names in order of appearance
    for line, row in numbered:
        if len(row) < len(header):
            raise DataError(f"{p}:{line}: expected {len(header)} fields, got {len(row)}")
        try:
            ts = parse_timestamp(row[ts_i])
        except (ValueError, OverflowError):
            raise DataError(f"{p}:{line}: column {ts_name!r}: not a timestamp: {row[ts_i]!r}") from None
        try:
            v = float(row[v_i])
        except ValueError:
            raise DataError(f"{p}:{line}: column {header[v_i]!r}: not a number: {row[v_i]!r}") from None
        if not math.isfinite(v):
            raise DataError(f"{p}:{line}: column {header[v_i]!r}: not a finite number: {row[v_i]!r}")
        channel = row[ch_i].strip()
        if not channel:
            raise DataError(f"{p}:{line}: column {header[ch_i]!r}: empty channel name")
        device = row[dev_i].strip() if dev_i is not None else ""
        if dev_i is not None and not device:
            raise DataError(f"{p}:{line}: column {header[dev_i]!r}: empty device id")
        seen.setdefault(channel, None)
        per_device.setdefault(device, []).append((ts, line, channel, v))
    wanted = list(channels) if channels else list(cfg.channels) or [c for c in seen if c not in skip]
    missing = [c for c in wanted if c not in seen]
    if missing:
        raise DataError(f"{p}: channel(s) {missing} never appear in column {header[ch_i]!r} "
                        f"(it names {list(seen)[:20]})")
    has_labels = label in seen
    if require_labels and not has_labels:
        raise DataError(f"{p}: no line of channel {label!r} (the label, 0/1) in column {header[ch_i]!r} "
                        "(use --label-column)")
    names = tuple(wanted) + ((label,) if has_labels else ())
    return [_on_clock(f"{p}#{device}" if dev_i is not None else str(p), device, values, names, len(wanted),
                      has_labels, assembly, model_period)
            for device, values in per_device.items()]


def _on_clock(where: str, device: str, values: list[tuple[float, int, str, float]], names: tuple[str, ...],
              n: int, has_labels: bool, assembly: AssemblyConfig, model_period: float | None) -> Series:
    """Single values ``(timestamp, line, channel, value)`` -> one series on the clock, by the daemon's gap
    policy (see the module doc): the one rule for long files and wide ones with empty cells. ``names``
    are the ``n`` channels, then the label if ``has_labels``."""
    period = assembly.period(model_period) or _median_step(values, names)
    if period is None:
        raise DataError(f"{where}: cannot tell the sampling period (no channel has two timestamps): set "
                        "assembly.sample_period_seconds")
    rows, problems = _assemble(device, values, names, period, assembly)
    if 4 * problems["late_value"] >= len(values):  # not arrival order: exported channel by channel, say
        log.warning("%s: %d of %d values come after a later one: the file is not in time order; read in "
                    "time order instead", where, problems["late_value"], len(values))
        rows, problems = _assemble(device, sorted(values, key=lambda x: (x[0], x[1])), names, period, assembly)
    if not rows:
        raise DataError(f"{where}: no complete row on the {period:g} s clock: no tick had a value of every "
                        f"channel ({', '.join(names)}) at most {assembly.staleness(period):g} s old "
                        "(assembly.max_staleness_seconds)")
    table = np.stack([v for _, v in rows])
    labels = (table[:, -1] > 0.5).astype(np.int8) if has_labels else None
    log.info("%s: %d rows on a %g s clock from %d values%s", where, len(rows), period, len(values),
             "".join(f", {k} {reason}" for reason, k in sorted(problems.items())))
    return Series(np.array([t for t, _ in rows], dtype=np.float64), table[:, :n].astype(np.float32),
                  tuple(names[:n]), labels, where)


def _assemble(device: str, values: list[tuple[float, int, str, float]], names: Sequence[str], period: float,
              assembly: AssemblyConfig) -> tuple[list[tuple[float, np.ndarray]], Counter[str]]:
    """Lines -> rows through the daemon's assembler, in the order given; consecutive lines of one timestamp
    are one update, as one message would be live."""
    a = Assembler(names, period, assembly.staleness(period), assembly.late_tolerance_seconds)
    rows: list[tuple[float, np.ndarray]] = []
    problems: Counter[str] = Counter()
    i = 0
    while i < len(values):
        ts = values[i][0]
        update: dict[str, float] = {}
        while i < len(values) and values[i][0] == ts:
            if values[i][2] in names:
                update[values[i][2]] = values[i][3]
            i += 1
        if update:
            done = a.add(device or "-", ts, update)
            rows.extend(done.rows)
            problems.update(reason for reason, _ in done.problems)
    return rows, problems


def _median_step(values: list[tuple[float, int, str, float]], names: Sequence[str]) -> float | None:
    """The median step between a channel's consecutive timestamps, over the channels ``names``: the clock
    of a long file when neither the config nor the model gives one."""
    steps = [np.diff(np.unique([t for t, _, c, _ in values if c == name])) for name in names]
    flat = np.concatenate(steps) if steps else np.empty(0)
    return round(float(np.median(flat)), 9) if len(flat) else None


def sampling_period(series: Series | Sequence[Series]) -> float | None:
    """The median step between consecutive timestamps (over every series given), or None without one.

    What a bundle records as its sampling period, the default clock of live assembly: the median, so
    the gaps of a recording (a restart, an outage) do not stretch it.

    >>> sampling_period(Series(np.array([0.0, 1.0, 2.0, 10.0, 11.0]), np.zeros((5, 1)), ("x",), None))
    1.0
    """
    group = [series] if isinstance(series, Series) else list(series)
    steps = np.concatenate([np.diff(s.timestamps) for s in group]) if group else np.empty(0)
    steps = steps[steps > 0]
    return round(float(np.median(steps)), 9) if len(steps) else None


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _sniff_delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in (";", ",", "\t")}
    return max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","


def load_csv(path: str | Path, cfg: DataConfig | None = None,
             channels: Sequence[str] | None = None, require_labels: bool = False,
             assembly: AssemblyConfig | None = None, period: float | None = None) -> Series:
    """Load a CSV of readings (wide or long, see the module doc) as one device's series.

    ``channels`` (e.g. a model bundle's channel list) wins over the config; with
    neither, every numeric column except the timestamp and ignored columns is a
    channel, in file order (long layout: every channel name in the file, in order of appearance).
    ``assembly`` and ``period`` (the model's sampling period) set the clock of a long file
    (:meth:`AssemblyConfig.period`; with neither, the median step of its timestamps).
    """
    found = load_recordings(path, cfg, channels, require_labels, assembly, period)
    if len(found) > 1:
        names = ", ".join(s.path.rsplit("#", 1)[-1] for s in found)
        raise DataError(f"{path}: holds {len(found)} devices ({names}): give one device's readings")
    return found[0]


def load_recordings(path: str | Path, cfg: DataConfig | None = None,
                    channels: Sequence[str] | None = None, require_labels: bool = False,
                    assembly: AssemblyConfig | None = None, period: float | None = None) -> list[Series]:
    """Like :func:`load_csv`, but a long file with a ``device`` column gives one series per device
    (path ``file.csv#device``), in order of first appearance."""
    cfg = cfg or DataConfig()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: cannot read: {exc}") from None
    lines = text.splitlines()
    if not lines:
        raise DataError(f"{p}: file is empty")
    delim = cfg.delimiter or _sniff_delimiter(lines[0])
    rows = list(csv.reader(lines, delimiter=delim))
    header = [h.strip() for h in rows[0]]
    numbered = [(i + 2, r) for i, r in enumerate(rows[1:]) if r and any(c.strip() for c in r)]
    body = [r for _, r in numbered]
    line_of = [n for n, _ in numbered]  # file line numbers, blank lines included
    if not body:
        raise DataError(f"{p}: no data rows under the header")
    if all(c in (h.lower() for h in header) for c in LONG_COLUMNS):
        return _load_long(p, header, numbered, cfg, channels, require_labels, assembly or AssemblyConfig(), period)

    ts_col = cfg.timestamp_column
    if ts_col is None:
        ts_col = next((h for h in header if h.lower() in TIMESTAMP_NAMES), None)
        if ts_col is None:
            ts_col = next((h for i, h in enumerate(header) if not _is_number(body[0][i])), None)
    if ts_col is None or ts_col not in header:
        raise DataError(f"{p}: no timestamp column (looked for {cfg.timestamp_column or ', '.join(TIMESTAMP_NAMES)}); "
                        f"set data.timestamp_column; header is {header}")

    wanted = list(channels) if channels else list(cfg.channels)
    if wanted:
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(f"{p}: channel column(s) {missing} not in header {header}")
    else:
        # Every other column is a channel; a non-numeric cell is then an error
        # (below), never a reason to drop a sensor silently.
        skip = {ts_col, cfg.label_column, *cfg.ignore_columns}
        wanted = [h for h in header if h not in skip and h]
        if not wanted:
            raise DataError(f"{p}: no numeric channel columns found in header {header}")

    has_labels = cfg.label_column in header
    if require_labels and not has_labels:
        raise DataError(f"{p}: label column {cfg.label_column!r} not in header {header} (use --label-column)")
    ts_i = header.index(ts_col)
    ch_i = [header.index(c) for c in wanted]
    lab_i = header.index(cfg.label_column) if has_labels else None

    n = len(body)
    ts = np.empty(n, dtype=np.float64)
    vals = np.empty((n, len(ch_i)), dtype=np.float32)
    labels = np.zeros(n, dtype=np.int8) if has_labels else None
    gaps = 0  # empty cells (channel or label): the rows are then made on the clock, see below
    for r, row in enumerate(body):
        line = line_of[r]
        if len(row) < len(header):
            raise DataError(f"{p}:{line}: expected {len(header)} fields, got {len(row)}")
        try:
            ts[r] = parse_timestamp(row[ts_i])
        except ValueError:
            raise DataError(f"{p}:{line}: column {ts_col!r}: not a timestamp: {row[ts_i]!r}") from None
        for j, ci in enumerate(ch_i):
            cell = row[ci]
            if not cell.strip():
                vals[r, j] = np.nan
                gaps += 1
                continue
            try:
                v = float(cell)
            except ValueError:
                hint = "" if channels or cfg.channels else " (list the sensor columns in data.channels to skip others)"
                raise DataError(f"{p}:{line}: column {header[ci]!r}: not a number: {cell!r}{hint}") from None
            if not math.isfinite(v):
                raise DataError(f"{p}:{line}: column {header[ci]!r}: not a finite number: {cell!r}")
            vals[r, j] = v
        if lab_i is not None and labels is not None:
            if not row[lab_i].strip():
                labels[r] = -1
                gaps += 1
                continue
            try:
                labels[r] = 1 if float(row[lab_i]) > 0.5 else 0
            except ValueError:
                raise DataError(f"{p}:{line}: label column {cfg.label_column!r}: not 0/1: {row[lab_i]!r}") from None
    if np.any(np.diff(ts) < 0):
        bad = line_of[int(np.argmax(np.diff(ts) < 0)) + 1]
        raise DataError(f"{p}:{bad}: timestamps go backwards; rows must be in time order")
    if not gaps:
        return [Series(ts, vals, tuple(wanted), labels, str(p))]
    # Empty cells: each non-empty cell is a value, made into rows by the long layout's rule (the daemon's
    # assembler: resampled to the sampling period, a value held up to assembly.max_staleness_seconds, no
    # row where a channel has none that fresh, so the series splits there).
    names = tuple(wanted) + ((cfg.label_column,) if labels is not None else ())
    values = [(float(ts[r]), line_of[r], name, float(vals[r, j]))
              for r in range(n) for j, name in enumerate(wanted) if not np.isnan(vals[r, j])]
    if labels is not None:
        values += [(float(ts[r]), line_of[r], cfg.label_column, float(labels[r])) for r in range(n) if labels[r] >= 0]
        values.sort(key=lambda x: (x[0], x[1]))
    log.info("%s: %d empty cells: rows made on the sampling clock (assembly section)", p, gaps)
    return [_on_clock(str(p), "", values, names, len(wanted), labels is not None, assembly or AssemblyConfig(),
                      period)]
