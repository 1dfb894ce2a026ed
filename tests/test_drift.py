"""Drift removal (sensord.drift): temperatures seen against their own baseline, the same in every path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sensord.bundle import BundleError, ModelBundle
from sensord.config import ConfigError, SensordConfig, config_from_dict
from sensord.dataio import Series
from sensord.drift import DriftSpec, drift_channels
from sensord.evaluation import score_series
from sensord.scorer import Scorer
from sensord.simulator import PumpSimulator
from sensord.training import train_bundle
from sensord.windows import WindowBuffer, WindowSpec, window_spec

TAU = 60.0
STEP = 5.0


def _buffer(keep: float = 0.0, gap: float = 10.0) -> WindowBuffer:
    # channel 0: flow (as read), channel 1: a temperature whose healthy level was 20
    return WindowBuffer(WindowSpec(2, 1, gap, DriftSpec((1,), (20.0,), TAU, keep)), channels=2)


def _feed(buf: WindowBuffer, t0: float, seconds: int, flow: float, temp: float, step: float = 1.0) -> list[np.ndarray]:
    out = []
    for i in range(int(seconds / step)):
        w = buf.push(t0 + i * step, [flow, temp])
        if w is not None:
            out.append(w.values[-1])  # the newest reading as the model sees it
    return out


def test_a_temperature_that_settles_higher_reads_as_its_level_again_and_other_channels_as_read() -> None:
    buf = _buffer()
    before = _feed(buf, 0.0, 120, 7.0, 25.0)
    assert before[-1][1] == pytest.approx(20.0)  # at its baseline a channel reads as its healthy level
    after = _feed(buf, 120.0, 300, 9.0, 25.0 + STEP)
    assert after[0][1] == pytest.approx(20.0 + STEP * math.exp(-1 / TAU), abs=1e-3)  # a jump shows at once
    assert after[59][1] == pytest.approx(20.0 + STEP * math.exp(-60 / TAU), abs=1e-3)  # e^-1 left after tau
    assert after[-1][1] == pytest.approx(20.0 + STEP * math.exp(-300 / TAU), abs=1e-3)  # settled: near the level
    assert all(row[0] == 9.0 for row in after)  # flow is not a drift channel: its new level stays


def test_keep_leaves_that_share_of_the_slow_change() -> None:
    buf = _buffer(keep=0.25)
    _feed(buf, 0.0, 120, 7.0, 25.0)
    after = _feed(buf, 120.0, 900, 7.0, 25.0 + STEP)
    assert after[-1][1] == pytest.approx(20.0 + 0.25 * (25.0 + STEP - 20.0), abs=1e-3)


def test_the_baseline_follows_time_not_the_number_of_readings() -> None:
    one, two = _buffer(), _buffer()
    _feed(one, 0.0, 60, 7.0, 25.0, step=1.0)
    _feed(two, 0.0, 60, 7.0, 25.0, step=2.0)
    a = _feed(one, 60.0, 61, 7.0, 30.0, step=1.0)
    b = _feed(two, 60.0, 61, 7.0, 30.0, step=2.0)
    # Both 60 s after the step: e^-1 of it left (by readings, the 2 s stream would keep e^-0.5)
    assert a[-1][1] == pytest.approx(20.0 + 5.0 * math.exp(-1.0), abs=0.05)
    assert b[-1][1] == pytest.approx(20.0 + 5.0 * math.exp(-1.0), abs=0.05)


def test_a_gap_restarts_the_baseline_at_the_next_reading() -> None:
    buf = _buffer(gap=10.0)
    _feed(buf, 0.0, 120, 7.0, 25.0)
    after = _feed(buf, 1000.0, 5, 7.0, 40.0)  # 880 s of silence: the machine may have changed meanwhile
    assert after[0][1] == pytest.approx(20.0)


def test_a_restored_buffer_continues_exactly_as_one_that_never_stopped() -> None:
    rng = np.random.default_rng(0)
    rows = np.column_stack([rng.normal(7, 1, 200), 25 + np.cumsum(rng.normal(0, 0.1, 200))])
    whole, first = _buffer(), _buffer()
    expected = [w.values for t in range(200) if (w := whole.push(float(t), rows[t])) is not None]
    got = [w.values for t in range(120) if (w := first.push(float(t), rows[t])) is not None]
    state = json.loads(json.dumps(first.export()))  # as the daemon's state file holds it
    assert state["drift_base"] is not None
    second = _buffer()
    second.restore(state)
    got += [w.values for t in range(120, 200) if (w := second.push(float(t), rows[t])) is not None]
    np.testing.assert_array_equal(np.stack(got), np.stack(expected))
    stale = dict(state, drift_base=[1.0, 2.0])
    with pytest.raises(ValueError, match="drift_base"):
        _buffer().restore(stale)


def test_channels_are_chosen_by_name_and_bad_patterns_are_refused_with_the_key() -> None:
    assert drift_channels(["Accelerometer1RMS", "Temperature", "Thermocouple", "Volume Flow RateRMS"],
                          ["temp", "thermo"]) == (1, 2)
    assert drift_channels(["t_oil", "t_air"], []) == ()
    with pytest.raises(ConfigError, match=r"window\.drift_channels.*not a regular expression"):
        config_from_dict({"window": {"drift_channels": ["temp(" ]}})


@pytest.mark.parametrize(("window", "message"), [
    ({"drift_seconds": 0}, r"window\.drift_seconds"),
    ({"drift_keep": 1.0}, r"window\.drift_keep"),
    ({"drift_channels": "temp"}, r"window\.drift_channels"),
])
def test_bad_drift_settings_are_refused_with_the_key(window: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"window": window})


@pytest.mark.parametrize(("record", "message"), [
    ("not an object", "window.drift must be a JSON object"),
    ({"channels": ["b"], "levels": [1.0, 2.0], "seconds": 60, "keep": 0}, "one level per channel"),
    ({"channels": ["b"], "levels": ["warm"], "seconds": 60, "keep": 0}, "levels must be a list of numbers"),
    ({"channels": ["b"], "levels": [1.0], "seconds": "60", "keep": 0}, "window.drift.seconds must be a number"),
    ({"channels": ["b"], "levels": [1.0], "seconds": 60, "keep": 1.5}, r"keep must be in \[0, 1\)"),
    ({"channels": ["b", "b"], "levels": [1.0, 1.0], "seconds": 60, "keep": 0}, "distinct"),
])
def test_a_bad_drift_record_says_what_is_wrong(record: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DriftSpec.from_dict(record, ["a", "b"])


# -- trained models -----------------------------------------------------------------------------------

def _series(sim: PumpSimulator, seconds: int) -> Series:
    run = sim.generate(seconds)
    return Series(run.timestamps, run.values, run.channels, None, "pump")


def _cfg(**window: object) -> SensordConfig:
    return config_from_dict({"window": {"length": 20, **window}, "model": {"kind": "pca"},
                             "training": {"min_relative_scale": 0.0}})


@pytest.fixture(scope="module")
def runs() -> tuple[Series, Series]:
    """A healthy run to train on, and the same machine's next 2100 s."""
    sim = PumpSimulator(seed=3)
    return _series(sim, 1500), _series(sim, 2100)


