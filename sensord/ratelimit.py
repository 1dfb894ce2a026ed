"""Rate-limited warnings, shared by the pipeline and the metrics server.

A hostile or broken peer can cause the same warning thousands of times a second; one line per key per
interval, with a count of what was held back, keeps the log readable and the disk unfilled. Standard
library only, so :mod:`sensord.metrics` can use it without importing the pipeline.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """At most one warning per key per interval, with a count of what was suppressed."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Whether a message for ``key`` may be logged now (counts it as suppressed otherwise)."""
        return self._take(key) is not None

    def _take(self, key: str) -> int | None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._suppressed.pop(key, 0)

    def warning(self, key: str, msg: str, *args: object) -> None:
        dropped = self._take(key)
        if dropped is None:
            return
        suffix = f" ({dropped} similar suppressed)" if dropped else ""
        self.logger.warning(msg + suffix, *args)
