"""Diagnostic pictures of a trained bundle on a labelled series, written as PNG files.

What people look at when judging an autoencoder detector:

* ``reconstruction.png`` -- input vs reconstruction of a typical normal window
  and of the most anomalous window, one panel per channel;
* ``error_histogram.png`` -- reconstruction errors of normal and anomalous
  windows with the alert threshold;
* ``latent.png`` -- the bottleneck ("latent" layer) of the Keras model,
  projected to 2-D with PCA when it is not 2-D already.

Windows are cut with the daemon's own window code (:func:`sensord.windows.windowize`)
and scored with the serving :class:`~sensord.scorer.Scorer`, so the errors are
the numbers the daemon compares with the threshold. A window is labelled by the
row it ends at, as in :mod:`sensord.evaluation`.

matplotlib (Agg backend) and Keras are imported inside the functions, so
importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .bundle import BundleError
from .errors import DataError
from .evaluation import window_counts

if TYPE_CHECKING:
    from .config import SensordConfig

RECONSTRUCTION_PNG = "reconstruction.png"
HISTOGRAM_PNG = "error_histogram.png"
LATENT_PNG = "latent.png"
LATENT_LAYER = "latent"

_NORMAL_COLOR = "tab:blue"
_ANOMALY_COLOR = "tab:red"
_THRESHOLD_COLOR = "black"


@dataclass(frozen=True)
class _Scored:
    scaled: np.ndarray  # (B, length, channels) scaled input windows
    reconstructed: np.ndarray  # (B, length, channels) scaled reconstructions
    errors: np.ndarray  # (B,)
    labels: np.ndarray  # (B,) bool, label of each window's end row
    end_times: np.ndarray  # (B,) unix seconds of each window's last reading
    end_rows: np.ndarray  # (B,) row index each window ends at


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _utc(ts: float) -> str:
    from datetime import UTC, datetime
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S")


def make_plots(bundle_dir: Path, data_csv: Path, out_dir: Path, label_column: str = "anomaly",
               config: SensordConfig | None = None) -> list[Path]:
    """Write the three diagnostic PNGs for ``bundle_dir`` on the labelled ``data_csv``; return their paths.

    The windows come from the shared factory (:func:`sensord.windows.window_spec`) with hop 1: the
    pictures show every window, but never one across a gap the daemon would have restarted at.
    ``config`` supplies ``data`` and ``window`` (the bundle's own window when None).

    Raises :class:`~sensord.errors.DataError` (a ``ValueError``, naming ``data_csv``) if the data has no
    label column, no complete windows, or no normal or no anomalous windows.
    """
    from .bundle import ModelBundle
    from .config import DataConfig
    from .dataio import load_csv
    from .scorer import Scorer, reconstruction_errors
    from .windows import window_spec, windowize

    bundle = ModelBundle.load(bundle_dir)
    spec = window_spec(config.window if config is not None else None, bundle, hop=1)
    data_cfg = dataclasses.replace(config.data if config is not None else DataConfig(), label_column=label_column)
    series = load_csv(data_csv, data_cfg, channels=bundle.channels, require_labels=True,
                      assembly=config.assembly if config is not None else None, period=bundle.sample_period_seconds)
    assert series.labels is not None  # require_labels=True
    ws = windowize(series.timestamps, series.values, spec)
    if len(ws.values) == 0:
        raise DataError(f"{data_csv}: no complete window of length {spec.length} in {len(series)} rows "
                         f"(too few rows, or gaps longer than window.max_gap_seconds={spec.max_gap_seconds:g})")
    labels = series.labels[ws.end_rows].astype(bool)
    n_anom = int(labels.sum())
    if n_anom == 0:
        raise DataError(f"{data_csv}: no anomalous windows (label column {label_column!r} is 0 at the end "
                         f"row of all {len(labels)} windows); the plots need both normal and anomalous windows")
    if n_anom == len(labels):
        raise DataError(f"{data_csv}: no normal windows (label column {label_column!r} is 1 at the end "
                         f"row of all {len(labels)} windows); the plots need both normal and anomalous windows")

    scorer = Scorer(bundle)
    errors = scorer.score(ws.values).errors
    scaled = bundle.scaler.transform(ws.values).astype(np.float32)
    reconstructed = scorer.reconstruct(scaled)
    # Same numbers as Scorer.score, from the reconstructions the picture shows.
    check, _ = reconstruction_errors(scaled, reconstructed, bundle.error_metric)
    if not np.allclose(check, errors, rtol=1e-4, atol=1e-7):  # pragma: no cover - a scorer regression
        raise RuntimeError("reconstruction errors differ from Scorer.score; plots would be inconsistent")
    scored = _Scored(scaled, reconstructed, np.asarray(errors, dtype=np.float64), labels, ws.ends, ws.end_rows)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _plot_reconstruction(bundle, scored, out / RECONSTRUCTION_PNG),
        _plot_histogram(bundle, scored, out / HISTOGRAM_PNG, Path(data_csv).name),
        _plot_latent(bundle, scored, out / LATENT_PNG),
    ]
    return written


def _median_index(errors: np.ndarray, mask: np.ndarray) -> int:
    idx = np.flatnonzero(mask)
    order = idx[np.argsort(errors[idx], kind="stable")]
    return int(order[(len(order) - 1) // 2])


def _max_index(errors: np.ndarray, mask: np.ndarray) -> int:
    idx = np.flatnonzero(mask)
    return int(idx[np.argmax(errors[idx])])


def _plot_reconstruction(bundle: Any, s: _Scored, path: Path) -> Path:
    plt = _pyplot()
    threshold = bundle.threshold.value
    picks = [("typical normal window (median error)", _median_index(s.errors, ~s.labels), _NORMAL_COLOR),
             ("most anomalous window (max error)", _max_index(s.errors, s.labels), _ANOMALY_COLOR)]
    n_ch = len(bundle.channels)
    fig, axes = plt.subplots(n_ch, 2, figsize=(11, 1.35 * n_ch + 1.4), sharex=True, squeeze=False)
    t = np.arange(bundle.window_length)
    for col, (what, i, color) in enumerate(picks):
        err = float(s.errors[i])
        verdict = "over" if err > threshold else "under"
        axes[0, col].set_title(f"{what}\nends {_utc(s.end_times[i])} (row {int(s.end_rows[i])})\n"
                               f"error {_fmt(err)} {verdict} threshold {_fmt(threshold)} "
                               f"({err / threshold:.2f}x)", fontsize=9)
        for ch in range(n_ch):
            ax = axes[ch, col]
            ax.plot(t, s.scaled[i, :, ch], color=color, lw=1.4, label="input")
            ax.plot(t, s.reconstructed[i, :, ch], color="0.2", lw=1.2, ls="--", label="reconstruction")
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.set_ylabel(bundle.channels[ch], fontsize=8)
        axes[-1, col].set_xlabel("step in window", fontsize=8)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper right", fontsize=8, ncol=2)
    fig.suptitle(f"{bundle.model_id}: input vs reconstruction (scaled units, {bundle.error_metric})",
                 fontsize=11, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_histogram(bundle: Any, s: _Scored, path: Path, data_name: str) -> Path:
    plt = _pyplot()
    threshold = bundle.threshold.value
    counts = window_counts(s.errors, s.labels, threshold)
    normal, anomalous = s.errors[~s.labels], s.errors[s.labels]
    n_norm, n_anom = len(normal), len(anomalous)

    positive = s.errors[s.errors > 0]
    lo = min(float(positive.min()) if positive.size else threshold, threshold)
    hi = max(float(s.errors.max()), threshold)
    log_x = hi / lo > 100.0
    if log_x:
        bins = np.geomspace(lo, hi * 1.0001, 61)
        normal, anomalous = np.clip(normal, lo, None), np.clip(anomalous, lo, None)  # exact zeros go to bin 0
    else:
        bins = np.linspace(min(0.0, float(s.errors.min())), hi * 1.0001, 61)

    fig, ax = plt.subplots(figsize=(9, 5))
    ax.hist(normal, bins=bins, color=_NORMAL_COLOR, alpha=0.55,
            label=f"normal: {counts['normal_under']} of {n_norm} under threshold "
                  f"({100 * counts['normal_under'] / n_norm:.1f}%)")
    ax.hist(anomalous, bins=bins, color=_ANOMALY_COLOR, alpha=0.55,
            label=f"anomalous: {counts['anomalous_over']} of {n_anom} over threshold "
                  f"({100 * counts['anomalous_over'] / n_anom:.1f}%)")
    ax.axvline(threshold, color=_THRESHOLD_COLOR, ls="--", lw=1.5,
               label=f"threshold {_fmt(threshold)} ({bundle.threshold.method})")
    if log_x:
        ax.set_xscale("log")
    ax.set_yscale("log")  # anomalous windows are usually far fewer than normal ones
    _, top = ax.get_ylim()
    ax.set_ylim(0.7, top * 8)  # head-room so the legend does not hide the tallest bars
    ax.set_xlabel(f"window reconstruction error ({bundle.error_metric}, scaled units"
                  f"{', log scale' if log_x else ''})")
    ax.set_ylabel("windows (log scale)")
    ax.set_title(f"{bundle.model_id} on {data_name}: {len(s.errors)} windows of {bundle.window_length}",
                 fontsize=10)
    ax.grid(alpha=0.3, which="major")
    ax.legend(fontsize=9, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _latent_codes(bundle: Any, scaled: np.ndarray) -> np.ndarray:
    """The "latent" layer's output for each scaled window, flattened to (B, features)."""
    from .tflib import import_tensorflow

    keras, _ = import_tensorflow()  # quiet TensorFlow start-up
    path = bundle.keras_path
    if not path.is_file():
        raise BundleError(f"{path}: missing (the latent plot needs the Keras model of the bundle)")
    model = keras.models.load_model(path, compile=False)
    try:
        layer = model.get_layer(LATENT_LAYER)
    except ValueError:
        raise BundleError(f"{path}: model has no layer named {LATENT_LAYER!r}") from None
    encoder = keras.Model(model.inputs[0], layer.output)  # one input tensor, so plain arrays match
    # Eager calls in chunks (not Model.predict): no tf.function tracing per model, no progress bar.
    chunks = [np.asarray(encoder(scaled[i:i + 1024], training=False), dtype=np.float64)
              for i in range(0, len(scaled), 1024)]
    codes = np.concatenate(chunks)
    return codes.reshape(len(codes), -1)


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows of ``x`` onto its first two principal components (numpy SVD).

    Returns the (n, 2) projection and the fraction of variance each component
    explains. With fewer than two features (or rank < 2) the missing
    component is zero.
    """
    x = np.asarray(x, dtype=np.float64)
    centered = x - x.mean(axis=0, keepdims=True)
    _, sv, vt = np.linalg.svd(centered, full_matrices=False)
    k = min(2, vt.shape[0])
    proj = np.zeros((len(x), 2))
    proj[:, :k] = centered @ vt[:k].T
    var = sv ** 2
    frac = np.zeros(2)
    if var.sum() > 0:
        frac[:k] = var[:k] / var.sum()
    return proj, frac


def _plot_latent(bundle: Any, s: _Scored, path: Path) -> Path:
    codes = _latent_codes(bundle, s.scaled)
    dim = codes.shape[1]
    if dim == 2:
        xy = codes
        xlabel, ylabel = "latent[0]", "latent[1]"
        how = "2-D latent"
    else:
        xy, frac = pca_2d(codes)
        xlabel = f"PC1 ({100 * frac[0]:.1f}% of variance)"
        ylabel = f"PC2 ({100 * frac[1]:.1f}% of variance)"
        how = f"{dim}-D latent, PCA to 2-D"

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    normal, anomalous = ~s.labels, s.labels
    ax.scatter(xy[normal, 0], xy[normal, 1], s=6, alpha=0.35, color=_NORMAL_COLOR, linewidths=0,
               label=f"normal ({int(normal.sum())} windows)", rasterized=True)
    ax.scatter(xy[anomalous, 0], xy[anomalous, 1], s=10, alpha=0.7, color=_ANOMALY_COLOR, linewidths=0,
               label=f"anomalous ({int(anomalous.sum())} windows)", rasterized=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{bundle.model_id}: latent space ({how})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
