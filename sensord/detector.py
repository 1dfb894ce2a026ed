"""Turning per-window errors into alert events, per device.

A pure state machine with hysteresis: a single noisy window should not page
an operator (``raise_after``), and a fault that flickers around the threshold
should stay one alert, not a storm of raise/clear pairs (``clear_after``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Decision:
    """The detector's verdict on one window."""

    over: bool
    active: bool  # alert state after this window
    score: float  # error / threshold
    event: AlertEvent | None = None


@dataclass(frozen=True)
class AlertEvent:
    device: str
    state: Literal["raised", "cleared"]
    window_start: float
    window_end: float
    raised_at: float  # window end of the window that raised the alert
    score: float
    error: float
    threshold: float
    top_channels: tuple[tuple[str, float], ...] = field(default_factory=tuple)


class AlertDetector:
    """One device's alert state.

    >>> d = AlertDetector("p1", threshold=1.0, raise_after=2, clear_after=1)
    >>> [d.update(e, 0.0, float(i)).active for i, e in enumerate([2.0, 2.0, 0.5])]
    [False, True, False]
    """

    __slots__ = ("device", "threshold", "raise_after", "clear_after", "active", "raised_at",
                 "_over_run", "_under_run")

    def __init__(self, device: str, threshold: float, raise_after: int = 1, clear_after: int = 1) -> None:
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if raise_after < 1 or clear_after < 1:
            raise ValueError("raise_after and clear_after must be >= 1")
        self.device = device
        self.threshold = threshold
        self.raise_after = raise_after
        self.clear_after = clear_after
        self.active = False
        self.raised_at: float | None = None
        self._over_run = 0
        self._under_run = 0

    def update(self, error: float, window_start: float, window_end: float,
               top_channels: tuple[tuple[str, float], ...] = ()) -> Decision:
        score = error / self.threshold
        over = error > self.threshold
        if over:
            self._over_run += 1
            self._under_run = 0
        else:
            self._under_run += 1
            self._over_run = 0
        event = None
        if not self.active and self._over_run >= self.raise_after:
            self.active = True
            self.raised_at = window_end
            event = AlertEvent(self.device, "raised", window_start, window_end, window_end,
                               score, error, self.threshold, top_channels)
        elif self.active and self._under_run >= self.clear_after:
            self.active = False
            event = AlertEvent(self.device, "cleared", window_start, window_end, self.raised_at or window_end,
                               score, error, self.threshold, top_channels)
            self.raised_at = None
        return Decision(over, self.active, score, event)
