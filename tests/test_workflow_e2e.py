"""The whole multi-machine workflow end to end through a private Mosquitto (issue 8, "Done when").

One config file and the real command line, each step a subprocess, as an operator would run them. Three
machines on one box: two pumps of one kind, ``pump-b``'s supply running 2.2 V higher than ``pump-a``'s
(another operating point; not a temperature, which the models see against its own baseline), and
``compressor-1``, a machine of another kind with other sensors (6 channels, other names). The config's
``daemon.models`` entries name each kind's channels; there is no ``data.channels``.

1. ``sensord record``: the three stream a healthy period; one CSV per device comes out, each with its own
   channels, holding exactly what was sent.
2. ``sensord train --per-device`` (one bundle per recording) and ``sensord train --group pump='pump*'
   --group compressor='compressor*'`` (one per kind, the pumps' data pooled), with the summary table.
3. ``sensord run`` serving the per-device bundles (``path: <models>/{device}``): each machine, streamed on
   with one injected step fault of its own, raises exactly one alert, inside its fault, then clears it;
   each alert carries the device's own model id. The healthy parts raise nothing, and the sister
   would be in alert under ``pump-a``'s model (checked offline) — which is why models are per device.
   A device that matches no entry is counted (``no_model``) and logged once.
4. ``sensord evaluate`` on each device's labelled CSV, with its own bundle and the same config (window,
   detector), finds the same alerts (state and window end) as the daemon published.
5. The same again (a second labelled run, continuing each machine) with a daemon serving the group
   bundles: one alert per machine carrying its group's model id, and ``evaluate`` agrees.
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
from sensord.simulator import (
    CHANNELS,
    COMPRESSOR_CHANNELS,
    CompressorSimulator,
    FaultSpec,
    PumpSimulator,
    SimulatedSeries,
)
from sensord.sinks import iso
from sensord.windows import window_spec

pytestmark = [pytest.mark.e2e, pytest.mark.training]

W = TINY_WINDOW
HEALTHY_ROWS = 1200  # recorded per device (what the session's tiny bundle is trained on)
LABELLED_ROWS = 300  # streamed to the daemon per device and run, continuing the same machine
FAULT_START, FAULT_ROWS = 150, 60
HIGHER = 2.2  # volts on pump-b's 'voltage' (about 8 healthy spreads)
Simulator = PumpSimulator | CompressorSimulator


class Device:
    """One simulated machine: a healthy period to record, then labelled runs with one step fault each."""

    def __init__(self, name: str, sim: Simulator, fault_channels: tuple[str, str], higher: float = 0.0) -> None:
        self.name = name
        self.higher = higher
        self.healthy = self._shift(sim.generate(HEALTHY_ROWS))
        self.runs = [self._shift(sim.generate(LABELLED_ROWS, [FaultSpec("step", FAULT_START, FAULT_ROWS, ch)]))
                     for ch in fault_channels]
        self.channels = self.healthy.channels

    def _shift(self, s: SimulatedSeries) -> Series:
        v = s.values.copy()
        if self.higher:
            v[:, CHANNELS.index("voltage")] += self.higher
        return Series(s.timestamps, v, s.channels, s.labels)

    def fault_span(self, run: int) -> tuple[float, float]:
        """First and last timestamp of the fault of labelled run ``run``."""
        ts = self.runs[run].timestamps
        return float(ts[FAULT_START]), float(ts[FAULT_START + FAULT_ROWS - 1])

    def write_labelled(self, run: int, path: Path) -> Path:
        """Labelled run ``run`` as a wide CSV with an ``anomaly`` column (what ``evaluate`` reads)."""
        s = self.runs[run]
        assert s.labels is not None
        lines = [",".join(["timestamp", *s.channels, "anomaly"])]
        lines += [",".join([f"{t:.3f}", *(repr(float(x)) for x in row), str(int(lab))])
                  for t, row, lab in zip(s.timestamps, s.values, s.labels, strict=True)]
        path.write_text("\n".join(lines) + "\n")
        return path


def send(pub: QosPublisher, topic: str, named: list[tuple[str, Series]]) -> None:
    """Every row of each device's series, the devices interleaved as they would arrive, each device's JSON
    with its own field names."""
    for i in range(len(named[0][1])):
        for name, s in named:
            body = {"ts": float(s.timestamps[i]), "values": {ch: float(v) for ch, v in zip(s.channels, s.values[i],
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


def routes(root: Path, per_device: bool) -> list[dict[str, Any]]:
    """``daemon.models``: each kind with its channels, per device (``root/{device}``) or per group."""
    return [{"match": "pump*", "path": str(root / ("{device}" if per_device else "pump")), "channels": list(CHANNELS)},
            {"match": "compressor*", "path": str(root / ("{device}" if per_device else "compressor")),
             "channels": list(COMPRESSOR_CHANNELS)}]


def serve_and_check(tmp_path: Path, name: str, doc: dict[str, Any], devices: list[Device], run: int,
                    bundles: dict[str, Path], pub: QosPublisher, rec: MqttRecorder, topic: str,
                    prefix: str) -> DaemonProcess:
    """Start a daemon on ``doc``, stream labelled run ``run`` of every device and check that each raised
    exactly one alert inside its fault with the model id of ``bundles[device]``, and that ``evaluate``
    with that bundle decides the same. Returns the daemon (still running) for more checks; stops it if a
    check fails."""
    ids = {d.name: json.loads((bundles[d.name] / "bundle.json").read_text())["model_id"] for d in devices}
    online = [m for m in rec.messages(f"{prefix}/status") if m.payload == b"online"]
    daemon = DaemonProcess(tmp_path, name, doc)
    try:
        _check_serving(tmp_path, name, daemon, devices, run, bundles, ids, online, pub, rec, topic, prefix)
    except BaseException:
        daemon.stop()
        raise
    return daemon


def _check_serving(tmp_path: Path, name: str, daemon: DaemonProcess, devices: list[Device], run: int,
                   bundles: dict[str, Path], ids: dict[str, str], online: list[Any], pub: QosPublisher,
                   rec: MqttRecorder, topic: str, prefix: str) -> None:
    wait_until(lambda: len([m for m in rec.messages(f"{prefix}/status") if m.payload == b"online"]) > len(online),
               30, f"{name} online")
    seen = {d.name: len(rec.messages(f"{prefix}/alerts/{d.name}")) for d in devices}
    send(pub, topic, [(d.name, d.runs[run]) for d in devices])
    for d in devices:
        daemon.wait_metric("sensord_windows_scored_total", LABELLED_ROWS - W + 1, device=d.name, timeout=60)
    live: dict[str, list[dict[str, Any]]] = {}
    for d in devices:
        alerts_topic = f"{prefix}/alerts/{d.name}"

        def two_alerts(t: str = alerts_topic, n: int = seen[d.name]) -> bool:
            return len(rec.messages(t)) >= n + 2
        wait_until(two_alerts, 10, f"{d.name}'s alerts")
        live[d.name] = [json.loads(m.payload) for m in rec.messages(alerts_topic)[seen[d.name]:]]
        assert [a["state"] for a in live[d.name]] == ["raised", "cleared"], (name, d.name, live[d.name])
        assert {a["model_id"] for a in live[d.name]} == {ids[d.name]}
        first, last = d.fault_span(run)
        raised, cleared = (a["window_end"] for a in live[d.name])
        assert iso(first) <= raised <= iso(last), (name, d.name, raised, d.fault_span(run))  # inside the fault
        assert cleared > iso(last)
        assert daemon.metric("sensord_alerts_raised_total", device=d.name) == 1
        assert daemon.metric("sensord_anomaly_state", device=d.name) == 0
        state = json.loads(rec.messages(f"{prefix}/state/{d.name}")[-1].payload)
        assert state["state"] == "normal" and state["model_id"] == ids[d.name]
    assert daemon.alive()

    # evaluate, with each device's bundle and the same config, decides as the daemon did.
    for d in devices:
        report_path = tmp_path / f"eval-{name}-{d.name}.json"
        ev = cli("evaluate", "--config", str(daemon.cfg_path), "--model", str(bundles[d.name]),
                 "--data", str(d.write_labelled(run, tmp_path / f"labelled-{run}-{d.name}.csv")),
                 "--json", str(report_path), timeout=120)
        assert ev.returncode == 0, ev.stdout + ev.stderr
        report = json.loads(report_path.read_text())
        assert report["model_id"] == ids[d.name]
        assert report["windows"] == LABELLED_ROWS - W + 1
        assert report["segments"] == 1 and report["segments_detected"] == 1
        offline = [(a["state"], iso(a["window_end"])) for a in report["alerts"]]
        assert offline == [(a["state"], a["window_end"]) for a in live[d.name]], (name, d.name, offline, live)
        np.testing.assert_allclose([a["score"] for a in report["alerts"]],
                                   [a["score"] for a in live[d.name]], rtol=1e-3, atol=1e-4)


def test_record_train_per_device_and_per_group_run_and_evaluate_agree(broker: MosquittoBroker, topic_root: str,
                                                                      tmp_path: Path) -> None:
    devices = [Device("pump-a", PumpSimulator(seed=11), ("current", "flow")),
               Device("pump-b", PumpSimulator(seed=12), ("pressure", "current"), higher=HIGHER),
               Device("compressor-1", CompressorSimulator(seed=13), ("motor_current", "discharge_pressure"))]
    names = [d.name for d in devices]
    recorded, models, groups = tmp_path / "healthy", tmp_path / "models", tmp_path / "groups"
    topic = f"{topic_root}/sensors/{{device}}/telemetry"
    prefix = f"{topic_root}/sensord"

    def config(per_device: bool, state: str) -> dict[str, Any]:
        return {
            **tiny_train_config(epochs=30),
            "assembly": {"sample_period_seconds": 1.0},
            "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 5,
                     "client_id": f"sensord-{uuid.uuid4().hex[:10]}", "topic_prefix": prefix,
                     "subscriptions": [f"{topic_root}/sensors/+/telemetry"],
                     "device_topic": topic},
            "metrics": {"host": "127.0.0.1", "port": free_port()},
            "daemon": {"models": routes(models if per_device else groups, per_device),
                       "state_dir": str(tmp_path / state)},
            "logging": {"level": "INFO"},
        }
    doc = config(True, "state")  # the one config file record, train, run and evaluate use
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
                send(pub, topic, [(d.name, d.healthy) for d in devices])

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
        assert f"recorded 3 devices, {3 * HEALTHY_ROWS} readings of 2 sets of channels" in summary, summary
        assert f"channels of compressor-1: {', '.join(COMPRESSOR_CHANNELS)}" in summary, summary
        assert "readings rejected: 0" in summary, summary
        assert sorted(p.name for p in recorded.iterdir()) == sorted(f"{n}.csv" for n in names)
        for d in devices:
            got = load_csv(recorded / f"{d.name}.csv")
            assert got.channels == d.channels
            assert got.timestamps.tolist() == d.healthy.timestamps.tolist()
            assert (got.values == d.healthy.values.astype("float32")).all()  # exactly what was sent

        # 2. One bundle per device, and one per group (the two pumps pooled).
        train = cli("train", "--config", str(cfg_path), "--data", str(recorded), "--out", str(models),
                    "--per-device", "--jobs", "2", "--json", str(tmp_path / "train.json"))
        assert train.returncode == 0, train.stdout + train.stderr
        assert "3 of 3 models written" in train.stdout, train.stdout
        for d in devices:
            assert re.search(rf"^{d.name}\s+1\s+\d+/\d+", train.stdout, re.M), train.stdout
        trained = json.loads((tmp_path / "train.json").read_text())
        assert sorted(m["name"] for m in trained["models"]) == sorted(names)
        assert not any(m["error"] for m in trained["models"])
        for d in devices:
            assert ModelBundle.load(models / d.name).channels == d.channels
        grouped = cli("train", "--config", str(cfg_path), "--data", str(recorded), "--out", str(groups),
                      "--group", "pump=pump*", "--group", "compressor=compressor*", "--jobs", "2")
        assert grouped.returncode == 0, grouped.stdout + grouped.stderr
        assert "2 of 2 models written" in grouped.stdout, grouped.stdout
        assert re.search(r"^pump\s+2\s+\d+/\d+", grouped.stdout, re.M), grouped.stdout
        assert ModelBundle.load(groups / "compressor").channels == COMPRESSOR_CHANNELS
        assert ModelBundle.load(groups / "pump").channels == CHANNELS

        # Why per device: under pump-a's model the sister's healthy run is already in alert.
        b = devices[1]
        wrong = offline_alerts(models / "pump-a", b.runs[0].slice(0, FAULT_START), doc, b.name)
        assert wrong[:1] == [("raised", wrong[0][1])] and wrong[0][1] <= iso(b.runs[0].timestamps[2 * W]), wrong

        # 3./4. One daemon serves the three per-device bundles, of two kinds; evaluate agrees.
        daemon = serve_and_check(tmp_path, "sensord", doc, devices, 0, {n: models / n for n in names}, pub, rec,
                                 topic, prefix)
        assert daemon.cfg_path == cfg_path
        pub.send_raw(topic.format(device="fan-1"), json.dumps({"ts": 1.0, "values": {"x": 1.0}}))
        pub.send_raw(topic.format(device="fan-1"), json.dumps({"ts": 2.0, "values": {"x": 1.0}}))
        daemon.wait_metric("sensord_readings_rejected_total", 2, reason="no_model")
        assert daemon.log().count("device=fan-1 matches no model") == 1
        daemon.stop()
        daemon = None

        # 5. A daemon serving the group bundles, on the next labelled run of every machine.
        group_doc = config(False, "state-groups")
        daemon = serve_and_check(tmp_path, "sensord-groups", group_doc, devices, 1,
                                 {"pump-a": groups / "pump", "pump-b": groups / "pump",
                                  "compressor-1": groups / "compressor"}, pub, rec, topic, prefix)
    finally:
        if daemon is not None:
            daemon.stop()
        pub.close()
        rec.stop()
