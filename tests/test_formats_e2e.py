"""End to end, one daemon through a private Mosquitto: the same simulated pump streamed as today's JSON,
as one topic per channel, as report-by-exception JSON, as Telegraf's JSON batch, as InfluxDB line protocol
and as Sparkplug B (births, then aliases only) gives the same windows
(same errors) and the same alerts, each format read by its own subscription of the one daemon."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest
from broker import MqttRecorder
from e2e_support import wait_until
from test_daemon_e2e import E2E, FAULT_START, FAULT_STOP, Models, W, with_step
from test_daemon_e2e import e2e as e2e
from test_daemon_e2e import models as models
from test_formats import spb_payload

from sensord.formats.sparkplug_b import Payload

pytestmark = pytest.mark.e2e

ROWS = 300
DEVICES = ("json", "tpc", "rbe", "telegraf", "influx", "spb")


def test_every_format_gives_the_json_streams_windows_and_alerts(e2e: E2E, models: Models) -> None:
    seg = with_step(models.labelled.slice(0, ROWS), FAULT_START, FAULT_STOP)
    chans, root = seg.channels, e2e.root
    group = root.replace("/", "-")  # a Sparkplug group id is one topic level
    d = e2e.start(
        mqtt={"publish_scores": True, "subscriptions": [
            f"{root}/sensors/+/telemetry",
            {"topic": f"{root}/plant/+/+", "format": "topic_per_channel",
             "device_topic": f"{root}/plant/{{device}}/{{channel}}"},
            {"topic": f"{root}/zigbee/+", "format": "json", "device_topic": f"{root}/zigbee/{{device}}",
             "partial": True},
            {"topic": f"{root}/telegraf", "format": "json", "device_field": "tags.host", "values_field": "fields",
             "timestamp_field": "timestamp"},
            {"topic": f"{root}/influx", "format": "influx_line", "precision": "ms"},
            {"topic": "spBv1.0/" + group + "/#", "format": "sparkplug_b"}]},
        assembly={"sample_period_seconds": 1.0, "max_staleness_seconds": 30.0})
    send = e2e.stream.send_raw
    # Sparkplug B: an edge node and its device are born (aliases named), then DDATA carries aliases only.
    spb = f"spBv1.0/{group}/{{}}/edge1"
    send(spb.format("NBIRTH"), spb_payload([{"name": "bdSeq", "alias": 0, "long_value": 0}], seq=0))
    send(spb.format("DBIRTH") + "/spb", spb_payload(
        [{"name": f"Sensors/{ch}", "alias": 10 + j, "datatype": 10, "is_null": True} for j, ch in enumerate(chans)],
        seq=1))
    rng = random.Random(7)
    previous: np.ndarray | None = None
    for i in range(ROWS):
        ts, row = float(seg.timestamps[i]), seg.values[i]
        e2e.stream.send_row("json", seg, i)
        for j in rng.sample(range(len(chans)), len(chans)):  # channel order varies within a sample
            value = float(row[j])  # half the channels as numeric strings; with ts, as a bare number has none
            send(f"{root}/plant/tpc/{chans[j]}", json.dumps({"value": repr(value) if j % 2 else value, "ts": ts}))
        changed = {ch: float(row[j]) for j, ch in enumerate(chans)
                   if previous is None or row[j] != previous[j] or i % 10 == 0}
        send(f"{root}/zigbee/rbe", json.dumps({"ts": ts, **changed}))
        previous = row
        metric: dict[str, Any] = {"name": "pump", "tags": {"host": "telegraf", "line": "1"},
                                  "timestamp": int(ts) if ts.is_integer() else ts,
                                  "fields": {ch: float(row[j]) for j, ch in enumerate(chans)}}
        send(f"{root}/telegraf", json.dumps({"metrics": [metric]}))
        fields = ",".join(f"{ch.replace(' ', chr(92) + ' ')}={float(row[j])!r}" for j, ch in enumerate(chans))
        send(f"{root}/influx", f"pump,host=influx,line=1 {fields} {round(ts * 1000)}")
        send(spb.format("DDATA") + "/spb", spb_payload(
            [{"alias": 10 + j, "timestamp": round(ts * 1000), "double_value": float(row[j])}
             for j in range(len(chans))], seq=(2 + i) % 256))
    # Each assembled row waits for a value past its tick unless all channels came stamped on it: one more
    # sample (after the compared ones) closes the last tick of the report-by-exception stream.
    end = float(seg.timestamps[-1]) + 1
    send(f"{root}/zigbee/rbe", json.dumps({"ts": end, chans[0]: 0.0}))

    windows = ROWS - W + 1
    for device in DEVICES:
        d.wait_metric("sensord_windows_scored_total", windows, device=device, timeout=60)
    topic = f"{e2e.prefix}/scores/{{}}"
    wait_until(lambda: all(len(e2e.rec.messages(topic.format(dev))) >= windows
                           for dev in DEVICES), 15, "every window's score")

    def scores(device: str) -> list[tuple[str, float, bool]]:
        return [(s["window_end"], s["error"], s["alert"])
                for s in map(json.loads, (m.payload for m in e2e.rec.messages(topic.format(device))))]

    reference = scores("json")
    assert len(reference) == windows and any(a for _, _, a in reference)
    alerts = [(a["state"], a["window_end"]) for a in e2e.alerts("json")]
    assert [s for s, _ in alerts] == ["raised", "cleared"]
    for device in DEVICES[1:]:
        got = scores(device)
        assert [(w, a) for w, _, a in got] == [(w, a) for w, _, a in reference], device
        np.testing.assert_allclose([e for _, e, _ in got], [e for _, e, _ in reference], rtol=1e-6)
        wait_until(lambda dev=device: len(e2e.alerts(dev)) >= 2, 10, f"{device}'s alerts")
        assert [(a["state"], a["window_end"]) for a in e2e.alerts(device)] == alerts, device
    assert d.metric("sensord_readings_rejected_total", reason="late_value") == 0
    for reason in ("bad_payload", "malformed_json", "no_device"):
        assert d.metric("sensord_messages_rejected_total", reason=reason) == 0, reason
    for reason in ("unknown_alias", "malformed_line", "missing_channel", "incomplete_row", "bad_value"):
        assert d.metric("sensord_readings_rejected_total", reason=reason) == 0, reason


def test_sparkplug_daemon_started_after_the_births_asks_for_a_rebirth_and_then_scores(
        e2e: E2E, models: Models) -> None:
    """An edge node born before sensord started sends aliases only: sensord publishes the NCMD
    ``Node Control/Rebirth``; the node (played here by the test) answers with its births and the device's
    windows are scored. Before that, the alias-only data is counted (``unknown_alias``), never guessed."""
    seg = models.labelled.slice(0, 60)
    chans = seg.channels
    group = e2e.root.replace("/", "-")
    node = f"spBv1.0/{group}/{{}}/edge1"
    births = [(node.format("NBIRTH"), spb_payload([{"name": "bdSeq", "long_value": 0}], seq=0)),
              (node.format("DBIRTH") + "/late", spb_payload(
                  [{"name": ch, "alias": 10 + j, "datatype": 10, "is_null": True} for j, ch in enumerate(chans)],
                  seq=1))]
    for topic, payload in births:  # before the daemon exists: it never sees them
        e2e.stream.send_raw(topic, payload)
    with MqttRecorder(e2e.broker.host, e2e.broker.port, node.format("NCMD")) as commands:
        d = e2e.start(mqtt={"subscriptions": [{"topic": f"spBv1.0/{group}/#", "format": "sparkplug_b",
                                               "rebirth_interval_seconds": 1.0}]},
                      assembly={"sample_period_seconds": 1.0, "max_staleness_seconds": 30.0})
        seq = 2

        def ddata(i: int) -> None:
            nonlocal seq
            e2e.stream.send_raw(node.format("DDATA") + "/late", spb_payload(
                [{"alias": 10 + j, "timestamp": round(float(seg.timestamps[i]) * 1000), "double_value": float(v)}
                 for j, v in enumerate(seg.values[i])], seq=seq % 256))
            seq += 1

        ddata(0)
        (cmd,) = commands.wait_for(lambda m: m.topic == node.format("NCMD"), timeout=10)
        (metric,) = Payload.FromString(cmd.payload).metrics
        assert (metric.name, metric.boolean_value) == ("Node Control/Rebirth", True)
        assert d.metric("sensord_readings_rejected_total", reason="unknown_alias") == len(chans)
        assert d.metric("sensord_sparkplug_rebirth_requests_total") == 1
        # The node answers with its births again (seq restarts at 0 with the NBIRTH), then its data.
        for topic, payload in births:
            e2e.stream.send_raw(topic, payload)
        seq = 2
        for i in range(1, len(seg.values)):
            ddata(i)
        e2e.stream.send_raw(node.format("NDATA"), spb_payload([], seq=seq % 256))  # closes the last tick
        windows = len(seg.values) - 1 - W + 1
        d.wait_metric("sensord_windows_scored_total", windows, device="late", timeout=30)
        assert d.metric("sensord_readings_rejected_total", reason="unknown_alias") == len(chans)
        assert d.metric("sensord_sparkplug_rebirth_requests_total") == 1  # in step since the births
