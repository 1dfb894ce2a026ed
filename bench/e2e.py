"""Serving speed through a real broker: what an operator feels, `sensord run` behind a private Mosquitto.

Four figures, each from the same run so that machine noise hits every side alike (interleaved repeats,
medians):

* **Throughput at saturation**, `sensord run` against a bare paho subscriber that only ``json.loads`` each
  message (the ceiling of a Python MQTT consumer on this box). The publisher is taken out of the race: every
  consumer holds a persistent session (MQTT 5, QoS 1), the messages are queued for all of them at once while
  they are away, then each consumer connects in turn and drains the same backlog. The daemon is timed from
  its retained ``online`` (published as it connects) to the retained state of a sentinel device whose only
  window is completed by the very last message; the scoring queue is first in, first out, so every window
  before it has been scored and decided by then (checked on /metrics afterwards: scored, dropped, throttled).
* **Latency at a fixed rate** (default 1 000 readings/s): from the publish of the reading that completes a
  window to that window's message on ``{prefix}/scores/{device}`` (``publish_scores: true``), p50/p99/max.
* **Start-up**: process start to the retained ``online`` (clean session, nothing queued), and **RSS** of the
  daemon after the saturation run (``VmRSS``).
* **A device sweep** (``--sweep 10,100,1000``) of the saturation run (one daemon, the same total of messages
  spread over more devices): readings/s, windows dropped, RSS, and memory per device from the RSS slope.

``--baseline DIR`` adds a second daemon, the code of another checkout (e.g. main's, ``/work/main``) run with
its own defaults, to every comparison: before/after figures from one run. ``--set KEY=VALUE`` (dotted,
YAML value) overrides a config key of the daemon under test, e.g. ``--set daemon.batch_wait_seconds=0.02``;
``--also LABEL:KEY=VALUE`` adds one more daemon of this code with other settings to every comparison.

    .venv/bin/python bench/e2e.py --model demo-run/model --repeats 3 --json out/e2e.json
    .venv/bin/python bench/e2e.py --model demo-run/model --repeats 3 --baseline ../main   # before/after

Without --model a small bundle is trained first (needs the [train] extra), as bench/throughput.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' private broker
from mosquitto import MosquittoBroker, _free_port

from sensord.bundle import ModelBundle
from sensord.simulator import PumpSimulator
from sensord.sinks import iso

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import train_small

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "e2e/{device}/telemetry"  # what every consumer subscribes to (e2e/+/telemetry)
SESSION_EXPIRY = 3600


@dataclass
class Variant:
    """One daemon under test: its code (a checkout whose ``sensord`` package is imported) and config keys."""

    label: str
    code: Path
    overrides: dict[str, Any] = field(default_factory=dict)


# --- helpers -------------------------------------------------------------------------------------------

def _client(broker: MosquittoBroker, name: str, persistent: bool = False, connect: bool = True) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    if connect:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY if persistent else 0
        c.connect(broker.host, broker.port, keepalive=30, clean_start=not persistent, properties=props)
        c.loop_start()
    return c


def _wait(pred: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            log = Path(str(proc.args[-1]).removesuffix(".yaml") + ".log")  # (see Daemon: name.yaml, name.log)
            tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
            raise SystemExit(f"the daemon exited ({proc.returncode}) while waiting for {what}; its log ends:\n"
                             + "\n".join(tail))
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _merge(doc: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        node = doc
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return doc


def _metric_sums(port: int) -> dict[str, float]:
    """Sums over labels of the few counters a run is checked with."""
    wanted = ("sensord_windows_scored_total", "sensord_windows_dropped_total", "sensord_windows_throttled_total",
              "sensord_messages_received_total", "sensord_readings_rejected_total",
              "sensord_scoring_batch_size_sum", "sensord_scoring_batch_size_count")
    sums = dict.fromkeys(wanted, 0.0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in sums:
                sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


def _mean_batch(sums: dict[str, float]) -> float:
    return sums["sensord_scoring_batch_size_sum"] / max(1.0, sums["sensord_scoring_batch_size_count"])


class Daemon:
    """``sensord run`` as a subprocess (as in production), the given checkout's code, with a bench config."""

    def __init__(self, broker: MosquittoBroker, variant: Variant, model: str, tmp: Path, name: str,
                 devices: int, persistent: bool, scores: bool) -> None:
        self.prefix = f"out-{name}"
        self.metrics_port = _free_port("127.0.0.1")
        doc = {"mqtt": {"host": broker.host, "port": broker.port, "client_id": f"sensord-{name}",
                        "subscriptions": [TOPIC.format(device="+")], "device_topic": TOPIC,
                        "topic_prefix": self.prefix, "publish_scores": scores,
                        "session_expiry_seconds": SESSION_EXPIRY if persistent else 0},
               "metrics": {"port": self.metrics_port},
               "daemon": {"model": model, "state_dir": None, "max_devices": devices + 10}}
        self.path = tmp / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(_merge(doc, variant.overrides)))
        self.variant = variant
        self.log_path = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the process; its start time (perf_counter)."""
        env = {**os.environ, "PYTHONPATH": str(self.variant.code)}
        with self.log_path.open("ab") as log:
            t = time.perf_counter()
            self.proc = subprocess.Popen([sys.executable, "-m", "sensord.cli", "run", "--config", str(self.path)],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=self.variant.code, env=env)
        return t

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Watcher:
    """A subscriber on the daemon's outputs: arrival times of (non-retained) messages by topic."""

    def __init__(self, broker: MosquittoBroker, name: str, topics: list[str],
                 on_body: Callable[[mqtt.MQTTMessage, float], None] | None = None) -> None:
        self.seen: dict[str, list[tuple[float, bytes]]] = {}
        self.on_body = on_body
        self.client = _client(broker, f"watch-{name}", connect=False)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        self.client.subscribe([(t, 0) for t in topics])
        _wait(subscribed.is_set, 10, "the watcher's subscription")

    def _on_message(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        if m.retain:  # stored before this run
            return
        if self.on_body is not None:
            self.on_body(m, now)
        else:
            self.seen.setdefault(m.topic, []).append((now, m.payload))

    def first(self, topic: str, payload: bytes | None = None) -> float | None:
        for t, p in self.seen.get(topic, []):
            if payload is None or p == payload:
                return t
        return None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# --- saturation: a backlog drained by each consumer ------------------------------------------------------

def backlog(devices: int, readings: int, length: int, sentinel: str) -> list[tuple[str, bytes]]:
    """``devices`` x ``readings`` messages, device-interleaved, plus a sentinel device whose first (only)
    window is completed by the very last message: its first ``length - 1`` readings are spread evenly
    through the backlog."""
    sim = PumpSimulator(seed=7).generate(readings)
    t0 = time.time() - readings - 120  # one reading per second per device, ending two minutes ago

    def body(i: int) -> bytes:
        return json.dumps({"ts": t0 + i, "values": dict(zip(sim.channels, np.round(sim.values[i], 5).tolist(),
                                                              strict=True))}).encode()
    bodies = [body(i) for i in range(readings)]
    msgs = [(TOPIC.format(device=f"dev{d}"), bodies[i]) for i in range(readings) for d in range(devices)]
    step = len(msgs) // length
    for k in reversed(range(length - 1)):  # back to front, so the earlier positions stay put
        msgs.insert((k + 1) * step, (TOPIC.format(device=sentinel), bodies[k]))
    msgs.append((TOPIC.format(device=sentinel), bodies[length - 1]))
    return msgs


def publish_all(broker: MosquittoBroker, msgs: list[tuple[str, bytes]]) -> float:
    """Publish at QoS 1 and wait until the broker has acknowledged all; readings/s of the publisher."""
    pub = _client(broker, f"e2e-pub-{time.monotonic_ns()}")
    t = time.perf_counter()
    chunk = 30_000  # acknowledged before the next: paho's message ids wrap at 65 535 (a backlog of 600 000)
    for i in range(0, len(msgs), chunk):
        infos = [pub.publish(topic, body, qos=1) for topic, body in msgs[i:i + chunk]]
        for info in infos:
            info.wait_for_publish(120)
    rate = len(msgs) / (time.perf_counter() - t)
    pub.loop_stop()
    pub.disconnect()
    return rate


def bare_session(broker: MosquittoBroker, cid: str) -> None:
    """Create the bare subscriber's persistent session and subscription (then leave: messages queue)."""
    c = _client(broker, cid, persistent=True, connect=False)
    subscribed = threading.Event()
    c.on_subscribe = lambda *_a: subscribed.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY
    c.connect(broker.host, broker.port, keepalive=30, clean_start=True, properties=props)
    c.loop_start()
    c.subscribe(TOPIC.format(device="+"), qos=1)
    _wait(subscribed.is_set, 10, "the bare subscription")
    c.loop_stop()
    c.disconnect()


def bare_drain(broker: MosquittoBroker, cid: str, count: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "bare_subscriber.py"), broker.host,
                          str(broker.port), cid, TOPIC.format(device="+"), str(count), str(SESSION_EXPIRY)],
                         capture_output=True, text=True, timeout=700, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bare subscriber failed: {out.stderr.strip()}")
    return dict(json.loads(out.stdout))


