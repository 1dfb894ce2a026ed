"""Unit tests of the wire formats (sensord/formats/), the assembler (sensord/assembly.py) and the
subscription config that picks a format; property tests: any bytes on any topic give readings or a
counted rejection, never another exception."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensord.assembly import Assembler
from sensord.config import ConfigError, config_from_dict
from sensord.formats.base import ChannelUpdate, MessageRejected, Reading, device_id_problem
from sensord.formats.json import JsonParser
from sensord.formats.topic_per_channel import TopicPerChannelParser
from sensord.metrics import MESSAGE_REJECT_REASONS, READING_REJECT_REASONS

CHANNELS = ("temp", "flow")
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def telegraf() -> JsonParser:
    return JsonParser(CHANNELS, None, "tags.host", "timestamp", "fields", clock=lambda: 2e9)


# -- json, extended -------------------------------------------------------------------------------

def test_telegraf_json_batch_with_device_in_tags_host() -> None:
    """Telegraf's JSON serializer output (batch form), as its MQTT output publishes it."""
    msg = {"metrics": [
        {"fields": {"temp": 21.5, "flow": 3}, "name": "pump", "tags": {"host": "pump1", "line": "1"},
         "timestamp": 1700000000},
        {"fields": {"temp": "22.0", "flow": 3.5}, "name": "pump", "tags": {"host": "pump2"},
         "timestamp": 1700000001}]}
    out = telegraf().parse("telegraf/pumps", json.dumps(msg).encode())
    assert [(r.device, r.timestamp, r.values.tolist()) for r in out if isinstance(r, Reading)
            and r.values is not None] == [("pump1", 1.7e9, [21.5, 3.0]), ("pump2", 1700000001.0, [22.0, 3.5])]


def test_telegraf_single_metric_and_missing_host() -> None:
    one = {"fields": {"temp": 1, "flow": 2}, "name": "pump", "tags": {}, "timestamp": 1700000000}
    with pytest.raises(MessageRejected) as ei:
        telegraf().parse("t", json.dumps(one).encode())
    assert ei.value.reason == "no_device"


def test_partial_json_becomes_a_channel_update() -> None:
    p = JsonParser(CHANNELS, "z/{device}", None, "ts", "values", clock=lambda: 2e9, partial=True)
    (u,) = p.parse("z/plug1", b'{"ts": 100, "flow": "4.5", "linkquality": 80}')
    assert u == ChannelUpdate("plug1", 100.0, {"flow": 4.5})
    (r,) = p.parse("z/plug1", b'{"ts": 100, "linkquality": 80}')
    assert isinstance(r, Reading) and r.problem is not None and r.problem[0] == "missing_channel"


# -- topic_per_channel ----------------------------------------------------------------------------

def tpc() -> TopicPerChannelParser:
    return TopicPerChannelParser(CHANNELS, "plant/line1/{device}/{channel}", clock=lambda: 500.0)


@pytest.mark.parametrize(("payload", "value", "ts"), [
    (b"21.5", 21.5, 500.0), (b'"21.5"', None, None), (b" 21.5\n", 21.5, 500.0), (b"-3", -3.0, 500.0),
    (b'{"value": 21.5, "ts": 400}', 21.5, 400.0), (b'{"value": "7", "ts": "1970-01-01T00:01:40Z"}', 7.0, 100.0)])
def test_topic_per_channel_payloads(payload: bytes, value: float | None, ts: float | None) -> None:
    (u,) = tpc().parse("plant/line1/pump1/temp", payload)
    if value is None:  # a JSON string literal is not a bare number
        assert isinstance(u, Reading) and u.problem is not None and u.problem[0] == "bad_value"
    else:
        assert u == ChannelUpdate("pump1", ts, {"temp": value})  # type: ignore[arg-type]


def test_topic_per_channel_rejections() -> None:
    p = tpc()
    (r,) = p.parse("plant/line1/pump1/humidity", b"3")
    assert isinstance(r, Reading) and r.problem is not None and r.problem[0] == "unknown_channel"
    (r,) = p.parse("plant/line1/pump1/temp", b"warm")
    assert isinstance(r, Reading) and r.problem is not None and r.problem[0] == "bad_value"
    for topic, payload, reason in [("other/pump1/temp", b"1", "no_device"),
                                   ("plant/line1/pump1/temp", b"\xff", "bad_payload"),
                                   ("plant/line1/pump1/temp", b"{oops", "malformed_json"),
                                   ("plant/line1/pump1/temp", b'{"v": 1}', "bad_payload")]:
        with pytest.raises(MessageRejected) as ei:
            p.parse(topic, payload)
        assert ei.value.reason == reason


# -- the assembler ------------------------------------------------------------------------------

