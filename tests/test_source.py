"""Unit tests of sensord.payload.PayloadParser (topic + bytes -> readings, no broker involved), and of the
connection's behaviour that needs no broker (sensord.source)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import numpy as np
import pytest

from sensord.payload import MessageRejected, PayloadParser, Reading

CHANNELS = ("a", "b", "c")
TEMPLATE = "plant/{device}/telemetry"
ARRIVAL = 1_700_000_123.5
T0 = datetime(2024, 1, 1, tzinfo=UTC).timestamp()  # 1704067200.0


def parser(device_topic: str | None = TEMPLATE, device_field: str | None = None,
           timestamp_field: str = "ts", values_field: str = "values") -> PayloadParser:
    return PayloadParser(CHANNELS, device_topic, device_field, timestamp_field, values_field,
                         clock=lambda: ARRIVAL)


def parse(payload: object, topic: str = "plant/p1/telemetry", **kw: str | None) -> list[Reading]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return parser(**kw).parse(topic, raw)  # type: ignore[arg-type]


def one(payload: object, **kw: str | None) -> Reading:
    (r,) = parse(payload, **kw)
    return r


def rejected(payload: object, topic: str = "plant/p1/telemetry", **kw: str | None) -> MessageRejected:
    with pytest.raises(MessageRejected) as exc:
        parse(payload, topic=topic, **kw)
    return exc.value


# -- accepted shapes ----------------------------------------------------------------------------

def test_flat_object() -> None:
    r = one({"ts": 5, "a": 1, "b": 2.5, "c": -3})
    assert r.device == "p1"
    assert r.timestamp == 5.0
    assert r.problem is None
    assert r.values is not None and r.values.dtype == np.float64  # float64, so 1e39 can be clipped, not overflow
    assert r.values.tolist() == [1.0, 2.5, -3.0]


def test_values_object_in_model_channel_order_extra_keys_ignored() -> None:
    r = one({"ts": 7, "values": {"c": 3, "extra": 99, "a": 1, "b": 2}, "other": "x"})
    assert r.problem is None
    assert r.values.tolist() == [1.0, 2.0, 3.0]  # type: ignore[union-attr]


def test_custom_field_names() -> None:
    r = one({"time": 9, "data": {"a": 1, "b": 2, "c": 3}}, timestamp_field="time", values_field="data")
    assert (r.timestamp, r.values.tolist()) == (9.0, [1.0, 2.0, 3.0])  # type: ignore[union-attr]


def test_json_array_is_a_batch_in_order() -> None:
    rs = parse([{"ts": 1, "a": 1, "b": 1, "c": 1},
                {"ts": 2, "values": {"a": 2, "b": 2, "c": 2}},
                {"ts": 3, "a": 3, "b": 3, "c": 3}])
    assert [r.timestamp for r in rs] == [1.0, 2.0, 3.0]
    assert [r.values.tolist()[0] for r in rs] == [1.0, 2.0, 3.0]  # type: ignore[union-attr]
    assert {r.device for r in rs} == {"p1"}


def test_batch_keeps_a_bad_reading_next_to_good_ones() -> None:
    rs = parse([{"ts": 1, "a": 1, "b": 1, "c": 1}, {"ts": 2, "a": 1, "b": 1}])
    assert rs[0].problem is None
    assert rs[1].problem is not None and rs[1].problem[0] == "missing_channel"


# -- device id ----------------------------------------------------------------------------------

def test_device_from_topic_template() -> None:
    p = parser()
    assert p.device_from_topic("plant/pump-7/telemetry") == "pump-7"
    assert p.device_from_topic("plant/a/b/telemetry") is None  # {device} is one topic level
    assert p.device_from_topic("other/p1/telemetry") is None
    assert p.device_from_topic("plant/p1/telemetry/extra") is None


def test_template_special_characters_are_literal() -> None:
    p = PayloadParser(CHANNELS, "site.1/{device}/t+x", None, "ts", "values")
    assert p.device_from_topic("site.1/d9/t+x") == "d9"
    assert p.device_from_topic("siteX1/d9/t+x") is None


def test_device_from_payload_field() -> None:
    r = one({"ts": 1, "id": "boiler", "a": 1, "b": 2, "c": 3}, topic="anything/else", device_topic=None,
            device_field="id")
    assert r.device == "boiler"


def test_device_field_wins_over_topic_and_falls_back_to_it() -> None:
    rs = parse([{"ts": 1, "id": 42, "a": 1, "b": 2, "c": 3}, {"ts": 2, "a": 1, "b": 2, "c": 3}],
               device_field="id")
    assert [r.device for r in rs] == ["42", "p1"]


def test_topic_not_matching_template_is_no_device() -> None:
    exc = rejected({"ts": 1, "a": 1, "b": 2, "c": 3}, topic="elsewhere/p1/telemetry")
    assert exc.reason == "no_device"
    assert "elsewhere/p1/telemetry" in str(exc)


def test_no_device_field_and_no_template() -> None:
    exc = rejected({"ts": 1, "a": 1, "b": 2, "c": 3}, topic="x", device_topic=None, device_field="id")
    assert exc.reason == "no_device"
    assert "'id'" in str(exc)


# -- timestamps ---------------------------------------------------------------------------------

def test_missing_timestamp_is_arrival_time_from_clock() -> None:
    r = one({"a": 1, "b": 2, "c": 3})
    assert r.timestamp == ARRIVAL
    assert r.problem is None


def test_null_timestamp_is_arrival_time() -> None:
    assert one({"ts": None, "a": 1, "b": 2, "c": 3}).timestamp == ARRIVAL


def test_clock_is_read_once_per_message() -> None:
    ticks = iter([100.0, 200.0])
    p = PayloadParser(CHANNELS, TEMPLATE, None, "ts", "values", clock=lambda: next(ticks))
    rs = p.parse("plant/p1/telemetry", b'[{"a":1,"b":1,"c":1},{"a":1,"b":1,"c":1}]')
    assert [r.timestamp for r in rs] == [100.0, 100.0]


@pytest.mark.parametrize("raw, expected", [
    (T0, T0),
    (T0 + 0.25, T0 + 0.25),
    (int(T0 * 1000), T0),  # epoch milliseconds
    (T0 * 1000 + 500, T0 + 0.5),
    (str(T0), T0),  # numeric string
    (str(int(T0 * 1000)), T0),
    ("2024-01-01T00:00:00Z", T0),
    ("2024-01-01T00:00:00.500Z", T0 + 0.5),
    ("2024-01-01T00:00:00", T0),  # naive ISO is UTC, never local time
    ("2024-01-01 00:00:00", T0),
    ("2024-01-01T02:00:00+02:00", T0),
    (" 2024-01-01T00:00:00Z ", T0),
])
def test_timestamp_formats(raw: object, expected: float) -> None:
    r = one({"ts": raw, "a": 1, "b": 2, "c": 3})
    assert r.problem is None
    assert r.timestamp == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("raw", ["yesterday", True, [1], {"t": 1}, ""])
def test_bad_timestamp_is_a_reading_problem(raw: object) -> None:
    r = one({"ts": raw, "a": 1, "b": 2, "c": 3})
    assert r.values is None
    assert r.problem is not None and r.problem[0] == "bad_timestamp"
    assert r.timestamp == ARRIVAL


# -- whole-message rejections -------------------------------------------------------------------

@pytest.mark.parametrize("payload", [b"{not json", b"", b"\xff\xfe\x00garbage", b'{"ts": 1, "a": 1,}'])
def test_malformed_json(payload: bytes) -> None:
    exc = rejected(payload)
    assert exc.reason == "malformed_json"
    assert isinstance(exc, ValueError)


@pytest.mark.parametrize("payload, where", [
    (42, "item 0"), ("text", "item 0"), (None, "item 0"),
    ([{"ts": 1, "a": 1, "b": 1, "c": 1}, 5], "item 1"),
    ([{"ts": 1, "a": 1, "b": 1, "c": 1}, [1, 2]], "item 1"),
])
def test_non_object_item_is_bad_payload(payload: object, where: str) -> None:
    exc = rejected(payload)
    assert exc.reason == "bad_payload"
    assert where in str(exc)


def test_empty_array_is_bad_payload() -> None:
    assert rejected([]).reason == "bad_payload"


# -- per-reading problems -----------------------------------------------------------------------

def test_missing_channel() -> None:
    r = one({"ts": 3, "a": 1, "c": 3})
    assert r.values is None
    assert r.problem == ("missing_channel", "channel 'b' missing")
    assert (r.device, r.timestamp) == ("p1", 3.0)


def test_null_channel_counts_as_missing() -> None:
    assert one({"ts": 3, "values": {"a": 1, "b": None, "c": 3}}).problem[0] == "missing_channel"  # type: ignore[index]


@pytest.mark.parametrize("value", ["abc", "", "1,5", [1], {"v": 1}])
def test_non_numeric_value(value: object) -> None:
    r = one({"ts": 3, "a": 1, "b": value, "c": 3})
    assert r.values is None
    assert r.problem is not None and r.problem[0] == "bad_value"
    assert "'b'" in r.problem[1]


@pytest.mark.parametrize(("value", "expected"), [("2.57", 2.57), (" 7 ", 7.0), ("-1e3", -1000.0)])
def test_numeric_strings_are_numbers(value: str, expected: float) -> None:
    """Gateways that send every value as a string (``"2.57"``) are read, not rejected as bad_value."""
    r = one({"ts": 3, "a": 1, "b": value, "c": 3})
    assert r.problem is None and r.values is not None
    assert r.values.tolist() == [1.0, expected, 3.0]


@pytest.mark.parametrize("value", [True, False])
def test_bool_value_is_not_a_number(value: bool) -> None:
    r = one({"ts": 3, "a": value, "b": 2, "c": 3})
    assert r.problem is not None and r.problem[0] == "bad_value"


def test_values_field_not_an_object() -> None:
    r = one({"ts": 3, "values": [1, 2, 3]})
    assert r.problem is not None and r.problem[0] == "bad_value"
    assert "'values'" in r.problem[1]


def test_non_finite_numbers_pass_the_parser() -> None:
    """NaN is valid Python-JSON; the window buffer (not the parser) rejects it as non_finite."""
    r = one(b'{"ts": 3, "a": NaN, "b": 2, "c": 3}')
    assert r.problem is None
    assert np.isnan(r.values[0])  # type: ignore[index]


# -- the shared timestamp parser and the arrival clock ------------------------------------------

@pytest.mark.parametrize("raw", [int(T0 * 1e6), int(T0 * 1e9), str(int(T0 * 1e6)), T0 * 1e6 + 500_000 - 500_000])
def test_microseconds_and_nanoseconds_recognised(raw: object) -> None:
    r = one({"ts": raw, "a": 1, "b": 2, "c": 3})
    assert r.problem is None
    assert r.timestamp == pytest.approx(T0, abs=1e-3)


def test_csv_and_payload_timestamps_share_one_parser() -> None:
    from sensord.dataio import parse_timestamp
    for text in (str(T0), str(int(T0 * 1000)), str(int(T0 * 1e6)), "2024-01-01T00:00:00Z"):
        assert parse_timestamp(text) == one({"ts": text, "a": 1, "b": 2, "c": 3}).timestamp == pytest.approx(T0)


def skewed(max_skew: float) -> PayloadParser:
    return PayloadParser(CHANNELS, TEMPLATE, None, "ts", "values", clock=lambda: ARRIVAL, max_clock_skew=max_skew)


@pytest.mark.parametrize("ahead, ok", [(0.0, True), (299.0, True), (301.0, False), (365 * 86400.0, False)])
def test_future_timestamp_rejected_beyond_max_clock_skew(ahead: float, ok: bool) -> None:
    (r,) = skewed(300.0).parse("plant/p1/telemetry", json.dumps({"ts": ARRIVAL + ahead, "a": 1, "b": 2,
                                                                  "c": 3}).encode())
    if ok:
        assert r.problem is None and r.timestamp == ARRIVAL + ahead
    else:
        assert r.values is None
        assert r.problem is not None and r.problem[0] == "future_timestamp"
        assert "max_clock_skew_seconds=300" in r.problem[1]


def test_microseconds_taken_for_seconds_would_be_future_but_are_recognised() -> None:
    (r,) = skewed(300.0).parse("plant/p1/telemetry", json.dumps({"ts": int(ARRIVAL * 1e6), "a": 1, "b": 2,
                                                                  "c": 3}).encode())
    assert r.problem is None and r.timestamp == pytest.approx(ARRIVAL, abs=1e-3)


# -- device ids (issue 14) ------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["", "a/b", "a+b", "a#", "nul\x00id", "new\nline", "tab\there", "\x1b[31m",
                                    "x" * 129, "ü" * 65])
def test_bad_device_id_from_a_payload_field_is_rejected(device: str) -> None:
    (r,) = parse({"id": device, "ts": 1, "a": 1, "b": 2, "c": 3}, topic="x", device_topic=None, device_field="id")
    assert r.values is None
    assert r.problem is not None and r.problem[0] == "bad_device_id"


@pytest.mark.parametrize("device", ["pump-1", "Pumpe_Ä.2", "x" * 128, "ü" * 64, 17])
def test_good_device_ids_pass(device: object) -> None:
    (r,) = parse({"id": device, "ts": 1, "a": 1, "b": 2, "c": 3}, topic="x", device_topic=None, device_field="id")
    assert r.problem is None and r.device == str(device)


@pytest.mark.parametrize("raw", [None, True, 1.5, ["a"], {"a": 1}])
def test_device_field_of_another_type_is_a_bad_device_id(raw: object) -> None:
    (r,) = parse({"id": raw, "ts": 1, "a": 1, "b": 2, "c": 3}, topic="x", device_topic=None, device_field="id")
    assert r.problem is not None and r.problem[0] == "bad_device_id"


def test_bad_device_id_from_the_topic_is_rejected() -> None:
    (r,) = parse({"ts": 1, "a": 1, "b": 2, "c": 3}, topic="plant/evil\nINFO x/telemetry")
    assert r.problem is not None and r.problem[0] == "bad_device_id"


def test_escape_keeps_a_log_line_one_line() -> None:
    from sensord.payload import escape
    assert escape("a\nb\r\x00\\n") == "a\\nb\\r\\x00\\\\n"
    assert escape("Pumpe Ä") == "Pumpe Ä"
    assert escape("x" * 500, limit=10) == "x" * 10 + "…"


# -- client id and session takeover (issue 14) ----------------------------------------------------

def test_default_client_id_is_per_host_and_instance_and_stable() -> None:
    import socket

    from sensord.source import default_client_id
    a1, a2 = default_client_id("/etc/sensord/a.yaml"), default_client_id("/etc/sensord/a.yaml")
    b = default_client_id("/etc/sensord/b.yaml")
    assert a1 == a2 != b
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:40]
    assert a1.startswith(f"sensord-{host}-") and len(a1) == len(f"sensord-{host}-") + 8
    assert len(a1.encode()) <= 64 and "/" not in a1 and "+" not in a1 and "#" not in a1


def test_config_client_id_defaults_to_none_and_must_not_be_empty() -> None:
    from sensord.config import ConfigError, MqttConfig, config_from_dict
    assert MqttConfig().client_id is None
    with pytest.raises(ConfigError, match="mqtt.client_id"):
        config_from_dict({"mqtt": {"client_id": ""}})


def test_session_takeover_is_an_error_with_the_client_id_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from sensord.config import MqttConfig
    from sensord.source import MqttConnection
    conn = MqttConnection(MqttConfig(), lambda t, p, r, d: None, client_id="sensord-x")
    taken = ReasonCode(PacketTypes.DISCONNECT, identifier=0x8E)
    with caplog.at_level(logging.DEBUG, logger="sensord.source"):
        for _ in range(3):
            conn._handle_disconnect(conn.client, None, None, taken, None)
    assert conn.takeovers == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # a fight between two clients does not flood the log
    assert "another client" in errors[0].getMessage() and "'sensord-x'" in errors[0].getMessage()


def test_broker_closing_twice_and_accepting_at_once_is_taken_as_a_takeover(caplog: pytest.LogCaptureFixture) -> None:
    """Mosquitto 2.0.11 closes the older connection without a reason code: paho says "Unspecified error"."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from sensord.config import MqttConfig
    from sensord.source import MqttConnection
    conn = MqttConnection(MqttConfig(), lambda t, p, r, d: None, client_id="sensord-y")
    ok = ReasonCode(PacketTypes.CONNACK, identifier=0)
    closed = ReasonCode(PacketTypes.DISCONNECT, identifier=0x80)
    with caplog.at_level(logging.DEBUG, logger="sensord.source"):
        conn._handle_connect(conn.client, None, None, ok, None)
        conn._handle_disconnect(conn.client, None, None, closed, None)
        conn._handle_connect(conn.client, None, None, ok, None)
        assert conn.takeovers == 0  # once is a broker hiccup
        conn._handle_disconnect(conn.client, None, None, closed, None)
        conn._handle_connect(conn.client, None, None, ok, None)
    assert conn.takeovers == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "'sensord-y'" in errors[0] and "session taken over" in errors[0]


