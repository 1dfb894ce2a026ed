"""Does a different per-window score separate SKAB's faults better than the mean squared error?

Trains each file x seed once through the real training code, keeps every window's squared error per
reading and channel (and the training and validation windows'), then re-scores them with variants --
errors normalised per channel by their healthy level, a Mahalanobis distance over log channel errors, an
EWMA or running median of the window error, the error of only the newest readings of each window
(uniform, exponentially weighted, their median or geometric mean) -- and re-decides them through the
daemon's detector (``evaluation.decide_rows``) at thresholds ``factor`` x the largest validation score.

``--clear-on`` also tries an asymmetric detector: raise on the mean squared error as the daemon does,
clear on a newest-readings score. A fault with a huge error keeps the whole-window mean over the
threshold until its last reading has left the window (up to ``window.length - 1`` rows of false alarm
after it ends, then ``clear_after`` more); a score of the newest readings lets it go sooner. That
detector is simulated here (``_decide_two``, checked against ``decide_rows`` on every file):

    python bench/skab_score_variants.py collect --data ../shared/datasets/skab/data --seeds 42,1,7 \\
        --jobs 2 --out out/variants.pickle
    python bench/skab_score_variants.py analyse out/variants.pickle --factors 2.5,3,3.5,4 --max-far 0.13
"""

from __future__ import annotations

import argparse
import multiprocessing
import pickle
import tempfile
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sensord.benchmark import FIT_ROWS, skab_files, with_seed
from sensord.bundle import ModelBundle
from sensord.config import DetectorConfig, SensordConfig, config_from_dict, config_to_dict
from sensord.dataio import load_csv
from sensord.evaluation import Confusion, ScoredSeries, decide_rows, segments_of
from sensord.scorer import Scorer
from sensord.tflib import init_training_worker
from sensord.training import split_windows, train_bundle
from sensord.windows import iter_windows, window_spec

Score = Callable[[np.ndarray], np.ndarray]


def _cells(scorer: Scorer, windows: np.ndarray) -> np.ndarray:
    """Squared error of every (window, reading, channel) cell in scaled units, float32 to keep the cache small.

    Its mean over readings and channels is the scorer's window error (``reconstruction_errors``)."""
    scaled = scorer.bundle.scaler.transform(np.asarray(windows, np.float32))
    rec = scorer.reconstruct(scaled)
    if rec.ndim == 4:  # an ensemble: the members' mean reconstruction is close enough for this study
        rec = rec.mean(axis=1)
    return ((rec.astype(np.float64) - scaled.astype(np.float64)) ** 2).astype(np.float32)


def collect_one(args: tuple[Path, Path, dict[str, Any]]) -> dict[str, Any]:
    path, data, raw = args
    cfg = config_from_dict(raw)
    series = load_csv(path, cfg.data, require_labels=True)
    healthy = series.slice(0, FIT_ROWS)
    with tempfile.TemporaryDirectory() as tmp:
        train_bundle(healthy, cfg, Path(tmp) / "m")
        bundle = ModelBundle.load(Path(tmp) / "m")
        scorer = Scorer(bundle)
        spec = window_spec(cfg.window, bundle)
        pairs = list(iter_windows(series.timestamps, series.values, spec))
        split = split_windows(healthy, cfg, bundle.drift)
        return {"name": str(path.relative_to(data)), "seed": cfg.training.seed, "n_rows": len(series),
                "labels": series.labels, "rows": np.array([row for row, _ in pairs]),
                "starts": np.array([w.start for _, w in pairs]), "ends": np.array([w.end for _, w in pairs]),
                "channels": bundle.channels, "all": _cells(scorer, np.stack([w.values for _, w in pairs])),
                "train": _cells(scorer, split.train), "val": _cells(scorer, split.validation)}


def _newest(k: int, reduce: Callable[[np.ndarray], np.ndarray]) -> Score:
    """A score of the newest ``k`` readings of each window: ``reduce`` over their per-reading errors."""
    return lambda cells: reduce(cells[:, -k:].astype(np.float64).mean(axis=2))


def _exp_weighted(tau: float) -> Score:
    """Per-reading errors weighted by exp(-age / tau), the newest reading having age 0."""
    def f(cells: np.ndarray) -> np.ndarray:
        e = cells.astype(np.float64).mean(axis=2)
        w = np.exp(-np.arange(e.shape[1])[::-1] / tau)
        return e @ (w / w.sum())
    return f


