"""Compare variants by their F1/FAR frontier: ``bench/skab_cv.py --json`` files side by side.

For each cap on the false-alarm rate, the best pooled F1 among a file's threshold x hysteresis candidates
whose mean FAR (pooled, or each group's) is under it, with the lowest seed's F1 and the two groups' figures;
then the shipped operating point (``--point``). Comparing whole frontiers, not one operating point each,
keeps a variant that only moves along the trade-off from looking like a gain.

    python bench/skab_frontier.py out/cv5-nodrift.json out/cv5-drift.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def fmt(r: Row | None) -> str:
    if r is None:
        return "-"
    a, v, o = r["all"], r["valve1"], r["other"]
    return (f"{a['f1']:.3f} (min {a['f1_min']:.3f}) @{100 * a['far']:4.1f}% "
            f"[valve1 {v['f1']:.3f}/{100 * v['far']:4.1f}% other {o['f1']:.3f}/{100 * o['far']:4.1f}%]")


def best(rows: list[Row], ok: Callable[[Row], bool]) -> Row | None:
    fits = [r for r in rows if ok(r)]
    return max(fits, key=lambda r: r["all"]["f1"]) if fits else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--point", default="max_factor:3.0:3:10", help="method:value:raise:clear of the shipped point")
    args = ap.parse_args()
    data = {f: json.loads(f.read_text())["rows"] for f in args.files}
    for f in args.files:
        print(f"  [{args.files.index(f) + 1}] {f}")
    for cap in (0.06, 0.08, 0.09, 0.10, 0.11, 0.12):
        print(f"pooled FAR <= {100 * cap:3.0f} %")
        for i, f in enumerate(args.files):
            print(f"  [{i + 1}] {fmt(best(data[f], lambda r, c=cap: r['all']['far'] <= c))}")
    for cap in (0.10, 0.12, 0.15):
        print(f"each group's FAR <= {100 * cap:3.0f} %")
        for i, f in enumerate(args.files):
            print(f"  [{i + 1}] {fmt(best(data[f], lambda r, c=cap: max(r['valve1']['far'], r['other']['far']) <= c))}")
    method, value, raise_after, clear_after = args.point.split(":")
    print(f"the point {args.point}")
    for i, f in enumerate(args.files):
        hit = [r for r in data[f] if r["threshold"].get("method") == method
               and float(next(v for k, v in r["threshold"].items() if k != "method")) == float(value)
               and r["detector"] == {"raise_after": int(raise_after), "clear_after": int(clear_after)}]
        print(f"  [{i + 1}] {fmt(hit[0] if hit else None)}")


if __name__ == "__main__":
    main()