@pytest.fixture(scope="module")
def healthy(runs: tuple[Series, Series]) -> Series:
    return runs[0]


def test_the_bundle_records_the_drift_channels_and_their_healthy_levels(healthy: Series, tmp_path: Path) -> None:
    bundle = train_bundle(healthy, _cfg(), tmp_path / "m")
    loaded = ModelBundle.load(tmp_path / "m")
    assert loaded.drift == bundle.drift
    assert loaded.drift is not None and [loaded.channels[i] for i in loaded.drift.index] == ["temperature",
                                                                                            "thermocouple"]
    train_rows = len(healthy) - math.ceil(len(healthy) * 0.2)
    np.testing.assert_allclose(loaded.drift.levels, healthy.values[:train_rows, [4, 5]].mean(axis=0))
    off = train_bundle(healthy, _cfg(drift_channels=[]), tmp_path / "off")
    assert off.drift is None and "drift" not in json.loads((tmp_path / "off" / "bundle.json").read_text())["window"]

    meta = json.loads((tmp_path / "m" / "bundle.json").read_text())
    meta["window"]["drift"]["channels"] = ["temperature", "no_such_channel"]
    (tmp_path / "m" / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"bundle\.json: window\.drift\.channels \['no_such_channel'\]"):
        ModelBundle.load(tmp_path / "m")


def test_a_temperature_that_settles_higher_scores_as_before_but_a_current_step_is_still_a_fault(
        runs: tuple[Series, Series], tmp_path: Path) -> None:
    healthy, later = runs  # the change comes 1500 s into the later run and stays
    bundle = train_bundle(healthy, _cfg(), tmp_path / "on")
    temp_up, current_up = later.values.copy(), later.values.copy()
    temp_up[1500:, [4, 5]] += 8.0  # 8 healthy spreads (12 of the scaler's), and it stays there
    current_up[1500:, 2] += 0.5    # 5 healthy spreads

    def scored(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        series = Series(later.timestamps, values, later.channels, None, "later")
        s = score_series(series, Scorer(bundle), window_spec(None, bundle))
        settled = s.rows >= 1500 + 5 * TAU  # five time constants after the change
        return s.errors[settled], s.errors[(s.rows >= 1500) & (s.rows < 1510)]

    base, _ = scored(later.values)
    settled, onset = scored(temp_up)
    assert float(np.mean(base > bundle.threshold.value)) < 0.05
    # Settled, the temperature reads as before (e^-5 of the step is left): the same errors as the unchanged run.
    np.testing.assert_allclose(settled, base, rtol=0.05)
    assert onset.max() > 2 * base.max()  # but the jump itself was seen
    stepped, _ = scored(current_up)
    assert float(np.mean(stepped > bundle.threshold.value)) > 0.5  # a level change elsewhere stays a fault
