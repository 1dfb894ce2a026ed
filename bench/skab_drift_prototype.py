"""The prototype that decided ``window.drift_channels``: SKAB copies with chosen channels drift-removed.

Before the filter went into the window buffer it was tried on rewritten CSVs: each chosen channel replaced
by ``x - (1 - keep) * (ewma - x0)``, the EWMA causal with time constant ``--seconds`` (1 Hz rows, started
at the file's first reading ``x0``, which is also the level). The copies then go through the unchanged
harness (``bench/skab_cv.py --data OUT``), so any difference comes from the inputs alone.
``--channels auto:F`` chooses per file the channels whose share of variance slower than 30 rows, over
the first 320 rows (the scaler's), reaches F: the data-driven rule that lost (README).

    python bench/skab_drift_prototype.py --data ../shared/datasets/skab/data --out out/skab-hp60 \\
        --channels Temperature,Thermocouple --seconds 60
    python bench/skab_cv.py --data out/skab-hp60 --seeds 42,1,7 --jobs 2 --max-far 0.15 --cache out/cv-hp60 \\
        --config bench/skab-no-drift.yaml

(run the harness with drift removal off, or the built-in filter would apply a second time.)
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

BLOCK, FIT = 30, 320


def slow_share(x: np.ndarray) -> np.ndarray:
    """Per channel: variance of the means of consecutive 30-row blocks over the rows' variance."""
    n = len(x) // BLOCK
    blocks = x[:n * BLOCK].reshape(n, BLOCK, x.shape[1]).mean(axis=1)
    total = x.var(axis=0)
    return np.asarray(blocks.var(axis=0) / np.where(total > 0, total, 1.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--channels", required=True, help="comma-separated names, or auto:F")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--keep", type=float, default=0.0)
    args = ap.parse_args()
    for path in sorted(args.data.rglob("*.csv")):
        rows = list(csv.reader(path.open(), delimiter=";"))
        header = rows[0]
        numeric = list(range(1, 9))  # SKAB: datetime, 8 sensors, anomaly, changepoint
        values = np.array([[float(r[i]) for i in numeric] for r in rows[1:]])
        if args.channels.startswith("auto:"):
            share = slow_share(values[:FIT])
            chosen = [numeric[i] for i in range(len(numeric)) if share[i] >= float(args.channels[5:])]
        else:
            chosen = [header.index(c) for c in args.channels.split(",")]
        alpha = 1.0 / args.seconds
        for col in chosen:
            x = np.array([float(r[col]) for r in rows[1:]])
            e, out = x[0], np.empty_like(x)
            for t, v in enumerate(x):
                e += alpha * (v - e)
                out[t] = v - (1.0 - args.keep) * (e - x[0])
            for r, v in zip(rows[1:], out, strict=True):
                r[col] = repr(float(v))
        dst = args.out / path.relative_to(args.data)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with dst.open("w", newline="") as fh:
            csv.writer(fh, delimiter=";").writerows(rows)
        print(dst, [header[c] for c in chosen])


if __name__ == "__main__":
    main()
