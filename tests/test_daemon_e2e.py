"""End to end: ``sensord run`` as a real subprocess against a real (private) Mosquitto.

One bundle is trained per session on the built-in simulator; every test starts
its own daemon with its own config (unique topics, client id and metrics
port), streams readings with explicit timestamps through one QoS 1 publisher,
and checks what comes out: alerts, retained state and status, Prometheus
metrics over HTTP, signals, exit statuses and the process's memory map.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from broker import MosquittoBroker, MqttRecorder, RecordedMessage
from e2e_support import (
    ROOT,
    TINY_DETECTOR,
    TINY_WINDOW,
    DaemonProcess,
    QosPublisher,
    TrainedBundle,
    daemon_config,
    merge,
    wait_until,
    write_series_csv,
    write_yaml,
)

from sensord.bundle import ModelBundle
from sensord.config import config_from_dict
from sensord.dataio import Series, load_csv
from sensord.evaluation import decide_rows, score_series
from sensord.scorer import Scorer
from sensord.sinks import iso
from sensord.windows import window_spec

pytestmark = pytest.mark.e2e

W = TINY_WINDOW
DETECTOR = TINY_DETECTOR
HEALTHY_ROWS = 300  # the labelled run starts with 600 healthy seconds (the simulator's lead)
FAULT_START, FAULT_STOP = 150, 210  # injected step, rows [start, stop)


# -- module fixtures ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Models:
    bundle: Path
    labelled_csv: Path
    labelled: Series  # 2040 rows at 1 Hz, four labelled faults after a 600 s healthy lead

    def offline_alerts(self, series: Series, device: str) -> list[tuple[str, str]]:
        """The alerts ``sensord evaluate`` finds in ``series`` with the daemon's window and detector settings."""
        cfg = config_from_dict({"window": {"length": W}, "detector": DETECTOR})
        bundle = ModelBundle.load(self.bundle)
        scored = score_series(series, Scorer(bundle), window_spec(cfg.window, bundle), device)
        _, alerts = decide_rows(scored, bundle.threshold.value, cfg.detector, device)
        return [(a.state, iso(a.window_end)) for a in alerts]


@pytest.fixture(scope="module")
def models(tiny_bundle: TrainedBundle) -> Models:
    return Models(tiny_bundle.bundle, tiny_bundle.labelled_csv, tiny_bundle.labelled)


def with_step(series: Series, start: int, stop: int) -> Series:
    """A copy with a step on 'current' (+0.5 A, 5 healthy spreads) and its knock-on on 'vibration_1'."""
    v = series.values.copy()
    v[start:stop, series.channels.index("current")] += 0.5
    v[start:stop, series.channels.index("vibration_1")] += 0.55
    return Series(series.timestamps, v, series.channels, None, "step")


