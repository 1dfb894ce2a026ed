"""The private-broker test helpers work against a real mosquitto."""

from __future__ import annotations

import socket

import pytest
from broker import MosquittoBroker, MqttRecorder, RecordedMessage, publish

pytestmark = pytest.mark.e2e  # a real Mosquitto


def test_round_trip_exact_payload(broker: MosquittoBroker, topic_root: str) -> None:
    payload = b'{"sensor":"t1","v":[1.5,2.0]}\x00\xff binary tail'
    with MqttRecorder(broker.host, broker.port, f"{topic_root}/#") as rec:
        publish(broker.host, broker.port, f"{topic_root}/t1", payload, qos=1)
        got = rec.wait_for(lambda m: m.topic == f"{topic_root}/t1", timeout=5)
    assert got == [RecordedMessage(f"{topic_root}/t1", payload, False, 1)]
    assert rec.messages(f"{topic_root}/") == got
    assert rec.messages("elsewhere/") == []


def test_qos0_and_str_payload(broker: MosquittoBroker, topic_root: str) -> None:
    with MqttRecorder(broker.host, broker.port, f"{topic_root}/+", qos=0) as rec:
        publish(broker.host, broker.port, f"{topic_root}/a", "héllo", qos=0)
        (m,) = rec.wait_for(lambda m: m.topic.endswith("/a"), timeout=5)
    assert m.payload == "héllo".encode()
    assert m.qos == 0


def test_retained_message_reaches_late_subscriber(
    fresh_broker: MosquittoBroker, topic_root: str
) -> None:
    topic = f"{topic_root}/status"
    publish(fresh_broker.host, fresh_broker.port, topic, b"online", qos=1, retain=True)
    # Subscribing only now: the broker replays the retained message with retain=1.
    with MqttRecorder(fresh_broker.host, fresh_broker.port, topic) as rec:
        (m,) = rec.wait_for(lambda m: m.topic == topic, timeout=5)
    assert m.payload == b"online"
    assert m.retain is True
    # A live (non-replayed) publish is delivered with retain=0 to existing subscribers.
    with MqttRecorder(fresh_broker.host, fresh_broker.port, topic) as rec:
        rec.wait_for(lambda m: m.retain, timeout=5)
        publish(fresh_broker.host, fresh_broker.port, topic, b"still online", retain=True)
        (live,) = rec.wait_for(lambda m: m.payload == b"still online", timeout=5)
    assert live.retain is False


def test_wait_for_timeout_reports_what_was_received(broker: MosquittoBroker, topic_root: str) -> None:
    with MqttRecorder(broker.host, broker.port, f"{topic_root}/#") as rec:
        publish(broker.host, broker.port, f"{topic_root}/x", b"unexpected")
        rec.wait_for(lambda m: True, timeout=5)
        with pytest.raises(AssertionError, match="unexpected"):
            rec.wait_for(lambda m: m.payload == b"never", timeout=0.3)


def test_private_broker_is_not_the_system_broker(
    broker: MosquittoBroker, fresh_broker: MosquittoBroker
) -> None:
    assert broker.host == "127.0.0.1"
    assert broker.port != 1883
    assert fresh_broker.port not in (1883, broker.port)
    assert broker.running and fresh_broker.running
    # The broker really listens on its own port, as its log confirms.
    with socket.create_connection((broker.host, broker.port), timeout=2):
        pass
    log = broker.log_text()
    assert f"port {broker.port}" in log
    assert "port 1883" not in log


def test_stop_terminates_and_keeps_log() -> None:
    b = MosquittoBroker()
    with b:
        port = b.port
        assert b.running
    assert not b.running
    assert f"port {port}" in b.log_text()
    with pytest.raises(OSError):
        socket.create_connection((b.host, port), timeout=1).close()


def test_start_retries_when_port_is_grabbed(monkeypatch: pytest.MonkeyPatch) -> None:
    import mosquitto as broker_module

    # Another process takes the chosen port before mosquitto binds it: the TCP
    # connect would succeed against the squatter, but only a real CONNACK counts.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real_free_port = broker_module._free_port
        ports = iter([taken])
        monkeypatch.setattr(
            broker_module, "_free_port", lambda host: next(ports, None) or real_free_port(host)
        )
        with MosquittoBroker() as b:
            assert b.port != taken
            with MqttRecorder(b.host, b.port, "x") as rec:
                publish(b.host, b.port, "x", b"ok")
                rec.wait_for(lambda m: m.payload == b"ok", timeout=5)