def newest_scores() -> dict[str, Score]:
    return {"newest-10": _newest(10, lambda e: e.mean(axis=1)), "newest-20": _newest(20, lambda e: e.mean(axis=1)),
            "newest-3": _newest(3, lambda e: e.mean(axis=1)), "newest-1": _newest(1, lambda e: e.mean(axis=1)),
            "exp-5": _exp_weighted(5.0), "exp-10": _exp_weighted(10.0),
            "median-newest-5": _newest(5, lambda e: np.median(e, axis=1)),
            "median-newest-10": _newest(10, lambda e: np.median(e, axis=1)),
            "median-all": _newest(10_000, lambda e: np.median(e, axis=1)),
            "geomean-all": _newest(10_000, lambda e: np.exp(np.log(e + 1e-12).mean(axis=1)))}


def variants(r: dict[str, Any]) -> dict[str, Score]:
    """Per-window scores from cell errors (B, length, C); statistics from the training windows only."""
    eps = 1e-12
    tr = r["train"].astype(np.float64).mean(axis=1)
    mu = tr.mean(axis=0) + eps
    lt = np.log(tr + eps)
    m = lt.mean(axis=0)
    cov = np.cov(lt, rowvar=False)
    inv = np.linalg.inv(0.9 * cov + 0.1 * np.diag(np.diag(cov)) + 1e-6 * np.eye(len(m)))

    def ewma(a: float) -> Score:
        def f(e: np.ndarray) -> np.ndarray:
            x, y, acc = e.mean(axis=1), np.empty(len(e)), e[0].mean()
            for i, v in enumerate(x):
                acc = a * v + (1 - a) * acc
                y[i] = acc
            return y
        return f

    def median(k: int) -> Score:
        def f(e: np.ndarray) -> np.ndarray:
            x = e.mean(axis=1)
            return np.array([np.median(x[max(0, i - k + 1):i + 1]) for i in range(len(x))])
        return f

    def maha(e: np.ndarray) -> np.ndarray:
        d = np.log(e + eps) - m
        return np.einsum("ij,jk,ik->i", d, inv, d) / len(m)

    per_channel: dict[str, Score] = {
        "mse": lambda e: e.mean(axis=1), "channel-normalised": lambda e: (e / mu).mean(axis=1),
        "channel-normalised-max": lambda e: (e / mu).max(axis=1), "mahalanobis-log": maha,
        "ewma-0.3": ewma(0.3), "ewma-0.15": ewma(0.15), "median-3": median(3), "median-5": median(5)}

    def over_channels(f: Score) -> Score:
        return lambda cells: f(cells.astype(np.float64).mean(axis=1))
    return {name: over_channels(f) for name, f in per_channel.items()} | newest_scores()


def _decided(r: dict[str, Any], errors: np.ndarray, threshold: float, det: DetectorConfig) -> np.ndarray:
    c = r["all"].shape[2]
    s = ScoredSeries(r["n_rows"], 1, r["rows"], r["starts"], r["ends"], errors,
                     np.full((len(errors), c), 1.0 / c), r["channels"])
    return decide_rows(s, threshold, det)[0]


def _confusion(r: dict[str, Any], errors: np.ndarray, threshold: float, det: DetectorConfig) -> Confusion:
    pred = _decided(r, errors, threshold, det)
    return Confusion.of(r["labels"][FIT_ROWS:], pred[FIT_ROWS:] == 1)


def _decide_two(r: dict[str, Any], raise_on: np.ndarray, clear_on: np.ndarray, threshold: float,
                det: DetectorConfig) -> np.ndarray:
    """The daemon's hysteresis (hop 1), but counting windows over the threshold on ``raise_on`` while
    normal and windows under it on ``clear_on`` while alerting."""
    pred = np.full(r["n_rows"], -1, np.int8)
    active, run = False, 0
    for i, row in enumerate(r["rows"]):
        if not active:
            run = run + 1 if raise_on[i] > threshold else 0
            if run >= det.raise_after:
                active, run = True, 0
        else:
            run = run + 1 if clear_on[i] <= threshold else 0
            if run >= det.clear_after:
                active, run = False, 0
        pred[row] = 1 if active else 0
    return pred


