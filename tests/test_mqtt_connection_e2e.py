"""End to end: the daemon's broker connection against real, private Mosquitto variants.

Every test starts its own ``mosquitto`` (never the system broker on
127.0.0.1:1883) and ``sensord run`` as a real subprocess: a broker restart on
the same port (reconnect, resubscribe, ``online`` again), username/password
authentication, MQTT 3.1.1, TLS with a throwaway CA made with the ``openssl``
command line, and payload variants (device id from a payload field, JSON array
batches, the ``max_devices`` cap). One tiny bundle is trained per module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from broker import MosquittoBroker, MqttRecorder
from sensord.config import config_from_dict
from sensord.dataio import Series, load_csv
from sensord.simulator import simulate
from sensord.sinks import iso

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
W = 10
DETECTOR = {"raise_after": 2, "clear_after": 5}
TRAIN = {
    "window": {"length": W},
    "model": {"kind": "dense", "encoder_units": [16], "latent_units": 4},
    "training": {"epochs": 15, "patience": 5, "min_relative_scale": 0.0},
    "threshold": {"method": "max_factor", "factor": 1.5},
    "detector": DETECTOR,
}
PREFIX = "sensord"  # every test has a broker of its own, so plain topics do not collide
STATUS = f"{PREFIX}/status"


# -- module fixture: one tiny bundle ------------------------------------------------------------

@dataclass(frozen=True)
class Models:
    bundle: Path
    stream: Series  # healthy 1 Hz readings (the labelled run's healthy lead) to publish


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    from sensord.training import train_bundle

    root = tmp_path_factory.mktemp("mqtt-e2e")
    healthy_csv, labelled_csv = simulate(root / "sim", seconds=1200)
    cfg = config_from_dict(TRAIN)
    train_bundle(load_csv(healthy_csv, cfg.data), cfg, root / "model")
    labelled = load_csv(labelled_csv, cfg.data, require_labels=True)
    lead = int(labelled.labels.argmax())  # the first faulty row: everything before is healthy
    assert lead >= 200, lead
    return Models(root / "model", labelled.slice(0, 200))


# -- helpers ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass(frozen=True)
class Access:
    """How a test client reaches a broker: credentials and/or the CA to verify its TLS certificate."""

    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None

    def apply(self, client: mqtt.Client) -> None:
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.ca_file is not None:
            client.tls_set(ca_certs=str(self.ca_file), cert_reqs=ssl.CERT_REQUIRED)


def recorder(broker: MosquittoBroker, topic: str, access: Access = Access()) -> MqttRecorder:
    rec = MqttRecorder(broker.host, broker.port, topic)
    access.apply(rec.client)
    return rec.start()


def retained(broker: MosquittoBroker, topic: str, access: Access = Access()) -> bytes:
    """What a consumer subscribing now gets on ``topic``: it must be a retained message."""
    rec = recorder(broker, topic, access)
    try:
        (m, *_) = rec.wait_for(lambda m: m.topic == topic, timeout=5)
    finally:
        rec.stop()
    assert m.retain, f"{topic} is not retained"
    return m.payload


class Streamer:
    """One paho client publishing QoS 1 and waiting for each PUBACK (so nothing is dropped)."""

    def __init__(self, broker: MosquittoBroker, access: Access = Access()) -> None:
        self.sent = 0
        self._connected = threading.Event()
        self._rc: list[Any] = []
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"e2e-pub-{uuid.uuid4().hex[:10]}")
        access.apply(self.client)

        def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            self._rc.append(rc)
            self._connected.set()
        self.client.on_connect = on_connect
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(10), "publisher could not connect"
        assert not self._rc[0].is_failure, f"publisher refused: {self._rc[0]}"

    def send_raw(self, topic: str, payload: bytes | str) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published(), f"publish to {topic} not acknowledged"
        self.sent += 1

    def send_rows(self, topic: str, series: Series, start: int, stop: int, **extra: Any) -> None:
        for i in range(start, stop):
            self.send_raw(topic, json.dumps({**extra, **reading(series, i)}))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def reading(series: Series, i: int, flat: bool = False) -> dict[str, Any]:
    values = {ch: float(series.values[i, j]) for j, ch in enumerate(series.channels)}
    return {"ts": float(series.timestamps[i]), **(values if flat else {"values": values})}


def telemetry(device: str) -> str:
    return f"sensors/{device}/telemetry"


class DaemonProcess:
    """``python -m sensord.cli run`` with its own config, log file and metrics port."""

    def __init__(self, tmp: Path, name: str, doc: dict[str, Any]) -> None:
        self.name = name
        self.doc = doc
        self.cfg_path = tmp / f"{name}.yaml"
        self.cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.log_path = tmp / f"{name}.log"
        self.metrics_port = int(doc["metrics"]["port"])
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "sensord.cli", "run", "--config", str(self.cfg_path)],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        return out

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics().get((name, tuple(sorted(labels.items()))))

    def wait_metrics_up(self, timeout: float = 20.0) -> None:
        def up() -> bool:
            assert self.alive(), f"{self.name} exited ({self.proc.returncode}); log:\n{self.log()}"
            try:
                self.metrics()
                return True
            except (urllib.error.URLError, ConnectionError):
                return False
        wait_until(up, timeout, f"{self.name}'s metrics endpoint")

    def wait_metric(self, name: str, value: float, timeout: float = 15.0, **labels: str) -> None:
        last: list[float | None] = [None]

        def check() -> bool:
            assert self.alive(), f"{self.name} exited ({self.proc.returncode}); log:\n{self.log()}"
            last[0] = self.metric(name, **labels)
            return last[0] == value
        try:
            wait_until(check, timeout, f"{name}{labels} == {value}")
        except AssertionError as exc:
            raise AssertionError(f"{exc} (last value {last[0]}); {self.name} log:\n{self.log()[-3000:]}") from None

    def wait_log(self, text: str, timeout: float = 15.0) -> str:
        """Wait until a log line contains ``text``; return that line."""
        def find() -> str | None:
            return next((ln for ln in self.log().splitlines() if text in ln), None)
        try:
            return wait_until(find, timeout, f"{text!r} in {self.name}'s log")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{self.log()[-3000:]}") from None

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture
def daemons(tmp_path: Path, models: Models) -> Iterator[Callable[..., DaemonProcess]]:
    """``spawn(broker, name, **config overrides)`` starts a daemon; all are stopped at the end."""
    started: list[DaemonProcess] = []

    def spawn(broker: MosquittoBroker, name: str = "sensord", **over: Any) -> DaemonProcess:
        base = {
            "window": {"length": W},
            "detector": DETECTOR,
            "mqtt": {
                "host": broker.host, "port": broker.port,
                "client_id": f"sensord-{name}-{uuid.uuid4().hex[:8]}", "keepalive": 5,
                "subscriptions": [telemetry("+")],
                "device_topic": telemetry("{device}"),
                "topic_prefix": PREFIX,
                "reconnect_min_seconds": 0.2, "reconnect_max_seconds": 1.0,
            },
            "metrics": {"host": "127.0.0.1", "port": free_port()},
            "daemon": {"model": str(models.bundle)},
            "logging": {"level": "INFO"},
        }
        d = DaemonProcess(tmp_path, name, merge(base, over))
        started.append(d)
        return d

    yield spawn
    for d in started:
        d.stop()


def wait_online(d: DaemonProcess, rec: MqttRecorder, topic: str = STATUS, timeout: float = 20.0) -> None:
    """Wait for the daemon's ``online`` announcement (sent after its subscriptions are in place)."""
    def online() -> bool:
        assert d.alive(), f"{d.name} exited with {d.proc.returncode}:\n{d.log()}"
        return any(m.topic == topic and m.payload == b"online" for m in rec.messages())
    try:
        wait_until(online, timeout, f"{d.name} online")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; log:\n{d.log()}") from None


