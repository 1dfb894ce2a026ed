"""Unit tests of the live pipeline (Intake + ScoringLoop) with a fake publisher and a real tiny bundle."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from e2e_support import wait_until

from sensord.config import DetectorConfig, SensordConfig, config_from_dict
from sensord.dataio import Series
from sensord.evaluation import decide_rows, score_series
from sensord.metrics import DaemonMetrics
from sensord.pipeline import Intake, ScoringLoop, ServingModel
from sensord.ratelimit import RateLimitedLog
from sensord.simulator import CHANNELS, PumpSimulator
from sensord.sinks import AlertPublisher
from sensord.windows import windowize

pytestmark = pytest.mark.training  # trains a tiny TensorFlow model (make test-fast leaves it out)

W = 10
PREFIX = "pfx"
TINY = {
    "window": {"length": W},
    "model": {"kind": "dense", "encoder_units": [16], "latent_units": 4},
    "training": {"epochs": 15, "batch_size": 64, "patience": 15},
    "threshold": {"method": "max_factor", "factor": 2.0},
}


def _refuse(constant: str) -> Any:
    raise AssertionError(f"payload is not strict JSON: {constant}")


class FakePublisher:
    """Records every publish call (thread-safe: the scoring thread publishes)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], int, bool]] = []
        self._lock = threading.Lock()

    def publish(self, topic: str, payload: str | bytes, qos: int = 0, retain: bool = False) -> None:
        with self._lock:
            self.calls.append((topic, json.loads(payload, parse_constant=_refuse), qos, retain))

    def on(self, topic: str) -> list[tuple[str, dict[str, Any], int, bool]]:
        with self._lock:
            return [c for c in self.calls if c[0] == topic]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Series]:
    """A tiny bundle trained on 800 s of a healthy pump, and 300 s of the same pump afterwards."""
    from sensord.training import train_bundle

    sim = PumpSimulator(seed=11)
    healthy = sim.generate(800)
    later = sim.generate(300)
    path = tmp_path_factory.mktemp("pipeline") / "model"
    train_bundle(Series(healthy.timestamps, healthy.values.astype(np.float32), CHANNELS, None, "healthy"),
                 config_from_dict(TINY), path)
    return path, Series(later.timestamps, later.values.astype(np.float32), CHANNELS, None, "later")


def make_cfg(model: Path, detector: dict[str, int] | None = None, **daemon: Any) -> SensordConfig:
    return config_from_dict({
        "window": {"length": W},
        "mqtt": {"device_topic": "s/{device}/t", "subscriptions": ["s/+/t"], "topic_prefix": PREFIX},
        "detector": detector or {"raise_after": 1, "clear_after": 1},
        "daemon": {"model": str(model), **daemon},
        "logging": {"rate_limit_seconds": 60.0},
    })


class Rig:
    def __init__(self, cfg: SensordConfig, queue_size: int | None = None, batch_max: int = 64,
                 batch_wait: float = 0.02) -> None:
        self.cfg = cfg
        self.model = ServingModel.load(cfg)
        self.metrics = DaemonMetrics()
        self.pub = FakePublisher()
        self.alerts = AlertPublisher(self.pub, PREFIX)
        self.scoring = ScoringLoop(self.metrics, self.alerts, queue_size or cfg.daemon.queue_size, batch_max,
                                   batch_wait)
        self.intake = Intake(cfg, self.model, self.scoring, self.metrics)

    def value(self, name: str, **labels: str) -> float:
        v = self.metrics.registry.get_sample_value(name, labels)
        assert v is not None, f"no sample {name}{labels}"
        return v

    def send(self, device: str, ts: float, values: np.ndarray | list[float]) -> None:
        body = {"ts": ts, "values": {ch: float(v) for ch, v in zip(CHANNELS, values, strict=False)}}
        self.intake.on_message(f"s/{device}/t", json.dumps(body).encode())

    def send_rows(self, device: str, series: Series, start: int = 0, stop: int | None = None) -> None:
        for i in range(start, len(series) if stop is None else stop):
            self.send(device, float(series.timestamps[i]), series.values[i])

    def queued(self) -> list[Any]:
        items = []
        while not self.scoring.queue.empty():
            items.append(self.scoring.queue.get_nowait())
        return items


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for r in made:
        if r.scoring._thread.is_alive():
            r.scoring.drain(2.0)


@pytest.fixture
def rig(data: tuple[Path, Series], rigs: list[Rig]) -> Rig:
    r = Rig(make_cfg(data[0]))
    rigs.append(r)
    return r


# -- intake: readings -> windows ----------------------------------------------------------------

def test_readings_become_windows(rig: Rig, data: tuple[Path, Series]) -> None:
    series = data[1]
    rig.send_rows("p1", series, 0, 25)
    assert rig.value("sensord_messages_received_total") == 25
    assert rig.value("sensord_devices") == 1
    assert rig.value("sensord_queue_depth") == 25 - W + 1
    items = rig.queued()
    assert len(items) == 25 - W + 1
    offline = windowize(series.timestamps[:25], series.values[:25], rig.model.spec).values
    drift = rig.model.spec.drift
    assert drift is not None  # the simulator's temperatures are taken against their baseline
    as_read = [c for c in range(series.values.shape[1]) if c not in drift.index]
    for k, (model, win) in enumerate(items):
        last = W - 1 + k
        assert model is rig.model
        assert win.device == "p1"
        assert win.start == series.timestamps[last - W + 1]
        assert win.end == series.timestamps[last]
        np.testing.assert_array_equal(win.values, offline[k])
        np.testing.assert_array_equal(win.values[:, as_read], series.values[last - W + 1:last + 1, as_read])
    assert rig.pub.calls == []  # nothing is published before scoring


def test_hop_from_config(data: tuple[Path, Series], rigs: list[Rig]) -> None:
    cfg = config_from_dict({**_raw(make_cfg(data[0])), "window": {"length": W, "hop": 5}})
    r = Rig(cfg)
    rigs.append(r)
    r.send_rows("p1", data[1], 0, 30)
    assert [w.end for _, w in r.queued()] == [float(data[1].timestamps[i]) for i in (9, 14, 19, 24, 29)]


