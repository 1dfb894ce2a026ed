"""Scoring batches of windows with the bundle's TFLite model, without TensorFlow.

The edge box only serves, so the scorer runs the flatbuffer through the LiteRT
interpreter (``ai_edge_litert``), falling back to ``tensorflow.lite`` only
where LiteRT cannot be installed. One interpreter call scores many windows;
interpreters are cached per padded batch size so a steady stream never
re-allocates tensors.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bundle import ModelBundle

log = logging.getLogger(__name__)


def _interpreter_class() -> Callable[..., Any]:
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter
    except ImportError:  # pragma: no cover - only where LiteRT has no wheel
        log.warning("ai_edge_litert not available; falling back to tensorflow.lite")
        from .tflib import import_tensorflow
        _, tf = import_tensorflow()
        return tf.lite.Interpreter


# LiteRT announces its CPU delegate on file descriptor 2, once per process, when the first interpreter allocates
# its tensors (TFLite's minimal logger, INFO). Nothing turns it off from outside: TF_CPP_MIN_LOG_LEVEL is not read
# by that logger and its severity switch is not exported from the wheel's libraries. So the first interpreter of
# a process is set up with fd 2 captured, and what was captured is written back without this one line: any other
# output (a real LiteRT error, a log line of another thread) still reaches stderr, only a moment later.
LITERT_BANNER = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
_banner_pending = True
_banner_lock = threading.Lock()


@contextmanager
def stderr_without(line: bytes) -> Iterator[None]:
    """Run the block with file descriptor 2 (C++ libraries write there, not to ``sys.stderr``) captured in a
    temporary file; then restore it and write back everything captured except lines equal to ``line``."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                capture.seek(0)
                kept = b"".join(ln for ln in capture.read().splitlines(keepends=True)
                                if ln.rstrip(b"\r\n") != line)
                while kept:
                    kept = kept[os.write(2, kept):]
    finally:
        os.close(saved)


@contextmanager
def _quiet_first_interpreter() -> Iterator[None]:
    """Around an interpreter's set-up: filters LiteRT's banner until an interpreter has been set up once."""
    global _banner_pending
    if not _banner_pending:
        yield
        return
    with _banner_lock, stderr_without(LITERT_BANNER):  # one thread at a time redirects fd 2
        yield
        _banner_pending = False  # set up once (the banner is printed then, or never): fd 2 is left alone now


# How far (relative to max(1, error)) a reference window's error may drift from the one recorded at training.
REFERENCE_TOLERANCE = 1e-4

# The error a window gets when its error is not finite (inf/NaN from an overflow): maximally anomalous.
MAX_ERROR = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class ScoredBatch:
    errors: np.ndarray  # (B,) float64 per-window error
    channel_shares: np.ndarray  # (B, C) share of each channel in the error, rows sum to 1


