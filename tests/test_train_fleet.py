"""``sensord train --per-device`` / ``--group``: one bundle per recording or per group, trained in parallel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from e2e_support import ROOT, TINY_WINDOW, tiny_train_config, write_series_csv, write_yaml

from sensord.bundle import ModelBundle
from sensord.dataio import Series, load_csv
from sensord.errors import UsageError
from sensord.fleet import parse_group, plan_models
from sensord.scorer import Scorer
from sensord.simulator import PumpSimulator
from sensord.windows import window_spec, windowize

CHANNELS = ("vibration_1", "vibration_2", "current", "pressure", "temperature", "thermocouple", "voltage", "flow")


RECORDED = 700  # seconds of each recording
HIGHER = 2.2  # the sister pump's supply voltage over pump1's: about 8 healthy spreads, still healthy
# (not its temperatures: the models see those against their own baseline, so a warmer pump is no fault)


def _pump(seed: int, seconds: int = RECORDED, higher: float = 0.0) -> Series:
    sim = PumpSimulator(seed=seed).generate(seconds)
    values = np.asarray(sim.values, dtype=np.float32).copy()
    values[:, CHANNELS.index("voltage")] += higher
    return Series(np.asarray(sim.timestamps, dtype=np.float64), values, CHANNELS, None, f"pump{seed}")




def _fan(seconds: int = RECORDED) -> Series:
    p = _pump(9, seconds)
    keep = [CHANNELS.index(c) for c in ("vibration_1", "current", "temperature")]
    return Series(p.timestamps, p.values[:, keep], ("vibration_1", "current", "temperature"), None, "fan")


def _train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sensord.cli", "train", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("recordings")
    write_series_csv(d / "pump1.csv", _pump(1))
    write_series_csv(d / "pump2.csv", _pump(2, higher=HIGHER))  # the sister pump, on another supply
    write_series_csv(d / "fan.csv", _fan())  # another machine, other channels
    cfg = tiny_train_config(epochs=15)
    write_yaml(d.parent / "train.yaml", cfg)
    return d


def over_threshold(bundle: ModelBundle, series: Series) -> float:
    w = windowize(series.timestamps, series.values, window_spec(None, bundle)).values
    return float(np.mean(Scorer(bundle).score(w).errors > bundle.threshold.value))


@pytest.mark.training
def test_per_device_trains_a_model_per_recording_and_the_sister_pump_is_quiet_on_its_own(
        recordings: Path, tmp_path: Path) -> None:
    proc = _train("--config", str(recordings.parent / "train.yaml"), "--data", str(recordings),
                  "--out", str(tmp_path / "models"), "--per-device", "--jobs", "2", "--json", str(tmp_path / "s.json"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["fan", "pump1", "pump2"]
    assert all(m["error"] is None for m in summary["models"])
    assert "3 of 3 models written" in proc.stdout
    fan = ModelBundle.load(tmp_path / "models" / "fan")
    assert fan.channels == ("vibration_1", "current", "temperature")
    assert fan.model_id == summary["models"][0]["model_id"]
    pump1, pump2 = (ModelBundle.load(tmp_path / "models" / n) for n in ("pump1", "pump2"))
    sister = load_csv(recordings / "pump2.csv")  # healthy, on a higher supply
    assert over_threshold(pump1, sister) > 0.5  # the neighbour's model calls the sister pump a fault
    assert over_threshold(pump2, sister) == 0.0  # its own does not
    assert summary["models"][2]["train_windows"] == 560 - TINY_WINDOW + 1  # 700 rows, 20 % validation


@pytest.mark.training
def test_a_group_pools_its_recordings_and_a_bad_one_fails_alone(recordings: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for f in recordings.glob("*.csv"):
        (data / f.name).write_bytes(f.read_bytes())
    (data / "pump3.csv").write_text((data / "pump1.csv").read_text().splitlines()[0] + "\n")  # header only
    proc = _train("--config", str(recordings.parent / "train.yaml"), "--data", str(data),
                  "--out", str(tmp_path / "models"), "--group", "pumps=pump[12]", "--per-device")
    assert proc.returncode == 65, proc.stderr
    assert "pump3" in proc.stdout and "FAILED" in proc.stdout
    assert "2 of 3 models written" in proc.stdout
    pumps = ModelBundle.load(tmp_path / "models" / "pumps")
    assert pumps.training["rows"] == 2 * RECORDED
    assert pumps.training["validation_windows"] == 2 * (140 - TINY_WINDOW + 1)
    assert str(data / "pump1.csv") in pumps.training["source"] and str(data / "pump2.csv") in pumps.training["source"]
    assert ModelBundle.load(tmp_path / "models" / "fan").channels == ("vibration_1", "current", "temperature")
    assert not (tmp_path / "models" / "pump3" / "bundle.json").exists()


def test_plan_groups_singles_and_unused() -> None:
    files = [Path(f"{n}.csv") for n in ("compressor-1", "fan", "pump1", "pump2")]
    plans, unused = plan_models(files, [("pump", "pump*"), ("comp", "compressor-*")], per_device=False)
    assert [(p.name, [f.stem for f in p.files]) for p in plans] == [("pump", ["pump1", "pump2"]),
                                                                    ("comp", ["compressor-1"])]
    assert [f.stem for f in unused] == ["fan"]
    plans, unused = plan_models(files, [("pump", "pump*")], per_device=True)
    assert [p.name for p in plans] == ["pump", "compressor-1", "fan"] and unused == []


def test_plan_mistakes_are_usage_errors() -> None:
    files = [Path("pump1.csv")]
    with pytest.raises(UsageError, match="no recording matches 'fan\\*'"):
        plan_models(files, [("fan", "fan*")], per_device=True)
    with pytest.raises(UsageError, match="given twice"):
        plan_models(files, [("a", "pump*"), ("a", "x*")], per_device=False)
    with pytest.raises(UsageError, match="expected NAME=GLOB"):
        parse_group("pumps")
    with pytest.raises(UsageError, match="cannot be a model directory name"):
        parse_group("../x=pump*")


def test_a_directory_without_per_device_or_group_is_a_usage_error(tmp_path: Path) -> None:
    proc = _train("--data", str(tmp_path), "--out", str(tmp_path / "m"))
    assert proc.returncode == 64 and "--per-device" in proc.stderr
    proc = _train("--data", str(tmp_path), "--out", str(tmp_path / "m"), "--per-device", "--jobs", "0")
    assert proc.returncode == 64 and "--jobs: must be at least 1, got 0" in proc.stderr
