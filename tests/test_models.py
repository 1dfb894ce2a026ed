"""Several models in one daemon (sensord/models.py): the config, binding a device to a model, reloads.

The routing rules are tested on stand-in models (no bundle needed); loading, the reading path, the
per-device metrics, saved state and reloads on real tiny bundles (PCA: closed form, quick to fit).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from sensord.bundle import BundleError
from sensord.config import ConfigError, config_from_dict, load_config
from sensord.dataio import Series
from sensord.detector import AlertDetector
from sensord.metrics import DaemonMetrics
from sensord.models import ModelSet, Route, per_device_dirs
from sensord.pipeline import Intake, ScoringLoop
from sensord.simulator import CHANNELS, COMPRESSOR_CHANNELS, CompressorSimulator, PumpSimulator
from sensord.sinks import AlertPublisher
from sensord.state import StateStore
from sensord.windows import windowize

ROOT = Path(__file__).resolve().parent.parent


# -- config ---------------------------------------------------------------------------------------

def _config_error(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(doc)
    assert info.value.exit_status == 78
    return str(info.value)


def test_model_and_models_both_set_is_an_error_naming_both_keys() -> None:
    msg = _config_error({"daemon": {"model": "/m", "models": [{"path": "/n"}]}})
    assert msg.startswith("daemon.model:") and "daemon.models" in msg


def test_models_entries_are_validated_with_their_key_paths() -> None:
    assert "daemon.models.1.path: is required" in _config_error(
        {"daemon": {"models": [{"path": "/a"}, {"match": "x*"}]}})
    assert "daemon.models.0.fallback: only a per-device path" in _config_error(
        {"daemon": {"models": [{"path": "/a", "fallback": "/b"}]}})
    assert "daemon.models.0.path: may contain {device} once" in _config_error(
        {"daemon": {"models": [{"path": "/{device}/{device}"}]}})
    assert "daemon.models.0.fallback: must be one bundle directory" in _config_error(
        {"daemon": {"models": [{"path": "/m/{device}", "fallback": "/m/{device}x"}]}})
    assert "daemon.models.0.mtch: unknown key" in _config_error({"daemon": {"models": [{"path": "/a", "mtch": "x"}]}})


def test_models_alone_is_fine_and_the_default_is_one_model() -> None:
    cfg = config_from_dict({"daemon": {"models": [{"match": "pump*", "path": "/m/{device}", "fallback": "/m/d"}]}})
    (entry,) = cfg.daemon.models
    assert entry.per_device and entry.match == "pump*" and entry.fallback == "/m/d"
    assert load_config(None).daemon.models == [] and load_config(ROOT / "config" / "sensord.yaml").daemon.models == []


# -- routing (stand-in models) --------------------------------------------------------------------

def _stand_in(name: str) -> Any:
    return SimpleNamespace(name=name, bundle=SimpleNamespace(model_id=name, path=name))


def test_the_first_matching_entry_wins_and_a_per_device_layout_falls_back() -> None:
    a, b, pump, default, comp = (_stand_in(n) for n in ("a", "b", "pump", "default", "comp"))
    cfg = config_from_dict({})
    routes = ModelSet([Route("pump-1", a, {}, None),                 # a single device first ...
                       Route("pump-*", None, {"pump-2": b}, pump),  # ... then its family, per device
                       Route("comp*", comp, {}, None),
                       Route("fan-*", None, {"fan-1": b}, None),     # per device, no fallback
                       Route("*", default, {}, None)], cfg)
    assert routes.bind("pump-1") is a
    assert routes.bind("pump-2") is b
    assert routes.bind("pump-3") is pump  # no directory of its own: the fallback
    assert routes.bind("compressor") is comp
    assert routes.bind("fan-1") is b
    assert routes.bind("fan-2") is default  # no bundle of its own and no fallback: the next entry
    assert routes.bind("Pump-1") is default  # case-sensitive
    assert ModelSet(routes.routes[:4], cfg).bind("fan-2") is None  # nothing else: unmatched
    assert routes.models == [a, pump, b, comp, default]  # each once


def test_per_device_dirs_finds_the_directories_named_after_devices(tmp_path: Path) -> None:
    for d in ("pump-1", "pump 2", "weird[x]"):
        (tmp_path / d / "current").mkdir(parents=True)
    (tmp_path / "not-a-dir").mkdir()
    (tmp_path / "file").write_text("")
    assert per_device_dirs(str(tmp_path / "{device}" / "current")) == {
        d: str(tmp_path / d / "current") for d in ("pump-1", "pump 2", "weird[x]")}
    assert set(per_device_dirs(str(tmp_path / "{device}"))) == {"pump-1", "pump 2", "weird[x]", "not-a-dir"}


# -- real bundles -----------------------------------------------------------------------------------

PCA = {"model": {"kind": "pca"}, "threshold": {"method": "max_factor", "factor": 2.0}}


def _train(path: Path, window: int, shift: float = 0.0, seed: int = 3) -> None:
    from sensord.training import train_bundle
    healthy = PumpSimulator(seed=seed).generate(600)
    v = healthy.values.astype(np.float32)
    v[:, CHANNELS.index("temperature")] += shift
    train_bundle(Series(healthy.timestamps, v, CHANNELS, None, "healthy"),
                 config_from_dict({**PCA, "window": {"length": window}}), path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``a`` (window 10), ``b`` (window 8, trained 3 degrees warmer) and ``c`` (window 10, another seed)."""
    root = tmp_path_factory.mktemp("models")
    _train(root / "a", 10)
    _train(root / "b", 8, shift=3.0)
    _train(root / "c", 10, seed=4)
    return root


