"""Serving throughput: MQTT payloads -> windows -> batched LiteRT scoring -> detector.

Runs the daemon's own Intake and ScoringLoop in-process (the publisher is a
counter, so the broker is not what is measured) and compares, in the same run,
batched scoring (``scoring.batch_max`` 64) against the one-window-per-call
baseline (batch_max 1). Prints medians over repeats, the ratio, and the peak
RSS of this serving-only process (TensorFlow is not imported).

    .venv/bin/python bench/throughput.py [--model DIR] [--devices 20] [--readings 600] [--repeats 5]
    .venv/bin/python bench/throughput.py --model single/ --compare ensemble/   # two bundles, same run
    .venv/bin/python bench/throughput.py --model DIR --profile   # where the time goes, intake and scoring apart

Without --model it trains a small bundle on simulated data first (needs the
[train] extra) in a subprocess, so this process stays TensorFlow-free.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sensord.config import SensordConfig, config_from_dict
from sensord.metrics import DaemonMetrics
from sensord.pipeline import Intake, ScoringLoop, ServingModel
from sensord.simulator import PumpSimulator
from sensord.sinks import AlertPublisher


class CountingPublisher:
    def __init__(self) -> None:
        self.count = 0

    def publish(self, topic: str, payload: str | bytes, qos: int = 0, retain: bool = False) -> None:
        self.count += 1


def payloads(devices: int, readings: int) -> list[tuple[str, bytes]]:
    sim = PumpSimulator(seed=1)
    series = sim.generate(readings)
    out = []
    for i in range(readings):
        body = {"ts": float(series.timestamps[i]),
                "values": dict(zip(series.channels, np.round(series.values[i], 5).tolist(), strict=False))}
        raw = json.dumps(body).encode()
        for d in range(devices):
            out.append((f"sensors/dev{d}/telemetry", raw))
    return out


def run_once(cfg: SensordConfig, msgs: list[tuple[str, bytes]], expected_windows: int) -> float:
    metrics = DaemonMetrics()
    model = ServingModel.load(cfg)
    scoring = ScoringLoop(metrics, AlertPublisher(CountingPublisher(), "bench"), cfg.daemon.queue_size,
                          cfg.scoring.batch_max, cfg.daemon.batch_wait_seconds)
    intake = Intake(cfg, model, scoring, metrics)
    scoring.start()
    t0 = time.perf_counter()
    for topic, raw in msgs:
        intake.on_message(topic, raw)
    scoring.drain(timeout=600)
    elapsed = time.perf_counter() - t0
    scored = sum(s.value for m in metrics.registry.collect() if m.name == "sensord_windows_scored"
                 for s in m.samples if s.name.endswith("_total"))
    if scored != expected_windows:
        raise SystemExit(f"expected {expected_windows} windows scored, got {scored}")
    return len(msgs) / elapsed


def train_small(out: Path) -> None:
    code = ("from pathlib import Path; from sensord.simulator import simulate; from sensord.dataio import load_csv;"
            "from sensord.config import SensordConfig; from sensord.training import train_bundle;"
            f"h, _ = simulate(Path({str(out)!r}) / 'data', seconds=900);"
            f"train_bundle(load_csv(h), SensordConfig(), Path({str(out)!r}) / 'model')")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--readings", type=int, default=600, help="readings per device")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compare", help="a second bundle (e.g. an ensemble) scored batched beside --model")
    ap.add_argument("--profile", action="store_true", help="cProfile intake and scoring (one thread each, "
                    "run one after the other) instead of timing them")
    args = ap.parse_args()
    if args.compare:
        return compare(args)
    if args.profile:
        return profile(args)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            train_small(Path(tmp))
            model_dir = str(Path(tmp) / "model")
        msgs = payloads(args.devices, args.readings)
        results: dict[int, list[float]] = {64: [], 1: []}
        length = None
        for _ in range(args.repeats):
            for batch_max in (64, 1):  # interleaved, so machine noise hits both alike
                raw: dict[str, Any] = {"daemon": {"model": model_dir, "max_devices": args.devices,
                                                  "queue_size": 1_000_000, "batch_wait_seconds": 0.0},
                                       "scoring": {"batch_max": batch_max}}
                cfg = config_from_dict(raw)
                length = ServingModel.load(cfg).bundle.window_length
                expected = args.devices * (args.readings - length + 1)
                results[batch_max].append(run_once(cfg, msgs, expected))
    batched, single = statistics.median(results[64]), statistics.median(results[1])
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"devices {args.devices} x readings {args.readings} = {len(msgs)} messages, window {length}, "
          f"{args.repeats} repeats (medians)")
    print(f"batched scoring (batch_max 64):   {batched:10.0f} readings/s")
    print(f"one window per call (batch_max 1): {single:10.0f} readings/s")
    print(f"ratio batched / per-window:        {batched / single:10.2f}x")
    print(f"peak RSS of this serving process:  {rss_mb:10.1f} MiB; tensorflow imported: "
          f"{'tensorflow' in sys.modules}")
    return 0


def profile(args: argparse.Namespace) -> int:
    """The network thread's work (every message through Intake, windows queued) and then the scoring
    thread's (the queued windows in batches of batch_max), each under cProfile in this thread: the top
    functions by own time, so the costs of the intake path and of the scoring path are seen apart."""
    import cProfile
    import pstats

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            train_small(Path(tmp))
            model_dir = str(Path(tmp) / "model")
        cfg = config_from_dict({"daemon": {"model": model_dir, "max_devices": args.devices, "queue_size": 1_000_000},
                                "scoring": {"batch_max": 64}})
        msgs = payloads(args.devices, args.readings)
        metrics = DaemonMetrics()
        model = ServingModel.load(cfg)
        scoring = ScoringLoop(metrics, AlertPublisher(CountingPublisher(), "bench"), cfg.daemon.queue_size,
                              cfg.scoring.batch_max, cfg.daemon.batch_wait_seconds)
        intake = Intake(cfg, model, scoring, metrics)
        for label, work in (("intake (network thread)", lambda: [intake.on_message(t, r) for t, r in msgs]),
                            ("scoring (scoring thread)", lambda: _score_queued(scoring))):
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.runcall(work)
            elapsed = time.perf_counter() - t0
            print(f"\n== {label}: {len(msgs)} readings in {elapsed:.2f} s under the profiler "
                  f"({len(msgs) / elapsed:.0f} readings/s)")
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return 0


def _score_queued(scoring: ScoringLoop) -> None:
    while not scoring.queue.empty():
        scoring.process(scoring._take_batch())


def compare(args: argparse.Namespace) -> int:
    """Batched serving of two bundles, interleaved repeats: the cost of a bigger model, as a ratio."""
    msgs = payloads(args.devices, args.readings)
    rates: dict[str, list[float]] = {args.model: [], args.compare: []}
    per_window: dict[str, float] = {}
    for _ in range(args.repeats):
        for model_dir in (args.model, args.compare):
            cfg = config_from_dict({"daemon": {"model": model_dir, "max_devices": args.devices,
                                               "queue_size": 1_000_000, "batch_wait_seconds": 0.0},
                                    "scoring": {"batch_max": 64}})
            length = ServingModel.load(cfg).bundle.window_length
            expected = args.devices * (args.readings - length + 1)
            rates[model_dir].append(run_once(cfg, msgs, expected))
            per_window[model_dir] = len(msgs) / expected  # readings per scored window
    print(f"devices {args.devices} x readings {args.readings} = {len(msgs)} messages, batch_max 64, "
          f"{args.repeats} interleaved repeats (medians)")
    for model_dir, vals in rates.items():
        members = ServingModel.load(config_from_dict({"daemon": {"model": model_dir}})).scorer.members
        r = statistics.median(vals)
        print(f"{model_dir} ({members} member{'s' if members > 1 else ''}): {r:10.0f} readings/s, "
              f"{1e6 / (r / per_window[model_dir]):6.1f} us per window (intake, scoring, detector)")
    a, b = statistics.median(rates[args.model]), statistics.median(rates[args.compare])
    print(f"ratio {args.compare} / {args.model}: {b / a:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
