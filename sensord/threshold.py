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

METHODS = ("quantile", "mean_std", "max_factor", "contamination", "pot")


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


def fit_gpd(excesses: np.ndarray) -> tuple[float, float]:
    """Generalised Pareto shape and scale (xi, sigma) of positive excesses, by probability-weighted moments.

    Hosking & Wallis (1987): unlike maximum likelihood it always returns an
    answer and stays sane with the handful of excesses a short healthy period
    gives. The shape is clipped to [-0.5, 0.5] for the same reason: beyond
    that, ten points cannot tell a bounded tail from an explosive one.

    >>> rng = np.random.default_rng(0)
    >>> xi, sigma = fit_gpd(rng.exponential(2.0, 20000))   # exponential = GPD with xi 0
    >>> round(xi, 1) + 0.0, round(sigma, 1)
    (0.0, 2.0)
    """
    y = np.sort(np.asarray(excesses, dtype=np.float64))
    m = len(y)
    if m < 2:
        raise ValueError(f"need at least 2 excesses to fit a tail, got {m}")
    b0 = y.mean()
    a1 = float(np.mean(y * (m - 1 - np.arange(m)) / (m - 1)))
    denom = b0 - 2 * a1
    if denom <= 0 or b0 <= 0:
        return 0.0, max(b0, float(np.finfo(np.float64).tiny))
    k = b0 / denom - 2.0  # Hosking's k = -xi
    sigma = 2.0 * b0 * a1 / denom
    xi = float(np.clip(-k, -0.5, 0.5))
    return xi, float(sigma)


def pot_threshold(errors: np.ndarray, risk: float, level: float) -> tuple[float, dict[str, float]]:
    """The error exceeded by healthy windows with probability ``risk``: peaks over threshold (SPOT).

    Siffer et al., KDD 2017: above a high empirical quantile ``t`` (``level``)
    the excesses follow a generalised Pareto law whatever the errors' own
    distribution, so the tail can be extrapolated to a risk far smaller than
    1 / (number of windows); an empirical max or quantile can only say what
    the few healthy windows happened to show.

    >>> e = np.random.default_rng(1).exponential(1.0, 50000)
    >>> round(pot_threshold(e, 1e-4, 0.98)[0], 0)    # exact: -ln(1e-4) = 9.2
    9.0
    """
    e = np.asarray(errors, dtype=np.float64)
    t = float(np.quantile(e, level))
    excess = e[e > t] - t
    n, nt = len(e), len(excess)
    if nt < 3:  # too few points above t to say anything about the tail: fall back to the maximum
        return float(e.max()), {"t": t, "excesses": float(nt), "xi": 0.0, "sigma": 0.0}
    xi, sigma = fit_gpd(excess)
    r = risk * n / nt
    z = t - sigma * np.log(r) if abs(xi) < 1e-9 else t + sigma / xi * (r ** (-xi) - 1.0)
    return float(z), {"t": t, "excesses": float(nt), "xi": xi, "sigma": sigma}


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
        elif c.method == "pot":
            value, tail = pot_threshold(e, c.risk, c.pot_level)
            value *= c.pot_factor
            params = {"risk": c.risk, "level": c.pot_level, "factor": c.pot_factor, **tail}
        else:  # pragma: no cover - config validation forbids it
            raise ValueError(f"unknown threshold method {c.method!r}")
        # Guard against a zero threshold (perfect reconstruction of constant data).
        value = max(value, float(np.finfo(np.float32).tiny))
        return ThresholdRecord(c.method, params, value, error_stats(e))
