"""``sensord record`` end to end through a private Mosquitto (issue 8 part 1, issue 9's "writes the same CSV").

The recorder runs as ``python -m sensord record`` with the daemon's parsers and assembler: the same pump
sent as JSON and as one topic per channel gives byte-identical CSV files, which ``sensord train
--per-device`` accepts unchanged; SIGINT mid-stream leaves complete files; a wrong channel name shows up
in the summary under the daemon's reason.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from broker import MosquittoBroker
from e2e_support import ROOT, QosPublisher, wait_until

from sensord.bundle import ModelBundle
from sensord.dataio import Series, load_csv
from sensord.simulator import CHANNELS, PumpSimulator

pytestmark = pytest.mark.e2e

ROWS = 120


def record_config(broker: MosquittoBroker, root: str, **extra: Any) -> dict[str, Any]:
    return {
        "data": {"channels": list(CHANNELS)},
        "window": {"length": 10},
        "model": {"kind": "dense", "encoder_units": [8], "latent_units": 2},
        "training": {"epochs": 3, "patience": 3, "min_relative_scale": 0.0},
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 5, "client_id": f"rec-{root[-12:]}",
                 "topic_prefix": f"{root}/sensord",
                 "subscriptions": [
                     {"topic": f"{root}/sensors/+/telemetry", "device_topic": f"{root}/sensors/{{device}}/telemetry"},
                     {"topic": f"{root}/plant/+/+", "format": "topic_per_channel",
                      "device_topic": f"{root}/plant/{{device}}/{{channel}}"}]},
        "assembly": {"sample_period_seconds": 1.0},
        "daemon": {"model": str(Path("/nonexistent/model"))},
        "logging": {"level": "INFO"},
        **extra,
    }


class Recording:
    """``python -m sensord record`` as a subprocess; stderr (log and progress) to a file, stdout kept."""

    def __init__(self, tmp: Path, doc: dict[str, Any], duration: str, *args: str) -> None:
        self.cfg_path = tmp / "record.yaml"
        self.cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.out = tmp / "recorded"
        self.err_path = tmp / "record.log"
        self._err = open(self.err_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sensord", "record", "--config", str(self.cfg_path), "--out", str(self.out),
             "--duration", duration, *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._err, cwd=ROOT)
        wait_until(lambda: "subscribed to" in self.log() or self.proc.poll() is not None, 60, "the subscription")
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait(self, timeout: float = 120) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self._err.close()
        return self.proc.returncode, out.decode()


def pump_rows(seed: int, rows: int) -> Series:
    sim = PumpSimulator(seed=seed).generate(rows)
    return Series(sim.timestamps, sim.values, CHANNELS, None)


def send_json(pub: QosPublisher, root: str, device: str, ts: float, row: Any) -> None:
    pub.send_raw(f"{root}/sensors/{device}/telemetry",
                 json.dumps({"ts": ts, **{ch: float(v) for ch, v in zip(CHANNELS, row, strict=True)}}))


def test_two_formats_record_identical_csvs_that_train_accepts(broker: MosquittoBroker, topic_root: str,
                                                              tmp_path: Path) -> None:
    series = pump_rows(3, ROWS)
    rec = Recording(tmp_path, record_config(broker, topic_root), "20s", "--devices", "pump*")
    pub = QosPublisher(broker)
    try:
        for i in range(ROWS):
            ts, row = float(series.timestamps[i]), series.values[i]
            send_json(pub, topic_root, "pump-json", ts, row)
            send_json(pub, topic_root, "fan1", ts, row)  # not recorded: --devices 'pump*'
            for ch, v in reversed(list(zip(CHANNELS, row, strict=True))):  # any order within a sample
                pub.send_raw(f"{topic_root}/plant/pump-tpc/{ch}", json.dumps({"value": float(v), "ts": ts}))
    finally:
        pub.close()
    assert rec.proc.poll() is None, "publishing took longer than --duration: the recording ended early"
    status, summary = rec.wait()
    assert status == 0, rec.log() + summary
    files = sorted(p.name for p in rec.out.iterdir())
    assert files == ["pump-json.csv", "pump-tpc.csv"]
    text = (rec.out / "pump-json.csv").read_text()
    assert text == (rec.out / "pump-tpc.csv").read_text()  # the same CSV from either format
    assert text.startswith("timestamp," + ",".join(CHANNELS) + "\n") and text.endswith("\n")
    got = load_csv(rec.out / "pump-json.csv")
    assert got.channels == CHANNELS and len(got) == ROWS
    assert got.timestamps.tolist() == series.timestamps.tolist()
    assert (got.values == series.values.astype("float32")).all()
    assert "recorded 2 devices, 240 readings" in summary and "(stopped: duration reached)" in summary
    assert "ignored: 1 devices not matching --devices" in summary
    assert "readings rejected: 0" in summary
    assert "recording " in rec.log() and " remaining: " in rec.log()  # the progress line

    train = subprocess.run([sys.executable, "-m", "sensord", "train", "--config", str(rec.cfg_path), "--data",
                            str(rec.out), "--out", str(tmp_path / "models"), "--per-device", "--jobs", "1"],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert train.returncode == 0, train.stdout + train.stderr
    for device in ("pump-json", "pump-tpc"):
        bundle = ModelBundle.load(tmp_path / "models" / device)
        assert bundle.channels == CHANNELS and bundle.sample_period_seconds == 1.0


def test_sigint_mid_stream_leaves_complete_files(broker: MosquittoBroker, topic_root: str, tmp_path: Path) -> None:
    series = pump_rows(5, 5000)
    rec = Recording(tmp_path, record_config(broker, topic_root), "1h")
    stop = threading.Event()
    pub = QosPublisher(broker)

    def stream() -> None:
        for i in range(len(series)):
            if stop.is_set():
                return
            send_json(pub, topic_root, "pump1", float(series.timestamps[i]), series.values[i])
    sender = threading.Thread(target=stream, daemon=True)
    sender.start()
    try:
        wait_until(lambda: (rec.out / "pump1.csv").is_file()
                   and (rec.out / "pump1.csv").read_text().count("\n") > 100, 60, "a hundred rows recorded")
        rec.proc.send_signal(signal.SIGINT)  # while readings keep coming
        status, summary = rec.wait(60)
    finally:
        stop.set()
        sender.join(30)
        pub.close()
    assert status == 0, rec.log() + summary
    assert "(stopped: SIGINT)" in summary
    text = (rec.out / "pump1.csv").read_text()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert all(line.count(",") == len(CHANNELS) for line in lines)
    got = load_csv(rec.out / "pump1.csv")
    assert re.search(rf"^\s+pump1\s+{len(got)}\s", summary, re.M), summary  # every row counted is in the file
    assert got.timestamps.tolist() == series.timestamps[:len(got)].tolist()


def test_a_wrong_channel_name_is_counted_under_the_daemons_reason(broker: MosquittoBroker, topic_root: str,
                                                                  tmp_path: Path) -> None:
    doc = record_config(broker, topic_root)
    doc["data"]["channels"] = [*CHANNELS[:-1], "flow_rate"]  # the gateway says "flow"
    rec = Recording(tmp_path, doc, "8s")
    pub = QosPublisher(broker)
    series = pump_rows(7, 20)
    try:
        for i in range(20):
            send_json(pub, topic_root, "pump1", float(series.timestamps[i]), series.values[i])
        pub.send_raw(f"{topic_root}/sensors/pump1/telemetry", b"{not json")
    finally:
        pub.close()
    status, summary = rec.wait()
    assert status == 65, rec.log() + summary
    assert "readings rejected: 20 (missing_channel 20)" in summary
    assert "1 rejected (malformed_json 1)" in summary
    assert "nothing recorded: most readings were rejected as missing_channel" in summary
    assert list(rec.out.iterdir()) == []
