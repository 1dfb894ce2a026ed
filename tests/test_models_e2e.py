"""End to end: several models in one ``sensord run`` (``daemon.models``), through a private Mosquitto.

Two pumps of one kind: ``pump-a`` as the tiny session bundle was trained, its sister ``pump-b`` on a
supply 2.2 V higher with a bundle of its own (``sensord train --per-device`` layout: one directory per device).
A third device, ``fan-1``, has no model. One daemon serves both bundles; a second one, serving only
pump-a's bundle to everyone (what ``daemon.model`` did before), shows that the sister is then in
permanent alert. A SIGHUP after pump-a's bundle is replaced by a broken one and pump-b's is recalibrated
keeps pump-a on its previous version and moves pump-b to the new one.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import MosquittoBroker, MqttRecorder
from e2e_support import (
    ROOT,
    TINY_DETECTOR,
    TINY_WINDOW,
    DaemonProcess,
    QosPublisher,
    TrainedBundle,
    daemon_config,
    tiny_train_config,
    wait_until,
    write_series_csv,
)

from sensord.bundle import ModelBundle
from sensord.config import config_from_dict
from sensord.dataio import Series, load_csv

pytestmark = [pytest.mark.e2e, pytest.mark.training]

W = TINY_WINDOW
ROWS = 300  # the labelled run starts with 600 healthy seconds
HIGHER = 2.2  # volts on 'voltage' (about 8 healthy spreads; not a temperature, which the models see against
# its own baseline, so that a warmer sister would be no fault under either model)


def higher(series: Series) -> Series:
    v = series.values.copy()
    v[:, series.channels.index("voltage")] += HIGHER
    return Series(series.timestamps, v, series.channels, None, "higher")


@pytest.fixture(scope="module")
def layout(tiny_bundle: TrainedBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models/pump-a``: the session bundle; ``models/pump-b``: trained on the same healthy run, 2.2 V higher."""
    from sensord.training import train_bundle

    root = tmp_path_factory.mktemp("per-device")
    shutil.copytree(tiny_bundle.bundle, root / "models" / "pump-a")
    cfg = config_from_dict(tiny_train_config(epochs=30))
    healthy = load_csv(tiny_bundle.labelled_csv.parent / "healthy.csv", cfg.data)
    train_bundle(higher(healthy), cfg, root / "models" / "pump-b")
    return root / "models"


def send(pub: QosPublisher, topic: str, series: Series, start: int, stop: int) -> None:
    for i in range(start, stop):
        body = {"ts": float(series.timestamps[i]),
                "values": {ch: float(series.values[i, j]) for j, ch in enumerate(series.channels)}}
        pub.send_raw(topic, json.dumps(body))


def served(d: DaemonProcess) -> dict[str, str]:
    """device -> model id, from ``sensord_device_model_info``."""
    return {dict(lab)["device"]: dict(lab)["model_id"] for (name, lab), v in d.metrics().items()
            if name == "sensord_device_model_info" and v == 1}


