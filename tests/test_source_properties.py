"""Property-based tests (Hypothesis) of the payload parser: whatever arrives on whatever topic, the parser
gives readings or a counted rejection (``MessageRejected`` or a reading with a ``problem``), never another
exception; and the intake in front of it never raises and counts every message."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sensord.config import config_from_dict
from sensord.metrics import MESSAGE_REJECT_REASONS, READING_REJECT_REASONS, DaemonMetrics
from sensord.payload import MessageRejected, PayloadParser, device_id_problem
from sensord.pipeline import Intake
from sensord.windows import WindowSpec

CHANNELS = ("a", "b")
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

numbers = st.one_of(st.integers(), st.integers(min_value=-(10**500), max_value=10**500),
                    st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5),
    st.dictionaries(st.sampled_from(["a", "b", "ts", "values", "id", "x"]) | st.text(max_size=5), inner,
                    max_size=6)), max_leaves=30)
# Objects shaped like readings, with every field possibly wrong.
timestamps = st.one_of(numbers, st.text(max_size=30), st.none(), st.booleans(),
                       st.sampled_from(["2024-01-01T00:00:00Z", "2024-13-45", "1e400", "nan", "-inf"]))
channel_values = st.dictionaries(st.sampled_from(CHANNELS), st.one_of(numbers, scalars), max_size=3)
readings = st.fixed_dictionaries({}, optional={"ts": timestamps, "values": st.one_of(channel_values, scalars),
                                               "a": st.one_of(numbers, scalars), "b": st.one_of(numbers, scalars),
                                               "id": st.one_of(st.text(max_size=12), numbers, st.none())})
documents = st.one_of(readings, st.lists(readings, max_size=4), json_values)


def encode(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


topics = st.one_of(st.just("plant/p1/telemetry"), st.text(max_size=40),
                   st.builds(lambda d: f"plant/{d}/telemetry", st.text(max_size=20)))


def check(parser: PayloadParser, topic: str, payload: bytes) -> None:
    try:
        out = parser.parse(topic, payload)
    except MessageRejected as exc:
        assert exc.reason in MESSAGE_REJECT_REASONS
        return
    assert out, "no readings and no rejection"
    for r in out:
        if r.problem is not None:
            assert r.values is None and r.problem[0] in READING_REJECT_REASONS
        else:
            assert device_id_problem(r.device) is None
            assert r.values is not None and r.values.shape == (len(CHANNELS),)
            assert r.values.dtype in (np.float32, np.float64)
            assert isinstance(r.timestamp, float)


def parsers() -> list[PayloadParser]:
    return [PayloadParser(CHANNELS, "plant/{device}/telemetry", None, "ts", "values", clock=lambda: 1e9),
            PayloadParser(CHANNELS, None, "id", "ts", "values", clock=lambda: 1e9)]


@SETTINGS
@given(topic=topics, payload=st.binary(max_size=300))
def test_any_bytes_on_any_topic(topic: str, payload: bytes) -> None:
    for p in parsers():
        check(p, topic, payload)


@SETTINGS
@given(topic=topics, doc=documents)
def test_any_json_document(topic: str, doc: Any) -> None:
    for p in parsers():
        check(p, topic, encode(doc))


@SETTINGS
@given(doc=documents, cut=st.integers(min_value=0, max_value=400))
def test_truncated_and_non_utf8_json(doc: Any, cut: int) -> None:
    raw = encode(doc)
    for p in parsers():
        check(p, "plant/p1/telemetry", raw[:cut])
        check(p, "plant/p1/telemetry", raw.replace(b'"', b'"\xff', 1))


@SETTINGS
@given(value=numbers)
def test_a_number_that_is_no_finite_float32_is_never_an_internal_error(value: int | float) -> None:
    p = parsers()[0]
    (r,) = p.parse("plant/p1/telemetry", encode({"ts": 1, "a": value, "b": 1}))
    if r.problem is not None:
        assert r.problem[0] == "bad_value", r.problem
    else:  # the number as a float, or inf/nan that the window rejects as non_finite
        assert r.values is not None
        with np.errstate(over="ignore"):
            expected = r.values.dtype.type(float(value))
        assert r.values[0] == expected or (math.isnan(expected) and math.isnan(r.values[0]))


def test_ten_to_the_400_is_a_bad_value() -> None:
    """The issue's finding: 625 such messages were counted as internal_error with a traceback."""
    p = parsers()[0]
    (r,) = p.parse("plant/p1/telemetry", b'{"ts": 1, "a": ' + str(10**400).encode() + b', "b": 1}')
    assert r.problem is not None and r.problem[0] == "bad_value"
    try:
        p.parse("plant/p1/telemetry", b'{"ts": 1, "a": 1' + b"0" * 5000 + b', "b": 1}')
        raise AssertionError("not rejected")
    except MessageRejected as exc:
        assert exc.reason == "malformed_json"


class _Scoring:
    """Stands in for the scoring loop: takes every window."""

    queue = SimpleNamespace(maxsize=10)

    def __init__(self) -> None:
        self.windows = 0

    def submit(self, model: Any, window: Any, devices: int = 1) -> str | None:
        self.windows += 1
        return None


def _intake() -> tuple[Intake, _Scoring, DaemonMetrics]:
    cfg = config_from_dict({"window": {"length": 2}, "mqtt": {"device_topic": "plant/{device}/telemetry",
                                                              "subscriptions": ["plant/#"]},
                            "daemon": {"max_devices": 3}})
    model = SimpleNamespace(spec=WindowSpec(2, 1, 10.0),
                            bundle=SimpleNamespace(channels=CHANNELS, sample_period_seconds=None, model_id="stand-in",
                                                   path="stand-in"),
                            low=[-100.0, -100.0], high=[100.0, 100.0])
    metrics, scoring = DaemonMetrics(), _Scoring()
    return Intake(cfg, model, scoring, metrics), scoring, metrics  # type: ignore[arg-type]


def test_the_stand_in_intake_reaches_the_window_path() -> None:
    intake, scoring, metrics = _intake()
    for ts, a in ((1, b"1"), (2, b"1e300"), (3, b"1")):  # 1e300 is clipped to the bound
        intake.on_message("plant/p1/telemetry", b'{"ts": %d, "a": %s, "b": 2}' % (ts, a))
    assert scoring.windows == 2
    assert metrics.registry.get_sample_value("sensord_values_clipped_total") == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(st.tuples(topics, st.one_of(st.binary(max_size=200), documents.map(encode))),
                         max_size=20))
@example(messages=[("plant/p1/telemetry", b'{"ts": 1, "a": 1, "b": 2}'),
                   ("plant/p1/telemetry", b'{"ts": 2, "a": 1e300, "b": 2}'),
                   ("plant/p1/telemetry", b'{"ts": 3, "a": 1, "b": 2}')])
def test_the_intake_never_raises_and_counts_every_message(messages: list[tuple[str, bytes]]) -> None:
    """Through the real intake and window buffers (a stand-in model: only its window shape is used)."""
    intake, scoring, metrics = _intake()
    for topic, payload in messages:
        assert intake.on_message(topic, payload) is True
    value = metrics.registry.get_sample_value
    assert value("sensord_messages_received_total") == len(messages)
    assert value("sensord_messages_rejected_total", {"reason": "internal_error"}) == 0