def daemon_session(daemon: Daemon, broker: MosquittoBroker) -> None:
    """Start the daemon once so the broker holds its persistent session, then stop it (messages then queue)."""
    w = Watcher(broker, f"setup-{daemon.prefix}", [f"{daemon.prefix}/status"])
    try:
        daemon.start()
        _wait(lambda: w.first(f"{daemon.prefix}/status", b"online") is not None, 60, "sensord online",
              daemon.proc)
    finally:
        daemon.stop()
        w.close()


def daemon_drain(daemon: Daemon, broker: MosquittoBroker, count: int, windows: int,
                 sentinel: str) -> dict[str, float]:
    status, done = f"{daemon.prefix}/status", f"{daemon.prefix}/state/{sentinel}"
    w = Watcher(broker, f"drain-{daemon.prefix}-{sentinel}", [status, done])
    try:
        daemon.start()
        assert daemon.proc is not None
        _wait(lambda: w.first(done) is not None, 600, f"the sentinel's window from {daemon.variant.label}",
              daemon.proc)
        t_online, t_done = w.first(status, b"online"), w.first(done)
        assert t_online is not None and t_done is not None
        rss = _rss_mib(daemon.proc.pid)
        sums = _metric_sums(daemon.metrics_port)
    finally:
        daemon.stop()
        w.close()
    return {"rate": count / (t_done - t_online), "rss_mib": rss,
            "scored": sums["sensord_windows_scored_total"], "expected": float(windows),
            "dropped": sums["sensord_windows_dropped_total"] + sums["sensord_windows_throttled_total"],
            "throttled": sums["sensord_windows_throttled_total"],
            "rejected": sums["sensord_readings_rejected_total"], "batch": _mean_batch(sums)}


