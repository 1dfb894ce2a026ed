"""Offline evaluation: a labelled series through the daemon's own windows, scorer and detector.

Causal by construction: the window that *ends* at a row decides that row, with
the detector's state after that window, exactly as the live daemon would have
decided at that moment. Rows before the first complete window (or after a gap
restart) are unscored, counted as such, and count as "normal" predictions in
the metrics, as an alert that was never raised is a miss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .config import DetectorConfig
from .dataio import Series
from .detector import AlertDetector, AlertEvent
from .errors import DataError
from .scorer import Scorer, top_channels
from .windows import WindowSpec, iter_windows


@dataclass(frozen=True)
class Confusion:
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn)

    @property
    def f1(self) -> float:
        """SKAB's F1 = TP / (TP + (FP + FN) / 2)."""
        d = self.tp + (self.fp + self.fn) / 2
        return self.tp / d if d else 0.0

    @property
    def far(self) -> float:
        """False alarm rate FP / (FP + TN)."""
        d = self.fp + self.tn
        return self.fp / d if d else 0.0

    @property
    def mar(self) -> float:
        """Missed alarm rate FN / (FN + TP)."""
        d = self.fn + self.tp
        return self.fn / d if d else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn,
                "f1": round(self.f1, 4), "far": round(self.far, 4), "mar": round(self.mar, 4)}

    @classmethod
    def of(cls, labels: np.ndarray, predicted: np.ndarray) -> Confusion:
        y, p = labels.astype(bool), predicted.astype(bool)
        return cls(int(np.sum(y & p)), int(np.sum(~y & p)), int(np.sum(~y & ~p)), int(np.sum(y & ~p)))


@dataclass(frozen=True)
class SegmentResult:
    start_row: int
    end_row: int  # exclusive
    detected: bool
    delay_rows: int | None
    delay_seconds: float | None


