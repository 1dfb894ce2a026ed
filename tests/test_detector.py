"""Tests for sensord.detector: the hysteresis state machine turning window errors into alerts."""

from __future__ import annotations

import pytest

from sensord.detector import AlertDetector, AlertEvent, Decision

T = 2.0  # threshold
OVER, UNDER = 3.0, 1.0
TOP = (("current", 0.7), ("flow", 0.2))


def _run(det: AlertDetector, errors: list[float]) -> list[Decision]:
    """Window k spans [10k, 10k + 9]."""
    return [det.update(e, 10.0 * k, 10.0 * k + 9, TOP) for k, e in enumerate(errors)]


def _events(decisions: list[Decision]) -> list[tuple[int, str]]:
    return [(k, d.event.state) for k, d in enumerate(decisions) if d.event is not None]


def test_raise_after_1_raises_on_first_over_window() -> None:
    det = AlertDetector("p1", T, raise_after=1, clear_after=1)
    ds = _run(det, [UNDER, OVER])
    assert [d.active for d in ds] == [False, True]
    assert [d.over for d in ds] == [False, True]
    assert _events(ds) == [(1, "raised")]
    assert det.active and det.raised_at == 19.0


def test_raise_after_3_needs_three_consecutive_over_windows() -> None:
    det = AlertDetector("p1", T, raise_after=3, clear_after=1)
    ds = _run(det, [OVER, OVER, UNDER, OVER, OVER, OVER, OVER])
    # the under window at index 2 resets the run: the alert is raised at index 5
    assert [d.active for d in ds] == [False, False, False, False, False, True, True]
    assert _events(ds) == [(5, "raised")]
    ev = ds[5].event
    assert ev is not None and ev.raised_at == 59.0 and ev.window_start == 50.0


def test_clear_after_2_needs_two_consecutive_under_windows() -> None:
    det = AlertDetector("p1", T, raise_after=1, clear_after=2)
    ds = _run(det, [OVER, UNDER, OVER, UNDER, UNDER, UNDER])
    assert [d.active for d in ds] == [True, True, True, True, False, False]
    assert _events(ds) == [(0, "raised"), (4, "cleared")]


def test_no_duplicate_raised_events_while_active() -> None:
    det = AlertDetector("p1", T, raise_after=1, clear_after=3)
    ds = _run(det, [OVER] * 10 + [UNDER, OVER] * 5)
    assert _events(ds) == [(0, "raised")]
    assert all(d.active for d in ds)


def test_raise_clear_raise_again() -> None:
    det = AlertDetector("p1", T, raise_after=2, clear_after=2)
    ds = _run(det, [OVER, OVER, UNDER, UNDER, OVER, OVER, UNDER, UNDER])
    assert _events(ds) == [(1, "raised"), (3, "cleared"), (5, "raised"), (7, "cleared")]


def test_equal_to_threshold_counts_as_under() -> None:
    det = AlertDetector("p1", T, raise_after=1, clear_after=1)
    d = det.update(T, 0.0, 9.0)
    assert d.over is False and d.active is False and d.event is None
    assert d.score == pytest.approx(1.0)
    det.update(OVER, 10.0, 19.0)
    d = det.update(T, 20.0, 29.0)
    assert d.over is False and d.active is False
    assert d.event is not None and d.event.state == "cleared"


def test_raised_event_fields() -> None:
    det = AlertDetector("pump-7", T, raise_after=2, clear_after=1)
    det.update(2.5, 100.0, 109.0, TOP)
    d = det.update(5.0, 101.0, 110.0, TOP)
    ev = d.event
    assert isinstance(ev, AlertEvent)
    assert ev.device == "pump-7"
    assert ev.state == "raised"
    assert ev.error == 5.0
    assert ev.threshold == T
    assert ev.score == pytest.approx(5.0 / T)
    assert d.score == pytest.approx(5.0 / T)
    assert ev.window_start == 101.0 and ev.window_end == 110.0
    assert ev.raised_at == 110.0
    assert ev.top_channels == TOP


def test_cleared_event_fields() -> None:
    det = AlertDetector("pump-7", T, raise_after=1, clear_after=2)
    det.update(4.0, 0.0, 9.0, TOP)
    det.update(1.0, 10.0, 19.0)
    d = det.update(0.5, 20.0, 29.0, (("flow", 1.0),))
    ev = d.event
    assert ev is not None and ev.state == "cleared"
    assert ev.raised_at == 9.0  # when the alert was raised, not when it cleared
    assert ev.window_start == 20.0 and ev.window_end == 29.0
    assert ev.error == 0.5 and ev.threshold == T and ev.score == pytest.approx(0.25)
    assert ev.top_channels == (("flow", 1.0),)
    assert det.raised_at is None and det.active is False


def test_score_is_error_over_threshold_for_every_window() -> None:
    det = AlertDetector("p", 4.0)
    for e in (0.0, 1.0, 4.0, 10.0):
        assert det.update(e, 0.0, 1.0).score == pytest.approx(e / 4.0)


def test_under_windows_without_alert_emit_nothing() -> None:
    det = AlertDetector("p", T, raise_after=1, clear_after=1)
    ds = _run(det, [UNDER] * 5)
    assert _events(ds) == [] and not any(d.active for d in ds)


@pytest.mark.parametrize("kwargs", [dict(threshold=0.0), dict(threshold=-1.0),
                                    dict(threshold=1.0, raise_after=0), dict(threshold=1.0, clear_after=0)])
def test_invalid_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AlertDetector("p", **kwargs)


def test_each_alert_has_its_own_id_and_its_clear_carries_it() -> None:
    ids = iter(["a1", "a2"])
    det = AlertDetector("p", T, raise_after=1, clear_after=1, new_id=lambda: next(ids))
    evs = [d.event for d in _run(det, [OVER, UNDER, OVER, OVER, UNDER]) if d.event is not None]
    assert [(e.state, e.alert_id) for e in evs] == [("raised", "a1"), ("cleared", "a1"),
                                                    ("raised", "a2"), ("cleared", "a2")]
    assert AlertDetector("p", T).update(OVER, 0.0, 9.0).event.alert_id != \
        AlertDetector("p", T).update(OVER, 0.0, 9.0).event.alert_id  # random by default


def test_export_restore_continues_the_same_alert() -> None:
    det = AlertDetector("p", T, raise_after=2, clear_after=3)
    _run(det, [OVER, OVER, UNDER])
    saved = det.export()
    assert saved["active"] and saved["under_run"] == 1 and saved["alert_id"]
    again = AlertDetector("p", T, raise_after=2, clear_after=3)
    again.restore(saved)
    ds = [again.update(e, 100.0 + k, 109.0 + k) for k, e in enumerate([UNDER, UNDER])]
    assert ds[0].event is None and ds[0].active
    ev = ds[1].event
    assert ev is not None and ev.state == "cleared" and ev.alert_id == saved["alert_id"]
    assert ev.raised_at == saved["raised_at"]


@pytest.mark.parametrize("bad", [{}, {"active": 1, "over_run": 0, "under_run": 0},
                                 {"active": False, "over_run": -1, "under_run": 0},
                                 {"active": True, "over_run": 1, "under_run": 0, "raised_at": None,
                                  "alert_id": "x"},
                                 {"active": True, "over_run": 1, "under_run": 0, "raised_at": 5.0,
                                  "alert_id": ""}])
def test_restore_refuses_what_is_not_a_saved_state(bad: dict) -> None:
    det = AlertDetector("p", T)
    with pytest.raises(ValueError):
        det.restore(bad)
    assert det.export() == AlertDetector("p", T).export()
