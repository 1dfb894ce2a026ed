"""The bare-subscriber baseline of bench/e2e.py: paho + ``json.loads``, nothing else (a separate process,
importing nothing of sensord, so its rate and RSS are the ceiling of a Python MQTT consumer on this box).

    python bench/bare_subscriber.py HOST PORT CLIENT_ID TOPIC_FILTER COUNT SESSION_EXPIRY

Resumes the persistent session CLIENT_ID (MQTT 5, QoS 1), takes COUNT messages and prints one JSON line:
readings/s from the CONNACK to the last message, and VmRSS.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def main() -> int:
    host, port, cid, topic, count, expiry = sys.argv[1:7]
    n = int(count)
    times: dict[str, float] = {}
    got = [0]
    done = threading.Event()

    def on_connect(c: mqtt.Client, *_a: Any) -> None:
        times["t0"] = time.perf_counter()
        c.subscribe(topic, qos=1)

    def on_message(_c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        json.loads(m.payload)
        got[0] += 1
        if got[0] == n:
            times["t1"] = time.perf_counter()
            done.set()

    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    c.on_connect, c.on_message = on_connect, on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = int(expiry)
    c.connect(host, int(port), keepalive=30, clean_start=False, properties=props)
    c.loop_start()
    if not done.wait(600):
        print(f"bare subscriber: timed out with {got[0]} of {n} messages", file=sys.stderr)
        return 1
    rss = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmRSS:")) / 1024
    print(json.dumps({"rate": n / (times["t1"] - times["t0"]), "rss_mib": rss}))
    c.loop_stop()
    c.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
