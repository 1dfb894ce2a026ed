"""``sensord demo``: the whole product on one machine, from nothing, in about a minute.

Two simulated machines of different kinds, ``pump-1`` (8 channels) and ``compressor-1`` (6 other
channels), publish over a private Mosquitto on a free loopback port, and the demo runs the workflow an
operator runs on a real box, each step the real command as a subprocess:

1. ``sensord record`` captures their healthy period, one CSV per machine;
2. ``sensord train --per-device`` trains a model for each from its own recording;
3. ``sensord run`` serves both from one daemon (``daemon.models``), while the machines stream on with
   faults injected into each; the alerts are printed as ``mosquitto_sub -v`` would show them, each
   naming its machine's model; then the metrics endpoint and a clean SIGTERM shutdown.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import yaml

from .bundle import ModelBundle
from .errors import UnavailableError
from .evaluation import segments_of
from .simulator import (
    CHANNELS,
    COMPRESSOR_CHANNELS,
    FAULT_SECONDS,
    CompressorSimulator,
    FaultSpec,
    PumpSimulator,
    SimulatedSeries,
)

PREFIX = "sensord"
HEALTHY_SECONDS = 1800  # each machine's healthy recording
DEMO_EPOCHS = 20  # the demo's cap on training epochs (the default is 100): two models in about half a minute
LEAD_SECONDS = 600  # healthy readings before the first fault of the labelled run


@dataclass
class Machine:
    """One simulated machine: its healthy period (to record) and a run with its faults (to serve)."""

    name: str
    healthy: SimulatedSeries
    labelled: SimulatedSeries


def _machines() -> list[Machine]:
    """pump-1 and compressor-1, each with two faults of its own, interleaved in time (every 360 s)."""
    total = LEAD_SECONDS + 4 * (FAULT_SECONDS + 240)
    at = [LEAD_SECONDS + i * (FAULT_SECONDS + 240) for i in range(4)]
    pump, comp = PumpSimulator(seed=0), CompressorSimulator(seed=0)
    return [
        Machine("pump-1", pump.generate(HEALTHY_SECONDS), pump.generate(total, [
            FaultSpec("step", at[0], FAULT_SECONDS, "current"),
            FaultSpec("spikes", at[2], FAULT_SECONDS, "vibration_1")])),
        Machine("compressor-1", comp.generate(HEALTHY_SECONDS), comp.generate(total, [
            FaultSpec("drift", at[1], FAULT_SECONDS, "discharge_temperature"),
            FaultSpec("step", at[3], FAULT_SECONDS, "motor_current")])),
    ]


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
    """The sum of ``name`` over its label sets (0 when absent)."""
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in _metric_lines(port, (name,))
               if ln.split(" ")[0].split("{")[0] == name)


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


def _sensord(*args: str) -> list[str]:
    """The command line of a sensord command, run with this interpreter (the venv's ``sensord``)."""
    print(f"    $ sensord {shlex.join(args)}", flush=True)
    return [sys.executable, "-m", "sensord", *args]


class _Publisher:
    """The machines' gateway: one JSON message per reading on ``sensors/<machine>/telemetry``."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id="sensord-demo-pub")
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, machine: str, s: SimulatedSeries, i: int) -> mqtt.MQTTMessageInfo:
        body = {"ts": float(s.timestamps[i]),
                "values": dict(zip(s.channels, np.round(s.values[i].astype(float), 6).tolist(), strict=True))}
        return self.client.publish(f"sensors/{machine}/telemetry", json.dumps(body), qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _config(workdir: Path, port: int, metrics_port: int, config: str | None) -> dict[str, Any]:
    """The one config file every step uses: the broker, and per kind of machine its channels and models
    (``config``, if given, for the rest; without it the defaults, with training capped at DEMO_EPOCHS)."""
    doc: dict[str, Any] = yaml.safe_load(Path(config).read_text()) if config else {}
    (doc.get("data") or {}).pop("channels", None)  # each kind of machine has its own (daemon.models below)
    models = str(workdir / "models" / "{device}")
    if not config:
        doc["training"] = {"epochs": DEMO_EPOCHS}
    doc.update({
        "mqtt": {**doc.get("mqtt", {}), "host": "127.0.0.1", "port": port, "topic_prefix": PREFIX,
                 "subscriptions": ["sensors/+/telemetry"], "device_topic": "sensors/{device}/telemetry"},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "daemon": {**{k: v for k, v in doc.get("daemon", {}).items() if k != "model"},
                   "models": [{"match": "pump-*", "path": models, "channels": list(CHANNELS)},
                              {"match": "compressor-*", "path": models, "channels": list(COMPRESSOR_CHANNELS)}],
                   "state_dir": str(workdir / "state")},
    })
    return doc


def _record(workdir: Path, cfg_path: Path, machines: list[Machine], pub: _Publisher) -> bool:
    """``sensord record`` while the machines stream their healthy period; True once every row is on disk."""
    out = workdir / "data" / "healthy"
    shutil.rmtree(out, ignore_errors=True)
    _say(f"recording the machines' healthy period ({HEALTHY_SECONDS} readings each) into {out}")
    log = (workdir / "record.log").open("wb")
    proc = subprocess.Popen(_sensord("record", "--config", str(cfg_path), "--out", str(out), "--duration", "10m"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while "subscribed to" not in (workdir / "record.log").read_text() and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        infos = [pub.send(m.name, m.healthy, i) for i in range(HEALTHY_SECONDS) for m in machines]
        for info in infos:
            info.wait_for_publish(30)

        def lines(m: Machine) -> int:
            f = out / f"{m.name}.csv"
            return f.read_bytes().count(b"\n") if f.is_file() else 0
        deadline = time.monotonic() + 60
        while any(lines(m) < HEALTHY_SECONDS + 1 for m in machines) and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # as Ctrl-C would: the files are complete either way
        summary, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    print("\n".join(f"    {ln}" for ln in summary.decode().splitlines()[:4]), flush=True)
    return proc.returncode == 0 and all(lines(m) == HEALTHY_SECONDS + 1 for m in machines)


def run_demo(workdir: Path, rate: float = 400.0, config: str | None = None) -> int:
    t_start = time.monotonic()
    dev = _dev_broker()
    try:
        dev.find_mosquitto()  # before anything else
    except RuntimeError as exc:
        raise UnavailableError(str(exc)) from None
    workdir.mkdir(parents=True, exist_ok=True)
    machines = _machines()
    with dev.MosquittoBroker() as broker:
        metrics_port = _free_port()
        cfg_path = workdir / "sensord.yaml"
        cfg_path.write_text(yaml.safe_dump(_config(workdir, broker.port, metrics_port, config), sort_keys=False))
        _say(f"two machines, pump-1 ({len(CHANNELS)} channels) and compressor-1 ({len(COMPRESSOR_CHANNELS)} other "
             f"channels), publish on a private broker 127.0.0.1:{broker.port}; one config for every step: {cfg_path}")
        pub = _Publisher(broker.port)
        try:
            if not _record(workdir, cfg_path, machines, pub):
                _say(f"the recording is incomplete; see {workdir / 'record.log'}")
                return 1
            models = workdir / "models"
            shutil.rmtree(models, ignore_errors=True)
            _say("training a model per machine, each from its own recording (two worker processes)")
            train = subprocess.run(_sensord("train", "--config", str(cfg_path), "--data",
                                            str(workdir / "data" / "healthy"), "--out", str(models),
                                            "--per-device", "--jobs", "2"),
                                   stdin=subprocess.DEVNULL, capture_output=True, text=True)
            print("\n".join(f"    {ln}" for ln in train.stdout.splitlines()), flush=True)
            if train.returncode != 0:
                _say(f"training failed:\n{train.stderr[-2000:]}")
                return 1
            ids = {m.name: json.loads((models / m.name / "bundle.json").read_text())["model_id"] for m in machines}
            return _serve(workdir, cfg_path, metrics_port, broker.port, machines, ids, pub, rate, t_start)
        finally:
            pub.close()


def _serve(workdir: Path, cfg_path: Path, metrics_port: int, port: int, machines: list[Machine],
           ids: dict[str, str], pub: _Publisher, rate: float, t_start: float) -> int:
    """``sensord run`` serving both models while the machines stream their faults; the alerts printed."""
    shutil.rmtree(workdir / "state", ignore_errors=True)  # each demo starts afresh, no earlier alerts
    _say("serving both models from one daemon (daemon.models in the config):")
    log_file = (workdir / "daemon.log").open("wb")
    daemon = subprocess.Popen(_sensord("run", "--config", str(cfg_path)), stdout=log_file, stderr=subprocess.STDOUT)
    online = threading.Event()
    alerts: list[dict[str, Any]] = []

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        text = msg.payload.decode(errors="replace")
        if msg.topic == f"{PREFIX}/status" and text == "online":
            online.set()
        if "/alerts/" in msg.topic:
            alert = json.loads(text)
            alerts.append(alert)
            top = ", ".join(c["channel"] for c in alert["top_channels"])
            print(f"    {msg.topic} state={alert['state']} model_id={alert['model_id']} score={alert['score']:.2f} "
                  f"top_channels={top}", flush=True)
        elif "/state/" not in msg.topic and "/scores/" not in msg.topic:
            print(f"    {msg.topic} {text}", flush=True)

    _say(f"status and alerts as `mosquitto_sub -h 127.0.0.1 -p {port} -t '{PREFIX}/#' -v` shows them "
         "(alerts shortened to a few fields, per-device state topics left out):")
    sub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="sensord-demo-sub")
    sub.on_message = on_message
    sub.on_connect = lambda c, u, f, r, p: c.subscribe(f"{PREFIX}/#", qos=1)
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    code = 1
    try:
        if not online.wait(60):
            _say(f"daemon did not come online; see {workdir / 'daemon.log'}")
            return 1
        starts = {a: (m.name, b - a) for m in machines for a, b in segments_of(m.labelled.labels)}
        n = len(machines[0].labelled.timestamps)
        _say(f"streaming {n} readings of each machine at {rate:.0f}/s ({min(starts)} s healthy, then "
             f"{len(starts)} faults, two on each machine)")
        for i in range(n):
            if i in starts:
                _say(f"fault on {starts[i][0]} begins at reading {i} (lasts {starts[i][1]} s)")
            for m in machines:
                pub.send(m.name, m.labelled, i)
            time.sleep(1.0 / rate)
        window = max(ModelBundle.load(workdir / "models" / m.name).window_length for m in machines)
        deadline = time.monotonic() + 30
        while _metric(metrics_port, "sensord_windows_scored_total") < len(machines) * (n - window + 1) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        _say(f"metrics: curl http://127.0.0.1:{metrics_port}/metrics   (a few lines:)")
        for ln in _metric_lines(metrics_port, ("sensord_messages_received_total", "sensord_windows_scored_total",
                                               "sensord_alerts_raised_total", "sensord_model_threshold",
                                               "sensord_device_model_info")):
            print(f"    {ln}")
        for m in machines:
            raised = [a for a in alerts if a["device"] == m.name and a["state"] == "raised"]
            named = all(a["model_id"] == ids[m.name] for a in raised)
            _say(f"{m.name}: {len(raised)} alerts raised for 2 injected faults"
                 + (f", each naming its own model {ids[m.name]}" if raised and named else ""))
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