def bundle_variant(src: Path, dst: Path, model_id: str, threshold_factor: float) -> float:
    """Copy a bundle with another id and threshold; model.tflite (and so its checksum) is unchanged."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "bundle.json").read_text())
    meta["model_id"] = model_id
    meta["threshold"]["value"] *= threshold_factor
    (dst / "bundle.json").write_text(json.dumps(meta, indent=2))
    return float(meta["threshold"]["value"])


def corrupt_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    tfl = dst / "model.tflite"
    data = bytearray(tfl.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tfl.write_bytes(bytes(data))
    return tfl


# -- helpers ------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m sensord.cli ARGS`` in the foreground, to its exit, output captured."""
    return subprocess.run([sys.executable, "-m", "sensord.cli", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


class Streamer(QosPublisher):
    """Publishes readings, one a message, to ``{root}/sensors/{device}/telemetry``."""

    def __init__(self, broker: MosquittoBroker, root: str) -> None:
        self.root = root
        super().__init__(broker)

    def topic(self, device: str) -> str:
        return f"{self.root}/sensors/{device}/telemetry"

    def send_rows(self, device: str, series: Series, start: int = 0, stop: int | None = None,
                  pause: float = 0.0) -> None:
        for i in range(start, len(series) if stop is None else stop):
            self.send_row(device, series, i)
            if pause:
                time.sleep(pause)

    def send_row(self, device: str, series: Series, i: int) -> None:
        body = {"ts": float(series.timestamps[i]),
                "values": {ch: float(series.values[i, j]) for j, ch in enumerate(series.channels)}}
        self.send_raw(self.topic(device), json.dumps(body))


@dataclass
class E2E:
    broker: MosquittoBroker
    root: str
    tmp: Path
    models: Models
    rec: MqttRecorder
    stream: Streamer
    daemons: list[DaemonProcess] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"{self.root}/sensord"

    def config(self, **over: Any) -> dict[str, Any]:
        base = daemon_config(self.broker, self.models.bundle, window=W, detector=DETECTOR,
                             client_id=f"sensord-{uuid.uuid4().hex[:10]}",
                             subscriptions=[f"{self.root}/sensors/+/telemetry"],
                             device_topic=f"{self.root}/sensors/{{device}}/telemetry",
                             topic_prefix=self.prefix)
        return merge(base, over)

    def spawn(self, doc: dict[str, Any], name: str = "sensord",
              extra_env: dict[str, str] | None = None) -> DaemonProcess:
        d = DaemonProcess(self.tmp, name, doc, extra_env)
        self.daemons.append(d)
        return d

    def start(self, **over: Any) -> DaemonProcess:
        """Start a daemon and wait until it announces itself: retained ``{prefix}/status`` = online."""
        d = self.spawn(self.config(**over))
        status = f"{self.prefix}/status"
        deadline = time.monotonic() + 20
        while True:
            try:
                self.rec.wait_for(lambda m: m.topic == status and m.payload == b"online", timeout=0.1)
                return d
            except AssertionError:
                if not d.alive():
                    raise AssertionError(f"daemon exited with {d.proc.returncode}:\n{d.log()}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"daemon not online within 20 s:\n{d.log()}") from None

    def alerts(self, device: str) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.rec.messages(f"{self.prefix}/alerts/{device}")]

    def wait_alert(self, device: str, state: str, n: int = 1, timeout: float = 15.0) -> dict[str, Any]:
        topic = f"{self.prefix}/alerts/{device}"
        got = self.rec.wait_for(lambda m: m.topic == topic and json.loads(m.payload)["state"] == state
                                and len([x for x in self.rec.messages(topic)
                                         if json.loads(x.payload)["state"] == state]) >= n, timeout)
        msgs = [m for m in got if m.topic == topic]
        assert all(m.qos == 1 and not m.retain for m in msgs)
        return json.loads(msgs[n - 1].payload)

    def retained(self, subtopic: str) -> RecordedMessage:
        """What a consumer subscribing now gets: the retained message on ``{prefix}/{subtopic}``.

        The daemon's log and metrics tell when it handed a message to paho, a moment before paho's network
        thread writes it to the broker; a subscription in that moment gets it live, without the retain
        flag. So a fresh subscription is tried again (for up to 10 s) until the first message it gets is
        the broker's retained copy; never one: not retained.
        """
        topic = f"{self.prefix}/{subtopic}"
        deadline = time.monotonic() + 10.0
        while True:
            with MqttRecorder(self.broker.host, self.broker.port, topic) as fresh:
                fresh.wait_for(lambda m: m.topic == topic, timeout=5)
                # A live update may follow the retained copy when the daemon published just now.
                time.sleep(0.3)
                got = [r for r in fresh.messages() if r.topic == topic]
            if got[0].retain or time.monotonic() > deadline:
                break
        assert got[0].retain, f"{topic} is not retained"
        return got[-1]


@pytest.fixture
def e2e(broker: MosquittoBroker, topic_root: str, tmp_path: Path, models: Models) -> Iterator[E2E]:
    rec = MqttRecorder(broker.host, broker.port, f"{topic_root}/sensord/#").start()
    stream = Streamer(broker, topic_root)
    env = E2E(broker, topic_root, tmp_path, models, rec, stream)
    try:
        yield env
    finally:
        for d in env.daemons:
            d.stop()
        stream.close()
        rec.stop()


# -- tests --------------------------------------------------------------------------------------

def test_healthy_stream_no_alert_state_and_metrics(e2e: E2E, models: Models) -> None:
    seg = models.labelled.slice(0, HEALTHY_ROWS)
    assert models.offline_alerts(seg, "pump1") == [], "model raises offline on the healthy stream"
    d = e2e.start()
    e2e.stream.send_rows("pump1", seg)
    e2e.stream.send_raw(e2e.stream.topic("pump1"), b"{not json")
    d.wait_metric("sensord_windows_scored_total", HEALTHY_ROWS - W + 1, device="pump1")
    d.wait_metric("sensord_messages_received_total", e2e.stream.sent)
    assert e2e.stream.sent == HEALTHY_ROWS + 1
    m = d.metrics()
    assert m[("sensord_messages_rejected_total", (("reason", "malformed_json"),))] == 1
    assert m[("sensord_mqtt_connected", ())] == 1
    assert m[("sensord_devices", ())] == 1
    assert m[("sensord_windows_dropped_total", ())] == 0
    # Every window is counted before anything is published for it, so with all of them counted this
    # says that no alert was raised (rather than that none has arrived yet).
    assert m.get(("sensord_alerts_raised_total", (("device", "pump1"),)), 0) == 0
    assert m[("sensord_anomaly_state", (("device", "pump1"),))] == 0
    assert sum(v for (name, _), v in m.items() if name == "sensord_readings_rejected_total") == 0
    assert d.model_info()["model_id"] == ModelBundle.load(models.bundle).model_id
    state = json.loads(e2e.retained("state/pump1").payload)
    assert state["device"] == "pump1" and state["state"] == "normal"
    assert state["since"] == iso(seg.timestamps[W - 1])  # the device's first window
    assert e2e.alerts("pump1") == []
    assert e2e.retained("status").payload == b"online"
    assert "reason=malformed_json" in d.log()


def test_fault_raises_then_clears_with_retained_state(e2e: E2E, models: Models) -> None:
    seg = with_step(models.labelled.slice(0, 360), FAULT_START, FAULT_STOP)
    ts = seg.timestamps
    d = e2e.start()
    e2e.stream.send_rows("pump2", seg, 0, FAULT_START + 20)  # stop inside the fault
    raised = e2e.wait_alert("pump2", "raised")
    assert set(raised) == {"alert_id", "device", "state", "window_start", "window_end", "raised_at", "score", "error",
                           "threshold", "top_channels", "model_id"}
    assert raised["device"] == "pump2"
    assert iso(ts[FAULT_START]) <= raised["window_end"] <= iso(ts[FAULT_START + DETECTOR["raise_after"] + 3])
    assert raised["raised_at"] == raised["window_end"]
    assert raised["window_start"] == iso(ts[list(map(iso, ts)).index(raised["window_end"]) - W + 1])
    assert raised["score"] > 1 and raised["error"] > raised["threshold"]
    assert raised["threshold"] == pytest.approx(ModelBundle.load(models.bundle).threshold.value, rel=1e-6)
    assert raised["model_id"] == ModelBundle.load(models.bundle).model_id
    assert "current" in [c["channel"] for c in raised["top_channels"]]
    assert json.loads(e2e.retained("state/pump2").payload)["state"] == "alert"

    e2e.stream.send_rows("pump2", seg, FAULT_START + 20)
    cleared = e2e.wait_alert("pump2", "cleared")
    last_fault_window = FAULT_STOP - 1 + W - 1  # the last window that contains a faulty row
    assert iso(ts[last_fault_window]) < cleared["window_end"] <= \
        iso(ts[last_fault_window + DETECTOR["clear_after"] + 3])
    assert cleared["raised_at"] == raised["window_end"]
    assert cleared["alert_id"] == raised["alert_id"] and len(raised["alert_id"]) == 32
    state = json.loads(e2e.retained("state/pump2").payload)
    assert state["state"] == "normal" and state["since"] == cleared["window_end"]
    d.wait_metric("sensord_windows_scored_total", len(seg) - W + 1, device="pump2")
    assert d.metric("sensord_alerts_raised_total", device="pump2") == 1
    assert d.metric("sensord_anomaly_state", device="pump2") == 0
    assert [a["state"] for a in e2e.alerts("pump2")] == ["raised", "cleared"]


def write_ms_csv(path: Path, series: Series) -> np.ndarray:
    """``series`` as a CSV exported with epoch-millisecond timestamps (the common format); returns them."""
    assert series.labels is not None
    ms = np.round(series.timestamps * 1000).astype(np.int64)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["timestamp", *series.channels, "anomaly"])
        for i in range(len(series)):
            out.writerow([int(ms[i]), *(repr(float(v)) for v in series.values[i]), int(series.labels[i])])
    return ms


def test_millisecond_csv_and_the_same_stream_over_mqtt_give_the_same_windows_and_decisions(
        e2e: E2E, models: Models) -> None:
    """One timestamp parser and one window factory: ``sensord evaluate`` on a millisecond CSV, the offline
    code in-process and the daemon fed the same readings over MQTT (``ts`` in milliseconds) cut the same
    windows, with the same errors, and decide every one of them the same way."""
    csv_path, cfg_path, out = e2e.tmp / "labelled-ms.csv", e2e.tmp / "evaluate.yaml", e2e.tmp / "eval.json"
    ms = write_ms_csv(csv_path, models.labelled)
    doc = {"window": {"length": W}, "detector": DETECTOR}
    write_yaml(cfg_path, doc)
    cfg = config_from_dict(doc)

    # Offline, in-process: the CSV read as milliseconds (not 1000 s apart, which no window would survive).
    series = load_csv(csv_path, cfg.data, require_labels=True)
    np.testing.assert_array_equal(series.timestamps, ms / 1000)
    bundle = ModelBundle.load(models.bundle)
    assert bundle.drift is not None  # the temperatures are seen against their baselines, live as offline
    scored = score_series(series, Scorer(bundle), window_spec(cfg.window, bundle), "pump3")
    assert len(scored.rows) == len(series) - W + 1
    predicted, alerts = decide_rows(scored, bundle.threshold.value, cfg.detector, "pump3")
    expected = [(a.state, iso(a.window_end)) for a in alerts]
    assert len(expected) >= 6 and expected[0][0] == "raised", expected

    # The command line, from the same CSV and config.
    res = run_cli("evaluate", "--model", str(models.bundle), "--data", str(csv_path), "--config", str(cfg_path),
                  "--json", str(out))
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["windows"] == len(scored.rows)
    assert [(a["state"], iso(a["window_end"])) for a in report["alerts"]] == expected

    # Live: the same readings over MQTT, every window's score published.
    d = e2e.start(mqtt={"publish_scores": True})
    for i in range(len(series)):
        body = {"ts": int(ms[i]), "values": {ch: float(v) for ch, v in zip(series.channels, series.values[i],
                                                                          strict=True)}}
        e2e.stream.send_raw(e2e.stream.topic("pump3"), json.dumps(body))
    d.wait_metric("sensord_windows_scored_total", len(scored.rows), device="pump3", timeout=30)
    scores = f"{e2e.prefix}/scores/pump3"
    wait_until(lambda: len(e2e.rec.messages(scores)) >= len(scored.rows), 10, "every window's score")
    live = [json.loads(m.payload) for m in e2e.rec.messages(scores)]
    assert [w["window_end"] for w in live] == [iso(t) for t in scored.ends]
    np.testing.assert_allclose([w["error"] for w in live], scored.errors, rtol=1e-5, atol=1e-7)
    assert [w["alert"] for w in live] == (predicted[scored.rows] == 1).tolist()
    # Every window's decision is accounted for above, so these are all the alerts there will be.
    wait_until(lambda: len(e2e.alerts("pump3")) >= len(expected), 10, f"{len(expected)} alerts")
    assert [(a["state"], a["window_end"]) for a in e2e.alerts("pump3")] == expected


def test_kill_9_publishes_last_will(e2e: E2E, models: Models) -> None:
    d = e2e.start()
    assert e2e.retained("status").payload == b"online"
    e2e.stream.send_rows("pump4", models.labelled, 0, 20)
    d.wait_metric("sensord_windows_scored_total", 20 - W + 1, device="pump4")
    e2e.rec.clear()
    os.kill(d.pid, signal.SIGKILL)
    assert d.proc.wait(5) == -signal.SIGKILL
    status = f"{e2e.prefix}/status"
    e2e.rec.wait_for(lambda m: m.topic == status and m.payload == b"offline", timeout=10)
    assert e2e.retained("status").payload == b"offline"


def test_sigterm_scores_everything_queued_then_exits_0(e2e: E2E, models: Models) -> None:
    rows = FAULT_START + 20
    seg = with_step(models.labelled.slice(0, rows), FAULT_START, rows)
    # The scorer collects one big batch for up to 5 s, so at SIGTERM every window is still unscored.
    d = e2e.start(daemon={"batch_wait_seconds": 5.0}, scoring={"batch_max": 4096}, mqtt={"publish_scores": True})
    e2e.stream.send_rows("pump5", seg)
    d.wait_metric("sensord_messages_received_total", rows)
    assert e2e.alerts("pump5") == []
    # Checked last before the signal: every window is still waiting in the batch when SIGTERM arrives.
    assert d.metric("sensord_windows_scored_total", device="pump5") is None, "scored before SIGTERM"
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0, d.log()  # (shutdown_timeout_seconds is 4)
    raised = e2e.wait_alert("pump5", "raised", timeout=5)
    assert iso(seg.timestamps[FAULT_START]) <= raised["window_end"]
    scores = f"{e2e.prefix}/scores/pump5"
    wait_until(lambda: len(e2e.rec.messages(scores)) >= rows - W + 1, 5, "every window's score")
    assert len(e2e.rec.messages(scores)) == rows - W + 1
    assert e2e.retained("status").payload == b"offline"
    log = d.log()
    assert "stopped in" in log
    assert "left unscored" not in log


def test_sighup_reload_swaps_model_without_losing_readings(e2e: E2E, models: Models) -> None:
    series = models.labelled
    old_id = ModelBundle.load(models.bundle).model_id
    old_threshold = ModelBundle.load(models.bundle).threshold.value
    new_threshold = bundle_variant(models.bundle, e2e.tmp / "model-b", "model-b", 2.0)
    d = e2e.start()
    assert d.model_info()["model_id"] == old_id
    assert d.metric("sensord_threshold") == pytest.approx(old_threshold)

    # Stream continuously while the config is switched to bundle B and SIGHUP is sent.
    stop_at = [len(series)]
    sent = [0]

    def pump() -> None:
        i = 0
        while i < stop_at[0]:
            e2e.stream.send_row("pump6", series, i)
            i += 1
            sent[0] = i
            time.sleep(0.002)
    t = threading.Thread(target=pump)
    t.start()
    try:
        wait_until(lambda: sent[0] >= 100, 10, "100 readings sent")
        doc = yaml.safe_load(d.cfg_path.read_text())
        doc["daemon"]["model"] = str(e2e.tmp / "model-b")
        doc["mqtt"]["keepalive"] = 7  # restart-only: named in a warning, not applied
        write_yaml(d.cfg_path, doc)
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: d.model_info()["model_id"] == "model-b", 10, "model-b served")
        assert "reload: mqtt.keepalive needs a restart; it is not applied" in d.log()
        stop_at[0] = min(len(series), sent[0] + 100)  # keep streaming after the swap
    finally:
        t.join(30)
    n = sent[0]
    assert 200 <= n < len(series)
    assert d.metric("sensord_threshold") == pytest.approx(new_threshold)
    d.wait_metric("sensord_messages_received_total", n)
    d.wait_metric("sensord_windows_scored_total", n - W + 1, device="pump6")  # windows continued
    assert "reloaded: model model-b" in d.log()

    # A corrupted bundle is refused; the current one keeps serving.
    bad_tflite = corrupt_bundle(models.bundle, e2e.tmp / "model-bad")
    doc["daemon"]["model"] = str(e2e.tmp / "model-bad")
    write_yaml(d.cfg_path, doc)
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in d.log(), 10, "the refused reload to be logged")
    line = next(ln for ln in d.log().splitlines() if "reload refused" in ln)
    assert "ERROR" in line and str(bad_tflite) in line and "checksum mismatch" in line
    assert d.model_info()["model_id"] == "model-b"
    assert d.metric("sensord_threshold") == pytest.approx(new_threshold)
    e2e.stream.send_rows("pump6", series, n, n + 50)
    d.wait_metric("sensord_messages_received_total", n + 50)
    d.wait_metric("sensord_windows_scored_total", n + 50 - W + 1, device="pump6")
    assert d.alive()


