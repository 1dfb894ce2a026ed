"""Fitting the alert threshold on healthy *validation* reconstruction errors.

The threshold is never fitted on the training windows: the network has seen
those and reconstructs them better than it will ever reconstruct new healthy
data, so a threshold from them would raise false alarms from the first hour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import ThresholdConfig

METHODS = ("quantile", "mean_std", "max_factor", "contamination")


@dataclass(frozen=True)
class ThresholdRecord:
    """What was fitted and from what, stored in the bundle so an operator can audit it."""

    method: str
    params: dict[str, float]
    value: float
    validation_stats: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": dict(self.params), "value": self.value,
                "validation_stats": dict(self.validation_stats)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ThresholdRecord:
        method = d.get("method")
        if method not in METHODS:
            raise ValueError(f"threshold.method must be one of {METHODS}, got {method!r}")
        value = d.get("value")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value) or value <= 0:
            raise ValueError(f"threshold.value must be a finite number > 0, got {value!r}")
        params, stats = d.get("params", {}), d.get("validation_stats", {})
        if not isinstance(params, dict) or not isinstance(stats, dict):
            raise ValueError("threshold.params and threshold.validation_stats must be JSON objects")
        return cls(method, dict(params), float(value), dict(stats))


def error_stats(errors: np.ndarray) -> dict[str, float]:
    e = np.asarray(errors, dtype=np.float64)
    return {"count": float(e.size), "mean": float(e.mean()), "std": float(e.std()), "min": float(e.min()),
            "p50": float(np.quantile(e, 0.5)), "p95": float(np.quantile(e, 0.95)),
            "p99": float(np.quantile(e, 0.99)), "max": float(e.max())}


class ThresholdCalibrator:
    """Turns healthy validation errors into one threshold with the configured method.

    >>> ThresholdCalibrator(ThresholdConfig(method="mean_std", k=2.0)).fit(np.array([1.0, 3.0])).value
    4.0
    >>> ThresholdCalibrator(ThresholdConfig(method="max_factor", factor=1.5)).fit(np.array([1.0, 2.0])).value
    3.0
    """

    def __init__(self, cfg: ThresholdConfig) -> None:
        self.cfg = cfg

    def fit(self, errors: np.ndarray) -> ThresholdRecord:
        e = np.asarray(errors, dtype=np.float64).reshape(-1)
        if e.size == 0:
            raise ValueError("no validation windows to calibrate the threshold on "
                             "(validation part shorter than one window?)")
        if not np.all(np.isfinite(e)):
            raise ValueError("validation errors contain NaN or infinity")
        c = self.cfg
        if c.method == "quantile":
            params, value = {"q": c.quantile}, float(np.quantile(e, c.quantile))
        elif c.method == "mean_std":
            params, value = {"k": c.k}, float(e.mean() + c.k * e.std())
        elif c.method == "max_factor":
            params, value = {"factor": c.factor}, float(e.max() * c.factor)
        elif c.method == "contamination":
            # An expected anomaly ratio r means the top r of errors are anomalous.
            params, value = {"contamination": c.contamination}, float(np.quantile(e, 1.0 - c.contamination))
        else:  # pragma: no cover - config validation forbids it
            raise ValueError(f"unknown threshold method {c.method!r}")
        # Guard against a zero threshold (perfect reconstruction of constant data).
        value = max(value, float(np.finfo(np.float32).tiny))
        return ThresholdRecord(c.method, params, value, error_stats(e))
