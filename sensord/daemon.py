"""``sensord run``: lifecycle of the service.

Start-up validates config and bundle *before* touching the network, so a
mistake ends with one clear line and exit status 78 (systemd then does not
restart-loop). READY=1 is sent once the model is loaded and the broker
connected; WATCHDOG=1 only while the scoring thread is alive. SIGTERM/SIGINT
stop intake, score what is queued, publish ``offline`` and exit 0; SIGHUP
reloads config and bundles, keeping the old config if the new one is bad and
the previous version of each bundle that is bad (sensord/models.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from . import signals
from .bundle import BundleError
from .config import ConfigError, MetricsConfig, MqttConfig, SensordConfig, load_config, restart_changes
from .errors import UnavailableError
from .homeassistant import HomeAssistantDiscovery
from .metrics import DaemonMetrics, MetricsUnavailable
from .models import ModelSet
from .notify import SystemdNotifier, WatchdogPinger, watchdog_interval
from .outbox import Outbox
from .pipeline import Intake, ScoringLoop, ServingModel, as_model_set
from .sinks import AlertPublisher
from .source import MqttConnection, default_client_id, mqtt_password, tls_file_problems
from .state import StateStore
from .webconfig import WebConfig, metrics_web_config

log = logging.getLogger(__name__)


def check_referenced_files(cfg: SensordConfig, config_path: str | Path) -> WebConfig | None:
    """The files the config names besides the bundle (broker TLS files, the metrics web config and what it
    names), checked before anything starts; every problem is raised at once as a :class:`ConfigError`.

    Returns the loaded web config (None without ``metrics.web_config_file``), so it is read only once.
    """
    web, problems = referenced_file_problems(cfg.mqtt, cfg.metrics)
    if problems:
        raise ConfigError(problems, str(config_path))
    return web


def referenced_file_problems(mqtt: MqttConfig | None, metrics: MetricsConfig | None) -> tuple[WebConfig | None,
                                                                                                list[str]]:
    """The problems with the files the ``mqtt`` and ``metrics`` sections name (a section given as None is not
    checked), and the loaded web config."""
    web, problems = metrics_web_config(metrics) if metrics is not None else (None, [])
    if mqtt is not None:
        problems = tls_file_problems(mqtt) + mqtt_password(mqtt)[1] + problems
    return web, problems


def warn_restart_only(old: SensordConfig, new: SensordConfig) -> list[str]:
    """Log each changed setting a reload cannot apply (the schema marks them: config.RESTART_ONLY)."""
    changed = restart_changes(old, new)
    for path in changed:
        log.warning("reload: %s needs a restart; it is not applied", path)
    return changed


class Daemon:
    def __init__(self, config_path: str | Path, cfg: SensordConfig, models: ServingModel | ModelSet,
                 web: WebConfig | None = None) -> None:
        self.config_path = str(config_path)
        self.cfg = cfg
        self.models = as_model_set(models, cfg)
        self.web = web
        self.metrics = DaemonMetrics()
        self.notifier = SystemdNotifier()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._reconnects_seen = 0
        self._takeovers_seen = 0
        self._publish_models()
        try:
            self.mqtt = MqttConnection(cfg.mqtt, self._on_message, self._on_connected,
                                       cfg.mqtt.client_id or default_client_id(self.config_path),
                                       on_acknowledged=self._on_acknowledged, on_subscribed=self._on_subscribed)
        except ConfigError as exc:  # TLS files: name the config file too
            raise ConfigError(exc.errors, self.config_path) from None
        for topic in self.mqtt.subscribed:
            self.metrics.mqtt_subscribed.labels(topic).set(0)
        state_dir = cfg.daemon.state_dir
        self.outbox = Outbox(self.mqtt, None if state_dir is None else Path(state_dir) / "outbox",
                             cfg.daemon.outbox_max_alerts, self.metrics)
        self.alerts = AlertPublisher(self.mqtt, cfg.mqtt.topic_prefix, cfg.mqtt.publish_scores, self.outbox)
        store = self.store = None
        if cfg.daemon.state_dir is not None:
            store = self.store = StateStore(cfg.daemon.state_dir, lambda exc: self.metrics.state_save_failures.inc())
        ha = cfg.homeassistant
        self.discovery = None if not ha.enabled else HomeAssistantDiscovery(
            self.mqtt, cfg.mqtt.topic_prefix, ha.discovery_prefix, ha.node_id, cfg.mqtt.publish_scores,
            cfg.mqtt.status())
        self.scoring = ScoringLoop(self.metrics, self.alerts, cfg.daemon.queue_size, cfg.scoring.batch_max,
                                   cfg.daemon.batch_wait_seconds, state=store,
                                   save_interval=cfg.daemon.state_save_interval_seconds, discovery=self.discovery)
        self.intake = Intake(cfg, self.models, self.scoring, self.metrics)
        self.scoring.restore(self.models, cfg.daemon.max_devices)
        self.intake.send_command = self._send_command
        for device in self.scoring.detectors:  # restored: silent from now on unless they send again
            self.intake.touch(device)
        self._last_sweep = 0.0
        if store is not None:
            self.intake.restore_buffers(store.take_windows(self.intake.bound_model_id))

    @classmethod
    def from_config(cls, path: str | Path) -> Daemon:
        """Validate everything first (ConfigError / BundleError propagate to the CLI -> exit 78)."""
        cfg = load_config(path)
        web = check_referenced_files(cfg, path)
        logging.getLogger().setLevel(cfg.logging.level)
        try:
            models, _ = ModelSet.load(cfg)
        except ConfigError as exc:  # the assembly clock: name the config file too
            raise ConfigError(exc.errors, str(path)) from None
        for model in models.models:
            log.info("model %s loaded from %s: %d channels, window %d, hop %d, threshold %.6g (%s)",
                     model.bundle.model_id, model.bundle.path, len(model.bundle.channels), model.bundle.window_length,
                     model.spec.hop, model.bundle.threshold.value, model.bundle.threshold.method)
        if cfg.daemon.models:
            log.info("devices are bound to models by daemon.models: %s", models.describe())
        return cls(path, cfg, models, web)

    @property
    def model(self) -> ServingModel:
        """The first model served (the only one with ``daemon.model``)."""
        primary = self.models.primary
        assert primary is not None
        return primary

    def _served(self) -> str:
        ids = [m.bundle.model_id for m in self.models.models]
        return ids[0] if len(ids) == 1 else f"{len(ids)} models ({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})"

    def _publish_models(self) -> None:
        self.metrics.set_models([(m.bundle.model_id, m.bundle.created, m.bundle.window_length, m.spec.hop,
                                  m.bundle.channels, m.bundle.threshold.value) for m in self.models.models])

    def _send_command(self, topic: str, payload: bytes) -> None:
        self.mqtt.publish(topic, payload, qos=0)

    def _on_subscribed(self, topic_filter: str, granted: bool) -> None:
        self.metrics.mqtt_subscribed.labels(topic_filter).set(int(granted))

    def _on_acknowledged(self) -> None:
        self.outbox.sweep()  # an acknowledged alert leaves the outbox at once, not at the next tick

    def _on_message(self, topic: str, payload: bytes, retained: bool = False, redelivered: bool = False) -> bool:
        return self.intake.on_message(topic, payload, retained, redelivered)

    def _on_connected(self, up: bool) -> None:
        self.metrics.mqtt_connected.set(1 if up else 0)
        if self.mqtt.takeovers > self._takeovers_seen:
            self.metrics.mqtt_session_takeovers.inc(self.mqtt.takeovers - self._takeovers_seen)
            self._takeovers_seen = self.mqtt.takeovers
        if up and self.mqtt.reconnects > self._reconnects_seen:
            self.metrics.mqtt_reconnects.inc(self.mqtt.reconnects - self._reconnects_seen)
            self._reconnects_seen = self.mqtt.reconnects

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self._stop.set()

    def request_reload(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self._reload.set()

    def install_signal_handlers(self) -> None:
        """Take over from :mod:`sensord.signals`, keeping what arrived while starting (install, then look)."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        if signals.stop_requested.is_set():
            self._stop.set()
        if signals.reload_requested.is_set():
            self._reload.set()

    def reload(self) -> bool:
        """Load the config and every bundle again. A bad config keeps everything as it was; a bad bundle is
        refused by name and its previous version keeps serving, while the other bundles switch. True if
        nothing was refused."""
        self.notifier.reloading()
        try:
            cfg = load_config(self.config_path)
            models, refused = ModelSet.load(cfg, self.models)
            if not models.models:  # (daemon.model's one bundle refused, or every one of daemon.models)
                raise BundleError("; ".join(r.reason for r in refused) or "no bundle found")
        except Exception as exc:  # noqa: BLE001 - any failure must leave the old models running
            self.metrics.reload_failures.inc()
            log.error("reload refused, keeping %s: %s", self._served(), exc)
            self.notifier.ready(f"reload refused: {exc}"[:200])
            return False
        for r in refused:
            self.metrics.reload_failures.inc()
            kept = models.by_path.get(str(Path(r.path).expanduser().absolute()))
            log.error("reload: bundle %s refused, %s: %s", r.path,
                      f"keeping its previous version {kept.bundle.model_id}" if kept is not None
                      else "its devices match no model now", r.reason)
        warn_restart_only(self.cfg, cfg)
        logging.getLogger().setLevel(cfg.logging.level)
        self.intake.swap(cfg, models)
        self.alerts.publish_scores = cfg.mqtt.publish_scores
        if self.discovery is not None:
            self.discovery.set_publish_scores(cfg.mqtt.publish_scores)
        self.cfg, self.models = cfg, models
        self._publish_models()
        for m in models.models:
            log.info("reloaded: model %s (%s) threshold %.6g", m.bundle.model_id, m.bundle.path,
                     m.bundle.threshold.value)
        self.notifier.ready(f"serving {self._served()}" + (f", {len(refused)} bundles refused" if refused else ""))
        return not refused

    def run(self) -> int:
        cfg = self.cfg
        if cfg.metrics.enabled:
            try:
                self.metrics.serve(cfg.metrics.host, cfg.metrics.port, cfg.metrics.timeout_seconds,
                                   cfg.metrics.max_connections, self.web)
            except MetricsUnavailable as exc:  # exit 69: systemd may retry, the port may be free later
                raise UnavailableError(str(exc)) from None
        self.outbox.replay()  # queued in the client before it connects: sent first, in order
        self.scoring.start()
        self.mqtt.start()
        pinger = None
        interval = watchdog_interval()
        if interval is not None:
            pinger = WatchdogPinger(self.notifier, interval, lambda: self.scoring.healthy(max(5.0, 4 * interval)))
        ready_sent = False
        try:
            while not self._stop.is_set():
                if not ready_sent and self.mqtt.connected.is_set():
                    self.notifier.ready(f"serving {self._served()}")
                    ready_sent = True
                    log.info("ready: serving model %s", self._served())
                    if pinger is not None:
                        pinger.start()
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
                self.outbox.sweep()
                self._sweep_devices()
                self._stop.wait(0.1)
        finally:
            self.shutdown(pinger)
        return 0

    def _sweep_devices(self) -> None:
        """Once a second: devices gone silent become stale, long-silent ones are forgotten."""
        now = time.monotonic()
        if now - self._last_sweep >= 1.0:
            self._last_sweep = now
            stale, forget = self.intake.sweep(now)
            if stale or forget:
                self.scoring.liveness(stale, forget)

    def shutdown(self, pinger: WatchdogPinger | None) -> None:
        t0 = time.monotonic()
        self.notifier.stopping()
        log.info("stopping: intake closed, scoring %d queued windows", self.scoring.queue.qsize())
        self.mqtt.stop_intake()
        self.intake.stop()
        all_scored = self.scoring.drain(self.cfg.daemon.shutdown_timeout_seconds)
        if not all_scored:
            log.warning("shutdown timeout: %d windows left unscored", self.scoring.queue.qsize())
        if self.scoring.stopped():
            self.scoring.save_state()
            if self.store is not None:  # intake is closed: the buffers hold exactly the readings taken
                self.store.save_windows(self.intake.buffer_models(), self.intake.export_buffers())
        else:  # still inside a batch: its detectors may change under a save; the last periodic save stands
            log.warning("scoring did not stop in time: detector state not saved at shutdown")
        self.mqtt.close()
        left = self.outbox.sweep()
        if left:
            log.warning("%d alerts not acknowledged by the broker stay in the outbox for the next start", left)
        if pinger is not None:
            pinger.stop()
        self.metrics.shutdown()
        value = self.metrics.registry.get_sample_value
        received = int(value("sensord_messages_received_total") or 0)
        left = int(value("sensord_messages_rejected_total", {"reason": "stopping"}) or 0)
        log.info("stopped in %.2fs: %d messages taken, %d left %s", time.monotonic() - t0, received - left, left,
                 "unacknowledged for the next start" if self.mqtt.persistent else "behind (clean session: lost)")


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def fix_malloc_mmap_threshold(threshold: int = 128 * 1024) -> bool:
    """Keep big allocations in mmap so that freeing them returns the memory to the system (glibc).

    glibc raises its mmap threshold each time an mmap'ed block is freed, up to 32 MiB, so after one large
    payload (a hostile 10 MB message, rejected) later ones of that size come from the heap and stay in
    the process's RSS. A fixed threshold turns that off. Returns False where it does not apply.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def run(config_path: str | Path) -> int:
    fix_malloc_mmap_threshold()
    daemon = Daemon.from_config(config_path)
    daemon.install_signal_handlers()
    return daemon.run()