@pytest.fixture
def env(broker: MosquittoBroker, topic_root: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    rec = MqttRecorder(broker.host, broker.port, f"{topic_root}/#").start()
    pub = QosPublisher(broker)
    daemons: list[DaemonProcess] = []
    try:
        yield {"rec": rec, "pub": pub, "daemons": daemons}
    finally:
        for d in daemons:
            d.stop()
        pub.close()
        rec.stop()


def test_each_device_is_scored_by_its_own_model_and_a_reload_refuses_only_the_bad_bundle(
        broker: MosquittoBroker, topic_root: str, tmp_path: Path, layout: Path, tiny_bundle: TrainedBundle,
        env: dict[str, Any]) -> None:
    models = tmp_path / "models"
    shutil.copytree(layout, models)
    id_a, id_b = (ModelBundle.load(models / d).model_id for d in ("pump-a", "pump-b"))
    assert id_a != id_b

    def config(name: str, daemon: dict[str, Any]) -> dict[str, Any]:
        doc = daemon_config(broker, models / "pump-a", window=W, detector=TINY_DETECTOR,
                            client_id=f"sensord-{uuid.uuid4().hex[:10]}",
                            subscriptions=[f"{topic_root}/sensors/+/telemetry"],
                            device_topic=f"{topic_root}/sensors/{{device}}/telemetry",
                            topic_prefix=f"{topic_root}/{name}")
        doc["daemon"] = daemon
        return doc

    per_device = DaemonProcess(tmp_path, "per-device", config(
        "per-device", {"models": [{"match": "pump-*", "path": str(models / "{device}")}]}))
    one_model = DaemonProcess(tmp_path, "one-model", config("one-model", {"model": str(models / "pump-a")}))
    env["daemons"] += [per_device, one_model]
    rec: MqttRecorder = env["rec"]
    for name, d in (("per-device", per_device), ("one-model", one_model)):
        try:
            rec.wait_for(lambda m, n=name: m.topic == f"{topic_root}/{n}/status" and m.payload == b"online", 20)
        except AssertionError:
            raise AssertionError(f"{name} not online:\n{d.log()}") from None

    healthy = tiny_bundle.labelled.slice(0, ROWS)
    sister = higher(healthy)
    pub: QosPublisher = env["pub"]
    topic = f"{topic_root}/sensors/{{}}/telemetry".format
    send(pub, topic("pump-a"), healthy, 0, ROWS)
    send(pub, topic("pump-b"), sister, 0, ROWS)
    send(pub, topic("fan-1"), healthy, 0, 40)
    for d in (per_device, one_model):
        d.wait_metric("sensord_windows_scored_total", ROWS - W + 1, device="pump-a")
        d.wait_metric("sensord_windows_scored_total", ROWS - W + 1, device="pump-b")

    # Each pump by its own model: both normal; the sister raised nothing.
    assert served(per_device) == {"pump-a": id_a, "pump-b": id_b}
    for device in ("pump-a", "pump-b"):
        assert (per_device.metric("sensord_alerts_raised_total", device=device) or 0) == 0
        assert per_device.metric("sensord_anomaly_state", device=device) == 0
    assert rec.messages(f"{topic_root}/per-device/alerts/pump-b") == []
    state_b = json.loads(rec.messages(f"{topic_root}/per-device/state/pump-b")[-1].payload)
    assert state_b["model_id"] == id_b and state_b["state"] == "normal"
    infos = {dict(lab)["model_id"] for (name, lab) in per_device.metrics() if name == "sensord_model_info"}
    assert infos == {id_a, id_b}
    # The device no model matches: counted for every reading, logged once, never scored.
    assert per_device.metric("sensord_readings_rejected_total", reason="no_model") == 40
    assert per_device.log().count("device=fan-1 matches no model") == 1
    assert per_device.metric("sensord_windows_scored_total", device="fan-1") is None
    assert rec.messages(f"{topic_root}/per-device/state/fan-1") == []

    # The same readings with pump-a's model for everyone: the sister is in alert, pump-a is not.
    alerts = [json.loads(m.payload) for m in rec.messages(f"{topic_root}/one-model/alerts/pump-b")]
    assert [a["state"] for a in alerts] == ["raised"] and alerts[0]["model_id"] == id_a
    assert one_model.metric("sensord_anomaly_state", device="pump-b") == 1
    assert (one_model.metric("sensord_alerts_raised_total", device="pump-a") or 0) == 0
    one_model.stop()

    # SIGHUP: pump-a's bundle replaced by a broken one, pump-b's recalibrated (a new version, id .c1).
    shutil.rmtree(models / "pump-a")
    shutil.copytree(layout / "pump-a", models / "pump-a")
    tfl = models / "pump-a" / "model.tflite"
    data = bytearray(tfl.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tfl.write_bytes(bytes(data))
    cal = subprocess.run([sys.executable, "-m", "sensord.cli", "calibrate", "--model", str(models / "pump-b"),
                          "--data", str(write_series_csv(tmp_path / "sister.csv", sister))],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert cal.returncode == 0, cal.stderr
    per_device.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: served(per_device).get("pump-b") == f"{id_b}.c1", 15, "pump-b's new version served")
    line = per_device.wait_log("refused")
    assert "ERROR" in line and str(models / "pump-a") in line and id_a in line  # by name, previous kept
    assert served(per_device)["pump-a"] == id_a
    assert per_device.metric("sensord_reload_failures_total") == 1
    infos = {dict(lab)["model_id"] for (name, lab) in per_device.metrics() if name == "sensord_model_info"}
    assert infos == {id_a, f"{id_b}.c1"}

    more = tiny_bundle.labelled.slice(ROWS, ROWS + 60)
    send(pub, topic("pump-a"), more, 0, 60)
    send(pub, topic("pump-b"), higher(more), 0, 60)
    per_device.wait_metric("sensord_windows_scored_total", ROWS - W + 1 + 60, device="pump-a")
    per_device.wait_metric("sensord_windows_scored_total", ROWS - W + 1 + 60, device="pump-b")
    assert rec.messages(f"{topic_root}/per-device/alerts/pump-a") == []
    assert rec.messages(f"{topic_root}/per-device/alerts/pump-b") == []
    assert per_device.alive()