def broker_tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}")
                                       if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.fail(f"{name} not found; it comes with the broker: apt-get install -y mosquitto")
    return path


def scored(d: DaemonProcess, device: str) -> float:
    return d.metric("sensord_windows_scored_total", device=device) or 0.0


# -- 1. broker restart ----------------------------------------------------------------------------

def test_broker_restart_reconnects_resubscribes_and_announces_online(
        fresh_broker: MosquittoBroker, daemons: Callable[..., DaemonProcess], models: Models) -> None:
    broker = fresh_broker
    series = models.stream
    rec = recorder(broker, f"{PREFIX}/#")
    d = daemons(broker)
    wait_online(d, rec)
    rec.stop()
    stream = Streamer(broker)
    stream.send_rows(telemetry("pump1"), series, 0, 30)
    d.wait_metric("sensord_windows_scored_total", 30 - W + 1, device="pump1")
    assert d.metric("sensord_mqtt_connected") == 1
    assert d.metric("sensord_mqtt_reconnects_total") == 0
    stream.close()

    port = broker.port
    broker.stop()
    d.wait_metric("sensord_mqtt_connected", 0, timeout=5)
    time.sleep(1.5)  # a few refused reconnect attempts while the broker is down
    assert d.alive()
    assert d.metric("sensord_mqtt_reconnects_total") == 0

    t0 = time.monotonic()
    broker.restart()
    assert broker.port == port
    d.wait_metric("sensord_mqtt_connected", 1, timeout=5)
    assert time.monotonic() - t0 < 5
    assert d.metric("sensord_mqtt_reconnects_total") == 1
    # The new broker started empty: the retained "online" is there only because the daemon re-announced.
    assert retained(broker, STATUS) == b"online"

    # Readings published after the reconnect are scored: the subscription was re-established,
    # and the device's window buffer carried on across the outage.
    stream = Streamer(broker)
    try:
        stream.send_rows(telemetry("pump1"), series, 30, 60)
        d.wait_metric("sensord_windows_scored_total", 60 - W + 1, device="pump1")
        d.wait_metric("sensord_messages_received_total", 60)
    finally:
        stream.close()
    assert d.metric("sensord_mqtt_reconnects_total") == 1
    assert d.metric("sensord_mqtt_connected") == 1
    log = d.log()
    assert log.count("mqtt connected to") == 2, log
    assert "mqtt disconnected from" in log
    assert "Traceback" not in log
    # The outage is logged once, not once per refused retry.
    refused = [ln for ln in log.splitlines() if "failed: ConnectionRefusedError" in ln]
    assert len(refused) == 1 and "WARNING" in refused[0], log
    # The broker saw the daemon subscribe again on the new connection.
    assert f"{d.doc['mqtt']['client_id']} 1 {telemetry('+')}" in broker.log_text()  # "<client> <qos> <filter>"