# --- latency at a fixed rate ------------------------------------------------------------------------------

def latency_run(broker: MosquittoBroker, daemon: Daemon, rate: float, seconds: float, devices: int, length: int,
                seed: int) -> dict[str, float]:
    got: dict[tuple[str, str], float] = {}
    status = f"{daemon.prefix}/status"
    online: list[float] = []

    def on_body(m: mqtt.MQTTMessage, now: float) -> None:
        if m.topic == status:
            if m.payload == b"online":
                online.append(now)
            return
        body = json.loads(m.payload)
        got[(body["device"], body["window_end"])] = now

    w = Watcher(broker, f"lat-{daemon.prefix}", [f"{daemon.prefix}/scores/+", status], on_body)
    pub = _client(broker, f"lat-pub-{daemon.prefix}")
    try:
        t_start = daemon.start()
        _wait(lambda: bool(online), 60, "sensord online", daemon.proc)
        startup = online[0] - t_start
        sim = PumpSimulator(seed=seed).generate(int(rate * seconds / devices) + length)
        t0 = time.time() - len(sim.timestamps) - 60  # synthetic clock: one reading per second per device
        sent: dict[tuple[str, str], float] = {}
        start = time.perf_counter()
        n = 0
        for i in range(len(sim.timestamps)):
            ts = t0 + i
            body = json.dumps({"ts": ts, "values": dict(zip(sim.channels, np.round(sim.values[i], 5).tolist(),
                                                              strict=True))})
            for d in range(devices):
                delay = start + n / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                t = time.perf_counter()
                pub.publish(TOPIC.format(device=f"dev{d}"), body, qos=1)
                if i >= length - 1:
                    sent[(f"dev{d}", iso(ts))] = t  # the daemon's own rendering of window_end
                n += 1
        achieved = n / (time.perf_counter() - start)
        _wait(lambda: len(got) >= len(sent), 60, f"{len(sent)} scores (have {len(got)})", daemon.proc)
        lat = np.array([got[k] - sent[k] for k in sent]) * 1000.0
        rss = _rss_mib(daemon.proc.pid) if daemon.proc is not None else float("nan")
        sums = _metric_sums(daemon.metrics_port)
        dropped = sums["sensord_windows_dropped_total"] + sums["sensord_windows_throttled_total"]
        return {"batch": _mean_batch(sums), "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                "max": float(lat.max()), "windows": float(len(lat)), "rate": achieved, "startup": startup,
                "rss_mib": rss, "dropped": dropped}
    finally:
        pub.loop_stop()
        daemon.stop()
        w.close()


