"""Turning per-window errors into alert events, per device.

A pure state machine with hysteresis: a single noisy window should not page
an operator (``raise_after``), and a fault that flickers around the threshold
should stay one alert, not a storm of raise/clear pairs (``clear_after``).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal


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
    alert_id: str = ""  # unique per alert; its "cleared" carries the same id as its "raised"


def new_alert_id() -> str:
    return uuid.uuid4().hex


class AlertDetector:
    """One device's alert state.

    >>> d = AlertDetector("p1", threshold=1.0, raise_after=2, clear_after=1)
    >>> [d.update(e, 0.0, float(i)).active for i, e in enumerate([2.0, 2.0, 0.5])]
    [False, True, False]
    """

    __slots__ = ("device", "threshold", "raise_after", "clear_after", "active", "raised_at", "alert_id",
                 "_over_run", "_under_run", "_new_id")

    def __init__(self, device: str, threshold: float, raise_after: int = 1, clear_after: int = 1,
                 new_id: Callable[[], str] = new_alert_id) -> None:
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
        self.alert_id: str | None = None
        self._over_run = 0
        self._under_run = 0
        self._new_id = new_id

    def export(self) -> dict[str, Any]:
        """The state that drives raise/clear, as JSON-able data (see :meth:`restore`)."""
        return {"active": self.active, "raised_at": self.raised_at, "alert_id": self.alert_id,
                "over_run": self._over_run, "under_run": self._under_run}

    def restore(self, state: dict[str, Any]) -> None:
        """Take over a state saved by :meth:`export`; ValueError if it is not one."""
        # Untrusted JSON: Any until each value is checked below.
        active: Any = state.get("active")
        raised_at: Any = state.get("raised_at")
        alert_id: Any = state.get("alert_id")
        over: Any = state.get("over_run")
        under: Any = state.get("under_run")
        if not isinstance(active, bool):
            raise ValueError(f"active must be true or false, got {active!r}")
        for name, run in (("over_run", over), ("under_run", under)):
            if not isinstance(run, int) or isinstance(run, bool) or run < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {run!r}")
        if active:
            if isinstance(raised_at, bool) or not isinstance(raised_at, (int, float)) \
                    or not math.isfinite(raised_at):
                raise ValueError(f"raised_at must be a number while active, got {raised_at!r}")
            if not isinstance(alert_id, str) or not alert_id:
                raise ValueError(f"alert_id must be a string while active, got {alert_id!r}")
        self.active = active
        self.raised_at = float(raised_at) if active else None
        self.alert_id = alert_id if active else None
        self._over_run, self._under_run = over, under

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
            self.alert_id = self._new_id()
            event = AlertEvent(self.device, "raised", window_start, window_end, window_end,
                               score, error, self.threshold, top_channels, self.alert_id)
        elif self.active and self._under_run >= self.clear_after:
            self.active = False
            event = AlertEvent(self.device, "cleared", window_start, window_end, self.raised_at or window_end,
                               score, error, self.threshold, top_channels, self.alert_id or "")
            self.raised_at = None
            self.alert_id = None
        return Decision(over, self.active, score, event)