# -- 2. username / password ---------------------------------------------------------------------

def test_password_auth_right_credentials_score_wrong_ones_are_refused(
        tmp_path: Path, daemons: Callable[..., DaemonProcess], models: Models) -> None:
    passwd = tmp_path / "passwd"
    tool = broker_tool("mosquitto_passwd")
    subprocess.run([tool, "-b", "-c", str(passwd), "sensord", "s3cret"], check=True, capture_output=True)
    subprocess.run([tool, "-b", str(passwd), "tester", "t3st"], check=True, capture_output=True)
    assert "s3cret" not in passwd.read_text()  # hashed
    tester = Access("tester", "t3st")
    with MosquittoBroker(password_file=passwd) as broker:
        # The broker really refuses anonymous clients.
        anon = MqttRecorder(broker.host, broker.port, "#", timeout=5)
        with pytest.raises(AssertionError, match="refused"):
            anon.start()

        rec = recorder(broker, f"{PREFIX}/#", tester)
        good = daemons(broker, "good", mqtt={"username": "sensord", "password": "s3cret"})
        bad = daemons(broker, "bad", mqtt={"username": "sensord", "password": "wrong",
                                           "topic_prefix": "intruder"})
        try:
            wait_online(good, rec)
            stream = Streamer(broker, tester)
            try:
                stream.send_rows(telemetry("pump2"), models.stream, 0, 25)
            finally:
                stream.close()
            good.wait_metric("sensord_windows_scored_total", 25 - W + 1, device="pump2")
            assert good.metric("sensord_mqtt_connected") == 1

            line = bad.wait_log("refused")
            assert "ERROR" in line and f"127.0.0.1:{broker.port}" in line, line
            bad.wait_metrics_up()
            time.sleep(1.5)  # several retries, each refused
            assert bad.alive(), bad.log()
            assert bad.metric("sensord_mqtt_connected") == 0
            assert bad.metric("sensord_mqtt_reconnects_total") == 0
            assert bad.metric("sensord_messages_received_total") == 0
            bad_log = bad.log()
            assert "ready: serving" not in bad_log and "Traceback" not in bad_log, bad_log
            assert not any(m.topic.startswith("intruder/") for m in rec.messages())
            assert "not authorised" in broker.log_text()
            # It stops cleanly although it never connected.
            assert bad.terminate() == 0, bad.log()
        finally:
            rec.stop()


