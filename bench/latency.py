"""Per-window latency through a real broker: the publish of the reading that completes a window -> that
window's message on ``{prefix}/scores/{device}``, at a fixed reading rate, for several
``daemon.batch_wait_seconds`` values side by side (interleaved repeats, medians of the percentiles).

A private Mosquitto, ``sensord run`` (a subprocess, as in production) with ``publish_scores: true``, one
paho publisher at QoS 1 pacing readings across ``--devices`` devices, and one subscriber on the scores:

    .venv/bin/python bench/latency.py --model demo-run/model --rate 1000 --seconds 10 --waits 0.02,0 --repeats 3

Without --model a small bundle is trained first (needs the [train] extra), as bench/throughput.py does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' private broker
from mosquitto import MosquittoBroker, _free_port

from sensord.bundle import ModelBundle
from sensord.simulator import PumpSimulator
from sensord.sinks import iso

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import train_small

ROOT = Path(__file__).resolve().parent.parent


def _client(broker: MosquittoBroker, name: str) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=name)
    c.connect(broker.host, broker.port, keepalive=30)
    c.loop_start()
    return c


def _wait(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


def one_run(broker: MosquittoBroker, model: str, wait: float, rate: float, seconds: float, devices: int,
            tmp: Path, run: int) -> dict[str, float]:
    prefix = f"lat{run}"
    metrics_port = _free_port("127.0.0.1")
    doc = {"mqtt": {"host": broker.host, "port": broker.port, "client_id": f"sensord-lat-{run}",
                    "subscriptions": [f"{prefix}/+/telemetry"], "device_topic": f"{prefix}/{{device}}/telemetry",
                    "topic_prefix": prefix, "publish_scores": True, "session_expiry_seconds": 0},
           "metrics": {"port": metrics_port},
           "daemon": {"model": model, "batch_wait_seconds": wait, "state_dir": None, "max_devices": devices}}
    cfg_path = tmp / f"run{run}.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    log = (tmp / f"run{run}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "sensord.cli", "run", "--config", str(cfg_path)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    got: dict[tuple[str, str], float] = {}
    online = threading.Event()

    def on_message(_c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        if m.topic == f"{prefix}/status":
            if m.payload == b"online":
                online.set()
            return
        body = json.loads(m.payload)
        got[(body["device"], body["window_end"])] = now
    sub = _client(broker, f"lat-sub-{run}")
    sub.on_message = on_message
    sub.subscribe([(f"{prefix}/scores/+", 0), (f"{prefix}/status", 0)])
    pub = _client(broker, f"lat-pub-{run}")
    try:
        _wait(online.is_set, 60, "sensord online")
        length = ModelBundle.load(model).window_length
        sim = PumpSimulator(seed=run).generate(int(rate * seconds / devices) + length)
        channels = sim.channels
        t0 = time.time() - len(sim.timestamps) - 60  # synthetic clock: one reading per second per device
        sent: dict[tuple[str, str], float] = {}
        start = time.perf_counter()
        n = 0
        for i in range(len(sim.timestamps)):
            ts = t0 + i
            body = json.dumps({"ts": ts, "values": dict(zip(channels, np.round(sim.values[i], 5).tolist(),
                                                              strict=True))})
            for d in range(devices):
                due = start + n / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                pub.publish(f"{prefix}/dev{d}/telemetry", body, qos=1)
                if i >= length - 1:
                    key = (f"dev{d}", iso(ts))  # the daemon's own rendering of window_end
                    sent[key] = time.perf_counter()
                n += 1
        achieved = n / (time.perf_counter() - start)
        _wait(lambda: len(got) >= len(sent), 30, f"{len(sent)} scores (have {len(got)})")
        lat = np.array([got[k] - sent[k] for k in sent]) * 1000.0
        return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                "max": float(lat.max()), "windows": float(len(lat)), "rate": achieved}
    finally:
        pub.loop_stop()
        sub.loop_stop()
        proc.terminate()
        proc.wait(10)
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--rate", type=float, default=1000.0, help="readings per second, all devices together")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--waits", default="0.02,0", help="daemon.batch_wait_seconds values to compare")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    waits = [float(w) for w in args.waits.split(",")]
    with tempfile.TemporaryDirectory(prefix="sensord-latency-") as tmpdir:
        tmp = Path(tmpdir)
        model = args.model
        if model is None:
            train_small(tmp)
            model = str(tmp / "model")
        results: dict[float, list[dict[str, float]]] = {w: [] for w in waits}
        with MosquittoBroker() as broker:
            run = 0
            for _ in range(args.repeats):
                for w in waits:  # interleaved: machine noise hits every setting alike
                    run += 1
                    results[w].append(one_run(broker, model, w, args.rate, args.seconds, args.devices, tmp, run))
        print(f"latency publish -> score message, {args.devices} devices at {args.rate:.0f} readings/s for "
              f"{args.seconds:.0f} s, medians of {args.repeats} interleaved runs")
        for w, rs in results.items():
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            print(f"batch_wait_seconds {w:5.3f}: p50 {med['p50']:6.2f} ms  p99 {med['p99']:6.2f} ms  "
                  f"max {med['max']:6.1f} ms  ({med['windows']:.0f} windows, {med['rate']:.0f} readings/s sent)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
