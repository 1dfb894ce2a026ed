"""Compatibility names: the JSON payload parser now lives in :mod:`sensord.formats.json`.

Kept so existing imports (``from sensord.payload import PayloadParser``) keep working.
"""

from __future__ import annotations

from .formats.base import (
    MAX_DEVICE_ID_BYTES,
    ChannelUpdate,
    MessageRejected,
    Reading,
    device_id_problem,
    escape,
)
from .formats.json import JsonParser as PayloadParser

__all__ = ["MAX_DEVICE_ID_BYTES", "ChannelUpdate", "MessageRejected", "PayloadParser", "Reading",
           "device_id_problem", "escape"]