# -- 3. MQTT 3.1.1 --------------------------------------------------------------------------------

def test_mqtt_311_alerts_state_status_and_last_will(
        fresh_broker: MosquittoBroker, daemons: Callable[..., DaemonProcess], models: Models) -> None:
    broker = fresh_broker
    healthy, step_at, rows = 40, 40, 60
    series = models.stream.slice(0, rows)
    values = series.values.copy()
    cur, vib = series.channels.index("current"), series.channels.index("vibration_1")
    values[step_at:, cur] += 2.0  # ~20 healthy spreads: unmistakable for any model
    values[step_at:, vib] += 2.0
    faulty = Series(series.timestamps, values, series.channels, None)

    rec = recorder(broker, f"{PREFIX}/#")
    d = daemons(broker, mqtt={"protocol": "3.1.1"})
    try:
        wait_online(d, rec)
        cid = d.doc["mqtt"]["client_id"]
        connect_line = next(ln for ln in broker.log_text().splitlines()
                            if "New client connected" in ln and f" as {cid} " in ln)
        assert "(p2," in connect_line, connect_line  # mosquitto's log code for MQTT 3.1.1 (MQTT 5 is p5)
        assert "MQTT 3.1.1" in d.log()
        assert retained(broker, STATUS) == b"online"

        stream = Streamer(broker)
        try:
            stream.send_rows(telemetry("pump3"), faulty, 0, healthy)
            d.wait_metric("sensord_windows_scored_total", healthy - W + 1, device="pump3")
            state = json.loads(retained(broker, f"{PREFIX}/state/pump3"))
            assert state["device"] == "pump3" and state["state"] == "normal"
            assert state["since"] == iso(faulty.timestamps[W - 1])
            assert rec.messages(f"{PREFIX}/alerts/") == []

            stream.send_rows(telemetry("pump3"), faulty, healthy, rows)
            d.wait_metric("sensord_windows_scored_total", rows - W + 1, device="pump3")
        finally:
            stream.close()
        (msg,) = rec.wait_for(lambda m: m.topic == f"{PREFIX}/alerts/pump3", timeout=5)
        assert msg.qos == 1 and not msg.retain
        alert = json.loads(msg.payload)
        assert alert["state"] == "raised" and alert["device"] == "pump3"
        # raise_after=2: the second window that contains a faulty row raises.
        assert alert["window_end"] == iso(faulty.timestamps[step_at + DETECTOR["raise_after"] - 1])
        assert alert["score"] > 1
        assert d.metric("sensord_alerts_raised_total", device="pump3") == 1
        assert d.metric("sensord_anomaly_state", device="pump3") == 1
        state = json.loads(retained(broker, f"{PREFIX}/state/pump3"))
        assert state["state"] == "alert" and state["since"] == alert["window_end"]

        rec.clear()
        os.kill(d.pid, signal.SIGKILL)
        assert d.proc.wait(5) == -signal.SIGKILL
        rec.wait_for(lambda m: m.topic == STATUS and m.payload == b"offline", timeout=10)
        assert retained(broker, STATUS) == b"offline"
    finally:
        rec.stop()


