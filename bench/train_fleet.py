"""How long ``sensord train --per-device`` takes for N devices on this machine (default config).

Simulates N healthy pumps (different seeds, each a few degrees apart), writes one recording per device,
and times the real command once per ``--jobs`` value asked for, side by side:

    python bench/train_fleet.py --devices 20 --seconds 3600 --jobs 1,2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sensord.dataio import Series
from sensord.simulator import PumpSimulator

ROOT = Path(__file__).resolve().parent.parent


def write_recordings(out: Path, devices: int, seconds: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i in range(devices):
        sim = PumpSimulator(seed=100 + i).generate(seconds)
        values = np.asarray(sim.values, dtype=np.float64).copy()
        values[:, sim.channels.index("temperature")] += (i % 5) * 1.5  # sister pumps at other operating points
        s = Series(np.asarray(sim.timestamps), values.astype(np.float32), sim.channels, None)
        lines = [",".join(["timestamp", *s.channels])]
        lines += [",".join([f"{t:.3f}", *(f"{float(x):.6g}" for x in row)])
                  for t, row in zip(s.timestamps, s.values, strict=True)]
        (out / f"pump{i + 1:02d}.csv").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--seconds", type=int, default=3600, help="length of each healthy recording (1 Hz)")
    ap.add_argument("--jobs", default="2", help="comma-separated --jobs values to time")
    ap.add_argument("--config", help="training config (defaults when omitted)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sensord-fleet-") as tmp:
        data = Path(tmp) / "data"
        write_recordings(data, args.devices, args.seconds)
        for jobs in (int(j) for j in args.jobs.split(",")):
            out = Path(tmp) / f"models-{jobs}"
            cmd = [sys.executable, "-m", "sensord.cli", "train", "--data", str(data), "--out", str(out),
                   "--per-device", "--jobs", str(jobs), "--json", str(out / "summary.json")]
            if args.config:
                cmd[4:4] = ["--config", args.config]
            t0 = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            wall = time.monotonic() - t0
            if proc.returncode != 0:
                sys.exit(f"train failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
            models = json.loads((out / "summary.json").read_text())["models"]
            per = [m["seconds"] for m in models]
            epochs = [m["epochs"] for m in models]
            print(f"devices {args.devices} x {args.seconds} s, --jobs {jobs}: {wall:.1f} s wall, "
                  f"{wall / args.devices:.1f} s per device; per model median {np.median(per):.1f} s "
                  f"(min {min(per):.1f}, max {max(per):.1f}), epochs median {int(np.median(epochs))}", flush=True)


if __name__ == "__main__":
    main()