def _raw(cfg: SensordConfig) -> dict[str, Any]:
    from sensord.config import config_to_dict
    return config_to_dict(cfg)


def test_batch_is_scored_in_one_interpreter_call(rig: Rig, data: tuple[Path, Series]) -> None:
    series = data[1]
    rig.send_rows("p1", series, 0, 40)
    rig.send_rows("p2", series, 100, 140)
    batch = rig.scoring._take_batch()
    assert len(batch) == 2 * (40 - W + 1)
    assert rig.scoring.queue.empty()
    rig.scoring.process(batch)
    assert rig.value("sensord_windows_scored_total", device="p1") == 31
    assert rig.value("sensord_windows_scored_total", device="p2") == 31
    assert rig.value("sensord_scoring_batch_size_count") == 1
    assert rig.value("sensord_scoring_batch_size_sum") == 62
    assert rig.value("sensord_scoring_duration_seconds_count") == 1
    # The last window's error is exactly what the scorer gives for that window on its own (cut, with the
    # temperatures against their baselines, from the same 40 readings p2 sent).
    last = windowize(series.timestamps[100:140], series.values[100:140], rig.model.spec).values[-1]
    expected = rig.model.scorer.score(last[None]).errors[0]
    assert rig.value("sensord_reconstruction_error", device="p2") == pytest.approx(expected, rel=1e-5)
    assert rig.value("sensord_anomaly_score", device="p2") == pytest.approx(
        expected / rig.model.bundle.threshold.value, rel=1e-5)
    # Each device's first window publishes its retained state; later only alert events change it.
    for dev, first in (("p1", W - 1), ("p2", 100 + W - 1)):
        states = rig.pub.on(f"{PREFIX}/state/{dev}")
        assert len(states) == 1 + len(rig.pub.on(f"{PREFIX}/alerts/{dev}"))
        _, body, qos, retain = states[0]
        assert (qos, retain) == (1, True)
        assert body["device"] == dev and body["model_id"] == rig.model.bundle.model_id
        assert body["state"] == "normal" and body["since"] == _iso(series.timestamps[first])
    assert rig.pub.on(f"{PREFIX}/scores/p1") == []  # publish_scores is off by default


def test_batch_max_bounds_a_batch(data: tuple[Path, Series], rigs: list[Rig]) -> None:
    r = Rig(make_cfg(data[0]), batch_max=8)
    rigs.append(r)
    r.send_rows("p1", data[1], 0, 30)
    sizes = []
    while not r.scoring.queue.empty():
        batch = r.scoring._take_batch()
        sizes.append(len(batch))
        r.scoring.process(batch)
    assert sizes == [8, 8, 5]
    assert r.value("sensord_windows_scored_total", device="p1") == 21


def test_scoring_thread_scores_everything_and_drains(data: tuple[Path, Series], rigs: list[Rig]) -> None:
    r = Rig(make_cfg(data[0]), batch_wait=0.2)
    rigs.append(r)
    r.scoring.start()
    for i in range(60):  # interleaved devices: batches mix them
        for dev, off in (("a", 0), ("b", 150)):
            r.send(dev, float(data[1].timestamps[off + i]), data[1].values[off + i])
    assert r.scoring.drain(5.0) is True
    assert not r.scoring._thread.is_alive()
    assert r.value("sensord_windows_scored_total", device="a") == 60 - W + 1
    assert r.value("sensord_windows_scored_total", device="b") == 60 - W + 1
    assert r.value("sensord_scoring_batch_size_sum") == 2 * (60 - W + 1)
    assert r.value("sensord_scoring_batch_size_count") < 10  # batched, not one call per window
    assert r.value("sensord_queue_depth") == 0
    assert r.scoring.healthy(5.0) is False  # thread stopped


def test_drain_does_not_wait_out_a_long_batch_wait(data: tuple[Path, Series], rigs: list[Rig]) -> None:
    """At shutdown intake is closed: a batch still filling is scored at once, not after batch_wait.

    No stopwatch: the drain's own timeout is shorter than the batch wait, so a drain that waited the batch
    out would report windows left unscored."""
    r = Rig(make_cfg(data[0]), batch_max=4096, batch_wait=10.0)
    rigs.append(r)
    r.scoring.start()
    r.send_rows("p1", data[1], 0, 50)
    wait_until(lambda: r.scoring.queue.qsize() == 0, 5.0, "the scoring thread taking every window into its batch")
    # still filling its batch: nothing scored yet
    assert r.metrics.registry.get_sample_value("sensord_windows_scored_total", {"device": "p1"}) is None
    assert r.scoring.drain(5.0) is True
    assert r.value("sensord_windows_scored_total", device="p1") == 50 - W + 1
    assert r.value("sensord_scoring_batch_size_count") == 1


