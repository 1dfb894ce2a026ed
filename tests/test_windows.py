"""Tests for sensord.windows: the ring buffer shared by training, evaluation and the daemon."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sensord.windows import (
    ReadingRejected,
    Rejection,
    WindowBuffer,
    WindowSpec,
    iter_windows,
    windowize,
)


def _reading(t: int, channels: int = 2) -> np.ndarray:
    """Distinct, recognisable values: channel j of reading t is 10*t + j."""
    return np.array([10.0 * t + j for j in range(channels)], dtype=np.float32)


def _expected(first: int, length: int, channels: int = 2) -> np.ndarray:
    return np.stack([_reading(t, channels) for t in range(first, first + length)])


def _push_all(buf: WindowBuffer, times: list[float], start: int = 0) -> list[tuple[int, object]]:
    out = []
    for k, t in enumerate(times):
        w = buf.push(t, _reading(start + k, buf.channels))
        if w is not None:
            out.append((start + k, w))
    return out


# --- spec validation --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(length=1), dict(length=5, hop=0), dict(length=5, hop=6),
                                    dict(length=5, max_gap_seconds=0.0)])
def test_window_spec_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        WindowSpec(**kwargs)


def test_buffer_rejects_zero_channels() -> None:
    with pytest.raises(ValueError):
        WindowBuffer(WindowSpec(4), channels=0)


# --- emission ---------------------------------------------------------------------------


def test_first_window_after_length_then_every_reading_hop_1() -> None:
    L = 4
    buf = WindowBuffer(WindowSpec(length=L, hop=1), channels=2, device="d1")
    times = [100.0 + t for t in range(12)]
    got = _push_all(buf, times)
    # the first window completes on reading L-1 (0-based), then one per reading
    assert [row for row, _ in got] == list(range(L - 1, 12))
    for row, w in got:
        first = row - L + 1
        np.testing.assert_array_equal(w.values, _expected(first, L))
        assert w.values.dtype == np.float32 and w.values.shape == (L, 2)
        assert w.start == times[first]
        assert w.end == times[row]
        assert w.device == "d1"


def test_hop_3_emits_every_third_reading() -> None:
    L, hop = 5, 3
    buf = WindowBuffer(WindowSpec(length=L, hop=hop), channels=2)
    times = [0.5 * t for t in range(20)]
    got = _push_all(buf, times)
    expected_rows = list(range(L - 1, 20, hop))  # 4, 7, 10, 13, 16, 19
    assert [row for row, _ in got] == expected_rows
    for row, w in got:
        first = row - L + 1
        np.testing.assert_array_equal(w.values, _expected(first, L))
        assert w.start == times[first] and w.end == times[row]


def test_no_window_before_length_readings() -> None:
    buf = WindowBuffer(WindowSpec(length=6, hop=2), channels=1)
    for t in range(5):
        assert buf.push(float(t), [t]) is None
    w = buf.push(5.0, [5])
    assert w is not None
    assert w.values[:, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_hop_equal_to_length_gives_disjoint_windows() -> None:
    L = 3
    buf = WindowBuffer(WindowSpec(length=L, hop=L), channels=1)
    wins = [w.values[:, 0].tolist() for t in range(9) if (w := buf.push(float(t), [t])) is not None]
    assert wins == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


# --- gaps -------------------------------------------------------------------------------


def test_gap_restarts_buffer_and_no_window_spans_it() -> None:
    L = 4
    buf = WindowBuffer(WindowSpec(length=L, hop=1, max_gap_seconds=5.0), channels=2)
    before = [float(t) for t in range(6)]            # readings 0..5 at t=0..5
    after = [100.0 + t for t in range(6)]             # readings 6..11 after a 95 s gap
    got = _push_all(buf, before + after)
    assert buf.restarts == 1
    rows = [row for row, _ in got]
    # before the gap: windows end at readings 3, 4, 5; after it the buffer refills:
    # the first window after the gap ends at reading 6 + L - 1 = 9
    assert rows == [3, 4, 5, 9, 10, 11]
    for row, w in got:
        assert (w.start >= 100.0) == (w.end >= 100.0), "a window spans the gap"
        first = row - L + 1
        np.testing.assert_array_equal(w.values, _expected(first, L))
    post = [w for row, w in got if row >= 9]
    assert post[0].start == 100.0 and post[0].end == 103.0


def test_gap_equal_to_max_gap_does_not_restart() -> None:
    buf = WindowBuffer(WindowSpec(length=3, hop=1, max_gap_seconds=5.0), channels=1)
    for t in (0.0, 1.0, 6.0):  # 6 - 1 == 5: not longer than max_gap_seconds
        w = buf.push(t, [t])
    assert buf.restarts == 0
    assert w is not None and w.start == 0.0 and w.end == 6.0


def test_restarts_counts_every_gap() -> None:
    buf = WindowBuffer(WindowSpec(length=2, hop=1, max_gap_seconds=1.0), channels=1)
    for t in (0.0, 1.0, 10.0, 11.0, 20.0, 30.0):
        buf.push(t, [t])
    assert buf.restarts == 3


# --- rejections -------------------------------------------------------------------------


def _state(buf: WindowBuffer) -> tuple:
    return (buf._ring.copy(), buf._times.copy(), buf._pos, buf._filled, buf._since_emit,
            buf._last_ts, buf._accepted, buf.restarts)


def _assert_same_state(a: tuple, b: tuple) -> None:
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2:] == b[2:]


def test_out_of_order_rejected_and_state_unchanged() -> None:
    L = 3
    buf = WindowBuffer(WindowSpec(length=L, hop=1), channels=2)
    times = [10.0, 11.0, 12.0, 13.0]
    got = _push_all(buf, times)
    assert [row for row, _ in got] == [2, 3]
    before = _state(buf)
    with pytest.raises(ReadingRejected) as ei:
        buf.push(12.5, _reading(99))
    assert ei.value.reason is Rejection.OUT_OF_ORDER
    assert isinstance(ei.value, ValueError)
    assert str(ei.value).startswith("out_of_order: ")
    _assert_same_state(before, _state(buf))
    assert buf.last_timestamp == 13.0
    # the next good reading continues exactly as if the bad one never came
    w = buf.push(14.0, _reading(4))
    assert w is not None
    np.testing.assert_array_equal(w.values, _expected(2, L))
    assert w.start == 12.0 and w.end == 14.0


def test_equal_timestamps_accepted() -> None:
    buf = WindowBuffer(WindowSpec(length=3, hop=1), channels=1)
    assert buf.push(5.0, [1]) is None
    assert buf.push(5.0, [2]) is None
    w = buf.push(5.0, [3])
    assert w is not None
    assert w.values[:, 0].tolist() == [1, 2, 3]
    assert w.start == 5.0 and w.end == 5.0


@pytest.mark.parametrize("bad, reason", [
    ([1.0, 2.0, 3.0], Rejection.WRONG_SHAPE),
    ([1.0], Rejection.WRONG_SHAPE),
    ([], Rejection.WRONG_SHAPE),
    ([1.0, float("nan")], Rejection.NON_FINITE),
    ([float("inf"), 1.0], Rejection.NON_FINITE),
    ([-float("inf"), 1.0], Rejection.NON_FINITE),
])
def test_bad_values_rejected_without_state_change(bad: list[float], reason: Rejection) -> None:
    buf = WindowBuffer(WindowSpec(length=3, hop=1), channels=2)
    buf.push(0.0, _reading(0))
    buf.push(1.0, _reading(1))
    before = _state(buf)
    with pytest.raises(ReadingRejected) as ei:
        buf.push(2.0, bad)
    assert ei.value.reason is reason
    assert str(ei.value).startswith(reason.value + ": ")
    _assert_same_state(before, _state(buf))
    w = buf.push(2.0, _reading(2))
    assert w is not None
    np.testing.assert_array_equal(w.values, _expected(0, 3))


def test_non_finite_timestamp_rejected() -> None:
    buf = WindowBuffer(WindowSpec(length=3, hop=1), channels=2)
    buf.push(0.0, _reading(0))
    for t in (float("nan"), float("inf")):
        with pytest.raises(ReadingRejected) as ei:
            buf.push(t, _reading(1))
        assert ei.value.reason is Rejection.NON_FINITE
    assert buf.last_timestamp == 0.0


def test_check_changes_nothing() -> None:
    buf = WindowBuffer(WindowSpec(length=3, hop=1), channels=2)
    buf.push(1.0, _reading(0))
    before = _state(buf)
    buf.check(2.0, _reading(1))
    _assert_same_state(before, _state(buf))


# --- ownership and allocation -------------------------------------------------------------


def test_window_values_are_a_copy() -> None:
    L = 4
    buf = WindowBuffer(WindowSpec(length=L, hop=1), channels=2)
    got = _push_all(buf, [float(t) for t in range(L)])
    (_, w1), = got
    w1.values[:] = -12345.0
    w2 = buf.push(float(L), _reading(L))
    assert w2 is not None
    np.testing.assert_array_equal(w2.values, _expected(1, L))
    assert not np.shares_memory(w2.values, buf._ring)


def test_storage_is_preallocated() -> None:
    L, C = 7, 3
    buf = WindowBuffer(WindowSpec(length=L, hop=2, max_gap_seconds=3.0), channels=C)
    ring, times = buf._ring, buf._times
    assert ring.shape == (L, C) and ring.dtype == np.float32  # one row per reading of a window
    t = 0.0
    for k in range(1000):
        t += 10.0 if k % 250 == 249 else 1.0  # a few gaps (restarts) too
        buf.push(t, np.full(C, k, dtype=np.float64))
    assert buf._ring is ring
    assert buf._times is times
    assert buf.restarts == 4  # k = 249, 499, 749, 999


# --- offline helpers --------------------------------------------------------------------


@pytest.mark.parametrize("hop", [1, 3])
def test_windowize_equals_manual_pushing(hop: int) -> None:
    rng = np.random.default_rng(0)
    n, L, C = 60, 6, 3
    ts = np.cumsum(rng.uniform(0.5, 1.5, n))
    ts[30:] += 50.0  # one gap
    vals = rng.normal(size=(n, C)).astype(np.float32)
    spec = WindowSpec(length=L, hop=hop, max_gap_seconds=5.0)
    ws = windowize(ts, vals, spec)

    buf = WindowBuffer(spec, C)
    manual = [(r, w) for r in range(n) if (w := buf.push(float(ts[r]), vals[r])) is not None]
    assert len(manual) > 0
    assert ws.values.shape == (len(manual), L, C)
    assert ws.end_rows.tolist() == [r for r, _ in manual]
    np.testing.assert_array_equal(ws.values, np.stack([w.values for _, w in manual]))
    np.testing.assert_array_equal(ws.starts, [w.start for _, w in manual])
    np.testing.assert_array_equal(ws.ends, [w.end for _, w in manual])
    # each window is exactly the rows that end at its end row
    for k, r in enumerate(ws.end_rows):
        np.testing.assert_array_equal(ws.values[k], vals[r - L + 1:r + 1])
    # iter_windows gives the same pairs
    assert [r for r, _ in iter_windows(ts, vals, spec)] == ws.end_rows.tolist()


def test_windowize_too_short_gives_empty_arrays() -> None:
    ts = np.arange(3, dtype=float)
    vals = np.zeros((3, 2), dtype=np.float32)
    ws = windowize(ts, vals, WindowSpec(length=5))
    assert ws.values.shape == (0, 5, 2)
    assert ws.end_rows.shape == (0,) and ws.starts.shape == (0,) and ws.ends.shape == (0,)


def test_clock_jump_back_resyncs_after_n_readings_in_a_row() -> None:
    buf = WindowBuffer(WindowSpec(length=3, hop=1), channels=2, resync_after=3)
    for t in (1000.0, 1001.0, 1002.0):
        buf.push(t, _reading(int(t)))
    for t in (10.0, 11.0):  # the device's clock jumped back by ~1000 s
        with pytest.raises(ReadingRejected) as ei:
            buf.push(t, _reading(0))
        assert ei.value.reason is Rejection.OUT_OF_ORDER
    assert buf.resyncs == 0
    assert buf.push(12.0, _reading(12)) is None  # third in a row: accepted, the window starts over
    assert buf.resyncs == 1 and buf.last_timestamp == 12.0
    assert buf.push(13.0, _reading(13)) is None
    w = buf.push(14.0, _reading(14))
    assert w is not None and (w.start, w.end) == (12.0, 14.0)  # no window spans the jump


def test_a_single_late_reading_does_not_resync() -> None:
    buf = WindowBuffer(WindowSpec(length=3, hop=1), channels=2, resync_after=3)
    for t in (10.0, 11.0, 5.0, 12.0, 6.0, 13.0, 7.0):
        try:
            buf.push(t, _reading(int(t)))
        except ReadingRejected:
            pass
    assert buf.resyncs == 0 and buf.last_timestamp == 13.0


def test_without_resync_after_out_of_order_is_rejected_for_ever() -> None:
    buf = WindowBuffer(WindowSpec(length=3, hop=1), channels=2)
    buf.push(1000.0, _reading(0))
    for t in range(50):
        with pytest.raises(ReadingRejected):
            buf.push(float(t), _reading(t))
@pytest.mark.parametrize("cut", [0, 3, 5, 11, 17])
def test_export_restore_gives_the_same_windows_as_one_buffer(cut: int) -> None:
    """A buffer continued from an export emits exactly the windows one uninterrupted buffer would."""
    spec = WindowSpec(length=5, hop=2)
    rows = [(float(t), [float(t), -float(t)]) for t in range(30)]
    whole = WindowBuffer(spec, 2)
    expected = [(w.start, w.end, w.values.tolist()) for t, v in rows if (w := whole.push(t, v)) is not None]
    first = WindowBuffer(spec, 2)
    got = [(w.start, w.end, w.values.tolist()) for t, v in rows[:cut] if (w := first.push(t, v)) is not None]
    saved = json.loads(json.dumps(first.export()))
    second = WindowBuffer(spec, 2)
    second.restore(saved)
    got += [(w.start, w.end, w.values.tolist()) for t, v in rows[cut:] if (w := second.push(t, v)) is not None]
    assert got == expected


def test_restored_buffer_still_refuses_older_readings() -> None:
    spec = WindowSpec(length=3, hop=1)
    first = WindowBuffer(spec, 1)
    for t in range(2):
        first.push(float(t) + 10, [1.0])
    second = WindowBuffer(spec, 1)
    second.restore(first.export())
    with pytest.raises(ReadingRejected):
        second.push(5.0, [1.0])


@pytest.mark.parametrize("bad", [
    {"times": [1.0, 2.0], "values": [[1.0]], "since_emit": 0, "last_ts": 2.0, "accepted": 2},
    {"times": [2.0, 1.0], "values": [[1.0], [1.0]], "since_emit": 0, "last_ts": 1.0, "accepted": 2},
    {"times": [1.0] * 4, "values": [[1.0]] * 4, "since_emit": 0, "last_ts": 1.0, "accepted": 4},
    {"times": [1.0], "values": [[float("nan")]], "since_emit": 0, "last_ts": 1.0, "accepted": 1},
    {"times": [1.0], "values": [[1.0]], "since_emit": 0, "last_ts": 7.0, "accepted": 1},
    {"times": [1.0], "values": [[1.0]], "since_emit": 0, "last_ts": 1.0, "accepted": 0},
    {"times": [1.0], "values": [[1.0]], "since_emit": 5, "last_ts": 1.0, "accepted": 1},
])
def test_restore_refuses_what_does_not_fit(bad: dict) -> None:
    with pytest.raises(ValueError):
        WindowBuffer(WindowSpec(length=3, hop=1), 1).restore(bad)


def test_a_redelivered_reading_is_a_duplicate_and_never_resyncs_the_clock() -> None:
    """QoS 1 is at least once: a burst of redeliveries (MQTT DUP) of readings already taken must not look
    like the device's clock jumping back, which would restart its window."""
    buf = WindowBuffer(WindowSpec(length=3, hop=1), channels=2, resync_after=3)
    for t in (10.0, 11.0, 12.0):
        buf.push(t, _reading(int(t)))
    for t in (10.0, 11.0, 12.0, 10.0, 11.0):
        with pytest.raises(ReadingRejected) as ei:
            buf.push(t, _reading(int(t)), redelivered=True)
        assert ei.value.reason is Rejection.DUPLICATE
    assert buf.resyncs == 0
    w = buf.push(13.0, _reading(13))
    assert w is not None and (w.start, w.end) == (11.0, 13.0)  # the window carried on
    assert buf.push(14.0, _reading(14), redelivered=True) is not None  # a newer one is simply taken