def _layout(trained: Path, tmp: Path) -> Path:
    models = tmp / "models"
    for device, src in (("pump-a", "a"), ("pump-b", "b"), ("default", "c")):
        shutil.copytree(trained / src, models / device)
    return models


def _cfg(models: Path, **extra: Any) -> Any:
    return config_from_dict({
        "mqtt": {"device_topic": "s/{device}/t", "subscriptions": ["s/+/t"]},
        "detector": {"raise_after": 1, "clear_after": 1},
        "daemon": {"models": [{"match": "pump-*", "path": str(models / "{device}"),
                               "fallback": str(models / "default")}], **extra},
        "logging": {"rate_limit_seconds": 60.0}})


def _id(models: Path, device: str) -> str:
    return str(json.loads((models / device / "bundle.json").read_text())["model_id"])


class _Publisher:
    def publish(self, topic: str, payload: str | bytes, qos: int = 0, retain: bool = False) -> None:
        pass


def _intake(cfg: Any, models: ModelSet) -> tuple[Intake, ScoringLoop, DaemonMetrics]:
    metrics = DaemonMetrics()
    scoring = ScoringLoop(metrics, AlertPublisher(_Publisher(), "pfx"), 1000, 64, 0.0)
    return Intake(cfg, models, scoring, metrics), scoring, metrics


def _send(intake: Intake, device: str, rows: int, start: int = 0) -> None:
    series = PumpSimulator(seed=5).generate(start + rows)
    for i in range(start, start + rows):
        body = {"ts": 1_700_000_000.0 + i, "values": dict(zip(CHANNELS, series.values[i].tolist(), strict=True))}
        intake.on_message(f"s/{device}/t", json.dumps(body).encode())



