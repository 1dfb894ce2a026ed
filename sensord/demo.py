"""``sensord demo``: the whole product on one machine, from nothing, in a couple of minutes.

Simulated pump data -> ``sensord train`` -> a private Mosquitto on a free
loopback port -> ``sensord run`` as a real subprocess -> a healthy period and
then faults streamed over MQTT -> alerts printed as ``mosquitto_sub -v``
would show them -> the metrics endpoint -> a clean SIGTERM shutdown.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import yaml

from .config import load_config
from .dataio import load_csv
from .errors import UnavailableError
from .evaluation import segments_of
from .simulator import simulate

DEVICE = "pump1"
PREFIX = "sensord"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(text: str) -> None:
    print(f"==> {text}", flush=True)


def _metric_lines(port: int, names: tuple[str, ...]) -> list[str]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return [ln for ln in body.splitlines() if ln.startswith(names)]


def _metric(port: int, name: str) -> float:
    for ln in _metric_lines(port, (name,)):
        if ln.split(" ")[0].split("{")[0] == name:
            return float(ln.rsplit(" ", 1)[1])
    return 0.0


def _dev_broker() -> Any:
    """The tests' private-Mosquitto helper (``tests/mosquitto.py``): test infrastructure, not part of the
    installed package, so it is loaded from the source checkout this sensord runs from (``make demo``)."""
    path = Path(__file__).resolve().parent.parent / "tests" / "mosquitto.py"
    spec = importlib.util.spec_from_file_location("sensord_demo_mosquitto", path)
    if not path.is_file() or spec is None or spec.loader is None:
        raise UnavailableError(f"the demo runs from a source checkout of sensord: it starts a private Mosquitto "
                               f"with tests/mosquitto.py, which the installed package leaves out (no {path}); "
                               "in the checkout: make demo")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_demo(workdir: Path, rate: float = 400.0, config: str | None = None) -> int:
    from .training import train_bundle

    t_start = time.monotonic()
    dev = _dev_broker()
    try:
        dev.find_mosquitto()  # before the training, not after it
    except RuntimeError as exc:
        raise UnavailableError(str(exc)) from None
    workdir.mkdir(parents=True, exist_ok=True)
    _say(f"simulating a pump: healthy run and a run with faults in {workdir}/data")
    healthy, labelled = simulate(workdir / "data", seconds=1800, seed=0)

    cfg = load_config(config)
    _say(f"training a {cfg.model.kind} autoencoder on {healthy.name} (window {cfg.window.length})")
    bundle = train_bundle(load_csv(healthy, cfg.data), cfg, workdir / "model")
    print(f"    model {bundle.model_id}, threshold {bundle.threshold.value:.4g} ({bundle.threshold.method})")

    with dev.MosquittoBroker() as broker:
        metrics_port = _free_port()
        daemon_cfg = yaml.safe_load(Path(config).read_text()) if config else {}
        daemon_cfg.update({
            "mqtt": {**daemon_cfg.get("mqtt", {}), "port": broker.port, "topic_prefix": PREFIX,
                     "subscriptions": ["sensors/+/telemetry"], "device_topic": "sensors/{device}/telemetry"},
            "metrics": {"host": "127.0.0.1", "port": metrics_port},
            "daemon": {**daemon_cfg.get("daemon", {}), "model": str(workdir / "model"),
                       "state_dir": str(workdir / "state")},
        })
        shutil.rmtree(workdir / "state", ignore_errors=True)  # each demo starts afresh, no earlier alerts
        cfg_path = workdir / "sensord.yaml"
        cfg_path.write_text(yaml.safe_dump(daemon_cfg, sort_keys=False))
        _say(f"private broker on 127.0.0.1:{broker.port}; starting: sensord run --config {cfg_path}")
        log_file = (workdir / "daemon.log").open("wb")
        daemon = subprocess.Popen([sys.executable, "-m", "sensord.cli", "run", "--config", str(cfg_path)],
                                  stdout=log_file, stderr=subprocess.STDOUT)
        online = threading.Event()
        alerts: list[dict[str, object]] = []

        def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
            text = msg.payload.decode(errors="replace")
            if msg.topic == f"{PREFIX}/status" and text == "online":
                online.set()
            if "/alerts/" in msg.topic:
                alerts.append(json.loads(text))
            if "/state/" not in msg.topic and "/scores/" not in msg.topic:
                print(f"    {msg.topic} {text}", flush=True)

        _say(f"status and alerts as `mosquitto_sub -h 127.0.0.1 -p {broker.port} -t '{PREFIX}/#' -v` "
             "shows them (per-device state topics left out):")
        sub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="sensord-demo-sub")
        sub.on_message = on_message
        sub.on_connect = lambda c, u, f, r, p: c.subscribe(f"{PREFIX}/#", qos=1)
        sub.connect("127.0.0.1", broker.port)
        sub.loop_start()
        try:
            if not online.wait(60):
                _say(f"daemon did not come online; see {workdir / 'daemon.log'}")
                return 1
            series = load_csv(labelled, cfg.data)
            assert series.labels is not None
            faults = segments_of(series.labels)
            starts = {a: b for a, b in faults}
            pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="sensord-demo-pub")
            pub.connect("127.0.0.1", broker.port)
            pub.loop_start()
            _say(f"streaming {len(series)} readings of {DEVICE} at {rate:.0f}/s "
                 f"({faults[0][0]} s healthy, then {len(faults)} faults)")
            for i in range(len(series)):
                if i in starts:
                    _say(f"fault begins at reading {i} (lasts {starts[i] - i} s)")
                body = {"ts": float(series.timestamps[i]),
                        "values": dict(zip(series.channels, np.round(series.values[i].astype(float), 6),
                                           strict=True))}
                pub.publish(f"sensors/{DEVICE}/telemetry", json.dumps(body), qos=1)
                time.sleep(1.0 / rate)
            pub.loop_stop()
            pub.disconnect()
            expected = len(series) - cfg.window.length + 1
            deadline = time.monotonic() + 30
            while _metric(metrics_port, "sensord_windows_scored_total") < expected and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(0.5)
            _say(f"metrics: curl http://127.0.0.1:{metrics_port}/metrics   (a few lines:)")
            for ln in _metric_lines(metrics_port, ("sensord_messages_received_total", "sensord_windows_scored_total",
                                                   "sensord_alerts_raised_total", "sensord_threshold",
                                                   "sensord_anomaly_state")):
                print(f"    {ln}")
            raised = sum(1 for a in alerts if a.get("state") == "raised")
            _say(f"{raised} alerts raised for {len(faults)} injected faults")
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = daemon.wait()
            time.sleep(0.3)
            sub.loop_stop()
            sub.disconnect()
            log_file.close()
        _say(f"daemon stopped with SIGTERM (exit {code}); its log: {workdir / 'daemon.log'}")
    _say(f"demo finished in {time.monotonic() - t_start:.0f} s")
    return 0 if code == 0 else 1