# -- start-up and connection problems (issue 14) -----------------------------------------------------

def test_unreadable_tls_files_name_their_key(tmp_path: object) -> None:
    from pathlib import Path

    from sensord.config import ConfigError, MqttConfig, TlsConfig
    from sensord.source import MqttConnection, tls_file_problems
    ca = Path(str(tmp_path)) / "ca.pem"
    ca.write_text("not a certificate")
    cfg = MqttConfig(tls=TlsConfig(ca_file=str(ca), cert_file="/nonexistent/c.pem", key_file="/nonexistent/k.pem"))
    problems = tls_file_problems(cfg)
    assert [p.split(":")[0] for p in problems] == ["mqtt.tls.cert_file", "mqtt.tls.key_file"]
    assert "/nonexistent/c.pem" in problems[0]
    with pytest.raises(ConfigError, match="mqtt.tls.cert_file"):
        MqttConnection(cfg, lambda t, p, r, d: None)
    with pytest.raises(ConfigError, match="mqtt.tls: cannot use"):  # readable, but not PEM
        MqttConnection(MqttConfig(tls=TlsConfig(ca_file=str(ca))), lambda t, p, r, d: None)


def test_refused_login_logged_once_with_what_to_check(caplog: pytest.LogCaptureFixture) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from sensord.config import MqttConfig
    from sensord.source import MqttConnection
    conn = MqttConnection(MqttConfig(), lambda t, p, r, d: None, client_id="x")
    refused = ReasonCode(PacketTypes.CONNACK, identifier=0x87)  # not authorized
    closed = ReasonCode(PacketTypes.DISCONNECT, identifier=0x80)
    with caplog.at_level(logging.DEBUG, logger="sensord.source"):
        for _ in range(5):  # paho: CONNACK refused, then the disconnect
            conn._handle_connect(conn.client, None, None, refused, None)
            conn._handle_disconnect(conn.client, None, None, closed, None)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1
    assert "check mqtt.username and the password (mqtt.password, password_file or password_env)" in errors[0]