def test_calibrate_then_sighup_serves_the_new_threshold_and_the_new_normal_stays_quiet(
        e2e: E2E, models: Models) -> None:
    """After maintenance 'current' runs 1.5 healthy spreads higher: the old threshold alarms on healthy
    readings; `sensord calibrate` on a healthy stretch and a SIGHUP make the daemon serve the new version."""
    shutil.copytree(models.bundle, e2e.tmp / "pump")
    old = ModelBundle.load(e2e.tmp / "pump")
    healthy = models.labelled.slice(0, 600)
    v = healthy.values.copy()
    v[:, healthy.channels.index("current")] += 0.15
    after = Series(healthy.timestamps, v, healthy.channels, None, "after")
    csv_path = write_series_csv(e2e.tmp / "after.csv", after)

    d = e2e.start(daemon={"model": str(e2e.tmp / "pump")})
    e2e.stream.send_rows("pump7", after, 300, 400)
    d.wait_metric("sensord_windows_scored_total", 100 - W + 1, device="pump7")
    assert (d.metric("sensord_alerts_raised_total", device="pump7") or 0) >= 1  # the old threshold: a false alarm

    cal = run_cli("calibrate", "--model", str(e2e.tmp / "pump"), "--data", str(csv_path))
    assert cal.returncode == 0, cal.stderr
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: d.model_info()["model_id"] == f"{old.model_id}.c1", 10, "the calibrated version served")
    new = ModelBundle.load(e2e.tmp / "pump")
    assert d.metric("sensord_threshold") == pytest.approx(new.threshold.value)
    raised = d.metric("sensord_alerts_raised_total", device="pump7")
    e2e.stream.send_rows("pump7", after, 400, 600)  # (the alert raised before clears on these)
    d.wait_metric("sensord_windows_scored_total", 300 - W + 1, device="pump7")
    assert d.metric("sensord_alerts_raised_total", device="pump7") == raised  # no new alarm on the new normal
    assert d.metric("sensord_anomaly_state", device="pump7") == 0


