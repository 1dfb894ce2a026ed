"""Unit tests of the wire formats (sensord/formats/), the assembler (sensord/assembly.py) and the
subscription config that picks a format; property tests: any bytes on any topic give readings or a
counted rejection, never another exception."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensord.assembly import Assembler
from sensord.config import ConfigError, config_from_dict
from sensord.formats.base import ChannelUpdate, DeviceDeath, MessageRejected, Reading, RebirthRequest, device_id_problem
from sensord.formats.influx_line import InfluxLineParser
from sensord.formats.json import JsonParser
from sensord.formats.sparkplug_b import REBIRTH_METRIC, Payload, SparkplugParser
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

def test_subscriptions_that_meet_their_template_or_carry_the_device_in_the_payload_pass() -> None:
    for mqtt in ({"subscriptions": ["sensors/#"]}, {"subscriptions": ["x/y"], "device_field": "id"},
                 {"subscriptions": [{"topic": "x/y", "device_field": "tags.host"}]},
                 {"subscriptions": [{"topic": "pump-7/t", "device_topic": "pump-{device}/t"}]},
                 {"subscriptions": [{"topic": "spBv1.0/plant/#", "format": "sparkplug_b"}]}):
        config_from_dict({"mqtt": mqtt, "assembly": {"sample_period_seconds": 1.0}})


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
    ({"subscriptions": [{"topic": "p/#", "format": "xml"}]}, {}, "mqtt.subscriptions.0.format: must be one of"),
    ({"subscriptions": ["a/#/b"]}, {}, "mqtt.subscriptions.0: not a valid MQTT topic filter"),
    ({"subscriptions": [{"topic": "a/b+"}]}, {}, "mqtt.subscriptions.0.topic: not a valid MQTT topic filter"),
    ({"subscriptions": [{"topic": "a/#", "fromat": "json"}]}, {}, "mqtt.subscriptions.0.fromat: unknown key"),
    # check-config catches subscriptions that would reject every message as no_device
    ({"subscriptions": ["plant/+/telemetry"]}, {},
     'mqtt.subscriptions.0: topic filter "plant/+/telemetry" never matches the device template '
     '"sensors/{device}/telemetry"'),
    ({"subscriptions": ["sensors/+/telemetry", {"topic": "plant/+", "device_topic": "plant/{device}/x"}]}, {},
     "mqtt.subscriptions.1: topic filter"),
    ({"subscriptions": [{"topic": "p/+", "format": "topic_per_channel", "device_topic": "p/{device}/{channel}"}]},
     {"sample_period_seconds": 1.0}, "mqtt.subscriptions.0: topic filter \"p/+\" never matches device_topic"),
    ({"subscriptions": [{"topic": "spBv2.0/#", "format": "sparkplug_b"}]}, {"sample_period_seconds": 1.0},
     "mqtt.subscriptions.0: topic filter \"spBv2.0/#\" never matches a Sparkplug B topic"),
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


AnyParser = JsonParser | TopicPerChannelParser | InfluxLineParser | SparkplugParser


def run(parser: AnyParser, topic: str, payload: bytes) -> object:
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


# -- influx_line ----------------------------------------------------------------------------------

def influx(**kw: Any) -> InfluxLineParser:
    return InfluxLineParser(CHANNELS, clock=lambda: 2e9, **kw)


def test_influx_line_telegraf_capture_with_escapes_types_and_precision() -> None:
    """Lines as Telegraf's MQTT output writes them (influx serializer, ns timestamps), several per message."""
    payload = (b'pump,host=pump\\ 1,site=a\\,b temp=21.5,flow=3i,status="run, ok",alarm=false 1700000000000000000\n'
               b'# a comment\n'
               b'pump,host=pump2 flow=4u,temp=-1e1 1700000001000000000\n')
    out = influx().parse("telegraf/pumps", payload)
    assert [(r.device, r.timestamp, r.values.tolist()) for r in out  # type: ignore[union-attr]
            ] == [("pump 1", 1.7e9, [21.5, 3.0]), ("pump2", 1700000001.0, [-10.0, 4.0])]
    (r,) = influx(precision="ms").parse("t", b"m,host=p temp=1,flow=2 1700000000000")
    assert isinstance(r, Reading) and r.timestamp == 1.7e9
    (r,) = influx().parse("t", b"m,host=p temp=1,flow=2")
    assert isinstance(r, Reading) and r.timestamp == 2e9  # no timestamp: the arrival time


