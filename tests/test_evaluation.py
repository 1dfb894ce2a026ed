"""Tests for sensord.evaluation: metric formulas, segments, and a labelled series with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from sensord.bundle import ModelBundle
from sensord.config import DetectorConfig, config_from_dict
from sensord.dataio import Series
from sensord.evaluation import Confusion, decide_rows, evaluate_series, score_series, segments_of
from sensord.scorer import Scorer
from sensord.windows import WindowSpec

pytestmark = pytest.mark.training  # trains a tiny TensorFlow model (make test-fast leaves it out)

# --- formulas ----------------------------------------------------------------------------------


def test_confusion_formulas_on_known_counts() -> None:
    c = Confusion(tp=6, fp=2, tn=10, fn=4)
    assert c.f1 == pytest.approx(6 / (6 + (2 + 4) / 2))  # 2/3
    assert c.f1 == pytest.approx(2 / 3)
    assert c.far == pytest.approx(2 / 12)
    assert c.mar == pytest.approx(4 / 10)
    d = c.as_dict()
    assert d == {"tp": 6, "fp": 2, "tn": 10, "fn": 4, "f1": 0.6667, "far": 0.1667, "mar": 0.4}


def test_skab_f1_equals_classic_f1() -> None:
    c = Confusion(tp=30, fp=7, tn=100, fn=11)
    precision, recall = 30 / 37, 30 / 41
    assert c.f1 == pytest.approx(2 * precision * recall / (precision + recall))


def test_confusion_zero_denominators() -> None:
    c = Confusion()
    assert (c.f1, c.far, c.mar) == (0.0, 0.0, 0.0)
    assert Confusion(tn=5).far == 0.0 and Confusion(tp=3).f1 == 1.0


def test_confusion_addition() -> None:
    assert Confusion(1, 2, 3, 4) + Confusion(10, 20, 30, 40) == Confusion(11, 22, 33, 44)


def test_confusion_of_labels_and_predictions() -> None:
    y = np.array([1, 1, 0, 0, 1, 0, 0])
    p = np.array([1, 0, 1, 0, 1, 0, 1])
    assert Confusion.of(y, p) == Confusion(tp=2, fp=2, tn=2, fn=1)


@pytest.mark.parametrize("labels, segments", [
    ([0, 1, 1, 0, 1], [(1, 3), (4, 5)]),
    ([0, 0, 0], []),
    ([1, 1, 1], [(0, 3)]),
    ([1, 0, 0, 1], [(0, 1), (3, 4)]),
    ([], []),
])
def test_segments_of(labels: list[int], segments: list[tuple[int, int]]) -> None:
    assert segments_of(np.array(labels, dtype=np.int8)) == segments


# --- a labelled series whose answer is known by construction ---------------------------------

W = 8
CH = ("a", "b", "c")
LEVEL = np.array([1.0, 5.0, -2.0])
N = 300
SEGS = [(100, 130), (200, 215)]  # label-1 rows [a, b); the second starts well after the first's tail
STEP = 1000.0
T0 = 2.0e9


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    """Trained on constant levels plus small noise: healthy errors are O(1) in scaled units,
    a +1000 step (10^4 noise std) gives errors of order 10^7: the threshold separates them."""
    from sensord.training import train_bundle

    cfg = config_from_dict({
        "window": {"length": W},
        "model": {"kind": "dense", "encoder_units": [16], "latent_units": 4},
        "training": {"epochs": 5, "batch_size": 32, "patience": 5},
        "threshold": {"method": "max_factor", "factor": 3.0},
    })
    rng = np.random.default_rng(0)
    n = 400
    values = (LEVEL + rng.normal(0.0, 0.1, (n, len(CH)))).astype(np.float32)
    series = Series(np.arange(n, dtype=np.float64) + 1.0e9, values, CH, None, "healthy")
    path = tmp_path_factory.mktemp("eval") / "model"
    train_bundle(series, cfg, path)
    return Scorer(ModelBundle.load(path))


@pytest.fixture(scope="module")
def labelled() -> Series:
    rng = np.random.default_rng(1)
    values = (LEVEL + rng.normal(0.0, 0.1, (N, len(CH)))).astype(np.float32)
    labels = np.zeros(N, dtype=np.int8)
    for a, b in SEGS:
        values[a:b] += STEP
        labels[a:b] = 1
    return Series(np.arange(N, dtype=np.float64) + T0, values, CH, labels, "labelled")


SPEC = WindowSpec(W, 1, 10.0)
DET = DetectorConfig(raise_after=1, clear_after=1)


def _expected_predicted() -> np.ndarray:
    """The window ending at row r covers rows r-W+1..r: it holds a step row iff a <= r <= b+W-2."""
    p = np.zeros(N, dtype=np.int8)
    p[:W - 1] = -1  # before the first complete window
    for a, b in SEGS:
        p[a:b + W - 1] = 1
    return p


def test_errors_are_separated_by_the_threshold(scorer: Scorer, labelled: Series) -> None:
    """Precondition of the exact-count tests: every window with a step row is over, every other under."""
    scored = score_series(labelled, scorer, SPEC)
    errors, n_windows = scored.errors, len(scored.rows)
    assert n_windows == N - W + 1 == len(errors)
    end_rows = np.arange(W - 1, N)
    faulty = np.zeros(len(end_rows), dtype=bool)
    for a, b in SEGS:
        faulty |= (end_rows >= a) & (end_rows <= b + W - 2)
    assert np.all(errors[faulty] > scorer.threshold)
    assert np.all(errors[~faulty] <= scorer.threshold)
    assert errors[faulty].min() > 1000 * errors[~faulty].max()


def test_predicted_rows(scorer: Scorer, labelled: Series) -> None:
    predicted, alerts = decide_rows(score_series(labelled, scorer, SPEC), scorer.threshold, DET)
    np.testing.assert_array_equal(predicted, _expected_predicted())
    ts = labelled.timestamps
    assert [(a.state, a.window_end) for a in alerts] == [
        ("raised", ts[100]), ("cleared", ts[130 + W - 1]),
        ("raised", ts[200]), ("cleared", ts[215 + W - 1]),
    ]
    assert alerts[0].window_start == ts[100 - W + 1]
    assert alerts[0].top_channels and len(alerts[0].top_channels) == 3


def test_evaluate_exact_counts(scorer: Scorer, labelled: Series) -> None:
    res = evaluate_series(labelled, scorer, SPEC, DET)
    positives = sum(b - a for a, b in SEGS)  # 45
    tail = len(SEGS) * (W - 1)  # rows after each segment still covered by a faulty window
    assert res.confusion == Confusion(tp=positives, fp=tail, tn=N - positives - tail, fn=0)
    assert res.rows == N
    assert res.unscored_rows == W - 1
    assert res.windows == N - W + 1
    assert len(res.segments) == 2
    for seg, (a, b) in zip(res.segments, SEGS, strict=False):
        assert (seg.start_row, seg.end_row) == (a, b)
        assert seg.detected and seg.delay_rows == 0 and seg.delay_seconds == 0.0
    assert res.mean_delay_seconds == 0.0 and res.mean_delay_rows == 0.0
    assert [a.state for a in res.alerts] == ["raised", "cleared", "raised", "cleared"]
    d = res.as_dict()
    assert (d["tp"], d["fp"], d["tn"], d["fn"]) == (positives, tail, N - positives - tail, 0)
    assert d["segments"] == 2 and d["segments_detected"] == 2
    assert d["f1"] == round(positives / (positives + tail / 2), 4)
    assert d["mar"] == 0.0
    assert d["far"] == round(tail / (N - positives), 4)


@pytest.mark.parametrize("count_from", [3, 50])
def test_count_from_excludes_earlier_rows(scorer: Scorer, labelled: Series, count_from: int) -> None:
    res = evaluate_series(labelled, scorer, SPEC, DET, count_from=count_from)
    positives = sum(b - a for a, b in SEGS)
    tail = len(SEGS) * (W - 1)
    rows = N - count_from
    assert res.rows == rows
    assert res.unscored_rows == max(0, W - 1 - count_from)
    assert res.confusion == Confusion(tp=positives, fp=tail, tn=rows - positives - tail, fn=0)
    np.testing.assert_array_equal(res.predicted, _expected_predicted()[count_from:])
    assert [(s.start_row, s.end_row) for s in res.segments] == SEGS  # rows of the whole series


def test_count_from_after_first_segment(scorer: Scorer, labelled: Series) -> None:
    a1, b1 = SEGS[0]
    a2, b2 = SEGS[1]
    count_from = b1 + W  # after the first segment's tail and the window that cleared its alert (row b1+W-1)
    res = evaluate_series(labelled, scorer, SPEC, DET, count_from=count_from)
    rows = N - count_from
    assert res.rows == rows and res.unscored_rows == 0
    assert res.confusion == Confusion(tp=b2 - a2, fp=W - 1, tn=rows - (b2 - a2) - (W - 1), fn=0)
    assert [(s.start_row, s.end_row, s.delay_rows) for s in res.segments] == [(a2, b2, 0)]
    # alerts that happened before the counted rows are not reported
    ts = labelled.timestamps
    assert [(a.state, a.window_end) for a in res.alerts] == [("raised", ts[a2]), ("cleared", ts[b2 + W - 1])]


def test_count_from_inside_a_segment(scorer: Scorer, labelled: Series) -> None:
    a1, b1 = SEGS[0]
    count_from = a1 + 10
    res = evaluate_series(labelled, scorer, SPEC, DET, count_from=count_from)
    positives = (b1 - count_from) + (SEGS[1][1] - SEGS[1][0])
    tail = len(SEGS) * (W - 1)
    assert res.confusion == Confusion(tp=positives, fp=tail, tn=N - count_from - positives - tail, fn=0)
    assert res.segments[0].start_row == count_from and res.segments[0].delay_rows == 0


def test_raise_after_delays_detection(scorer: Scorer, labelled: Series) -> None:
    """raise_after=3: the alert is active from the third faulty window, i.e. 2 rows late."""
    res = evaluate_series(labelled, scorer, SPEC, DetectorConfig(raise_after=3, clear_after=1))
    positives = sum(b - a for a, b in SEGS)
    tail = len(SEGS) * (W - 1)
    late = len(SEGS) * 2
    assert res.confusion == Confusion(tp=positives - late, fp=tail, tn=N - positives - tail, fn=late)
    assert [s.delay_rows for s in res.segments] == [2, 2]
    assert [s.delay_seconds for s in res.segments] == [2.0, 2.0]


def test_no_labels_raises(scorer: Scorer, labelled: Series) -> None:
    unlabelled = Series(labelled.timestamps, labelled.values, CH, None, "x.csv")
    with pytest.raises(ValueError, match="no label column"):
        evaluate_series(unlabelled, scorer, SPEC, DET)


def test_series_shorter_than_a_window(scorer: Scorer, labelled: Series) -> None:
    short = labelled.slice(0, W - 1)
    res = evaluate_series(short, scorer, SPEC, DET)
    assert res.windows == 0
    assert res.unscored_rows == W - 1
    assert res.confusion == Confusion(tn=W - 1)


def test_hop_3_each_window_decides_rows_up_to_the_next(scorer: Scorer, labelled: Series) -> None:
    hop = 3
    scored = score_series(labelled, scorer, WindowSpec(W, hop, 10.0))
    predicted, _ = decide_rows(scored, scorer.threshold, DET)
    n_windows = len(scored.rows)
    ends = list(range(W - 1, N, hop))
    assert n_windows == len(ends)
    expected = np.full(N, -1, dtype=np.int8)
    for r in ends:
        faulty = any(a <= r <= b + W - 2 for a, b in SEGS)
        expected[r:r + hop] = 1 if faulty else 0
    np.testing.assert_array_equal(predicted, expected)


def test_window_counts_on_known_numbers() -> None:
    from sensord.evaluation import window_counts
    errors = np.array([0.1, 0.5, 2.0, 3.0, 0.2, 1.0])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert window_counts(errors, labels, threshold=1.0) == {
        "normal_under": 2, "normal_over": 1, "anomalous_over": 1, "anomalous_under": 2}  # 1.0 is not over


def test_evaluate_reports_window_counts(scorer: Scorer, labelled: Series) -> None:
    res = evaluate_series(labelled, scorer, SPEC, DET)
    w = res.window_counts
    assert sum(w.values()) == res.windows
    assert w["anomalous_over"] > 0 and w["normal_under"] > w["normal_over"]
