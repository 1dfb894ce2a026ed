"""The live pipeline: readings -> per-device windows -> batched scoring -> detector -> sinks.

Two threads meet here. The MQTT network thread parses payloads and pushes
readings into each device's :class:`WindowBuffer`; complete windows go into a
bounded queue (overflow is counted, never silent). The scoring thread takes
windows off the queue in batches across devices — one interpreter call for
many windows — runs the detector and publishes. The network thread therefore
never waits on the model.

Each queued window carries the :class:`ServingModel` that was current when it
was cut, so a SIGHUP reload can swap models between two readings without
losing or mis-scoring anything already queued.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from .assembly import Assembler
from .bundle import ModelBundle
from .config import DetectorConfig, SensordConfig
from .detector import AlertDetector, AlertEvent, Decision
from .formats.base import NO_MODEL, Parser, RebirthRequest, escape
from .homeassistant import HomeAssistantDiscovery
from .metrics import DaemonMetrics
from .ratelimit import RateLimitedLog
from .readings import ReadingPath
from .scorer import Scorer
from .sinks import AlertPublisher, MetricsSink
from .state import StateStore
from .windows import ReadingRejected, Window, WindowBuffer, WindowSpec, window_spec

if TYPE_CHECKING:
    from .models import ModelSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingModel:
    """Everything a reload swaps at once."""

    bundle: ModelBundle
    scorer: Scorer
    spec: WindowSpec
    detector: DetectorConfig
    top_k: int
    low: np.ndarray  # per-channel clip bounds (float64), see scoring.clip_spreads
    high: np.ndarray

    @classmethod
    def load(cls, cfg: SensordConfig, path: str | None = None, own_window: bool = False,
             channels: tuple[list[str], str] | None = None) -> ServingModel:
        """Load and validate the bundle (``daemon.model``, or ``path``) against the config (raises BundleError).

        ``own_window``: the windows the bundle was trained with (length, hop, gap), not the config's
        ``window`` section — what ``daemon.models`` serves, where models may have different window lengths.
        ``channels``: the channels the bundle must read and the key naming them (default ``data.channels``;
        a ``daemon.models`` entry's own, see :func:`sensord.models.expected_channels`).
        ``sensord check-config --model`` loads through here too, so it refuses exactly what ``run`` would.
        """
        want, key = channels if channels is not None else (cfg.data.channels, "data.channels")
        bundle = ModelBundle.load(path or cfg.daemon.model, want or None, key)
        cfg.assembly_period(bundle.sample_period_seconds, f"model {bundle.path}")  # ConfigError if none
        spec = window_spec(None if own_window else cfg.window, bundle)
        scorer = Scorer(bundle, max_batch=cfg.scoring.batch_max)
        if not scorer.self_check():
            log.warning("bundle %s has no reference windows (made by an older sensord): cannot check that the "
                        "model still computes what it did at training; retrain to add them", bundle.path)
        offset = bundle.scaler.offset.astype(np.float64)
        spread = cfg.scoring.clip_spreads * bundle.scaler.scale.astype(np.float64)
        return cls(bundle, scorer, spec, cfg.detector,
                   cfg.scoring.top_channels, offset - spread, offset + spread)

    def compatible(self, other: ServingModel) -> bool:
        """A device's buffered readings can feed this model's windows: the same channels, length and drift
        removal (the buffer holds the readings with the old model's baselines taken off)."""
        return (self.bundle.channels == other.bundle.channels
                and self.bundle.window_length == other.bundle.window_length
                and self.bundle.drift == other.bundle.drift)


QueueItem = tuple[ServingModel, Window]


class WindowQueue:
    """The scoring queue: bounded, first in first out, with the part of :class:`queue.Queue`'s interface the
    loop uses (``put_nowait``, ``get``, ``get_nowait``, ``qsize``, ``empty``, ``maxsize``).

    A :class:`queue.Queue` takes its lock and notifies a condition on every put and get (about 4 us per
    window on this machine, a sixth of the whole per-reading budget); here a put or a take is one deque
    operation, atomic under the interpreter lock, and the consumer sleeps on an event only when the queue
    is empty. The producer sets the event only while the consumer says it waits: the consumer marks
    itself waiting before it looks at the queue a last time, and the producer appends before it looks at
    the mark, so a window is always either seen by that look or announced by the event.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: collections.deque[QueueItem] = collections.deque()
        self._ready = threading.Event()
        self._waiting = False

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: QueueItem) -> None:
        if 0 < self.maxsize <= len(self._items):
            raise queue.Full
        self._items.append(item)
        if self._waiting:
            self._ready.set()

    def get_nowait(self) -> QueueItem:
        try:
            return self._items.popleft()
        except IndexError:
            raise queue.Empty from None

    def get(self, block: bool = True, timeout: float | None = None) -> QueueItem:
        if not block:
            return self.get_nowait()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._items:
                return self._items.popleft()
            self._ready.clear()
            self._waiting = True
            try:
                if self._items:
                    continue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise queue.Empty
                self._ready.wait(remaining)
            finally:
                self._waiting = False


class ScoringLoop:
    """The scoring thread: batches windows across devices and drives the detectors.

    Batching is adaptive (see :meth:`_take_batch`): a batch is whatever queued while the previous one was
    scored, so a quiet daemon scores each window as it comes and a busy one scores up to ``batch_max`` per call.
    """

    # Under load (the previous batch had at least LOADED_BATCH windows) a batch may wait up to LOADED_WAIT
    # seconds to fill: while the scorer waits it leaves the interpreter lock to intake, which at saturation
    # is the busy side. A quiet daemon (batches of one or two) never waits.
    LOADED_BATCH = 8
    LOADED_WAIT = 0.002

    def __init__(self, metrics: DaemonMetrics, alerts: AlertPublisher, queue_size: int,
                 batch_max: int, batch_wait: float,
                 on_event: Callable[[AlertEvent, str], None] | None = None,
                 state: StateStore | None = None, save_interval: float = 10.0,
                 discovery: HomeAssistantDiscovery | None = None) -> None:
        self.metrics = metrics
        self.discovery = discovery
        self.state = state
        self.save_interval = save_interval
        self._dirty = False
        self._last_save = time.monotonic()
        self.model_ids: dict[str, str] = {}  # device -> id of the model that last scored it (saved with its state)
        self._warn = RateLimitedLog(log, 10.0)
        self.sink = MetricsSink(metrics)
        self._share_channels: tuple[str, ...] | None = None  # the channels sensord_channel_error_share has
        self.alerts = alerts
        self.queue: WindowQueue | queue.Queue[QueueItem] = WindowQueue(queue_size)
        metrics.queue_depth.set_function(lambda: self.queue.qsize())  # read when scraped, never updated
        self.batch_max = batch_max
        self.batch_wait = batch_wait
        self._last_batch = 0  # size of the previous batch (load, for LOADED_BATCH)
        self.on_event = on_event
        self.detectors: dict[str, AlertDetector] = {}
        self.stale: set[str] = set()  # devices announced stale; the next window of one announces it back
        self._liveness: list[tuple[str, str, float]] = []  # (what, device, last reading) from the main thread
        self._liveness_lock = threading.Lock()
        self._pending: dict[str, int] = {}  # queued windows per device (fairness)
        self._pending_lock = threading.Lock()
        self.heartbeat = time.monotonic()
        self._stop = threading.Event()
        self._flush = threading.Event()  # set by drain(): intake is closed, stop waiting to fill batches
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="sensord-scoring", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def restore(self, models: ServingModel | ModelSet, max_devices: int) -> int:
        """Take over the detector states saved for the model each device is bound to now (``models``: one
        model for every device, or a set); before :meth:`start`; how many were restored."""
        if isinstance(models, ServingModel):
            bind: Callable[[str], ServingModel | None] = lambda _: models  # noqa: E731
            served = {models.bundle.model_id}
        else:
            bind, served = models.bind, {m.bundle.model_id for m in models.models}
        if self.state is None:
            return 0

        def saved_for(device: str) -> str | None:
            model = bind(device)
            return None if model is None else model.bundle.model_id
        saved = self.state.load(saved_for, served)
        for device, st in list(saved.items())[:max_devices]:
            model = bind(device)
            assert model is not None  # (load kept only the devices whose model is still served)
            cfg, threshold = model.detector, model.bundle.threshold.value
            det = AlertDetector(device, threshold, cfg.raise_after, cfg.clear_after)
            try:
                det.restore(st)
            except ValueError as exc:
                log.warning("saved state of device=%s ignored: %s", escape(device), exc)
                continue
            self.detectors[device] = det
            self.model_ids[device] = model.bundle.model_id
            self.metrics.anomaly_state[device] = 1.0 if det.active else 0.0
        if self.detectors:
            active = sorted(d for d, det in self.detectors.items() if det.active)
            log.info("detector state restored for %d devices; alerts still raised: %s", len(self.detectors),
                     ", ".join(active) or "none")
        return len(self.detectors)

    def save_state(self) -> bool:
        """Save every detector now (scoring thread, or after it has stopped); True if saved or nothing to do."""
        if self.state is None:
            return True
        self._last_save = time.monotonic()
        self._dirty = False
        detectors = dict(self.detectors)
        ok = self.state.save({d: self.model_ids.get(d, "") for d in detectors}, detectors)
        if not ok:
            self._dirty = True
        return ok

    def _maybe_save(self) -> None:
        if self._dirty and time.monotonic() - self._last_save >= self.save_interval:
            self.save_state()

    def share(self, devices: int) -> int:
        """The windows a device may have waiting once the queue is under pressure (see :meth:`submit`)."""
        return max(1, self.queue.maxsize // max(1, devices))

    def submit(self, model: ServingModel, window: Window, devices: int = 1) -> str | None:
        """Queue a window; None if queued, else why it was dropped: ``throttled`` or ``queue_full``.

        Fairness, only under pressure: once the queue is half full, a device that already has its share
        (:meth:`share`) waiting is throttled, so a flooding device holds at most half the queue (rounded up)
        and always leaves the rest to its neighbours. Below half every window is queued: with as many
        devices as queue places a share is one window, and a rule that ignored the queue's depth dropped
        the second window of any device whose readings came in a burst (a gateway forwarding a batch)
        while the queue was nearly empty, with room for it and no neighbour to protect.
        """
        maxsize = self.queue.maxsize
        with self._pending_lock:
            n = self._pending.get(window.device, 0)
            # (alone, a device may fill the queue: that is queue_full)
            if devices > 1 and 2 * self.queue.qsize() >= maxsize and n >= self.share(devices):
                self.metrics.windows_throttled.labels(window.device).inc()
                return "throttled"
            try:
                self.queue.put_nowait((model, window))
            except queue.Full:
                self.metrics.windows_dropped.inc()
                return "queue_full"
            self._pending[window.device] = n + 1
        return None

    def _taken(self, item: QueueItem) -> QueueItem:
        self._taken_all([item])
        return item

    def _taken_all(self, items: list[QueueItem]) -> None:
        """``items`` left the queue: they no longer count towards their devices' shares (one lock for all)."""
        with self._pending_lock:
            pending = self._pending
            for _, window in items:
                dev = window.device
                n = pending.get(dev, 0) - 1
                if n > 0:
                    pending[dev] = n
                else:
                    pending.pop(dev, None)

    def stopped(self) -> bool:
        """True once the scoring thread has ended (after :meth:`drain`)."""
        return not self._thread.is_alive()

    def healthy(self, max_silence: float) -> bool:
        return self._thread.is_alive() and time.monotonic() - self.heartbeat < max_silence

    def _take_batch(self) -> list[QueueItem]:
        """The next batch: the first window to arrive and whatever else is already queued, up to batch_max.

        Adaptive, with no fixed delay: an idle scorer scores a lone window at once instead of waiting for
        a batch that, at a low rate, never fills; under load windows queue while the previous batch is
        scored, so the next batch fills by itself.

        One refinement keeps batches large when intake is the busy side: the network thread and this one
        share the interpreter lock, so a scorer that pounced on every window would score a backlog in
        batches of about four and take the lock from intake (bench/e2e.py, saturation: 0.66x the bare
        subscriber's rate, against 0.73x with main's 20 ms wait and 0.76x, batches of about 30, with the
        yield). So after draining the queue the scorer yields the lock once
        (:meth:`_yield`, ``time.sleep(0)``): a network thread in the middle of a message finishes it first,
        and while that brings more windows the scorer takes them and yields again. An idle network thread
        does not want the lock, the yield returns at once, and the batch is scored: no timer, no waiting
        for windows that are not already on their way.

        Under load (the previous batch had ``LOADED_BATCH`` windows or more) the batch also waits up to
        ``LOADED_WAIT`` (2 ms) for more windows: the scorer leaves the lock to intake meanwhile and scores
        larger batches (bench/e2e.py, saturation, beside the same code without it: mean batch 29-34
        against 18, 1.20x and 1.04x the rate in two runs of 5 repeats, 0.83-1.65x between repeats; latency
        at 1 000 readings/s, batches of 1-2, unchanged). A quiet daemon never waits.

        An explicit ``batch_wait`` > 0 (``daemon.batch_wait_seconds``) waits up to that long instead,
        loaded or not.
        """
        try:
            first = self._taken(self.queue.get(timeout=0.2))
        except queue.Empty:
            return []
        self._idle.clear()
        batch = [first]
        self._take_queued(batch)
        while len(batch) < self.batch_max:
            n = len(batch)
            self._yield()
            self._take_queued(batch)
            if len(batch) == n:  # nothing came while intake had the lock: it is idle, score now
                break
        wait = self.batch_wait
        if wait <= 0 and self._last_batch >= self.LOADED_BATCH:
            wait = self.LOADED_WAIT  # under load: let the batch fill a little (see LOADED_BATCH)
        self._last_batch = len(batch)
        if wait > 0:
            deadline = time.monotonic() + wait
            while len(batch) < self.batch_max and not self._flush.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:  # in short steps, so a drain() does not wait out a long batch_wait
                    batch.append(self._taken(self.queue.get(timeout=min(remaining, 0.05))))
                except queue.Empty:
                    continue
                self._take_queued(batch)
        return batch

    @staticmethod
    def _yield() -> None:
        """Let another thread that wants the interpreter lock (the MQTT network thread) run first."""
        time.sleep(0)

    def _take_queued(self, batch: list[QueueItem]) -> None:
        """Add the windows already queued to ``batch`` (up to batch_max), never waiting for more."""
        start = len(batch)
        while len(batch) < self.batch_max:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        if len(batch) > start:
            self._taken_all(batch[start:])

    def liveness(self, stale: list[tuple[str, float]], forget: list[str]) -> None:
        """Ask the scoring thread (which owns the detectors) to announce ``stale`` devices ``(device, last
        reading)`` and to forget ``forget`` ones; applied before the next batch (within 0.2 s when idle)."""
        with self._liveness_lock:
            self._liveness += [("stale", d, ts) for d, ts in stale] + [("forget", d, 0.0) for d in forget]

    def _apply_liveness(self) -> None:
        with self._liveness_lock:
            todo, self._liveness = self._liveness, []
        for what, device, ts in todo:
            det = self.detectors.get(device)
            if what == "stale":
                self.stale.add(device)
                log.warning("device=%s silent: state stale (alert %s)", escape(device),
                            "still raised" if det is not None and det.active else "not raised")
                model_id = self.model_ids.get(device, "")
                self._publish(device, self.alerts.stale, device, ts, det is not None and det.active, model_id)
            else:
                self.stale.discard(device)
                if self.detectors.pop(device, None) is not None:
                    self._dirty = True
                self.model_ids.pop(device, None)
                self.sink.forget(device)
                if self.discovery is not None:  # its Home Assistant entities go too
                    self._publish(device, self.discovery.forget, device)
                log.info("device=%s forgotten after its silence: window, detector and metrics dropped",
                         escape(device))

    def _run(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            batch = self._take_batch()
            self._apply_liveness()
            self._maybe_save()
            if not batch:
                self._idle.set()
                if self._stop.is_set():
                    return
                continue
            try:
                self.process(batch)
            except Exception:  # the loop must survive one bad batch (logged with its traceback)
                log.exception("scoring a batch of %d windows failed; batch skipped", len(batch))
            finally:
                if self.queue.empty():
                    self._idle.set()

    def process(self, batch: list[QueueItem]) -> None:
        """Score the windows of each model in one call, then decide in arrival order.

        With a model per device (``daemon.models``) the windows of different models arrive interleaved;
        grouping them keeps one interpreter call per model and batch instead of one per run of neighbours.

        A failure is confined to the window it belongs to: a batch whose scoring fails is scored again
        window by window, and detection and publishing errors of one window are counted
        (``sensord_window_errors_total{stage}``) and logged without touching the others.
        """
        groups: dict[int, tuple[ServingModel, list[int]]] = {}
        for i, (model, _) in enumerate(batch):
            groups.setdefault(id(model), (model, []))[1].append(i)
        scored: list[tuple[Window, float, np.ndarray | None]] = [(w, float("nan"), None) for _, w in batch]
        for model, rows in groups.values():
            for i, result in zip(rows, self._score(model, [batch[i][1] for i in rows]), strict=True):
                scored[i] = result
        for (model, _), (win, error, shares) in zip(batch, scored, strict=True):
            if shares is None:
                continue
            try:
                self._decide(model, win, error, shares)
            except Exception:  # noqa: BLE001 - one device's window must not cost another's
                self._window_error("detection", win.device)

    def _score(self, model: ServingModel, windows: list[Window]) -> list[tuple[Window, float, np.ndarray | None]]:
        t0 = time.perf_counter()
        try:
            scored = model.scorer.score(np.stack([w.values for w in windows]))
        except Exception:  # noqa: BLE001
            if len(windows) == 1:
                self._window_error("scoring", windows[0].device)
                return [(windows[0], float("nan"), None)]
            return [item for w in windows for item in self._score(model, [w])]  # find the one that fails
        self.metrics.scoring_duration.observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(len(windows))
        return [(w, float(scored.errors[i]), scored.channel_shares[i]) for i, w in enumerate(windows)]

    def _window_error(self, stage: str, device: str) -> None:
        self.metrics.window_errors.labels(stage).inc()
        if self._warn.allow(f"window:{stage}"):
            log.exception("%s of a window of device=%s failed; other windows go on", stage, escape(device))

    def _publish(self, device: str, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            self._window_error("publishing", device)

    def _decide(self, model: ServingModel, win: Window, error: float, shares: np.ndarray) -> None:
        if self.discovery is not None:  # once per device and process; before its state, for Home Assistant
            self._publish(win.device, self.discovery.announce, win.device)
        det = self.detectors.get(win.device)
        cfg = model.detector
        threshold = model.bundle.threshold.value
        model_id = model.bundle.model_id
        if det is None:
            det = self.detectors[win.device] = AlertDetector(win.device, threshold, cfg.raise_after,
                                                             cfg.clear_after)
            self._publish(win.device, self.alerts.state, win.device, False, win.end, error / threshold, model_id)
            self._publish(win.device, self.alerts.availability, win.device, True)
            self.stale.discard(win.device)
        else:  # a reload may have changed these; the alert state itself carries over
            det.threshold, det.raise_after, det.clear_after = threshold, cfg.raise_after, cfg.clear_after
            if win.device in self.stale:  # back from its silence: its state is what it was before
                self.stale.discard(win.device)
                self._publish(win.device, self.alerts.state, win.device, det.active, win.end,
                              error / threshold, model_id)
                self._publish(win.device, self.alerts.availability, win.device, True)
        decision: Decision = det.update(error, win.start, win.end)
        if decision.event is not None:  # the top channels go with an event only: worked out for those alone
            event = replace(decision.event, top_channels=model.scorer.top_channels(shares, model.top_k))
            decision = replace(decision, event=event)
        self._dirty = True
        self.model_ids[win.device] = model_id
        if model.bundle.channels != self._share_channels:  # a reload to a model with other channels
            if self._share_channels is not None:
                self.sink.channels_changed()
            self._share_channels = model.bundle.channels
        self.sink.window(win.device, error, decision, model.bundle.channels, shares.tolist())
        self._publish(win.device, self.alerts.score, win.device, win.end, error, decision)
        if decision.event is not None:
            ev = decision.event
            log.info("alert %s device=%s score=%.3f error=%.6g threshold=%.6g top=%s id=%s", ev.state, ev.device,
                     ev.score, ev.error, ev.threshold, ",".join(c for c, _ in ev.top_channels), ev.alert_id)
            # The state is saved after the alert is in the outbox and before it is sent: after a crash the
            # next start both re-sends the alert and continues it (no second "raised").
            saved = [False]

            def save() -> None:
                saved[0] = True
                self.save_state()
            self._publish(win.device, self.alerts.alert, ev, model_id, save)
            if not saved[0]:
                self.save_state()
            if self.on_event is not None:
                self.on_event(ev, model_id)

    def drain(self, timeout: float) -> bool:
        """Stop once everything queued is scored (or the timeout passes); True if all was scored."""
        deadline = time.monotonic() + timeout
        self._flush.set()
        while time.monotonic() < deadline:
            if self.queue.empty() and self._idle.wait(timeout=0.05) and self.queue.empty():
                break
            time.sleep(0.01)
        done = self.queue.empty() and self._idle.is_set()
        self._stop.set()
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        return done


class Intake:
    """The network-thread side: payload -> readings -> device buffers -> queued windows."""

    def __init__(self, cfg: SensordConfig, models: ServingModel | ModelSet, scoring: ScoringLoop,
                 metrics: DaemonMetrics) -> None:
        self.cfg = cfg
        self.models = as_model_set(models, cfg)
        self.scoring = scoring
        self.metrics = metrics
        self.buffers: dict[str, WindowBuffer] = {}
        self.bound: dict[str, ServingModel] = {}  # device -> the model its buffer was made for
        self._unmatched: set[str] = set()  # devices no model matched, logged once each (bounded)
        self.accepting = True
        self._lock = threading.Lock()
        self._warn = RateLimitedLog(log, cfg.logging.rate_limit_seconds)
        self._resync_logged: set[str] = set()
        self.last_seen: dict[str, tuple[float, float]] = {}  # device -> (host monotonic, reading timestamp)
        self.silent: set[str] = set()  # announced stale, not yet forgotten
        self.path = self._path(cfg, self.models)
        # Publishes a command a stateful format asks for (Sparkplug rebirth); the daemon sets it once connected.
        self.send_command: Callable[[str, bytes], None] | None = None
        self._redelivered = False  # the message being taken came again (MQTT DUP)

    @property
    def model(self) -> ServingModel:
        """The first model (the one every device is bound to when ``daemon.model`` names a single bundle)."""
        primary = self.models.primary
        assert primary is not None
        return primary

    def _path(self, cfg: SensordConfig, models: ModelSet) -> ReadingPath:
        """The reading path (parsers, assemblers): each device's readings are taken with the channels, clip
        bounds and clock of the model bound to it (:meth:`ModelSet.layout_for`; sensord/models.py)."""
        return ReadingPath(cfg, models.channels, models.period(), None, self._warn, models.layout_for)

    def _bind(self, device: str) -> ServingModel | None:
        """The model of a device seen for the first time (None: counted as ``no_model``, logged once)."""
        model = self.models.bind(device)
        if model is None:
            self._unbound(device)
            return None
        self.bound[device] = model
        self.metrics.bind_device(device, model.bundle.model_id)
        return model

    @property
    def parsers(self) -> list[tuple[str, Parser]]:
        """``(topic filter, parser)`` per subscription, in the configured order (the first match wins)."""
        return self.path.parsers

    @property
    def assembler(self) -> Assembler | None:
        return self.path.assembler

    @property
    def parser(self) -> Parser:
        """The first subscription's parser (what a single-subscription config uses)."""
        return self.parsers[0][1]

    def parser_for(self, topic: str) -> Parser:
        """The parser of the first subscription whose filter matches ``topic`` (else the first one's)."""
        return self.path.parser_for(topic)

    def _reject(self, reason: str, device: str, detail: str) -> None:
        self.metrics.readings_rejected.labels(reason).inc()
        self._warn.warning(f"reading:{reason}", "reading rejected reason=%s device=%s: %s", reason, escape(device),
                           escape(detail))

    def _unbound(self, device: str) -> None:
        """A reading of a device no model serves: counted as ``no_model``, logged once per device."""
        self.metrics.readings_rejected.labels(NO_MODEL).inc()
        if device not in self._unmatched:
            if len(self._unmatched) >= 10 * self.cfg.daemon.max_devices:  # bounded: hostile ids
                self._unmatched.clear()
            self._unmatched.add(device)
            log.warning("device=%s matches no model (daemon.models): its readings are counted as "
                        "rejected (reason no_model) and never scored", escape(device))

    # RowSink: what the reading path delivers (sensord/readings.py)
    def reject(self, reason: str, device: str, detail: str) -> None:
        if reason == NO_MODEL:
            self._unbound(device)
        else:
            self._reject(reason, device, detail)

    def message_rejected(self, reason: str) -> None:
        self.metrics.messages_rejected.labels(reason).inc()

    def on_message(self, topic: str, payload: bytes, retained: bool = False, redelivered: bool = False) -> bool:
        """Take one message; False only if intake is closed (the message is left to be redelivered).

        Never raises: an exception here would end paho's network thread and silently stop intake.
        """
        try:
            return self._on_message(topic, payload, retained, redelivered)
        except Exception:  # counted and logged with its traceback below
            self.metrics.messages_rejected.labels("internal_error").inc()
            if self._warn.allow("internal_error"):
                log.exception("message on topic=%s could not be processed; daemon continues", escape(topic))
            return True

    def _on_message(self, topic: str, payload: bytes, retained: bool, redelivered: bool = False) -> bool:
        self.metrics.messages_received.inc()
        with self._lock:
            self._redelivered = redelivered  # read by _take, under the same lock
            if not self.accepting:
                # With a persistent session it is not acknowledged: the broker delivers it again next time.
                self.metrics.messages_rejected.labels("stopping").inc()
                return False
            self.path.take(topic, payload, retained, self)
        return True

    def rebirth(self, r: RebirthRequest) -> None:
        if self.send_command is None:
            return
        self.send_command(r.topic, r.payload)
        self.metrics.sparkplug_rebirth_requests.inc()
        self._warn.warning("rebirth", "asked Sparkplug edge node %s for a rebirth: %s", escape(r.node),
                           escape(r.reason))

    def _tracked(self, device: str) -> bool:
        """Whether ``device`` is, or may become, a tracked device (``daemon.max_devices``); counted if not."""
        refusal = self.path.refusal(device, self.buffers)
        if refusal is None:
            return True
        if refusal[0] == "device_limit":
            self.metrics.devices_rejected.inc()
        self._reject(refusal[0], device, refusal[1])
        return False

    def touch(self, device: str, timestamp: float | None = None) -> None:
        """``device`` is alive now (a reading was taken, or its state was restored at start-up)."""
        last = self.last_seen.get(device)
        ts = timestamp if timestamp is not None else (last[1] if last is not None else time.time())
        self.last_seen[device] = (time.monotonic(), ts)
        self.silent.discard(device)

    def sweep(self, now: float) -> tuple[list[tuple[str, float]], list[str]]:
        """Devices that went silent (``(device, last reading)``, newly past ``daemon.device_timeout_seconds``)
        and those to forget (past ``device_forget_seconds``), by the host's monotonic clock ``now``.

        Forgotten devices leave the window buffers and the assembler here; the caller hands both lists to
        :meth:`ScoringLoop.liveness`, which owns the detectors and the published state.
        """
        d = self.cfg.daemon
        stale: list[tuple[str, float]] = []
        forget: list[str] = []
        with self._lock:
            for device, (seen, ts) in list(self.last_seen.items()):
                silence = now - seen
                if silence >= d.device_forget_seconds:
                    forget.append(device)
                    del self.last_seen[device]
                    self.silent.discard(device)
                    self.buffers.pop(device, None)
                    self.bound.pop(device, None)
                    self._resync_logged.discard(device)
                    self.path.forget(device)
                elif silence >= d.device_timeout_seconds and device not in self.silent:
                    self.silent.add(device)
                    stale.append((device, ts))
            if forget:
                self.metrics.devices.set(len(self.buffers))
        return stale, forget

    admit = _tracked

    def died(self, device: str) -> None:
        """The device announced its death: its window and held values go (a restart must not bridge the
        outage; the reading path has dropped the held values); its detector, and so its alert state, stays."""
        if self.buffers.pop(device, None) is not None:
            self.metrics.devices.set(len(self.buffers))
            log.info("device=%s announced its death: its window restarts with its next reading", escape(device))

    def row(self, device: str, timestamp: float, values: np.ndarray, clipped: bool) -> None:
        """One whole row into the device's window buffer; a complete window goes to the scoring queue."""
        buf = self.buffers.get(device)
        if buf is None:
            if not self._tracked(device):
                return
            model = self.bound.get(device) or self._bind(device)
            if model is None:
                return
            buf = self.buffers[device] = WindowBuffer(model.spec, len(model.bundle.channels),
                                                      device, self.cfg.daemon.clock_resync_after)
            self.metrics.devices.set(len(self.buffers))
            log.info("new device=%s (%d tracked)", device, len(self.buffers))
        if clipped:
            self.metrics.values_clipped.inc()
            self._warn.warning("clipped", "reading of device=%s outside the healthy range by more than "
                               "scoring.clip_spreads=%g spreads: clipped", device, self.cfg.scoring.clip_spreads)
        resyncs = buf.resyncs
        try:
            window = buf.push(timestamp, values, self._redelivered)
        except ReadingRejected as exc:
            self._reject(exc.reason.value, device, str(exc))
            return
        self.touch(device, timestamp)
        # The host's time, not the reading's: a replayed or skewed device clock must not look silent.
        self.metrics.last_reading[device] = time.time()
        if buf.resyncs != resyncs:
            self.metrics.clock_resyncs.inc()
            if device not in self._resync_logged:  # once per device; the counter has the rest
                self._resync_logged.add(device)
                log.warning("device=%s clock jumped back: %d readings in a row older than its last "
                            "one; window restarted at %.3f", device, buf.resync_after, timestamp)
        if window is None:
            return
        dropped = self.scoring.submit(self.bound[device], window, len(self.buffers))
        if dropped == "queue_full":
            self._warn.warning("queue_full", "scoring queue full (%d): window of device=%s dropped",
                               self.scoring.queue.maxsize, device)
        elif dropped == "throttled":
            self._warn.warning("throttled", "device=%s has its share of the scoring queue (%d of %d "
                               "windows, %d devices) waiting and the queue is half full: window dropped",
                               device, self.scoring.share(len(self.buffers)), self.scoring.queue.maxsize,
                               len(self.buffers))

    def swap(self, cfg: SensordConfig, models: ServingModel | ModelSet) -> None:
        """Switch to a new config/models between two messages; nothing queued is lost.

        Every device is bound again: one whose new model has its old window length and channels keeps its
        buffered readings, another one's window restarts, and one that no model matches any more leaves.
        """
        new = as_model_set(models, cfg)
        with self._lock:
            restarted: list[str] = []
            for device in list(self.bound):
                old = self.bound.pop(device)
                model = new.bind(device)
                buf = self.buffers.get(device)
                if model is None:
                    self.buffers.pop(device, None)
                    self.metrics.unbind_device(device)
                    log.warning("device=%s matches no model after the reload: its window is dropped", escape(device))
                    continue
                self.bound[device] = model
                self.metrics.bind_device(device, model.bundle.model_id)
                if buf is None:
                    continue
                if model.compatible(old):
                    buf.spec = model.spec  # same length and channels: keep the buffered readings
                    buf.resync_after = cfg.daemon.clock_resync_after
                else:
                    del self.buffers[device]
                    restarted.append(device)
            if restarted:
                names = ", ".join(escape(d) for d in sorted(restarted)[:20]) + (" ..." if len(restarted) > 20 else "")
                log.warning("new model has a different window/channels/drift removal: windows restart for devices %s",
                            names)
            self.metrics.devices.set(len(self.buffers))
            self._unmatched.clear()  # a device no model matched may have one now
            path = self._path(cfg, new)
            path.carry_over(self.path)
            self.cfg, self.models, self.path = cfg, new, path
            self._warn.interval = cfg.logging.rate_limit_seconds

    def stop(self) -> None:
        with self._lock:
            self.accepting = False

    def export_buffers(self) -> dict[str, dict[str, object]]:
        """Every device's buffered readings (for a restart to continue them; see :meth:`restore_buffers`)."""
        with self._lock:
            return {device: buf.export() for device, buf in self.buffers.items()}

    def buffer_models(self) -> dict[str, str]:
        """The model id each buffered device's window was cut for (saved beside :meth:`export_buffers`)."""
        with self._lock:
            return {device: self.bound[device].bundle.model_id for device in self.buffers}

    def bound_model_id(self, device: str) -> str | None:
        """The id of the model ``device`` would be bound to now (None: no model matches it)."""
        model = self.bound.get(device) or self.models.bind(device)
        return None if model is None else model.bundle.model_id

    def restore_buffers(self, saved: dict[str, dict[str, object]]) -> int:
        """Continue the window buffers a clean shutdown left; how many devices were restored."""
        with self._lock:
            for device, state in list(saved.items())[:self.cfg.daemon.max_devices]:
                model = self.bound.get(device) or self._bind(device)
                if model is None:
                    continue
                buf = WindowBuffer(model.spec, len(model.bundle.channels), device,
                                   self.cfg.daemon.clock_resync_after)
                try:
                    buf.restore(state)
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("saved window buffer of device=%s ignored: %s", escape(device), exc)
                    continue
                self.buffers[device] = buf
                self.touch(device)
            self.metrics.devices.set(len(self.buffers))
            if self.buffers:
                log.info("window buffers of %d devices continued from the last shutdown", len(self.buffers))
            return len(self.buffers)


def as_model_set(models: ServingModel | ModelSet, cfg: SensordConfig) -> ModelSet:
    """A single model is a set of one (``daemon.model``; tests and benchmarks build it directly)."""
    from .models import ModelSet  # (sensord.models builds on ServingModel: imported here, not at the top)
    return models if isinstance(models, ModelSet) else ModelSet.single(models, cfg)
