"""``sensord record`` without a broker: the recorder fed messages directly (every input format gives the
same CSV), its checks (the daemon's reasons), where its channels and clock come from, and its arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_formats import spb_payload

from sensord.config import ConfigError, config_from_dict
from sensord.dataio import load_csv
from sensord.errors import UsageError
from sensord.record import Recorder, parse_duration, prepare_out, recording_source

CHANNELS = ("temp", "flow", "amps")
ROWS = 30


def config(**extra: Any) -> Any:
    doc: dict[str, Any] = {
        "data": {"channels": list(CHANNELS)},
        "assembly": {"sample_period_seconds": 1.0, "max_staleness_seconds": 5.0},
        "daemon": {"model": "/nonexistent/model", "max_devices": 10},
        "mqtt": {"subscriptions": [
            {"topic": "s/+/telemetry", "device_topic": "s/{device}/telemetry"},
            {"topic": "p/+/+", "format": "topic_per_channel", "device_topic": "p/{device}/{channel}"},
            {"topic": "z/+", "device_topic": "z/{device}", "partial": True},
            {"topic": "telegraf", "device_field": "tags.host", "values_field": "fields",
             "timestamp_field": "timestamp"},
            {"topic": "influx", "format": "influx_line", "precision": "ms"},
            {"topic": "spBv1.0/g/#", "format": "sparkplug_b"}]},
    }
    doc.update(extra)
    return config_from_dict(doc)


def feed_every_format(rec: Recorder, values: np.ndarray, t0: float = 1_700_000_000.0) -> None:
    take = rec.on_message
    take("spBv1.0/g/NBIRTH/e1", spb_payload([{"name": "bdSeq", "alias": 0, "long_value": 0}], seq=0))
    take("spBv1.0/g/DBIRTH/e1/spb", spb_payload(
        [{"name": f"Sensors/{ch}", "alias": 10 + j, "datatype": 10, "is_null": True}
         for j, ch in enumerate(CHANNELS)], seq=1))
    for i, row in enumerate(values):
        ts = t0 + i
        take("s/json/telemetry", json.dumps({"ts": ts, **dict(zip(CHANNELS, map(float, row), strict=True))}).encode())
        for ch, v in reversed(list(zip(CHANNELS, row, strict=True))):
            take(f"p/tpc/{ch}", json.dumps({"value": repr(float(v)), "ts": ts}).encode())
        take("z/rbe", json.dumps({"ts": ts, **{ch: float(v) for ch, v in zip(CHANNELS, row, strict=True)
                                               if i % 3 == 0 or ch != "flow"}}).encode())
        take("telegraf", json.dumps({"metrics": [{"name": "m", "tags": {"host": "telegraf"}, "timestamp": ts,
                                                  "fields": dict(zip(CHANNELS, map(float, row), strict=True))}]})
             .encode())
        fields = ",".join(f"{ch}={float(v)!r}" for ch, v in zip(CHANNELS, row, strict=True))
        take("influx", f"m,host=influx {fields} {round(ts * 1000)}".encode())
        take("spBv1.0/g/DDATA/e1/spb", spb_payload(
            [{"alias": 10 + j, "timestamp": round(ts * 1000), "double_value": float(v)} for j, v in enumerate(row)],
            seq=(2 + i) % 256))


def test_every_input_format_records_the_same_csv(tmp_path: Path) -> None:
    cfg = config()
    rng = np.random.default_rng(1)
    values = rng.normal(20, 3, size=(ROWS, len(CHANNELS))).round(3)
    values[:, 1] = values[np.arange(ROWS) // 3 * 3, 1]  # flow changes every third sample, when "rbe" sends it
    rec = Recorder(cfg, tmp_path, CHANNELS, 1.0)
    feed_every_format(rec, values)
    rec.close()
    s = rec.summary()
    assert s.rejected == 0, (s.messages_rejected, s.readings_rejected)
    reference = (tmp_path / "json.csv").read_text()
    for device in ("tpc", "rbe", "telegraf", "influx", "spb"):
        got = (tmp_path / f"{device}.csv").read_text()
        # report by exception decides its last tick only when a later value comes: one row short
        assert got == reference or (device == "rbe" and reference.startswith(got)), device
    series = load_csv(tmp_path / "json.csv")
    assert series.channels == CHANNELS and len(series) == ROWS
    np.testing.assert_array_equal(series.values, values.astype(np.float32))
    assert rec.on_message("s/json/telemetry", b"{}") is False  # closed: nothing more is taken


def test_rows_are_checked_as_the_daemon_checks_them(tmp_path: Path) -> None:
    cfg = config(daemon={"model": "/nonexistent", "max_devices": 2, "max_device_id_bytes": 8})
    rec = Recorder(cfg, tmp_path, CHANNELS, 1.0, devices="p*")

    def send(device: str, ts: float, temp: object = 1.0) -> None:
        rec.on_message(f"s/{device}/telemetry", json.dumps({"ts": ts, "temp": temp, "flow": 2, "amps": 3}).encode())
    send("p1", 10)
    send("p1", 9)  # older than the last row
    send("p1", 11, "x")
    send("p1", 12, 1e39)  # finite as float64, not as float32: the window's check
    send("fan", 10)  # --devices
    send("fan", 11, "x")  # an ignored device's bad reading is not counted either
    send("p2", 10)
    send("p3", 10)  # third device over daemon.max_devices
    send("p-too-long", 10)
    rec.on_message("s/p1/telemetry", b"[1, 2")
    rec.on_message("s/p1/telemetry", b'{"ts": 13, "temp": 1, "flow": 2, "amps": 3}', retained=True)
    rec.close()
    s = rec.summary()
    assert dict(s.readings_rejected) == {"out_of_order": 1, "bad_value": 1, "non_finite": 1, "device_limit": 1,
                                         "bad_device_id": 1}
    assert dict(s.messages_rejected) == {"malformed_json": 1, "retained": 1}
    assert {d: rows for d, (rows, *_) in s.devices.items()} == {"p1": 1, "p2": 1}
    assert s.ignored_devices == 1 and not (tmp_path / "fan.csv").exists()


def test_channels_and_clock_come_from_the_config_without_a_model() -> None:
    assert recording_source(config()) == (CHANNELS, 1.0)
    with pytest.raises(ConfigError, match=r"data\.channels: is required by sensord record"):
        recording_source(config(data={}))
    with pytest.raises(ConfigError, match=r"assembly\.sample_period_seconds: is required: mqtt\.subscriptions\.1"):
        recording_source(config(assembly={}))
    json_only = config(assembly={}, mqtt={"subscriptions": ["s/+/telemetry"], "device_topic": "s/{device}/telemetry"})
    assert recording_source(json_only) == (CHANNELS, None)  # whole rows need no clock


def test_out_must_not_hold_recordings(tmp_path: Path) -> None:
    prepare_out(tmp_path / "new")
    (tmp_path / "new" / "pump1.csv").write_text("timestamp,a\n")
    with pytest.raises(UsageError, match="already holds recordings"):
        prepare_out(tmp_path / "new")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is not a directory"):
        prepare_out(tmp_path / "file")


@pytest.mark.parametrize("text", ["", "0", "-5", "5x", "h", "1h 30m", "inf"])
def test_bad_durations_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="--duration"):
        parse_duration(text)