def rows(a: Assembler, device: str, ts: float, **values: float) -> list[tuple[float, list[float]]]:
    return [(t, v.tolist()) for t, v in a.add(device, ts, values).rows]


def test_assembler_whole_samples_give_one_row_each_at_once() -> None:
    """A gateway that sends every channel of a sample (one topic each) gets its row as soon as it is complete."""
    a = Assembler(CHANNELS, 1.0, 3.0)
    assert rows(a, "p", 10, temp=1) == []
    assert rows(a, "p", 10, flow=2) == [(10.0, [1.0, 2.0])]
    assert rows(a, "p", 11, flow=3) == []
    assert rows(a, "p", 11, temp=4) == [(11.0, [4.0, 3.0])]


def test_assembler_report_by_exception_holds_values_until_stale() -> None:
    a = Assembler(CHANNELS, 1.0, max_staleness=2.0)
    assert rows(a, "p", 10, temp=1, flow=2) == [(10.0, [1.0, 2.0])]
    # Only temp changes; flow is held for at most 2 s: rows at 11 and 12, none at 13.
    assert rows(a, "p", 11, temp=5) == []  # 11 is decided when something later arrives
    assert rows(a, "p", 14, temp=6) == [(11.0, [5.0, 2.0]), (12.0, [5.0, 2.0])]
    # flow comes back at 15.5: the tick at 14 has a stale flow (counted), 16 waits for later values
    got = a.add("p", 15.5, {"flow": 9.0})
    assert got.rows == [] and [r for r, _ in got.problems] == ["incomplete_row"]
    assert rows(a, "p", 16, temp=7, flow=8) == [(16.0, [7.0, 8.0])]


def test_assembler_late_values_within_tolerance_are_folded_in_later_ones_rejected() -> None:
    a = Assembler(CHANNELS, 1.0, max_staleness=5.0, tolerance=2.0)
    rows(a, "p", 10, temp=1, flow=1)
    assert rows(a, "p", 11.0, temp=2) == []
    assert rows(a, "p", 12.0, temp=3) == []  # 11 waits for flow until something later than 13 arrives
    # 1 s behind the newest: folded into the row at 11 (complete now: both channels stamped 11)
    assert rows(a, "p", 11.0, flow=7) == [(11.0, [2.0, 7.0])]
    assert rows(a, "p", 14.5, temp=4) == [(12.0, [3.0, 7.0])]  # 12 decided once a value past 12 + 2 arrives
    late = a.add("p", 10.5, {"flow": 0.0})
    assert late.rows == [] and [r for r, _ in late.problems] == ["late_value"]


def test_assembler_a_silent_hour_costs_one_step_and_devices_are_separate() -> None:
    a = Assembler(CHANNELS, 1.0, max_staleness=2.0)
    rows(a, "p", 0, temp=1, flow=1)
    got = a.add("p", 3600, {"temp": 2.0, "flow": 2.0})
    assert [t for t, _ in got.rows] == [1.0, 2.0, 3600.0]
    assert len(got.problems) == 1 and got.problems[0][0] == "incomplete_row"
    assert rows(a, "q", 5, temp=9, flow=9) == [(5.0, [9.0, 9.0])]


def test_assembler_rows_equal_the_whole_rows_they_came_from() -> None:
    """Channels sent one by one, shuffled within each sample, give back exactly the original rows."""
    rng = np.random.default_rng(1)
    table = rng.normal(size=(50, 2))
    a = Assembler(CHANNELS, 0.5, 1.0)
    out = []
    for i, row in enumerate(table):
        for j in rng.permutation(2):
            out += a.add("p", 1000 + 0.5 * i, {CHANNELS[j]: float(row[j])}).rows
    assert [t for t, _ in out] == [1000 + 0.5 * i for i in range(50)]
    np.testing.assert_array_equal(np.stack([v for _, v in out]), table)


# -- config -------------------------------------------------------------------------------------

def test_subscriptions_plain_strings_stay_json_and_mappings_pick_a_format() -> None:
    cfg = config_from_dict({"assembly": {"sample_period_seconds": 1.0}, "mqtt": {"subscriptions": [
        "sensors/+/telemetry",
        {"topic": "plant/+/+", "format": "topic_per_channel", "device_topic": "plant/{device}/{channel}"}]}})
    subs = cfg.mqtt.subscription_list()
    assert [(s.topic, s.format) for s in subs] == [("sensors/+/telemetry", "json"), ("plant/+/+", "topic_per_channel")]
    assert cfg.mqtt.topic_filters() == ["sensors/+/telemetry", "plant/+/+"]