def test_alerts_match_offline_detector(data: tuple[Path, Series], rigs: list[Rig]) -> None:
    """A gross step fault raises exactly the alerts the offline evaluation computes, with full payloads."""
    series = data[1]
    values = series.values[:120].copy()
    values[50:70] += 10.0 * np.std(series.values, axis=0)  # every channel 10 sd off
    faulty = Series(series.timestamps[:120], values, CHANNELS, None)
    det = {"raise_after": 2, "clear_after": 3}
    r = Rig(make_cfg(data[0], det), batch_wait=0.05)
    rigs.append(r)
    r.scoring.start()
    r.send_rows("p1", faulty)
    assert r.scoring.drain(5.0)
    scored = score_series(faulty, r.model.scorer, r.model.spec, "p1")
    _, expected = decide_rows(scored, r.model.scorer.threshold, DetectorConfig(**det), "p1")
    assert len(scored.rows) == 120 - W + 1
    alerts = r.pub.on(f"{PREFIX}/alerts/p1")
    assert [(b["state"], b["window_end"]) for _, b, _, _ in alerts] == \
        [(e.state, _iso(e.window_end)) for e in expected]
    raised = [b for _, b, _, _ in alerts if b["state"] == "raised"]
    assert raised, "the step fault was not detected"
    # Raised within raise_after windows of the onset (row 50), cleared after the fault ends (row 70).
    assert raised[0]["window_end"] == _iso(series.timestamps[51])
    cleared = [b for _, b, _, _ in alerts if b["state"] == "cleared"]
    assert cleared and cleared[0]["window_end"] >= _iso(series.timestamps[69 + W])
    body = raised[0]
    assert set(body) == {"alert_id", "device", "state", "window_start", "window_end", "raised_at", "score",
                         "error", "threshold", "top_channels", "model_id"}
    assert cleared[0]["alert_id"] == body["alert_id"]
    assert body["model_id"] == r.model.bundle.model_id
    assert body["score"] > 1 and body["error"] > body["threshold"]
    assert len(body["top_channels"]) == 3 and set(body["top_channels"][0]) == {"channel", "share"}
    assert all(qos == 1 and not retain for _, _, qos, retain in alerts)
    states = [b["state"] for _, b, _, _ in r.pub.on(f"{PREFIX}/state/p1")]
    assert states == ["normal"] + ["alert" if b["state"] == "raised" else "normal" for _, b, _, _ in alerts]
    assert states[-1] == "normal"
    assert r.value("sensord_alerts_raised_total", device="p1") == len(raised)
    assert r.value("sensord_anomaly_state", device="p1") == 0


def _shares(r: Rig, device: str) -> dict[str, float]:
    """The sensord_channel_error_share series of ``device`` in the registry, by channel."""
    out = {}
    for fam in r.metrics.registry.collect():
        for s in fam.samples:
            if s.name == "sensord_channel_error_share" and s.labels["device"] == device:
                out[s.labels["channel"]] = s.value
    return out


def test_channel_error_shares_say_which_sensor_drives_the_score(data: tuple[Path, Series], rigs: list[Rig]) -> None:
    """One channel far off: its share of the last window's error is the largest, a device's shares sum to 1,
    and they are the shares the alert names as top_channels."""
    series = data[1]
    values = series.values[:40].copy()
    values[20:, CHANNELS.index("pressure")] += 10.0 * np.std(series.values[:, CHANNELS.index("pressure")])
    r = Rig(make_cfg(data[0], {"raise_after": 1, "clear_after": 5}))
    rigs.append(r)
    r.send_rows("p1", Series(series.timestamps[:40], values, CHANNELS, None))
    r.send_rows("p2", series, 0, W)  # a healthy neighbour: one window
    r.scoring.process(r.queued())
    p1, p2 = _shares(r, "p1"), _shares(r, "p2")
    assert set(p1) == set(p2) == set(CHANNELS)  # one series per channel of the model, per device
    assert sum(p1.values()) == pytest.approx(1.0) and sum(p2.values()) == pytest.approx(1.0)
    assert max(p1, key=p1.__getitem__) == "pressure" and p1["pressure"] > 0.5
    (raised,) = [b for _, b, _, _ in r.pub.on(f"{PREFIX}/alerts/p1") if b["state"] == "raised"]
    assert raised["top_channels"][0]["channel"] == "pressure"


def test_a_model_with_other_channels_drops_the_old_channels_share_series(data: tuple[Path, Series],
                                                                      rigs: list[Rig]) -> None:
    """After a reload to a model whose channels differ, no series is left for a channel the model lacks."""
    r = Rig(make_cfg(data[0]))
    rigs.append(r)
    r.send_rows("p1", data[1], 0, W)
    r.send_rows("p2", data[1], 0, W)
    items = r.queued()
    r.scoring.process(items)
    assert set(_shares(r, "p2")) == set(CHANNELS)
    renamed = tuple(f"new_{c}" for c in CHANNELS)
    other = dataclasses.replace(r.model, bundle=dataclasses.replace(r.model.bundle, channels=renamed))
    r.scoring.process([(other, items[0][1])])  # only p1 scored with the new model so far
    assert set(_shares(r, "p1")) == set(renamed)
    assert _shares(r, "p2") == {}  # p2's shares were for channels the model no longer has
    r.scoring.process([(other, items[1][1])])
    assert set(_shares(r, "p2")) == set(renamed)


def _iso(ts: float) -> str:
    from sensord.sinks import iso
    return iso(float(ts))


# -- bounds and rejections ----------------------------------------------------------------------

def test_max_devices_cap(data: tuple[Path, Series], rigs: list[Rig]) -> None:
    r = Rig(make_cfg(data[0], max_devices=2))
    rigs.append(r)
    v = data[1].values[0]
    for t, dev in enumerate(["d1", "d2", "d3", "d1", "d3", "d4", "d2"]):
        r.send(dev, 1000.0 + t, v)
    assert set(r.intake.buffers) == {"d1", "d2"}
    assert r.value("sensord_devices") == 2
    assert r.value("sensord_devices_rejected_total") == 3
    assert r.value("sensord_readings_rejected_total", reason="device_limit") == 3
    assert r.value("sensord_messages_received_total") == 7


def test_full_queue_drops_and_counts(data: tuple[Path, Series], rigs: list[Rig],
                                     caplog: pytest.LogCaptureFixture) -> None:
    r = Rig(make_cfg(data[0]), queue_size=3)  # scoring thread not started: nothing leaves the queue
    rigs.append(r)
    with caplog.at_level(logging.WARNING, logger="sensord.pipeline"):
        r.send_rows("p1", data[1], 0, W + 5)  # 6 windows
    assert r.scoring.queue.qsize() == 3
    assert r.value("sensord_windows_dropped_total") == 3
    assert r.value("sensord_queue_depth") == 3
    full = [rec for rec in caplog.records if "queue full" in rec.getMessage()]
    assert len(full) == 1  # rate-limited


