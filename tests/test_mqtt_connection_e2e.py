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
import ssl
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from broker import MosquittoBroker, MqttRecorder
from e2e_support import (
    TINY_DETECTOR,
    TINY_WINDOW,
    DaemonProcess,
    QosPublisher,
    TrainedBundle,
    daemon_config,
    merge,
    wait_until,
)
from pki import make_ca, make_server_cert

from sensord.dataio import Series
from sensord.sinks import iso

pytestmark = pytest.mark.e2e

W = TINY_WINDOW
DETECTOR = TINY_DETECTOR
PREFIX = "sensord"  # every test has a broker of its own, so plain topics do not collide
STATUS = f"{PREFIX}/status"


# -- module fixture: one tiny bundle ------------------------------------------------------------

@dataclass(frozen=True)
class Models:
    bundle: Path
    stream: Series  # healthy 1 Hz readings (the labelled run's healthy lead) to publish


@pytest.fixture(scope="module")
def models(tiny_bundle: TrainedBundle) -> Models:
    trained = tiny_bundle
    labelled = trained.labelled
    lead = int(labelled.labels.argmax())  # the first faulty row: everything before is healthy
    assert lead >= 200, lead
    return Models(trained.bundle, labelled.slice(0, 200))


# -- helpers ------------------------------------------------------------------------------------

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
        # The broker's stored copy carries the retain flag; a live publish racing the subscription does not
        # (and is not what this asks), so only a message with the flag counts. None within 5 s: not retained.
        try:
            (m, *_) = rec.wait_for(lambda m: m.topic == topic and m.retain, timeout=5)
        except AssertionError:
            raise AssertionError(f"{topic} is not retained (got {len(rec.messages())} live messages)") from None
    finally:
        rec.stop()
    return m.payload


class Streamer(QosPublisher):
    """Publishes with ``access``; the broker must accept the connection."""

    def __init__(self, broker: MosquittoBroker, access: Access = Access()) -> None:
        super().__init__(broker, access.apply)
        assert not self.connect_rc[0].is_failure, f"publisher refused: {self.connect_rc[0]}"

    def send_rows(self, topic: str, series: Series, start: int, stop: int, **extra: Any) -> None:
        for i in range(start, stop):
            self.send_raw(topic, json.dumps({**extra, **reading(series, i)}))


def reading(series: Series, i: int, flat: bool = False) -> dict[str, Any]:
    values = {ch: float(series.values[i, j]) for j, ch in enumerate(series.channels)}
    return {"ts": float(series.timestamps[i]), **(values if flat else {"values": values})}


def telemetry(device: str) -> str:
    return f"sensors/{device}/telemetry"


@pytest.fixture
def daemons(tmp_path: Path, models: Models) -> Iterator[Callable[..., DaemonProcess]]:
    """``spawn(broker, name, **config overrides)`` starts a daemon; all are stopped at the end."""
    started: list[DaemonProcess] = []

    def spawn(broker: MosquittoBroker, name: str = "sensord", env: dict[str, str] | None = None,
              **over: Any) -> DaemonProcess:
        base = daemon_config(broker, models.bundle, window=W, detector=DETECTOR,
                             client_id=f"sensord-{name}-{uuid.uuid4().hex[:8]}",
                             subscriptions=[telemetry("+")], device_topic=telemetry("{device}"), topic_prefix=PREFIX,
                             reconnect_min_seconds=1, reconnect_max_seconds=1)
        d = DaemonProcess(tmp_path, name, merge(base, over), extra_env=env)
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


def stream_rows(broker: MosquittoBroker, access: Access, topic: str, series: Series, start: int, stop: int) -> None:
    """Publish rows ``[start, stop)`` of ``series`` to ``topic`` from a publisher of their own."""
    stream = Streamer(broker, access)
    try:
        stream.send_rows(topic, series, start, stop)
    finally:
        stream.close()


RETRY = "(again)"  # the DEBUG line of each repeated, identical connect failure (source.MqttConnection._failed)


def wait_retries(d: DaemonProcess, n: int, timeout: float = 20.0) -> None:
    """Until ``d`` (logging at DEBUG) has logged ``n`` more failed connect attempts after its first."""
    wait_until(lambda: d.log().count(RETRY) >= n or not d.alive(), timeout, f"{n} retries in {d.name}'s log")


def assert_kept_out(bad: DaemonProcess, broker: MosquittoBroker, error: str, zero: tuple[str, ...]) -> str:
    """``bad`` (logging at DEBUG) cannot connect to ``broker``: an ERROR line with ``error`` names the broker; it
    serves metrics and stays alive through several retries, never connected, the counters ``zero`` still 0, never
    ready and without a traceback. Returns its log."""
    line = bad.wait_log(error)
    assert "ERROR" in line and f"127.0.0.1:{broker.port}" in line, line
    bad.wait_metrics_up()
    wait_retries(bad, 2)  # several attempts, each failed the same way
    assert bad.alive(), bad.log()
    assert bad.metric("sensord_mqtt_connected") == 0
    for name in zero:
        assert bad.metric(name) == 0, name
    bad_log = bad.log()
    assert "ready: serving" not in bad_log and "Traceback" not in bad_log, bad_log
    return bad_log


