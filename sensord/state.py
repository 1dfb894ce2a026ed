"""Detector state that survives the process: one small JSON file under ``daemon.state_dir``.

The scoring thread owns the detectors, so it also saves them: at once after an
alert is raised or cleared, every ``daemon.state_save_interval_seconds`` while
windows are being scored, and once more at shutdown. A save writes a temporary
file, fsyncs it and renames it over the old one (then fsyncs the directory), so
a crash or power loss leaves either the old or the new state, never half of one.

At start-up the file is restored if it was written for the model being served;
a file for another model, or one that cannot be read, is renamed aside (with a
warning) and the daemon starts fresh. A save that fails (read-only or full
disk) is counted in ``sensord_state_save_failures_total`` and logged, and the
daemon goes on scoring.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .detector import AlertDetector

log = logging.getLogger(__name__)

STATE_FILE = "detector-state.json"
WINDOWS_FILE = "window-buffers.json"  # written at a clean shutdown only; read (and removed) at the next start
FORMAT = "sensord-detector-state"
VERSION = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class StateStore:
    """Saves and restores the detectors of every device for one model."""

    def __init__(self, state_dir: str | Path, on_failure: Any = None) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE
        self.windows_path = self.dir / WINDOWS_FILE
        self._on_failure = on_failure  # called with the exception after a failed save
        self._failing = False

    def load(self, model_id: str) -> dict[str, dict[str, Any]]:
        """Per-device detector states saved for ``model_id``; {} if none (bad files are set aside)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("state file %s cannot be read (%s): starting with fresh detector state", self.path, exc)
            return {}
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise ValueError(f"not a {FORMAT} version {VERSION} file")
            devices = doc.get("devices")
            if not isinstance(devices, dict) or not all(isinstance(v, dict) for v in devices.values()):
                raise ValueError("'devices' must map device ids to states")
            saved_for = doc.get("model_id")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            self._set_aside("corrupt", f"cannot be used ({exc})")
            return {}
        if saved_for != model_id:
            self._set_aside("other-model", f"was saved for model {saved_for!r}, not {model_id!r}")
            return {}
        return devices

    def _set_aside(self, why: str, detail: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.{why}-{stamp}")
        try:
            os.replace(self.path, aside)
            log.warning("state file %s %s: moved to %s; starting with fresh detector state", self.path, detail,
                        aside.name)
        except OSError as exc:
            log.warning("state file %s %s, and cannot be moved aside (%s); starting with fresh detector state",
                        self.path, detail, exc)

    def save(self, model_id: str, detectors: dict[str, AlertDetector]) -> bool:
        """Write every detector's state; False (counted and logged by the caller's hook) if it failed."""
        doc = {"format": FORMAT, "version": VERSION, "model_id": model_id, "saved_at": time.time(),
               "devices": {dev: det.export() for dev, det in detectors.items()}}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, json.dumps(doc, separators=(",", ":")).encode())
        except OSError as exc:
            if not self._failing:
                log.error("cannot save detector state to %s: %s (scoring goes on; a restart now would "
                          "forget which alerts are raised)", self.path, exc)
            else:
                log.debug("saving detector state failed again: %s", exc)
            self._failing = True
            if self._on_failure is not None:
                self._on_failure(exc)
            return False
        if self._failing:
            log.info("detector state saved to %s again", self.path)
            self._failing = False
        return True

    def save_windows(self, model_id: str, buffers: dict[str, dict[str, Any]]) -> bool:
        """At a clean shutdown: each device's buffered readings, for the next start to continue them."""
        doc = {"format": FORMAT + "-windows", "version": VERSION, "model_id": model_id, "devices": buffers}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.windows_path, json.dumps(doc, separators=(",", ":")).encode())
        except (OSError, ValueError) as exc:
            log.error("cannot save window buffers to %s: %s", self.windows_path, exc)
            if self._on_failure is not None:
                self._on_failure(exc)
            return False
        return True

    def take_windows(self, model_id: str) -> dict[str, dict[str, Any]]:
        """The buffers a clean shutdown saved for ``model_id``; the file is removed either way, so a
        later crash never continues from readings this old."""
        try:
            raw = self.windows_path.read_bytes()
        except OSError:
            return {}
        try:
            self.windows_path.unlink()
            _fsync_dir(self.dir)
        except OSError as exc:
            log.warning("cannot remove %s (%s): window buffers start empty", self.windows_path, exc)
            return {}
        try:
            doc = json.loads(raw)
            ok = (isinstance(doc, dict) and doc.get("format") == FORMAT + "-windows"
                  and doc.get("version") == VERSION and isinstance(doc.get("devices"), dict)
                  and all(isinstance(v, dict) for v in doc["devices"].values()))
        except (ValueError, UnicodeDecodeError, RecursionError):
            ok = False
        if not ok:
            log.warning("window buffers in %s cannot be used: they start empty", self.windows_path)
            return {}
        if doc.get("model_id") != model_id:
            log.info("window buffers were saved for model %r, not %r: they start empty", doc.get("model_id"),
                     model_id)
            return {}
        return doc["devices"]