# -- 4. TLS ---------------------------------------------------------------------------------------

def openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"openssl {' '.join(args)} failed:\n{res.stderr}"


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", f"/CN=sensord test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=d)
    return key, crt


def make_server_cert(d: Path, ca_key: Path, ca_crt: Path) -> tuple[Path, Path]:
    key, csr, crt, ext = d / "server.key", d / "server.csr", d / "server.crt", d / "server.ext"
    ext.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n"
                   "basicConstraints = critical, CA:FALSE\n"
                   "keyUsage = critical, digitalSignature, keyEncipherment\n"
                   "extendedKeyUsage = serverAuth\n"
                   "subjectKeyIdentifier = hash\n"
                   "authorityKeyIdentifier = keyid\n")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1", cwd=d)
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(crt), "-days", "2", "-extfile", str(ext), cwd=d)
    return key, crt


def test_tls_connects_with_the_right_ca_and_refuses_another(
        tmp_path: Path, daemons: Callable[..., DaemonProcess], models: Models) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command line tool is needed to make the test CA and certificate: "
                    "apt-get install -y openssl")
    pki = tmp_path / "pki"
    pki.mkdir()
    ca_key, ca_crt = make_ca(pki, "ca")
    _, other_ca = make_ca(pki, "other-ca")
    server_key, server_crt = make_server_cert(pki, ca_key, ca_crt)
    access = Access(ca_file=ca_crt)
    with MosquittoBroker(tls_cafile=ca_crt, tls_certfile=server_crt, tls_keyfile=server_key) as broker:
        # The listener speaks TLS only: a plain MQTT client gets no CONNACK.
        plain = MqttRecorder(broker.host, broker.port, "#", timeout=1)
        with pytest.raises((AssertionError, OSError)):
            plain.start()

        rec = recorder(broker, f"{PREFIX}/#", access)
        good = daemons(broker, "good", mqtt={"tls": {"ca_file": str(ca_crt)}})
        bad = daemons(broker, "bad", mqtt={"tls": {"ca_file": str(other_ca)}, "topic_prefix": "untrusted"})
        try:
            wait_online(good, rec)
            assert good.metric("sensord_mqtt_connected") == 1
            stream = Streamer(broker, access)
            try:
                stream.send_rows(telemetry("pump4"), models.stream, 0, 25)
            finally:
                stream.close()
            good.wait_metric("sensord_windows_scored_total", 25 - W + 1, device="pump4")

            line = bad.wait_log("certificate verify failed")
            assert "ERROR" in line and f"127.0.0.1:{broker.port}" in line, line
            bad.wait_metrics_up()
            time.sleep(1.5)  # several retries, each failing the handshake
            assert bad.alive(), bad.log()
            assert bad.metric("sensord_mqtt_connected") == 0
            assert bad.metric("sensord_messages_received_total") == 0
            bad_log = bad.log()
            assert "ready: serving" not in bad_log and "Traceback" not in bad_log, bad_log
            # Repeated identical failures are not logged at ERROR again and again.
            assert sum("certificate verify failed" in ln and "ERROR" in ln for ln in bad_log.splitlines()) == 1
            assert not any(m.topic.startswith("untrusted/") for m in rec.messages())
            assert bad.terminate() == 0, bad.log()
        finally:
            rec.stop()


