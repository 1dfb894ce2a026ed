"""How much a file's threshold moves with the seed, per cached ``bench/skab_cv.py`` variant.

The seed variance of the SKAB figures comes mostly from the threshold (README: "the threshold moves by
20-30 % with the seed"). This reads the variants ``skab_cv.py`` cached (the threshold evidence of every
file and seed), re-fits the given thresholds on it, and prints per variant the median and 90th percentile
over files of the threshold's relative spread across seeds (max / min - 1), and the median ratio of a
file's mean threshold to the first variant's.

    python bench/skab_threshold_spread.py --cache out/cv --variants default,cf4 --seeds 42,1,7 \
        --threshold 'method: max_factor, factor: 3.0'
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
import yaml

from sensord.config import config_from_dict
from sensord.threshold import ThresholdCalibrator


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--variants", required=True, help="comma-separated names cached by skab_cv.py")
    ap.add_argument("--seeds", default="42,1,7")
    ap.add_argument("--threshold", action="append", required=True,
                    help="a threshold section as YAML flow mapping; repeat for several")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{'variant':<10} {'threshold':<42} {'evidence':>8} {'spread med':>10} {'spread p90':>10} "
          f"{'thr ratio':>9}")
    base: dict[str, np.ndarray] = {}
    for th_text in args.threshold:
        th = yaml.safe_load("{" + th_text + "}")
        calib = ThresholdCalibrator(config_from_dict({"threshold": th}).threshold)
        for variant in args.variants.split(","):
            per_file: dict[str, list[float]] = {}
            evidence = 0
            for seed in seeds:
                results = pickle.loads((Path(args.cache) / f"{variant}-seed{seed}.pickle").read_bytes())
                for fr in results:
                    per_file.setdefault(fr.name, []).append(calib.fit(fr.validation_errors).value)
                    evidence = len(fr.validation_errors)
            names = sorted(per_file)
            values = np.array([per_file[n] for n in names])  # (files, seeds)
            spread = values.max(axis=1) / values.min(axis=1) - 1
            mean = values.mean(axis=1)
            key = th_text
            ratio = "" if key not in base else f"{float(np.median(mean / base[key])):9.2f}"
            base.setdefault(key, mean)
            print(f"{variant:<10} {th_text:<42} {evidence:>8} {np.median(spread):10.1%} "
                  f"{np.quantile(spread, 0.9):10.1%} {ratio:>9}")
    print("\nspread: max/min - 1 of a file's threshold over the seeds (median and 90th percentile over files);"
          "\nthr ratio: median over files of the mean threshold relative to the first variant's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