@pytest.mark.parametrize(("line", "reason"), [
    (b"m,host=p temp=1", "missing_channel"),
    (b'm,host=p temp="1",flow=2', "bad_value"),
    (b"m,host=p temp=t,flow=2", "bad_value"),
    (b"m,site=x temp=1,flow=2", "bad_device_id"),
    (b"m,host=a#b temp=1,flow=2", "bad_device_id"),
    (b"m,host=p temp=1,flow=2 12:00", "bad_timestamp"),
    (b"m,host=p temp=1,flow=2 1 2", "malformed_line"),
    (b"m,host=p temp", "malformed_line"),
    (b"m,host=p temp=1x,flow=2", "malformed_line"),
    (b"m,host temp=1,flow=2", "malformed_line"),
])
def test_influx_line_rejections(line: bytes, reason: str) -> None:
    (r,) = influx().parse("t", line)
    assert isinstance(r, Reading) and r.problem is not None and r.problem[0] == reason, r


def test_influx_line_measurement_filter_partial_and_device_from_topic() -> None:
    p = influx(measurement="pump", partial=True, device_topic="t/{device}", device_tag="id")
    (u,) = p.parse("t/p7", b"cpu,host=x usage=3\npump flow=2 1700000000000000000")
    assert u == ChannelUpdate("p7", 1.7e9, {"flow": 2.0})
    with pytest.raises(MessageRejected) as ei:
        p.parse("t/p7", b"cpu usage=3")
    assert ei.value.reason == "bad_payload"


# -- sparkplug_b -----------------------------------------------------------------------------------

def spb_payload(metrics: list[dict[str, Any]], ts: int | None = 1700000000000, seq: int = 0) -> bytes:
    msg = Payload()
    if ts is not None:
        msg.timestamp = ts
    msg.seq = seq
    for m in metrics:
        met = msg.metrics.add()
        for k, v in m.items():
            setattr(met, k, v)
    return bytes(msg.SerializeToString())


def test_sparkplug_births_name_aliases_and_data_uses_them() -> None:
    p = SparkplugParser(CHANNELS, clock=lambda: 2e9)
    nbirth = spb_payload([{"name": "bdSeq", "alias": 0, "long_value": 1}])
    assert p.parse("spBv1.0/plant/NBIRTH/edge1", nbirth) == []
    dbirth = spb_payload([{"name": "Sensors/temp", "alias": 1, "datatype": 10, "double_value": 20.0},
                          {"name": "flow", "alias": 2, "datatype": 9, "float_value": 3.0},
                          {"name": "Device Control/Rebirth", "alias": 3, "boolean_value": False}], seq=1)
    assert p.parse("spBv1.0/plant/DBIRTH/edge1/pump1", dbirth) == [
        ChannelUpdate("pump1", 1.7e9, {"temp": 20.0, "flow": 3.0})]
    ddata = spb_payload([{"alias": 1, "timestamp": 1700000001000, "double_value": 21.5},
                         {"alias": 2, "timestamp": 1700000002000, "int_value": 4}], seq=2)
    assert p.parse("spBv1.0/plant/DDATA/edge1/pump1", ddata) == [
        ChannelUpdate("pump1", 1700000001.0, {"temp": 21.5}), ChannelUpdate("pump1", 1700000002.0, {"flow": 4.0})]


def without_rebirths(items: list[Any]) -> list[Any]:
    return [r for r in items if not isinstance(r, RebirthRequest)]


