"""End to end: what survives a ``kill -9`` of the daemon, a broker restart and a broken state directory.

Each test starts the daemon as a real subprocess against a real private Mosquitto (the session's, or a
fresh one when the broker itself is restarted), streams readings with explicit timestamps and checks what
the two lives of the daemon did between them: counters, alerts and the retained state.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import test_daemon_e2e as base
from broker import MosquittoBroker, MqttRecorder
from e2e_support import DaemonProcess, wait_until
from test_daemon_e2e import E2E, FAULT_START, FAULT_STOP, Models, W, with_step

from sensord.bundle import ModelBundle
from sensord.evaluation import score_series
from sensord.scorer import Scorer
from sensord.sinks import iso
from sensord.windows import window_spec

pytestmark = pytest.mark.e2e

# The fixtures of the daemon's end-to-end tests (the session's tiny bundle, a recorder and a streamer).
models = base.models
e2e = base.e2e


def kill_9(d: DaemonProcess) -> None:
    os.kill(d.pid, signal.SIGKILL)
    assert d.proc.wait(5) == -signal.SIGKILL


def restart(e2e: E2E, doc: dict[str, Any], name: str) -> DaemonProcess:
    """The same config again (same client id, same state directory), announced online."""
    e2e.rec.clear()
    d = e2e.spawn(doc, name)
    status = f"{e2e.prefix}/status"
    e2e.rec.wait_for(lambda m: m.topic == status and m.payload == b"online" and not m.retain, timeout=20)
    return d


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_kill_9_readings_sent_while_down_are_scored_after_restart(e2e: E2E, models: Models, protocol: str) -> None:
    seg = models.labelled.slice(0, 200)
    doc = e2e.config(mqtt={"protocol": protocol})
    first = e2e.spawn(doc, "life1")
    e2e.rec.wait_for(lambda m: m.topic == f"{e2e.prefix}/status" and m.payload == b"online", timeout=20)
    e2e.stream.send_rows("pump1", seg, 0, 100)
    first.wait_metric("sensord_windows_scored_total", 100 - W + 1, device="pump1")
    life1 = first.metric("sensord_messages_received_total")
    kill_9(first)
    e2e.stream.send_rows("pump1", seg, 100, 140)  # the broker queues these for the daemon's session
    second = restart(e2e, doc, "life2")
    e2e.stream.send_rows("pump1", seg, 140, 200)
    second.wait_metric("sensord_messages_received_total", 100)
    assert life1 + second.metric("sensord_messages_received_total") == e2e.stream.sent == 200
    # Every reading of the second life is in a scored window (its window buffer starts empty).
    second.wait_metric("sensord_windows_scored_total", 100 - W + 1, device="pump1")
    assert "session resumed" in second.log()
    assert sum(v for (name, _), v in second.metrics().items() if name == "sensord_readings_rejected_total") == 0


def test_clean_session_loses_readings_sent_while_down(e2e: E2E, models: Models) -> None:
    """The control: with ``session_expiry_seconds: 0`` the broker keeps nothing, as before."""
    seg = models.labelled.slice(0, 60)
    doc = e2e.config(mqtt={"session_expiry_seconds": 0})
    first = e2e.spawn(doc, "life1")
    e2e.rec.wait_for(lambda m: m.topic == f"{e2e.prefix}/status" and m.payload == b"online", timeout=20)
    e2e.stream.send_rows("pump1", seg, 0, 20)
    first.wait_metric("sensord_messages_received_total", 20)
    kill_9(first)
    e2e.stream.send_rows("pump1", seg, 20, 40)
    second = restart(e2e, doc, "life2")
    e2e.stream.send_rows("pump1", seg, 40, 60)
    # Broker queues are delivered before newer messages, so once the last reading is scored, all is in.
    second.wait_metric("sensord_windows_scored_total", 20 - W + 1, device="pump1")
    assert second.metric("sensord_messages_received_total") == 20
    assert "clean session" in second.log()


def test_kill_9_mid_alert_keeps_the_alert_one_raised_one_cleared(e2e: E2E, models: Models) -> None:
    seg = with_step(models.labelled.slice(0, 300), FAULT_START, FAULT_STOP)
    doc = e2e.config()
    first = e2e.spawn(doc, "life1")
    e2e.rec.wait_for(lambda m: m.topic == f"{e2e.prefix}/status" and m.payload == b"online", timeout=20)
    e2e.stream.send_rows("pump2", seg, 0, FAULT_START + 15)  # stop inside the fault
    raised = e2e.wait_alert("pump2", "raised")
    first.wait_metric("sensord_windows_scored_total", FAULT_START + 15 - W + 1, device="pump2")
    first.wait_metric("sensord_outbox_depth", 0)  # the broker acknowledged the alert (else it is sent again)
    kill_9(first)
    assert json.loads(e2e.retained("state/pump2").payload)["state"] == "alert"

    second = restart(e2e, doc, "life2")
    assert "alerts still raised: pump2" in second.log()
    assert second.metric("sensord_anomaly_state", device="pump2") == 1
    e2e.stream.send_rows("pump2", seg, FAULT_START + 15, FAULT_STOP)  # the rest of the fault
    second.wait_metric("sensord_windows_scored_total", FAULT_STOP - (FAULT_START + 15) - W + 1, device="pump2")
    assert json.loads(e2e.retained("state/pump2").payload)["state"] == "alert"
    e2e.stream.send_rows("pump2", seg, FAULT_STOP)
    cleared = e2e.wait_alert("pump2", "cleared")
    second.wait_metric("sensord_windows_scored_total", len(seg) - (FAULT_START + 15) - W + 1, device="pump2")
    assert [a["state"] for a in e2e.alerts("pump2")] == ["cleared"]  # no second "raised" after the restart
    assert cleared["alert_id"] == raised["alert_id"] and cleared["raised_at"] == raised["window_end"]
    states = [json.loads(m.payload)["state"] for m in e2e.rec.messages(f"{e2e.prefix}/state/pump2")]
    assert states == ["normal"], "the second life published a state other than the clear"
    assert second.metric("sensord_alerts_raised_total", device="pump2") is None
    assert second.metric("sensord_state_save_failures_total") == 0


def test_unwritable_state_dir_is_counted_and_logged_and_scoring_goes_on(e2e: E2E, models: Models) -> None:
    blocker = e2e.tmp / "not-a-dir"
    blocker.write_text("")
    d = e2e.start(daemon={"state_dir": str(blocker / "state"), "state_save_interval_seconds": 0.1})
    e2e.stream.send_rows("pump3", models.labelled, 0, 40)
    d.wait_metric("sensord_windows_scored_total", 40 - W + 1, device="pump3")
    wait_until(lambda: (d.metric("sensord_state_save_failures_total") or 0) >= 1, 10, "a failed save counted")
    assert "cannot save detector state" in d.wait_log("cannot save detector state")
    assert d.alive()


class PersistentSubscriber:
    """A QoS 1 consumer with a persistent session (MQTT 3.1.1, clean_session false), as an alert consumer
    should be: the broker keeps what arrives while it is disconnected."""

    def __init__(self, broker: MosquittoBroker, topic: str) -> None:
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"consumer-{uuid.uuid4().hex[:10]}", clean_session=False)
        self.client.reconnect_delay_set(0.2, 0.5)

        def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            client.subscribe(topic, qos=1)

        def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            with self._lock:
                self.messages.append(json.loads(msg.payload))
        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = on_message
        self.client.connect(broker.host, broker.port, keepalive=5)
        self.client.loop_start()
        assert subscribed.wait(10), "consumer not subscribed"

    def alerts(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("daemon_killed", [False, True], ids=["broker-outage", "broker-outage-and-kill-9"])
def test_alert_raised_while_the_broker_is_down_arrives_once_after_it_returns(
        tmp_path: Path, models: Models, daemon_killed: bool) -> None:
    # Mosquitto started as root writes its database as the mosquitto user: a directory it can reach
    # (pytest's tmp_path sits under a 0700 directory).
    store = Path(tempfile.mkdtemp(prefix="sensord-test-mosquitto-db-"))
    os.chmod(store, 0o777)
    broker = MosquittoBroker(extra_config=f"persistence true\npersistence_location {store}/\n").start()
    root = f"test/{uuid.uuid4().hex[:8]}"
    rec = MqttRecorder(broker.host, broker.port, f"{root}/sensord/#").start()
    stream = base.Streamer(broker, root)
    env = E2E(broker, root, tmp_path, models, rec, stream)
    consumer = PersistentSubscriber(broker, f"{root}/sensord/alerts/#")
    try:
        rows = FAULT_START + 15
        seg = with_step(models.labelled.slice(0, rows), FAULT_START, rows)
        # The scorer gathers one batch for up to 5 s: the readings are in, the alert is decided after the
        # broker has gone.
        doc = env.config(daemon={"batch_wait_seconds": 5.0}, scoring={"batch_max": 4096},
                         mqtt={"reconnect_min_seconds": 1, "reconnect_max_seconds": 1})
        d = env.spawn(doc, "life1")
        doc = d.doc  # with its state directory
        rec.wait_for(lambda m: m.topic == f"{env.prefix}/status" and m.payload == b"online", timeout=20)
        stream.send_rows("pump1", seg)
        d.wait_metric("sensord_messages_received_total", rows)
        assert d.metric("sensord_windows_scored_total", device="pump1") is None, "scored before the outage"
        stream.close()
        broker.stop()
        d.wait_metric("sensord_alerts_raised_total", 1, device="pump1", timeout=15)
        d.wait_metric("sensord_outbox_depth", 1)  # counted a moment after the alert itself
        assert d.metric("sensord_mqtt_connected") == 0
        (kept,) = (Path(doc["daemon"]["state_dir"]) / "outbox").iterdir()
        raised = json.loads(json.loads(kept.read_text())["payload"])
        assert raised["state"] == "raised" and raised["device"] == "pump1"
        if daemon_killed:
            kill_9(d)
        assert (store / "mosquitto.db").exists(), "the broker saved no sessions"
        broker.restart()
        if daemon_killed:
            d = env.spawn(doc, "life2")
        wait_until(lambda: consumer.alerts(), 20, "the raised alert at the consumer")
        d.wait_metric("sensord_outbox_depth", 0)
        assert not list((Path(doc["daemon"]["state_dir"]) / "outbox").iterdir())
        # A barrier instead of a pause: the broker hands a subscriber its messages in the order it took them
        # in, so once a message published now reaches the consumer, any second copy (sent before the outbox
        # let the alert go) has reached it too.
        barrier = base.Streamer(broker, root)
        try:
            barrier.send_raw(f"{root}/sensord/alerts/~barrier", json.dumps({"barrier": True}))
        finally:
            barrier.close()
        wait_until(lambda: any(a.get("barrier") for a in consumer.alerts()), 10, "the barrier at the consumer")
        alerts = [a for a in consumer.alerts() if not a.get("barrier")]
        assert [(a["alert_id"], a["state"]) for a in alerts] == [(raised["alert_id"], "raised")]
        if daemon_killed:
            assert "outbox: 1 alerts from before the restart" in d.log()
            assert d.metric("sensord_anomaly_state", device="pump1") == 1  # restored, not raised again
            assert d.metric("sensord_alerts_raised_total", device="pump1") is None
    finally:
        consumer.close()
        rec.stop()
        for dp in env.daemons:
            dp.stop()
        broker.stop()
        shutil.rmtree(store, ignore_errors=True)


def test_sigterm_readings_arriving_during_shutdown_come_again(e2e: E2E, models: Models) -> None:
    seg = models.labelled.slice(0, 200)
    # A 5 s batch wait keeps the first life busy draining while the next readings arrive.
    doc = e2e.config(daemon={"batch_wait_seconds": 5.0}, scoring={"batch_max": 4096})
    first = e2e.spawn(doc, "life1")
    doc = first.doc
    e2e.rec.wait_for(lambda m: m.topic == f"{e2e.prefix}/status" and m.payload == b"online", timeout=20)
    e2e.stream.send_rows("pump1", seg, 0, 100)
    first.wait_metric("sensord_messages_received_total", 100)
    first.proc.send_signal(signal.SIGTERM)
    e2e.stream.send_rows("pump1", seg, 100, 150)  # during and after the stop
    assert first.proc.wait(15) == 0
    line = first.wait_log("messages taken")
    taken = int(line.split(": ")[-1].split(" messages taken")[0])
    assert 100 <= taken <= 150 and "unacknowledged for the next start" in line
    second = restart(e2e, doc, "life2")
    e2e.stream.send_rows("pump1", seg, 150, 200)
    second.wait_metric("sensord_messages_received_total", 200 - taken)
    assert second.metric("sensord_messages_rejected_total", reason="stopping") == 0


def test_full_disk_state_save_fails_counted_and_the_alert_still_goes_out(e2e: E2E, models: Models) -> None:
    """The state file's temporary copy is /dev/full: every save gets a real ENOSPC from the kernel."""
    state = e2e.tmp / "full-state"
    state.mkdir()
    (state / "detector-state.json.tmp").symlink_to("/dev/full")
    d = e2e.start(daemon={"state_dir": str(state)})
    seg = with_step(models.labelled.slice(0, FAULT_START + 20), FAULT_START, FAULT_START + 20)
    e2e.stream.send_rows("pump4", seg)
    raised = e2e.wait_alert("pump4", "raised")
    d.wait_metric("sensord_windows_scored_total", len(seg) - W + 1, device="pump4")
    assert (d.metric("sensord_state_save_failures_total") or 0) >= 1
    assert "No space left on device" in d.wait_log("cannot save detector state")
    assert json.loads(e2e.retained("state/pump4").payload)["state"] == "alert"
    assert raised["device"] == "pump4" and d.alive()
    assert not (state / "detector-state.json").exists()


