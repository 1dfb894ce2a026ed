"""Tests for sensord.bundle: a tiny trained bundle round-trips, and every broken bundle is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sensord.bundle import BUNDLE_JSON, FORMAT_VERSION, KERAS_FILE, TFLITE_FILE, BundleError, ModelBundle, sha256_of
from sensord.config import SensordConfig, WindowConfig, config_from_dict
from sensord.dataio import load_csv
from sensord.simulator import CHANNELS, PumpSimulator, write_csv
from sensord.windows import WindowSpec, window_spec

pytestmark = pytest.mark.training  # trains a tiny TensorFlow model (make test-fast leaves it out)

WINDOW = 8
EPOCHS = 5

TINY = {
    "window": {"length": WINDOW},
    "model": {"kind": "dense", "encoder_units": [16], "latent_units": 4},
    "training": {"epochs": EPOCHS, "batch_size": 64, "patience": EPOCHS},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelBundle, Path]:
    from sensord.training import train_bundle

    root = tmp_path_factory.mktemp("bundle")
    csv_path = root / "healthy.csv"
    write_csv(csv_path, PumpSimulator(seed=11).generate(500), include_labels=False)
    series = load_csv(csv_path)
    bundle = train_bundle(series, config_from_dict(TINY), root / "model")
    return bundle, root / "model"


@pytest.fixture
def copy(trained: tuple[ModelBundle, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(trained[1], dst)
    return dst


def _edit_json(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    meta = json.loads((path / BUNDLE_JSON).read_text())
    change(meta)
    (path / BUNDLE_JSON).write_text(json.dumps(meta))


# --- the trained bundle --------------------------------------------------------------------


def test_bundle_files_written(trained: tuple[ModelBundle, Path]) -> None:
    _, path = trained
    for name in (BUNDLE_JSON, TFLITE_FILE, KERAS_FILE):
        assert (path / name).is_file(), name
        assert (path / name).stat().st_size > 0
    assert not [p.name for p in path.iterdir() if p.name.startswith(".bundle.")], "temp file left behind"


def test_load_round_trip(trained: tuple[ModelBundle, Path]) -> None:
    bundle, path = trained
    loaded = ModelBundle.load(path)
    assert loaded.path == path
    assert loaded.model_id == bundle.model_id
    assert loaded.model_id.startswith("model-")
    assert loaded.channels == CHANNELS == bundle.channels
    assert loaded.window_length == WINDOW
    assert loaded.window_hop == 1
    assert loaded.error_metric == "mse"
    assert loaded.scaler.kind == "standard"
    np.testing.assert_array_equal(loaded.scaler.offset, bundle.scaler.offset)
    np.testing.assert_array_equal(loaded.scaler.scale, bundle.scaler.scale)
    assert loaded.scaler.offset.shape == (len(CHANNELS),)
    assert loaded.threshold == bundle.threshold
    assert loaded.threshold.method == SensordConfig().threshold.method
    assert loaded.threshold.value > 0
    assert loaded.threshold.validation_stats["count"] > 0
    assert loaded.model == bundle.model and loaded.model["encoder_units"] == [16]
    assert loaded.created == bundle.created and loaded.created
    assert loaded.tflite_sha256 == bundle.tflite_sha256 == sha256_of(path / TFLITE_FILE)
    assert loaded.to_dict() == bundle.to_dict()
    assert loaded.tflite_path == path / TFLITE_FILE and loaded.keras_path == path / KERAS_FILE


def test_training_metadata(trained: tuple[ModelBundle, Path]) -> None:
    _, path = trained
    meta = json.loads((path / BUNDLE_JSON).read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["created"]
    assert meta["tflite_sha256"] == sha256_of(path / TFLITE_FILE)
    t = ModelBundle.load(path).training
    assert t["rows"] == 500
    assert t["train_rows"] + t["validation_rows"] == 500
    assert t["validation_rows"] == 100  # ceil(500 * 0.2)
    assert t["train_windows"] == t["train_rows"] - WINDOW + 1
    assert t["validation_windows"] == t["validation_rows"] - WINDOW + 1
    assert 1 <= t["epochs_run"] <= EPOCHS
    assert len(t["loss_history"]["loss"]) == t["epochs_run"]
    assert len(t["loss_history"]["val_loss"]) == t["epochs_run"]
    assert isinstance(t["duration_seconds"], float) and t["duration_seconds"] > 0
    for k in ("sensord", "tensorflow", "keras", "numpy", "python"):
        assert t["versions"][k]
    assert t["config"]["window"]["length"] == WINDOW


def test_expected_channels_and_window_accepted(trained: tuple[ModelBundle, Path]) -> None:
    _, path = trained
    b = ModelBundle.load(path, expect_channels=list(CHANNELS))
    assert b.channels == CHANNELS
    assert window_spec(WindowConfig(length=WINDOW, hop=2, max_gap_seconds=3.0), b) == WindowSpec(WINDOW, 2, 3.0,
                                                                                                  b.drift)
    assert b.drift is not None and [b.channels[i] for i in b.drift.index] == ["temperature", "thermocouple"]
    # an empty channel list means "not configured"
    assert ModelBundle.load(path, expect_channels=[]).channels == CHANNELS


# --- load errors ---------------------------------------------------------------------------


def _load_error(path: Path, **kw: object) -> str:
    with pytest.raises(BundleError) as ei:
        ModelBundle.load(path, **kw)
    return str(ei.value)


def test_missing_directory(tmp_path: Path) -> None:
    p = tmp_path / "nope"
    assert _load_error(p) == f"{p}: model bundle directory not found"


def test_path_is_a_file(tmp_path: Path) -> None:
    p = tmp_path / "file"
    p.write_text("x")
    assert "model bundle directory not found" in _load_error(p)


def test_missing_bundle_json(copy: Path) -> None:
    (copy / BUNDLE_JSON).unlink()
    msg = _load_error(copy)
    assert msg.startswith(f"{copy / BUNDLE_JSON}: missing")


def test_bundle_json_not_json(copy: Path) -> None:
    (copy / BUNDLE_JSON).write_text('{"format_version": 1, ')
    msg = _load_error(copy)
    assert msg.startswith(f"{copy / BUNDLE_JSON}: not valid JSON")


def test_bundle_json_not_an_object(copy: Path) -> None:
    (copy / BUNDLE_JSON).write_text("[1, 2]")
    assert _load_error(copy) == f"{copy / BUNDLE_JSON}: must be a JSON object"


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_format_version(copy: Path, version: object) -> None:
    _edit_json(copy, lambda m: m.__setitem__("format_version", version))
    msg = _load_error(copy)
    assert msg.startswith(f"{copy / BUNDLE_JSON}: unknown format_version {version!r}")
    assert f"reads version {FORMAT_VERSION}" in msg


def test_tflite_missing(copy: Path) -> None:
    (copy / TFLITE_FILE).unlink()
    msg = _load_error(copy)
    assert msg.startswith(f"{copy / TFLITE_FILE}: missing")


def test_checksum_mismatch(copy: Path) -> None:
    data = bytearray((copy / TFLITE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / TFLITE_FILE).write_bytes(bytes(data))
    msg = _load_error(copy)
    assert msg.startswith(f"{copy / TFLITE_FILE}: checksum mismatch")


def test_truncated_tflite_is_a_checksum_mismatch(copy: Path) -> None:
    data = (copy / TFLITE_FILE).read_bytes()
    (copy / TFLITE_FILE).write_bytes(data[: len(data) // 2])
    assert "checksum mismatch" in _load_error(copy)


def test_channels_do_not_match_expected(copy: Path) -> None:
    other = list(CHANNELS[:-1]) + ["rpm"]
    msg = _load_error(copy, expect_channels=other)
    assert msg.startswith(f"{copy}: channels ")
    assert "do not match the configured data.channels" in msg
    assert "rpm" in msg
    # the same names in another order are a different model input
    assert "do not match" in _load_error(copy, expect_channels=list(reversed(CHANNELS)))


def test_window_does_not_match_expected(copy: Path) -> None:
    with pytest.raises(BundleError) as ei:
        window_spec(WindowConfig(length=WINDOW + 2), ModelBundle.load(copy))
    assert str(ei.value) == (f"{copy}: model was trained for window length {WINDOW}, "
                             f"but window.length in the config is {WINDOW + 2}")


def test_without_a_config_the_window_is_the_one_trained_with(copy: Path) -> None:
    _edit_json(copy, lambda m: m["training"]["config"]["window"].update(hop=3, max_gap_seconds=4.5))
    _edit_json(copy, lambda m: m["window"].update(hop=3))
    b = ModelBundle.load(copy)
    assert window_spec(None, b) == WindowSpec(WINDOW, 3, 4.5, b.drift)
    assert window_spec(None, b, hop=1) == WindowSpec(WINDOW, 1, 4.5, b.drift)


def test_bad_scaler_wrong_number_of_values(copy: Path) -> None:
    _edit_json(copy, lambda m: m["scaler"].__setitem__("offset", m["scaler"]["offset"][:-1]))
    msg = _load_error(copy)
    assert msg.startswith(f"{copy / BUNDLE_JSON}: scaler offset/scale must have {len(CHANNELS)} values")


def test_bad_scaler_zero_scale(copy: Path) -> None:
    _edit_json(copy, lambda m: m["scaler"].__setitem__("scale", [0.0] * len(CHANNELS)))
    assert "scale > 0" in _load_error(copy)


def test_bad_scaler_kind(copy: Path) -> None:
    _edit_json(copy, lambda m: m["scaler"].__setitem__("kind", "robust"))
    assert "scaler.kind" in _load_error(copy)


def test_bad_threshold(copy: Path) -> None:
    _edit_json(copy, lambda m: m["threshold"].__setitem__("value", -1.0))
    msg = _load_error(copy)
    assert msg.startswith(f"{copy / BUNDLE_JSON}: threshold.value")


@pytest.mark.parametrize("channels", [[], ["a", "a", "b", "c", "d", "e", "f", "g"], "abc"])
def test_bad_channel_list(copy: Path, channels: object) -> None:
    _edit_json(copy, lambda m: m.__setitem__("channels", channels))
    assert _load_error(copy).startswith(f"{copy / BUNDLE_JSON}: ")


@pytest.mark.parametrize("window", [{"length": 1}, {"length": 8, "hop": 9}, {"length": "8"}, {}])
def test_bad_window(copy: Path, window: dict) -> None:
    _edit_json(copy, lambda m: m.__setitem__("window", window))
    assert "'window' must have integer length" in _load_error(copy)


def test_bad_error_metric(copy: Path) -> None:
    _edit_json(copy, lambda m: m.__setitem__("scoring", {"error": "rmse"}))
    assert "scoring.error" in _load_error(copy)


def test_missing_checksum_key(copy: Path) -> None:
    _edit_json(copy, lambda m: m.pop("tflite_sha256"))
    assert "'tflite_sha256'" in _load_error(copy)


def test_with_threshold_rewrite_round_trip(copy: Path) -> None:
    from sensord.threshold import ThresholdRecord

    b = ModelBundle.load(copy)
    b2 = b.with_threshold(ThresholdRecord("max_factor", {"factor": 2.0}, 0.125))
    b2.write_json()
    loaded = ModelBundle.load(copy)
    assert loaded.threshold == ThresholdRecord("max_factor", {"factor": 2.0}, 0.125)
    assert loaded.channels == b.channels and loaded.tflite_sha256 == b.tflite_sha256


@pytest.mark.parametrize("section, key, value", [
    ("training", None, None), ("model", None, None), ("model", None, [1, 2]),
    ("threshold", "params", 5), ("threshold", "validation_stats", 5),
])
def test_malformed_optional_sections_raise_bundle_error(copy: Path, section: str, key: str | None,
                                                        value: object) -> None:
    """Every defect of bundle.json must surface as BundleError (CLI exit 78), never as a TypeError."""
    def change(m: dict) -> None:
        if key is None:
            m[section] = value
        else:
            m[section][key] = value
    _edit_json(copy, change)
    assert _load_error(copy).startswith(f"{copy / BUNDLE_JSON}: ")


# --- reference windows (issue 14) ------------------------------------------------------------


def test_reference_windows_stored_and_reproduced(trained: tuple[ModelBundle, Path]) -> None:
    from sensord.scorer import Scorer
    bundle, path = trained
    loaded = ModelBundle.load(path)
    ref = loaded.reference
    assert ref is not None and len(ref["windows"]) == len(ref["errors"]) >= 2
    assert np.asarray(ref["windows"]).shape[1:] == (WINDOW, len(CHANNELS))
    assert Scorer(loaded).self_check() is True


def test_tampered_weights_with_a_recomputed_checksum_are_refused(trained: tuple[ModelBundle, Path],
                                                                  tmp_path: Path) -> None:
    from e2e_support import tamper_bundle

    from sensord.scorer import Scorer
    tamper_bundle(trained[1], tmp_path / "bad")
    loaded = ModelBundle.load(tmp_path / "bad")  # checksum fine
    with pytest.raises(BundleError, match="reference windows"):
        Scorer(loaded).self_check()


def test_a_tiny_numeric_difference_is_tolerated_a_large_one_not(copy: Path) -> None:
    from sensord.scorer import Scorer
    _edit_json(copy, lambda m: m["reference"]["errors"].__setitem__(0, m["reference"]["errors"][0] * (1 + 1e-6)))
    assert Scorer(ModelBundle.load(copy)).self_check() is True
    _edit_json(copy, lambda m: m["reference"]["errors"].__setitem__(0, m["reference"]["errors"][0] + 1e-3))
    with pytest.raises(BundleError):
        Scorer(ModelBundle.load(copy)).self_check()


def test_bundle_without_reference_loads_and_is_not_checked(copy: Path) -> None:
    from sensord.scorer import Scorer
    _edit_json(copy, lambda m: m.pop("reference"))
    assert Scorer(ModelBundle.load(copy)).self_check() is False


@pytest.mark.parametrize("bad", [{"windows": [], "errors": []}, {"windows": [[[1.0]]], "errors": [1.0]},
                                 "x", {"windows": [[[float("nan")] * 8] * 10], "errors": [1.0]}])
def test_malformed_reference_is_a_bundle_error(copy: Path, bad: object) -> None:
    _edit_json(copy, lambda m: m.__setitem__("reference", bad))
    assert "reference" in _load_error(copy)


# --- the sampling period (issue 9: the assembly clock defaults to the model's) ---------------------

_PER_CHANNEL = {"mqtt": {"subscriptions": [{"topic": "p/+/+", "format": "topic_per_channel",
                                            "device_topic": "p/{device}/{channel}"}]}}


def test_training_records_the_median_step_as_the_sampling_period(trained: tuple[ModelBundle, Path]) -> None:
    bundle, path = trained
    assert json.loads((path / BUNDLE_JSON).read_text())["sample_period_seconds"] == 1.0
    assert ModelBundle.load(path).sample_period_seconds == bundle.sample_period_seconds == 1.0


@pytest.mark.parametrize("period", [0, -1.0, "1", True, float("inf")])
def test_bad_sampling_period_refused(copy: Path, period: object) -> None:
    _edit_json(copy, lambda m: m.__setitem__("sample_period_seconds", period))
    assert "'sample_period_seconds' must be a positive number" in _load_error(copy)


def test_the_assembly_clock_is_the_models_unless_the_config_sets_one(copy: Path) -> None:
    from sensord.pipeline import ServingModel
    from sensord.readings import ReadingPath

    cfg = config_from_dict({**_PER_CHANNEL, "window": {"length": WINDOW}, "daemon": {"model": str(copy)}})
    model = ServingModel.load(cfg)
    period = cfg.assembly_period(model.bundle.sample_period_seconds, "model")
    assembler = ReadingPath(cfg, model.bundle.channels, period).assembler
    assert assembler is not None and assembler.period == 1.0 and assembler.max_staleness == 3.0
    cfg2 = config_from_dict({**_PER_CHANNEL, "window": {"length": WINDOW}, "daemon": {"model": str(copy)},
                             "assembly": {"sample_period_seconds": 0.5}})
    assert cfg2.assembly_period(model.bundle.sample_period_seconds, "model") == 0.5


def test_an_old_bundle_without_a_period_needs_it_in_the_config(copy: Path, tmp_path: Path) -> None:
    """A bundle from before the period was recorded still serves when the config gives the period; when
    neither does and a subscription needs the clock, start-up stops with exit 78 naming the key."""
    import subprocess
    import sys

    import yaml

    from sensord.cli import main
    from sensord.config import ConfigError
    from sensord.pipeline import ServingModel

    _edit_json(copy, lambda m: m.pop("sample_period_seconds"))
    base = {**_PER_CHANNEL, "window": {"length": WINDOW}, "daemon": {"model": str(copy)}}
    ok = config_from_dict({**base, "assembly": {"sample_period_seconds": 2.0}})
    assert ServingModel.load(ok).bundle.sample_period_seconds is None
    json_only = config_from_dict({"window": {"length": WINDOW}, "daemon": {"model": str(copy)}})
    ServingModel.load(json_only)  # whole rows need no clock
    with pytest.raises(ConfigError) as ei:
        ServingModel.load(config_from_dict(base))
    assert ei.value.errors[0].startswith("assembly.sample_period_seconds: is required: mqtt.subscriptions.0")
    cfg_path = tmp_path / "sensord.yaml"
    cfg_path.write_text(yaml.safe_dump({**base, "metrics": {"enabled": False}}))
    assert main(["check-config", "--config", str(cfg_path), "--model", str(copy)]) == 78
    assert main(["check-config", "--config", str(cfg_path)]) == 78  # daemon.model's bundle is looked at too
    run = subprocess.run([sys.executable, "-m", "sensord", "run", "--config", str(cfg_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 78, run.stderr
    assert f"config error: {cfg_path}: assembly.sample_period_seconds: is required" in run.stderr