def test_sparkplug_unknown_alias_is_counted_and_death_forgets() -> None:
    p = SparkplugParser(CHANNELS, clock=lambda: 2e9, rebirth_interval=None)
    data = spb_payload([{"alias": 1, "double_value": 21.5}])
    (r,) = p.parse("spBv1.0/plant/DDATA/edge1/pump1", data)
    assert isinstance(r, Reading) and r.problem is not None and r.problem[0] == "unknown_alias"
    p.parse("spBv1.0/plant/DBIRTH/edge1/pump1", spb_payload([{"name": "temp", "alias": 1, "double_value": 1.0}]))
    assert p.parse("spBv1.0/plant/DDATA/edge1/pump1", data) == [ChannelUpdate("pump1", 1.7e9, {"temp": 21.5})]
    assert p.parse("spBv1.0/plant/NDEATH/edge1", spb_payload([{"name": "bdSeq", "long_value": 1}])) == [
        DeviceDeath("edge1"), DeviceDeath("pump1")]
    (r,) = p.parse("spBv1.0/plant/DDATA/edge1/pump1", data)  # aliases died with the node
    assert isinstance(r, Reading) and r.problem is not None and r.problem[0] == "unknown_alias"
    assert p.parse("spBv1.0/plant/DDEATH/edge1/pump1", spb_payload([])) == [DeviceDeath("pump1")]


def rebirths(items: list[Any]) -> list[RebirthRequest]:
    out = [r for r in items if isinstance(r, RebirthRequest)]
    for r in out:
        (metric,) = Payload.FromString(r.payload).metrics
        assert r.topic == "spBv1.0/plant/NCMD/edge1" and metric.name == REBIRTH_METRIC and metric.boolean_value
    return out


def test_sparkplug_data_before_birth_asks_for_a_rebirth_at_most_once_per_interval() -> None:
    """sensord started after the edge node: its DATA carries aliases only, so it must ask for the births."""
    now = [2e9]
    p = SparkplugParser(CHANNELS, clock=lambda: now[0], rebirth_interval=30.0)
    data = spb_payload([{"alias": 1, "double_value": 21.5}], seq=7)
    (asked,) = rebirths(p.parse("spBv1.0/plant/DDATA/edge1/pump1", data))
    assert "before the node's NBIRTH" in asked.reason and asked.node == "plant/edge1"
    now[0] += 10
    assert rebirths(p.parse("spBv1.0/plant/DDATA/edge1/pump1", data)) == []  # debounced
    now[0] += 25
    assert len(rebirths(p.parse("spBv1.0/plant/DDATA/edge1/pump1", data))) == 1
    # The node answers: NBIRTH seq 0, DBIRTH seq 1, and the aliases resolve.
    assert p.parse("spBv1.0/plant/NBIRTH/edge1", spb_payload([{"name": "bdSeq", "long_value": 3}])) == []
    assert p.parse("spBv1.0/plant/DBIRTH/edge1/pump1",
                   spb_payload([{"name": "temp", "alias": 1, "double_value": 1.0}], seq=1)) == [
        ChannelUpdate("pump1", 1.7e9, {"temp": 1.0})]
    assert p.parse("spBv1.0/plant/DDATA/edge1/pump1", spb_payload([{"alias": 1, "double_value": 2.0}], seq=2)) == [
        ChannelUpdate("pump1", 1.7e9, {"temp": 2.0})]


def test_sparkplug_seq_gap_asks_for_a_rebirth_and_keeps_the_data() -> None:
    now = [2e9]
    p = SparkplugParser(CHANNELS, clock=lambda: now[0], rebirth_interval=30.0)
    p.parse("spBv1.0/plant/NBIRTH/edge1", spb_payload([{"name": "bdSeq", "long_value": 0}], seq=0))
    p.parse("spBv1.0/plant/DBIRTH/edge1/pump1", spb_payload([{"name": "temp", "alias": 1, "double_value": 1.0}], seq=1))
    for seq in range(2, 256):  # a long healthy run wraps 255 -> 0 without a request
        assert p.parse("spBv1.0/plant/DDATA/edge1/pump1",
                       spb_payload([{"alias": 1, "double_value": float(seq)}], seq=seq)) == [
            ChannelUpdate("pump1", 1.7e9, {"temp": float(seq)})]
    assert not rebirths(p.parse("spBv1.0/plant/NDATA/edge1", spb_payload([], seq=0)))
    got = p.parse("spBv1.0/plant/DDATA/edge1/pump1", spb_payload([{"alias": 1, "double_value": 9.0}], seq=3))
    (asked,) = rebirths(got)
    assert "seq 3, expected 1" in asked.reason
    assert without_rebirths(got) == [ChannelUpdate("pump1", 1.7e9, {"temp": 9.0})]
    now[0] += 1  # back in step: no new request
    assert not rebirths(p.parse("spBv1.0/plant/NDATA/edge1", spb_payload([], seq=4)))