def reconstruction_errors(scaled: np.ndarray, reconstructed: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-window error and per-channel share, from scaled windows and their reconstructions.

    The error is the mean over all (time, channel) cells, so it does not grow
    with the window length; the per-channel shares tell an operator which
    sensor the deviation comes from.

    An ensemble's reconstructions come stacked as (B, K, length, channels); the
    error is then the mean of the K members' errors (mean over cells commutes
    with the mean over members).
    """
    x = scaled.astype(np.float64)
    r = reconstructed.astype(np.float64)
    diff = r - (x[:, None] if r.ndim == 4 else x)
    cell = diff * diff if metric == "mse" else np.abs(diff)
    if cell.ndim == 4:
        cell = cell.mean(axis=1)
    per_channel = cell.mean(axis=1)  # (B, C)
    errors = per_channel.mean(axis=1)
    total = per_channel.sum(axis=1, keepdims=True)
    shares = np.divide(per_channel, total, out=np.full_like(per_channel, 1.0 / per_channel.shape[1]),
                       where=total > 0)
    return errors, shares


def top_channels(channels: tuple[str, ...], shares: np.ndarray, k: int) -> tuple[tuple[str, float], ...]:
    """The ``k`` channels with the largest share of one window's error."""
    order = np.argsort(shares)[::-1][:k]
    return tuple((channels[j], round(float(shares[j]), 4)) for j in order)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Scorer:
    """Reconstruction error of raw (unscaled) windows, through the bundle's flatbuffer."""

    def __init__(self, bundle: ModelBundle, max_batch: int = 256, num_threads: int | None = 1) -> None:
        self.bundle = bundle
        self.max_batch = _bucket(max(1, max_batch))
        self._content = bundle.tflite_path.read_bytes()
        self._make = _interpreter_class()
        self._num_threads = num_threads
        self._interpreters: dict[int, tuple[Any, int, int]] = {}
        it = self._interpreter(1)[0]  # fail now, not on the first window, if the model does not load
        shape = it.get_output_details()[0]["shape"]
        # How many reconstructions the model gives per window (1, or an ensemble's K).
        self.members = int(shape[1]) if len(shape) == 4 else 1
        try:  # LiteRT prepares some operators only on the first invoke ("Node number 4 failed to prepare")
            self.reconstruct(np.zeros((1, bundle.window_length, len(bundle.channels)), np.float32))
        except (RuntimeError, ValueError) as exc:
            from .bundle import BundleError
            raise BundleError(f"{bundle.tflite_path}: the model does not run: {_one_line(exc)}") from None

    @property
    def channels(self) -> tuple[str, ...]:
        return self.bundle.channels

    @property
    def threshold(self) -> float:
        return self.bundle.threshold.value

    def _interpreter(self, batch: int) -> tuple[Any, int, int]:
        hit = self._interpreters.get(batch)
        if hit is None:
            try:
                with _quiet_first_interpreter():
                    it = self._make(model_content=self._content, num_threads=self._num_threads)
                    inp = it.get_input_details()[0]
                    w, c = self.bundle.window_length, len(self.bundle.channels)
                    if list(inp["shape"][1:]) != [w, c]:
                        raise ValueError(f"model input shape {list(inp['shape'])} does not match window "
                                         f"({w}, {c}) in bundle.json")
                    it.resize_tensor_input(inp["index"], [batch, w, c])
                    it.allocate_tensors()  # where LiteRT prints its banner
                shape = list(it.get_output_details()[0]["shape"][1:])
                if shape[-2:] != [w, c] or len(shape) not in (2, 3):
                    raise ValueError(f"model output shape {[batch] + shape} is neither a reconstruction "
                                     f"({batch}, {w}, {c}) nor an ensemble's ({batch}, members, {w}, {c})")
            except (ValueError, RuntimeError) as exc:
                from .bundle import BundleError
                raise BundleError(f"{self.bundle.tflite_path}: cannot load model: {_one_line(exc)}") from None
            hit = (it, inp["index"], it.get_output_details()[0]["index"])
            self._interpreters[batch] = hit
        return hit

    def reconstruct(self, scaled: np.ndarray) -> np.ndarray:
        """Run the network on already-scaled windows, in padded power-of-two batches.

        Returns (B, length, channels), or (B, K, length, channels) for an ensemble.
        """
        k = self.members
        shape = scaled.shape if k == 1 else (scaled.shape[0], k) + scaled.shape[1:]
        out = np.empty(shape, dtype=np.float32)
        n = len(scaled)
        i = 0
        while i < n:
            chunk = scaled[i:i + self.max_batch]
            size = _bucket(len(chunk))
            if size != len(chunk):
                chunk = np.concatenate([chunk, np.zeros((size - len(chunk),) + chunk.shape[1:], np.float32)])
            it, inp, outp = self._interpreter(size)
            it.set_tensor(inp, np.ascontiguousarray(chunk, dtype=np.float32))
            it.invoke()
            take = min(self.max_batch, n - i)
            out[i:i + take] = it.get_tensor(outp)[:take]
            i += take
        return out

    def score(self, windows: np.ndarray, member: int | None = None) -> ScoredBatch:
        """Score raw windows of shape (B, length, channels).

        ``member`` scores with one member of an ensemble instead of the mean of all (training uses it for
        the out-of-fold errors of a cross-fitted ensemble, so they come from the served flatbuffer too).
        """
        if member is not None and not 0 <= member < self.members:
            raise ValueError(f"member must be in [0, {self.members}), got {member}")
        w = np.asarray(windows, dtype=np.float32)
        if w.ndim != 3 or w.shape[1:] != (self.bundle.window_length, len(self.bundle.channels)):
            raise ValueError(f"windows must have shape (B, {self.bundle.window_length}, "
                             f"{len(self.bundle.channels)}), got {w.shape}")
        if len(w) == 0:
            return ScoredBatch(np.zeros(0), np.zeros((0, w.shape[2])))
        with np.errstate(over="ignore", invalid="ignore"):  # handled below
            scaled = self.bundle.scaler.transform(w)
            rec = self.reconstruct(scaled)
            if member is not None and self.members > 1:
                rec = rec[:, member]
            errors, shares = reconstruction_errors(scaled, rec, self.bundle.error_metric)
        bad = ~np.isfinite(errors)
        if bad.any():  # an overflow anywhere in the window: as anomalous as it gets, never NaN downstream
            errors[bad] = MAX_ERROR
            shares[bad] = 1.0 / shares.shape[1]
        return ScoredBatch(errors, shares)

    def self_check(self, tolerance: float = REFERENCE_TOLERANCE) -> bool:
        """Score the bundle's reference windows and compare with the errors recorded at training.

        Raises BundleError when one differs by more than ``tolerance`` (relative to max(1, error)): the
        flatbuffer loads but no longer computes what was trained and calibrated (a corrupted weight with a
        recomputed checksum, a wrong model copied into the bundle). Returns False for a bundle without
        reference windows (made by an older sensord), True when checked.
        """
        from .bundle import BundleError
        ref = self.bundle.reference
        if ref is None:
            return False
        expected = np.asarray(ref["errors"], dtype=np.float64)
        got = self.score(np.asarray(ref["windows"], dtype=np.float32)).errors
        diff = np.abs(got - expected) / np.maximum(1.0, np.abs(expected))
        if not np.all(diff <= tolerance):
            i = int(np.argmax(np.where(np.isfinite(diff), diff, np.inf)))
            raise BundleError(f"{self.bundle.tflite_path}: the model does not reproduce its reference windows "
                              f"(error {got[i]:.6g}, recorded at training {expected[i]:.6g}, tolerance {tolerance:g}): "
                              "the flatbuffer was changed after training")
        return True

    def top_channels(self, shares: np.ndarray, k: int) -> tuple[tuple[str, float], ...]:
        return top_channels(self.bundle.channels, shares, k)
