"""Training: healthy CSV -> windows -> scaler -> autoencoder -> TFLite -> threshold -> bundle.

The split is chronological: the last ``validation_fraction`` of the healthy
rows is held back, never shuffled into training, and the threshold is fitted
on the errors the *serving* scorer (TFLite) gives on those held-back windows,
so the threshold is calibrated on exactly the numbers the daemon will compare
with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import logging
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .bundle import KERAS_FILE, TFLITE_FILE, ModelBundle, sha256_of
from .config import SensordConfig
from .dataio import Series, sampling_period
from .drift import DriftSpec, fit_drift
from .errors import DataError
from .scaling import Scaler
from .scorer import Scorer, reconstruction_errors
from .tflib import import_tensorflow
from .threshold import ThresholdCalibrator, ThresholdRecord
from .windows import WindowedSeries, WindowSpec, window_spec, windowize

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, int, dict[str, float]], None]


REFERENCE_WINDOWS = 4


class TrainingError(DataError):
    """Training cannot proceed with this data/config; the message says why (exit 65, like bad data)."""


@dataclass(frozen=True)
class SplitWindows:
    train: np.ndarray
    validation: np.ndarray
    train_rows: int
    validation_rows: int
    train_values: np.ndarray  # the training part's readings (rows, channels): what the scaler is fitted on


def _spec(cfg: SensordConfig, drift: DriftSpec | None) -> WindowSpec:
    """Every window of the healthy data (hop 1), drift removed as the served model will see it."""
    return dataclasses.replace(window_spec(cfg.window, hop=1), drift=drift)


def training_rows(n: int, cfg: SensordConfig) -> int:
    """How many of a series' ``n`` healthy rows are trained on; the last ``validation_fraction`` are held back."""
    return n - int(math.ceil(n * cfg.training.validation_fraction))


def split_windows(series: Series | Sequence[Series], cfg: SensordConfig,
                  drift: DriftSpec | None = None) -> SplitWindows:
    """Chronological split, then windows of each part through the shared WindowBuffer.

    Training windows use hop 1 (every reading starts a new window) to make the
    most of a short healthy period; only windows wholly inside one part are kept,
    so no validation window contains a training reading. The series is streamed
    through one buffer, so the drift baselines (``drift``) run on across the split
    as they would in the daemon.

    Several series (a group of machines trained as one model) are each split
    the same way and their windows pooled: no window spans two recordings, and
    every machine has its share of the validation windows the threshold is
    fitted on.
    """
    if not isinstance(series, Series):
        parts = [split_windows(s, cfg, drift) for s in series]
        if not parts:
            raise TrainingError("no data to train on")
        return SplitWindows(np.concatenate([p.train for p in parts]), np.concatenate([p.validation for p in parts]),
                            sum(p.train_rows for p in parts), sum(p.validation_rows for p in parts),
                            np.concatenate([p.train_values for p in parts]))
    n = len(series)
    length = cfg.window.length
    n_train = training_rows(n, cfg)
    n_val = n - n_train
    if n_train < length + 1 or n_val < length:
        raise TrainingError(
            f"{series.path or 'data'}: {n} rows are too few for window.length {length} with "
            f"validation_fraction {cfg.training.validation_fraction}: need at least {length + 1} training "
            f"and {length} validation rows (have {n_train} and {n_val})")
    windows = windowize(series.timestamps, series.values, _spec(cfg, drift))
    train, val = windows.within(0, n_train), windows.within(n_train, n)
    if len(train) == 0 or len(val) == 0:
        raise TrainingError(f"{series.path or 'data'}: no complete windows in the "
                            f"{'training' if len(train) == 0 else 'validation'} part "
                            f"(gaps longer than window.max_gap_seconds={cfg.window.max_gap_seconds}?)")
    return SplitWindows(train, val, n_train, n_val, series.values[:n_train])


@dataclass(frozen=True)
class Fold:
    """Member k of a cross-fitted ensemble: the windows it is fitted on, early-stopped on, and scored on.

    ``held_out`` are the windows of block k; the member never sees a row of them. ``*_ranges`` are the
    row ranges [start, end) each part was windowed from, per series of the group (for the record and the
    tests), each range windowed on its own so no window spans two ranges.
    """

    train: np.ndarray
    stop: np.ndarray
    held_out: np.ndarray
    train_ranges: tuple[tuple[tuple[int, int], ...], ...]
    stop_ranges: tuple[tuple[tuple[int, int], ...], ...]
    held_out_ranges: tuple[tuple[int, int], ...]


