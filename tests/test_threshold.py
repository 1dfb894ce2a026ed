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


# --- peaks over threshold (extreme-value tail) ------------------------------------------------


def test_gpd_fit_recovers_known_shape_and_scale() -> None:
    from sensord.threshold import fit_gpd
    rng = np.random.default_rng(3)
    xi, sigma = 0.2, 1.5
    u = rng.uniform(size=40_000)
    sample = sigma / xi * ((1 - u) ** (-xi) - 1)  # inverse CDF of the GPD
    got_xi, got_sigma = fit_gpd(sample)
    assert got_xi == pytest.approx(xi, abs=0.03)
    assert got_sigma == pytest.approx(sigma, rel=0.05)


@pytest.mark.parametrize(("risk", "exact"), [(1e-3, -np.log(1e-3)), (1e-5, -np.log(1e-5))])
def test_pot_extrapolates_an_exponential_tail(risk: float, exact: float) -> None:
    # 2000 errors cannot show the 1e-5 quantile empirically; the tail fit can extrapolate to it.
    errors = np.random.default_rng(5).exponential(1.0, 2000)
    rec = _fit(errors, method="pot", risk=risk, pot_level=0.9)
    assert rec.value == pytest.approx(exact, rel=0.15)
    assert rec.method == "pot" and rec.params["risk"] == risk and rec.params["excesses"] == 200
    if risk < 1 / len(errors):
        assert rec.value > errors.max()


def test_pot_on_a_bounded_tail_stays_near_its_end() -> None:
    # Uniform errors: a bounded tail (xi < 0); the threshold must not run off to infinity.
    errors = np.random.default_rng(6).uniform(0.0, 1.0, 5000)
    assert 0.95 < _fit(errors, method="pot", risk=1e-6, pot_level=0.8).value < 1.3


def test_pot_factor_scales_and_few_points_fall_back_to_the_maximum() -> None:
    errors = np.random.default_rng(7).exponential(1.0, 500)
    one = _fit(errors, method="pot").value
    assert _fit(errors, method="pot", pot_factor=2.0).value == pytest.approx(2 * one)
    few = np.array([1.0, 2.0, 3.0, 4.0])  # one point above the 0.8 quantile: no tail to fit
    assert _fit(few, method="pot").value == 4.0


def test_pot_is_steadier_than_the_maximum_across_resamples() -> None:
    # The reason it exists: with ~50 validation windows the maximum swings; the tail fit less so.
    rng = np.random.default_rng(8)
    maxima, pots = [], []
    for _ in range(200):
        e = rng.lognormal(0.0, 0.5, 50)
        maxima.append(_fit(e, method="max_factor", factor=1.0).value)
        pots.append(_fit(e, method="pot", risk=1e-2).value)
    cv = lambda v: np.std(v) / np.mean(v)  # noqa: E731
    assert cv(pots) < cv(maxima)
