"""Reading long-format CSV (one value a line, through the daemon's assembler) against the wide file of
the same readings, in the same run: what ``train``/``evaluate`` pay for taking a historian's export.

Writes ``--hours`` of one simulated pump (8 channels at 1 Hz) both ways, loads each ``--repeats`` times
and prints the median seconds, values per second and the long/wide ratio; checks the rows are equal.

    .venv/bin/python bench/long_format.py [--hours 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from sensord.dataio import load_csv
from sensord.simulator import CHANNELS, PumpSimulator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sim = PumpSimulator(seed=0).generate(int(args.hours * 3600))
    with tempfile.TemporaryDirectory() as tmp:
        wide, long = Path(tmp) / "wide.csv", Path(tmp) / "long.csv"
        ts = [repr(float(t)) for t in sim.timestamps]
        cells = [[repr(float(v)) for v in row] for row in sim.values]
        wide.write_text("timestamp," + ",".join(CHANNELS) + "\n"
                        + "".join(f"{t},{','.join(r)}\n" for t, r in zip(ts, cells, strict=True)))
        long.write_text("timestamp,device,channel,value\n" + "".join(
            f"{t},pump1,{ch},{v}\n" for t, r in zip(ts, cells, strict=True) for ch, v in zip(CHANNELS, r, strict=True)))
        times: dict[str, list[float]] = {"wide": [], "long": []}
        loaded = {}
        for _ in range(args.repeats):
            for name, path in (("wide", wide), ("long", long)):
                t0 = time.perf_counter()
                loaded[name] = load_csv(path, channels=CHANNELS)
                times[name].append(time.perf_counter() - t0)
    assert loaded["wide"].timestamps.tolist() == loaded["long"].timestamps.tolist()
    assert np.array_equal(loaded["wide"].values, loaded["long"].values)
    values = len(sim.timestamps) * len(CHANNELS)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(sim.timestamps)} rows x {len(CHANNELS)} channels ({values} values), median of {args.repeats}:")
    for name in ("wide", "long"):
        print(f"  {name:<5} {med[name]:7.2f} s  {values / med[name]:>10,.0f} values/s")
    print(f"  long / wide: {med['long'] / med['wide']:.1f}x (rows identical)")


if __name__ == "__main__":
    main()
