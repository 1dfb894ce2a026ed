"""Issue 14, outside the test suite: replay the unlucky inputs against ``sensord run`` with streams of its own.

A private Mosquitto, the daemon as a subprocess, a pump simulated with another seed and start date than the
tests use, and one scenario per finding of issue 14. Prints one line per scenario with its figures and
OK/FAIL, and exits 1 if any failed.

    .venv/bin/python bench/unlucky_check.py [--model DIR] [--keep DIR]

Without --model a small dense bundle is trained first (needs the [train] extra, as does the tampered-model
scenario, which is skipped without TensorFlow).
"""

from __future__ import annotations

import argparse
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
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' private broker
from mosquitto import MosquittoBroker

from sensord.simulator import PumpSimulator

W = 10
SIM = PumpSimulator(seed=1414, start=datetime(2025, 6, 1, tzinfo=UTC)).generate(600)
RESULTS: list[tuple[str, bool, str]] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(pred: Callable[[], Any], timeout: float = 20.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    return pred()


def reading(i: int, ts: Any = None, **over: float) -> dict[str, Any]:
    values = {ch: round(float(SIM.values[i % len(SIM.timestamps), j]), 5) for j, ch in enumerate(SIM.channels)}
    values.update(over)
    return {"ts": float(SIM.timestamps[i % len(SIM.timestamps)]) if ts is None else ts, "values": values}


class Publisher:
    def __init__(self, broker: MosquittoBroker) -> None:
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                             client_id=f"chk-{uuid.uuid4().hex[:8]}")
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()

    def send(self, topic: str, body: Any, retain: bool = False) -> None:
        info = self.c.publish(topic, json.dumps(body), qos=1, retain=retain)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Recorder:
    def __init__(self, broker: MosquittoBroker, topic: str) -> None:
        self.msgs: list[tuple[str, bytes]] = []
        ready = threading.Event()
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                             client_id=f"rec-{uuid.uuid4().hex[:8]}")
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_message = lambda c, u, m: self.msgs.append((m.topic, bytes(m.payload)))
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        ready.wait(10)

    def not_strict(self) -> int:
        def refuse(name: str) -> Any:
            raise ValueError(name)
        bad = 0
        for topic, payload in list(self.msgs):
            if topic.endswith("/status"):
                continue
            try:
                json.loads(payload, parse_constant=refuse)
            except ValueError:
                bad += 1
        return bad

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Daemon:
    def __init__(self, work: Path, name: str, broker: MosquittoBroker, model: Path, **over: Any) -> None:
        self.name = name
        self.port = free_port()
        doc: dict[str, Any] = {
            "window": {"length": W},
            "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 5, "topic_prefix": f"chk/{name}",
                     "subscriptions": [f"chk/{name}/in/#"], "device_topic": f"chk/{name}/in/{{device}}",
                     "reconnect_min_seconds": 1, "reconnect_max_seconds": 1},
            "metrics": {"host": "127.0.0.1", "port": self.port},
            "daemon": {"model": str(model)},
        }
        for section, values in over.items():
            doc.setdefault(section, {}).update(values)
        self.doc = doc
        self.cfg = work / f"{name}.yaml"
        self.cfg.write_text(yaml.safe_dump(doc))
        self.log_path = work / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "sensord.cli", "run", "--config", str(self.cfg)],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def topic(self, device: str) -> str:
        return f"chk/{self.name}/in/{device}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return float("nan")
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return 0.0

    def ready(self) -> bool:
        return bool(wait(lambda: "ready: serving" in self.log() or self.proc.poll() is not None)) \
            and self.proc.poll() is None

    def scored(self, device: str, n: int, timeout: float = 20.0) -> float:
        wait(lambda: self.metric("sensord_windows_scored_total", device=device) >= n, timeout)
        return self.metric("sensord_windows_scored_total", device=device)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


_T = [time.monotonic()]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def check(name: str, ok: bool, figures: str) -> None:
    RESULTS.append((name, ok, figures))
    now = time.monotonic()
    print(f"{'OK  ' if ok else 'FAIL'} {name} ({now - _T[0]:.0f} s): {figures}", flush=True)
    _T[0] = now


