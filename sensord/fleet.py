"""Many models from a directory of recordings: one per device (``--per-device``) or per group (``--group``).

Why per device: a sister machine running a few degrees warmer is healthy, yet a model trained on its
neighbour calls it a fault from the first window; peers (vmanomaly, River, Azure) key models by series
for the same reason. Why groups: machines of one kind and one operating point share a model and pool
their healthy data. Each model goes through ``train_bundle`` (the ``sensord train`` code) in its own
worker process with one TensorFlow thread, as ``bench skab`` does, so both cores are used and a model
comes out the same whatever ``--jobs`` is.

A recording is one CSV per device, named after it (``pump3.csv``), as ``sensord record`` writes them.
"""

from __future__ import annotations

import fnmatch
import multiprocessing
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError, UsageError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ModelPlan:
    """One bundle to train: its directory name under the output root and the recordings it learns from."""

    name: str
    files: tuple[Path, ...]


@dataclass(frozen=True)
class FleetResult:
    name: str
    files: tuple[str, ...]
    model_id: str = ""
    train_windows: int = 0
    validation_windows: int = 0
    threshold: float = 0.0
    validation_error_min: float = 0.0
    validation_error_max: float = 0.0
    epochs: int = 0
    seconds: float = 0.0
    error: str | None = None  # why this model could not be trained (the others still are)


def parse_group(text: str) -> tuple[str, str]:
    """``NAME=GLOB`` (``pump='pump*'``) -> (name, glob); the name becomes a directory under ``--out``.

    >>> parse_group("pump=pump*")
    ('pump', 'pump*')
    """
    name, sep, pattern = text.partition("=")
    if not sep or not pattern:
        raise UsageError(f"--group: expected NAME=GLOB (e.g. pump='pump*'), got {text!r}")
    if not _NAME.match(name):
        raise UsageError(f"--group: {name!r} cannot be a model directory name (letters, digits, '_', '.', '-')")
    return name, pattern


def recordings(data_dir: Path) -> list[Path]:
    """The CSV files directly in ``data_dir``, one per device, sorted by name."""
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory of recordings")
    files = sorted(p for p in data_dir.glob("*.csv") if p.is_file())
    if not files:
        raise DataError(f"{data_dir}: no .csv recordings in it")
    return files


def plan_models(files: Sequence[Path], groups: Sequence[tuple[str, str]],
                per_device: bool) -> tuple[list[ModelPlan], list[Path]]:
    """Which files train which model, and the files no model uses.

    A file goes to the first group whose glob matches its device name (the file name without ``.csv``);
    with ``per_device`` every other file trains a model of its own.

    >>> plan, unused = plan_models([Path("pump1.csv"), Path("pump2.csv"), Path("fan.csv")],
    ...                            [("pump", "pump*")], per_device=False)
    >>> [(m.name, [f.name for f in m.files]) for m in plan], [f.name for f in unused]
    ([('pump', ['pump1.csv', 'pump2.csv'])], ['fan.csv'])
    """
    names = [n for n, _ in groups]
    if len(set(names)) != len(names):
        raise UsageError(f"--group: a name is given twice: {names}")
    members: dict[str, list[Path]] = {n: [] for n in names}
    singles: list[ModelPlan] = []
    unused: list[Path] = []
    for f in files:
        device = f.stem
        group = next((n for n, g in groups if fnmatch.fnmatchcase(device, g)), None)
        if group is not None:
            members[group].append(f)
        elif per_device:
            if not _NAME.match(device):
                raise DataError(f"{f}: {device!r} cannot be a model directory name")
            if device in members:
                raise UsageError(f"{f}: device {device!r} has the name of a --group; rename one")
            singles.append(ModelPlan(device, (f,)))
        else:
            unused.append(f)
    empty = [n for n in names if not members[n]]
    if empty:
        raise UsageError(f"--group {empty[0]}: no recording matches {dict(groups)[empty[0]]!r}")
    return [ModelPlan(n, tuple(members[n])) for n in names] + singles, unused


def _train_one(args: tuple[ModelPlan, dict[str, Any], Path]) -> FleetResult:
    plan, raw, out_root = args
    from .config import config_from_dict
    from .dataio import load_recordings
    from .training import train_bundle
    files = tuple(str(f) for f in plan.files)
    t0 = time.monotonic()
    try:
        cfg = config_from_dict(raw)
        series = [s for f in plan.files for s in load_recordings(f, cfg.data, assembly=cfg.assembly)]
        bundle = train_bundle(series if len(series) > 1 else series[0], cfg, out_root / plan.name)
    except DataError as exc:
        return FleetResult(plan.name, files, error=str(exc), seconds=time.monotonic() - t0)
    tr, stats = bundle.training, bundle.threshold.validation_stats
    return FleetResult(plan.name, files, bundle.model_id, int(tr["train_windows"]), int(tr["validation_windows"]),
                       bundle.threshold.value, stats["min"], stats["max"], int(tr["epochs_run"]),
                       time.monotonic() - t0)


def train_fleet(plans: Sequence[ModelPlan], raw_config: dict[str, Any], out_root: Path, jobs: int,
                on_done: Callable[[FleetResult], None] | None = None) -> list[FleetResult]:
    """Train every planned model in ``jobs`` worker processes; results in plan order."""
    from .tflib import init_training_worker
    out_root.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")  # TensorFlow does not survive fork
    results: list[FleetResult] = []
    with ProcessPoolExecutor(max(1, min(jobs, len(plans))), mp_context=ctx, initializer=init_training_worker) as pool:
        for r in pool.map(_train_one, [(p, raw_config, out_root) for p in plans]):
            results.append(r)
            if on_done is not None:
                on_done(r)
    return results