def scored(d: DaemonProcess, device: str) -> float:
    return d.metric("sensord_windows_scored_total", device=device) or 0.0


# -- 1. broker restart ----------------------------------------------------------------------------

def test_broker_restart_reconnects_resubscribes_and_announces_online(
        fresh_broker: MosquittoBroker, daemons: Callable[..., DaemonProcess], models: Models) -> None:
    broker = fresh_broker
    series = models.stream
    rec = recorder(broker, f"{PREFIX}/#")
    d = daemons(broker, logging={"level": "DEBUG"})  # each retry is a DEBUG line (see wait_retries)
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
    wait_retries(d, 2)  # a few refused reconnect attempts while the broker is down
    assert d.alive(), d.log()
    assert d.metric("sensord_mqtt_reconnects_total") == 0

    broker.restart()
    assert broker.port == port
    d.wait_metric("sensord_mqtt_connected", 1, timeout=5)
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
    # The outage is logged once, not once per refused retry: the repeats (at least two) are DEBUG lines.
    refused = [ln for ln in log.splitlines() if "failed: ConnectionRefusedError" in ln]
    assert len(refused) >= 3 and "WARNING" in refused[0], log
    assert all(" DEBUG " in ln and ln.endswith(RETRY) for ln in refused[1:]), log
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
                                           "topic_prefix": "intruder"}, logging={"level": "DEBUG"})
        try:
            wait_online(good, rec)
            stream_rows(broker, tester, telemetry("pump2"), models.stream, 0, 25)
            good.wait_metric("sensord_windows_scored_total", 25 - W + 1, device="pump2")
            assert good.metric("sensord_mqtt_connected") == 1

            assert_kept_out(bad, broker, "refused",
                            ("sensord_mqtt_reconnects_total", "sensord_messages_received_total"))
            assert not any(m.topic.startswith("intruder/") for m in rec.messages())
            assert "not authorised" in broker.log_text()
            # It stops cleanly although it never connected.
            assert bad.terminate() == 0, bad.log()
        finally:
            rec.stop()


def test_password_from_a_credentials_file_or_the_environment_is_used_and_never_logged(
        tmp_path: Path, daemons: Callable[..., DaemonProcess], models: Models) -> None:
    """The systemd way (LoadCredential= puts the file under $CREDENTIALS_DIRECTORY) and the container way
    (an environment variable): both log in to a broker that refuses anonymous clients, and score."""
    secret = "Cr3dential-only-in-files"
    passwd = tmp_path / "passwd"
    tool = broker_tool("mosquitto_passwd")
    subprocess.run([tool, "-b", "-c", str(passwd), "sensord", secret], check=True, capture_output=True)
    subprocess.run([tool, "-b", str(passwd), "tester", "t3st"], check=True, capture_output=True)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text(secret + "\n")
    tester = Access("tester", "t3st")
    with MosquittoBroker(password_file=passwd) as broker:
        rec = recorder(broker, "#", tester)
        from_file = daemons(broker, "from-file", env={"CREDENTIALS_DIRECTORY": str(creds)},
                            mqtt={"username": "sensord",
                                  "password_file": "${CREDENTIALS_DIRECTORY}/mqtt-password"},
                            logging={"level": "DEBUG"})
        from_env = daemons(broker, "from-env", env={"SENSORD_MQTT_PASSWORD": secret},
                           mqtt={"username": "sensord", "password_env": "SENSORD_MQTT_PASSWORD",
                                 "topic_prefix": "other"}, logging={"level": "DEBUG"})
        try:
            wait_online(from_file, rec)
            wait_online(from_env, rec, "other/status")
            stream_rows(broker, tester, telemetry("pump2"), models.stream, 0, 25)
            for d in (from_file, from_env):
                d.wait_metric("sensord_windows_scored_total", 25 - W + 1, device="pump2")
                assert d.terminate() == 0, d.log()
                assert secret not in d.log()
            assert secret not in (tmp_path / "from-file.yaml").read_text()
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
            # Counted before anything is published for a window: with every window counted, none raised.
            assert d.metric("sensord_alerts_raised_total", device="pump3") is None
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

def test_tls_connects_with_the_right_ca_and_refuses_another(
        tmp_path: Path, daemons: Callable[..., DaemonProcess], models: Models) -> None:
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
        bad = daemons(broker, "bad", mqtt={"tls": {"ca_file": str(other_ca)}, "topic_prefix": "untrusted"},
                      logging={"level": "DEBUG"})
        try:
            wait_online(good, rec)
            assert good.metric("sensord_mqtt_connected") == 1
            stream_rows(broker, access, telemetry("pump4"), models.stream, 0, 25)
            good.wait_metric("sensord_windows_scored_total", 25 - W + 1, device="pump4")

            bad_log = assert_kept_out(bad, broker, "certificate verify failed", ("sensord_messages_received_total",))
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

