"""Live and offline assembly are one (issue 9 item 2, issue 8 part 5): the daemon fed single channels through
a private Mosquitto (report by exception, jittered stamps, a channel gone quiet, a late value) scores the
same windows with the same errors and decisions as ``evaluate``'s path on the same values written as a
long-format CSV. The daemon's clock is the bundle's recorded sampling period (no assembly period in the
config)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from e2e_support import wait_until
from test_daemon_e2e import DETECTOR, E2E, FAULT_START, FAULT_STOP, Models, W, with_step
from test_daemon_e2e import e2e as e2e
from test_daemon_e2e import models as models

from sensord.bundle import ModelBundle
from sensord.config import config_from_dict
from sensord.dataio import load_csv
from sensord.evaluation import decide_rows, score_series
from sensord.scorer import Scorer
from sensord.sinks import iso
from sensord.windows import window_spec

pytestmark = pytest.mark.e2e

ROWS = 300
ASSEMBLY = {"max_staleness_seconds": 3.0, "late_tolerance_seconds": 0.5}


def test_live_and_offline_assembly_give_the_same_windows_and_decisions(e2e: E2E, models: Models,
                                                                       tmp_path: Path) -> None:
    bundle = ModelBundle.load(models.bundle)
    assert bundle.sample_period_seconds == 1.0  # what the daemon's clock defaults to
    seg = with_step(models.labelled.slice(0, ROWS), FAULT_START, FAULT_STOP)
    chans, root = seg.channels, e2e.root
    d = e2e.start(mqtt={"publish_scores": True, "subscriptions": [
        {"topic": f"{root}/plant/+/+", "format": "topic_per_channel",
         "device_topic": f"{root}/plant/{{device}}/{{channel}}"}]}, assembly=ASSEMBLY)
    lines = ["timestamp,device,channel,value"]

    def send(ch: str, ts: float, value: float) -> None:
        e2e.stream.send_raw(f"{root}/plant/pump/{ch}", json.dumps({"value": value, "ts": ts}))
        lines.append(f"{ts!r},pump,{ch},{value!r}")

    for i in range(ROWS):
        base = float(seg.timestamps[i])
        for j, ch in enumerate(chans):
            if ch == "flow" and i % 7 == 3:
                continue  # not sent: held from the row before
            if ch == "pressure" and 100 <= i < 106:
                continue  # quiet for 6 s, longer than max_staleness: those ticks have no row
            jitter = 0.25 if j % 2 and i < ROWS - 1 else 0.0  # the last sample whole, so its tick is decided
            send(ch, base + jitter, float(seg.values[i, j]))
        if i == 50:
            send("current", base - 4.0, 99.0)  # too late for its tick: late_value, live and offline
    rec = Path(tmp_path / "long.csv")
    rec.write_text("\n".join(lines) + "\n")

    cfg = config_from_dict({"window": {"length": W}, "detector": DETECTOR, "assembly": ASSEMBLY})
    series = load_csv(rec, cfg.data, channels=bundle.channels, assembly=cfg.assembly,
                      period=bundle.sample_period_seconds)
    spec = window_spec(cfg.window, bundle)
    scored = score_series(series, Scorer(bundle), spec, "pump")
    predicted, alerts = decide_rows(scored, bundle.threshold.value, cfg.detector, "pump")
    offline = [(iso(end), bool(predicted[row] == 1)) for end, row in zip(scored.ends, scored.rows, strict=True)]
    assert len(series) < ROWS and len(offline) > 200 and any(a for _, a in offline)

    topic = f"{e2e.prefix}/scores/pump"
    wait_until(lambda: len(e2e.rec.messages(topic)) >= len(offline), 60, "every window's score")
    live = [json.loads(m.payload) for m in e2e.rec.messages(topic)]
    assert [(s["window_end"], s["alert"]) for s in live] == offline
    np.testing.assert_allclose([s["error"] for s in live], scored.errors, rtol=1e-5)
    wait_until(lambda: len(e2e.alerts("pump")) >= len(alerts), 15, "the alerts")
    assert [(a["state"], a["window_end"]) for a in e2e.alerts("pump")] == [(a.state, iso(a.window_end))
                                                                          for a in alerts]
    assert d.metric("sensord_readings_rejected_total", reason="late_value") == 1
    assert d.metric("sensord_readings_rejected_total", reason="incomplete_row") >= 1


def test_evaluate_and_train_take_the_long_form_of_a_wide_file(models: Models, tmp_path: Path) -> None:
    """``sensord evaluate`` on the long form of the labelled run (the label as a channel) gives the wide
    file's figures; ``sensord train`` accepts a long file and records its clock."""
    from sensord.cli import main

    wide = load_csv(models.labelled_csv, require_labels=True)
    assert wide.labels is not None
    lines = ["time,device,channel,value"]
    for t, row, label in zip(wide.timestamps, wide.values, wide.labels, strict=True):
        lines += [f"{float(t)!r},pump,{ch},{float(v)!r}" for ch, v in zip(wide.channels, row, strict=True)]
        lines.append(f"{float(t)!r},pump,anomaly,{int(label)}")
    long_csv = tmp_path / "labelled-long.csv"
    long_csv.write_text("\n".join(lines) + "\n")
    for name, data in (("wide", models.labelled_csv), ("long", long_csv)):
        assert main(["evaluate", "--model", str(models.bundle), "--data", str(data),
                     "--json", str(tmp_path / f"{name}.json")]) == 0
    got, want = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("long", "wide"))
    assert got.pop("data") != want.pop("data")
    assert got == want and want["windows"] > 1000  # every figure, every alert

    cfg = tmp_path / "train.yaml"
    cfg.write_text(json.dumps({"window": {"length": W}, "training": {"epochs": 2, "patience": 2},
                               "model": {"kind": "dense", "encoder_units": [8], "latent_units": 2}}))
    healthy = tmp_path / "healthy-long.csv"
    healthy.write_text("\n".join(line for line in lines[:1 + 9 * 400] if ",anomaly," not in line) + "\n")
    assert main(["train", "--config", str(cfg), "--data", str(healthy), "--out", str(tmp_path / "m")]) == 0
    trained = ModelBundle.load(tmp_path / "m")
    assert trained.sample_period_seconds == 1.0 and trained.training["rows"] == 400

