"""The ``sensord`` command line.

Exit statuses follow sysexits and come from the error types in
:mod:`sensord.errors`: 78 (EX_CONFIG) for a bad config or model bundle, so
systemd's ``RestartPreventExitStatus=78`` does not restart-loop on a mistake
only a person can fix; 65 (EX_DATAERR) for unusable data files; 64 (EX_USAGE)
for an out-of-range argument; 69 (EX_UNAVAILABLE) when the machine lacks what
is needed (the metrics port, mosquitto, TensorFlow on a serving-only install).
Anything else is a bug in sensord: its traceback is printed and the status is
70 (EX_SOFTWARE), never "bad input".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Only the standard library at import time (sensord.errors is nothing else): ``sensord run`` installs its
# signal handlers before numpy, pydantic, LiteRT and the model are loaded (see ``main``); everything else
# is imported where it is used.
from . import __version__
from .errors import EX_OK, EX_SOFTWARE, SensordError, UnavailableError, UsageError

log = logging.getLogger("sensord")


def setup_logging(level: str = "INFO") -> None:
    """Plain lines; under systemd (JOURNAL_STREAM set) journald adds the timestamp itself."""
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") \
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level), format=fmt, stream=sys.stderr, force=True)
    for noisy in ("absl", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _pct(x: float) -> str:
    return f"{100 * x:5.1f} %"


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        log.info("wrote %s", path)


def _epoch_printer() -> Any:
    """A one-line live progress display on a terminal, plain log lines otherwise."""
    tty = sys.stderr.isatty()

    def show(epoch: int, total: int, logs: dict[str, float]) -> None:
        line = f"epoch {epoch}/{total} loss={logs.get('loss', float('nan')):.6f} " \
               f"val_loss={logs.get('val_loss', float('nan')):.6f}"
        if tty:
            sys.stderr.write("\r" + line + "   ")
            sys.stderr.flush()
        else:
            log.info(line)
    return show


# The sections ``ServingModel.load`` reads: with these valid, --model is checked even if others are not.
_MODEL_SECTIONS = ("data", "window", "scoring", "detector")


def cmd_check_config(args: argparse.Namespace) -> int:
    """Every problem in one pass: the schema's, the files the config names, the model's; exit 78 if any.

    When the document has schema errors, the files of the ``mqtt`` / ``metrics`` sections that are valid on
    their own are still checked, and the model too if the sections it needs are valid.
    """
    from .config import ConfigError, SensordConfig, config_from_dict, read_config_document, valid_sections
    from .daemon import referenced_file_problems
    from .errors import EX_CONFIG
    raw = read_config_document(args.config)  # unreadable or not YAML: nothing else can be checked
    errors: list[str] = []
    full: SensordConfig | None = None  # the whole config, when it is valid
    cfg: SensordConfig | None  # what the model is checked against: the whole config or its model sections
    try:
        full = cfg = config_from_dict(raw, args.config)
        sections: dict[str, Any] = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SensordConfig)}
    except ConfigError as exc:
        errors += exc.errors
        sections = valid_sections(raw)
        cfg = SensordConfig(**{k: sections[k] for k in _MODEL_SECTIONS}) \
            if all(k in sections for k in _MODEL_SECTIONS) else None
    errors += referenced_file_problems(sections.get("mqtt"), sections.get("metrics"))[1]
    model_error: SensordError | None = None
    checked_models: list[str] = []
    if args.model and cfg is not None:
        from .pipeline import ServingModel
        try:
            ServingModel.load(cfg, args.model, own_window=bool(cfg.daemon.models))  # exactly what ``run`` checks
        except SensordError as exc:
            model_error = exc
    elif not args.model and full is not None and full.daemon.models:
        # Every bundle ``run`` would serve: loaded, checked against its entry and self-checked.
        from .models import check_bundles
        problems, passed = check_bundles(full)
        errors += problems
        checked_models = passed
    elif not args.model and full is not None and full.assembly.sample_period_seconds is None \
            and full.assembly_needed() is not None:
        # The assembly clock is then the model's: look at the bundle ``run`` would serve, if it is there.
        from .bundle import BundleError, ModelBundle
        try:
            bundle = ModelBundle.load(full.daemon.reference_model())
        except BundleError:
            pass  # (--model checks the bundle itself)
        else:
            try:
                full.assembly_period(bundle.sample_period_seconds, f"model {bundle.path}")
            except ConfigError as exc:
                errors += exc.errors
    if errors:
        report(ConfigError(errors, args.config))
    if model_error is not None:
        report(model_error)
    if args.model and cfg is None:
        print(f"sensord: model not checked: the config's {', '.join(_MODEL_SECTIONS)} sections must be valid "
              "first", file=sys.stderr)
    if errors:
        return EX_CONFIG
    if model_error is not None:
        return model_error.exit_status
    print(f"OK {args.config}" + (f" (model {args.model})" if args.model else "")
          + (f" ({len(checked_models)} bundles of daemon.models)" if checked_models else ""))
    for line in checked_models:
        print(f"  {line}")
    return EX_OK


def cmd_train(args: argparse.Namespace) -> int:
    require_train_extra("tensorflow")
    from .config import load_config
    from .dataio import load_recordings
    from .training import train_bundle
    if args.per_device or args.group:
        return _train_many(args)
    if Path(args.data).is_dir():
        raise UsageError(f"--data {args.data} is a directory: give --per-device and/or --group NAME=GLOB to "
                         "train a model per recording or per group of recordings")
    cfg = load_config(args.config)
    found = load_recordings(args.data, cfg.data, assembly=cfg.assembly)  # a long file may hold several devices
    show = _epoch_printer()
    bundle = train_bundle(found if len(found) > 1 else found[0], cfg, args.out, on_epoch=show)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    t = bundle.threshold
    print(f"model {bundle.model_id} written to {bundle.path}")
    print(f"  channels ({len(bundle.channels)}): {', '.join(bundle.channels)}")
    tr = bundle.training
    if "cross_fit" in tr:
        k = tr["cross_fit"]["blocks"]
        rows = f"rows {tr['rows']} in {k} blocks (member k trained without block k)"
        epochs = f"epochs {'/'.join(str(m['epochs_run']) for m in tr['cross_fit']['members'])} per member"
    else:
        rows = f"rows {tr['train_rows']} train / {tr['validation_rows']} validation"
        epochs = f"epochs {tr['epochs_run']} (best {tr['best_epoch']})"
    print(f"  window {bundle.window_length}, {rows}, {epochs}, {tr['duration_seconds']:.1f} s")
    evidence = "out-of-fold" if "cross_fit" in tr else "validation"
    print(f"  threshold {t.value:.6g} ({t.method} {t.params}); {evidence} errors mean "
          f"{t.validation_stats['mean']:.4g}, p99 {t.validation_stats['p99']:.4g}, max {t.validation_stats['max']:.4g}")
    return EX_OK


def _train_many(args: argparse.Namespace) -> int:
    """``train --per-device`` / ``--group``: one bundle per device or group under ``--out``, and a table."""
    import time

    from .config import config_to_dict, load_config
    from .errors import EX_DATAERR
    from .fleet import parse_group, plan_models, recordings, train_fleet
    if args.jobs < 1:
        raise UsageError(f"--jobs: must be at least 1, got {args.jobs}")
    groups = [parse_group(g) for g in args.group]
    cfg = load_config(args.config)
    plans, unused = plan_models(recordings(Path(args.data)), groups, args.per_device)
    for f in unused:
        log.warning("%s matches no --group and --per-device is not given: not used", f)
    if not plans:
        raise UsageError(f"--data {args.data}: no recording matches a --group (add --per-device?)")
    print(f"training {len(plans)} models from {args.data} into {args.out} with {args.jobs} worker processes")
    t0 = time.monotonic()
    print(f"{'model':<20} {'files':>5} {'train/val windows':>13} {'threshold':>10} {'validation error range':>21} "
          f"{'epochs':>6} {'s':>6}")

    def row(r: Any) -> None:
        if r.error:
            print(f"{r.name:<20} {len(r.files):>5}  FAILED: {r.error}")
        else:
            print(f"{r.name:<20} {len(r.files):>5} {r.train_windows:>6}/{r.validation_windows:<6} "
                  f"{r.threshold:>10.4g} {r.validation_error_min:>10.4g}-{r.validation_error_max:<10.4g} "
                  f"{r.epochs:>6} {r.seconds:>6.1f}", flush=True)
    results = train_fleet(plans, config_to_dict(cfg), Path(args.out), args.jobs, row)
    failed = [r for r in results if r.error]
    wall = time.monotonic() - t0
    print(f"{len(results) - len(failed)} of {len(results)} models written to {args.out} in {wall:.1f} s")
    _write_json(args.json, {"models": [dataclasses.asdict(r) for r in results], "unused": [str(f) for f in unused],
                            "seconds": round(wall, 1), "jobs": args.jobs})
    return EX_DATAERR if failed else EX_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .bundle import ModelBundle
    from .config import SensordConfig, load_config
    from .dataio import load_csv
    from .evaluation import evaluate_series
    from .scorer import Scorer
    from .windows import window_spec
    cfg = load_config(args.config) if args.config else SensordConfig()
    bundle = ModelBundle.load(args.model)
    if args.hop is not None and not 1 <= args.hop <= bundle.window_length:
        raise UsageError(f"--hop: must be between 1 and the window length {bundle.window_length}, got {args.hop}")
    # Without --config, the window the bundle was trained with.
    spec = window_spec(cfg.window if args.config else None, bundle, hop=args.hop)
    data_cfg = dataclasses.replace(cfg.data, label_column=args.label_column)
    series = load_csv(args.data, data_cfg, channels=bundle.channels, require_labels=True, assembly=cfg.assembly,
                      period=bundle.sample_period_seconds)
    res = evaluate_series(series, Scorer(bundle), spec, cfg.detector, top_k=cfg.scoring.top_channels)
    c = res.confusion
    print(f"model {bundle.model_id}  data {args.data}")
    print(f"rows {res.rows} (unscored {res.unscored_rows}), windows {res.windows}, "
          f"threshold {bundle.threshold.value:.6g}")
    w = res.window_counts
    print(f"windows: normal under threshold {w['normal_under']}/{w['normal_under'] + w['normal_over']}, "
          f"anomalous over threshold {w['anomalous_over']}/{w['anomalous_over'] + w['anomalous_under']}")
    print(f"rows: TP {c.tp}  FP {c.fp}  TN {c.tn}  FN {c.fn}")
    print(f"F1 {c.f1:.3f}  FAR {_pct(c.far)}  MAR {_pct(c.mar)}")
    detected = sum(s.detected for s in res.segments)
    delay = res.mean_delay_seconds
    print(f"anomaly segments {len(res.segments)}, detected {detected}, mean detection delay "
          + (f"{delay:.1f} s ({res.mean_delay_rows:.1f} rows)" if delay is not None else "n/a"))
    print(f"alerts raised {sum(a.state == 'raised' for a in res.alerts)}")
    _write_json(args.json, {"model_id": bundle.model_id, "data": str(args.data),
                            "threshold": bundle.threshold.value, **res.as_dict()})
    return EX_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from .bundle import ModelBundle
    from .calibration import calibrate
    from .config import SensordConfig, load_config
    from .dataio import load_csv
    cfg = load_config(args.config) if args.config else SensordConfig()
    bundle = ModelBundle.load(args.model)
    series = load_csv(args.data, cfg.data, channels=bundle.channels, assembly=cfg.assembly,
                      period=bundle.sample_period_seconds)
    res = calibrate(bundle, series, cfg.threshold, cfg.window if args.config else None,
                    Path(args.out) if args.out else None)
    new, old = res.bundle.threshold, bundle.threshold
    print(f"model {res.bundle.model_id} written to {res.bundle.path} (was {bundle.model_id})")
    print(f"  threshold {new.value:.6g} ({new.method} {new.params}), was {old.value:.6g}: {res.ratio:.2f}x")
    print(f"  {res.windows} healthy windows from {args.data}: error mean {float(res.errors.mean()):.4g}, "
          f"p99 {float(np.quantile(res.errors, 0.99)):.4g}, max {float(res.errors.max()):.4g}")
    if not 0.5 <= res.ratio <= 2.0:
        log.warning("the new threshold is %.2fx the old one: make sure %s holds only healthy readings",
                    res.ratio, args.data)
    if res.bundle.path == bundle.path:
        print("  a running daemon serving this bundle applies it on SIGHUP (systemctl reload sensord)")
    _write_json(args.json, {"model_id": res.bundle.model_id, "previous_model_id": bundle.model_id,
                            "path": str(res.bundle.path), "threshold": new.to_dict(),
                            "previous_threshold": old.value, "ratio": res.ratio, "windows": res.windows})
    return EX_OK


def parse_seeds(text: str, base: int) -> list[int]:
    """``--seeds 5`` means five seeds from ``training.seed`` on; ``--seeds 42,1,7`` means exactly those
    (and ``--seeds 7,`` the one seed 7).

    >>> parse_seeds("3", 42), parse_seeds("42,1,7", 0), parse_seeds("7,", 0)
    ([42, 43, 44], [42, 1, 7], [7])
    """
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return [base + i for i in range(n)]
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--seeds: expected a count >= 1 or a comma-separated list of integers, "
                         f"got {text!r}") from None
    if len(set(seeds)) != len(seeds) or not seeds:
        raise UsageError(f"--seeds: seeds must be distinct, got {text!r}")
    return seeds


def cmd_bench_skab(args: argparse.Namespace) -> int:
    require_train_extra("tensorflow")
    from .benchmark import run_skab
    from .config import SensordConfig, load_config
    cfg = load_config(args.config) if args.config else SensordConfig()
    seeds = parse_seeds(args.seeds, cfg.training.seed) if args.seeds else None
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    if jobs < 1:
        raise UsageError(f"--jobs: must be at least 1, got {jobs}")
    print(f"{'file':<18} {'seed':>5} {'F1':>6} {'FAR':>8} {'MAR':>8} {'delay s':>8} {'train s':>8}")

    def row(fr: Any) -> None:
        c = fr.result.confusion
        d = fr.result.mean_delay_seconds
        print(f"{fr.name:<18} {fr.seed:>5} {c.f1:6.3f} {_pct(c.far):>8} {_pct(c.mar):>8} "
              f"{(f'{d:.0f}' if d is not None else '-'):>8} {fr.train_seconds:8.1f}", flush=True)

    work = Path(args.work_dir) if args.work_dir else None
    report = run_skab(Path(args.data), cfg, work, on_file=row, seeds=seeds, jobs=jobs)
    print("-" * 68)
    for r in report["seeds"]:
        p = r["pooled"]
        print(f"{'pooled, seed ' + str(r['seed']):<24} {p['f1']:6.3f} {_pct(p['far']):>8} {_pct(p['mar']):>8}")
    sm = report["summary"]
    if len(report["seeds"]) > 1:
        for key in ("mean", "min", "max"):
            print(f"{key + ' over seeds':<24} {sm['f1'][key]:6.3f} {_pct(sm['far'][key]):>8} "
                  f"{_pct(sm['mar'][key]):>8}")
    print(f"({report['protocol']['files']} files x {len(report['seeds'])} seeds, causal, "
          f"{report['duration_seconds']:.0f} s with {jobs} worker(s))")
    print("published (SKAB leaderboard, whole corpus of 34 files):")
    for pub in report["published"]:
        far = _pct(pub["far"]) if pub["far"] is not None else "-"
        mar = _pct(pub["mar"]) if pub["mar"] is not None else "-"
        print(f"  {pub['method']:<28} F1 {pub['f1']:.2f}  FAR {far:>8}  MAR {mar:>8}")
    _write_json(args.json, report)
    return EX_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulator import simulate
    healthy, labelled = simulate(Path(args.out), seconds=args.seconds, faults=args.faults, seed=args.seed)
    print(f"healthy run:  {healthy}")
    print(f"labelled run: {labelled}")
    return EX_OK


def cmd_record(args: argparse.Namespace) -> int:
    from .record import cli_record
    return cli_record(args)


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import run
    return run(args.config)


def cmd_plot(args: argparse.Namespace) -> int:
    require_train_extra("matplotlib", "tensorflow")
    from .config import load_config
    from .plots import make_plots
    cfg = load_config(args.config) if args.config else None
    for path in make_plots(Path(args.model), Path(args.data), Path(args.out), label_column=args.label_column,
                           config=cfg):
        print(path)
    return EX_OK


def cmd_demo(args: argparse.Namespace) -> int:
    require_train_extra("tensorflow")
    from .demo import run_demo
    return run_demo(Path(args.workdir), rate=args.rate, config=args.config)


def require_train_extra(*modules: str) -> None:
    """On a serving-only install (no ``train`` extra), say what to install, before any data is read: a large
    CSV is not loaded only to fail at the first TensorFlow import, and no traceback stands in for a sentence."""
    import importlib.util
    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise UnavailableError(f"needs the train extra: pip install 'sensord[train]' ({name} is not installed)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sensord", description="Streaming sensor-monitoring daemon.")
    p.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level (default INFO; run switches to the config's logging.level once loaded)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="what to do (COMMAND --help: its options)")

    s = sub.add_parser("run", help="run the daemon: MQTT in, alerts and metrics out")
    s.add_argument("--config", required=True, help="the daemon's YAML config (e.g. /etc/sensord/sensord.yaml)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("record", help="record the devices' readings, one CSV per device in the format train reads")
    s.add_argument("--config", required=True, help="the daemon's YAML config: broker, subscriptions, data.channels")
    s.add_argument("--out", required=True, help="directory for <device>.csv (new, or without recordings in it)")
    s.add_argument("--duration", required=True, help="how long: seconds, or e.g. 90s, 15m, 24h, 1h30m, 2d "
                                                     "(SIGINT/SIGTERM stop earlier; the files stay complete)")
    s.add_argument("--devices", help="record only the devices whose id matches this glob, e.g. 'pump*'")
    s.set_defaults(func=cmd_record)

    s = sub.add_parser("demo", help="simulate, train, run the daemon against a private broker, show alerts")
    s.add_argument("--workdir", default="demo-run", help="where data, model, config and logs go")
    s.add_argument("--config", help="YAML config for training and the daemon (defaults when omitted)")
    s.add_argument("--rate", type=float, default=400.0, help="readings published per second")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("check-config", help="validate a config file (and optionally a model bundle)")
    s.add_argument("--config", required=True, help="the YAML config to check, with the files it names")
    s.add_argument("--model", help="also load and validate this model bundle against the config")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("train", help="train a model bundle on a CSV of healthy readings")
    s.add_argument("--config", help="YAML config (built-in defaults when omitted)")
    s.add_argument("--data", required=True, help="CSV of healthy readings (a directory of <device>.csv "
                                                 "recordings with --per-device / --group)")
    s.add_argument("--out", required=True, help="bundle directory to write (with --per-device / --group: the "
                                                "directory that gets one bundle per device or group)")
    s.add_argument("--per-device", action="store_true",
                   help="one model per recording in --data (a directory), named after the file")
    s.add_argument("--group", action="append", default=[], metavar="NAME=GLOB",
                   help="one model NAME for the recordings whose device name matches GLOB (repeatable; a file "
                        "goes to the first group that matches)")
    s.add_argument("--jobs", type=int, default=2, help="worker processes for --per-device / --group (default 2)")
    s.add_argument("--json", help="with --per-device / --group: also write the summary to this JSON file")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("calibrate", help="refit a bundle's threshold on new healthy data, without retraining")
    s.add_argument("--model", required=True, help="bundle directory (written in place unless --out is given)")
    s.add_argument("--data", required=True, help="CSV of healthy readings with the model's channels")
    s.add_argument("--config", help="data/window/threshold settings (when omitted: the bundle's own window "
                                    "and the default threshold method)")
    s.add_argument("--out", help="write the new version here (a copy) instead of replacing the bundle")
    s.add_argument("--json", help="also write the result to this JSON file")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("evaluate", help="score a labelled CSV causally and report F1/FAR/MAR")
    s.add_argument("--model", required=True, help="bundle directory written by train")
    s.add_argument("--data", required=True, help="CSV of readings with a 0/1 label column")
    s.add_argument("--label-column", default="anomaly", help="name of the label column (default: anomaly)")
    s.add_argument("--config", help="data/window/detector settings (when omitted: the bundle's own window, "
                                    "default detector)")
    s.add_argument("--hop", type=int, default=None, help="window hop (default: config, else the bundle's)")
    s.add_argument("--json", help="also write the figures to this JSON file")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("plot", help="PNG pictures: input vs reconstruction, error histograms, latent space")
    s.add_argument("--model", required=True, help="bundle directory written by train")
    s.add_argument("--data", required=True, help="labelled CSV")
    s.add_argument("--label-column", default="anomaly", help="name of the label column (default: anomaly)")
    s.add_argument("--out", required=True, help="directory for the PNG files")
    s.add_argument("--config", help="data/window settings (the bundle's own window when omitted)")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("bench", help="benchmarks")
    bsub = s.add_subparsers(dest="bench", required=True, metavar="BENCH", help="which benchmark")
    b = bsub.add_parser("skab", help="SKAB outlier-detection protocol (fit on 400 rows per file)")
    b.add_argument("--data", required=True, help="SKAB data directory")
    b.add_argument("--config", help="YAML config (built-in defaults when omitted)")
    b.add_argument("--json", help="write pooled and per-file figures to this JSON file")
    b.add_argument("--work-dir", help="keep the per-file bundles here (default: a temp dir)")
    b.add_argument("--seeds", help="run the protocol once per seed: a count N (training.seed, +1, ...) "
                                   "or a list such as 42,1,7 (one seed: 7,); prints each seed's pooled "
                                   "figures and their "
                                   "mean/min/max")
    b.add_argument("--jobs", type=int, help="worker processes (default: min(2, CPUs))")
    b.set_defaults(func=cmd_bench_skab)

    s = sub.add_parser("simulate", help="write a healthy and a labelled CSV from the built-in pump simulator")
    s.add_argument("--out", required=True, help="directory for healthy.csv and labelled.csv")
    s.add_argument("--seconds", type=int, default=3600, help="length of the healthy run")
    s.add_argument("--faults", nargs="*", default=["step", "drift", "spikes", "stuck"],
                   help="faults to inject: step drift spikes stuck")
    s.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same files")
    s.set_defaults(func=cmd_simulate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from .signals import install_early
        install_early()  # before anything slow: a SIGHUP during start-up must not kill the daemon
    level = args.log_level or "INFO"
    setup_logging(level)
    try:
        return int(args.func(args))
    except SensordError as exc:
        report(exc)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a bug must not look like bad input
        traceback.print_exc(file=sys.stderr)
        print(f"sensord: internal error ({type(exc).__name__}); this is a bug in sensord, not a problem with "
              "the input: please report it with the traceback above", file=sys.stderr)
        return EX_SOFTWARE


def report(exc: SensordError) -> None:
    """One line per problem on stderr: ``sensord: <kind>: <message>``."""
    from .config import ConfigError
    if isinstance(exc, ConfigError):
        for e in exc.errors:
            print(f"sensord: config error: {exc.source + ': ' if exc.source else ''}{e}", file=sys.stderr)
    else:
        print(f"sensord: {exc.kind}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
