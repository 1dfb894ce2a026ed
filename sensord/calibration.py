"""A new threshold for an existing network, from new healthy data: ``sensord calibrate``.

Why not retrain: after maintenance, a sensor swap or a seasonal shift the machine's normal behaviour is
the same but its error level moves a little; retraining changes every weight (and needs TensorFlow and
minutes), while the threshold is one number fitted on healthy errors. Calibration scores the new healthy
windows through the serving scorer (no TensorFlow), fits the threshold with the configured method, and
writes a new version of the bundle: a new model id (so saved detector state and dashboards tell the
versions apart) and the old threshold kept in ``threshold_history``.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from .bundle import KERAS_FILE, TFLITE_FILE, ModelBundle
from .config import ThresholdConfig, WindowConfig
from .dataio import Series
from .errors import DataError
from .scorer import Scorer
from .threshold import ThresholdCalibrator
from .windows import window_spec, windowize

MIN_WINDOWS = 10  # fewer healthy windows than this cannot say where healthy ends
_VERSION = re.compile(r"^(?P<base>.*?)(?:\.c(?P<n>\d+))?$")


@dataclass(frozen=True)
class Calibration:
    bundle: ModelBundle  # the new version, written
    previous: ModelBundle
    windows: int
    errors: np.ndarray  # the healthy windows' errors the threshold was fitted on

    @property
    def ratio(self) -> float:
        return self.bundle.threshold.value / self.previous.threshold.value


def next_model_id(model_id: str) -> str:
    """``pump-1a2b3c4d`` -> ``pump-1a2b3c4d.c1`` -> ``.c2``: the network's id stays readable in the new one.

    >>> next_model_id("pump-1a2b3c4d"), next_model_id("pump-1a2b3c4d.c1")
    ('pump-1a2b3c4d.c1', 'pump-1a2b3c4d.c2')
    """
    m = _VERSION.match(model_id)
    assert m is not None  # the pattern matches any string
    return f"{m['base']}.c{int(m['n'] or 0) + 1}"


def calibrate(bundle: ModelBundle, series: Series, threshold: ThresholdConfig,
              window: WindowConfig | None = None, out_dir: Path | None = None) -> Calibration:
    """Fit a new threshold on ``series`` (healthy readings with the bundle's channels) and write the new
    version to ``out_dir`` (a copy of the bundle) or in place (``bundle.json`` replaced atomically, so a
    daemon serving it picks the new threshold up on SIGHUP)."""
    if tuple(series.channels) != bundle.channels:
        raise DataError(f"{series.path or 'data'}: channels {list(series.channels)} do not match the "
                        f"model's {list(bundle.channels)}")
    spec = window_spec(window, bundle, hop=1)  # every healthy window counts
    windows = windowize(series.timestamps, series.values, spec).values
    if len(windows) < MIN_WINDOWS:
        raise DataError(f"{series.path or 'data'}: {len(windows)} complete windows of {spec.length} readings "
                        f"(gaps over {spec.max_gap_seconds} s restart a window); calibration needs at least "
                        f"{MIN_WINDOWS}")
    errors = Scorer(bundle).score(windows).errors
    try:
        record = ThresholdCalibrator(threshold).fit(errors)
    except ValueError as exc:
        raise DataError(f"{series.path or 'data'}: cannot fit threshold.method {threshold.method} on "
                        f"{len(errors)} windows: {exc}") from None
    old = bundle.threshold.to_dict()
    history = (*bundle.threshold_history, {**old, "model_id": bundle.model_id,
                                           "replaced": datetime.now(UTC).isoformat(timespec="seconds")})
    target = bundle.path if out_dir is None else Path(out_dir)
    if out_dir is not None and target.resolve() != bundle.path.resolve():
        target.mkdir(parents=True, exist_ok=True)
        for name in (TFLITE_FILE, KERAS_FILE):
            if (bundle.path / name).is_file():
                shutil.copy2(bundle.path / name, target / name)
    new = dataclasses.replace(bundle, path=target, model_id=next_model_id(bundle.model_id), threshold=record,
                              threshold_history=history,
                              training={**bundle.training, "calibrated_on": series.path,
                                        "calibration_windows": len(errors)})
    new.write_json()
    ModelBundle.load(target)  # what was written must load, checksum included
    return Calibration(new, bundle, len(errors), errors)