def clear_on_table(results: list[dict[str, Any]], factors: list[float], max_far: float) -> list[str]:
    """Raise on the mean squared error, clear on a newest-readings score (see the module docstring)."""
    dets = [DetectorConfig(raise_after=ra, clear_after=ca) for ra in (1, 3) for ca in (5, 10)]
    table: dict[tuple[str, float, int, int], dict[tuple[int, str], Confusion]] = defaultdict(
        lambda: defaultdict(Confusion))
    mse = variants(results[0])["mse"]
    for r in results:
        group = r["name"].split("/")[0]
        raise_on, worst = mse(r["all"]), float(mse(r["val"]).max())
        same = _decide_two(r, raise_on, raise_on, 3.0 * worst, dets[-1])
        assert np.array_equal(same, _decided(r, raise_on, 3.0 * worst, dets[-1])), "simulation != decide_rows"
        for name, score in ({"mse": mse} | newest_scores()).items():
            clear_on = score(r["all"])
            for fac in factors:
                for d in dets:
                    pred = _decide_two(r, raise_on, clear_on, fac * worst, d)
                    c = Confusion.of(r["labels"][FIT_ROWS:], pred[FIT_ROWS:] == 1)
                    for key in ((r["seed"], group), (r["seed"], "all")):
                        table[(name, fac, d.raise_after, d.clear_after)][key] += c
    return _ranked(table, max_far, "clear on")


def where(results: list[dict[str, Any]], factor: float) -> list[str]:
    """Where the default detector's errors fall, per group: false alarms before the fault, in the carry-over
    after it (the window still holds fault readings, then ``clear_after``), and later; misses in the fault's
    first window length (onset) and after."""
    det = DetectorConfig()
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    zones: dict[str, dict[str, np.ndarray]] = defaultdict(lambda: defaultdict(lambda: np.zeros(2, int)))
    for r in results:
        length = r["all"].shape[1]
        mse = variants(r)["mse"]
        threshold = factor * float(mse(r["val"]).max())
        pred = _decided(r, mse(r["all"]), threshold, det)
        labels, idx = r["labels"], np.arange(r["n_rows"])
        segs = segments_of(labels)
        start, end = segs[0] if segs else (r["n_rows"], r["n_rows"])
        alarm, normal, fault = pred == 1, (labels == 0) & (idx >= FIT_ROWS), labels == 1
        carry = (idx >= end) & (idx < end + length + det.clear_after)
        c = counts[r["name"].split("/")[0]]
        c["normal rows"] += int(normal.sum())
        c["FP before the fault"] += int((alarm & normal & (idx < start)).sum())
        c["FP carry-over"] += int((alarm & normal & carry).sum())
        c["FP later"] += int((alarm & normal & (idx >= end) & ~carry).sum())
        c["fault rows"] += int(fault.sum())
        c["FN onset"] += int((~alarm & fault & (idx < start + length)).sum())
        c["FN later"] += int((~alarm & fault & (idx >= start + length)).sum())
        # Is the carry-over the window or the machine? The newest reading's own error against the threshold.
        newest = newest_scores()["newest-1"](r["all"]) > threshold
        rows = r["rows"]
        for zone, lo, hi in (("before", FIT_ROWS, start), ("after 0-10", end, end + 10),
                             ("after 10-40", end + 10, end + 40), ("after 40+", end + 40, r["n_rows"])):
            m = (rows >= lo) & (rows < hi) & (labels[rows] == 0)
            zones[r["name"].split("/")[0]][zone] += np.array([int(newest[m].sum()), int(m.sum())])
    seeds = len({r["seed"] for r in results})
    out = [f"max_factor {factor}, raise {det.raise_after}, clear {det.clear_after}; rows summed over {seeds} seeds"]
    for group, c in sorted(counts.items()):
        out.append(f"  {group:7} " + "  ".join(f"{k} {v}" for k, v in c.items()))
    out.append("newest reading's own error over the threshold, share of the normal rows:")
    for group, z in sorted(zones.items()):
        out.append(f"  {group:7} " + "  ".join(f"{k} {v[0] / max(1, v[1]) * 100:.0f} % of {v[1]}"
                                               for k, v in z.items()))
    return out