def test_connection_closed_before_connack_logged_once_with_the_tls_hint(caplog: pytest.LogCaptureFixture) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from sensord.config import MqttConfig
    from sensord.source import MqttConnection
    conn = MqttConnection(MqttConfig(), lambda t, p, r, d: None, client_id="x")
    closed = ReasonCode(PacketTypes.DISCONNECT, identifier=0x80)
    with caplog.at_level(logging.DEBUG, logger="sensord.source"):
        for _ in range(4):
            conn._handle_disconnect(conn.client, None, None, closed, None)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and "TLS-only" in errors[0] and "mqtt.tls" in errors[0]


def test_signals_during_start_up_are_handed_to_the_daemon() -> None:
    import signal as sig

    from sensord import signals
    from sensord.daemon import Daemon
    saved = {s: sig.getsignal(s) for s in (sig.SIGTERM, sig.SIGINT, sig.SIGHUP)}
    try:
        signals.reload_requested.clear()
        signals.stop_requested.clear()
        signals.install_early()
        sig.raise_signal(sig.SIGHUP)  # would kill the process with the default handler
        assert signals.reload_requested.is_set() and not signals.stop_requested.is_set()
        d = Daemon.__new__(Daemon)  # only its signal plumbing
        import threading
        d._stop, d._reload = threading.Event(), threading.Event()
        d.install_signal_handlers()
        assert d._reload.is_set() and not d._stop.is_set()
        sig.raise_signal(sig.SIGTERM)
        assert d._stop.is_set()
    finally:
        for s, h in saved.items():
            sig.signal(s, h)
        signals.reload_requested.clear()
        signals.stop_requested.clear()