@pytest.mark.parametrize(("mqtt", "assembly", "error"), [
    ({"subscriptions": [{"topic": "p/+/+", "format": "topic_per_channel", "device_topic": "p/{device}/x"}]},
     {"sample_period_seconds": 1.0}, "mqtt.subscriptions.0.device_topic: format topic_per_channel needs"),
    ({"subscriptions": [{"topic": "p/+/+", "format": "topic_per_channel", "device_topic": "p/{device}/{channel}"}]},
     {}, "assembly.sample_period_seconds: is required"),
    ({"subscriptions": [{"topic": "p/#", "format": "xml"}]}, {}, "mqtt.subscriptions.0.format: must be one of"),
    ({"subscriptions": ["a/#/b"]}, {}, "mqtt.subscriptions.0: not a valid MQTT topic filter"),
    ({"subscriptions": [{"topic": "a/b+"}]}, {}, "mqtt.subscriptions.0.topic: not a valid MQTT topic filter"),
    ({"subscriptions": [{"topic": "a/#", "fromat": "json"}]}, {}, "mqtt.subscriptions.0.fromat: unknown key"),
])
def test_bad_subscriptions_name_their_key(mqtt: dict[str, object], assembly: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as ei:
        config_from_dict({"mqtt": mqtt, "assembly": assembly})
    assert len(ei.value.errors) == 1 and ei.value.errors[0].startswith(error), ei.value.errors


# -- properties -----------------------------------------------------------------------------------

def check(out_or_exc: object) -> None:
    if isinstance(out_or_exc, MessageRejected):
        assert out_or_exc.reason in MESSAGE_REJECT_REASONS
        return
    assert isinstance(out_or_exc, list) and out_or_exc
    for r in out_or_exc:
        if isinstance(r, ChannelUpdate):
            assert device_id_problem(r.device) is None and r.values and set(r.values) <= set(CHANNELS)
            assert all(isinstance(v, float) for v in r.values.values()) and isinstance(r.timestamp, float)
        elif r.problem is not None:
            assert r.values is None and r.problem[0] in READING_REJECT_REASONS
        else:
            assert device_id_problem(r.device) is None and r.values is not None and r.values.shape == (2,)


def run(parser: JsonParser | TopicPerChannelParser, topic: str, payload: bytes) -> object:
    try:
        return parser.parse(topic, payload)
    except MessageRejected as exc:
        return exc


topics = st.one_of(st.text(max_size=40), st.builds(lambda d, c: f"plant/line1/{d}/{c}", st.text(max_size=12),
                                                    st.sampled_from([*CHANNELS, "x", ""])))
payloads = st.one_of(st.binary(max_size=200), st.text(max_size=40).map(str.encode),
                     st.builds(lambda v, t: json.dumps({"value": v, "ts": t}, allow_nan=True).encode(),
                               st.one_of(st.floats(), st.integers(), st.text(max_size=8), st.none()),
                               st.one_of(st.floats(), st.integers(), st.text(max_size=8), st.none())),
                     st.builds(lambda d: json.dumps({"metrics": d}).encode(),
                               st.lists(st.fixed_dictionaries({}, optional={
                                   "tags": st.dictionaries(st.sampled_from(["host", "x"]), st.text(max_size=8)),
                                   "fields": st.dictionaries(st.sampled_from([*CHANNELS, "z"]),
                                                             st.one_of(st.floats(), st.text(max_size=6))),
                                   "timestamp": st.one_of(st.integers(), st.text(max_size=8))}), max_size=3)))


@SETTINGS
@given(topic=topics, payload=payloads)
def test_any_bytes_on_any_topic_give_readings_or_a_counted_rejection(topic: str, payload: bytes) -> None:
    for parser in (tpc(), telegraf(),
                   JsonParser(CHANNELS, "plant/line1/{device}/temp", None, "ts", "values", partial=True)):
        check(run(parser, topic, payload))


@SETTINGS
@given(updates=st.lists(st.tuples(st.sampled_from(["p", "q"]),
                                  st.one_of(st.floats(-1e6, 1e6), st.integers(-10, 10).map(float)),
                                  st.dictionaries(st.sampled_from([*CHANNELS, "z"]), st.floats()), ), max_size=40),
       period=st.sampled_from([0.1, 1.0, 7.5]), tolerance=st.sampled_from([0.0, 0.5, 3.0]))
def test_assembler_rows_are_on_the_grid_in_order_and_whole(
        updates: list[tuple[str, float, dict[str, float]]], period: float, tolerance: float) -> None:
    a = Assembler(CHANNELS, period, 2 * period, tolerance)
    last: dict[str, float] = {}
    for device, ts, values in updates:
        got = a.add(device, ts, values)
        assert all(reason in READING_REJECT_REASONS for reason, _ in got.problems)
        for t, v in got.rows:
            assert abs(t / period - round(t / period)) < 1e-6 and v.shape == (2,)
            assert t > last.get(device, -np.inf)
            last[device] = t
