"""Adaptive batching in the scoring loop, driven deterministically by a scorer that blocks until released.

No model and no stopwatch: the fake scorer records the batches it is handed and holds the scoring thread
inside a call until the test lets it go, so "windows that arrive while the scorer is busy" is an exact,
reproducible situation rather than a race.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from e2e_support import wait_until

from sensord.config import DetectorConfig, config_from_dict
from sensord.metrics import DaemonMetrics
from sensord.pipeline import QueueItem, ScoringLoop, ServingModel
from sensord.scorer import ScoredBatch
from sensord.sinks import AlertPublisher
from sensord.windows import Window

CHANNELS = ("a", "b")
LENGTH = 4


class BlockingScorer:
    """Records each batch; every call waits at a gate the test opens (one call per :meth:`release`)."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []  # the window end times of each call, in order
        self.entered = threading.Semaphore(0)
        self._gate = threading.Semaphore(0)

    def score(self, windows: np.ndarray) -> ScoredBatch:
        self.batches.append([float(w[-1, 0]) for w in windows])  # the end time is stored in the values
        self.entered.release()
        assert self._gate.acquire(timeout=30), "the test never released the scorer"
        n = len(windows)
        return ScoredBatch(np.full(n, 0.1), np.full((n, len(CHANNELS)), 1.0 / len(CHANNELS)))

    def release(self) -> None:
        self._gate.release()

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=30), "the scorer was never called"

    def top_channels(self, shares: np.ndarray, k: int) -> tuple[tuple[str, float], ...]:
        return tuple((c, float(s)) for c, s in zip(CHANNELS, shares, strict=True))[:k]


