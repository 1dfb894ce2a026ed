"""Alerts that cannot be lost: a small on-disk outbox in front of the broker.

Every alert (``raised`` and ``cleared``) is written to ``{state_dir}/outbox/``
as one small file, atomically, *before* it is handed to the MQTT client; the
file is deleted once the broker has acknowledged it (PUBACK). While the broker
is unreachable the MQTT client keeps the alert queued and sends it after
reconnecting; if the daemon dies first, the next start publishes what is left
in the outbox, oldest first, before anything else. The outbox is bounded
(``daemon.outbox_max_alerts``): when it is full the oldest alert is given up,
counted and logged. Consumers de-duplicate by ``alert_id``: an alert
acknowledged just before a crash is sent again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .metrics import DaemonMetrics
from .state import write_atomically

log = logging.getLogger(__name__)


def acknowledged(info: Any) -> bool:
    """Whether the broker acknowledged a QoS 1 publish (``info``: paho's MQTTMessageInfo, or None)."""
    if info is None:
        return True
    try:
        return bool(info.is_published())
    except RuntimeError:
        # Published while disconnected: paho keeps the message and sends it after reconnecting, but the
        # info keeps the "not connected" code and is_published() raises; the flag itself is still set.
        return bool(getattr(info, "_published", False))
    except ValueError:  # never queued (the client's queue was full): no acknowledgement will come
        return False


class Outbox:
    """Pending alert publishes, mirrored to files named by a sequence number (their order)."""

    def __init__(self, publisher: Any, directory: str | Path | None, max_entries: int,
                 metrics: DaemonMetrics) -> None:
        self.publisher = publisher
        self.dir = None if directory is None else Path(directory)
        self.max_entries = max_entries
        self.metrics = metrics
        self._pending: deque[tuple[int, Any, Path | None]] = deque()  # (seq, MQTTMessageInfo or None, file)
        self._lock = threading.Lock()
        self._seq = 0
        self._write_failing = False

    @property
    def depth(self) -> int:
        with self._lock:
            return len(self._pending)

    def replay(self) -> int:
        """Publish (queue, before connecting) what a previous run left in the outbox; how many."""
        if self.dir is None or not self.dir.is_dir():
            return 0
        files = sorted(p for p in self.dir.iterdir() if p.suffix == ".json" and p.stem.isdigit())
        n = 0
        for path in files:
            self._seq = max(self._seq, int(path.stem))
            try:
                entry = json.loads(path.read_bytes())
                topic, payload = entry["topic"], entry["payload"]
                if not isinstance(topic, str) or not isinstance(payload, str):
                    raise ValueError("topic and payload must be strings")
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
                log.warning("outbox entry %s cannot be used (%s); deleted", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            info = self.publisher.publish(topic, payload, qos=1)
            with self._lock:
                self._pending.append((int(path.stem), info, path))
            n += 1
        if n:
            log.warning("outbox: %d alerts from before the restart not yet acknowledged by the broker; "
                        "sending them first", n)
        self._update_depth()
        return n

    def send(self, topic: str, payload: str, before_publish: Callable[[], object] | None = None) -> None:
        """Keep the alert on disk, call ``before_publish``, then hand the alert to the MQTT client (QoS 1)."""
        with self._lock:
            self._seq += 1
            seq = self._seq
            while len(self._pending) >= self.max_entries:
                _, _, old = self._pending.popleft()
                self.metrics.outbox_dropped.inc()
                log.error("outbox full (%d alerts not acknowledged by the broker): the oldest is given up",
                          self.max_entries)
                if old is not None:
                    old.unlink(missing_ok=True)
        path = self._write(seq, topic, payload)
        if before_publish is not None:
            before_publish()
        info = self.publisher.publish(topic, payload, qos=1)
        with self._lock:
            self._pending.append((seq, info, path))
        self._update_depth()

    def _write(self, seq: int, topic: str, payload: str) -> Path | None:
        if self.dir is None:
            return None
        path = self.dir / f"{seq:016d}.json"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps({"topic": topic, "payload": payload}).encode())
        except OSError as exc:
            self.metrics.state_save_failures.inc()
            if not self._write_failing:
                log.error("cannot write the outbox in %s: %s (alerts are still sent, but one not yet "
                          "acknowledged is lost if the daemon dies)", self.dir, exc)
            self._write_failing = True
            return None
        self._write_failing = False
        return path

    def sweep(self) -> int:
        """Forget (and delete) the alerts the broker has acknowledged; returns the depth left."""
        done: list[Path] = []
        with self._lock:
            keep: deque[tuple[int, Any, Path | None]] = deque()
            for seq, info, path in self._pending:
                if acknowledged(info):
                    if path is not None:
                        done.append(path)
                else:
                    keep.append((seq, info, path))
            self._pending = keep
        for path in done:
            path.unlink(missing_ok=True)
        return self._update_depth()

    def _update_depth(self) -> int:
        n = self.depth
        self.metrics.outbox_depth.set(n)
        return n
