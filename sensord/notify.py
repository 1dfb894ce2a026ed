"""systemd service notifications (``sd_notify``) and watchdog pings.

The unit runs with ``Type=notify`` and ``WatchdogSec=``: systemd considers the
service started only once we send ``READY=1``, and restarts it if no
``WATCHDOG=1`` arrives within the watchdog timeout. The protocol is tiny -- one
datagram of newline-separated ``KEY=value`` lines sent to the AF_UNIX socket
named in ``$NOTIFY_SOCKET`` -- so it is implemented here directly instead of
pulling in libsystemd bindings (a C dependency that edge boxes may lack).

Everything degrades to a no-op when ``$NOTIFY_SOCKET`` is unset, so the daemon
runs unchanged in a terminal, in tests or in a container without systemd.
Notification failures are never fatal: losing a status line must not take down
the scoring loop (a missing watchdog ping is then handled by systemd itself).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

__all__ = ["SystemdNotifier", "WatchdogPinger", "watchdog_interval"]

log = logging.getLogger(__name__)


def _socket_address(path: str) -> str | bytes:
    """Map a ``$NOTIFY_SOCKET`` value to an address usable with ``sendto``.

    A leading ``@`` denotes a Linux abstract-namespace socket, whose real name
    starts with a NUL byte instead (systemd uses this notation in the env var).
    """
    if path.startswith("@"):
        return "\0" + path[1:]
    return path


class SystemdNotifier:
    """Sends sd_notify messages to the service manager, or does nothing.

    Only one socket is created per message (like libsystemd's ``sd_notify``), so
    the notifier holds no file descriptor, needs no ``close()`` and can be used
    from several threads at once. With ``NotifyAccess=main`` systemd accepts
    messages from any thread of the main process, since they share its PID.
    """

    def __init__(self, socket_path: str | None = None) -> None:
        """Use ``socket_path``, or ``$NOTIFY_SOCKET`` when it is None.

        An empty path (or an unset variable) disables the notifier: every
        method then returns False without touching the network.
        """
        if socket_path is None:
            socket_path = os.environ.get("NOTIFY_SOCKET", "")
        self._path: str = socket_path
        self._address: str | bytes | None = _socket_address(socket_path) if socket_path else None
        self._warned = False
        self._warn_lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """True when a notification socket is configured (we run under systemd)."""
        return self._address is not None

    @property
    def socket_path(self) -> str | None:
        """The configured socket path as given (``@name`` for abstract), or None."""
        return self._path or None

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines, in argument order, as a single datagram.

        Returns True if the datagram was handed to the kernel, False when the
        notifier is disabled, nothing was given, or the send failed. Socket
        errors are never raised -- a dead or missing systemd socket must not
        crash the daemon -- and only the first one is logged as a warning, so a
        broken socket does not flood the journal once per watchdog ping.

        Raises ValueError for malformed fields (a key containing ``=`` or a
        newline in a key or value): they would corrupt the line protocol and
        are programming errors, not runtime conditions. Use :meth:`status` for
        free text, which sanitises newlines.
        """
        if self._address is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            value = str(value)
            if not key or "=" in key or "\n" in key or "\n" in value:
                raise ValueError(f"invalid sd_notify field {key!r}={value!r}")
            lines.append(f"{key}={value}\n")
        payload = "".join(lines).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(payload, self._address)
        except OSError as exc:
            self._warn_once(exc)
            return False
        return True

    def _warn_once(self, exc: OSError) -> None:
        """Log the first send failure as a warning and later ones at debug level."""
        with self._warn_lock:
            first, self._warned = not self._warned, True
        if first:
            log.warning(
                "cannot send systemd notification to %r: %s (further failures logged at debug level)",
                self._path,
                exc,
            )
        else:
            log.debug("cannot send systemd notification to %r: %s", self._path, exc)

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up (or a reload) is complete: ``READY=1``.

        Send this only once the daemon can do its job (e.g. subscribed to the
        broker), since ``Type=notify`` units that depend on us start right after.
        """
        if status is None:
            return self.notify(READY="1")
        return self.notify(READY="1", STATUS=_one_line(status))

    def stopping(self) -> bool:
        """Tell systemd a clean shutdown has begun: ``STOPPING=1``.

        Without it, systemd may count the exit of a deliberately stopping
        service against the watchdog or restart policy.
        """
        return self.notify(STOPPING="1")

    def reloading(self) -> bool:
        """Tell systemd a configuration reload has begun (on SIGHUP).

        Sends ``RELOADING=1`` with ``MONOTONIC_USEC`` (CLOCK_MONOTONIC in µs),
        which systemd >= 253 requires to match the reload to this request; older
        versions ignore the extra field. Call :meth:`ready` when the reload is
        done, otherwise systemd keeps the unit in the "reloading" state.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING="1", MONOTONIC_USEC=str(usec))

    def watchdog(self) -> bool:
        """Ping the service watchdog: ``WATCHDOG=1`` (see :class:`WatchdogPinger`)."""
        return self.notify(WATCHDOG="1")

    def status(self, text: str) -> bool:
        """Set the free-text status shown by ``systemctl status``: ``STATUS=...``.

        Newlines are replaced by spaces because they would end the field.
        """
        return self.notify(STATUS=_one_line(text))