def test_out_of_order_reading_counted_and_skipped(rig: Rig, data: tuple[Path, Series]) -> None:
    v = data[1].values
    for t in range(12):
        rig.send("p1", 100.0 + t, v[t])
    rig.send("p1", 105.0, v[12])  # older than the last reading
    rig.send("p1", 111.0, v[13])  # equal timestamps are accepted
    rig.send("p1", 112.0, v[14])
    assert rig.value("sensord_readings_rejected_total", reason="out_of_order") == 1
    ends = [w.end for _, w in rig.queued()]
    assert ends == [109.0, 110.0, 111.0, 111.0, 112.0]


def test_gap_restarts_the_window(rig: Rig, data: tuple[Path, Series]) -> None:
    v = data[1].values
    for t in range(12):
        rig.send("p1", 100.0 + t, v[t])
    for t in range(12):
        rig.send("p1", 200.0 + t, v[t])  # 89 s silence > max_gap_seconds
    ends = [w.end for _, w in rig.queued()]
    assert ends == [109.0, 110.0, 111.0, 209.0, 210.0, 211.0]


def test_rejected_messages_and_readings_by_reason(rig: Rig, data: tuple[Path, Series]) -> None:
    good = {ch: 1.0 for ch in CHANNELS}
    msgs = [
        ("s/p1/t", b"{oops"),
        ("s/p1/t", b"[1, 2]"),
        ("nope/p1/x", json.dumps({"ts": 1, **good}).encode()),
        ("s/p1/t", json.dumps({"ts": 1, **{**good, "flow": "x"}}).encode()),
        ("s/p1/t", json.dumps({"ts": 2, "vibration_1": 1.0}).encode()),
        ("s/p1/t", json.dumps({"ts": "never", **good}).encode()),
        ("s/p1/t", b'{"ts": 3, "values": {"vibration_1": NaN, "vibration_2": 1, "current": 1, "pressure": 1,'
                   b' "temperature": 1, "thermocouple": 1, "voltage": 1, "flow": 1}}'),
        ("s/p1/t", json.dumps({"ts": 4, **good}).encode()),
    ]
    for topic, payload in msgs:
        rig.intake.on_message(topic, payload)
    assert rig.value("sensord_messages_received_total") == len(msgs)
    for reason, n in {"malformed_json": 1, "bad_payload": 1, "no_device": 1, "stopping": 0}.items():
        assert rig.value("sensord_messages_rejected_total", reason=reason) == n, reason
    for reason, n in {"bad_value": 1, "missing_channel": 1, "bad_timestamp": 1, "non_finite": 1,
                      "out_of_order": 0}.items():
        assert rig.value("sensord_readings_rejected_total", reason=reason) == n, reason
    assert list(rig.intake.buffers) == ["p1"]  # the last reading was accepted


def test_stopped_intake_counts_messages_as_stopping(rig: Rig, data: tuple[Path, Series]) -> None:
    rig.send_rows("p1", data[1], 0, W)
    rig.intake.stop()
    rig.send_rows("p1", data[1], W, W + 4)
    assert rig.value("sensord_messages_received_total") == W + 4
    assert rig.value("sensord_messages_rejected_total", reason="stopping") == 4
    assert rig.scoring.queue.qsize() == 1


