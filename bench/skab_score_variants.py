"""Does a different per-window score separate SKAB's faults better than the mean squared error?

Trains each file x seed once through the real training code, keeps every window's per-channel error
(and the training and validation windows'), then re-scores them with variants -- errors normalised per
channel by their healthy level, a Mahalanobis distance over log channel errors, an EWMA or running
median of the window error -- and re-decides them through the daemon's detector
(``evaluation.decide_rows``) at thresholds ``factor`` x the largest validation score:

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

from sensord.benchmark import FIT_ROWS, skab_files, with_seed
from sensord.bundle import ModelBundle
from sensord.config import DetectorConfig, SensordConfig, config_from_dict, config_to_dict
from sensord.dataio import load_csv
from sensord.evaluation import Confusion, ScoredSeries, decide_rows, score_series
from sensord.scorer import Scorer
from sensord.tflib import init_training_worker
from sensord.training import split_windows, train_bundle
from sensord.windows import WindowSpec

Score = Callable[[np.ndarray], np.ndarray]


def _per_channel(shares: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Per-channel errors back from the scorer's (error = mean over channels, shares summing to 1)."""
    return shares * errors[:, None] * shares.shape[1]


def collect_one(args: tuple[Path, Path, dict[str, Any]]) -> dict[str, Any]:
    path, data, raw = args
    cfg = config_from_dict(raw)
    series = load_csv(path, cfg.data, require_labels=True)
    healthy = series.slice(0, FIT_ROWS)
    with tempfile.TemporaryDirectory() as tmp:
        train_bundle(healthy, cfg, Path(tmp) / "m")
        bundle = ModelBundle.load(Path(tmp) / "m")
        scorer = Scorer(bundle)
        scored = score_series(series, scorer, WindowSpec(bundle.window_length, cfg.window.hop,
                                                         cfg.window.max_gap_seconds))
        split = split_windows(healthy, cfg)
        tr, va = scorer.score(split.train), scorer.score(split.validation)
        return {"name": str(path.relative_to(data)), "seed": cfg.training.seed, "n_rows": len(series),
                "labels": series.labels, "rows": scored.rows, "starts": scored.starts, "ends": scored.ends,
                "channels": bundle.channels, "all": _per_channel(scored.channel_shares, scored.errors),
                "train": _per_channel(tr.channel_shares, tr.errors),
                "val": _per_channel(va.channel_shares, va.errors)}


def variants(r: dict[str, Any]) -> dict[str, Score]:
    """Per-window scores from per-channel errors (B, C); statistics from the training windows only."""
    eps = 1e-12
    tr = r["train"]
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

    return {"mse": lambda e: e.mean(axis=1), "channel-normalised": lambda e: (e / mu).mean(axis=1),
            "channel-normalised-max": lambda e: (e / mu).max(axis=1), "mahalanobis-log": maha,
            "ewma-0.3": ewma(0.3), "ewma-0.15": ewma(0.15), "median-3": median(3), "median-5": median(5)}


def _confusion(r: dict[str, Any], errors: np.ndarray, threshold: float, det: DetectorConfig) -> Confusion:
    c = r["all"].shape[1]
    s = ScoredSeries(r["n_rows"], 1, r["rows"], r["starts"], r["ends"], errors,
                     np.full((len(errors), c), 1.0 / c), r["channels"])
    pred, _ = decide_rows(s, threshold, det)
    return Confusion.of(r["labels"][FIT_ROWS:], pred[FIT_ROWS:] == 1)


def analyse(results: list[dict[str, Any]], factors: list[float], max_far: float) -> list[str]:
    dets = [DetectorConfig(raise_after=ra, clear_after=10) for ra in (1, 3)]
    table: dict[tuple[str, float, int], dict[tuple[int, str], Confusion]] = defaultdict(
        lambda: defaultdict(Confusion))
    for r in results:
        group = r["name"].split("/")[0]
        for name, score in variants(r).items():
            errors, worst = score(r["all"]), float(score(r["val"]).max())
            for fac in factors:
                for d in dets:
                    c = _confusion(r, errors, fac * worst, d)
                    table[(name, fac, d.raise_after)][(r["seed"], group)] += c
                    table[(name, fac, d.raise_after)][(r["seed"], "all")] += c
    seeds = sorted({r["seed"] for r in results})
    rows = []
    for key, cs in table.items():
        f1 = [cs[(s, "all")].f1 for s in seeds]
        far = float(np.mean([cs[(s, "all")].far for s in seeds]))
        groups = [float(np.mean([cs[(s, g)].f1 for s in seeds])) for g in ("valve1", "other")]
        if far <= max_far:
            rows.append((float(np.mean(f1)), key, min(f1), far, groups))
    rows.sort(key=lambda x: -x[0])
    out = [f"{'score':24} {'factor':>6} {'raise':>5}  F1 mean  F1 min  FAR    valve1  other"]
    out += [f"{k[0]:24} {k[1]:6} {k[2]:5}  {f1:7.3f} {mn:7.3f} {far * 100:5.1f} %  {g[0]:.3f}  {g[1]:.3f}"
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
    a = sub.add_parser("analyse")
    a.add_argument("pickle", type=Path)
    a.add_argument("--factors", default="2.5,3,3.5,4,5")
    a.add_argument("--max-far", type=float, default=0.13)
    args = ap.parse_args()
    if args.cmd == "collect":
        cfg = SensordConfig()
        tasks = [(p, args.data, config_to_dict(with_seed(cfg, int(s))))
                 for s in args.seeds.split(",") for p in skab_files(args.data)]
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=init_training_worker) as pool:
            results = list(pool.map(collect_one, tasks))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(pickle.dumps(results))
    else:
        results = pickle.loads(args.pickle.read_bytes())  # our own cache file, so unpickling it is safe
        print("\n".join(analyse(results, [float(f) for f in args.factors.split(",")], args.max_far)))


if __name__ == "__main__":
    main()
