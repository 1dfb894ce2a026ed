"""The one timestamp parser: MQTT payloads and CSV files both read time through :func:`unix_seconds`.

Epoch numbers are taken as seconds, milliseconds, microseconds or nanoseconds by
their size (a gateway that sends microseconds must not land 50,000 years ahead);
strings are epoch numbers or ISO-8601 date-times, naive ones in UTC.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

# Above each bound an epoch number is read in the next smaller unit. 1e11 s is the year 5138,
# so every plausible date in seconds is below the first bound, in milliseconds below the second, ...
_UNIT_BOUNDS = ((1e17, 1e9), (1e14, 1e6), (1e11, 1e3))


def unix_seconds(raw: Any) -> float:
    """Unix seconds from an epoch number (s, ms, µs or ns by magnitude) or an ISO-8601 string.

    Raises ValueError (or OverflowError) for anything else, including non-finite numbers.

    >>> [unix_seconds(x) for x in (1704067200, 1704067200000, 1704067200000000, 1704067200000000000)]
    [1704067200.0, 1704067200.0, 1704067200.0, 1704067200.0]
    >>> unix_seconds("2024-01-01T00:00:00Z"), unix_seconds("1704067200.5")
    (1704067200.0, 1704067200.5)
    """
    if isinstance(raw, bool):
        raise ValueError(f"timestamp must be a number or ISO-8601 string, got {raw!r}")
    if isinstance(raw, (int, float)):
        ts = float(raw)
        if not math.isfinite(ts):
            raise ValueError(f"timestamp must be finite, got {raw!r}")
        for bound, divisor in _UNIT_BOUNDS:
            if abs(ts) > bound:
                return ts / divisor
        return ts
    if isinstance(raw, str):
        try:
            number = float(raw)
        except ValueError:
            dt = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
            return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
        return unix_seconds(number)
    raise ValueError(f"timestamp must be a number or ISO-8601 string, got {type(raw).__name__}")
