"""The whole multi-machine workflow end to end through a private Mosquitto (issue 8, "Done when").

One config file and the real command line, each step a subprocess, as an operator would run them:

1. ``sensord record``: two pumps of one kind stream a healthy period, ``pump-b`` running 3 °C warmer than
   ``pump-a`` (another operating point); one CSV per device comes out, holding exactly what was sent.
2. ``sensord train --per-device``: one bundle per recording, with the summary table.
3. ``sensord run`` with ``daemon.models: [{match: "*", path: "<models>/{device}"}]``: each pump, streamed
   on with one injected step fault of its own (``pump-a`` on ``current``, ``pump-b`` on ``pressure``),
   raises exactly one alert, inside its fault, then clears it; each alert carries the device's own model
   id (from its ``bundle.json``). The healthy parts raise nothing, and the warm sister would be in alert
   under ``pump-a``'s model (checked offline) — which is why models are per device.
4. ``sensord evaluate`` on each device's labelled CSV, with its own bundle and the same config (window,
   detector), finds the same alerts (state and window end) as the daemon published.

Not covered here: the issue's compressor-like device with other channels. One daemon serves only models
with the same channels (``data.channels``; see README "Several models in one daemon"), so a compressor
needs a daemon (and config) of its own; that is the same workflow again with other channels.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker import MosquittoBroker, MqttRecorder
from e2e_support import (
    ROOT,
    TINY_DETECTOR,
    TINY_WINDOW,
    DaemonProcess,
    QosPublisher,
    free_port,
    tiny_train_config,
    wait_until,
    write_yaml,
)

from sensord.bundle import ModelBundle
from sensord.config import config_from_dict
from sensord.dataio import Series, load_csv
from sensord.evaluation import decide_rows, score_series
from sensord.scorer import Scorer
from sensord.simulator import CHANNELS, FaultSpec, PumpSimulator, SimulatedSeries
from sensord.sinks import iso
from sensord.windows import window_spec

pytestmark = [pytest.mark.e2e, pytest.mark.training]

W = TINY_WINDOW
HEALTHY_ROWS = 1200  # recorded per device (what the session's tiny bundle is trained on)
LABELLED_ROWS = 300  # streamed to the daemon per device, continuing the same machine
FAULT_START, FAULT_ROWS = 150, 60
WARMER = 3.0  # degrees on pump-b's 'temperature' (about 8 healthy spreads)


class Device:
    """One simulated pump: a healthy period to record, then a labelled run with one step fault."""

    def __init__(self, name: str, seed: int, fault_channel: str, warmer: float = 0.0) -> None:
        self.name = name
        sim = PumpSimulator(seed=seed)
        self.healthy = self._shift(sim.generate(HEALTHY_ROWS), warmer)
        self.labelled = self._shift(sim.generate(LABELLED_ROWS, [FaultSpec("step", FAULT_START, FAULT_ROWS,
                                                                            fault_channel)]), warmer)

    @staticmethod
    def _shift(s: SimulatedSeries, warmer: float) -> Series:
        v = s.values.copy()
        v[:, CHANNELS.index("temperature")] += warmer
        return Series(s.timestamps, v, CHANNELS, s.labels)

    @property
    def fault_span(self) -> tuple[float, float]:
        """First and last timestamp of the fault."""
        ts = self.labelled.timestamps
        return float(ts[FAULT_START]), float(ts[FAULT_START + FAULT_ROWS - 1])

    def write_labelled(self, path: Path) -> Path:
        """The labelled run as a wide CSV with an ``anomaly`` column (what ``evaluate`` reads)."""
        s = self.labelled
        assert s.labels is not None
        lines = [",".join(["timestamp", *s.channels, "anomaly"])]
        lines += [",".join([f"{t:.3f}", *(repr(float(x)) for x in row), str(int(lab))])
                  for t, row, lab in zip(s.timestamps, s.values, s.labels, strict=True)]
        path.write_text("\n".join(lines) + "\n")
        return path


def send(pub: QosPublisher, topic: str, devices: list[Device], which: str) -> None:
    """Every row of each device's ``which`` series, the devices interleaved as they would arrive."""
    series = [(d.name, getattr(d, which)) for d in devices]
    for i in range(len(series[0][1])):
        for name, s in series:
            body = {"ts": float(s.timestamps[i]), "values": {ch: float(v) for ch, v in zip(CHANNELS, s.values[i],
                                                                                          strict=True)}}
            pub.send_raw(topic.format(device=name), json.dumps(body))


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sensord", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)


