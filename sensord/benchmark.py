"""The SKAB benchmark, run through the real ``train`` and ``evaluate`` code paths.

SKAB's published outlier-detection protocol: per file, fit on the first 400
rows, predict every later row, pool all files, and report F1 / FAR / MAR point
by point. Our evaluation is causal (a row is decided by the window that ends
at it), unlike the published Conv-AE which looks ~60 s into the future.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundle import ModelBundle
from .config import SensordConfig
from .dataio import DataError, load_csv
from .evaluation import Confusion, EvaluationResult, evaluate_series
from .scorer import Scorer
from .training import train_bundle
from .windows import WindowSpec

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
    result: EvaluationResult
    threshold: float
    train_seconds: float


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


def run_skab(data_dir: Path, cfg: SensordConfig, work_dir: Path | None = None,
             fit_rows: int = FIT_ROWS, on_file: Callable[[FileResult], None] | None = None) -> dict[str, Any]:
    files = skab_files(data_dir)
    pooled = Confusion()
    per_file: list[FileResult] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sensord-skab-") as tmp:
        root = work_dir or Path(tmp)
        for path in files:
            name = str(path.relative_to(data_dir))
            series = load_csv(path, cfg.data, require_labels=True)
            if len(series) <= fit_rows:
                raise DataError(f"{path}: only {len(series)} rows, need more than {fit_rows}")
            t = time.monotonic()
            model_dir = root / re.sub(r"[^\w.-]+", "_", name.removesuffix(".csv"))
            train_bundle(series.slice(0, fit_rows), cfg, model_dir)
            bundle = ModelBundle.load(model_dir)
            spec = WindowSpec(bundle.window_length, cfg.window.hop, cfg.window.max_gap_seconds)
            result = evaluate_series(series, Scorer(bundle), spec, cfg.detector, count_from=fit_rows,
                                     top_k=cfg.scoring.top_channels)
            fr = FileResult(name, result, bundle.threshold.value, time.monotonic() - t)
            per_file.append(fr)
            pooled = pooled + result.confusion
            if on_file is not None:
                on_file(fr)
    return {
        "protocol": {"fit_rows": fit_rows, "causal": True, "files": len(files), "data": str(data_dir)},
        "pooled": pooled.as_dict(),
        "per_file": [{"file": f.name, **f.result.confusion.as_dict(), "threshold": f.threshold,
                      "unscored_rows": f.result.unscored_rows,
                      "mean_delay_seconds": f.result.mean_delay_seconds,
                      "train_seconds": round(f.train_seconds, 2)} for f in per_file],
        "published": [{"method": n, "f1": f1, "far": far, "mar": mar} for n, f1, far, mar in PUBLISHED],
        "duration_seconds": round(time.monotonic() - t0, 1),
        "config": {"window": cfg.window.length, "hop": cfg.window.hop, "model": cfg.model.kind,
                   "threshold": cfg.threshold.method, "raise_after": cfg.detector.raise_after,
                   "clear_after": cfg.detector.clear_after},
    }