# --- the run ----------------------------------------------------------------------------------------------

def med(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def saturation(broker: MosquittoBroker, variants: list[Variant], model: str, tmp: Path, devices: int,
               readings: int, length: int, repeats: int, bare: bool, tag: str) -> dict[str, list[dict[str, float]]]:
    """Interleaved backlog drains: every repeat publishes one backlog, queued for every consumer's session."""
    daemons = {v.label: Daemon(broker, v, model, tmp, f"{tag}-{v.label}", devices, persistent=True, scores=False)
               for v in variants}
    bare_id = f"bare-{tag}"
    if bare:
        bare_session(broker, bare_id)
    for d in daemons.values():
        daemon_session(d, broker)
    consumers = (["bare"] if bare else []) + list(daemons)
    results: dict[str, list[dict[str, float]]] = {c: [] for c in consumers}
    for rep in range(repeats):
        sentinel = f"zend{tag}{rep}"
        msgs = backlog(devices, readings, length, sentinel)
        windows = devices * (readings - length + 1) + 1
        pub_rate = publish_all(broker, msgs)
        order = consumers[rep % len(consumers):] + consumers[:rep % len(consumers)]  # rotate who goes first
        for c in order:
            if c == "bare":
                r = bare_drain(broker, bare_id, len(msgs))
            else:
                r = daemon_drain(daemons[c], broker, len(msgs), windows, sentinel)
            r["publisher"] = pub_rate
            results[c].append(r)
            detail = (f"  scored {r['scored']:.0f}/{r['expected']:.0f} dropped {r['dropped']:.0f} "
                      f"(throttled {r['throttled']:.0f}) RSS {r['rss_mib']:.0f} MiB "
                      f"batch {r['batch']:.1f}") if c != "bare" else ""
            print(f"  [{tag} {rep + 1}/{repeats}] {c:>10}: {r['rate']:8.0f} readings/s{detail}", file=sys.stderr,
                  flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--devices", type=int, default=20, help="devices for the ratio and the latency")
    ap.add_argument("--messages", type=int, default=30_000, help="backlog size of one saturation run")
    ap.add_argument("--rate", type=float, default=1000.0, help="readings/s of the latency runs (all devices)")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of one latency run")
    ap.add_argument("--sweep", default="10,100,1000", help="device counts of the sweep ('' = none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", help="another checkout whose daemon (with its own defaults) runs beside this one")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override of the daemon under test (dotted key, YAML value)")
    ap.add_argument("--also", action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
                    help="one more daemon of this code with these overrides, e.g. "
                    "wait20:daemon.batch_wait_seconds=0.02")
    ap.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                    help="the fixed-rate latency runs (--no-latency: saturation and sweep only)")
    ap.add_argument("--saturation", action=argparse.BooleanOptionalAction, default=True,
                    help="the backlog drains against the bare subscriber (--no-saturation: latency and sweep only)")
    ap.add_argument("--json", help="also write every run's figures here")
    args = ap.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    variants = [Variant("this", ROOT, overrides)]
    for spec in args.also:
        label, _, sets = spec.partition(":")
        variants.append(Variant(label, ROOT, {k: yaml.safe_load(v) for k, v in (x.split("=", 1)
                                                                               for x in sets.split(",") if x)}))
    if args.baseline:
        variants.append(Variant("baseline", Path(args.baseline).resolve()))
    sweep = [int(x) for x in args.sweep.split(",") if x]
    report: dict[str, Any] = {"args": vars(args), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="sensord-e2e-") as tmpdir:
        tmp = Path(tmpdir)
        model = args.model
        if model is None:
            train_small(tmp)
            model = str(tmp / "model")
        model = str(Path(model).resolve())  # the daemons run in their own checkout
        length = ModelBundle.load(model).window_length
        # Backlogs larger than the helper broker's default per-client queue (100 000) must stay whole.
        with MosquittoBroker(extra_config="max_queued_messages 0\n") as broker:
            readings = max(2 * length, args.messages // args.devices)
            sat = saturation(broker, variants, model, tmp, args.devices, readings, length, args.repeats, True,
                             "sat") if args.saturation else {}
            lat: dict[str, list[dict[str, float]]] = {v.label: [] for v in variants}
            for rep in range(args.repeats if args.latency else 0):
                for v in variants:  # interleaved
                    d = Daemon(broker, v, model, tmp, f"lat{rep}-{v.label}", args.devices, persistent=False,
                               scores=True)
                    lat[v.label].append(latency_run(broker, d, args.rate, args.seconds, args.devices, length, rep))
                    r = lat[v.label][-1]
                    print(f"  [latency {rep + 1}/{args.repeats}] {v.label:>10}: p50 {r['p50']:.2f} ms "
                          f"p99 {r['p99']:.2f} ms batch {r['batch']:.1f}", file=sys.stderr, flush=True)
            sw: dict[int, dict[str, float]] = {}
            for n in sweep:
                per = max(2 * length, args.messages // n)
                runs = saturation(broker, variants[:1], model, tmp, n, per, length, 1, False, f"sw{n}")
                sw[n] = runs["this"][0] | {"devices": float(n), "messages": float(n * per + length)}
    report |= {"saturation": sat, "latency": lat, "sweep": {str(k): v for k, v in sw.items()},
               "load_after": os.getloadavg()}
    load = f"load average {report['load_before'][0]:.1f} before, {report['load_after'][0]:.1f} after (2 cores)"
    print(f"sensord end-to-end through a private Mosquitto; {args.devices} devices, window {length}, "
          f"medians of {args.repeats} interleaved repeats; {load}")
    if args.saturation:
        bare = med(sat["bare"])
        print(f"\nsaturation: a backlog of {args.devices} x {readings} readings (+ sentinel) drained from a "
              f"persistent session, QoS 1")
        print(f"  {'consumer':<28} {'readings/s':>11} {'x bare':>7} {'RSS MiB':>8} {'dropped':>8} {'batch':>6}")
        print(f"  {'bare paho + json.loads':<28} {bare['rate']:11.0f} {1.0:7.2f} {bare['rss_mib']:8.0f} {'-':>8} "
              f"{'-':>6}")
        for v in variants:
            m = med(sat[v.label])
            print(f"  {'sensord run (' + v.label + ')':<28} {m['rate']:11.0f} {m['rate'] / bare['rate']:7.2f} "
                  f"{m['rss_mib']:8.0f} {m['dropped']:8.0f} {m['batch']:6.1f}")
    print(f"\nlatency at {args.rate:.0f} readings/s for {args.seconds:.0f} s, publish of the reading that completes a "
          f"window -> its message on {{prefix}}/scores/{{device}}; start-up = process start -> retained online")
    print(f"  {'daemon':<28} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'start-up s':>10} {'batch':>6} "
          f"{'sent/s':>7} {'dropped':>7} {'RSS MiB':>7}")
    for v in variants if args.latency else []:
        m = med(lat[v.label])
        print(f"  {'sensord run (' + v.label + ')':<28} {m['p50']:7.2f} {m['p99']:7.2f} {m['max']:7.1f} "
              f"{m['startup']:10.2f} {m['batch']:6.1f} {m['rate']:7.0f} {m['dropped']:7.0f} {m['rss_mib']:7.0f}")
    if sw:
        print("\ndevice sweep (sensord run, this code; one run each): the same kind of backlog over more devices")
        print(f"  {'devices':>8} {'messages':>9} {'readings/s':>11} {'windows scored':>15} {'dropped':>8} "
              f"{'RSS MiB':>8}")
        for n, r in sw.items():
            print(f"  {n:8d} {r['messages']:9.0f} {r['rate']:11.0f} {r['scored']:9.0f}/{r['expected']:<5.0f} "
                  f"{r['dropped']:8.0f} {r['rss_mib']:8.1f}")
        if len(sw) > 1:
            lo, hi = min(sw), max(sw)
            per_dev = (sw[hi]["rss_mib"] - sw[lo]["rss_mib"]) * 1024 / (hi - lo)
            print(f"  memory per device (RSS slope {lo} -> {hi} devices): {per_dev:.1f} KiB")
            report["kib_per_device"] = per_dev
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
