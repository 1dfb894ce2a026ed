"""Drift removal: temperatures are modelled as changes against their own recent baseline.

A temperature creeps with the weather, the load of the last hour and the machine's thermal history. An
autoencoder trained on a short healthy period sees a new temperature level as a fault: on SKAB the
machine often runs warmer or cooler after a fault, when the labels call it healthy again, and taking its
two temperatures against their baselines halved the false alarms (README, "SKAB benchmark results").
So for such a channel the model is given ``reading - (1 - keep) * (baseline - level)``: the baseline an
exponentially weighted mean of the channel's own readings (time constant ``seconds``; causal, it uses no
later reading), the level the channel's mean over the healthy training rows. Changes faster than the
baseline stay as they are (a jump is seen at once and fades over a few time constants), and ``keep`` of
the slow change remains (0 removes it: an overheating that builds up over an hour is then left to a
limit alarm on the temperature itself, which sensord does not raise). The scaler is fitted on the
readings as read, so what remains is measured against the channel's whole healthy spread. Every other
channel keeps its level: a valve that closes and stays closed stays visible for as long as it is closed.

Which channels: those whose name matches ``window.drift_channels`` (regular expressions; by default the
names that say temperature). Choosing them from the healthy data alone (the share of a channel's
variance slower than a window) was tried and picked the wrong channels in a third of SKAB's files: a
vibration channel that happened to wander in the healthy period, a noisy temperature that did not.

The filter runs inside :class:`~sensord.windows.WindowBuffer`, so training, evaluation, the benchmark and
the daemon transform every reading the same way; the bundle records the channels, levels and constants.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DriftSpec:
    """Which channels (by index) are taken against their baseline, their levels, and the filter's constants.

    >>> spec = DriftSpec(index=(1,), levels=(20.0,), seconds=60.0)
    >>> row, out = np.array([1.0, 25.0], np.float32), np.zeros(2, np.float32)
    >>> base = spec.start(row)
    >>> spec.follow(base, row, 0.0, out); out.tolist()  # at its baseline a channel reads as its level
    [0.0, 20.0]
    >>> row[1] = 26.0; spec.follow(base, row, 1.0, out); round(float(out[1]), 3)  # a jump shows at once
    20.983
    """

    index: tuple[int, ...]
    levels: tuple[float, ...]
    seconds: float
    keep: float = 0.0  # share of the slow change the model still sees

    def __post_init__(self) -> None:
        if len(self.index) != len(self.levels) or not self.index:
            raise ValueError(f"drift needs one level per channel, got {len(self.index)} channels and "
                             f"{len(self.levels)} levels")
        if len(set(self.index)) != len(self.index) or min(self.index) < 0:
            raise ValueError(f"drift channel indices must be distinct and >= 0, got {list(self.index)}")
        if not all(math.isfinite(v) for v in self.levels):
            raise ValueError("drift levels must be finite")
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError(f"drift seconds must be a positive number, got {self.seconds}")
        if not 0.0 <= self.keep < 1.0:
            raise ValueError(f"drift keep must be in [0, 1), got {self.keep}")

    def start(self, row: np.ndarray) -> list[float]:
        """The baselines after the first reading of a stream (or after a gap): that reading's values."""
        return [row.item(c) for c in self.index]

    def follow(self, base: list[float], row: np.ndarray, dt: float, out: np.ndarray) -> None:
        """Move the baselines ``base`` (in place) towards ``row``, ``dt`` seconds after the previous reading,
        and write the drift channels of ``row``, taken against them, into ``out`` (the other columns are
        left as they are: the caller has copied the reading there).

        Plain floats, not numpy: two channels cost a microsecond this way, five with fancy indexing.
        """
        alpha = -math.expm1(-dt / self.seconds) if dt > 0 else 0.0
        slow = 1.0 - self.keep
        levels = self.levels
        for j, c in enumerate(self.index):
            x = row.item(c)
            b = base[j] = base[j] + alpha * (x - base[j])
            out[c] = x - slow * (b - levels[j])

    def to_dict(self, channels: Sequence[str]) -> dict[str, Any]:
        return {"channels": [channels[i] for i in self.index], "levels": list(self.levels),
                "seconds": self.seconds, "keep": self.keep}

    @classmethod
    def from_dict(cls, d: Any, channels: Sequence[str]) -> DriftSpec:
        """Read the bundle's record; ValueError saying what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"window.drift must be a JSON object, got {type(d).__name__}")
        names, levels = d.get("channels"), d.get("levels")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("window.drift.channels must be a list of channel names")
        unknown = [n for n in names if n not in channels]
        if unknown:
            raise ValueError(f"window.drift.channels {unknown} are not channels of the model ({list(channels)})")
        if not isinstance(levels, list) or not all(_number(v) for v in levels):
            raise ValueError("window.drift.levels must be a list of numbers")
        for key in ("seconds", "keep"):
            if not _number(d.get(key)):
                raise ValueError(f"window.drift.{key} must be a number, got {d.get(key)!r}")
        try:
            return cls(tuple(channels.index(n) for n in names), tuple(float(v) for v in levels),
                       float(d["seconds"]), float(d["keep"]))
        except ValueError as exc:
            raise ValueError(f"window.drift: {exc}") from None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def drift_channels(channels: Sequence[str], patterns: Sequence[str]) -> tuple[int, ...]:
    """The channels a name pattern of ``window.drift_channels`` finds (case-insensitive search).

    >>> drift_channels(["Accelerometer1RMS", "Temperature", "Thermocouple", "flow"], ["temp", "thermo"])
    (1, 2)
    >>> drift_channels(["t_oil", "t_air"], ["^t_air$"])
    (1,)
    """
    found = [re.compile(p, re.IGNORECASE) for p in patterns]
    return tuple(i for i, name in enumerate(channels) if any(f.search(name) for f in found))


def fit_drift(parts: Sequence[np.ndarray], channels: Sequence[str], patterns: Sequence[str], seconds: float,
              keep: float) -> DriftSpec | None:
    """The drift record of a model trained on ``parts`` (each recording's training rows); None when no
    channel name matches ``patterns``."""
    index = drift_channels(channels, patterns)
    if not index:
        return None
    levels = np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])[:, list(index)].mean(axis=0)
    return DriftSpec(index, tuple(float(v) for v in levels), float(seconds), float(keep))
