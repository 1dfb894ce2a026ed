"""The model bundle: everything needed to score, in one directory.

``bundle.json`` (format version, channels, window, scaler, threshold, training
metadata, checksum), ``model.tflite`` (what the daemon runs) and
``model.keras`` (what training produced, for inspection and retraining).
Loading checks every part before anything is scored, so a half-copied or
mismatched bundle stops start-up with a message instead of scoring garbage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .drift import DriftSpec
from .errors import EX_CONFIG, SensordError
from .scaling import Scaler
from .threshold import ThresholdRecord

FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
TFLITE_FILE = "model.tflite"
KERAS_FILE = "model.keras"


class BundleError(SensordError):
    """A bundle cannot be used; the message names the file and what is wrong."""

    exit_status = EX_CONFIG  # like a bad config: only a person can fix it, systemd must not restart-loop
    kind = "model error"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelBundle:
    path: Path
    model_id: str
    channels: tuple[str, ...]
    window_length: int
    window_hop: int
    error_metric: str
    scaler: Scaler
    threshold: ThresholdRecord
    model: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    tflite_sha256: str = ""
    # A few raw windows and the errors the scorer gave them at training (see Scorer.self_check).
    reference: dict[str, Any] | None = None
    # Earlier thresholds of this network, oldest first (``sensord calibrate`` appends), for the audit trail.
    threshold_history: tuple[dict[str, Any], ...] = ()
    # The sampling period of the training data (median step), the default clock of live assembly;
    # None in bundles from before it was recorded.
    sample_period_seconds: float | None = None
    # Slow channels the model sees against their own baseline (sensord.drift); None: every channel as read.
    drift: DriftSpec | None = None

    @property
    def tflite_path(self) -> Path:
        return self.path / TFLITE_FILE

    @property
    def keras_path(self) -> Path:
        return self.path / KERAS_FILE

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "created": self.created,
            "channels": list(self.channels),
            "window": {"length": self.window_length, "hop": self.window_hop,
                       **({"drift": self.drift.to_dict(self.channels)} if self.drift is not None else {})},
            "scoring": {"error": self.error_metric},
            "scaler": self.scaler.to_dict(),
            "threshold": self.threshold.to_dict(),
            "model": self.model,
            "training": self.training,
            "tflite_sha256": self.tflite_sha256,
            **({"reference": self.reference} if self.reference is not None else {}),
            **({"threshold_history": list(self.threshold_history)} if self.threshold_history else {}),
            **({"sample_period_seconds": self.sample_period_seconds}
               if self.sample_period_seconds is not None else {}),
        }

    def with_threshold(self, threshold: ThresholdRecord) -> ModelBundle:
        return dataclasses.replace(self, threshold=threshold)

    def with_reference(self, windows: Any, errors: Any) -> ModelBundle:
        ref = {"windows": [[[float(v) for v in row] for row in w] for w in windows],
               "errors": [float(e) for e in errors]}
        return dataclasses.replace(self, reference=ref)

    def write_json(self) -> None:
        """Write ``bundle.json`` atomically, so a reader never sees half a file."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".bundle.", dir=self.path)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # readable like the model files next to it
        os.replace(tmp, self.path / BUNDLE_JSON)

    @classmethod
    def load(cls, path: str | Path, expect_channels: Sequence[str] | None = None,
             channels_key: str = "data.channels") -> ModelBundle:
        """Load and check every part; ``expect_channels`` (the config's ``data.channels``, or the
        ``channels_key`` named) must match if given.

        The window length is checked where the windows are made (:func:`sensord.windows.window_spec`).
        """
        p = Path(path)
        if not p.is_dir():
            raise BundleError(f"{p}: model bundle directory not found")
        meta_path = p / BUNDLE_JSON
        if not meta_path.is_file():
            raise BundleError(f"{meta_path}: missing (not a model bundle? run 'sensord train' first)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{meta_path}: not valid JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise BundleError(f"{meta_path}: must be a JSON object")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"{meta_path}: unknown format_version {version!r} "
                              f"(this sensord reads version {FORMAT_VERSION})")

        def need(key: str, typ: type | tuple[type, ...]) -> Any:
            v = meta.get(key)
            if not isinstance(v, typ) or isinstance(v, bool):
                raise BundleError(f"{meta_path}: key {key!r} missing or not a {getattr(typ, '__name__', typ)}")
            return v

        channels = need("channels", list)
        if not channels or not all(isinstance(c, str) and c for c in channels) or len(set(channels)) != len(channels):
            raise BundleError(f"{meta_path}: 'channels' must be a non-empty list of distinct names")
        window = need("window", dict)
        length, hop = window.get("length"), window.get("hop", 1)
        if not isinstance(length, int) or length < 2 or not isinstance(hop, int) or not 1 <= hop <= length:
            raise BundleError(f"{meta_path}: 'window' must have integer length >= 2 and 1 <= hop <= length, "
                              f"got {window}")
        try:
            drift = DriftSpec.from_dict(window["drift"], channels) if "drift" in window else None
        except ValueError as exc:
            raise BundleError(f"{meta_path}: {exc}") from None
        metric = need("scoring", dict).get("error", "mse")
        if metric not in ("mse", "mae"):
            raise BundleError(f"{meta_path}: scoring.error must be 'mse' or 'mae', got {metric!r}")
        try:
            scaler = Scaler.from_dict(need("scaler", dict), len(channels))
            threshold = ThresholdRecord.from_dict(need("threshold", dict))
        except ValueError as exc:
            raise BundleError(f"{meta_path}: {exc}") from None
        tflite = p / TFLITE_FILE
        if not tflite.is_file():
            raise BundleError(f"{tflite}: missing (the bundle has no TFLite model)")
        expected_sha = need("tflite_sha256", str)
        actual = sha256_of(tflite)
        if actual != expected_sha:
            raise BundleError(f"{tflite}: checksum mismatch (bundle.json says {expected_sha[:12]}…, "
                              f"file is {actual[:12]}…): the model file was changed or copied incompletely")
        if expect_channels is not None and len(expect_channels) and list(expect_channels) != channels:
            raise BundleError(f"{p}: channels {channels} do not match the configured {channels_key} "
                              f"{list(expect_channels)}")
        for key in ("model", "training"):
            if not isinstance(meta.get(key, {}), dict):
                raise BundleError(f"{meta_path}: {key!r} must be a JSON object, got {type(meta[key]).__name__}")
        reference = meta.get("reference")
        if reference is not None and not _valid_reference(reference, length, len(channels)):
            raise BundleError(f"{meta_path}: 'reference' must hold 'windows' of {length}x{len(channels)} finite "
                              "numbers and one finite 'errors' value per window")
        history = meta.get("threshold_history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise BundleError(f"{meta_path}: 'threshold_history' must be a list of JSON objects")
        period = meta.get("sample_period_seconds")
        if period is not None and not (_finite(period) and period > 0):
            raise BundleError(f"{meta_path}: 'sample_period_seconds' must be a positive number, got {period!r}")
        return cls(p, str(meta.get("model_id", p.name)), tuple(channels), length, hop, metric, scaler,
                   threshold, dict(meta.get("model", {})), dict(meta.get("training", {})),
                   str(meta.get("created", "")), expected_sha, reference, tuple(history),
                   None if period is None else float(period), drift)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _valid_reference(ref: Any, length: int, channels: int) -> bool:
    if not isinstance(ref, dict):
        return False
    windows, errors = ref.get("windows"), ref.get("errors")
    if not isinstance(windows, list) or not isinstance(errors, list) or not windows or len(windows) != len(errors):
        return False
    return all(_finite(e) for e in errors) and all(
        isinstance(w, list) and len(w) == length
        and all(isinstance(row, list) and len(row) == channels and all(_finite(v) for v in row) for row in w)
        for w in windows)