@pytest.mark.training
def test_each_device_is_bound_to_its_model_and_windows_carry_it(trained: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    models_dir = _layout(trained, tmp_path)
    cfg = _cfg(models_dir)
    models, refused = ModelSet.load(cfg)
    assert refused == []
    a, b, c = (models.bind(d) for d in ("pump-a", "pump-b", "pump-c"))
    assert a is not None and b is not None and c is not None
    assert (a.bundle.model_id, b.bundle.model_id) == (_id(models_dir, "pump-a"), _id(models_dir, "pump-b"))
    assert c is models.bind("pump-d") and c.bundle.model_id == _id(models_dir, "default")  # the fallback, shared
    assert models.bind("fan-1") is None
    assert (a.spec.length, b.spec.length) == (10, 8)

    intake, scoring, metrics = _intake(cfg, models)
    with caplog.at_level(logging.WARNING, logger="sensord.pipeline"):
        for device in ("pump-a", "pump-b", "fan-1"):
            _send(intake, device, 12)
    queued = [scoring.queue.get_nowait() for _ in range(scoring.queue.qsize())]
    by_device: dict[str, list[Any]] = {}
    for model, window in queued:
        by_device.setdefault(window.device, []).append(model)
        assert window.values.shape[0] == model.spec.length
    assert set(by_device) == {"pump-a", "pump-b"}  # fan-1 never scored
    assert all(m is a for m in by_device["pump-a"]) and len(by_device["pump-a"]) == 12 - 10 + 1
    assert all(m is b for m in by_device["pump-b"]) and len(by_device["pump-b"]) == 12 - 8 + 1
    value = metrics.registry.get_sample_value
    assert value("sensord_readings_rejected_total", {"reason": "no_model"}) == 12  # every reading counted ...
    assert caplog.text.count("device=fan-1 matches no model") == 1  # ... logged once
    assert value("sensord_device_model_info", {"device": "pump-a", "model_id": a.bundle.model_id}) == 1
    assert value("sensord_device_model_info", {"device": "pump-b", "model_id": b.bundle.model_id}) == 1
    metrics.set_models([(m.bundle.model_id, "", m.bundle.window_length, 1, m.bundle.channels, 1.0)
                        for m in models.models])
    infos = {s.labels["model_id"] for f in metrics.registry.collect() if f.name == "sensord_model"
             for s in f.samples}
    assert infos == {m.bundle.model_id for m in models.models}
    metrics.forget_device("pump-a")
    assert value("sensord_device_model_info", {"device": "pump-a", "model_id": a.bundle.model_id}) is None

    # the scoring loop scores each window with its own model and remembers which one scored the device
    scoring.process(queued)
    assert scoring.model_ids == {"pump-a": a.bundle.model_id, "pump-b": b.bundle.model_id}


def _train_compressor(path: Path, period: float = 2.0) -> None:
    """A compressor bundle: other channels (6, other names) and another sampling period."""
    from sensord.training import train_bundle
    healthy = CompressorSimulator(seed=3).generate(600)
    train_bundle(Series(healthy.timestamps[0] + period * np.arange(600), healthy.values.astype(np.float32),
                        COMPRESSOR_CHANNELS, None, "compressor"),
                 config_from_dict({**PCA, "window": {"length": 6}}), path)


def _mixed_cfg(models: Path, comp: Path, **entry: Any) -> Any:
    return config_from_dict({
        "mqtt": {"subscriptions": [{"topic": "s/+/t", "device_topic": "s/{device}/t"},
                                   {"topic": "c/+/+", "format": "topic_per_channel",
                                    "device_topic": "c/{device}/{channel}"}]},
        "detector": {"raise_after": 1, "clear_after": 1},
        "daemon": {"models": [{"match": "pump-*", "path": str(models / "{device}"),
                               "fallback": str(models / "default")},
                              {"match": "compressor-*", "path": str(comp), **entry}]},
        "logging": {"rate_limit_seconds": 60.0}})


def _send_compressor(intake: Intake, device: str, rows: int, period: float = 2.0) -> None:
    series = CompressorSimulator(seed=5).generate(rows)
    for i in range(rows):
        body = {"ts": 1_700_000_000.0 + period * i,
                "values": dict(zip(COMPRESSOR_CHANNELS, series.values[i].tolist(), strict=True))}
        intake.on_message(f"s/{device}/t", json.dumps(body).encode())


@pytest.mark.training
def test_models_with_other_channels_and_periods_serve_side_by_side(trained: Path, tmp_path: Path) -> None:
    models_dir = _layout(trained, tmp_path)
    _train_compressor(tmp_path / "compressor")
    cfg = _mixed_cfg(models_dir, tmp_path / "compressor")
    models, refused = ModelSet.load(cfg)
    assert refused == []
    comp = models.bind("compressor-1")
    assert comp is not None and comp.bundle.channels == COMPRESSOR_CHANNELS
    assert comp.bundle.sample_period_seconds == 2.0
    assert models.layout_for("pump-a").channels == CHANNELS  # type: ignore[union-attr]
    assert models.layout_for("compressor-1").period == 2.0  # type: ignore[union-attr]
    assert models.layout_for("fan-1") is None

    intake, scoring, metrics = _intake(cfg, models)
    _send(intake, "pump-a", 12)
    _send_compressor(intake, "compressor-1", 8)  # JSON with the compressor's own field names
    _send(intake, "compressor-2", 3)  # a pump's fields from a compressor: not its model's channels
    # topic per channel, assembled on the compressor's own 2 s clock (the pumps' is 1 s)
    sim = CompressorSimulator(seed=6).generate(9)
    for i in range(9):
        for j, ch in enumerate(COMPRESSOR_CHANNELS):
            intake.on_message(f"c/compressor-3/{ch}", json.dumps({"value": float(sim.values[i, j]),
                                                                   "ts": 1_700_000_000.0 + 2 * i}).encode())
    intake.on_message("c/pump-a/temperature", b"50")  # a pump channel on the per-channel topics: fine
    intake.on_message("c/pump-a/suction_pressure", b"1")  # the compressor's channel on a pump
    queued = [scoring.queue.get_nowait() for _ in range(scoring.queue.qsize())]
    by_device: dict[str, list[Any]] = {}
    for model, window in queued:
        by_device.setdefault(window.device, []).append((model, window))
        assert window.values.shape == (model.spec.length, len(model.bundle.channels))
    assert {d: len(w) for d, w in by_device.items()} == {"pump-a": 3, "compressor-1": 3, "compressor-3": 4}
    assert all(m is comp for d in ("compressor-1", "compressor-3") for m, _ in by_device[d])
    ends = [w.end for _, w in by_device["compressor-3"]]
    assert np.diff(ends).tolist() == [2.0, 2.0, 2.0]  # rows on its own clock (each tick whole at once)
    # the readings as assembled, through the compressor model's windows (its temperatures against their baseline)
    offline = windowize(1_700_000_000.0 + 2 * np.arange(9.0), sim.values, comp.spec).values
    np.testing.assert_allclose(by_device["compressor-3"][-1][1].values, offline[-1], rtol=1e-5)
    assert comp.spec.drift is not None and len(comp.spec.drift.index) == 2
    value = metrics.registry.get_sample_value
    assert value("sensord_readings_rejected_total", {"reason": "missing_channel"}) == 3
    assert value("sensord_readings_rejected_total", {"reason": "unknown_channel"}) == 1
    scoring.process(queued)
    assert scoring.model_ids == {"pump-a": _id(models_dir, "pump-a"), "compressor-1": comp.bundle.model_id,
                                 "compressor-3": comp.bundle.model_id}

    # A reload where pump-b's bundle becomes a compressor's: its window restarts with the new channels.
    _send(intake, "pump-b", 4)
    assert intake.buffers["pump-b"].channels == len(CHANNELS)
    shutil.rmtree(models_dir / "pump-b")
    shutil.copytree(tmp_path / "compressor", models_dir / "pump-b")
    new, refused = ModelSet.load(cfg, models)
    assert refused == []
    intake.swap(cfg, new)
    assert "pump-b" not in intake.buffers
    _send(intake, "pump-b", 2)  # the old channels are now missing ones
    _send_compressor(intake, "pump-b", 6)
    assert value("sensord_readings_rejected_total", {"reason": "missing_channel"}) == 5
    assert intake.buffers["pump-b"].channels == len(COMPRESSOR_CHANNELS)
    model, window = scoring.queue.get_nowait()
    assert window.device == "pump-b" and model.bundle.channels == COMPRESSOR_CHANNELS


@pytest.mark.training
def test_an_entry_s_channels_refuse_a_bundle_that_reads_others(trained: Path, tmp_path: Path) -> None:
    models_dir = _layout(trained, tmp_path)
    _train_compressor(tmp_path / "compressor")
    with pytest.raises(BundleError) as info:
        ModelSet.load(_mixed_cfg(models_dir, tmp_path / "compressor", channels=list(CHANNELS)))
    msg = str(info.value)
    assert str(tmp_path / "compressor") in msg and "daemon.models.1.channels" in msg, msg
    models, _ = ModelSet.load(_mixed_cfg(models_dir, tmp_path / "compressor", channels=list(COMPRESSOR_CHANNELS)))
    assert len(models.models) == 4


@pytest.mark.training
def test_a_reload_refuses_the_bad_bundle_only_and_restarts_windows_whose_length_changed(
        trained: Path, tmp_path: Path) -> None:
    models_dir = _layout(trained, tmp_path)
    cfg = _cfg(models_dir)
    models, _ = ModelSet.load(cfg)
    intake, scoring, _ = _intake(cfg, models)
    for device in ("pump-a", "pump-b", "pump-c"):
        _send(intake, device, 5)
    old_a = models.bind("pump-a")
    assert old_a is not None

    (models_dir / "pump-a" / "model.tflite").write_bytes(b"broken")  # a bad new version
    shutil.rmtree(models_dir / "pump-b")
    shutil.copytree(trained / "c", models_dir / "pump-b")  # window 8 -> 10
    new, refused = ModelSet.load(cfg, models)
    assert [r.path for r in refused] == [str(models_dir / "pump-a")]
    assert new.bind("pump-a") is old_a  # keeps serving its previous version
    new_b = new.bind("pump-b")
    assert new_b is not None and new_b.spec.length == 10
    intake.swap(cfg, new)
    assert intake.buffers["pump-a"].spec.length == 10 and len(intake.buffers["pump-a"].export()["times"]) == 5  # kept
    assert "pump-b" not in intake.buffers  # its window restarts
    assert len(intake.buffers["pump-c"].export()["times"]) == 5  # the fallback did not change
    _send(intake, "pump-b", 10, start=5)
    assert intake.bound["pump-b"] is new_b and scoring.queue.qsize() == 1


@pytest.mark.training
def test_saved_state_is_restored_per_device_for_its_own_model(trained: Path, tmp_path: Path) -> None:
    models_dir = _layout(trained, tmp_path)
    models, _ = ModelSet.load(_cfg(models_dir))
    ids = {d: _id(models_dir, d) for d in ("pump-a", "pump-b")}
    store = StateStore(tmp_path / "state")
    store.save({"pump-a": ids["pump-a"], "pump-b": "an-old-model", "pump-c": _id(models_dir, "default")},
               {d: AlertDetector(d, 1.0) for d in ("pump-a", "pump-b", "pump-c")})
    _, scoring, _ = _intake(_cfg(models_dir), models)
    scoring.state = StateStore(tmp_path / "state")
    assert scoring.restore(models, 10) == 2  # pump-b's was saved for another model
    assert scoring.model_ids == {"pump-a": ids["pump-a"], "pump-c": _id(models_dir, "default")}


def test_a_version_1_state_file_is_still_read(tmp_path: Path) -> None:
    det = AlertDetector("p1", 1.0).export()
    (tmp_path / "detector-state.json").write_text(json.dumps(
        {"format": "sensord-detector-state", "version": 1, "model_id": "m1", "devices": {"p1": det}}))
    assert StateStore(tmp_path).load("m1") == {"p1": det}
    StateStore(tmp_path).save({"p1": "m1", "p2": "m2"}, {"p1": AlertDetector("p1", 1.0),
                                                         "p2": AlertDetector("p2", 1.0)})
    assert set(StateStore(tmp_path).load(lambda d: {"p1": "m1", "p2": "m9"}[d])) == {"p1"}


def test_record_and_check_config_take_the_channels_from_a_fixed_bundle_of_daemon_models() -> None:
    cfg = config_from_dict({"daemon": {"models": [{"match": "p*", "path": "/m/{device}", "fallback": "/m/p"},
                                                  {"path": "/m/other"}]}})
    assert cfg.daemon.reference_model() == "/m/p"
    assert config_from_dict({"daemon": {"models": [{"path": "/m/{device}"}, {"path": "/m/o"}]}}) \
        .daemon.reference_model() == "/m/o"
    assert config_from_dict({"daemon": {"model": "/m/one"}}).daemon.reference_model() == "/m/one"


@pytest.mark.training
def test_check_config_loads_and_self_checks_every_bundle_of_daemon_models(trained: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    import yaml

    from sensord.cli import main
    models_dir = _layout(trained, tmp_path)
    _train_compressor(tmp_path / "compressor")
    doc = {"mqtt": {"device_topic": "s/{device}/t", "subscriptions": ["s/+/t"]}, "metrics": {"enabled": False},
           "daemon": {"models": [{"match": "pump-*", "path": str(models_dir / "{device}"),
                                  "fallback": str(models_dir / "default"), "channels": list(CHANNELS)},
                                 {"match": "compressor-*", "path": str(tmp_path / "compressor")}]}}
    cfg_path = tmp_path / "sensord.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    assert main(["check-config", "--config", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "(4 bundles of daemon.models)" in out and "daemon.models.0.path (pump-b)" in out, out
    assert "daemon.models.1.path: " + str(tmp_path / "compressor") in out and "self-check passed" in out, out

    # A flatbuffer changed after training, a bundle reading other channels than its entry's, a missing one.
    weights = models_dir / "pump-a" / "model.tflite"
    data = bytearray(weights.read_bytes())
    data[-200] ^= 0xFF
    weights.write_bytes(bytes(data))
    meta = json.loads((models_dir / "pump-a" / "bundle.json").read_text())
    meta["tflite_sha256"] = hashlib.sha256(bytes(data)).hexdigest()  # (a recomputed checksum)
    (models_dir / "pump-a" / "bundle.json").write_text(json.dumps(meta))
    shutil.copytree(tmp_path / "compressor", models_dir / "pump-c")
    doc["daemon"]["models"].append({"match": "fan-*", "path": str(tmp_path / "nowhere")})
    cfg_path.write_text(yaml.safe_dump(doc))
    assert main(["check-config", "--config", str(cfg_path)]) == 78
    err = capsys.readouterr().err
    assert "daemon.models.0.path (pump-a): " in err, err
    assert "daemon.models.0.path (pump-c): " in err and "daemon.models.0.channels" in err, err
    assert f"daemon.models.2.path: {tmp_path / 'nowhere'}: model bundle directory not found" in err, err
    assert "pump-b" not in err, err
