"""Detector state that survives the process: one small JSON file under ``daemon.state_dir``.

The scoring thread owns the detectors, so it also saves them: at once after an
alert is raised or cleared, every ``daemon.state_save_interval_seconds`` while
windows are being scored, and once more at shutdown. A save writes a temporary
file, fsyncs it and renames it over the old one (then fsyncs the directory), so
a crash or power loss leaves either the old or the new state, never half of one.

Each device's state is saved with the id of the model that scored it (several
models in one daemon: sensord/models.py), and at start-up restored only if the
device is bound to that model again; a file none of whose devices' models is
served any more, or one that cannot be read, is renamed aside (with a warning)
and the daemon starts fresh. A save that fails (read-only or full
disk) is counted in ``sensord_state_save_failures_total`` and logged, and the
daemon goes on scoring.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from .detector import AlertDetector

log = logging.getLogger(__name__)

STATE_FILE = "detector-state.json"
WINDOWS_FILE = "window-buffers.json"  # written at a clean shutdown only; read (and removed) at the next start
FORMAT = "sensord-detector-state"
VERSION = 2  # 2: a model id per device ("models"); a version 1 file (one "model_id" for all) is still read
READABLE = (1, 2)

Expected = str | Callable[[str], str | None]  # the served model's id, or a device's (None: no model for it)
ModelIds = str | dict[str, str]  # one model id for every device, or one per device


def _expected(expected: Expected) -> Callable[[str], str | None]:
    return (lambda _: expected) if isinstance(expected, str) else expected


def _per_device(doc: dict[str, Any]) -> dict[str, Any]:
    models = doc.get("models")
    return models if isinstance(models, dict) else {}


def _keep(doc: dict[str, Any], expected: Expected) -> tuple[dict[str, Any], int]:
    """The devices of a saved ``doc`` whose model is the one they are bound to now, and how many were not."""
    want = _expected(expected)
    per_device = _per_device(doc)
    kept = {dev: st for dev, st in doc["devices"].items() if want(dev) == per_device.get(dev, doc.get("model_id"))}
    return kept, len(doc["devices"]) - len(kept)


def _ids(models: ModelIds) -> dict[str, Any]:
    if isinstance(models, str):
        return {"model_id": models}
    ids = set(models.values())
    return {"model_id": next(iter(ids)) if len(ids) == 1 else None, "models": models}


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
    """Saves and restores the detectors of every device, each with the id of the model that scored it."""

    def __init__(self, state_dir: str | Path, on_failure: Any = None) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE
        self.windows_path = self.dir / WINDOWS_FILE
        self._on_failure = on_failure  # called with the exception after a failed save
        self._failing = False

    def load(self, expected: Expected, served: Collection[str] | None = None) -> dict[str, dict[str, Any]]:
        """Per-device detector states saved for the model each device is bound to now (``expected``: the one
        model's id, or device -> id; ``served``: the ids of every model served); {} if none. A file that
        cannot be read, or that was saved for none of the served models, is set aside."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("state file %s cannot be read (%s): starting with fresh detector state", self.path, exc)
            return {}
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") not in READABLE:
                raise ValueError(f"not a {FORMAT} version {VERSION} file")
            devices = doc.get("devices")
            if not isinstance(devices, dict) or not all(isinstance(v, dict) for v in devices.values()):
                raise ValueError("'devices' must map device ids to states")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            self._set_aside("corrupt", f"cannot be used ({exc})")
            return {}
        kept, dropped = _keep(doc, expected)
        served = {expected} if isinstance(expected, str) else served
        ids = {v for v in [*_per_device(doc).values(), doc.get("model_id")] if isinstance(v, str)}
        if (devices and not kept) or (served is not None and ids and not ids & set(served)):
            saved_for = doc.get("model_id") or sorted(set((doc.get("models") or {}).values()))
            what = repr(expected) if isinstance(expected, str) else "the models served now"
            self._set_aside("other-model", f"was saved for model {saved_for!r}, not {what}")
            return {}
        if dropped:
            log.info("saved detector state of %d devices ignored: saved for a model other than the one they are "
                     "bound to now", dropped)
        return kept

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

    def save(self, models: ModelIds, detectors: dict[str, AlertDetector]) -> bool:
        """Write every detector's state with its model id (``models``: one for all, or per device); False
        (counted and logged by the caller's hook) if it failed."""
        doc = {"format": FORMAT, "version": VERSION, **_ids(models), "saved_at": time.time(),
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

    def save_windows(self, models: ModelIds, buffers: dict[str, dict[str, Any]]) -> bool:
        """At a clean shutdown: each device's buffered readings (with the id of the model they were cut
        for), for the next start to continue them."""
        doc = {"format": FORMAT + "-windows", "version": VERSION, **_ids(models), "devices": buffers}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.windows_path, json.dumps(doc, separators=(",", ":")).encode())
        except (OSError, ValueError) as exc:
            log.error("cannot save window buffers to %s: %s", self.windows_path, exc)
            if self._on_failure is not None:
                self._on_failure(exc)
            return False
        return True

    def take_windows(self, expected: Expected) -> dict[str, dict[str, Any]]:
        """The buffers a clean shutdown saved for the model each device is bound to now; the file is
        removed either way, so a later crash never continues from readings this old."""
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
                  and doc.get("version") in READABLE and isinstance(doc.get("devices"), dict)
                  and all(isinstance(v, dict) for v in doc["devices"].values()))
        except (ValueError, UnicodeDecodeError, RecursionError):
            ok = False
        if not ok:
            log.warning("window buffers in %s cannot be used: they start empty", self.windows_path)
            return {}
        kept, dropped = _keep(doc, expected)
        if dropped:
            log.info("window buffers of %d devices were saved for another model than the one they are bound to "
                     "now: they start empty", dropped)
        return kept
