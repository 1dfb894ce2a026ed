"""MetricsSink keeps each device's labelled series between windows; forgetting a device or a change of
channels must not leave it writing to series the metric no longer has."""

from __future__ import annotations

from sensord.detector import Decision
from sensord.metrics import DaemonMetrics
from sensord.sinks import MetricsSink

CH = ("a", "b")


def value(m: DaemonMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_series_are_updated_every_window() -> None:
    m = DaemonMetrics()
    sink = MetricsSink(m)
    sink.window("d1", 0.5, Decision(False, False, 0.25), CH, [0.75, 0.25])
    sink.window("d1", 0.9, Decision(True, True, 1.5), CH, [0.1, 0.9])
    assert value(m, "sensord_windows_scored_total", device="d1") == 2
    assert value(m, "sensord_reconstruction_error", device="d1") == 0.9
    assert value(m, "sensord_anomaly_score", device="d1") == 1.5
    assert value(m, "sensord_anomaly_state", device="d1") == 1
    assert value(m, "sensord_channel_error_share", device="d1", channel="b") == 0.9


def test_a_forgotten_device_that_comes_back_has_its_series_again() -> None:
    m = DaemonMetrics()
    sink = MetricsSink(m)
    sink.window("d1", 0.5, Decision(False, False, 0.25), CH, [0.75, 0.25])
    sink.window("d2", 0.5, Decision(False, False, 0.25), CH, [0.5, 0.5])
    sink.forget("d1")
    assert value(m, "sensord_windows_scored_total", device="d1") is None
    assert value(m, "sensord_channel_error_share", device="d1", channel="a") is None
    assert value(m, "sensord_windows_scored_total", device="d2") == 1  # the others keep theirs
    sink.window("d1", 0.7, Decision(False, False, 0.35), CH, [0.4, 0.6])
    assert value(m, "sensord_windows_scored_total", device="d1") == 1  # counted afresh, and visible
    assert value(m, "sensord_reconstruction_error", device="d1") == 0.7
    assert value(m, "sensord_channel_error_share", device="d1", channel="a") == 0.4


def test_new_channels_replace_the_old_share_series() -> None:
    m = DaemonMetrics()
    sink = MetricsSink(m)
    sink.window("d1", 0.5, Decision(False, False, 0.25), CH, [0.75, 0.25])
    sink.channels_changed()
    sink.window("d1", 0.5, Decision(False, False, 0.25), ("x",), [1.0])
    assert value(m, "sensord_channel_error_share", device="d1", channel="a") is None
    assert value(m, "sensord_channel_error_share", device="d1", channel="x") == 1.0
    sink.channels_changed()  # and back: the old channels' series are made again, not the dropped objects
    sink.window("d1", 0.5, Decision(False, False, 0.25), CH, [0.3, 0.7])
    assert value(m, "sensord_channel_error_share", device="d1", channel="b") == 0.7