def test_sigterm_restart_continues_the_window_buffers_every_window_scored_once(e2e: E2E, models: Models) -> None:
    seg = models.labelled.slice(0, 200)
    doc = e2e.config(mqtt={"publish_scores": True})
    first = e2e.spawn(doc, "life1")
    doc = first.doc
    e2e.rec.wait_for(lambda m: m.topic == f"{e2e.prefix}/status" and m.payload == b"online", timeout=20)
    e2e.stream.send_rows("pump1", seg, 0, 100)
    first.wait_metric("sensord_windows_scored_total", 100 - W + 1, device="pump1")
    assert first.terminate() == 0
    e2e.stream.send_rows("pump1", seg, 100, 130)  # while it is down: queued in its session
    second = restart(e2e, doc, "life2")
    assert "window buffers of 1 devices continued" in second.log()
    e2e.stream.send_rows("pump1", seg, 130, 200)
    # The windows ending at rows 100..199 (they start in the first life's readings): 191 in all, once each.
    second.wait_metric("sensord_windows_scored_total", 100, device="pump1")
    second.wait_metric("sensord_messages_received_total", 100)
    assert second.metric("sensord_readings_rejected_total", reason="out_of_order") == 0
    assert not (Path(doc["daemon"]["state_dir"]) / "window-buffers.json").exists()  # taken at start
    # Scored as if the daemon had never stopped: the same errors as offline over the 200 rows in one go,
    # which holds only if the temperatures' drift baselines came back with the readings.
    bundle = ModelBundle.load(models.bundle)
    assert bundle.drift is not None
    offline = score_series(seg, Scorer(bundle), window_spec(None, bundle), "pump1")
    scores = f"{e2e.prefix}/scores/pump1"
    wait_until(lambda: len(e2e.rec.messages(scores)) >= 100, 10, "the second life's 100 scores")
    live = [json.loads(m.payload) for m in e2e.rec.messages(scores)]
    assert [w["window_end"] for w in live] == [iso(t) for t in offline.ends[-100:]]
    np.testing.assert_allclose([w["error"] for w in live], offline.errors[-100:], rtol=1e-5, atol=1e-7)