@pytest.mark.parametrize("case", ["config_type", "config_unknown_key", "missing_bundle", "corrupt_bundle",
                                  "window_mismatch"])
def test_bad_start_exits_78_with_one_clear_line(e2e: E2E, models: Models, case: str) -> None:
    doc = e2e.config()
    if case == "config_type":
        doc["window"]["length"] = "ten"
        expect = ["config error", "window.length"]
    elif case == "config_unknown_key":
        doc["mqtt"]["prot"] = 1883
        expect = ["config error", "mqtt.prot: unknown key", 'did you mean "port"']
    elif case == "missing_bundle":
        doc["daemon"]["model"] = str(e2e.tmp / "no-such-model")
        expect = ["model error", str(e2e.tmp / "no-such-model")]
    elif case == "corrupt_bundle":
        tfl = corrupt_bundle(models.bundle, e2e.tmp / "model-bad")
        doc["daemon"]["model"] = str(e2e.tmp / "model-bad")
        expect = ["model error", str(tfl), "checksum mismatch"]
    else:
        doc["window"]["length"] = W + 2
        expect = ["model error", str(models.bundle), "window length"]
    cfg_path = e2e.tmp / "bad.yaml"
    write_yaml(cfg_path, doc)
    res = run_cli("run", "--config", str(cfg_path))
    assert res.returncode == 78, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("sensord: ")
    if expect[0] == "config error":
        expect.append(str(cfg_path))
    for part in expect:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert res.stdout == ""