def scenario_timestamps(work: Path, broker: MosquittoBroker, model: Path, pub: Publisher) -> None:
    now = time.time()
    pub.send("chk/ts/in/retained", reading(0, ts=now + 365 * 86400), retain=True)
    d = Daemon(work, "ts", broker, model)
    try:
        d.ready()
        for i in range(100):
            pub.send(d.topic("glitch"), reading(i, ts=now + 365 * 86400) if i == 30 else reading(i))
            pub.send(d.topic("micros"), reading(i, ts=int(SIM.timestamps[i] * 1e6)))
            pub.send(d.topic("retained"), reading(i))
            pub.send(d.topic("nots"), {"values": reading(i)["values"]} if i == 30 else reading(i))
        got = {dev: d.scored(dev, exp) for dev, exp in
               (("glitch", 99 - W + 1), ("micros", 100 - W + 1), ("retained", 100 - W + 1), ("nots", 0))}
        expected_nots = (30 - W + 1) + (100 - 31 - 4) - W + 1
        got["nots"] = d.scored("nots", expected_nots)
        ok = got == {"glitch": 99 - W + 1, "micros": 100 - W + 1, "retained": 100 - W + 1, "nots": expected_nots}
        check("1 future/µs/retained/clock-jump timestamps", ok,
              f"windows scored {got} (expected 90/91/91/{expected_nots}); "
              f"future_timestamp={d.metric('sensord_readings_rejected_total', reason='future_timestamp'):.0f} "
              f"retained={d.metric('sensord_messages_rejected_total', reason='retained'):.0f} "
              f"resyncs={d.metric('sensord_clock_resyncs_total'):.0f}")
    finally:
        d.stop()
        pub.send("chk/ts/in/retained", "", retain=True)


def scenario_nan(work: Path, broker: MosquittoBroker, model: Path, pub: Publisher) -> None:
    d = Daemon(work, "nan", broker, model, mqtt={"publish_scores": True})
    rec = Recorder(broker, "chk/nan/#")
    try:
        d.ready()
        for i in range(60):
            marker = {ch: 3e38 for ch in SIM.channels} if i >= 40 else {}
            pub.send(d.topic("stuck"), reading(i, **marker))
        n = d.scored("stuck", 60 - W + 1)
        time.sleep(0.5)
        raised = sum(1 for t, p in rec.msgs if t == "chk/nan/alerts/stuck" and b'"raised"' in p)
        err = d.metric("sensord_reconstruction_error", device="stuck")
        bad = rec.not_strict()
        check("2 values near float32 max", n == 60 - W + 1 and raised == 1 and bad == 0 and np.isfinite(err),
              f"windows {n:.0f}, alerts raised {raised}, payloads not strict JSON {bad} of {len(rec.msgs)}, "
              f"error gauge {err:.4g}, clipped {d.metric('sensord_values_clipped_total'):.0f}")
    finally:
        rec.close()
        d.stop()


def scenario_device_ids(work: Path, broker: MosquittoBroker, model: Path, pub: Publisher) -> None:
    d = Daemon(work, "ids", broker, model, mqtt={"device_field": "id", "device_topic": None})
    try:
        d.ready()
        for i in range(60):
            pub.send(d.topic("gw"), {"id": "neighbour", **reading(i)})
            if i % 10 == 5:
                pub.send(d.topic("gw"), [{"id": "a\x00b", **reading(i)}, {"id": "x\nERROR forged", **reading(i)}])
        n = d.scored("neighbour", 60 - W + 1)
        forged = sum(ln.startswith("ERROR forged") for ln in d.log().splitlines())
        rc = d.metric("sensord_mqtt_reconnects_total")
        check("3 device id with NUL/newline", n == 60 - W + 1 and rc == 0 and forged == 0,
              f"neighbour windows {n:.0f}/{60 - W + 1}, reconnects {rc:.0f}, forged log lines {forged}, "
              f"bad_device_id {d.metric('sensord_readings_rejected_total', reason='bad_device_id'):.0f}")
    finally:
        d.stop()