# -- 5. payload variants through the broker ---------------------------------------------------------

def test_device_field_batches_and_device_limit(
        fresh_broker: MosquittoBroker, daemons: Callable[..., DaemonProcess], models: Models) -> None:
    broker = fresh_broker
    series = models.stream
    rec = recorder(broker, f"{PREFIX}/#")
    d = daemons(broker, mqtt={"device_field": "machine", "device_topic": None, "subscriptions": ["plant/#"]},
                daemon={"max_devices": 2})
    stream = Streamer(broker)
    try:
        wait_online(d, rec)
        # m1: one message carrying a JSON array of 15 readings -> one message, 15 readings, 6 windows.
        stream.send_raw("plant/hall1/line1", json.dumps([{"machine": "m1", **reading(series, i)}
                                                         for i in range(15)]))
        d.wait_metric("sensord_windows_scored_total", 15 - W + 1, device="m1")
        assert d.metric("sensord_messages_received_total") == 1
        assert d.metric("sensord_devices") == 1

        # m2: one reading per message, channels flat in the object, on a deeper topic.
        for i in range(12):
            stream.send_raw("plant/hall2/line7/cell3", json.dumps({"machine": "m2", **reading(series, i, flat=True)}))
        d.wait_metric("sensord_windows_scored_total", 12 - W + 1, device="m2")
        assert d.metric("sensord_messages_received_total") == 13
        assert d.metric("sensord_devices") == 2

        # m3: a third device while two are tracked -> all five of its readings refused.
        stream.send_raw("plant/hall1/line1", json.dumps([{"machine": "m3", **reading(series, i)} for i in range(5)]))
        d.wait_metric("sensord_readings_rejected_total", 5, reason="device_limit")
        assert d.metric("sensord_devices_rejected_total") == 5
        assert d.metric("sensord_devices") == 2
        assert d.metric("sensord_windows_scored_total", device="m3") is None

        # A batch mixing a tracked device and the refused one: only the tracked one's readings count.
        stream.send_raw("plant/hall1/line1", json.dumps([{"machine": "m1", **reading(series, 15)},
                                                         {"machine": "m3", **reading(series, 5)},
                                                         {"machine": "m1", **reading(series, 16)}]))
        d.wait_metric("sensord_windows_scored_total", 17 - W + 1, device="m1")
        d.wait_metric("sensord_readings_rejected_total", 6, reason="device_limit")
        assert d.metric("sensord_devices_rejected_total") == 6

        # No device field: the topic cannot name the device (device_topic is off), so the message is refused.
        stream.send_raw("plant/hall1/line1", json.dumps(reading(series, 17)))
        d.wait_metric("sensord_messages_rejected_total", 1, reason="no_device")
        d.wait_metric("sensord_messages_received_total", 16)
    finally:
        stream.close()
        rec.stop()
    m = d.metrics()
    assert m[("sensord_devices", ())] == 2
    assert m[("sensord_windows_scored_total", (("device", "m1"),))] == 17 - W + 1
    assert m[("sensord_windows_scored_total", (("device", "m2"),))] == 12 - W + 1
    assert sum(v for (name, labels), v in m.items()
               if name == "sensord_readings_rejected_total" and labels != (("reason", "device_limit"),)) == 0
    assert m[("sensord_windows_dropped_total", ())] == 0
    log = d.log()
    assert "reading rejected reason=device_limit device=m3" in log
    assert "new device=m1" in log and "new device=m2" in log and "new device=m3" not in log
    # The retained per-device state exists for the two tracked devices only.
    assert json.loads(retained(broker, f"{PREFIX}/state/m1"))["state"] == "normal"
    assert json.loads(retained(broker, f"{PREFIX}/state/m2"))["state"] == "normal"