def test_daemon_never_maps_tensorflow(e2e: E2E, models: Models) -> None:
    d = e2e.start()
    e2e.stream.send_rows("pump7", models.labelled, 0, 20)
    d.wait_metric("sensord_windows_scored_total", 20 - W + 1, device="pump7")
    files = set()
    for line in Path(f"/proc/{d.pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            files.add(parts[5])
    assert any("/ai_edge_litert/" in f for f in files), "ai_edge_litert is not mapped: the check is blind"
    tf = sorted(f for f in files if ("/tensorflow/" in f or "/keras/" in f) and "/ai_edge_litert/" not in f)
    assert tf == []


def test_metrics_port_taken_exits_69_with_one_clear_line(e2e: E2E) -> None:
    """A taken metrics port is not a config mistake for ever (exit 69 lets systemd retry), but it is one line."""
    doc = e2e.config()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        doc["metrics"]["port"] = squatter.getsockname()[1]
        cfg_path = e2e.tmp / "port.yaml"
        write_yaml(cfg_path, doc)
        res = run_cli("run", "--config", str(cfg_path))
    assert res.returncode == 69, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("sensord: ")]
    assert len(errors) == 1 and f"127.0.0.1:{doc['metrics']['port']}" in errors[0], res.stderr
    assert "Traceback" not in res.stderr