def scenario_client_ids(work: Path, broker: MosquittoBroker, model: Path, pub: Publisher) -> None:
    a = Daemon(work, "cid-a", broker, model)
    b = Daemon(work, "cid-b", broker, model, mqtt={"subscriptions": ["chk/cid-a/in/#"],
                                                    "device_topic": "chk/cid-a/in/{device}"})
    try:
        a.ready() and b.ready()
        for i in range(40):
            pub.send(a.topic("shared"), reading(i))
        na, nb = a.scored("shared", 40 - W + 1), b.scored("shared", 40 - W + 1)
        t = a.metric("sensord_mqtt_session_takeovers_total") + b.metric("sensord_mqtt_session_takeovers_total")
        check("4 two daemons with the default client id", na == nb == 40 - W + 1 and t == 0,
              f"windows {na:.0f} and {nb:.0f} of {40 - W + 1}, takeovers {t:.0f}")
    finally:
        a.stop()
        b.stop()


def scenario_metrics(work: Path, broker: MosquittoBroker, model: Path, pub: Publisher) -> None:
    d = Daemon(work, "fds", broker, model, metrics={"timeout_seconds": 2.0})
    socks = []
    try:
        d.ready()
        base = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
        peak = base
        for _ in range(1100):
            try:
                socks.append(socket.create_connection(("127.0.0.1", d.port), timeout=5))
            except OSError:
                break
            if len(socks) % 50 == 0:
                peak = max(peak, len(os.listdir(f"/proc/{d.proc.pid}/fd")))
        for i in range(30):
            pub.send(d.topic("after"), reading(i))
        n = d.scored("after", 30 - W + 1)
        check("5 idle /metrics connections", n == 30 - W + 1 and peak <= base + 17,
              f"{len(socks)} idle connections opened, daemon fds {base} -> peak {peak}, "
              f"rejected {d.metric('sensord_metrics_connections_rejected_total'):.0f}, windows after {n:.0f}")
    finally:
        for s in socks:
            s.close()
        d.stop()


