"""End to end: hostile input beside a healthy device, through a real private Mosquitto.

The healthy device must lose nothing: every one of its windows is scored and published, whatever the
others send; everything hostile is counted under a rejection reason.
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_daemon_e2e as base
from test_daemon_e2e import E2E, Models, W

pytestmark = pytest.mark.e2e

models = base.models
e2e = base.e2e


def reading(models: Models, i: int, **extra: Any) -> dict[str, Any]:
    s = models.labelled
    return {**extra, "ts": float(s.timestamps[i]),
            "values": {ch: float(s.values[i, j]) for j, ch in enumerate(s.channels)}}


def test_ids_that_cannot_be_a_topic_level_never_cost_a_neighbour_a_window(e2e: E2E, models: Models) -> None:
    """The issue's finding: ids with '#' or '+' from the payload made publishing raise and whole batches
    (the neighbour's windows included) were skipped."""
    topic = f"{e2e.root}/plant/line1"
    d = e2e.start(mqtt={"device_field": "machine", "device_topic": None, "subscriptions": [f"{e2e.root}/plant/#"],
                        "publish_scores": True})
    bad_ids = ["pump#1", "pump+2", "hall/pump3", "nul\u0000"]
    n = 120
    for i in range(n):
        e2e.stream.send_raw(topic, json.dumps(reading(models, i, machine="pump1")))
        e2e.stream.send_raw(topic, json.dumps([reading(models, i, machine=b) for b in bad_ids]))
    d.wait_metric("sensord_windows_scored_total", n - W + 1, device="pump1")
    d.wait_metric("sensord_readings_rejected_total", n * len(bad_ids), reason="bad_device_id")
    m = d.metrics()
    assert m[("sensord_messages_received_total", ())] == 2 * n
    assert m[("sensord_devices", ())] == 1
    assert sum(v for (name, _), v in m.items() if name == "sensord_window_errors_total") == 0
    scores = e2e.rec.wait_for(lambda msg: len(e2e.rec.messages(f"{e2e.prefix}/scores/pump1")) >= n - W + 1, 10)
    assert len([s for s in scores if s.topic == f"{e2e.prefix}/scores/pump1"]) == n - W + 1
    assert all(m.topic.split("/")[-1] == "pump1" for m in e2e.rec.messages(f"{e2e.prefix}/")
               if "/scores/" in m.topic or "/state/" in m.topic)
    log = d.log()
    assert "reason=bad_device_id" in log and "MQTT topic characters" in log
    assert d.alive()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Fuzz:
    """Hostile messages, each with the one rejection (or acceptance) it must be counted as."""

    def __init__(self, models: Models, topic: Callable[[str], str], rng: random.Random) -> None:
        self.models, self.topic, self.rng = models, topic, rng
        self.messages: list[tuple[str, bytes]] = []
        self.expected: Counter[tuple[str, str]] = Counter()  # (metric kind, reason) -> count
        self.accepted = 0
        self.clipped = 0
        self.t_nf = 1_700_000_000.0

    def add(self, device: str, payload: bytes, kind: str, reason: str) -> None:
        self.messages.append((self.topic(device), payload))
        if kind == "accepted":
            self.accepted += 1
        else:
            self.expected[(kind, reason)] += 1

    def body(self, i: int, **values: Any) -> dict[str, Any]:
        s = self.models.labelled
        return {ch: float(s.values[i, j]) for j, ch in enumerate(s.channels)} | values

    def build(self) -> list[tuple[str, bytes]]:
        rng = self.rng
        for _ in range(2400):  # random bytes (never valid JSON: 0xff is never UTF-8)
            self.add("evil", b"\xff" + rng.randbytes(rng.randrange(0, 300)), "message", "malformed_json")
        for _ in range(1000):  # invalid UTF-8 inside otherwise fine JSON
            self.add("evil", b'{"ts": 1, "values": {"current": "\xc3\x28"}}', "message", "malformed_json")
        for _ in range(100):
            self.add("evil", b"", "message", "malformed_json")
        for _ in range(400):  # deep nesting
            self.add("evil", b"[" * 50_000, "message", "malformed_json")
        for _ in range(300):  # huge arrays
            self.add("evil", b"[" + b"1," * 20_000 + b"1]", "message", "bad_payload")
        for _ in range(3):  # 10 MB
            self.add("evil", b'{"pad": "' + b"x" * 10_000_000 + b'"}', "message", "too_large")
        specials = [b"NaN", b"Infinity", b"-Infinity", b"1e999"]
        for k in range(1500):  # NaN / Infinity / 1e999: parsed, then refused by the window buffer
            self.t_nf += 1
            raw = json.dumps({"ts": self.t_nf, "values": self.body(k % 100, current=0.0)}).encode()
            raw = raw.replace(b'"current": 0.0', b'"current": ' + specials[k % 4])
            self.add("evil-nf", raw, "reading", "non_finite")
        big = str(10**400)
        for k in range(600):  # numbers beyond any float: clipped to the healthy range (arrival time: in order)
            raw = json.dumps({"values": self.body(k % 100, current=0)}).encode()
            self.add("evil-big", raw.replace(b'"current": 0', b'"current": ' + big.encode()), "accepted", "")
            self.clipped += 1
        wrong: list[tuple[Any, str, str]] = [
            ({"ts": 1, "values": "x"}, "reading", "bad_value"),
            ({"ts": 1, "values": [1, 2, 3]}, "reading", "bad_value"),
            ({"ts": 1, "values": self.body(0, current="1.0 A")}, "reading", "bad_value"),  # "1.0" is a number
            ({"ts": 1, "values": self.body(0, current=[1.0])}, "reading", "bad_value"),
            ({"ts": 1, "values": self.body(0, current=True)}, "reading", "bad_value"),
            ({"ts": 1, "values": {"current": 1.0}}, "reading", "missing_channel"),
            (5, "message", "bad_payload"),
            ("reading", "message", "bad_payload"),
            ([], "message", "bad_payload"),
            ({"ts": "never", "values": self.body(0)}, "reading", "bad_timestamp"),
            ({"ts": True, "values": self.body(0)}, "reading", "bad_timestamp"),
            ({"ts": "2024-13-45", "values": self.body(0)}, "reading", "bad_timestamp"),
        ]
        for k in range(2400):  # wrong types and bad timestamps
            doc, kind, reason = wrong[k % len(wrong)]
            self.add("evil", json.dumps(doc).encode(), kind, reason)
        for _ in range(200):
            self.add("evil", b'{"ts": 1e400, "values": {}}', "reading", "bad_timestamp")
        for _ in range(300):  # 10 kB device ids (a valid topic level, not a valid device id)
            self.add("d" * 10_000, json.dumps({"ts": 1, "values": self.body(0)}).encode(), "reading",
                     "bad_device_id")
        for k in range(400):  # a year ahead of this host's clock
            raw = json.dumps({"ts": time.time() + 365 * 86400 + k, "values": self.body(k % 100)}).encode()
            self.add("evil-future", raw, "reading", "future_timestamp")
        # Ancient and duplicate timestamps after one good reading: older is out_of_order, equal is accepted.
        t0 = time.time() - 3600
        self.add("evil-ts", json.dumps({"ts": t0, "values": self.body(0)}).encode(), "accepted", "")
        first = self.messages.pop()  # sent before the shuffled rest, so it is the device's first reading
        for k in range(800):
            if k % 2:
                self.add("evil-ts", json.dumps({"ts": t0, "values": self.body(k % 100)}).encode(), "accepted", "")
            else:
                self.add("evil-ts", json.dumps({"ts": 1000.0 + k, "values": self.body(k % 100)}).encode(),
                         "reading", "out_of_order")
        rng.shuffle(self.messages)
        self.messages.insert(0, first)
        return self.messages


def test_fuzz_ten_thousand_hostile_messages_beside_a_healthy_device(e2e: E2E, models: Models) -> None:
    fuzz = Fuzz(models, e2e.stream.topic, random.Random(7))
    hostile = fuzz.build()
    assert len(hostile) >= 10_000
    healthy = models.labelled.slice(0, 240)
    # Clock resync off: every reading older than its device's last one is out_of_order, however many in a row.
    d = e2e.start(daemon={"clock_resync_after": 1_000_000})
    warm = 20
    e2e.stream.send_rows("pump1", healthy, 0, warm)
    d.wait_metric("sensord_windows_scored_total", warm - W + 1, device="pump1")
    rss_before = rss_kib(d.pid)
    every = len(hostile) // (len(healthy) - warm) + 1
    client = e2e.stream.client
    last = None
    row = warm
    for k, (topic, payload) in enumerate(hostile):
        last = client.publish(topic, payload, qos=1)
        if k % every == 0 and row < len(healthy):
            e2e.stream.send_row("pump1", healthy, row)
            row += 1
    e2e.stream.send_rows("pump1", healthy, row)
    assert last is not None
    last.wait_for_publish(60)
    sent = warm + len(hostile) + len(healthy) - warm
    d.wait_metric("sensord_messages_received_total", sent, timeout=120)
    d.wait_metric("sensord_windows_scored_total", len(healthy) - W + 1, device="pump1", timeout=30)
    assert d.alive()
    m = d.metrics()
    got: Counter[tuple[str, str]] = Counter()
    for (name, labels), v in m.items():
        if name in ("sensord_messages_rejected_total", "sensord_readings_rejected_total") and v:
            got[("message" if name.startswith("sensord_messages") else "reading", dict(labels)["reason"])] = int(v)
    assert got == fuzz.expected
    assert sum(got.values()) + fuzz.accepted == len(hostile)
    assert m[("sensord_values_clipped_total", ())] == fuzz.clipped
    assert m[("sensord_windows_dropped_total", ())] == 0
    assert sum(v for (name, _), v in m.items() if name == "sensord_window_errors_total") == 0
    grown_mib = (rss_kib(d.pid) - rss_before) / 1024
    print(f"fuzz: {len(hostile)} hostile messages, RSS +{grown_mib:.1f} MiB")
    assert grown_mib < 20, f"RSS grew by {grown_mib:.1f} MiB"
    assert "internal_error" not in d.log() and "Traceback" not in d.log()


def test_stalled_clients_on_the_metrics_port_do_not_block_scrapes(e2e: E2E, models: Models) -> None:
    d = e2e.start()
    stalled = []
    try:
        for _ in range(5):  # connected, half a request sent, then silent
            s = socket.create_connection(("127.0.0.1", d.metrics_port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            stalled.append(s)
        e2e.stream.send_rows("pump1", models.labelled, 0, 20)
        d.wait_metric("sensord_windows_scored_total", 20 - W + 1, device="pump1")
        assert d.metric("sensord_messages_received_total") == 20
    finally:
        for s in stalled:
            s.close()
    assert d.alive()
