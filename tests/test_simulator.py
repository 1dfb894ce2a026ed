"""Tests for the built-in pump simulator (sensord.simulator)."""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from sensord.simulator import (
    CHANNELS,
    FAULT_KINDS,
    FaultSpec,
    PumpSimulator,
    SimulatedSeries,
    default_faults,
    simulate,
    write_csv,
)

IDX = {name: i for i, name in enumerate(CHANNELS)}
LEAD = 600
TOTAL = LEAD + 4 * (120 + 240)


@pytest.fixture(scope="module")
def healthy() -> SimulatedSeries:
    return PumpSimulator(seed=3).generate(3600)


@pytest.fixture(scope="module")
def clean_and_faulty() -> tuple[SimulatedSeries, SimulatedSeries, list[FaultSpec]]:
    faults = default_faults(LEAD)
    clean = PumpSimulator(seed=5).generate(TOTAL)
    faulty = PumpSimulator(seed=5).generate(TOTAL, faults)
    return clean, faulty, faults


def _fault(faults: list[FaultSpec], kind: str) -> FaultSpec:
    return next(f for f in faults if f.kind == kind)


def _seg(f: FaultSpec) -> slice:
    return slice(f.start, f.start + f.duration)


def test_channel_names_and_fault_kinds() -> None:
    assert CHANNELS == ("vibration_1", "vibration_2", "current", "pressure",
                        "temperature", "thermocouple", "voltage", "flow")
    assert FAULT_KINDS == ("step", "drift", "spikes", "stuck")


def test_deterministic_for_seed() -> None:
    a = PumpSimulator(seed=7).generate(300, default_faults(10)[:1])
    b = PumpSimulator(seed=7).generate(300, default_faults(10)[:1])
    c = PumpSimulator(seed=8).generate(300, default_faults(10)[:1])
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.timestamps, b.timestamps)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.allclose(a.values, c.values)


def test_shapes_dtypes_and_time_axis() -> None:
    start = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
    sim = PumpSimulator(seed=1, start=start)
    s = sim.generate(200)
    assert s.values.shape == (200, 8) and s.values.dtype == np.float64
    assert s.timestamps.shape == (200,) and s.timestamps.dtype == np.float64
    assert s.labels.shape == (200,) and s.labels.dtype == np.int8
    assert s.channels == CHANNELS
    assert s.timestamps[0] == start.timestamp()
    np.testing.assert_array_equal(np.diff(s.timestamps), 1.0)
    assert not s.labels.any() and np.isfinite(s.values).all()
    # A second call continues the same machine in time.
    s2 = sim.generate(50)
    assert s2.timestamps[0] == s.timestamps[-1] + 1.0


def test_realistic_magnitudes(healthy: SimulatedSeries) -> None:
    mean = dict(zip(CHANNELS, healthy.values.mean(axis=0), strict=False))
    assert 1.0 < mean["current"] < 2.0
    assert 0.1 < mean["pressure"] < 1.0
    assert 70.0 < mean["temperature"] < 90.0
    assert 225.0 < mean["voltage"] < 235.0
    assert 20.0 < mean["flow"] < 40.0
    assert healthy.values[:, IDX["voltage"]].std() < 1.0  # nearly constant


def test_channels_are_correlated(healthy: SimulatedSeries) -> None:
    corr = np.corrcoef(healthy.values.T)
    assert abs(corr[IDX["current"], IDX["flow"]]) > 0.5
    assert abs(corr[IDX["pressure"], IDX["flow"]]) > 0.5
    assert abs(corr[IDX["vibration_1"], IDX["current"]]) > 0.5
    assert abs(corr[IDX["temperature"], IDX["thermocouple"]]) > 0.5


def test_default_schedule_and_labels(clean_and_faulty) -> None:
    _, faulty, faults = clean_and_faulty
    assert [f.kind for f in faults] == list(FAULT_KINDS)
    assert faults[0].start == LEAD
    assert all(f.duration == 120 for f in faults)
    assert all(b.start - (a.start + a.duration) == 240 for a, b in zip(faults, faults[1:], strict=False))
    expected = np.zeros(TOTAL, dtype=np.int8)
    for f in faults:
        expected[_seg(f)] = 1
    np.testing.assert_array_equal(faulty.labels, expected)
    assert faulty.labels.sum() == 4 * 120


def test_faults_leave_healthy_part_untouched(clean_and_faulty) -> None:
    clean, faulty, faults = clean_and_faulty
    before = slice(0, faults[0].start)
    np.testing.assert_array_equal(clean.values[before], faulty.values[before])


def test_step_fault_is_large(clean_and_faulty, healthy: SimulatedSeries) -> None:
    clean, faulty, faults = clean_and_faulty
    f = _fault(faults, "step")
    std = healthy.values.std(axis=0)
    j = IDX[f.channel]
    shift = (faulty.values[_seg(f), j] - clean.values[_seg(f), j]).mean()
    assert abs(shift) > 3.0 * std[j]
    # Knock-on: at least one other channel moves too.
    others = np.abs((faulty.values[_seg(f)] - clean.values[_seg(f)]).mean(axis=0)) / std
    others[j] = 0.0
    assert others.max() > 1.0


