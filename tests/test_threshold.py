"""Tests for sensord.threshold: each calibration method on known numbers, and the stored record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sensord.config import ThresholdConfig
from sensord.threshold import METHODS, ThresholdCalibrator, ThresholdRecord, error_stats

ERRORS = np.arange(1, 101, dtype=np.float64)  # 1, 2, ..., 100


def _fit(errors: np.ndarray, **kw: object) -> ThresholdRecord:
    return ThresholdCalibrator(ThresholdConfig(**kw)).fit(errors)


def test_quantile_matches_numpy() -> None:
    rec = _fit(ERRORS, method="quantile", quantile=0.99)
    assert rec.method == "quantile"
    assert rec.params == {"q": 0.99}
    assert rec.value == pytest.approx(float(np.quantile(ERRORS, 0.99)))
    # numpy's linear interpolation: 1 + 0.99 * 99 = 99.01
    assert rec.value == pytest.approx(99.01)


def test_quantile_median() -> None:
    assert _fit(ERRORS, method="quantile", quantile=0.5).value == pytest.approx(50.5)


def test_mean_std() -> None:
    rec = _fit(ERRORS, method="mean_std", k=3.0)
    assert rec.params == {"k": 3.0}
    # population std of 1..100 is sqrt((100^2 - 1) / 12)
    expected = 50.5 + 3.0 * np.sqrt((100 ** 2 - 1) / 12)
    assert rec.value == pytest.approx(expected)
    assert rec.value == pytest.approx(ERRORS.mean() + 3.0 * ERRORS.std())


def test_mean_std_k_zero_is_the_mean() -> None:
    assert _fit(np.array([1.0, 3.0]), method="mean_std", k=0.0).value == pytest.approx(2.0)


def test_max_factor() -> None:
    rec = _fit(ERRORS, method="max_factor", factor=1.5)
    assert rec.params == {"factor": 1.5}
    assert rec.value == pytest.approx(150.0)


def test_contamination_is_quantile_at_one_minus_c() -> None:
    rec = _fit(ERRORS, method="contamination", contamination=0.05)
    assert rec.params == {"contamination": 0.05}
    assert rec.value == pytest.approx(float(np.quantile(ERRORS, 0.95)))
    assert rec.value == pytest.approx(_fit(ERRORS, method="quantile", quantile=0.95).value)


def test_order_of_errors_does_not_matter() -> None:
    shuffled = np.random.default_rng(1).permutation(ERRORS)
    for method in METHODS:
        assert _fit(shuffled, method=method).value == pytest.approx(_fit(ERRORS, method=method).value)


def test_2d_errors_are_flattened() -> None:
    assert _fit(ERRORS.reshape(10, 10), method="max_factor", factor=1.0).value == 100.0


def test_validation_stats_recorded() -> None:
    rec = _fit(ERRORS, method="quantile", quantile=0.99)
    s = rec.validation_stats
    assert s["count"] == 100.0
    assert s["mean"] == pytest.approx(50.5)
    assert s["std"] == pytest.approx(ERRORS.std())
    assert s["min"] == 1.0 and s["max"] == 100.0
    assert s["p50"] == pytest.approx(50.5)
    assert s["p95"] == pytest.approx(np.quantile(ERRORS, 0.95))
    assert s["p99"] == pytest.approx(np.quantile(ERRORS, 0.99))
    assert s == error_stats(ERRORS)


def test_zero_errors_give_a_positive_threshold() -> None:
    rec = _fit(np.zeros(10), method="quantile")
    assert rec.value > 0
    assert ThresholdRecord.from_dict(rec.to_dict()).value == rec.value


@pytest.mark.parametrize("method", METHODS)
def test_empty_errors_raise(method: str) -> None:
    with pytest.raises(ValueError, match="no validation windows"):
        _fit(np.array([]), method=method)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_errors_raise(bad: float) -> None:
    with pytest.raises(ValueError, match="NaN or infinity"):
        _fit(np.array([1.0, bad, 2.0]), method="quantile")


# --- the record stored in bundle.json -------------------------------------------------------


def test_record_round_trip_through_json() -> None:
    rec = _fit(ERRORS, method="mean_std", k=2.5)
    d = json.loads(json.dumps(rec.to_dict()))
    back = ThresholdRecord.from_dict(d)
    assert back == rec
    assert back.to_dict() == rec.to_dict()


def test_to_dict_copies() -> None:
    rec = _fit(ERRORS, method="quantile")
    d = rec.to_dict()
    d["params"]["q"] = 0.1
    d["validation_stats"]["max"] = -1.0
    assert rec.params == {"q": 0.99}
    assert rec.validation_stats["max"] == 100.0


def test_from_dict_defaults_optional_parts() -> None:
    rec = ThresholdRecord.from_dict({"method": "max_factor", "value": 2})
    assert rec == ThresholdRecord("max_factor", {}, 2.0, {})
    assert isinstance(rec.value, float)


@pytest.mark.parametrize("d, match", [
    ({"value": 1.0}, "threshold.method"),
    ({"method": "median", "value": 1.0}, "threshold.method"),
    ({"method": "quantile"}, "threshold.value"),
    ({"method": "quantile", "value": 0.0}, "threshold.value"),
    ({"method": "quantile", "value": -1.0}, "threshold.value"),
    ({"method": "quantile", "value": float("nan")}, "threshold.value"),
    ({"method": "quantile", "value": float("inf")}, "threshold.value"),
    ({"method": "quantile", "value": "1.0"}, "threshold.value"),
    ({"method": "quantile", "value": True}, "threshold.value"),
    ({"method": "quantile", "value": None}, "threshold.value"),
])
def test_from_dict_errors(d: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ThresholdRecord.from_dict(d)