def test_while_two_clients_fight_reconnects_are_not_logged_above_debug(caplog: pytest.LogCaptureFixture) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from sensord.config import MqttConfig
    from sensord.source import MqttConnection
    conn = MqttConnection(MqttConfig(), lambda t, p, r, d: None, client_id="sensord-z")
    ok = ReasonCode(PacketTypes.CONNACK, identifier=0)
    closed = ReasonCode(PacketTypes.DISCONNECT, identifier=0x80)
    with caplog.at_level(logging.DEBUG, logger="sensord.source"):
        conn._handle_connect(conn.client, None, None, ok, None)
        for _ in range(10):
            conn._handle_disconnect(conn.client, None, None, closed, None)
            conn._handle_connect(conn.client, None, None, ok, None)
    assert conn.takeovers == 9
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len([r for r in loud if r.levelno == logging.ERROR]) == 1
    assert len(loud) <= 6  # the first connects and disconnects, then the one ERROR


def test_values_outside_the_bounds_are_clipped_nan_and_inf_left_alone() -> None:
    p = PayloadParser(CHANNELS, TEMPLATE, None, "ts", "values", clock=lambda: ARRIVAL,
                      bounds=([-10.0, -10.0, -10.0], [10.0, 10.0, 10.0]))
    (r,) = p.parse("plant/p1/telemetry", b'{"ts": 1, "a": 3e38, "b": -1e300, "c": 5}')
    assert r.clipped and r.values is not None and r.values.tolist() == [10.0, -10.0, 5.0]
    (r,) = p.parse("plant/p1/telemetry", b'{"ts": 1, "a": 1, "b": 2, "c": 3}')
    assert not r.clipped and r.values.tolist() == [1.0, 2.0, 3.0]
    (r,) = p.parse("plant/p1/telemetry", b'{"ts": 1, "a": NaN, "b": Infinity, "c": ' + b"9" * 400 + b"}")
    assert r.values is not None and np.isnan(r.values[0]) and np.isinf(r.values[1]) and r.values[2] == 10.0


