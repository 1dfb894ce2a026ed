"""End to end (issue 14): one unlucky reading, device id or neighbour never silences a device or the daemon.

Each test runs ``sensord run`` as a real subprocess against a private Mosquitto (the session broker, with
topics of its own, or a broker of the test's own) and replays one of the hostile or unlucky inputs that used
to take monitoring away silently: a timestamp from the future, values near the float32 maximum, a device id
with NUL or a newline, two daemons with the default client id, idle connections to ``/metrics``, start-up
mistakes, a flooding neighbour, a corrupted model that still loads. Every MQTT payload the daemon publishes
is parsed as strict JSON (NaN and Infinity refused).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from broker import MosquittoBroker, MqttRecorder, publish
from e2e_support import (
    ROOT,
    TINY_DETECTOR,
    TINY_WINDOW,
    DaemonProcess,
    QosPublisher,
    TrainedBundle,
    daemon_config,
    merge,
    stop_process,
    tamper_bundle,
    wait_until,
    write_yaml,
)

from sensord.dataio import Series

pytestmark = pytest.mark.e2e

W = TINY_WINDOW
DETECTOR = TINY_DETECTOR
YEAR = 365 * 86400.0


def strict_json(payload: bytes) -> Any:
    """Parse as JSON a strict consumer accepts: NaN / Infinity raise."""
    def refuse(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(payload, parse_constant=refuse)


@dataclass(frozen=True)
class Models:
    bundle: Path
    series: Series  # healthy 1 Hz readings of 2024 (the labelled run's healthy lead)


@pytest.fixture(scope="module")
def models(tiny_bundle: TrainedBundle) -> Models:
    return Models(tiny_bundle.bundle, tiny_bundle.labelled.slice(0, 500))


@dataclass
class Env:
    broker: MosquittoBroker
    root: str
    tmp: Path
    models: Models
    rec: MqttRecorder
    pub: QosPublisher
    daemons: list[DaemonProcess] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"{self.root}/sensord"

    def topic(self, device: str) -> str:
        return f"{self.root}/sensors/{device}/telemetry"

    def config(self, **over: Any) -> dict[str, Any]:
        base = daemon_config(self.broker, self.models.bundle, window=W, detector=DETECTOR,
                             client_id=f"sensord-{uuid.uuid4().hex[:10]}",
                             subscriptions=[self.topic("+")], device_topic=self.topic("{device}"),
                             topic_prefix=self.prefix, reconnect_min_seconds=1, reconnect_max_seconds=1)
        return merge(base, over)

    def spawn(self, doc: dict[str, Any], name: str = "sensord") -> DaemonProcess:
        d = DaemonProcess(self.tmp, name, doc)
        self.daemons.append(d)
        return d

    def wait_online(self, d: DaemonProcess, prefix: str | None = None) -> None:
        status = f"{prefix or self.prefix}/status"

        def online() -> bool:
            assert d.alive(), f"{d.name} exited with {d.proc.returncode}:\n{d.log()}"
            return any(m.topic == status and m.payload == b"online" for m in self.rec.messages())
        try:
            wait_until(online, 20, f"{d.name} online")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{d.log()[-3000:]}") from None

    def start(self, name: str = "sensord", **over: Any) -> DaemonProcess:
        d = self.spawn(self.config(**over), name)
        self.wait_online(d)
        return d

    def reading(self, i: int, ts: Any = None, **over: Any) -> dict[str, Any]:
        s = self.models.series
        body: dict[str, Any] = {"values": {ch: float(s.values[i, j]) for j, ch in enumerate(s.channels)}}
        body["ts"] = float(s.timestamps[i]) if ts is None else ts
        body["values"].update(over)
        return body

    def send(self, device: str, body: Any, topic: str | None = None) -> None:
        self.pub.send_raw(topic or self.topic(device), json.dumps(body))

    def send_rows(self, device: str, start: int, stop: int) -> None:
        for i in range(start, stop):
            self.send(device, self.reading(i))

    def payloads(self) -> list[Any]:
        """Every payload the daemons published under the prefix, parsed strictly (the test fails on NaN)."""
        return [(m.topic, strict_json(m.payload)) for m in self.rec.messages(self.prefix + "/")
                if m.topic != f"{self.prefix}/status"]


@pytest.fixture
def env(broker: MosquittoBroker, topic_root: str, tmp_path: Path, models: Models) -> Iterator[Env]:
    rec = MqttRecorder(broker.host, broker.port, f"{topic_root}/sensord/#").start()
    pub = QosPublisher(broker)
    e = Env(broker, topic_root, tmp_path, models, rec, pub)
    try:
        yield e
    finally:
        for d in e.daemons:
            d.stop()
        pub.close()
        rec.stop()


# -- 1. timestamps --------------------------------------------------------------------------------

def test_future_timestamps_retained_readings_microseconds_and_clock_jumps_never_lock_a_device_out(
        env: Env) -> None:
    now = time.time()
    # A reading a year ahead, published retained before the daemon starts (replayed on every restart).
    publish(env.broker.host, env.broker.port, env.topic("pump-r"), json.dumps(env.reading(0, ts=now + YEAR)),
            retain=True)
    d = env.start()
    try:
        # pump-f: one reading from a glitched gateway clock, a year ahead, in the middle of its stream.
        env.send_rows("pump-f", 0, 20)
        env.send("pump-f", env.reading(20, ts=now + YEAR))
        env.send_rows("pump-f", 21, 60)
        # pump-r: streams normally after its retained future reading.
        env.send_rows("pump-r", 0, 30)
        # pump-u: microsecond timestamps.
        for i in range(20):
            env.send("pump-u", env.reading(i, ts=int(round(float(env.models.series.timestamps[i]) * 1e6))))
        # pump-j: one reading without a timestamp (arrival time, years after its own clock), then its own clock.
        env.send_rows("pump-j", 0, 15)
        env.send("pump-j", {"values": env.reading(15)["values"]})
        env.send_rows("pump-j", 16, 40)

        n = 5  # daemon.clock_resync_after's default
        d.wait_metric("sensord_windows_scored_total", 60 - 1 - W + 1, device="pump-f")
        d.wait_metric("sensord_windows_scored_total", 30 - W + 1, device="pump-r")
        d.wait_metric("sensord_windows_scored_total", 20 - W + 1, device="pump-u")
        d.wait_metric("sensord_windows_scored_total", (15 - W + 1) + (40 - 16 - (n - 1)) - W + 1, device="pump-j")
        assert d.metric("sensord_readings_rejected_total", reason="future_timestamp") == 1
        assert d.metric("sensord_messages_rejected_total", reason="retained") == 1
        assert d.metric("sensord_readings_rejected_total", reason="out_of_order") == n - 1
        assert d.metric("sensord_clock_resyncs_total") == 1
        log = d.log()
        assert "reading rejected reason=future_timestamp device=pump-f" in log
        assert sum("clock jumped back" in ln for ln in log.splitlines()) == 1
        env.payloads()
    finally:
        publish(env.broker.host, env.broker.port, env.topic("pump-r"), b"", retain=True)  # clear the retained


# -- 2. never NaN ---------------------------------------------------------------------------------

def test_values_near_float32_max_raise_an_alert_with_finite_scores_in_strict_json(env: Env) -> None:
    d = env.start(mqtt={"publish_scores": True})
    env.send_rows("pump-n", 0, 20)
    for i in range(20, 30):  # 3e38: a common "invalid" marker; 1e39 overflows float32
        env.send("pump-n", env.reading(i, **{ch: (3e38 if i % 2 else 1e39) for ch in env.models.series.channels}))
    d.wait_metric("sensord_windows_scored_total", 30 - W + 1, device="pump-n")
    env.rec.wait_for(lambda m: m.topic == f"{env.prefix}/scores/pump-n" and b'"window_end"' in m.payload
                     and len(env.rec.messages(f"{env.prefix}/scores/pump-n")) == 30 - W + 1)
    alert = [b for t, b in env.payloads() if t == f"{env.prefix}/alerts/pump-n"]
    assert [a["state"] for a in alert] == ["raised"], d.log()
    assert alert[0]["score"] > 1
    scores = [b for t, b in env.payloads() if t == f"{env.prefix}/scores/pump-n"]
    assert len(scores) == 30 - W + 1 and all(isinstance(b["score"], float) for b in scores)
    assert d.metric("sensord_values_clipped_total") == 10
    error = d.metric("sensord_reconstruction_error", device="pump-n")
    assert error is not None and error == error and error < float("inf")  # not NaN, finite


# -- 3. device ids --------------------------------------------------------------------------------

def test_device_id_with_nul_or_newline_is_rejected_and_the_neighbour_keeps_being_scored(env: Env) -> None:
    d = env.start(mqtt={"device_field": "machine", "device_topic": None})
    plant = env.topic("gateway1")
    for i in range(40):
        env.send("", {"machine": "healthy", **env.reading(i)}, topic=plant)
        if i in (5, 15, 25):
            env.send("", [{"machine": "nul\x00id", **env.reading(i)},
                          {"machine": "evil\nCRITICAL sensord: forged line", **env.reading(i)},
                          {"machine": "wild/+/#", **env.reading(i)}], topic=plant)
    d.wait_metric("sensord_windows_scored_total", 40 - W + 1, device="healthy")
    assert d.metric("sensord_readings_rejected_total", reason="bad_device_id") == 9
    assert d.metric("sensord_mqtt_reconnects_total") == 0
    assert d.metric("sensord_devices") == 1
    log = d.log()
    assert "mqtt disconnected" not in log, log
    assert not any(ln.startswith("CRITICAL") for ln in log.splitlines()), log
    assert "reading rejected reason=bad_device_id" in log
    want = {f"{env.prefix}/state/healthy", f"{env.prefix}/availability/healthy"}
    # The counter moves when the window is decided; its state publish reaches the broker a moment later.
    wait_until(lambda: want <= {t for t, _ in env.payloads()}, 10, "the healthy device's state")
    assert {t for t, _ in env.payloads()} == want


# -- 4. client ids ----------------------------------------------------------------------------------

def test_two_daemons_with_the_default_client_id_both_score(env: Env) -> None:
    docs = []
    for name in ("first", "second"):
        doc = env.config(mqtt={"topic_prefix": f"{env.prefix}/{name}"})
        del doc["mqtt"]["client_id"]  # the default, as a new user would run it
        docs.append(doc)
    first, second = env.spawn(docs[0], "first"), env.spawn(docs[1], "second")
    env.wait_online(first, f"{env.prefix}/first")
    env.wait_online(second, f"{env.prefix}/second")
    env.send_rows("pump-c", 0, 30)
    for d in (first, second):
        d.wait_metric("sensord_windows_scored_total", 30 - W + 1, device="pump-c")
        assert d.metric("sensord_mqtt_session_takeovers_total") == 0
        assert d.metric("sensord_mqtt_reconnects_total") == 0
    ids = [d.wait_log("as client id").rsplit(" ", 1)[1] for d in (first, second)]
    assert ids[0] != ids[1] and all(i.startswith("sensord-") for i in ids)


def test_same_client_id_twice_is_a_clear_error_with_a_metric(env: Env) -> None:
    cid = f"sensord-dup-{uuid.uuid4().hex[:6]}"
    first = env.spawn(env.config(mqtt={"client_id": cid, "topic_prefix": f"{env.prefix}/a"}), "first")
    env.wait_online(first, f"{env.prefix}/a")
    second = env.spawn(env.config(mqtt={"client_id": cid, "topic_prefix": f"{env.prefix}/b"}), "second")
    line = first.wait_log("session taken over")
    assert "ERROR" in line and f"'{cid}'" in line and "another client" in line, line
    wait_until(lambda: (first.metric("sensord_mqtt_session_takeovers_total") or 0) >= 1, 15, "takeover counted")
    second.stop()


# -- 5. /metrics ------------------------------------------------------------------------------------

def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_metrics_connections_time_out_and_are_capped(env: Env) -> None:
    cap = 4
    d = env.start(metrics={"timeout_seconds": 2.0, "max_connections": cap})
    baseline = open_fds(d.pid)
    socks = []
    try:
        for _ in range(60):  # idle: connect, send nothing
            socks.append(socket.create_connection(("127.0.0.1", d.metrics_port), timeout=10))
            assert open_fds(d.pid) <= baseline + cap + 1  # +1: one being accepted and closed
        for s in socks:  # every one is closed by the daemon: at once over the cap, after the timeout within it
            s.settimeout(30)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in socks:
            s.close()
    assert (d.metric("sensord_metrics_connections_rejected_total") or 0) >= 1
    assert d.alive()
    # Broker traffic and reloads still work: nothing ran out of file descriptors.
    env.send_rows("pump-m", 0, 20)
    d.wait_metric("sensord_windows_scored_total", 20 - W + 1, device="pump-m")


# -- 6. start-up mistakes, early signals, connection problems ---------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sensord.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def unpreparable_bundle(src: Path, dst: Path) -> Path:
    """A copy whose flatbuffer loads but whose first FULLY_CONNECTED fails to prepare; checksum recomputed."""
    from tensorflow.lite.tools import flatbuffer_utils

    from sensord.bundle import sha256_of
    shutil.copytree(src, dst)
    tfl = dst / "model.tflite"
    model = flatbuffer_utils.read_model(str(tfl))
    op = next(o for o in model.subgraphs[0].operators
              if model.operatorCodes[o.opcodeIndex].builtinCode == 9)  # FULLY_CONNECTED
    op.inputs = [op.inputs[1], op.inputs[0], op.inputs[2]]  # weights and input swapped
    flatbuffer_utils.write_model(model, str(tfl))
    meta = json.loads((dst / "bundle.json").read_text())
    meta["tflite_sha256"] = sha256_of(tfl)
    (dst / "bundle.json").write_text(json.dumps(meta))
    return tfl


@pytest.mark.parametrize("case", ["missing_ca_file", "unpreparable_model"])
def test_start_up_mistakes_exit_78_with_one_line(env: Env, case: str) -> None:
    doc = env.config()
    if case == "missing_ca_file":
        missing = env.tmp / "no-such-ca.pem"
        doc["mqtt"]["tls"] = {"ca_file": str(missing)}
        expect = ["config error", "mqtt.tls.ca_file", str(missing)]
    else:
        tfl = unpreparable_bundle(env.models.bundle, env.tmp / "model-bad")
        doc["daemon"]["model"] = str(env.tmp / "model-bad")
        expect = ["model error", str(tfl), "failed to prepare"]
    cfg = env.tmp / "bad.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    res = run_cli("run", "--config", str(cfg))
    # LiteRT's C++ runtime prints its own INFO line when an interpreter is made; not ours to silence.
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("INFO: Created TensorFlow")]
    assert res.returncode == 78, res.stderr
    assert len(lines) == 1 and lines[0].startswith("sensord: "), res.stderr
    for part in expect:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"


def caught_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


def test_sighup_while_still_starting_does_not_kill_the_daemon(env: Env) -> None:
    """The config is a FIFO the test serves only after a SIGHUP: the daemon is still reading its config then."""
    text = yaml.safe_dump(env.config())
    fifo = env.tmp / "sensord.yaml"
    os.mkfifo(fifo)
    release, stop = threading.Event(), threading.Event()

    def serve() -> None:  # every open of the FIFO (start-up, then the reload) reads the config
        release.wait()
        while not stop.is_set():
            with contextlib.suppress(OSError), open(fifo, "w") as f:  # BrokenPipe from the teardown's reader
                f.write(text)
            time.sleep(0.05)
    server = threading.Thread(target=serve, daemon=True)
    server.start()
    log = open(env.tmp / "early.log", "wb")  # noqa: SIM115 - closed in the finally below, after the daemon
    env_vars = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    proc = subprocess.Popen([sys.executable, "-m", "sensord.cli", "run", "--config", str(fifo)], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env_vars)
    try:
        wait_until(lambda: proc.poll() is not None or caught_signals(proc.pid) & (1 << (signal.SIGHUP - 1)), 20,
                   "a SIGHUP handler while the daemon waits for its config")
        assert proc.poll() is None
        proc.send_signal(signal.SIGHUP)
        release.set()
        wait_until(lambda: proc.poll() is not None or b"reloaded: model" in (env.tmp / "early.log").read_bytes(),
                   30, "the daemon to start and apply the early SIGHUP")
        assert proc.poll() is None, (env.tmp / "early.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        stop.set()
        stop_process(proc)
        log.close()
        with contextlib.suppress(OSError):  # unblock the server thread's open()
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        server.join(5)


def test_plain_client_on_a_tls_port_and_a_wrong_password_are_each_logged_once_clearly(env: Env,
                                                                                       tmp_path: Path) -> None:
    from test_mqtt_connection_e2e import broker_tool, make_ca, make_server_cert
    pki = tmp_path / "pki"
    pki.mkdir()
    ca_key, ca_crt = make_ca(pki, "ca")
    key, crt = make_server_cert(pki, ca_key, ca_crt)
    passwd = tmp_path / "passwd"
    subprocess.run([broker_tool("mosquitto_passwd"), "-b", "-c", str(passwd), "sensord", "s3cret"], check=True,
                   capture_output=True)
    with MosquittoBroker(tls_cafile=ca_crt, tls_certfile=crt, tls_keyfile=key) as tls_broker, \
            MosquittoBroker(password_file=passwd) as auth_broker:
        debug = {"logging": {"level": "DEBUG"}}  # to see the retries
        plain = env.spawn(merge(env.config(**debug), {"mqtt": {"port": tls_broker.port}}), "plain")
        wrong = env.spawn(merge(env.config(**debug), {"mqtt": {"port": auth_broker.port, "username": "sensord",
                                                               "password": "wrong"}}), "wrong")
        line = plain.wait_log("without answering CONNECT")
        assert "ERROR" in line and f":{tls_broker.port}" in line and "mqtt.tls" in line, line
        line = wrong.wait_log("refused")
        assert "ERROR" in line and "check mqtt.username and the password (mqtt.password" in line, line
        for d in (plain, wrong):  # three retries later, still that one line each
            wait_until(lambda d=d: d.log().count("(again)") >= 3, 20, f"{d.name} to retry three times")
            assert d.alive()
            errors = [ln for ln in d.log().splitlines() if " ERROR " in ln or ln.startswith("ERROR")]
            assert len(errors) == 1, d.log()


# -- 7. a flooding neighbour, payload size -------------------------------------------------------------

def test_a_flooding_device_leaves_room_for_its_neighbour_and_large_payloads_are_refused(env: Env) -> None:
    # A slow scorer (it waits up to 0.3 s to fill a batch) behind a small queue: the flood overflows it.
    d = env.start(mqtt={"device_field": "machine", "device_topic": None},
                  daemon={"queue_size": 40, "batch_wait_seconds": 0.3}, scoring={"batch_max": 64})
    gateway = env.topic("gateway1")
    series = env.models.series
    t0 = float(series.timestamps[0])
    env.send("", [{"machine": "light", **env.reading(0)}], topic=gateway)
    light = 40
    n = len(series)

    def there_and_back(i: int) -> int:
        """Row i of a walk through the series and back: no jump from its last row to its first, which the
        temperatures' baselines would show as a fault (an alert at each wrap slows the scorer)."""
        i %= 2 * n - 2
        return i if i < n else 2 * n - 2 - i

    for k in range(1, light):
        flood = [{"machine": "flood", **env.reading(there_and_back(k * 200 + j), ts=t0 + k * 200 + j)}
                 for j in range(200)]
        env.send("", [*flood, {"machine": "light", **env.reading(k)}], topic=gateway)
    try:
        d.wait_metric("sensord_windows_scored_total", light - W + 1, device="light", timeout=30)
    except AssertionError as exc:  # where did light's windows go? (seen once in CI: 29 of 31, not reproduced)
        counts = {k: v for k, v in d.metrics().items() if k[0] in (
            "sensord_windows_throttled_total", "sensord_windows_dropped_total", "sensord_messages_received_total",
            "sensord_messages_rejected_total", "sensord_readings_rejected_total")}
        raise AssertionError(f"{counts}\n{exc}") from None
    assert (d.metric("sensord_windows_throttled_total", device="flood") or 0) > 0
    assert d.metric("sensord_windows_dropped_total") == 0
    # A payload over mqtt.max_payload_bytes (64 kB) is refused unparsed; the daemon goes on.
    big = [{"machine": "light", **env.reading(i)} for i in range(400)]
    assert len(json.dumps(big)) > 65536
    env.send("", big, topic=gateway)
    d.wait_metric("sensord_messages_rejected_total", 1, reason="too_large")
    assert d.alive()


# -- 8. a corrupted model that still loads -------------------------------------------------------------

def test_a_model_with_tampered_weights_and_a_recomputed_checksum_is_refused_at_reload_and_start(env: Env) -> None:
    d = env.start()
    good_id = d.model_info()["model_id"]
    tfl = tamper_bundle(env.models.bundle, env.tmp / "model-tampered")
    doc = merge(d.doc, {"daemon": {"model": str(env.tmp / "model-tampered")}})
    write_yaml(d.cfg_path, doc)
    d.proc.send_signal(signal.SIGHUP)
    line = d.wait_log("reload refused")
    assert "ERROR" in line and str(tfl) in line and "reference windows" in line, line
    assert d.model_info()["model_id"] == good_id
    env.send_rows("pump-t", 0, 20)
    d.wait_metric("sensord_windows_scored_total", 20 - W + 1, device="pump-t")
    res = run_cli("run", "--config", str(d.cfg_path))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("INFO: Created TensorFlow")]
    assert res.returncode == 78 and len(lines) == 1, res.stderr
    assert "model error" in lines[0] and "reference windows" in lines[0], lines[0]
