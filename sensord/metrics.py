"""Prometheus metrics of the running daemon.

Names follow the client conventions (``_total`` counters, ``_seconds`` base
units). The only per-device label is ``device``, and devices are capped by
``daemon.max_devices``, so the number of series stays bounded whatever
arrives on the broker. ``reason`` labels take values from fixed enums, and
``channel`` (``sensord_channel_error_share``) the channels of the model being
served: at most max_devices x channels series, whatever the payloads carry.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .ratelimit import RateLimitedLog
from .webconfig import AUTH_FAILURE_REASONS, BasicAuth, WebConfig

log = logging.getLogger(__name__)

# ``*_created`` series double the exposition size and nobody graphs them.
disable_created_metrics()

MESSAGE_REJECT_REASONS = ("malformed_json", "too_large", "bad_payload", "no_device", "retained", "stopping",
                          "internal_error")
READING_REJECT_REASONS = ("bad_device_id", "missing_channel", "bad_value", "bad_timestamp", "future_timestamp",
                          "out_of_order", "duplicate", "non_finite", "wrong_shape", "device_limit",
                          "unknown_channel", "late_value", "incomplete_row", "malformed_line",
                          "unknown_alias", "stale_death", "no_model")
WINDOW_ERROR_STAGES = ("scoring", "detection", "publishing")
# One line a minute is enough to show a misconfigured scraper; the counters have the full count.
_PEER_WARNING_INTERVAL = 60.0


class MetricsUnavailable(RuntimeError):
    """The metrics endpoint cannot be opened (port taken, address not local)."""


class _Handler(WSGIRequestHandler):
    """One scrape; ``timeout`` (set per server) bounds every read and write on the connection."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # no access log on stderr

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:  # TimeoutError from an idle or slow client, or a client that went away
            self.close_connection = True


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A threaded WSGI server with a cap on simultaneous connections: beyond it, new ones are closed at once.

    Idle connections end after the handler's timeout, so a client that opens connections and sends nothing
    can hold at most ``max_connections`` file descriptors, and only for that long. With ``ssl_context`` set,
    each connection's TLS handshake runs in its own handler thread under that same timeout, never in the
    accept loop: a client that connects and never completes a handshake holds one slot until the timeout,
    and every other scrape goes on meanwhile.
    """

    daemon_threads = True
    request_queue_size = 64  # listen backlog: a burst of connections is accepted (and refused) quickly
    max_connections = 16
    connection_timeout = 10.0
    ssl_context: ssl.SSLContext | None = None
    on_reject: Any = None
    on_handshake_failure: Any = None

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().server_activate()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            if self.on_reject is not None:
                self.on_reject()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """In the connection's own thread: the TLS handshake (if any), then the request."""
        try:
            conn = self._secure(request, client_address)
            if conn is None:
                return
            try:
                self.finish_request(conn, client_address)
            except Exception:  # noqa: BLE001 - one scrape's failure must not end the server; handle_error logs it
                self.handle_error(conn, client_address)
            finally:
                self.shutdown_request(conn)
        finally:
            self._slots.release()

    def _secure(self, request: socket.socket, client_address: Any) -> socket.socket | None:
        """The connection to serve: ``request`` itself, or wrapped in TLS after a handshake that completed
        within the timeout (None, connection closed, if it did not)."""
        if self.ssl_context is None:
            return request
        request.settimeout(self.connection_timeout)
        try:
            return self.ssl_context.wrap_socket(request, server_side=True)  # handshakes here
        except (OSError, ValueError) as exc:  # ssl.SSLError, a timeout, a reset; the TLS socket is closed
            if self.on_handshake_failure is not None:
                self.on_handshake_failure(client_address, exc)
            self.shutdown_request(request)
            return None

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)


def _guarded(app: Callable[..., Iterable[bytes]], auth: BasicAuth,
             on_failure: Callable[[str, str], None]) -> Callable[..., Iterable[bytes]]:
    """``app`` behind basic auth: without valid credentials, 401 with the challenge Prometheus answers."""
    body = b"Unauthorized\n"
    headers = [("WWW-Authenticate", 'Basic realm="sensord"'), ("Content-Type", "text/plain; charset=utf-8"),
               ("Content-Length", str(len(body)))]

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        verdict = auth.check(environ.get("HTTP_AUTHORIZATION"))
        if verdict == "ok":
            return app(environ, start_response)
        on_failure(verdict, str(environ.get("REMOTE_ADDR", "?")))
        start_response("401 Unauthorized", headers)
        return [body]
    return guarded