def test_sparkplug_a_late_will_of_an_earlier_session_kills_nothing() -> None:
    """MQTT orders messages per topic only: the NDEATH of connection 4 can arrive after the NBIRTH of 5."""
    p = SparkplugParser(CHANNELS, clock=lambda: 2e9)
    p.parse("spBv1.0/plant/NBIRTH/edge1", spb_payload([{"name": "bdSeq", "long_value": 5}]))
    p.parse("spBv1.0/plant/DBIRTH/edge1/pump1", spb_payload([{"name": "temp", "alias": 1, "double_value": 1.0}], seq=1))
    (r,) = p.parse("spBv1.0/plant/NDEATH/edge1", spb_payload([{"name": "bdSeq", "long_value": 4}]))
    assert isinstance(r, Reading) and r.problem is not None and r.problem[0] == "stale_death"
    assert p.parse("spBv1.0/plant/DDATA/edge1/pump1", spb_payload([{"alias": 1, "double_value": 2.0}], seq=2)) == [
        ChannelUpdate("pump1", 1.7e9, {"temp": 2.0})]  # aliases survive
    assert p.parse("spBv1.0/plant/NDEATH/edge1", spb_payload([{"name": "bdSeq", "long_value": 5}])) == [
        DeviceDeath("edge1"), DeviceDeath("pump1")]


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    ("spBv1.0/plant/DDATA/edge1", b"", "no_device"), ("spBv1.0/plant/STATE/edge1/x", b"", "no_device"),
    ("plant/DDATA/edge1/x", b"", "no_device"), ("spBv1.0/plant/DDATA/edge1/pump1", b"\xff\xff\xff", "bad_payload")])
def test_sparkplug_rejections(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(MessageRejected) as ei:
        SparkplugParser(CHANNELS).parse(topic, payload)
    assert ei.value.reason == reason


@SETTINGS
@given(topic=st.one_of(topics, st.builds(lambda k, d: f"spBv1.0/g/{k}/e1{d}",
                                         st.sampled_from(["NBIRTH", "NDATA", "DBIRTH", "DDATA", "DDEATH", "NDEATH"]),
                                         st.sampled_from(["", "/pump1", "/a+b"]))),
       payloads=st.lists(st.one_of(st.binary(max_size=200), st.builds(
           lambda ms: spb_payload(ms, None), st.lists(st.fixed_dictionaries({}, optional={
               "name": st.sampled_from([*CHANNELS, "x/temp", "z"]), "alias": st.integers(0, 5),
               "double_value": st.floats(), "string_value": st.text(max_size=4),
               "long_value": st.integers(0, 2**64 - 1), "timestamp": st.integers(0, 2**64 - 1)}), max_size=4))),
           min_size=1, max_size=4))
def test_sparkplug_any_bytes_give_readings_or_a_counted_rejection(topic: str, payloads: list[bytes]) -> None:
    p = SparkplugParser(CHANNELS, clock=lambda: 2e9)
    for payload in payloads:
        got = run(p, topic, payload)
        if isinstance(got, list):
            got = [r for r in got if not isinstance(r, DeviceDeath | RebirthRequest)] or [
                Reading("x", 0.0, None, ("bad_value", ""))]
        check(got)


@SETTINGS
@given(topic=topics, payload=st.one_of(st.binary(max_size=200), st.text(max_size=120).map(str.encode),
                                       st.lists(st.sampled_from(["m", ",", "host=", "p", " ", "temp=", "flow=", "1",
                                                                 "2i", '"', "\\", "\n", "t", "1e400", "9" * 30]),
                                                max_size=30).map(lambda x: "".join(x).encode())))
def test_influx_line_any_bytes_give_readings_or_a_counted_rejection(topic: str, payload: bytes) -> None:
    for p in (influx(), influx(partial=True, precision="s")):
        check(run(p, topic, payload))
