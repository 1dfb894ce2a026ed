"""``sensord calibrate``: a new threshold for the same network from new healthy data, as a new bundle version."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from e2e_support import ROOT, TrainedBundle, write_series_csv

from sensord.bundle import ModelBundle
from sensord.calibration import MIN_WINDOWS, calibrate
from sensord.config import config_from_dict
from sensord.dataio import DataError, Series
from sensord.scorer import Scorer
from sensord.windows import window_spec, windowize

pytestmark = pytest.mark.training

THRESHOLD = config_from_dict({}).threshold  # max_factor 3


def shifted(series: Series, amount: float) -> Series:
    """The healthy machine after maintenance: 'current' runs ``amount`` higher (1.5 healthy spreads at 0.15)."""
    v = series.values.copy()
    v[:, series.channels.index("current")] += amount
    return Series(series.timestamps, v, series.channels, None, "after-maintenance")


@pytest.fixture
def bundle(tiny_bundle: TrainedBundle, tmp_path: Path) -> ModelBundle:
    shutil.copytree(tiny_bundle.bundle, tmp_path / "pump")
    return ModelBundle.load(tmp_path / "pump")


@pytest.fixture
def healthy(tiny_bundle: TrainedBundle) -> Series:
    return tiny_bundle.labelled.slice(0, 600)  # the simulator's healthy lead


def over(bundle: ModelBundle, series: Series) -> float:
    """Share of the series' windows over the bundle's threshold."""
    w = windowize(series.timestamps, series.values, window_spec(None, bundle)).values
    return float(np.mean(Scorer(bundle).score(w).errors > bundle.threshold.value))


def test_a_shifted_operating_point_stops_alarming_after_calibration(bundle: ModelBundle, healthy: Series,
                                                                     tmp_path: Path) -> None:
    after = shifted(healthy, 0.15)
    assert over(bundle, after.slice(300, 600)) > 0.5  # the old threshold calls the new normal a fault
    cal = calibrate(bundle, after.slice(0, 300), THRESHOLD)
    new = ModelBundle.load(bundle.path)  # written in place
    assert new.threshold.value == cal.bundle.threshold.value > bundle.threshold.value
    assert over(new, after.slice(300, 600)) == 0.0  # the later healthy part, never seen by calibration


def test_the_threshold_is_fitted_on_every_healthy_window_through_the_serving_scorer(
        bundle: ModelBundle, healthy: Series) -> None:
    part = healthy.slice(0, 300)
    cal = calibrate(bundle, part, THRESHOLD)
    assert cal.windows == 300 - bundle.window_length + 1  # hop 1: every window
    w = windowize(part.timestamps, part.values, window_spec(None, bundle, hop=1)).values
    expected = 3.0 * float(Scorer(bundle).score(w).errors.max())
    assert cal.bundle.threshold.value == pytest.approx(expected)
    assert cal.bundle.threshold.method == "max_factor"


def test_each_version_gets_a_new_id_and_keeps_the_old_thresholds(bundle: ModelBundle, healthy: Series) -> None:
    first = calibrate(bundle, healthy.slice(0, 300), THRESHOLD).bundle
    second = calibrate(ModelBundle.load(bundle.path), shifted(healthy, 0.1).slice(0, 300), THRESHOLD).bundle
    assert first.model_id == f"{bundle.model_id}.c1"
    assert second.model_id == f"{bundle.model_id}.c2"
    loaded = ModelBundle.load(bundle.path)
    assert loaded.model_id == second.model_id
    assert [h["model_id"] for h in loaded.threshold_history] == [bundle.model_id, first.model_id]
    assert [h["value"] for h in loaded.threshold_history] == [bundle.threshold.value, first.threshold.value]
    assert loaded.tflite_sha256 == bundle.tflite_sha256  # the same network


def test_out_writes_a_copy_and_leaves_the_original(bundle: ModelBundle, healthy: Series, tmp_path: Path) -> None:
    before = (bundle.path / "bundle.json").read_text()
    cal = calibrate(bundle, shifted(healthy, 0.15).slice(0, 300), THRESHOLD, out_dir=tmp_path / "pump-v2")
    assert (bundle.path / "bundle.json").read_text() == before
    copy = ModelBundle.load(tmp_path / "pump-v2")
    assert copy.threshold.value == cal.bundle.threshold.value != bundle.threshold.value
    assert (tmp_path / "pump-v2" / "model.tflite").read_bytes() == (bundle.path / "model.tflite").read_bytes()


def test_unusable_data_is_refused_with_the_reason(bundle: ModelBundle, healthy: Series) -> None:
    with pytest.raises(DataError, match=f"calibration needs at least {MIN_WINDOWS}"):
        calibrate(bundle, healthy.slice(0, bundle.window_length + 3), THRESHOLD)
    other = Series(healthy.timestamps, healthy.values[:, :3], healthy.channels[:3], None, "three.csv")
    with pytest.raises(DataError, match="three.csv: channels .* do not match the model's"):
        calibrate(bundle, other, THRESHOLD)
    assert ModelBundle.load(bundle.path).model_id == bundle.model_id  # nothing written


def test_cli_calibrate_in_place_prints_and_writes_json(bundle: ModelBundle, healthy: Series,
                                                        tmp_path: Path) -> None:
    csv = tmp_path / "after.csv"
    write_series_csv(csv, shifted(healthy, 0.15).slice(0, 300))
    proc = subprocess.run([sys.executable, "-m", "sensord.cli", "calibrate", "--model", str(bundle.path),
                           "--data", str(csv), "--json", str(tmp_path / "cal.json")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "cal.json").read_text())
    assert doc["model_id"] == f"{bundle.model_id}.c1" and doc["previous_model_id"] == bundle.model_id
    assert doc["windows"] == 300 - bundle.window_length + 1
    assert f"model {bundle.model_id}.c1 written to {bundle.path}" in proc.stdout
    assert "applies it on SIGHUP" in proc.stdout
    assert "make sure" in proc.stderr and "holds only healthy readings" in proc.stderr  # a 3.7x jump is suspicious
    missing = subprocess.run([sys.executable, "-m", "sensord.cli", "calibrate", "--model", str(bundle.path),
                              "--data", str(tmp_path / "nope.csv")], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 65 and "nope.csv" in missing.stderr