class RecordingQueue(queue.Queue[QueueItem]):
    """The scoring queue, logging every take: ("wait", timeout) for a blocking get, "nowait" for get_nowait."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.takes: list[Any] = []

    def get(self, block: bool = True, timeout: float | None = None) -> QueueItem:
        if block:
            self.takes.append(("wait", timeout))
        else:
            self.takes.append("nowait")
        return super().get(block, timeout)


class Publisher:
    def publish(self, topic: str, payload: str | bytes, qos: int = 0, retain: bool = False) -> None:
        pass


def fake_model(scorer: BlockingScorer) -> ServingModel:
    bundle = SimpleNamespace(threshold=SimpleNamespace(value=1.0), model_id="m1", channels=CHANNELS)
    return cast(ServingModel, SimpleNamespace(bundle=bundle, scorer=scorer, detector=DetectorConfig(), top_k=2))


def window(end: float, device: str = "d1") -> Window:
    values = np.full((LENGTH, len(CHANNELS)), end, dtype=np.float32)
    return Window(device, end - LENGTH + 1, end, values)


@pytest.fixture
def loop() -> Iterator[tuple[ScoringLoop, BlockingScorer, ServingModel]]:
    cfg = config_from_dict({})
    scorer = BlockingScorer()
    sl = ScoringLoop(DaemonMetrics(), AlertPublisher(Publisher(), "p"), 100, 64, cfg.daemon.batch_wait_seconds)
    sl.queue = RecordingQueue(100)
    yield sl, scorer, fake_model(scorer)
    for _ in range(100):  # never leave the thread stuck in the gate
        scorer.release()
    if sl._thread.is_alive():
        sl.drain(5.0)


def test_default_config_batches_adaptively() -> None:
    assert config_from_dict({}).daemon.batch_wait_seconds == 0.0


def test_a_lone_window_is_scored_without_waiting_for_more(
        loop: tuple[ScoringLoop, BlockingScorer, ServingModel]) -> None:
    """Taken, then non-blocking looks at the queue only (before and after one yield of the interpreter
    lock, which brings nothing) and straight to the scorer: no blocking get in between."""
    sl, scorer, model = loop
    sl.start()
    assert sl.submit(model, window(10.0)) is None
    scorer.wait_entered()
    assert scorer.batches == [[10.0]]
    takes = cast(RecordingQueue, sl.queue).takes
    first = takes.index(next(t for t in takes if t != "nowait"))  # the idle wait that returned the window
    assert takes[first + 1:] and set(takes[first + 1:]) == {"nowait"}  # only non-blocking looks before scoring
    scorer.release()
    assert sl.drain(5.0) is True


def test_windows_arriving_while_the_scorer_is_busy_form_the_next_batch(
        loop: tuple[ScoringLoop, BlockingScorer, ServingModel]) -> None:
    sl, scorer, model = loop
    sl.start()
    sl.submit(model, window(1.0, "d1"))
    scorer.wait_entered()  # busy with [1.0]
    for i, end in enumerate((2.0, 3.0, 4.0, 5.0)):
        assert sl.submit(model, window(end, f"d{i % 2}"), devices=2) is None
    assert sl.queue.qsize() == 4
    scorer.release()
    scorer.wait_entered()  # the next call: everything that queued meanwhile, in arrival order
    assert scorer.batches == [[1.0], [2.0, 3.0, 4.0, 5.0]]
    sl.submit(model, window(6.0, "d1"))  # arrives during the second call: the third batch, alone
    scorer.release()
    scorer.wait_entered()
    assert scorer.batches[2] == [6.0]
    scorer.release()
    assert sl.drain(5.0) is True
    assert sl.metrics.registry.get_sample_value("sensord_scoring_batch_size_sum") == 6
    assert sl.metrics.registry.get_sample_value("sensord_scoring_batch_size_count") == 3


def test_batch_max_bounds_a_batch_that_queued_meanwhile(
        loop: tuple[ScoringLoop, BlockingScorer, ServingModel]) -> None:
    sl, scorer, model = loop
    sl.batch_max = 3
    sl.start()
    sl.submit(model, window(0.0))
    scorer.wait_entered()
    for end in range(1, 8):
        sl.submit(model, window(float(end)))
    for _ in range(3):
        scorer.release()
        scorer.wait_entered()
    assert scorer.batches == [[0.0], [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0]]
    scorer.release()
    assert sl.drain(5.0) is True


def test_a_positive_batch_wait_still_waits_for_more(loop: tuple[ScoringLoop, BlockingScorer, ServingModel]) -> None:
    """``daemon.batch_wait_seconds`` > 0 keeps its meaning: a window taken alone waits for company."""
    sl, scorer, model = loop
    sl.batch_wait, sl.batch_max = 30.0, 2
    sl.start()
    sl.submit(model, window(1.0))
    wait_until(lambda: sl.queue.qsize() == 0, 10.0, "the loop taking the window")
    assert scorer.batches == []  # still filling its batch
    sl.submit(model, window(2.0))  # fills it (batch_max 2): scored together
    scorer.wait_entered()
    assert scorer.batches == [[1.0, 2.0]]
    scorer.release()
    assert sl.drain(5.0) is True


def test_windows_that_arrive_during_the_yield_join_the_batch(
        loop: tuple[ScoringLoop, BlockingScorer, ServingModel]) -> None:
    """While intake, given the interpreter lock, keeps bringing windows, the scorer keeps taking them; the
    first yield that brings nothing ends the batch. (The yield is replaced by one that plays intake.)"""
    sl, scorer, model = loop
    arrivals = [[2.0, 3.0], [4.0], [], [99.0]]  # what intake queues during each successive yield

    def intake_runs() -> None:
        for end in arrivals.pop(0):
            sl.submit(model, window(end))
    sl._yield = intake_runs  # type: ignore[method-assign]
    sl.start()
    sl.submit(model, window(1.0))
    scorer.wait_entered()
    assert scorer.batches == [[1.0, 2.0, 3.0, 4.0]]  # the empty yield ended it; 99 was never on its way
    assert arrivals == [[99.0]]
    scorer.release()
    assert sl.drain(5.0) is True


def test_interleaved_windows_of_two_models_are_scored_one_call_per_model_and_decided_in_order(
        loop: tuple[ScoringLoop, BlockingScorer, ServingModel]) -> None:
    """Devices bound to different models (daemon.models) queue their windows interleaved: one batch is
    one scorer call per model, not one per run of neighbours, and decisions keep the arrival order."""
    sl, scorer_a, model_a = loop
    scorer_b = BlockingScorer()
    model_b = fake_model(scorer_b)
    decided: list[tuple[str, float]] = []

    def decide(model: ServingModel, win: Window, error: float, shares: np.ndarray) -> None:
        decided.append(("a" if model is model_a else "b", win.end))
    sl._decide = decide  # type: ignore[method-assign]
    batch = [(model_a if i % 2 == 0 else model_b, window(float(i), f"d{i % 2}")) for i in range(6)]
    for _ in range(2):
        scorer_a.release()
        scorer_b.release()
    sl.process(batch)
    assert scorer_a.batches == [[0.0, 2.0, 4.0]] and scorer_b.batches == [[1.0, 3.0, 5.0]]
    assert decided == [("a", 0.0), ("b", 1.0), ("a", 2.0), ("b", 3.0), ("a", 4.0), ("b", 5.0)]


def test_window_queue_is_a_bounded_fifo_whose_waiting_taker_wakes_on_a_put() -> None:
    """The scoring queue (a deque, no lock): first in first out, full at its size, empty after a timeout,
    and a taker blocked in get() is woken by the next put at once, not at the end of its timeout."""
    from sensord.pipeline import WindowQueue

    model = cast(ServingModel, SimpleNamespace())
    q = WindowQueue(2)
    q.put_nowait((model, window(1.0)))
    q.put_nowait((model, window(2.0)))
    with pytest.raises(queue.Full):
        q.put_nowait((model, window(3.0)))
    assert q.qsize() == 2 and [q.get_nowait()[1].end, q.get(timeout=1)[1].end] == [1.0, 2.0] and q.empty()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.01)
    got: list[float] = []
    taker = threading.Thread(target=lambda: got.append(q.get(timeout=60)[1].end))
    taker.start()
    wait_until(lambda: q._waiting, 10, "the taker waiting")
    q.put_nowait((model, window(4.0)))
    taker.join(10)  # a taker that missed the put would still be waiting out its 60 s
    assert not taker.is_alive() and got == [4.0]