def test_systemd_notify_ready_watchdog_reload_stopping(e2e: E2E) -> None:
    """What systemd sees on NOTIFY_SOCKET: READY=1 once connected, WATCHDOG=1 pings, RELOADING=1 then
    READY=1 on SIGHUP, STOPPING=1 on SIGTERM."""
    sock_dir = Path(tempfile.mkdtemp(prefix="sd-", dir="/tmp"))  # AF_UNIX paths must be short
    path = str(sock_dir / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        srv.settimeout(0.2)
        got: list[str] = []

        def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
            deadline = time.monotonic() + timeout
            while not pred():
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {what} within {timeout} s; got {got}")
                try:
                    got.append(srv.recv(4096).decode())
                except TimeoutError:
                    pass

        d = e2e.spawn(e2e.config(), extra_env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        until(lambda: any(m.startswith("READY=1") for m in got), 20, "READY=1")
        assert e2e.retained("status").payload == b"online"  # ready only once the broker has us
        until(lambda: sum(m == "WATCHDOG=1\n" for m in got) >= 3, 5, "three WATCHDOG=1 pings")
        got.clear()
        d.proc.send_signal(signal.SIGHUP)
        until(lambda: any(m.startswith("READY=1") for m in got), 10, "READY=1 after the reload")
        assert got[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
        d.proc.send_signal(signal.SIGTERM)
        until(lambda: "STOPPING=1\n" in got, 10, "STOPPING=1")
        assert d.proc.wait(10) == 0
    shutil.rmtree(sock_dir, ignore_errors=True)