def _tail(runs: list[tuple[int, int]], rows: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Split chronological row runs into (head, last ``rows`` rows), the tail possibly spanning runs."""
    head, tail = list(runs), list[tuple[int, int]]()
    while rows > 0 and head:
        a, b = head.pop()
        take = min(rows, b - a)
        tail.insert(0, (b - take, b))
        if take < b - a:
            head.append((a, b - take))
        rows -= take
    return head, tail


def _windows_of(windows: WindowedSeries, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    parts = [windows.within(a, b) for a, b in ranges]
    return np.concatenate(parts) if parts else windows.values[:0]


def cross_fit_folds(series: Series | Sequence[Series], cfg: SensordConfig,
                    drift: DriftSpec | None = None) -> list[Fold]:
    """``training.cross_fit`` = K contiguous blocks of the healthy rows (of each series of a group).

    Member k is fitted on the other blocks and scored on block k, so every healthy window gets an error from
    a member that never saw it: K times the threshold evidence of a chronological split, and none of it the
    set the member was early-stopped on. The member's early stopping uses the chronological tail
    (``validation_fraction``) of its own training rows instead: stopping on block k would make its errors
    there optimistic again, which is the bias cross-fitting removes.
    """
    group = [series] if isinstance(series, Series) else list(series)
    if not group:
        raise TrainingError("no data to train on")
    tc = cfg.training
    k, length = tc.cross_fit, cfg.window.length
    if k < 2:
        raise ValueError("cross_fit_folds needs training.cross_fit >= 2")
    per_member: list[list[tuple[np.ndarray, np.ndarray, np.ndarray, Any, Any, tuple[int, int]]]] = [[] for _ in
                                                                                                    range(k)]
    for s in group:
        n = len(s)
        name = s.path or "data"
        windows = windowize(s.timestamps, s.values, _spec(cfg, drift))
        edges = [round(i * n / k) for i in range(k + 1)]
        if min(b - a for a, b in itertools.pairwise(edges)) < length:
            raise TrainingError(f"{name}: training.cross_fit {k}: {n} rows make blocks of {n // k} rows, shorter "
                                f"than window.length {length}: use at most {n // length} blocks")
        for m in range(k):
            held = (edges[m], edges[m + 1])
            runs = [r for r in ((0, held[0]), (held[1], n)) if r[1] > r[0]]
            own = n - (held[1] - held[0])
            tail = int(math.ceil(own * tc.validation_fraction)) if tc.cross_fit_early_stop else 0
            fit_runs, stop_runs = _tail(runs, tail)
            train = _windows_of(windows, fit_runs)
            stop = _windows_of(windows, stop_runs)
            out = _windows_of(windows, [held])
            if len(train) == 0 or (len(stop) == 0 and tc.cross_fit_early_stop) or len(out) == 0:
                what = "training" if len(train) == 0 else "early-stopping" if len(stop) == 0 else "held-out"
                raise TrainingError(f"{name}: training.cross_fit {k}: member {m} has no complete window in its "
                                    f"{what} rows (fitted on {fit_runs}, stopped on {stop_runs}, held out {held}; "
                                    f"window.length {length}, validation_fraction {tc.validation_fraction}): "
                                    "use fewer blocks or more healthy data")
            per_member[m].append((train, stop, out, tuple(fit_runs), tuple(stop_runs), held))
    return [Fold(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                 np.concatenate([p[2] for p in parts]), tuple(p[3] for p in parts), tuple(p[4] for p in parts),
                 tuple(p[5] for p in parts)) for parts in per_member]


def _versions() -> dict[str, str]:
    keras, tf = import_tensorflow()
    return {"sensord": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _fit_network(keras: Any, cfg: SensordConfig, x_train: np.ndarray, x_val: np.ndarray,
                 on_epoch: EpochCallback | None, model: Any = None) -> tuple[Any, dict[str, list[float]], int]:
    """Adam on the reconstruction loss, early stopping with the best weights restored.

    An ensemble is one model with K stacked outputs trained against K copies of
    the input: the loss is the mean of the members' losses, so each member gets
    its own gradient and the whole ensemble costs one ``fit``. ``model``, when
    given, is trained instead of a new one (one member of a cross-fitted ensemble).
    """
    from .autoencoder import build_autoencoder

    tc = cfg.training
    k = tc.ensemble if model is None else 1
    if model is None:
        model = build_autoencoder(cfg.model, cfg.window.length, x_train.shape[2], tc.scaler, tc.noise_std,
                                  members=k)
    model.compile(optimizer=keras.optimizers.Adam(tc.learning_rate), loss=tc.loss)

    class _Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = {k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}
            if on_epoch is not None:
                on_epoch(epoch + 1, tc.epochs, logs)
            else:
                log.debug("epoch %d/%d loss=%.6g val_loss=%.6g", epoch + 1, tc.epochs,
                          logs.get("loss", float("nan")), logs.get("val_loss", float("nan")))

    stopping = len(x_val) > 0  # a cross-fitted member without a stopping tail trains for `epochs`
    callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=tc.patience,
                                               restore_best_weights=True)] if stopping else []
    if tc.reduce_lr_patience > 0 and stopping:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5,
                                                           patience=tc.reduce_lr_patience,
                                                           min_lr=tc.learning_rate / 64))
    callbacks.append(_Progress())

    def target(x: np.ndarray) -> np.ndarray:
        return x if k == 1 else np.repeat(x[:, None], k, axis=1)

    history = model.fit(x_train, target(x_train), validation_data=(x_val, target(x_val)) if stopping else None,
                        epochs=tc.epochs,
                        batch_size=tc.batch_size, shuffle=tc.shuffle, verbose=0, callbacks=callbacks)
    losses = {key: [round(float(v), 8) for v in vals] for key, vals in history.history.items()
              if key in ("loss", "val_loss")}
    best_epoch = int(np.argmin(losses["val_loss"])) + 1 if losses.get("val_loss") else len(losses.get("loss", []))
    return model, losses, best_epoch


def _fit_pca(keras: Any, cfg: SensordConfig, x_train: np.ndarray,
             x_val: np.ndarray) -> tuple[Any, dict[str, list[float]], int]:
    """Closed-form PCA of the flattened scaled training windows, as a linear Keras autoencoder."""
    from .autoencoder import build_pca_autoencoder

    n, length, channels = x_train.shape
    flat = x_train.reshape(n, -1).astype(np.float64)
    mean = flat.mean(axis=0)
    _, sing, vt = np.linalg.svd(flat - mean, full_matrices=False)
    var = sing ** 2
    explained = np.cumsum(var) / var.sum() if var.sum() > 0 else np.ones_like(var)
    k = min(len(explained), int(np.searchsorted(explained, cfg.model.pca_variance)) + 1)
    model = build_pca_autoencoder(vt[:k], mean, length, channels)

    def loss(x: np.ndarray) -> float:
        rec = np.asarray(model(x.astype(np.float32), training=False))
        d = rec - x
        return float(np.mean(d * d) if cfg.training.loss == "mse" else np.mean(np.abs(d)))

    log.info("pca: %d of %d components explain %.1f %% of the training windows' variance",
             k, len(explained), 100 * float(explained[k - 1]))
    return model, {"loss": [round(loss(x_train), 8)], "val_loss": [round(loss(x_val), 8)]}, 1


def model_drift(group: Sequence[Series], cfg: SensordConfig) -> DriftSpec | None:
    """The channels the model sees against their own baseline (``window.drift_channels``), with their
    levels over the rows the scaler is fitted on: each series' training part (every row when cross-fitted)."""
    w, tc = cfg.window, cfg.training
    rows = [g.values if tc.cross_fit >= 2 else g.values[:training_rows(len(g), cfg)] for g in group]
    drift = fit_drift(rows, group[0].channels, w.drift_channels, w.drift_seconds, w.drift_keep)
    if drift is not None:
        log.info("drift removed from %s (baseline time constant %gs, %g of the slow change kept)",
                 ", ".join(group[0].channels[i] for i in drift.index), drift.seconds, drift.keep)
    return drift


@dataclass(frozen=True)
class Trained:
    """A written bundle and the healthy errors its threshold was fitted on (served scores of the validation
    windows, or the out-of-fold errors of a cross-fitted ensemble): what a benchmark re-decides thresholds on."""

    bundle: ModelBundle
    threshold_errors: np.ndarray


def train_bundle(data: Series | Sequence[Series], cfg: SensordConfig, out_dir: str | Path,
                 on_epoch: EpochCallback | None = None) -> ModelBundle:
    """Train on a healthy series (or several with the same channels: one model for a group of machines)
    and write a complete, loadable bundle to ``out_dir``."""
    return train(data, cfg, out_dir, on_epoch).bundle


def train(data: Series | Sequence[Series], cfg: SensordConfig, out_dir: str | Path,
          on_epoch: EpochCallback | None = None) -> Trained:
    """:func:`train_bundle`, also returning the threshold's evidence."""
    group = [data] if isinstance(data, Series) else list(data)
    if not group:
        raise TrainingError("no data to train on")
    for other in group[1:]:
        if other.channels != group[0].channels:
            raise TrainingError(f"{other.path or 'data'}: channels {list(other.channels)} differ from "
                                f"{group[0].path or 'the first file'}'s {list(group[0].channels)}: one model "
                                "needs the same channels from every machine")
    series = group[0]
    source = ", ".join(s.path for s in group) if len(group) > 1 else series.path
    keras, tf = import_tensorflow()
    t0 = time.monotonic()
    out = Path(out_dir)
    tc = cfg.training
    folds: list[Fold] = []
    oof_errors: np.ndarray | None = None  # cross_fit_serve refit: the members' out-of-fold errors
    drift = model_drift(group, cfg)
    training_meta: dict[str, Any] = {"rows": sum(len(g) for g in group)}
    if tc.cross_fit >= 2:
        from .autoencoder import build_autoencoder, member_model

        folds = cross_fit_folds(group if len(group) > 1 else series, cfg, drift)
        # One scaler for the K members (they are served as one graph), fitted on every healthy row: a
        # held-out block leaks only its share of each channel's mean and spread into it, not its shapes.
        scaler = Scaler.fit(np.concatenate([g.values for g in group]), tc.scaler, tc.min_relative_scale)
        log.info("training %s autoencoder cross-fitted over %d blocks: %s training windows per member, "
                 "%d out-of-fold windows, %d channels, window %d", cfg.model.kind, tc.cross_fit,
                 "/".join(str(len(f.train)) for f in folds), sum(len(f.held_out) for f in folds),
                 len(series.channels), cfg.window.length)
        keras.utils.set_random_seed(tc.seed)
        tf.config.experimental.enable_op_determinism()
        model = build_autoencoder(cfg.model, cfg.window.length, len(series.channels), tc.scaler, 0.0,
                                  members=tc.cross_fit)
        member_meta: list[dict[str, Any]] = []
        for m, fold in enumerate(folds):
            _, losses, best = _fit_network(keras, cfg, scaler.transform(fold.train), scaler.transform(fold.stop),
                                           on_epoch, model=member_model(model, m, tc.noise_std))
            member_meta.append({"held_out_rows": [list(r) for r in fold.held_out_ranges],
                                "train_windows": len(fold.train), "stop_windows": len(fold.stop),
                                "held_out_windows": len(fold.held_out), "epochs_run": len(losses.get("loss", [])),
                                "best_epoch": best, "loss_history": losses})
            log.info("member %d/%d: held out rows %s, %d epochs (best %d)", m + 1, tc.cross_fit,
                     fold.held_out_ranges, member_meta[-1]["epochs_run"], best)
        members = tc.cross_fit
        if tc.cross_fit_serve == "refit":
            # Each block's errors from the member that never saw it (Keras; within 1e-4 of its flatbuffer),
            # then the served network: one model on every healthy window, trained for `epochs`.
            oof_errors = np.concatenate([
                reconstruction_errors(x := scaler.transform(f.held_out),
                                      member_model(model, m).predict(x, batch_size=256, verbose=0),
                                      cfg.scoring.error)[0] for m, f in enumerate(folds)])
            every = np.concatenate([windowize(g.timestamps, g.values, _spec(cfg, drift)).values for g in group])
            keras.utils.set_random_seed(tc.seed + 1)
            model, refit_losses, _ = _fit_network(keras, cfg, scaler.transform(every), every[:0], on_epoch)
            members = 1
            log.info("refit: one network on all %d healthy windows, %d epochs", len(every),
                     len(refit_losses["loss"]))
        training_meta.update({
            "train_rows": training_meta["rows"], "validation_rows": training_meta["rows"],
            "train_windows": sum(len(f.train) for f in folds),
            "validation_windows": sum(len(f.held_out) for f in folds),
            "epochs_run": max(mm["epochs_run"] for mm in member_meta),
            "best_epoch": max(mm["best_epoch"] for mm in member_meta),
            "threshold_evidence": "out_of_fold",
            "cross_fit": {"blocks": tc.cross_fit, "members": member_meta, "served": tc.cross_fit_serve}})
    else:
        split = split_windows(group if len(group) > 1 else series, cfg, drift)
        scaler = Scaler.fit(split.train_values, tc.scaler, tc.min_relative_scale)
        x_train = scaler.transform(split.train)
        x_val = scaler.transform(split.validation)
        log.info("training %s autoencoder: %d training windows, %d validation windows, %d channels, window %d",
                 cfg.model.kind, len(x_train), len(x_val), len(series.channels), cfg.window.length)

        keras.utils.set_random_seed(tc.seed)
        tf.config.experimental.enable_op_determinism()
        if cfg.model.kind == "pca":
            model, losses, best_epoch = _fit_pca(keras, cfg, x_train, x_val)
        else:
            model, losses, best_epoch = _fit_network(keras, cfg, x_train, x_val, on_epoch)
        members = tc.ensemble if cfg.model.kind != "pca" else 1
        training_meta.update({
            "train_rows": split.train_rows, "validation_rows": split.validation_rows,
            "train_windows": len(x_train), "validation_windows": len(x_val),
            "epochs_run": len(losses.get("loss", [])), "best_epoch": best_epoch})

    if out.exists() and not out.is_dir():
        raise TrainingError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / KERAS_FILE)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its export path
        flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    (out / TFLITE_FILE).write_bytes(flatbuffer)
    sha = sha256_of(out / TFLITE_FILE)

    training_meta.update({"members": members, "loss": tc.loss})
    if not folds:
        training_meta["loss_history"] = losses
    training_meta.update({"source": source, "config": {"training": asdict(tc), "window": asdict(cfg.window)},
                          "versions": _versions()})
    bundle = ModelBundle(
        path=out, model_id=f"{out.name}-{sha[:8]}", channels=series.channels,
        window_length=cfg.window.length, window_hop=cfg.window.hop, error_metric=cfg.scoring.error,
        scaler=scaler, threshold=ThresholdRecord(cfg.threshold.method, {}, 1.0),
        model=asdict(cfg.model), training=training_meta,
        created=datetime.now(UTC).isoformat(timespec="seconds"), tflite_sha256=sha,
        sample_period_seconds=sampling_period(group), drift=drift,
    )
    scorer = Scorer(bundle)
    if folds:
        # Each block's windows scored by the one member that never saw them, through the served flatbuffer
        # (refit: the members are not served, so their Keras errors from above).
        evidence_windows = np.concatenate([f.held_out for f in folds])
        val_errors = oof_errors if oof_errors is not None else np.concatenate(
            [scorer.score(f.held_out, member=m).errors for m, f in enumerate(folds)])
        what = "out-of-fold"
    else:
        evidence_windows = split.validation
        val_errors = scorer.score(split.validation).errors
        what = "validation"
    try:
        threshold = ThresholdCalibrator(cfg.threshold).fit(val_errors)
    except ValueError as exc:  # no finite errors (training diverged), too few for a tail fit
        raise TrainingError(f"{source or 'data'}: cannot fit threshold.method {cfg.threshold.method} on "
                            f"{len(val_errors)} {what} windows: {exc}") from None
    training_meta["duration_seconds"] = round(time.monotonic() - t0, 3)
    bundle = bundle.with_threshold(threshold)
    # Reference windows: the daemon re-scores them at every load and refuses a model that drifted. Their
    # errors are what the served model gives (for a cross-fitted ensemble: the mean of all members, not the
    # out-of-fold member's error the threshold saw).
    ref = np.unique(np.linspace(0, len(evidence_windows) - 1, num=min(REFERENCE_WINDOWS, len(evidence_windows)))
                    .astype(int))
    ref_errors = scorer.score(evidence_windows[ref]).errors if folds else val_errors[ref]
    bundle = bundle.with_reference(evidence_windows[ref], ref_errors)
    bundle.write_json()
    log.info("bundle written to %s: model_id=%s threshold=%.6g (%s) epochs=%d best=%d in %.1fs", out,
             bundle.model_id, threshold.value, threshold.method, training_meta["epochs_run"],
             training_meta["best_epoch"], training_meta["duration_seconds"])
    return Trained(bundle, val_errors)
