"""End to end: a device that goes quiet becomes ``stale`` (retained state, availability ``offline``, its raised
alert kept) after ``daemon.device_timeout_seconds``, and is forgotten after ``device_forget_seconds`` (window,
detector and metric labels gone), so ``max_devices`` counts live devices."""

from __future__ import annotations

import json
import time

import pytest
from e2e_support import wait_until
from test_daemon_e2e import E2E, FAULT_START, Models, W, with_step
from test_daemon_e2e import e2e as e2e
from test_daemon_e2e import models as models

pytestmark = pytest.mark.e2e


def test_a_silent_device_goes_stale_keeps_its_alert_then_is_forgotten(e2e: E2E, models: Models) -> None:
    seg = with_step(models.labelled.slice(0, 400), FAULT_START, FAULT_START + 100)
    d = e2e.start(daemon={"max_devices": 1, "device_timeout_seconds": 1.0, "device_forget_seconds": 4.0})
    before = time.time()
    e2e.stream.send_rows("quiet", seg, 0, FAULT_START + 20)
    e2e.wait_alert("quiet", "raised")
    assert d.metric("sensord_channel_error_share", device="quiet", channel="current") is not None
    last = d.metric("sensord_last_reading_timestamp_seconds", device="quiet")  # this host's clock, not the device's
    assert last is not None and before <= last <= time.time()
    e2e.stream.send_row("other", seg, 0)  # max_devices = 1: the quiet device still holds the place
    d.wait_metric("sensord_readings_rejected_total", 1, reason="device_limit")

    state_topic, avail_topic = f"{e2e.prefix}/state/quiet", f"{e2e.prefix}/availability/quiet"
    e2e.rec.wait_for(lambda m: m.topic == state_topic and json.loads(m.payload)["state"] == "stale", timeout=15)
    state = json.loads(e2e.retained("state/quiet").payload)
    assert state["state"] == "stale" and state["alert"] is True  # its alert is kept, not cleared
    assert json.loads(e2e.retained("availability/quiet").payload) == {"state": "offline"}
    assert [a["state"] for a in e2e.alerts("quiet")] == ["raised"]

    d.wait_metric("sensord_devices", 0, timeout=20)  # forgotten: its buffer and metric labels are gone
    wait_until(lambda: d.metric("sensord_last_reading_timestamp_seconds", device="quiet") is None, 10,
               "the forgotten device's labels to go")
    assert d.metric("sensord_windows_scored_total", device="quiet") is None
    assert d.metric("sensord_anomaly_state", device="quiet") is None
    assert not [k for k in d.metrics() if k[0] == "sensord_channel_error_share" and ("device", "quiet") in k[1]]
    e2e.stream.send_rows("other", seg, 0, W + 4)  # its place is free now
    d.wait_metric("sensord_windows_scored_total", 5, device="other")
    assert d.metric("sensord_readings_rejected_total", reason="device_limit") == 1
    assert avail_topic in {m.topic for m in e2e.rec.messages()}