def test_kill_9_does_not_continue_buffers_from_an_earlier_clean_stop(e2e: E2E, models: Models) -> None:
    """The buffers of a clean stop are used by the next start only, never after a later crash."""
    seg = models.labelled.slice(0, 200)
    doc = e2e.config()
    first = e2e.spawn(doc, "life1")
    doc = first.doc
    e2e.rec.wait_for(lambda m: m.topic == f"{e2e.prefix}/status" and m.payload == b"online", timeout=20)
    e2e.stream.send_rows("pump1", seg, 0, 50)
    first.wait_metric("sensord_messages_received_total", 50)
    assert first.terminate() == 0
    second = restart(e2e, doc, "life2")
    e2e.stream.send_rows("pump1", seg, 50, 100)
    second.wait_metric("sensord_windows_scored_total", 50, device="pump1")
    kill_9(second)
    third = restart(e2e, doc, "life3")
    e2e.stream.send_rows("pump1", seg, 100, 150)
    third.wait_metric("sensord_windows_scored_total", 50 - W + 1, device="pump1")  # starts empty
    assert "continued" not in third.log()


@pytest.mark.parametrize("content", [b"{\"format\": \"sensord-detector-state\", \"version\": 1, \"model_id\": \"x\","
                                     b" \"devices\": {}}", b"\x00\x01 not json"], ids=["other-model", "corrupt"])
def test_state_file_of_another_model_or_corrupt_is_set_aside_at_start(e2e: E2E, models: Models,
                                                                       content: bytes) -> None:
    state = e2e.tmp / "state-aside"
    state.mkdir()
    (state / "detector-state.json").write_bytes(content)
    d = e2e.start(daemon={"state_dir": str(state)})
    line = d.wait_log("starting with fresh detector state")
    assert "WARNING" in line
    (aside,) = [p for p in state.iterdir() if p.name.startswith("detector-state.json.")]
    assert aside.read_bytes() == content
    e2e.stream.send_rows("pump6", models.labelled, 0, 20)
    d.wait_metric("sensord_windows_scored_total", 20 - W + 1, device="pump6")
    assert json.loads(e2e.retained("state/pump6").payload)["state"] == "normal"