class PlainCounter:
    """A counter that one thread increments: ``inc`` is a plain addition, no lock (read when scraped)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _PlainFamily:
    """One metric family whose values live in plain Python values the daemon writes (per-device dicts, a
    :class:`PlainCounter`; see :class:`DaemonMetrics`): read only when scraped.

    A ``prometheus_client`` label child per device and series is an object with its own lock; updating a
    dozen of them per scored window was most of the scoring thread's Python time, and holding them cost
    about 10 KiB per device (bench/e2e.py's device sweep). A dict entry costs neither, and the exposition
    (names, types, help, labels, order) is the same.
    """

    def __init__(self, registry: CollectorRegistry, kind: str, name: str, documentation: str,
                 samples: Callable[[], Iterable[tuple[list[str], float]]], labels: tuple[str, ...] = ("device",)
                 ) -> None:
        self._family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        self.name, self.documentation, self.labels, self._samples = name, documentation, list(labels), samples
        registry.register(self)

    def describe(self) -> list[Metric]:
        return [self._family(self.name, self.documentation, labels=self.labels)]

    def collect(self) -> list[Metric]:
        family = self._family(self.name, self.documentation, labels=self.labels)
        for labels, value in self._samples():
            family.add_metric(labels, value)
        return [family]


class DaemonMetrics:
    """All metrics, registered on a private registry (several daemons can live in one test process).

    The per-device series updated with every reading or window (windows scored, error, score, state,
    channel shares, last reading) are plain dicts here (:meth:`window_scored`, :attr:`last_reading`,
    :attr:`anomaly_state`), exposed through :class:`_PlainFamily`. Each dict is written by one thread
    (last reading: the network thread; the others: the scoring thread) and copied whole when scraped (a
    dict copy is atomic under the interpreter lock), so no lock is taken per update.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        # The standard process_* (memory, CPU, file descriptors, start time) and python_* (version, GC) metrics
        # every Prometheus client exposes, so the usual process dashboards and alerts (a leak, fds near
        # LimitNOFILE) work on sensord too. A private registry does not get them by itself; the collectors
        # read /proc and the gc module only when scraped.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.messages_received = PlainCounter()  # once per message: no lock (the network thread counts)
        _PlainFamily(r, "counter", "sensord_messages_received", "MQTT messages received",
                      lambda: [([], self.messages_received.value)], ())
        self.messages_rejected = Counter("sensord_messages_rejected", "MQTT messages rejected whole, by reason",
                                         ["reason"], registry=r)
        self.readings_rejected = Counter("sensord_readings_rejected", "Readings rejected, by reason",
                                         ["reason"], registry=r)
        self.sparkplug_rebirth_requests = Counter(
            "sensord_sparkplug_rebirth_requests", "Sparkplug B rebirth commands (NCMD) sent to edge nodes whose "
            "data could not be read (no NBIRTH seen, or a sequence gap)", registry=r)
        # Per device: device -> value (see the class docstring); channel shares: device -> (channels, shares).
        self.windows_scored: dict[str, float] = {}
        self.reconstruction_error: dict[str, float] = {}
        self.anomaly_score: dict[str, float] = {}
        self.anomaly_state: dict[str, float] = {}
        self.channel_error_share: dict[str, tuple[tuple[str, ...], Sequence[float]]] = {}
        self.last_reading: dict[str, float] = {}
        _PlainFamily(r, "counter", "sensord_windows_scored", "Windows scored", self._per_device(self.windows_scored))
        _PlainFamily(r, "gauge", "sensord_reconstruction_error",
                      "Reconstruction error of the device's last scored window",
                      self._per_device(self.reconstruction_error))
        _PlainFamily(r, "gauge", "sensord_anomaly_score", "Last window's error divided by the threshold",
                      self._per_device(self.anomaly_score))
        _PlainFamily(r, "gauge", "sensord_channel_error_share",
                      "Share of the device's last window error due to each channel "
                      "(0-1; a device's channels sum to 1): which sensors drive the score",
                      self._shares, ("device", "channel"))
        self.threshold = Gauge("sensord_threshold", "Alert threshold on the reconstruction error", registry=r)
        _PlainFamily(r, "gauge", "sensord_anomaly_state", "1 while an alert is raised for the device",
                      self._per_device(self.anomaly_state))
        self.alerts_raised = Counter("sensord_alerts_raised", "Alerts raised", ["device"], registry=r)
        self.batch_size = Histogram("sensord_scoring_batch_size", "Windows per interpreter call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.scoring_duration = Histogram("sensord_scoring_duration_seconds", "Time to score one batch",
                                          buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                   0.25, 0.5, 1.0), registry=r)
        self.queue_depth = Gauge("sensord_queue_depth", "Windows waiting to be scored", registry=r)
        self.windows_dropped = Counter("sensord_windows_dropped", "Windows dropped because the queue was full",
                                       registry=r)
        self.windows_throttled = Counter("sensord_windows_throttled", "Windows dropped because the device already "
                                         "had its share of the scoring queue waiting while the queue was "
                                         "half full", ["device"], registry=r)
        self.mqtt_connected = Gauge("sensord_mqtt_connected", "1 while connected to the broker", registry=r)
        self.mqtt_subscribed = Gauge("sensord_mqtt_subscribed", "1 while the broker grants the subscription to this "
                                     "topic filter on the current connection (filters: the config's)", ["filter"],
                                     registry=r)
        self.mqtt_reconnects = Counter("sensord_mqtt_reconnects", "Reconnections to the broker after a loss",
                                       registry=r)
        self.mqtt_session_takeovers = Counter("sensord_mqtt_session_takeovers", "Disconnections because another "
                                              "client connected with our client id", registry=r)
        self.devices = Gauge("sensord_devices", "Devices currently tracked", registry=r)
        _PlainFamily(r, "gauge", "sensord_last_reading_timestamp_seconds", "When (this host's clock, Unix "
                      "seconds) the device's last reading was accepted", self._per_device(self.last_reading))
        self.devices_rejected = Counter("sensord_devices_rejected",
                                        "Readings refused because max_devices was reached", registry=r)
        self.values_clipped = Counter("sensord_values_clipped", "Readings clipped to the healthy range +- "
                                      "scoring.clip_spreads spreads", registry=r)
        self.clock_resyncs = Counter("sensord_clock_resyncs", "Device windows restarted because the device's "
                                     "clock jumped back", registry=r)
        self.metrics_rejected = Counter("sensord_metrics_connections_rejected", "Connections to /metrics closed "
                                        "at once because metrics.max_connections were open", registry=r)
        self.metrics_auth_failures = Counter("sensord_metrics_auth_failures", "Requests to /metrics refused (401) "
                                             "for missing or wrong basic-auth credentials, by reason", ["reason"],
                                             registry=r)
        self.metrics_tls_failures = Counter("sensord_metrics_tls_handshake_failures", "Connections to /metrics "
                                            "closed because their TLS handshake failed or timed out", registry=r)
        self.window_errors = Counter("sensord_window_errors",
                                     "Windows whose scoring, detection or publishing failed (a bug or a broker "
                                     "refusal), by stage; other windows are not affected", ["stage"], registry=r)
        self.outbox_depth = Gauge("sensord_outbox_depth",
                                  "Alerts kept on disk until the broker acknowledges them", registry=r)
        self.outbox_dropped = Counter("sensord_outbox_dropped",
                                      "Alerts given up because the outbox was full", registry=r)
        self.state_save_failures = Counter("sensord_state_save_failures",
                                           "Detector state and outbox writes that failed (read-only or full disk)",
                                           registry=r)
        self.model_info = Info("sensord_model", "The model bundles being served, one series per bundle",
                               ["model_id"], registry=r)
        self.model_threshold = Gauge("sensord_model_threshold", "Alert threshold of each model being served",
                                     ["model_id"], registry=r)
        self._device_models: dict[str, str] = {}  # device -> the id of the model that scores it
        _PlainFamily(r, "gauge", "sensord_device_model_info", "1 for the model that scores the device",
                      lambda: [([device, model_id], 1.0) for device, model_id in list(self._device_models.items())],
                      ("device", "model_id"))
        self.reload_failures = Counter("sensord_reload_failures", "Reloads (SIGHUP) refused: a bad config, or a "
                                       "bad bundle (counted per bundle; its previous version keeps serving)",
                                       registry=r)
        self._served: set[str] = set()
        for reason in MESSAGE_REJECT_REASONS:
            self.messages_rejected.labels(reason)
        for reason in READING_REJECT_REASONS:
            self.readings_rejected.labels(reason)
        for stage in WINDOW_ERROR_STAGES:
            self.window_errors.labels(stage)
        for reason in AUTH_FAILURE_REASONS:
            self.metrics_auth_failures.labels(reason)
        self._peer_warnings = RateLimitedLog(log, _PEER_WARNING_INTERVAL)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def _per_device(values: dict[str, float]) -> Callable[[], list[tuple[list[str], float]]]:
        return lambda: [([device], value) for device, value in list(values.items())]

    def _shares(self) -> list[tuple[list[str], float]]:
        return [([device, channel], float(share))
                for device, (channels, shares) in list(self.channel_error_share.items())
                for channel, share in zip(channels, shares, strict=True)]

    def window_scored(self, device: str, error: float, score: float, active: bool,
                      channels: tuple[str, ...] = (), shares: Sequence[float] = ()) -> None:
        """One scored window of ``device`` (scoring thread): counted, its error, score, state and (with
        ``channels``) each channel's share of its error."""
        self.windows_scored[device] = self.windows_scored.get(device, 0.0) + 1.0
        self.reconstruction_error[device] = float(error)
        self.anomaly_score[device] = float(score)
        self.anomaly_state[device] = 1.0 if active else 0.0
        if channels:
            if len(shares) != len(channels):
                raise ValueError(f"{len(shares)} shares for {len(channels)} channels")
            self.channel_error_share[device] = (channels, shares)

    def set_model(self, model_id: str, created: str, window: int, hop: int, channels: tuple[str, ...],
                  threshold: float) -> None:
        """One model for every device (what a single bundle serves)."""
        self.set_models([(model_id, created, window, hop, channels, threshold)])

    def set_models(self, models: list[tuple[str, str, int, int, tuple[str, ...], float]]) -> None:
        """Every model being served ``(model_id, created, window, hop, channels, threshold)``; the first one's
        threshold is ``sensord_threshold``. Models no longer served leave the per-model series."""
        ids = set()
        for model_id, created, window, hop, channels, threshold in models:
            ids.add(model_id)
            self.model_info.labels(model_id).info({"created": created, "window": str(window), "hop": str(hop),
                                                   "channels": ",".join(channels)})
            self.model_threshold.labels(model_id).set(threshold)
        for gone in self._served - ids:
            self.model_info.remove(gone)
            self.model_threshold.remove(gone)
        self._served = ids
        if models:
            self.threshold.set(models[0][5])

    def bind_device(self, device: str, model_id: str) -> None:
        """``sensord_device_model_info{device,model_id}``: the model that scores ``device`` (one series)."""
        self._device_models[device] = model_id

    def unbind_device(self, device: str) -> None:
        self._device_models.pop(device, None)

    def serve(self, host: str, port: int, timeout: float = 10.0, max_connections: int = 16,
              web: WebConfig | None = None) -> int:
        """Start the endpoint; returns the bound port (0 in config picks a free one).

        ``web`` (from ``metrics.web_config_file``) adds TLS and/or basic auth; None serves plain HTTP to anyone.
        """
        handler = type("Handler", (_Handler,), {"timeout": timeout})
        app = make_wsgi_app(self.registry)
        if web is not None and web.users:
            app = _guarded(app, BasicAuth(web.users), self._auth_failed)
        tls = web.tls.context if web is not None and web.tls is not None else None
        try:
            family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            server = type("Server", (_BoundedServer,), {
                "address_family": family, "max_connections": max_connections, "connection_timeout": timeout,
                "ssl_context": tls, "on_reject": self.metrics_rejected.inc,
                "on_handshake_failure": self._handshake_failed})
            self._server = make_server(str(addr[0]), port, app, server, handler_class=handler)
        except OSError as exc:
            raise MetricsUnavailable(f"metrics endpoint {host}:{port}: cannot listen: {exc.strerror or exc} "
                                     "(change metrics.port, or stop what holds it)") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="sensord-metrics", daemon=True)
        self._thread.start()
        bound = int(self._server.server_address[1])
        scheme = "https" if tls is not None else "http"
        log.info("metrics on %s://%s:%d/metrics (%s)", scheme, host, bound,
                 web.describe() if web is not None else "no TLS, no authentication")
        if web is not None and web.users and tls is None:
            log.warning("metrics: basic auth without TLS sends the password in clear text at every scrape "
                        "(%s has no tls_server_config)", web.path)
        return bound

    def _auth_failed(self, reason: str, peer: str) -> None:
        self.metrics_auth_failures.labels(reason).inc()
        self._peer_warnings.warning(f"auth:{reason}", "metrics: refused a request from %s: %s", peer,
                                    "no basic-auth credentials" if reason == "no_credentials"
                                    else "wrong user name or password")

    def _handshake_failed(self, peer: Any, exc: BaseException) -> None:
        self.metrics_tls_failures.inc()
        what = "timed out" if isinstance(exc, TimeoutError) else f"failed: {getattr(exc, 'reason', None) or exc}"
        self._peer_warnings.warning("tls", "metrics: TLS handshake with %s %s", peer[0] if peer else "?", what)

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def forget_device(self, device: str) -> None:
        """Drop every series labelled with ``device`` (a forgotten device must not linger in /metrics)."""
        self.unbind_device(device)
        for values in (self.windows_scored, self.reconstruction_error, self.anomaly_score, self.anomaly_state,
                       self.channel_error_share, self.last_reading):
            values.pop(device, None)
        for metric in (self.alerts_raised, self.windows_throttled):
            try:
                metric.remove(device)
            except KeyError:  # never had that label
                pass