def offline_alerts(bundle: Path, series: Series, doc: dict[str, Any], device: str) -> list[tuple[str, str]]:
    """The alerts ``bundle`` raises on ``series`` with the config's window and detector (evaluate's code)."""
    cfg = config_from_dict({k: doc[k] for k in ("window", "detector")})
    b = ModelBundle.load(bundle)
    scored = score_series(series, Scorer(b), window_spec(cfg.window, b), device)
    _, alerts = decide_rows(scored, b.threshold.value, cfg.detector, device)
    return [(a.state, iso(a.window_end)) for a in alerts]


def test_record_train_per_device_run_and_evaluate_agree(broker: MosquittoBroker, topic_root: str,
                                                        tmp_path: Path) -> None:
    devices = [Device("pump-a", 11, "current"), Device("pump-b", 12, "pressure", warmer=WARMER)]
    recorded, models = tmp_path / "healthy", tmp_path / "models"
    topic = f"{topic_root}/sensors/{{device}}/telemetry"
    prefix = f"{topic_root}/sensord"
    doc: dict[str, Any] = {  # the one config file every step uses
        **tiny_train_config(epochs=30),
        "data": {"channels": list(CHANNELS)},
        "assembly": {"sample_period_seconds": 1.0},
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 5,
                 "client_id": f"sensord-{uuid.uuid4().hex[:10]}", "topic_prefix": prefix,
                 "subscriptions": [f"{topic_root}/sensors/+/telemetry"],
                 "device_topic": topic},
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "daemon": {"models": [{"match": "*", "path": str(models / "{device}")}],
                   "state_dir": str(tmp_path / "state")},
        "logging": {"level": "INFO"},
    }
    assert doc["detector"] == TINY_DETECTOR and doc["window"] == {"length": W}
    cfg_path = tmp_path / "sensord.yaml"
    write_yaml(cfg_path, doc)
    pub = QosPublisher(broker)
    rec = MqttRecorder(broker.host, broker.port, f"{prefix}/#").start()
    daemon: DaemonProcess | None = None
    try:
        # 1. Record the healthy period (a long --duration, stopped by SIGINT once everything is written).
        err_path = tmp_path / "record.log"
        with err_path.open("wb") as err:
            recorder = subprocess.Popen(
                [sys.executable, "-m", "sensord", "record", "--config", str(cfg_path), "--out", str(recorded),
                 "--duration", "10m"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
            try:
                wait_until(lambda: "subscribed to" in err_path.read_text() or recorder.poll() is not None, 60,
                           "the recorder's subscription")
                assert recorder.poll() is None, err_path.read_text()
                send(pub, topic, devices, "healthy")

                def rows_written() -> bool:
                    files = [recorded / f"{d.name}.csv" for d in devices]
                    return all(f.is_file() and f.read_text().count("\n") == HEALTHY_ROWS + 1 for f in files)
                wait_until(rows_written, 60, "every healthy row in the recordings")
                recorder.send_signal(signal.SIGINT)
                out, _ = recorder.communicate(timeout=60)
            finally:
                if recorder.poll() is None:
                    recorder.kill()
                    recorder.wait(5)
        summary = out.decode()
        assert recorder.returncode == 0, err_path.read_text() + summary
        assert f"recorded 2 devices, {2 * HEALTHY_ROWS} readings" in summary, summary
        assert "readings rejected: 0" in summary, summary
        assert sorted(p.name for p in recorded.iterdir()) == ["pump-a.csv", "pump-b.csv"]
        for d in devices:
            got = load_csv(recorded / f"{d.name}.csv")
            assert got.channels == CHANNELS
            assert got.timestamps.tolist() == d.healthy.timestamps.tolist()
            assert (got.values == d.healthy.values.astype("float32")).all()  # exactly what was sent

        # 2. One bundle per device.
        train = cli("train", "--config", str(cfg_path), "--data", str(recorded), "--out", str(models),
                    "--per-device", "--jobs", "2", "--json", str(tmp_path / "train.json"))
        assert train.returncode == 0, train.stdout + train.stderr
        assert "2 of 2 models written" in train.stdout, train.stdout
        for d in devices:
            assert re.search(rf"^{d.name}\s+1\s+\d+/\d+", train.stdout, re.M), train.stdout
        trained = json.loads((tmp_path / "train.json").read_text())
        assert sorted(m["name"] for m in trained["models"]) == ["pump-a", "pump-b"]
        assert not any(m["error"] for m in trained["models"])
        ids = {d.name: json.loads((models / d.name / "bundle.json").read_text())["model_id"] for d in devices}
        assert ids["pump-a"] != ids["pump-b"]
        for d in devices:
            assert ModelBundle.load(models / d.name).channels == CHANNELS

        # Why per device: under pump-a's model the warm sister's healthy run is already in alert.
        b = devices[1]
        wrong = offline_alerts(models / "pump-a", b.labelled.slice(0, FAULT_START), doc, b.name)
        assert wrong[:1] == [("raised", wrong[0][1])] and wrong[0][1] <= iso(b.labelled.timestamps[2 * W]), wrong

        # 3. One daemon serves both bundles; each pump streams its labelled run with its fault.
        daemon = DaemonProcess(tmp_path, "sensord", doc)  # rewrites sensord.yaml with the same document
        assert daemon.cfg_path == cfg_path
        rec.wait_for(lambda m: m.topic == f"{prefix}/status" and m.payload == b"online", 30)
        send(pub, topic, devices, "labelled")
        for d in devices:
            daemon.wait_metric("sensord_windows_scored_total", LABELLED_ROWS - W + 1, device=d.name, timeout=60)
        live: dict[str, list[dict[str, Any]]] = {}
        for d in devices:
            alerts_topic = f"{prefix}/alerts/{d.name}"

            def two_alerts(t: str = alerts_topic) -> bool:
                return len(rec.messages(t)) >= 2
            wait_until(two_alerts, 10, f"{d.name}'s alerts")
            live[d.name] = [json.loads(m.payload) for m in rec.messages(alerts_topic)]
            assert [a["state"] for a in live[d.name]] == ["raised", "cleared"], live[d.name]
            assert {a["model_id"] for a in live[d.name]} == {ids[d.name]}
            first, last = d.fault_span
            raised, cleared = (a["window_end"] for a in live[d.name])
            assert iso(first) <= raised <= iso(last), (raised, d.fault_span)  # inside the fault
            assert cleared > iso(last)
            assert daemon.metric("sensord_alerts_raised_total", device=d.name) == 1
            assert daemon.metric("sensord_anomaly_state", device=d.name) == 0
            state = json.loads(rec.messages(f"{prefix}/state/{d.name}")[-1].payload)
            assert state["state"] == "normal" and state["model_id"] == ids[d.name]
        assert daemon.alive()

        # 4. evaluate, with each device's bundle and the same config, decides as the daemon did.
        for d in devices:
            report_path = tmp_path / f"eval-{d.name}.json"
            ev = cli("evaluate", "--config", str(cfg_path), "--model", str(models / d.name),
                     "--data", str(d.write_labelled(tmp_path / f"labelled-{d.name}.csv")),
                     "--json", str(report_path), timeout=120)
            assert ev.returncode == 0, ev.stdout + ev.stderr
            report = json.loads(report_path.read_text())
            assert report["model_id"] == ids[d.name]
            assert report["windows"] == LABELLED_ROWS - W + 1
            assert report["segments"] == 1 and report["segments_detected"] == 1
            offline = [(a["state"], iso(a["window_end"])) for a in report["alerts"]]
            assert offline == [(a["state"], a["window_end"]) for a in live[d.name]], (d.name, offline, live)
            np.testing.assert_allclose([a["score"] for a in report["alerts"]],
                                       [a["score"] for a in live[d.name]], rtol=1e-3, atol=1e-4)
    finally:
        if daemon is not None:
            daemon.stop()
        pub.close()
        rec.stop()
