"""Reading CSV files of readings for training, evaluation and the benchmark.

Both SKAB's ``;``-separated files and ordinary comma CSV are accepted; the
delimiter is detected from the header unless configured. Bad cells are reported
with file, line and column rather than turned into NaN, because a model fitted
on silently corrupted rows is worse than no model.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DataConfig
from .errors import DataError  # raised here; its home is sensord.errors
from .timeparse import unix_seconds

TIMESTAMP_NAMES = ("timestamp", "datetime", "time", "ts", "date")


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
             channels: Sequence[str] | None = None, require_labels: bool = False) -> Series:
    """Load a CSV of readings.

    ``channels`` (e.g. a model bundle's channel list) wins over the config; with
    neither, every numeric column except the timestamp and ignored columns is a
    channel, in file order.
    """
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
            try:
                v = float(cell)
            except ValueError:
                hint = "" if channels or cfg.channels else " (list the sensor columns in data.channels to skip others)"
                raise DataError(f"{p}:{line}: column {header[ci]!r}: not a number: {cell!r}{hint}") from None
            if not math.isfinite(v):
                raise DataError(f"{p}:{line}: column {header[ci]!r}: not a finite number: {cell!r}")
            vals[r, j] = v
        if lab_i is not None and labels is not None:
            try:
                labels[r] = 1 if float(row[lab_i]) > 0.5 else 0
            except ValueError:
                raise DataError(f"{p}:{line}: label column {cfg.label_column!r}: not 0/1: {row[lab_i]!r}") from None
    if np.any(np.diff(ts) < 0):
        bad = line_of[int(np.argmax(np.diff(ts) < 0)) + 1]
        raise DataError(f"{p}:{bad}: timestamps go backwards; rows must be in time order")
    return Series(ts, vals, tuple(wanted), labels, str(p))
