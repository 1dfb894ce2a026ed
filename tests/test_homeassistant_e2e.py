"""Home Assistant MQTT discovery, read back from a real broker and checked against Home Assistant's schema.

Home Assistant is not installed here; what it would see is. ``sensord run`` with ``homeassistant.enabled``
scores two devices (one whose id is not a valid topic level in Home Assistant), and a fresh subscriber
reads the retained discovery configs back, as Home Assistant does when it starts. Each one is checked
against the MQTT discovery rules and the ``binary_sensor`` / ``sensor`` options as Home Assistant
documents them (https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery,
https://www.home-assistant.io/integrations/binary_sensor.mqtt/, https://www.home-assistant.io/integrations/sensor.mqtt/),
and the topics they name carry what the templates expect.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker import MosquittoBroker, MqttRecorder, RecordedMessage
from e2e_support import (
    TINY_WINDOW,
    DaemonProcess,
    QosPublisher,
    TrainedBundle,
    daemon_config,
    wait_until,
)

from sensord.config import ConfigError, config_from_dict
from sensord.dataio import Series

pytestmark = pytest.mark.e2e

# -- Home Assistant's documented schema for the two platforms ----------------------------------------

# <discovery_prefix>/<component>/[<node_id>/]<object_id>/config, ids of [a-zA-Z0-9_-] (MQTT discovery).
DISCOVERY_TOPIC = re.compile(r"(?P<prefix>.+)/(?P<component>binary_sensor|sensor)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?"
                             r"(?P<object_id>[a-zA-Z0-9_-]+)/config")
COMMON_OPTIONS = {
    "availability": list, "availability_mode": str, "availability_template": str, "availability_topic": str,
    "default_entity_id": str, "device": dict, "device_class": str, "enabled_by_default": bool, "encoding": str,
    "entity_category": str, "entity_picture": str, "expire_after": int, "force_update": bool, "icon": str,
    "json_attributes_template": str, "json_attributes_topic": str, "name": str, "object_id": str,
    "payload_available": str, "payload_not_available": str, "platform": str, "qos": int, "state_topic": str,
    "unique_id": str, "value_template": str,
}
OPTIONS = {
    "binary_sensor": {**COMMON_OPTIONS, "off_delay": int, "payload_off": str, "payload_on": str},
    "sensor": {**COMMON_OPTIONS, "last_reset_value_template": str, "options": list, "state_class": str,
               "suggested_display_precision": int, "unit_of_measurement": str},
}
DEVICE_OPTIONS = {"configuration_url": str, "connections": list, "hw_version": str, "identifiers": list,
                  "manufacturer": str, "model": str, "model_id": str, "name": str, "serial_number": str,
                  "suggested_area": str, "sw_version": str, "via_device": str}
BINARY_SENSOR_CLASSES = {
    "battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door", "garage_door", "gas", "heat",
    "light", "lock", "moisture", "motion", "moving", "occupancy", "opening", "plug", "power", "presence", "problem",
    "running", "safety", "smoke", "sound", "tamper", "update", "vibration", "window"}
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}


def schema_problems(component: str, config: dict[str, Any]) -> list[str]:
    """What Home Assistant would refuse or ignore in a discovery config of ``component``; [] if none."""
    options = OPTIONS[component]
    problems = [f"unknown option {k}" for k in config if k not in options]
    problems += [f"{k}: must be {t.__name__}" for k, t in options.items()
                 if k in config and not (isinstance(config[k], t) and not (t is int and isinstance(config[k], bool)))]
    if "state_topic" not in config:
        problems.append("state_topic is required")
    if config.get("qos", 0) not in (0, 1, 2):
        problems.append("qos: must be 0, 1 or 2")
    if "device" in config:
        if "unique_id" not in config:
            problems.append("device needs unique_id (an entity without one is not added to a device)")
        device = config["device"]
        problems += [f"device: unknown option {k}" for k in device if k not in DEVICE_OPTIONS]
        if not device.get("identifiers") and not device.get("connections"):
            problems.append("device: needs identifiers or connections")
        if not all(isinstance(i, str) for i in device.get("identifiers", [])):
            problems.append("device.identifiers: must be strings")
    if component == "binary_sensor" and config.get("device_class", "problem") not in BINARY_SENSOR_CLASSES:
        problems.append(f"device_class: not a binary_sensor class: {config['device_class']}")
    if component == "sensor" and config.get("state_class", "measurement") not in STATE_CLASSES:
        problems.append(f"state_class: {config['state_class']}")
    return problems


def test_the_schema_check_refuses_what_home_assistant_refuses() -> None:
    """The check itself can fail: a config Home Assistant would not take is reported."""
    good = {"state_topic": "a/b", "unique_id": "x", "device": {"identifiers": ["d"]}, "payload_on": "alert"}
    assert schema_problems("binary_sensor", good) == []
    assert schema_problems("sensor", good) == ["unknown option payload_on"]
    assert schema_problems("binary_sensor", {**good, "device_class": "anomaly"})
    assert schema_problems("binary_sensor", {"unique_id": "x"}) == ["state_topic is required"]
    assert schema_problems("binary_sensor", {"state_topic": "a", "device": {"name": "d"}})  # no unique_id, ids
    assert schema_problems("sensor", {"state_topic": "a", "qos": 3, "state_class": "gauge"})


def test_node_id_and_discovery_prefix_are_validated() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"homeassistant": {"enabled": True, "node_id": "my box", "discovery_prefix": "ha/#"}})
    assert err.value.errors == [
        'homeassistant.discovery_prefix: must be an MQTT topic without wildcards or a leading/trailing /, got "ha/#"',
        'homeassistant.node_id: must be letters, digits, _ and - only (Home Assistant\'s rule), got "my box"']
    assert not config_from_dict({}).homeassistant.enabled  # off unless asked for


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], int, bool]] = []

    def publish(self, topic: str, payload: str | bytes, qos: int = 0, retain: bool = False) -> None:
        self.sent.append((topic, json.loads(payload) if payload else None, qos, retain))


def test_announced_once_per_device_and_again_when_the_score_topic_changes() -> None:
    from sensord.homeassistant import HomeAssistantDiscovery
    pub = _Recorder()
    ha = HomeAssistantDiscovery(pub, "sensord", "homeassistant", None, publish_scores=False)
    ha.announce("pump1")
    ha.announce("pump1")
    assert [t for t, _, _, _ in pub.sent] == ["homeassistant/binary_sensor/sensord/pump1/config",
                                             "homeassistant/sensor/sensord/pump1_score/config"]
    assert all(qos == 1 and retain for _, _, qos, retain in pub.sent)
    assert pub.sent[1][1]["state_topic"] == "sensord/state/pump1"
    ha.set_publish_scores(True)  # a reload turned per-window scores on: the score sensor follows them
    ha.announce("pump1")
    assert len(pub.sent) == 4 and pub.sent[3][1]["state_topic"] == "sensord/scores/pump1"
    assert pub.sent[2][1] == pub.sent[0][1]  # the binary sensor's config is the same


def test_forgetting_a_device_empties_its_retained_configs_and_a_return_announces_it_again() -> None:
    from sensord.homeassistant import HomeAssistantDiscovery
    pub = _Recorder()
    ha = HomeAssistantDiscovery(pub, "sensord", "homeassistant", None, publish_scores=False)
    ha.forget("pump9")  # never announced by this process: its configs may be retained from an earlier run
    assert pub.sent == [(t, None, 1, True) for t in ha.topics("pump9")]  # empty and retained: removed
    pub.sent.clear()
    ha.announce("pump1")
    ha.forget("pump1")
    ha.announce("pump1")  # back after being forgotten: announced again
    binary, score = ha.topics("pump1")
    configs = ha.configs("pump1")
    assert pub.sent == [(binary, configs[0], 1, True), (score, configs[1], 1, True),
                        (binary, None, 1, True), (score, None, 1, True),
                        (binary, configs[0], 1, True), (score, configs[1], 1, True)]


# -- sensord's configs, through a real broker ------------------------------------------------------

@pytest.fixture(scope="module")
def bundle_and_rows(tiny_bundle: TrainedBundle) -> tuple[Path, Series]:
    return tiny_bundle.bundle, tiny_bundle.labelled.slice(0, 2 * TINY_WINDOW)


def test_each_device_appears_in_home_assistant_with_valid_retained_configs(
        broker: MosquittoBroker, topic_root: str, tmp_path: Path, bundle_and_rows: tuple[Path, Series]) -> None:
    bundle, rows = bundle_and_rows
    prefix, discovery = f"{topic_root}/out", f"{topic_root}/homeassistant"
    doc = daemon_config(broker, bundle, window=TINY_WINDOW, detector={"raise_after": 2, "clear_after": 5},
                        client_id=f"sensord-{topic_root[-8:]}", subscriptions=[f"{topic_root}/+/telemetry"],
                        device_topic=f"{topic_root}/{{device}}/telemetry", topic_prefix=prefix)
    doc["homeassistant"] = {"enabled": True, "discovery_prefix": discovery}
    devices = ["pump1", "Pump 2.b"]
    d = DaemonProcess(tmp_path, "sensord", doc)
    pub = None
    try:
        d.wait_log("ready: serving model")
        pub = QosPublisher(broker)
        for device in devices:
            for i in range(TINY_WINDOW):
                body = {"ts": float(rows.timestamps[i]),
                        "values": dict(zip(rows.channels, np.asarray(rows.values[i], float).tolist(), strict=True))}
                pub.send_raw(f"{topic_root}/{device}/telemetry", json.dumps(body))
        for device in devices:
            d.wait_metric("sensord_windows_scored_total", 1.0, device=device)
        d.wait_log("home assistant discovery published for device=Pump 2.b")

        # A Home Assistant starting now: it subscribes and gets the retained configs. (The log line comes when
        # the daemon hands them to paho, a moment before they reach the broker: a subscription in that moment
        # gets them live, without the retain flag, so a fresh one is tried until the broker holds them.)
        def subscribe_now() -> list[RecordedMessage] | None:
            with MqttRecorder(broker.host, broker.port, f"{discovery}/#") as ha:
                got: list[RecordedMessage] = wait_until(lambda: len(ha.messages()) >= 4 and ha.messages(), 10,
                                                        "four configs")
            return got if all(m.retain for m in got) else None
        configs = wait_until(subscribe_now, 20, "four retained configs", interval=0.2)
        assert len(configs) == 4 and all(m.retain for m in configs)
        by_topic = {m.topic: json.loads(m.payload) for m in configs}
        with MqttRecorder(broker.host, broker.port, f"{prefix}/#") as own:
            retained = wait_until(lambda: {m.topic: m.payload for m in own.messages() if m.retain}
                                  if len(own.messages()) >= 3 else None, 10, "sensord's retained status and states")

        seen: dict[str, set[str]] = {"binary_sensor": set(), "sensor": set()}
        unique_ids = set()
        for topic, config in by_topic.items():
            m = DISCOVERY_TOPIC.fullmatch(topic)
            assert m is not None and m.group("prefix") == discovery, topic
            component = m.group("component")
            assert schema_problems(component, config) == [], (topic, config)
            unique_ids.add(config["unique_id"])
            device = config["device"]["name"]
            seen[component].add(device)
            # Available while sensord runs: its retained status is the payload the config calls available.
            assert config["availability_topic"] == f"{prefix}/status"
            assert retained[config["availability_topic"]].decode() == config["payload_available"]
            # The topic read carries what the template reads: state -> payload_on/off, score -> a number.
            state = json.loads(retained[config["state_topic"]])
            assert config["state_topic"] == f"{prefix}/state/{device}"
            if component == "binary_sensor":
                assert config["value_template"] == "{{ value_json.state }}" and config["device_class"] == "problem"
                assert state["state"] == config["payload_off"] and config["payload_on"] == "alert"
            else:
                assert config["value_template"] == "{{ value_json.score }}"
                assert isinstance(state["score"], float) and config["state_class"] == "measurement"
        assert seen == {"binary_sensor": set(devices), "sensor": set(devices)}
        assert len(unique_ids) == 4
        # One Home Assistant device per sensord device: both entities carry its identifiers.
        ids = {c["device"]["name"]: set() for c in by_topic.values()}
        for c in by_topic.values():
            ids[c["device"]["name"]].add(tuple(c["device"]["identifiers"]))
        assert all(len(v) == 1 for v in ids.values()) and len({next(iter(v)) for v in ids.values()}) == 2

        # A clean stop: the status topic says offline, which the configs call unavailable.
        assert d.terminate() == 0
        with MqttRecorder(broker.host, broker.port, f"{prefix}/status") as status:
            (last,) = wait_until(status.messages, 10, "the retained status")
        assert last.payload.decode() == next(iter(by_topic.values()))["payload_not_available"]
    finally:
        if pub is not None:
            pub.close()
        d.stop()



def _retained(broker: MosquittoBroker, topic_filter: str, marker_topic: str) -> dict[str, bytes]:
    """What a subscriber starting now gets retained under ``topic_filter`` (``marker_topic`` must match it): the
    broker sends the retained messages on subscription, before a marker published afterwards, so once the marker
    is in nothing retained is still on its way."""
    with MqttRecorder(broker.host, broker.port, topic_filter) as rec:
        marker = QosPublisher(broker)
        try:
            marker.send_raw(marker_topic, b"marker")
        finally:
            marker.close()
        rec.wait_for(lambda m: m.topic == marker_topic, timeout=10)
        return {m.topic: m.payload for m in rec.messages() if m.retain}


def _retained_at_least(broker: MosquittoBroker, topic_filter: str, marker_topic: str,
                       n: int) -> dict[str, bytes] | None:
    """:func:`_retained` once it holds ``n`` messages (else None, for wait_until to try a fresh subscription)."""
    got = _retained(broker, topic_filter, marker_topic)
    return got if len(got) >= n else None


def test_a_forgotten_device_disappears_from_home_assistant_and_comes_back_with_its_readings(
        broker: MosquittoBroker, topic_root: str, tmp_path: Path, bundle_and_rows: tuple[Path, Series]) -> None:
    """Through a real broker: after ``daemon.device_forget_seconds`` of silence the device's retained discovery
    configs are gone (what a Home Assistant starting then would read: nothing, so no entity), and its next
    readings announce it again."""
    bundle, rows = bundle_and_rows
    prefix, discovery = f"{topic_root}/out", f"{topic_root}/homeassistant"
    doc = daemon_config(broker, bundle, window=TINY_WINDOW, detector={"raise_after": 2, "clear_after": 5},
                        client_id=f"sensord-{topic_root[-8:]}", subscriptions=[f"{topic_root}/+/telemetry"],
                        device_topic=f"{topic_root}/{{device}}/telemetry", topic_prefix=prefix)
    doc["homeassistant"] = {"enabled": True, "discovery_prefix": discovery}
    doc["daemon"].update({"device_timeout_seconds": 1.0, "device_forget_seconds": 3.0})
    d = DaemonProcess(tmp_path, "sensord", doc)
    pub = None
    marker = f"{discovery}/marker"

    def send_window(again: bool) -> None:
        for i in range(TINY_WINDOW):
            body = {"ts": float(rows.timestamps[i]) + (1000.0 if again else 0.0),
                    "values": dict(zip(rows.channels, np.asarray(rows.values[i], float).tolist(), strict=True))}
            assert pub is not None
            pub.send_raw(f"{topic_root}/pump1/telemetry", json.dumps(body))
    try:
        d.wait_log("ready: serving model")
        pub = QosPublisher(broker)
        send_window(again=False)
        d.wait_log("home assistant discovery published for device=pump1")
        # (The log line comes when paho is handed the configs, a moment before they reach the broker.)
        configs = wait_until(lambda: _retained_at_least(broker, f"{discovery}/#", marker, 2), 10,
                             "the two retained configs")
        assert len(configs) == 2, configs
        for topic, body in configs.items():
            m = DISCOVERY_TOPIC.fullmatch(topic)
            assert m is not None and m.group("object_id") in ("pump1", "pump1_score"), topic
            assert json.loads(body)["device"]["name"] == "pump1"

        d.wait_log("device=pump1 forgotten after its silence", timeout=20)
        # Gone from the broker (what Home Assistant reads at its start); a running one got the empty payloads.
        wait_until(lambda: _retained(broker, f"{discovery}/#", marker) == {}, 10, "the retained configs removed")
        assert "home assistant discovery removed for device=pump1" in d.log()

        send_window(again=True)  # the device is back (readings later than its last): announced again
        d.wait_log("home assistant discovery published for device=pump1", timeout=15)
        wait_until(lambda: d.log().count("home assistant discovery published for device=pump1") == 2, 15,
                   "the second announcement")
        again = wait_until(lambda: _retained_at_least(broker, f"{discovery}/#", marker, 2), 10,
                           "the two retained configs again")
        assert again == configs
        assert d.alive()
    finally:
        if pub is not None:
            pub.close()
        d.stop()