def _one_line(text: str) -> str:
    """Collapse line breaks so free text fits in one ``KEY=value`` line."""
    return " ".join(str(text).splitlines())


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings, or None when no watchdog is configured.

    systemd exports ``$WATCHDOG_USEC`` (the timeout) and ``$WATCHDOG_PID`` (the
    process meant to ping). If the PID is set but is not ours, the variables
    were inherited from a parent and the watchdog is not our job. Returns half
    the timeout, the interval ``sd_watchdog_enabled(3)`` recommends, so one late
    ping does not get the service killed. Unparsable or non-positive values
    yield None (with a warning) rather than an exception.
    """
    usec_text = os.environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = os.environ.get("WATCHDOG_PID")
    if pid_text:
        try:
            pid = int(pid_text)
        except ValueError:
            log.warning("ignoring invalid WATCHDOG_PID=%r", pid_text)
            return None
        if pid != os.getpid():
            log.debug("WATCHDOG_PID=%d is not our pid %d; no watchdog", pid, os.getpid())
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("ignoring invalid WATCHDOG_USEC=%r", usec_text)
        return None
    if usec <= 0:
        log.warning("ignoring non-positive WATCHDOG_USEC=%r", usec_text)
        return None
    return usec / 1_000_000 / 2


class WatchdogPinger:
    """Daemon thread sending ``WATCHDOG=1`` every ``interval`` s while healthy.

    Pinging from a timer alone would only prove the process exists. Instead
    each tick asks ``healthy()`` (e.g. "did the scoring loop make progress
    recently?") and pings only if it returns True, so a hung scorer or stuck
    main loop stops the pings and systemd restarts the service. A callback
    that raises counts as unhealthy. The thread is a daemon so it never blocks
    interpreter exit; :meth:`stop` wakes it through an Event, not a sleep.
    """

    def __init__(
        self,
        notifier: SystemdNotifier,
        interval: float,
        healthy: Callable[[], bool],
    ) -> None:
        """Ping via ``notifier`` every ``interval`` seconds (see :func:`watchdog_interval`)."""
        if not interval > 0:
            raise ValueError(f"watchdog interval must be positive, got {interval!r}")
        self._notifier = notifier
        self._interval = float(interval)
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def interval(self) -> float:
        """Seconds between health checks (and pings, while healthy)."""
        return self._interval

    @property
    def running(self) -> bool:
        """True while the pinger thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread; the first check and ping happen immediately.

        Calling it on a running pinger does nothing.
        """
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop pinging and join the thread (returns within about one callback run)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> WatchdogPinger:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        was_healthy = True
        while not self._stop.is_set():
            try:
                healthy = bool(self._healthy())
            except Exception:
                log.exception("watchdog health check raised; treating as unhealthy")
                healthy = False
            if self._stop.is_set():
                break
            if healthy:
                if not was_healthy:
                    log.warning("health check passes again; resuming watchdog pings")
                self._notifier.watchdog()
            elif was_healthy:
                log.warning("health check failed; withholding watchdog pings")
            was_healthy = healthy
            self._stop.wait(self._interval)
