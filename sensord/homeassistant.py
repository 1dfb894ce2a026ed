"""Home Assistant MQTT discovery: each device sensord scores appears in Home Assistant by itself.

With ``homeassistant.enabled``, the first time a device is scored (in this process) sensord publishes two
retained discovery configs: a ``binary_sensor`` that is on while the device's alert is raised and a
``sensor`` with its anomaly score, both grouped under one Home Assistant device per sensord device and
marked unavailable when sensord's status topic says ``offline`` (its clean shutdown and its last will).
They read sensord's own topics (the retained ``{prefix}/state/{device}``, and ``{prefix}/scores/{device}``
when ``mqtt.publish_scores`` is on), so nothing is published twice. Retained, so a Home Assistant started
later still finds them; published again at every start, which is harmless (same payload). When sensord forgets
a device (``daemon.device_forget_seconds`` of silence) it publishes an empty retained payload on both config
topics: the broker drops the retained configs and Home Assistant removes the entities and their device.

Topic levels must match ``[a-zA-Z0-9_-]+`` in Home Assistant; a device id with other characters gets a
sanitised object id with a short hash of the id, so two ids never share one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

from . import __version__
from .sinks import Publisher

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def object_id(name: str) -> str:
    """A Home Assistant topic level for ``name``: itself if allowed, else sanitised plus 8 hex of its hash.

    >>> object_id("pump1"), object_id("Pump 2.b")
    ('pump1', 'Pump_2_b_61470966')
    """
    safe = _UNSAFE.sub("_", name)
    if safe == name:
        return name
    return f"{safe[:64]}_{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"


class HomeAssistantDiscovery:
    """Announces each device once per process: a binary sensor (alert) and a sensor (score), retained."""

    def __init__(self, publisher: Publisher, prefix: str, discovery_prefix: str, node_id: str | None,
                 publish_scores: bool, status_topic: str | None = None) -> None:
        self.publisher = publisher
        self.prefix = prefix
        self.status_topic = status_topic or f"{prefix}/status"
        self.discovery_prefix = discovery_prefix
        self.node_id = node_id or object_id(prefix)
        self.publish_scores = publish_scores
        self._announced: set[str] = set()

    def topics(self, device: str) -> tuple[str, str]:
        """The two discovery config topics of ``device``: binary sensor, sensor."""
        obj = object_id(device)
        return (f"{self.discovery_prefix}/binary_sensor/{self.node_id}/{obj}/config",
                f"{self.discovery_prefix}/sensor/{self.node_id}/{obj}_score/config")

    def configs(self, device: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The discovery payloads of ``device`` (binary sensor, sensor), as Home Assistant documents them."""
        obj = object_id(device)
        state = f"{self.prefix}/state/{device}"
        common: dict[str, Any] = {
            "availability_topic": self.status_topic,
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": {"identifiers": [f"sensord_{self.node_id}_{obj}"], "name": device,
                       "manufacturer": "sensord", "model": "anomaly detector", "sw_version": __version__},
            "qos": 1,
        }
        alert = {
            **common,
            "name": "Anomaly",
            "unique_id": f"sensord_{self.node_id}_{obj}_alert",
            "state_topic": state,
            "value_template": "{{ value_json.state }}",
            "payload_on": "alert",
            "payload_off": "normal",
            "device_class": "problem",
            "json_attributes_topic": state,  # since, score and model_id as attributes
        }
        # Every window's score when sensord publishes them; else the score at the last state change.
        score_topic = f"{self.prefix}/scores/{device}" if self.publish_scores else state
        score = {
            **common,
            "name": "Anomaly score",
            "unique_id": f"sensord_{self.node_id}_{obj}_score",
            "state_topic": score_topic,
            "value_template": "{{ value_json.score }}",
            "state_class": "measurement",
            "suggested_display_precision": 2,
            "icon": "mdi:chart-bell-curve",
        }
        return alert, score

    def announce(self, device: str) -> None:
        """Publish ``device``'s discovery configs unless done already in this process."""
        if device in self._announced:
            return
        self._announced.add(device)
        for topic, body in zip(self.topics(device), self.configs(device), strict=True):
            self.publisher.publish(topic, json.dumps(body), qos=1, retain=True)
        log.info("home assistant discovery published for device=%s", device)

    def forget(self, device: str) -> None:
        """Remove ``device`` from Home Assistant: an empty retained payload on each of its config topics deletes
        the retained config at the broker, and Home Assistant removes the entity (the device with its last one).

        Sent whether or not this process announced it: the configs may be retained from an earlier run.
        """
        self._announced.discard(device)  # if it comes back, it is announced again
        for topic in self.topics(device):
            self.publisher.publish(topic, b"", qos=1, retain=True)
        log.info("home assistant discovery removed for device=%s", device)

    def set_publish_scores(self, publish_scores: bool) -> None:
        """After a reload: if the score sensor's topic changes, every device is announced again."""
        if publish_scores != self.publish_scores:
            self.publish_scores = publish_scores
            self._announced.clear()