def test_drift_fault_grows_large_early(clean_and_faulty, healthy: SimulatedSeries) -> None:
    clean, faulty, faults = clean_and_faulty
    f = _fault(faults, "drift")
    j = IDX[f.channel]
    dev = (faulty.values[_seg(f), j] - clean.values[_seg(f), j]) / healthy.values[:, j].std()
    assert np.all(np.diff(dev) >= 0)  # slowly growing, never shrinking
    assert dev[f.duration // 3] > 3.5
    assert (dev > 3.0).mean() > 0.6
    assert dev[0] < dev[-1] / 3  # starts small: a drift, not a step


def test_spikes_fault_is_a_burst(clean_and_faulty, healthy: SimulatedSeries) -> None:
    clean, faulty, faults = clean_and_faulty
    f = _fault(faults, "spikes")
    j = IDX[f.channel]
    assert f.channel.startswith("vibration")
    dev = (faulty.values[_seg(f), j] - clean.values[_seg(f), j]) / healthy.values[:, j].std()
    spikes = np.flatnonzero(dev > 5.0)
    assert len(spikes) >= f.duration // 4
    assert np.diff(spikes).max() <= 3  # every 1-3 s


def test_stuck_fault_freezes_and_breaks_correlation(clean_and_faulty, healthy) -> None:
    _, faulty, faults = clean_and_faulty
    f = _fault(faults, "stuck")
    j = IDX[f.channel]
    seg = faulty.values[_seg(f)]
    assert f.channel in ("flow", "current")
    np.testing.assert_array_equal(np.diff(seg[:, j]), 0.0)
    assert seg[0, j] == faulty.values[f.start - 1, j]  # frozen at its last value
    # Predict the stuck channel from its partner with a healthy linear fit; the
    # residual inside the segment must be far outside the healthy residual.
    partner = IDX["current"] if f.channel == "flow" else IDX["flow"]
    coef = np.polyfit(healthy.values[:, partner], healthy.values[:, j], 1)
    resid_h = healthy.values[:, j] - np.polyval(coef, healthy.values[:, partner])
    resid_f = seg[:, j] - np.polyval(coef, seg[:, partner])
    assert np.abs(resid_f).max() > 8.0 * resid_h.std()
    # ...while the partner keeps moving well beyond its noise (diff std / sqrt 2).
    assert seg[:, partner].std() > 3.0 * np.diff(healthy.values[:, partner]).std() / np.sqrt(2)


@pytest.mark.parametrize("faults", [("step", "melt"), ("Stuck",)])
def test_unknown_fault_kind_raises(tmp_path: Path, faults: tuple[str, ...]) -> None:
    bad = [k for k in faults if k not in FAULT_KINDS][0]
    with pytest.raises(ValueError, match=bad) as info:
        simulate(tmp_path, seconds=120, faults=faults)
    assert all(k in str(info.value) for k in FAULT_KINDS)
    assert not (tmp_path / "healthy.csv").exists()


def test_invalid_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="60"):
        simulate(tmp_path, seconds=59)
    with pytest.raises(ValueError, match="melt"):
        FaultSpec("melt", 0, 10, "flow")
    with pytest.raises(ValueError, match="rpm"):
        FaultSpec("step", 0, 10, "rpm")
    with pytest.raises(ValueError):
        PumpSimulator().generate(100, [FaultSpec("step", 50, 120, "current")])


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_simulate_csv_round_trip(tmp_path: Path) -> None:
    healthy_path, labelled_path = simulate(tmp_path / "out", seconds=120, seed=4)
    assert healthy_path == tmp_path / "out" / "healthy.csv"
    assert labelled_path == tmp_path / "out" / "labelled.csv"

    header, rows = _read(healthy_path)
    assert header == ["timestamp", *CHANNELS]
    assert len(rows) == 120
    sim = PumpSimulator(seed=4)
    expected = sim.generate(120)
    values = np.array([[float(v) for v in r[1:]] for r in rows])
    np.testing.assert_allclose(values, expected.values, rtol=1e-5)
    stamps = [datetime.strptime(r[0], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
              for r in rows]
    np.testing.assert_array_equal(stamps, expected.timestamps)

    lheader, lrows = _read(labelled_path)
    assert lheader == ["timestamp", *CHANNELS, "anomaly"]
    assert len(lrows) == TOTAL
    lexpected = sim.generate(TOTAL, default_faults(LEAD))
    labels = np.array([int(r[-1]) for r in lrows])
    assert set(labels) == {0, 1}
    np.testing.assert_array_equal(labels, lexpected.labels)
    lvalues = np.array([[float(v) for v in r[1:-1]] for r in lrows])
    np.testing.assert_allclose(lvalues, lexpected.values, rtol=1e-5)
    # The labelled run continues the same machine right after the healthy run.
    first = datetime.strptime(lrows[0][0], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert first.timestamp() == stamps[-1] + 1.0


def test_simulate_subset_of_faults(tmp_path: Path) -> None:
    _, labelled_path = simulate(tmp_path, seconds=60, faults=("stuck",))
    _, rows = _read(labelled_path)
    labels = np.array([int(r[-1]) for r in rows])
    assert len(rows) == LEAD + 120 + 240
    assert labels[LEAD:LEAD + 120].all() and labels.sum() == 120


def test_write_csv_without_labels(tmp_path: Path) -> None:
    s = PumpSimulator(seed=2, start=datetime(2024, 3, 5, 23, 59, 58)).generate(3)
    path = tmp_path / "x.csv"
    write_csv(path, s, include_labels=False)
    header, rows = _read(path)
    assert header == ["timestamp", *CHANNELS]
    assert [r[0] for r in rows] == ["2024-03-05 23:59:58", "2024-03-05 23:59:59",
                                    "2024-03-06 00:00:00"]