def scenario_start_up(work: Path, broker: MosquittoBroker, model: Path) -> None:
    cfg = work / "bad-tls.yaml"
    cfg.write_text(yaml.safe_dump({"mqtt": {"tls": {"ca_file": str(work / "missing-ca.pem")}},
                                   "daemon": {"model": str(model)}, "window": {"length": W}}))
    res = subprocess.run([sys.executable, "-m", "sensord.cli", "run", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    d = Daemon(work, "hup", broker, model)
    bit = 1 << (signal.SIGHUP - 1)

    def caught() -> bool:
        try:
            status = Path(f"/proc/{d.proc.pid}/status").read_text()
        except OSError:
            return True
        return bool(int(next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16) & bit)
    wait(caught)
    d.proc.send_signal(signal.SIGHUP)  # as early as the handler exists: long before the model is loaded
    alive = d.ready()
    d.stop()
    check("6 start-up mistakes and an early SIGHUP", res.returncode == 78 and len(lines) == 1 and alive,
          f"missing CA: exit {res.returncode}, {len(lines)} line(s) ({lines[0][:80] if lines else ''}…); "
          f"SIGHUP right after the handler appeared: {'alive and serving' if alive else 'died'}")


def scenario_flood(work: Path, broker: MosquittoBroker, model: Path, pub: Publisher) -> None:
    d = Daemon(work, "flood", broker, model, mqtt={"device_field": "id", "device_topic": None},
               daemon={"queue_size": 100, "batch_wait_seconds": 0.3})
    try:
        d.ready()
        pub.send(d.topic("gw"), [{"id": "light", **reading(0)}])
        t0 = float(SIM.timestamps[0])
        for k in range(1, 60):
            batch = [{"id": "flood", **reading(j, ts=t0 + k * 250 + j)} for j in range(250)]
            pub.send(d.topic("gw"), [*batch, {"id": "light", **reading(k)}])
        n = d.scored("light", 60 - W + 1, timeout=40)
        rss0 = rss_mb(d.proc.pid)
        big = [{"id": "light", **reading(i)} for i in range(5000)]  # ~1.3 MB
        for _ in range(20):
            pub.send(d.topic("gw"), big)
        wait(lambda: d.metric("sensord_messages_rejected_total", reason="too_large") >= 20)
        large = d.metric("sensord_messages_rejected_total", reason="too_large")
        rss1 = rss_mb(d.proc.pid)
        check("7 a flooding neighbour, large payloads", n == 60 - W + 1 and large == 20,
              f"light device windows {n:.0f}/{60 - W + 1}, flood throttled "
              f"{d.metric('sensord_windows_throttled_total', device='flood'):.0f}, "
              f"dropped {d.metric('sensord_windows_dropped_total'):.0f}; 20 payloads of "
              f"{len(json.dumps(big)) / 1e6:.1f} MB refused ({large:.0f}), RSS {rss0:.0f} -> {rss1:.0f} MB")
    finally:
        d.stop()


def scenario_tampered(work: Path, broker: MosquittoBroker, model: Path) -> None:
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from sensord.tflib import import_tensorflow
        import_tensorflow()
        from e2e_support import tamper_bundle
    except ImportError:
        check("8 tampered model", True, "skipped: needs TensorFlow")
        return
    refused = 0
    for k, factor in enumerate((1.05, 1.3, 2.0, 0.5)):
        bad = work / f"tampered-{k}"
        tamper_bundle(model, bad, factor)
        cfg = work / f"tampered-{k}.yaml"
        cfg.write_text(yaml.safe_dump({"daemon": {"model": str(bad)}, "window": {"length": W}}))
        res = subprocess.run([sys.executable, "-m", "sensord.cli", "check-config", "--config", str(cfg),
                              "--model", str(bad)], capture_output=True, text=True, timeout=120)
        refused += res.returncode == 78 and "reference windows" in res.stderr
    check("8 tampered model with a recomputed checksum", refused == 4, f"{refused} of 4 tampered bundles refused")


def train(work: Path) -> Path:
    code = ("import sys; from pathlib import Path; from sensord.simulator import simulate; "
            "from sensord.dataio import load_csv; from sensord.config import config_from_dict; "
            "from sensord.training import train_bundle; "
            "h, _ = simulate(Path(sys.argv[1]) / 'sim', seconds=1200, seed=5); "
            "cfg = config_from_dict({'window': {'length': WINDOW}, 'model': {'kind': 'dense', 'encoder_units': [16], "
            "'latent_units': 4}, 'training': {'epochs': 20, 'min_relative_scale': 0.0}, "
            "'threshold': {'method': 'max_factor', 'factor': 1.5}}); "
            "train_bundle(load_csv(h), cfg, Path(sys.argv[1]) / 'model')").replace("WINDOW", str(W))
    subprocess.run([sys.executable, "-c", code, str(work)], check=True, capture_output=True)
    return work / "model"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a bundle trained for window length 10 (default: train one)")
    ap.add_argument("--keep", help="keep configs and logs in this directory")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="sensord-unlucky-"))
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else train(work)
    t0 = _T[0] = time.monotonic()
    with MosquittoBroker() as broker:
        pub = Publisher(broker)
        try:
            scenario_timestamps(work, broker, model, pub)
            scenario_nan(work, broker, model, pub)
            scenario_device_ids(work, broker, model, pub)
            scenario_client_ids(work, broker, model, pub)
            scenario_metrics(work, broker, model, pub)
            scenario_start_up(work, broker, model)
            scenario_flood(work, broker, model, pub)
            scenario_tampered(work, broker, model)
        finally:
            pub.close()
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"{len(RESULTS) - len(failed)} of {len(RESULTS)} OK in {time.monotonic() - t0:.0f} s; logs in {work}")
    if not args.keep and not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