def test_buffered_socket_serves_pahos_small_reads_from_one_system_call() -> None:
    """paho reads a packet as its first byte, its length, then the rest: all of them come from one recv,
    ``pending()`` says what is buffered (so paho's loop reads on before waiting in select), and a read
    past the buffer gets what is left, as a short read from a socket would."""
    import socket

    from sensord.source import BufferedSocket

    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        calls: list[int] = []

        class Counting:
            def recv(self, n: int) -> bytes:
                calls.append(n)
                return b.recv(n)

            def fileno(self) -> int:
                return b.fileno()

        s = BufferedSocket(Counting())
        a.sendall(b"\x30\x05hello\x30\x03abc")
        assert [s.recv(1), s.recv(1), s.recv(5), s.recv(1), s.recv(1)] == [b"\x30", b"\x05", b"hello", b"\x30", b"\x03"]
        assert len(calls) == 1 and s.pending() == 3
        assert s.recv(10) == b"abc" and s.pending() == 0  # short: only what was buffered
        assert s.fileno() == b.fileno()  # everything else is the socket's
        with pytest.raises(BlockingIOError):  # nothing buffered, nothing on the socket: as paho expects
            s.recv(1)
        a.close()
        assert s.recv(1) == b""  # the peer closed: paho sees the connection lost
    finally:
        a.close()
        b.close()
