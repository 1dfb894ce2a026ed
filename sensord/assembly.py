"""Rows on a fixed clock from channels that arrive separately (per-channel topics, report by exception).

The model needs one row per sampling period with every channel in it; gateways send each channel on
its own, or only the ones that changed. The policy, per device:

- rows fall on the grid ``k * period`` (Unix seconds), the model's sampling period;
- a channel's value is held until a newer one arrives, for at most ``max_staleness`` seconds: a row
  is emitted only when every channel has a value no older than that (otherwise the tick is skipped and
  counted as ``incomplete_row``);
- tick ``T`` is decided once a value stamped later than ``T + tolerance`` has arrived, or at once when
  every channel has a value stamped exactly ``T`` (a gateway that sends all channels of a sample);
- a value stamped at or before a tick already decided is too late: counted and rejected (``late_value``);
  one up to ``tolerance`` seconds behind the newest is still folded into its row.

Pure (no clock, no I/O), so live intake and any offline replay make the same rows from the same values.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

_EPS = 1e-6  # seconds: a timestamp this close to a tick is on it (ms timestamps / 1000 are not exact)


@dataclass
class _Device:
    pending: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # sorted by timestamp
    held: dict[str, tuple[float, float]] = field(default_factory=dict)
    decided: int | None = None  # index k of the last tick decided
    newest: float = -math.inf


@dataclass
class Assembled:
    """What one update produced: whole rows ``(timestamp, values)`` and counted rejections."""

    rows: list[tuple[float, np.ndarray]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail)


class Assembler:
    """Per-device rows on the grid ``k * period`` from single-channel updates (see the module doc).

    >>> a = Assembler(("x", "y"), period=1.0, max_staleness=3.0)
    >>> a.add("p", 10.0, {"x": 1.0}).rows, a.add("p", 10.0, {"y": 2.0}).rows
    ([], [(10.0, array([1., 2.]))])
    >>> [(t, v.tolist()) for t, v in a.add("p", 12.0, {"x": 5.0}).rows]  # y held; 12 not decided yet
    [(11.0, [1.0, 2.0])]
    >>> a.add("p", 10.5, {"y": 9.0}).problems
    [('late_value', 'device p: value stamped 10.500 is at or before the last row decided (11.000)')]
    """

    def __init__(self, channels: Sequence[str], period: float, max_staleness: float, tolerance: float = 0.0,
                 max_pending: int = 1000) -> None:
        if not period > 0:
            raise ValueError(f"period must be > 0, got {period}")
        self.channels = tuple(channels)
        self.period = float(period)
        self.max_staleness = float(max_staleness)
        self.tolerance = float(tolerance)
        self.max_pending = max_pending
        self.devices: dict[str, _Device] = {}

    def __contains__(self, device: str) -> bool:
        return device in self.devices

    def forget(self, device: str) -> None:
        self.devices.pop(device, None)

    def add(self, device: str, ts: float, values: dict[str, float]) -> Assembled:
        out = Assembled()
        dev = self.devices.get(device)
        if dev is None:
            dev = self.devices[device] = _Device()
        if not math.isfinite(ts):
            out.problems.append(("bad_timestamp", f"device {device}: timestamp {ts!r} is not finite"))
            return out
        if dev.decided is not None and ts <= dev.decided * self.period + _EPS:
            out.problems.append(("late_value", f"device {device}: value stamped {ts:.3f} is at or before the "
                                 f"last row decided ({dev.decided * self.period:.3f})"))
            return out
        for ch, v in values.items():
            if ch not in self.channels:
                continue
            queue = dev.pending.setdefault(ch, [])
            if len(queue) >= self.max_pending:
                out.problems.append(("late_value", f"device {device}: {self.max_pending} values of {ch!r} waiting"))
                continue
            i = bisect.bisect_left(queue, (ts, -math.inf))
            if i < len(queue) and queue[i][0] == ts:
                queue[i] = (ts, v)  # the same sample again: the newer message wins
            else:
                queue.insert(i, (ts, v))
        dev.newest = max(dev.newest, ts)
        self._decide(device, dev, out)
        return out

    def _last_decidable(self, dev: _Device) -> int | None:
        """Index of the newest tick that can be decided now (see the module doc), or None."""
        p = self.period
        k = math.ceil((dev.newest - self.tolerance) / p - _EPS) - 1  # newest stamped later than T + tolerance
        top = math.floor(dev.newest / p + _EPS)
        for j in range(top, k, -1):  # ticks every channel has a value stamped exactly on
            if all(any(abs(t - j * p) <= _EPS for t, _ in dev.pending.get(ch, ())) for ch in self.channels):
                return j
        return k if dev.decided is None or k > dev.decided else None

    def _decide(self, device: str, dev: _Device, out: Assembled) -> None:
        last = self._last_decidable(dev)
        if last is None:
            return
        p = self.period
        if dev.decided is None:
            first = min((q[0][0] for q in dev.pending.values() if q), default=None)
            if first is None:
                return
            k = math.ceil(first / p - _EPS)
        else:
            k = dev.decided + 1
        while k <= last:
            tick = k * p
            for ch in self.channels:
                queue = dev.pending.get(ch)
                while queue and queue[0][0] <= tick + _EPS:
                    dev.held[ch] = queue.pop(0)
            fresh = [dev.held.get(ch) for ch in self.channels]
            if all(h is not None and tick - h[0] <= self.max_staleness + _EPS for h in fresh):
                out.rows.append((tick, np.array([h[1] for h in fresh if h is not None], dtype=np.float64)))
                k += 1
                continue
            missing = [ch for ch, h in zip(self.channels, fresh, strict=True)
                       if h is None or tick - h[0] > self.max_staleness + _EPS]
            out.problems.append(("incomplete_row", f"device {device}: no row at {tick:.3f}: "
                                 f"{', '.join(missing)} missing or older than {self.max_staleness:g} s"))
            # Nothing changes before the next pending value: jump to its tick (a silent hour costs one step).
            nxt = min((q[0][0] for q in dev.pending.values() if q), default=None)
            k = max(k + 1, math.ceil(nxt / p - _EPS)) if nxt is not None else last + 1
        dev.decided = last