def floor_scores(r: dict[str, Any], data: Path, floors: list[float]) -> dict[str, Score]:
    """What a larger ``training.min_relative_scale`` would do, without retraining: a channel whose scale the
    larger floor raises from s to s' has its cell errors times (s / s')**2 (first order: the network's input
    changes too, so this is an estimate). Scales from the file's training rows, as the real scaler's."""
    cfg = SensordConfig()
    train = split_windows(load_csv(data / r["name"], cfg.data, require_labels=True).slice(0, FIT_ROWS),
                          cfg).train_values.astype(np.float64)
    std, level = train.std(axis=0), np.abs(train.mean(axis=0))
    now = np.maximum(std, cfg.training.min_relative_scale * level)

    def weighted(w: np.ndarray) -> Score:
        return lambda cells: (cells.astype(np.float64) * w).mean(axis=(1, 2))
    return {f"floor-{f:g}": weighted((now / np.maximum(std, f * level)) ** 2) for f in floors}


def analyse(results: list[dict[str, Any]], factors: list[float], max_far: float, data: Path | None = None,
            floors: tuple[float, ...] = (0.02, 0.03, 0.05)) -> list[str]:
    dets = [DetectorConfig(raise_after=ra, clear_after=10) for ra in (1, 3)]
    table: dict[tuple[str, float, int], dict[tuple[int, str], Confusion]] = defaultdict(
        lambda: defaultdict(Confusion))
    for r in results:
        group = r["name"].split("/")[0]
        extra = floor_scores(r, data, list(floors)) if data is not None else {}
        for name, score in (variants(r) | extra).items():
            errors, worst = score(r["all"]), float(score(r["val"]).max())
            for fac in factors:
                for d in dets:
                    c = _confusion(r, errors, fac * worst, d)
                    table[(name, fac, d.raise_after)][(r["seed"], group)] += c
                    table[(name, fac, d.raise_after)][(r["seed"], "all")] += c
    return _ranked({(k[0], k[1], k[2], 10): v for k, v in table.items()}, max_far, "score")


def _ranked(table: dict[tuple[str, float, int, int], dict[tuple[int, str], Confusion]], max_far: float,
            what: str) -> list[str]:
    seeds = sorted({s for cs in table.values() for s, _ in cs})
    rows = []
    for key, cs in table.items():
        f1 = [cs[(s, "all")].f1 for s in seeds]
        far = float(np.mean([cs[(s, "all")].far for s in seeds]))
        groups = [float(np.mean([cs[(s, g)].f1 for s in seeds])) for g in ("valve1", "other")]
        if far <= max_far:
            rows.append((float(np.mean(f1)), key, min(f1), far, groups))
    rows.sort(key=lambda x: -x[0])
    out = [f"{what:24} {'factor':>6} {'raise':>5} {'clear':>5}  F1 mean  F1 min  FAR    valve1  other"]
    out += [f"{k[0]:24} {k[1]:6} {k[2]:5} {k[3]:5}  {f1:7.3f} {mn:7.3f} {far * 100:5.1f} %  {g[0]:.3f}  {g[1]:.3f}"
            for f1, k, mn, far, g in rows]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--seeds", default="42,1,7")
    c.add_argument("--jobs", type=int, default=2)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--set", default="", help="YAML merged over the defaults, e.g. '{model: {conv_stride: 2}}'")
    a = sub.add_parser("analyse")
    a.add_argument("pickle", type=Path)
    a.add_argument("--factors", default="2.5,3,3.5,4,5")
    a.add_argument("--max-far", type=float, default=0.13)
    a.add_argument("--clear-on", action="store_true", help="the asymmetric detector instead of the scores")
    a.add_argument("--where", action="store_true", help="where the default's false alarms and misses fall")
    a.add_argument("--data", type=Path, help="the SKAB files: also estimate larger scale floors (floor-*)")
    args = ap.parse_args()
    if args.cmd == "collect":
        raw = config_to_dict(SensordConfig())
        for section, values in (yaml.safe_load(args.set) or {}).items():
            raw.setdefault(section, {}).update(values)
        cfg = config_from_dict(raw)
        tasks = [(p, args.data, config_to_dict(with_seed(cfg, int(s))))
                 for s in args.seeds.split(",") for p in skab_files(args.data)]
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=init_training_worker) as pool:
            results = list(pool.map(collect_one, tasks))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(pickle.dumps(results))
    else:
        results = pickle.loads(args.pickle.read_bytes())  # our own cache file, so unpickling it is safe
        factors = [float(f) for f in args.factors.split(",")]
        if args.where:
            print("\n".join(where(results, factors[0])))
        elif args.clear_on:
            print("\n".join(clear_on_table(results, factors, args.max_far)))
        else:
            print("\n".join(analyse(results, factors, args.max_far, args.data)))


if __name__ == "__main__":
    main()