@dataclass
class EvaluationResult:
    confusion: Confusion
    rows: int  # rows counted in the metrics
    unscored_rows: int
    windows: int
    segments: list[SegmentResult] = field(default_factory=list)
    alerts: list[AlertEvent] = field(default_factory=list)
    predicted: np.ndarray | None = None  # per counted row: 1 alert, 0 normal, -1 unscored
    errors: np.ndarray | None = None  # per window
    window_counts: dict[str, int] = field(default_factory=dict)  # windows labelled by their end row

    @property
    def mean_delay_seconds(self) -> float | None:
        d = [s.delay_seconds for s in self.segments if s.delay_seconds is not None]
        return float(np.mean(d)) if d else None

    @property
    def mean_delay_rows(self) -> float | None:
        d = [s.delay_rows for s in self.segments if s.delay_rows is not None]
        return float(np.mean(d)) if d else None

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.confusion.as_dict(), "rows": self.rows, "unscored_rows": self.unscored_rows,
            "windows": self.windows, "window_counts": self.window_counts, "segments": len(self.segments),
            "segments_detected": sum(s.detected for s in self.segments),
            "mean_delay_seconds": _round(self.mean_delay_seconds), "mean_delay_rows": _round(self.mean_delay_rows),
            "segment_details": [asdict(s) for s in self.segments],
            "alerts": [{"state": a.state, "window_start": a.window_start, "window_end": a.window_end,
                        "score": round(a.score, 4)} for a in self.alerts],
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def segments_of(labels: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs of 1 as (start, stop) row ranges."""
    padded = np.concatenate([[0], labels.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=False)]


def window_counts(errors: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, int]:
    """How many normal/anomalous windows fall under/over the threshold.

    "Over" means ``error > threshold``, the detector's own comparison; an error
    equal to the threshold is "under".

    >>> window_counts(np.array([0.1, 0.5, 0.2, 0.9]), np.array([0, 0, 1, 1]), 0.3)
    {'normal_under': 1, 'normal_over': 1, 'anomalous_over': 1, 'anomalous_under': 1}
    """
    e = np.asarray(errors, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if e.shape != y.shape:
        raise ValueError(f"errors and labels must have the same length, got {e.shape[0]} and {y.shape[0]}")
    over = e > threshold
    return {
        "normal_under": int(np.sum(~y & ~over)),
        "normal_over": int(np.sum(~y & over)),
        "anomalous_over": int(np.sum(y & over)),
        "anomalous_under": int(np.sum(y & ~over)),
    }


@dataclass(frozen=True)
class ScoredSeries:
    """Every window of a series scored once; what the detector needs to decide its rows.

    Kept apart from the decisions so a threshold or hysteresis sweep (the
    cross-validation in ``bench/skab_cv.py``) re-decides the same errors
    without scoring again, through the same code as ``evaluate``.
    """

    n_rows: int
    hop: int
    rows: np.ndarray  # end row of each window
    starts: np.ndarray  # first timestamp of each window
    ends: np.ndarray  # last timestamp of each window
    errors: np.ndarray
    channel_shares: np.ndarray
    channels: tuple[str, ...]


def score_series(series: Series, scorer: Scorer, spec: WindowSpec, device: str = "eval") -> ScoredSeries:
    """Score every window of ``series`` (scoring is per-window and stateless, so one batch
    gives the same errors as the daemon's streaming batches)."""
    pairs = list(iter_windows(series.timestamps, series.values, spec, device))
    c = len(scorer.channels)
    if not pairs:
        return ScoredSeries(len(series), spec.hop, np.zeros(0, np.int64), np.zeros(0), np.zeros(0),
                            np.zeros(0), np.zeros((0, c)), scorer.channels)
    rows = np.fromiter((r for r, _ in pairs), dtype=np.int64, count=len(pairs))
    scored = scorer.score(np.stack([w.values for _, w in pairs]))
    return ScoredSeries(len(series), spec.hop, rows, np.array([w.start for _, w in pairs]),
                        np.array([w.end for _, w in pairs]), scored.errors, scored.channel_shares,
                        scorer.channels)


def decide_rows(scored: ScoredSeries, threshold: float, detector_cfg: DetectorConfig, device: str = "eval",
                top_k: int = 3) -> tuple[np.ndarray, list[AlertEvent]]:
    """Per-row causal predictions (1 alert, 0 normal, -1 unscored) and the alert events.

    The windows go through the daemon's detector in time order; a window decides
    its own end row and, with hop > 1, the rows up to the next window.
    """
    predicted = np.full(scored.n_rows, -1, dtype=np.int8)
    detector = AlertDetector(device, threshold, detector_cfg.raise_after, detector_cfg.clear_after)
    alerts: list[AlertEvent] = []
    rows, n = scored.rows, scored.n_rows
    for i in range(len(rows)):
        row = int(rows[i])
        top = top_channels(scored.channels, scored.channel_shares[i], top_k)
        decision = detector.update(float(scored.errors[i]), float(scored.starts[i]), float(scored.ends[i]), top)
        if decision.event is not None:
            alerts.append(decision.event)
        stop = min(n, row + scored.hop)
        if i + 1 < len(rows):
            stop = min(stop, int(rows[i + 1]))
        predicted[row:stop] = 1 if decision.active else 0
    return predicted, alerts


def evaluate_scored(series: Series, scored: ScoredSeries, threshold: float, detector_cfg: DetectorConfig,
                    count_from: int = 0, top_k: int = 3) -> EvaluationResult:
    """Metrics over rows ``count_from`` onward of already scored windows, at ``threshold``."""
    if series.labels is None:
        raise DataError(f"{series.path}: no label column to evaluate against")
    predicted, alerts = decide_rows(scored, threshold, detector_cfg, "eval", top_k)
    rows, errors = scored.rows, scored.errors
    counted = rows >= count_from
    windows = window_counts(errors[counted], series.labels[rows[counted]], threshold)
    pred = predicted[count_from:]
    labels = series.labels[count_from:]
    ts = series.timestamps[count_from:]
    confusion = Confusion.of(labels, pred == 1)
    segments: list[SegmentResult] = []
    for a, b in segments_of(labels):
        hits = np.flatnonzero(pred[a:b] == 1)
        if len(hits):
            segments.append(SegmentResult(a + count_from, b + count_from, True, int(hits[0]),
                                          float(ts[a + hits[0]] - ts[a])))
        else:
            segments.append(SegmentResult(a + count_from, b + count_from, False, None, None))
    first_counted = series.timestamps[count_from] if len(series) > count_from else np.inf
    return EvaluationResult(confusion, len(pred), int(np.sum(pred == -1)), len(rows), segments,
                            [a for a in alerts if a.window_end >= first_counted], pred, errors, windows)


def evaluate_series(series: Series, scorer: Scorer, spec: WindowSpec, detector_cfg: DetectorConfig,
                    count_from: int = 0, top_k: int = 3) -> EvaluationResult:
    """Metrics over rows ``count_from`` onward; earlier rows only fill the windows (causal warm-up)."""
    if series.labels is None:
        raise DataError(f"{series.path}: no label column to evaluate against")
    return evaluate_scored(series, score_series(series, scorer, spec), scorer.threshold, detector_cfg,
                           count_from, top_k)
