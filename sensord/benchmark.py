"""The SKAB benchmark, run through the real ``train`` and ``evaluate`` code paths.

SKAB's published outlier-detection protocol: per file, fit on the first 400
rows, predict every later row, pool all files, and report F1 / FAR / MAR point
by point. Our evaluation is causal (a row is decided by the window that ends
at it), unlike the published Conv-AE which looks ~60 s into the future.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import ModelBundle
from .config import SensordConfig, config_from_dict, config_to_dict
from .dataio import load_csv
from .errors import DataError
from .evaluation import Confusion, EvaluationResult, ScoredSeries, evaluate_scored, score_series
from .scorer import Scorer
from .tflib import init_training_worker
from .training import train
from .windows import window_spec

log = logging.getLogger(__name__)

FIT_ROWS = 400

# (name, F1, FAR, MAR) from SKAB's leaderboard on the whole corpus (34 files), see MISSION.md.
PUBLISHED: tuple[tuple[str, float, float | None, float | None], ...] = (
    ("Conv-AE (looks ~60 s ahead)", 0.78, 0.136, 0.280),
    ("MSET", 0.78, None, None),
    ("T2+Q (PCA)", 0.76, None, None),
    ("LSTM-AE", 0.74, None, None),
    ("Vanilla AE", 0.39, None, None),
    ("Isolation Forest", 0.29, None, None),
)


@dataclass(frozen=True)
class FileResult:
    name: str
    seed: int
    result: EvaluationResult
    threshold: float
    train_seconds: float
    epochs_run: int = 0
    best_epoch: int = 0
    # Kept only when asked (cross-validation re-decides them at other thresholds).
    scored: ScoredSeries | None = None
    validation_errors: np.ndarray | None = None


def skab_files(data_dir: Path) -> list[Path]:
    """Every experiment CSV under ``data_dir``, except the anomaly-free run, in natural order."""
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: SKAB data directory not found")
    files = [p for p in data_dir.rglob("*.csv") if "anomaly-free" not in p.relative_to(data_dir).parts
             and not p.name.startswith("anomaly-free")]

    def key(p: Path) -> tuple[Any, ...]:
        rel = p.relative_to(data_dir)
        return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(rel)))

    if not files:
        raise DataError(f"{data_dir}: no experiment CSV files found")
    return sorted(files, key=key)


def bench_file(path: Path, data_dir: Path, cfg: SensordConfig, model_dir: Path, fit_rows: int = FIT_ROWS,
               keep_scores: bool = False) -> FileResult:
    """One file of the protocol: train on the first ``fit_rows`` rows, evaluate the rest causally.

    Uses exactly ``sensord train``'s and ``sensord evaluate``'s code (the
    window factory, the serving scorer and the daemon's detector).
    """
    name = str(path.relative_to(data_dir))
    series = load_csv(path, cfg.data, require_labels=True)
    if len(series) <= fit_rows:
        raise DataError(f"{path}: only {len(series)} rows, need more than {fit_rows}")
    t = time.monotonic()
    healthy = series.slice(0, fit_rows)
    evidence = train(healthy, cfg, model_dir).threshold_errors
    bundle = ModelBundle.load(model_dir)
    scorer = Scorer(bundle)
    spec = window_spec(cfg.window, bundle)
    scored = score_series(series, scorer, spec)
    result = evaluate_scored(series, scored, bundle.threshold.value, cfg.detector, count_from=fit_rows,
                             top_k=cfg.scoring.top_channels)
    # The errors the threshold was fitted on (the validation windows', or a cross-fitted ensemble's
    # out-of-fold errors), so a benchmark re-deciding the threshold fits it on the same evidence.
    val_errors = evidence if keep_scores else None
    return FileResult(name, cfg.training.seed, result, bundle.threshold.value, time.monotonic() - t,
                      int(bundle.training.get("epochs_run", 0)), int(bundle.training.get("best_epoch", 0)),
                      scored if keep_scores else None, val_errors)


def _bench_task(args: tuple[Path, Path, dict[str, Any], Path, int, bool]) -> FileResult:
    path, data_dir, raw, model_dir, fit_rows, keep = args
    return bench_file(path, data_dir, config_from_dict(raw), model_dir, fit_rows, keep)


def with_seed(cfg: SensordConfig, seed: int) -> SensordConfig:
    raw = config_to_dict(cfg)
    raw["training"]["seed"] = seed
    return config_from_dict(raw)


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, min and max of the pooled figures over seeds: the spread is part of the result."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in per_seed]}
    for key in ("f1", "far", "mar"):
        vals = [r["pooled"][key] for r in per_seed]
        out[key] = {"mean": round(float(np.mean(vals)), 4), "min": round(float(min(vals)), 4),
                    "max": round(float(max(vals)), 4)}
    return out


def run_skab(data_dir: Path, cfg: SensordConfig, work_dir: Path | None = None,
             fit_rows: int = FIT_ROWS, on_file: Callable[[FileResult], None] | None = None,
             seeds: list[int] | None = None, jobs: int = 1, keep_scores: bool = False,
             results: list[FileResult] | None = None) -> dict[str, Any]:
    """The protocol once per seed (``training.seed`` when ``seeds`` is None), files spread over ``jobs``
    worker processes. ``results``, when given, receives every FileResult (for re-deciding them)."""
    files = skab_files(data_dir)
    seeds = list(seeds) if seeds else [cfg.training.seed]
    t0 = time.monotonic()
    done: dict[tuple[int, str], FileResult] = {}
    with tempfile.TemporaryDirectory(prefix="sensord-skab-") as tmp:
        root = work_dir or Path(tmp)
        tasks = []
        for seed in seeds:
            raw = config_to_dict(with_seed(cfg, seed))
            for path in files:
                name = str(path.relative_to(data_dir))
                model_dir = root / f"seed{seed}" / re.sub(r"[^\w.-]+", "_", name.removesuffix(".csv"))
                tasks.append((path, data_dir, raw, model_dir, fit_rows, keep_scores))
        # Always in worker processes with one TensorFlow thread each, so a seed gives the same figures
        # whatever --jobs is (the thread count changes the order of float reductions).
        ctx = multiprocessing.get_context("spawn")  # TensorFlow does not survive fork
        with ProcessPoolExecutor(max(1, jobs), mp_context=ctx, initializer=init_training_worker) as pool:
            for fr in pool.map(_bench_task, tasks):
                done[(fr.seed, fr.name)] = fr
                if on_file is not None:
                    on_file(fr)
    per_seed = []
    for seed in seeds:
        frs = [done[(seed, str(p.relative_to(data_dir)))] for p in files]
        pooled = sum((f.result.confusion for f in frs), Confusion())
        per_seed.append({"seed": seed, "pooled": pooled.as_dict(), "per_file": [_file_row(f) for f in frs]})
        if results is not None:
            results.extend(frs)
    return {
        "protocol": {"fit_rows": fit_rows, "causal": True, "files": len(files), "data": str(data_dir)},
        # The first seed's figures, as before --seeds existed; every seed's are under "seeds".
        "pooled": per_seed[0]["pooled"],
        "per_file": per_seed[0]["per_file"],
        "seeds": per_seed,
        "summary": summarize(per_seed),
        "published": [{"method": n, "f1": f1, "far": far, "mar": mar} for n, f1, far, mar in PUBLISHED],
        "duration_seconds": round(time.monotonic() - t0, 1),
        "config": {"window": cfg.window.length, "hop": cfg.window.hop, "model": cfg.model.kind,
                   "ensemble": cfg.training.ensemble, "threshold": cfg.threshold.method,
                   "raise_after": cfg.detector.raise_after, "clear_after": cfg.detector.clear_after},
    }


def _file_row(f: FileResult) -> dict[str, Any]:
    return {"file": f.name, **f.result.confusion.as_dict(), "threshold": f.threshold,
            "unscored_rows": f.result.unscored_rows, "mean_delay_seconds": f.result.mean_delay_seconds,
            "train_seconds": round(f.train_seconds, 2), "epochs_run": f.epochs_run, "best_epoch": f.best_epoch}