def test_repeated_malformed_messages_logged_once(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sensord.pipeline"):
        for _ in range(5):
            rig.intake.on_message("s/p1/t", b"garbage")
    assert rig.value("sensord_messages_rejected_total", reason="malformed_json") == 5
    assert len([r for r in caplog.records if "malformed_json" in r.getMessage()]) == 1


# -- reload -------------------------------------------------------------------------------------

def test_swap_keeps_buffers_and_queued_windows_keep_their_model(data: tuple[Path, Series], rigs: list[Rig],
                                                                tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(data[0], other)
    meta = json.loads((other / "bundle.json").read_text())
    meta["model_id"] = "other-model"
    meta["threshold"]["value"] = meta["threshold"]["value"] * 3
    (other / "bundle.json").write_text(json.dumps(meta))
    r = Rig(make_cfg(data[0]))
    rigs.append(r)
    old = r.model
    r.send_rows("p1", data[1], 0, W + 2)  # 3 windows with the old model
    new_cfg = make_cfg(other)
    new = ServingModel.load(new_cfg)
    assert new.compatible(old)
    r.intake.swap(new_cfg, new)
    r.send_rows("p1", data[1], W + 2, W + 4)  # buffer kept: each reading completes a window at once
    items = r.queued()
    assert [m.bundle.model_id for m, _ in items] == [old.bundle.model_id] * 3 + ["other-model"] * 2
    r.scoring.process(items)
    assert r.value("sensord_windows_scored_total", device="p1") == 5
    assert r.scoring.detectors["p1"].threshold == pytest.approx(meta["threshold"]["value"])


def test_swap_to_a_model_with_other_drift_removal_restarts_the_window(data: tuple[Path, Series], rigs: list[Rig],
                                                                       tmp_path: Path) -> None:
    """The buffer holds readings with the old model's baselines taken off: a model that takes other
    channels (or other levels) off must not get windows half of one and half of the other."""
    other = tmp_path / "other"
    shutil.copytree(data[0], other)
    meta = json.loads((other / "bundle.json").read_text())
    meta["model_id"] = "other-drift"
    meta["window"]["drift"]["channels"] = meta["window"]["drift"]["channels"][:1]
    meta["window"]["drift"]["levels"] = meta["window"]["drift"]["levels"][:1]
    (other / "bundle.json").write_text(json.dumps(meta))
    r = Rig(make_cfg(data[0]))
    rigs.append(r)
    r.send_rows("p1", data[1], 0, W + 2)
    new_cfg = make_cfg(other)
    new = ServingModel.load(new_cfg)
    assert not new.compatible(r.model)
    r.intake.swap(new_cfg, new)
    r.send_rows("p1", data[1], W + 2, 2 * W + 2)  # a whole new window before the first one comes
    items = r.queued()
    assert [m.bundle.model_id for m, _ in items] == [r.model.bundle.model_id] * 3 + ["other-drift"]
    expected = windowize(data[1].timestamps[W + 2:2 * W + 2], data[1].values[W + 2:2 * W + 2], new.spec).values
    np.testing.assert_array_equal(items[-1][1].values, expected[0])


# -- RateLimitedLog -----------------------------------------------------------------------------

def test_rate_limited_log_suppresses_repeats(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.ratelimit")
    rl = RateLimitedLog(logger, 0.3)
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        for i in range(4):
            rl.warning("k1", "problem %d", i)
        rl.warning("k2", "other %s", "x")
        assert [r.getMessage() for r in caplog.records] == ["problem 0", "other x"]
        time.sleep(0.35)
        rl.warning("k1", "problem %d", 9)
        rl.warning("k1", "problem %d", 10)
        rl.warning("k2", "other %s", "y")
    assert [r.getMessage() for r in caplog.records] == [
        "problem 0", "other x", "problem 9 (3 similar suppressed)", "other y"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_rate_limited_log_zero_interval_logs_everything(caplog: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logging.getLogger("test.ratelimit0"), 0.0)
    with caplog.at_level(logging.WARNING, logger="test.ratelimit0"):
        for i in range(3):
            rl.warning("k", "m%d", i)
    assert [r.getMessage() for r in caplog.records] == ["m0", "m1", "m2"]


def test_deeply_nested_and_infinite_payloads_are_rejected_not_raised(rig: Rig, data: tuple[Path, Series]) -> None:
    rig.intake.on_message("s/p1/t", b"[" * 50_000)  # under mqtt.max_payload_bytes, far over the recursion limit
    good = {ch: 1.0 for ch in CHANNELS}
    rig.intake.on_message("s/p1/t", b'{"ts": 1e400, "values": ' + json.dumps(good).encode() + b"}")
    assert rig.value("sensord_messages_rejected_total", reason="malformed_json") == 1
    assert rig.value("sensord_readings_rejected_total", reason="bad_timestamp") == 1
    rig.send_rows("p1", data[1], 0, W)  # and the intake still works
    assert rig.scoring.queue.qsize() == 1


def test_an_unexpected_error_is_counted_logged_once_and_intake_goes_on(
        rig: Rig, data: tuple[Path, Series], caplog: pytest.LogCaptureFixture) -> None:
    """paho would end its network thread on an exception from a callback: on_message must never raise."""
    real_parse = rig.intake.parser.parse

    def broken(topic: str, payload: bytes) -> Any:
        if payload == b"boom":
            raise RuntimeError("a bug")
        return real_parse(topic, payload)

    rig.intake.parser.parse = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="sensord.pipeline"):
        for _ in range(3):
            rig.intake.on_message("s/p1/t", b"boom")
    assert rig.value("sensord_messages_rejected_total", reason="internal_error") == 3
    assert len([r for r in caplog.records if "could not be processed" in r.getMessage()]) == 1
    assert "RuntimeError: a bug" in caplog.text
    rig.send_rows("p1", data[1], 0, W)
    assert rig.scoring.queue.qsize() == 1
    assert rig.intake._lock.acquire(timeout=1)  # the lock was released on the error path
    rig.intake._lock.release()


# -- unlucky timestamps (issue 14) --------------------------------------------------------------

def test_future_reading_never_becomes_last_reading(rig: Rig, data: tuple[Path, Series]) -> None:
    series = data[1]
    rig.send_rows("p1", series, 0, 5)
    rig.send("p1", time.time() + 365 * 86400, series.values[5])  # a gateway clock glitch, a year ahead
    rig.send_rows("p1", series, 5, 30)
    assert rig.value("sensord_readings_rejected_total", reason="future_timestamp") == 1
    assert rig.value("sensord_readings_rejected_total", reason="out_of_order") == 0
    assert rig.intake.buffers["p1"].last_timestamp == float(series.timestamps[29])
    assert len(rig.queued()) == 30 - W + 1


def test_clock_jump_back_resyncs_window_counted_and_logged_once(rig: Rig, data: tuple[Path, Series],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    series = data[1]
    rig.send_rows("p1", series, 0, W)
    rig.send("p1", time.time(), series.values[W])  # no device clock for once: arrival time, ~2 years later
    n = rig.cfg.daemon.clock_resync_after
    with caplog.at_level(logging.WARNING, logger="sensord.pipeline"):
        rig.send_rows("p1", series, W + 1, len(series))
    assert rig.value("sensord_readings_rejected_total", reason="out_of_order") == n - 1
    assert rig.value("sensord_clock_resyncs_total") == 1
    assert len([r for r in caplog.records if "clock jumped back" in r.getMessage()]) == 1
    rest = len(series) - (W + 1) - (n - 1)
    assert len(rig.queued()) == 1 + rest - W + 1  # the window before, then all after the resync


def test_retained_telemetry_is_ignored_and_counted(rig: Rig, data: tuple[Path, Series]) -> None:
    body = {"ts": time.time(), "values": {ch: 1.0 for ch in CHANNELS}}
    rig.intake.on_message("s/p1/t", json.dumps(body).encode(), retained=True)
    assert rig.value("sensord_messages_rejected_total", reason="retained") == 1
    assert rig.intake.buffers == {}


# -- never NaN (issue 14) -------------------------------------------------------------------------

def test_values_near_float32_max_are_clipped_scored_finite_and_alert_in_strict_json(
        data: tuple[Path, Series], rigs: list[Rig]) -> None:
    series = data[1]
    r = Rig(make_cfg(data[0]), batch_wait=0.05)
    rigs.append(r)
    r.scoring.start()
    r.send_rows("p1", series, 0, 20)
    for i in range(20, 40):  # a common "invalid" marker, and one beyond float32
        r.send("p1", float(series.timestamps[i]), [3e38 if i % 2 else 1e300] * len(CHANNELS))
    assert r.scoring.drain(5.0)
    assert r.value("sensord_values_clipped_total") == 20
    assert r.value("sensord_readings_rejected_total", reason="non_finite") == 0
    assert r.value("sensord_windows_scored_total", device="p1") == 40 - W + 1
    assert np.isfinite(r.value("sensord_reconstruction_error", device="p1"))
    assert np.isfinite(r.value("sensord_anomaly_score", device="p1"))
    assert [b["state"] for _, b, _, _ in r.pub.on(f"{PREFIX}/alerts/p1")] == ["raised"]
    hi = r.model.high
    assert np.all(hi < np.finfo(np.float32).max)


def test_payloads_never_carry_nan() -> None:
    from sensord.detector import AlertEvent
    from sensord.sinks import alert_payload, dumps
    nan = float("nan")
    ev = AlertEvent("p1", "raised", 0.0, 1.0, 1.0, nan, float("inf"), 0.5, (("a", nan),))
    body = json.loads(dumps(alert_payload(ev, "m")), parse_constant=lambda c: pytest.fail(c))
    assert body["score"] is None and body["error"] is None and body["top_channels"][0]["share"] is None
    with pytest.raises(ValueError):
        dumps({"x": nan})


def test_bad_device_ids_rejected_counted_and_logged_escaped(data: tuple[Path, Series],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    cfg = config_from_dict({"window": {"length": W}, "daemon": {"model": str(data[0])},
                            "mqtt": {"device_field": "id", "device_topic": None, "subscriptions": ["s/#"]},
                            "logging": {"rate_limit_seconds": 0.0}})
    r = Rig(cfg)
    good = {ch: 1.0 for ch in CHANNELS}
    with caplog.at_level(logging.WARNING, logger="sensord.pipeline"):
        for dev in ("nul\x00", "evil\nCRITICAL forged", "a/b", "ok"):
            r.intake.on_message("s/x", json.dumps({"id": dev, "ts": 1, **good}).encode())
    assert r.value("sensord_readings_rejected_total", reason="bad_device_id") == 3
    assert list(r.intake.buffers) == ["ok"]
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "evil\\nCRITICAL forged" in text and "\x00" not in text
    assert not any(line.startswith("CRITICAL") for line in text.splitlines())


# -- fairness and payload size (issue 14) ---------------------------------------------------------

def test_flooding_device_is_throttled_to_its_share_and_the_neighbour_is_queued(
        data: tuple[Path, Series], rigs: list[Rig], caplog: pytest.LogCaptureFixture) -> None:
    series = data[1]
    r = Rig(make_cfg(data[0]), queue_size=10)  # scoring thread not started: nothing leaves the queue
    rigs.append(r)
    r.send_rows("light", series, 0, 1)
    with caplog.at_level(logging.WARNING, logger="sensord.pipeline"):
        r.send_rows("flood", series, 0, 40)  # 31 windows: 5 until the queue is half full (its share, 10 // 2)
        r.send_rows("light", series, 1, W + 2)  # 3 windows
    assert r.value("sensord_windows_throttled_total", device="flood") == 31 - 5
    assert r.value("sensord_windows_dropped_total") == 0
    queued = [w.device for _, w in r.queued()]
    assert queued.count("flood") == 5 and queued.count("light") == 3
    assert len([rec for rec in caplog.records if "share of the scoring queue" in rec.getMessage()]) == 1


def test_throttled_device_gets_room_again_once_its_windows_are_scored(data: tuple[Path, Series],
                                                                      rigs: list[Rig]) -> None:
    series = data[1]
    r = Rig(make_cfg(data[0]), queue_size=4)
    rigs.append(r)
    r.send_rows("a", series, 0, 1)
    r.send_rows("b", series, 0, W + 5)  # 2 queued (half the queue, its share), 4 throttled
    assert r.value("sensord_windows_throttled_total", device="b") == 4
    r.scoring._taken(r.scoring.queue.get_nowait())  # the scorer takes one
    r.send_rows("b", series, W + 5, W + 6)
    assert r.scoring.queue.qsize() == 2 and r.value("sensord_windows_throttled_total", device="b") == 4


def test_with_many_devices_a_burst_is_queued_while_the_queue_is_mostly_empty(data: tuple[Path, Series],
                                                                            rigs: list[Rig]) -> None:
    """60 devices on a queue of 100: a share is one window, but below half full nobody is throttled."""
    series = data[1]
    r = Rig(make_cfg(data[0]), queue_size=100)  # scoring thread not started: nothing leaves the queue
    rigs.append(r)
    for d in range(60):
        r.send_rows(f"d{d}", series, 0, 1)
    for d in range(10):  # ten devices, a burst of 3 windows each (a gateway forwarding a batch)
        r.send_rows(f"d{d}", series, 1, W + 2)
    assert r.value("sensord_windows_dropped_total") == 0
    assert not any(r.metrics.registry.get_sample_value("sensord_windows_throttled_total", {"device": f"d{d}"})
                   for d in range(60))
    queued = [w.device for _, w in r.queued()]
    assert len(queued) == 30 and all(queued.count(f"d{d}") == 3 for d in range(10))


def test_under_pressure_a_flooding_device_is_throttled_and_a_quiet_neighbour_still_queued(
        data: tuple[Path, Series], rigs: list[Rig]) -> None:
    """The flood is queued freely up to half the queue, then throttled; the neighbours keep their room."""
    series = data[1]
    r = Rig(make_cfg(data[0]), queue_size=100)
    rigs.append(r)
    for d in range(60):  # share 100 // 61 = 1 once the flood is tracked too
        r.send_rows(f"d{d}", series, 0, 1)
    r.send_rows("flood", series, 0, W - 1 + 80)  # 80 windows
    assert r.scoring.queue.qsize() == 50
    assert r.value("sensord_windows_throttled_total", device="flood") == 80 - 50
    for d in range(40):  # a window each from 40 quiet neighbours, the queue half full or more
        r.send_rows(f"d{d}", series, 1, W)
    r.send_rows("flood", series, W - 1 + 80, W - 1 + 81)  # the flood still has more than its share waiting
    assert r.value("sensord_windows_throttled_total", device="flood") == 80 - 50 + 1
    assert r.value("sensord_windows_dropped_total") == 0
    queued = [w.device for _, w in r.queued()]
    assert queued.count("flood") == 50 and len(queued) == 90
    assert all(queued.count(f"d{d}") == 1 for d in range(40))


def test_payload_over_the_size_limit_is_rejected_unparsed(data: tuple[Path, Series]) -> None:
    cfg = config_from_dict({"window": {"length": W}, "daemon": {"model": str(data[0])},
                            "mqtt": {"device_topic": "s/{device}/t", "subscriptions": ["s/+/t"],
                                     "max_payload_bytes": 1024}})
    r = Rig(cfg)
    r.intake.on_message("s/p1/t", b"[" + b"1," * 2000 + b"1]")
    assert r.value("sensord_messages_rejected_total", reason="too_large") == 1
    assert r.value("sensord_messages_rejected_total", reason="malformed_json") == 0


def test_only_messages_arriving_after_intake_stopped_are_left_unacknowledged(rig: Rig) -> None:
    """What on_message returns decides the MQTT acknowledgement (persistent session): a rejected message
    is taken (acknowledged, never redelivered); one that arrives after the stop is left to come again."""
    assert rig.intake.on_message("s/p1/t", b"{broken") is True
    assert rig.intake.on_message("s/p1/t", b"x" * (rig.cfg.mqtt.max_payload_bytes + 1)) is True
    assert rig.intake.on_message("s/p1/t", b"{}", True) is True  # retained: ignored, taken
    rig.intake.stop()
    assert rig.intake.on_message("s/p1/t", b"{}") is False


class RefusingPublisher(FakePublisher):
    """Like a broker client refusing a topic: raises for anything about device ``bad``."""

    def publish(self, topic: str, payload: str | bytes, qos: int = 0, retain: bool = False) -> None:
        if "/bad" in topic:
            raise ValueError("Publish topic cannot contain wildcards")
        super().publish(topic, payload, qos, retain)


def test_a_publishing_error_costs_only_its_own_window(data: tuple[Path, Series], rigs: list[Rig]) -> None:
    rig = Rig(make_cfg(data[0]))
    rigs.append(rig)
    rig.pub = RefusingPublisher()
    rig.alerts.publisher = rig.pub
    rig.alerts.publish_scores = True
    for i in range(3 * W):  # interleaved, so every batch mixes the two devices
        for dev in ("bad", "good"):
            rig.send(dev, float(data[1].timestamps[i]), data[1].values[i])
    rig.scoring.process(rig.queued())
    n = 3 * W - W + 1
    assert rig.value("sensord_windows_scored_total", device="good") == n
    assert rig.value("sensord_windows_scored_total", device="bad") == n  # scored; only its publishing failed
    assert len(rig.pub.on(f"{PREFIX}/scores/good")) == n
    assert rig.value("sensord_window_errors_total", stage="publishing") == n + 2  # scores, first state, availability


def test_a_scoring_error_costs_only_its_own_window(data: tuple[Path, Series], rigs: list[Rig]) -> None:
    rig = Rig(make_cfg(data[0]))
    rigs.append(rig)
    real = rig.model.scorer.score
    poison = float(data[1].values[W + 2, 0])

    def score(x: np.ndarray) -> Any:
        if np.any(x[:, -1, 0] == poison):  # the window that ends on one particular reading
            raise RuntimeError("interpreter failed")
        return real(x)
    rig.model.scorer.score = score  # type: ignore[method-assign]
    rig.send_rows("p1", data[1], 0, 3 * W)
    rig.scoring.process(rig.queued())
    assert rig.value("sensord_windows_scored_total", device="p1") == 3 * W - W + 1 - 1
    assert rig.value("sensord_window_errors_total", stage="scoring") == 1


def test_restored_detector_continues_its_alert_without_a_normal_state(data: tuple[Path, Series], rigs: list[Rig],
                                                                       tmp_path: Path) -> None:
    from sensord.state import StateStore

    series = data[1]
    faulty = series.values.copy()
    faulty[:, 0] += 50.0  # far off on every row: every window is over the threshold
    bad = Series(series.timestamps, faulty, series.channels, None, "bad")
    first = Rig(make_cfg(data[0], {"raise_after": 1, "clear_after": 2}))
    rigs.append(first)
    first.scoring.state = StateStore(tmp_path)
    first.scoring.restore(first.model, 100)
    first.send_rows("p1", bad, 0, W + 2)
    first.scoring.process(first.queued())
    (raised,) = [b for _, b, _, _ in first.pub.on(f"{PREFIX}/alerts/p1")]
    assert raised["state"] == "raised"
    assert StateStore(tmp_path).load(first.model.bundle.model_id)["p1"]["alert_id"] == raised["alert_id"]

    second = Rig(make_cfg(data[0], {"raise_after": 1, "clear_after": 2}))
    rigs.append(second)
    second.scoring.state = StateStore(tmp_path)
    assert second.scoring.restore(second.model, 100) == 1
    assert second.value("sensord_anomaly_state", device="p1") == 1
    second.send_rows("p1", bad, 50, 50 + W + 1)  # still faulty: two windows, nothing to say
    second.send_rows("p1", series, 50 + W + 1, 50 + 3 * W)  # healthy again: cleared after two windows
    second.scoring.process(second.queued())
    alerts = [b for _, b, _, _ in second.pub.on(f"{PREFIX}/alerts/p1")]
    assert [(a["state"], a["alert_id"]) for a in alerts] == [("cleared", raised["alert_id"])]
    assert [b["state"] for _, b, _, _ in second.pub.on(f"{PREFIX}/state/p1")] == ["normal"]


def test_restore_ignores_another_models_state(data: tuple[Path, Series], rigs: list[Rig], tmp_path: Path) -> None:
    from sensord.detector import AlertDetector
    from sensord.state import StateStore

    det = AlertDetector("p1", 1.0)
    det.update(5.0, 0.0, 1.0)
    StateStore(tmp_path).save("another-model", {"p1": det})
    rig = Rig(make_cfg(data[0]))
    rigs.append(rig)
    rig.scoring.state = StateStore(tmp_path)
    assert rig.scoring.restore(rig.model, 100) == 0
    assert rig.scoring.detectors == {}


# -- intake: formats that send channels separately -----------------------------------------------

def test_assembled_formats_route_by_subscription_and_death_restarts_the_window(
        data: tuple[Path, Series], rigs: list[Rig]) -> None:
    """Per-channel topics and Sparkplug B go through the assembler into the same window buffers; a DDEATH
    restarts the device's window; a late value and a DATA alias before its BIRTH are counted."""
    from test_formats import spb_payload

    path, series = data
    cfg = config_from_dict({
        "window": {"length": W}, "daemon": {"model": str(path), "max_devices": 2},
        "assembly": {"sample_period_seconds": 1.0},
        "mqtt": {"subscriptions": [
            {"topic": "c/+/+", "format": "topic_per_channel", "device_topic": "c/{device}/{channel}"},
            {"topic": "spBv1.0/g/#", "format": "sparkplug_b"}]}})
    rig = Rig(cfg)
    rigs.append(rig)
    for i in range(W + 2):
        ts = float(series.timestamps[i])
        for ch, v in zip(CHANNELS, series.values[i], strict=True):
            rig.intake.on_message(f"c/tpc/{ch}", json.dumps({"value": float(v), "ts": ts}).encode())
    tpc = [w for _, w in rig.queued()]
    assert len(tpc) == 3 and tpc[-1].end == float(series.timestamps[W + 1])
    np.testing.assert_allclose(tpc[0].values, windowize(series.timestamps[:W], series.values[:W],
                                                         rig.model.spec).values[0], rtol=1e-6)
    rig.intake.on_message(f"c/tpc/{CHANNELS[0]}", json.dumps({"value": 1.0, "ts": ts - 3}).encode())
    assert rig.value("sensord_readings_rejected_total", reason="late_value") == 1

    def ddata(i: int) -> bytes:
        return spb_payload([{"alias": j, "timestamp": round(float(series.timestamps[i]) * 1000),
                             "double_value": float(v)} for j, v in enumerate(series.values[i])])
    rig.intake.on_message("spBv1.0/g/DDATA/e1/spb", ddata(0))
    assert rig.value("sensord_readings_rejected_total", reason="unknown_alias") == len(CHANNELS)
    rig.intake.on_message("spBv1.0/g/DBIRTH/e1/spb", spb_payload(
        [{"name": f"pump/{ch}", "alias": j, "is_null": True} for j, ch in enumerate(CHANNELS)]))
    rig.intake.swap(cfg, rig.model)  # a reload keeps the aliases the BIRTH named
    for i in range(W):
        rig.intake.on_message("spBv1.0/g/DDATA/e1/spb", ddata(i))
    assert len(rig.queued()) == 1
    rig.intake.on_message("spBv1.0/g/DDEATH/e1/spb", spb_payload([]))
    assert "spb" not in rig.intake.buffers
    rig.intake.on_message("spBv1.0/g/DBIRTH/e1/spb", spb_payload(
        [{"name": ch, "alias": j, "is_null": True} for j, ch in enumerate(CHANNELS)]))
    for i in range(W, 2 * W - 1):
        rig.intake.on_message("spBv1.0/g/DDATA/e1/spb", ddata(i))
    assert rig.queued() == []  # the window restarted at the death: one reading short of a new one
    rig.intake.on_message("spBv1.0/g/DDATA/e1/spb", ddata(2 * W - 1))
    assert [w.start for _, w in rig.queued()] == [float(series.timestamps[W])]
    # max_devices counts devices the assembler holds too
    rig.intake.on_message(f"c/third/{CHANNELS[0]}", b"1.0")
    assert rig.value("sensord_readings_rejected_total", reason="device_limit") == 1


def test_silent_device_goes_stale_comes_back_then_is_forgotten(data: tuple[Path, Series], rigs: list[Rig]) -> None:
    path, series = data
    rig = Rig(make_cfg(path, device_timeout_seconds=10.0, device_forget_seconds=100.0))
    rigs.append(rig)
    rig.send_rows("p1", series, 0, W)
    rig.scoring.process(rig.queued())
    assert rig.pub.on(f"{PREFIX}/availability/p1")[-1][1] == {"state": "online"}
    now = time.monotonic()
    assert rig.intake.sweep(now) == ([], [])
    stale, forget = rig.intake.sweep(now + 11)
    assert stale == [("p1", float(series.timestamps[W - 1]))] and forget == []
    assert rig.intake.sweep(now + 12) == ([], [])  # announced once
    rig.scoring.liveness(stale, forget)
    rig.scoring._apply_liveness()
    state = rig.pub.on(f"{PREFIX}/state/p1")[-1]
    assert state[1]["state"] == "stale" and state[1]["alert"] is False and state[2:] == (1, True)
    assert rig.pub.on(f"{PREFIX}/availability/p1")[-1][1] == {"state": "offline"}

    rig.send_rows("p1", series, W, W + 1)  # back: its next window announces its state again
    rig.scoring.process(rig.queued())
    assert rig.pub.on(f"{PREFIX}/state/p1")[-1][1]["state"] == "normal"
    assert rig.pub.on(f"{PREFIX}/availability/p1")[-1][1] == {"state": "online"}

    stale, forget = rig.intake.sweep(time.monotonic() + 101)
    assert forget == ["p1"] and "p1" not in rig.intake.buffers
    rig.scoring.liveness(stale, forget)
    rig.scoring._apply_liveness()
    assert rig.scoring.detectors == {}
    assert rig.metrics.registry.get_sample_value("sensord_last_reading_timestamp_seconds", {"device": "p1"}) is None
    assert rig.metrics.registry.get_sample_value("sensord_windows_scored_total", {"device": "p1"}) is None
    assert rig.value("sensord_devices") == 0


def test_device_ids_longer_than_the_configured_limit_are_rejected(data: tuple[Path, Series], rigs: list[Rig]) -> None:
    rig = Rig(make_cfg(data[0], max_device_id_bytes=8))
    rigs.append(rig)
    rig.send("pump-123", 1.0, data[1].values[0])  # 8 bytes: fine
    rig.send("pump-1234", 1.0, data[1].values[0])
    assert list(rig.intake.buffers) == ["pump-123"]
    assert rig.value("sensord_readings_rejected_total", reason="bad_device_id") == 1
