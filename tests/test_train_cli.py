"""End to end through the ``sensord`` command line: simulate -> train -> evaluate, and the exit statuses."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sensord.simulator import CHANNELS, FAULT_KINDS, FAULT_SECONDS, GAP_SECONDS, LEAD_SECONDS

pytestmark = pytest.mark.training  # trains a tiny TensorFlow model (make test-fast leaves it out)

EX_DATAERR, EX_CONFIG = 65, 78
SECONDS = 900
LABELLED_ROWS = LEAD_SECONDS + len(FAULT_KINDS) * (FAULT_SECONDS + GAP_SECONDS)

TINY_YAML = """\
window:
  length: 10
model:
  kind: dense
  encoder_units: [16]
  latent_units: 4
training:
  epochs: 10
  batch_size: 32
  patience: 10
"""


def sensord(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sensord.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    data, model, cfg = root / "D", root / "M", root / "tiny.yaml"
    cfg.write_text(TINY_YAML)
    sim = sensord("simulate", "--out", str(data), "--seconds", str(SECONDS))
    assert sim.returncode == 0, sim.stderr
    train = sensord("train", "--config", str(cfg), "--data", str(data / "healthy.csv"), "--out", str(model))
    assert train.returncode == 0, train.stderr
    assert f"written to {model}" in train.stdout
    return {"root": root, "data": data, "model": model, "config": cfg}


def test_simulate_writes_both_csvs(run: dict[str, Path]) -> None:
    with (run["data"] / "healthy.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["timestamp", *CHANNELS]
    assert len(rows) == 1 + SECONDS
    with (run["data"] / "labelled.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["timestamp", *CHANNELS, "anomaly"]
    assert len(rows) == 1 + LABELLED_ROWS
    assert sum(r[-1] == "1" for r in rows[1:]) == len(FAULT_KINDS) * FAULT_SECONDS


def test_trained_bundle_loads(run: dict[str, Path]) -> None:
    from sensord.bundle import ModelBundle

    b = ModelBundle.load(run["model"], expect_channels=list(CHANNELS))
    assert b.window_length == 10
    assert b.training["rows"] == SECONDS
    assert b.training["epochs_run"] <= 10
    assert b.model["encoder_units"] == [16] and b.model["latent_units"] == 4


def test_evaluate_writes_json(run: dict[str, Path]) -> None:
    out = run["root"] / "eval" / "out.json"
    proc = sensord("evaluate", "--model", str(run["model"]), "--data", str(run["data"] / "labelled.csv"),
                   "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "TP " in proc.stdout and "F1 " in proc.stdout
    res = json.loads(out.read_text())
    for key in ("tp", "fp", "tn", "fn", "f1", "far", "mar", "mean_delay_seconds"):
        assert key in res, key
    assert res["tp"] + res["fp"] + res["tn"] + res["fn"] == res["rows"] == LABELLED_ROWS
    assert res["tp"] + res["fn"] == len(FAULT_KINDS) * FAULT_SECONDS
    assert res["unscored_rows"] == 10 - 1
    assert res["windows"] == LABELLED_ROWS - 10 + 1
    assert res["segments"] == len(FAULT_KINDS)
    assert res["segments_detected"] >= 3
    assert sum(s["detected"] for s in res["segment_details"]) == res["segments_detected"]
    assert 0.0 <= res["f1"] <= 1.0 and 0.0 <= res["far"] <= 1.0 and 0.0 <= res["mar"] <= 1.0
    assert res["mean_delay_seconds"] is not None and res["mean_delay_seconds"] >= 0


def test_check_config_ok(run: dict[str, Path]) -> None:
    proc = sensord("check-config", "--config", str(run["config"]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"OK {run['config']}"


def test_check_config_with_matching_model(run: dict[str, Path]) -> None:
    proc = sensord("check-config", "--config", str(run["config"]), "--model", str(run["model"]))
    assert proc.returncode == 0, proc.stderr


def test_check_config_with_model_of_other_window_length_exits_78(run: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "w12.yaml"
    cfg.write_text(TINY_YAML.replace("length: 10", "length: 12"))
    proc = sensord("check-config", "--config", str(cfg), "--model", str(run["model"]))
    assert proc.returncode == EX_CONFIG
    assert "window length 10" in proc.stderr and "window.length in the config is 12" in proc.stderr


def test_evaluate_with_config_of_other_window_length_exits_78(run: dict[str, Path], tmp_path: Path) -> None:
    """Not only the daemon: every path makes its windows through the one factory, which checks the key."""
    cfg = tmp_path / "w12.yaml"
    cfg.write_text(TINY_YAML.replace("length: 10", "length: 12"))
    proc = sensord("evaluate", "--model", str(run["model"]), "--data", str(run["data"] / "labelled.csv"),
                   "--config", str(cfg))
    assert proc.returncode == EX_CONFIG
    assert "window.length in the config is 12" in proc.stderr and "window length 10" in proc.stderr


def test_bad_config_exits_78_with_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("window:\n  length: abc\ndetector:\n  raise_aftr: 2\n")
    proc = sensord("check-config", "--config", str(bad))
    assert proc.returncode == EX_CONFIG
    assert 'window.length: must be an integer, got "abc"' in proc.stderr
    assert 'detector.raise_aftr: unknown key (did you mean "raise_after"?)' in proc.stderr
    assert str(bad) in proc.stderr
    assert "OK" not in proc.stdout


def test_train_with_bad_config_exits_78(run: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("window:\n  length: 1\n")
    proc = sensord("train", "--config", str(bad), "--data", str(run["data"] / "healthy.csv"),
                   "--out", str(tmp_path / "M"))
    assert proc.returncode == EX_CONFIG
    assert "window.length: must be an integer >= 2, got 1" in proc.stderr
    assert not (tmp_path / "M").exists()


def test_train_on_non_numeric_cell_exits_65(run: dict[str, Path], tmp_path: Path) -> None:
    lines = (run["data"] / "healthy.csv").read_text().splitlines()
    fields = lines[9].split(",")  # file line 10
    col = 1 + CHANNELS.index("current")
    fields[col] = "abc"
    lines[9] = ",".join(fields)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    proc = sensord("train", "--config", str(run["config"]), "--data", str(bad), "--out", str(tmp_path / "M"))
    assert proc.returncode == EX_DATAERR, proc.stderr
    assert f"{bad}:10:" in proc.stderr
    assert "'current'" in proc.stderr and "'abc'" in proc.stderr
    assert not (tmp_path / "M" / "bundle.json").exists()


def test_non_numeric_cell_in_first_data_row_is_an_error(run: dict[str, Path], tmp_path: Path) -> None:
    """A bad cell on the first data row must be reported like on any other row, not make the
    whole column silently disappear from the channel list (the model would lose a sensor)."""
    from sensord.dataio import DataError, load_csv

    lines = (run["data"] / "healthy.csv").read_text().splitlines()
    fields = lines[1].split(",")  # file line 2, the first data row
    fields[1 + CHANNELS.index("current")] = "abc"
    lines[1] = ",".join(fields)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{bad}:2: column 'current'")):
        series = load_csv(bad)
        pytest.fail(f"loaded without error, channels {series.channels}")


def test_bad_cell_line_number_counts_blank_lines(run: dict[str, Path], tmp_path: Path) -> None:
    """file:line must be the line in the file, also when a blank line comes before the bad cell."""
    from sensord.dataio import DataError, load_csv

    lines = (run["data"] / "healthy.csv").read_text().splitlines()
    lines.insert(5, "")  # a blank line becomes file line 6
    fields = lines[9].split(",")  # file line 10
    fields[1 + CHANNELS.index("current")] = "abc"
    lines[9] = ",".join(fields)
    bad = tmp_path / "blank.csv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as ei:
        load_csv(bad)
    assert str(ei.value).startswith(f"{bad}:10: column 'current': not a number: 'abc'"), str(ei.value)


def test_train_on_missing_csv_exits_65(run: dict[str, Path], tmp_path: Path) -> None:
    proc = sensord("train", "--config", str(run["config"]), "--data", str(tmp_path / "nope.csv"),
                   "--out", str(tmp_path / "M"))
    assert proc.returncode == EX_DATAERR
    assert "file not found" in proc.stderr


def test_evaluate_on_corrupted_bundle_exits_78(run: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "M"
    shutil.copytree(run["model"], broken)
    tfl = broken / "model.tflite"
    data = bytearray(tfl.read_bytes())
    data[100] ^= 0x01
    tfl.write_bytes(bytes(data))
    proc = sensord("evaluate", "--model", str(broken), "--data", str(run["data"] / "labelled.csv"))
    assert proc.returncode == EX_CONFIG
    assert "checksum mismatch" in proc.stderr
    assert str(tfl) in proc.stderr


def test_evaluate_on_missing_bundle_exits_78(run: dict[str, Path], tmp_path: Path) -> None:
    proc = sensord("evaluate", "--model", str(tmp_path / "none"), "--data", str(run["data"] / "labelled.csv"))
    assert proc.returncode == EX_CONFIG
    assert "model bundle directory not found" in proc.stderr


def test_console_script_installed() -> None:
    script = Path(sys.executable).parent / "sensord"
    assert script.is_file()
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for cmd in ("check-config", "train", "evaluate", "simulate"):
        assert cmd in proc.stdout


# --- reproducibility (in-process) ---------------------------------------------------------------


def test_training_is_reproducible(tmp_path: Path) -> None:
    from sensord.config import config_from_dict
    from sensord.dataio import Series
    from sensord.simulator import PumpSimulator
    from sensord.training import train_bundle

    sim = PumpSimulator(seed=4).generate(400)
    series = Series(sim.timestamps, sim.values.astype(np.float32), CHANNELS, None, "sim")

    def train(seed: int, name: str):  # type: ignore[no-untyped-def]
        cfg = config_from_dict({"window": {"length": 8},
                                "model": {"kind": "dense", "encoder_units": [16], "latent_units": 4},
                                "training": {"epochs": 5, "batch_size": 32, "patience": 5, "seed": seed}})
        return train_bundle(series, cfg, tmp_path / name)

    a, b = train(7, "a"), train(7, "b")
    assert a.threshold.value == b.threshold.value
    assert a.threshold.validation_stats == b.threshold.validation_stats
    assert a.training["loss_history"] == b.training["loss_history"]
    np.testing.assert_array_equal(a.scaler.offset, b.scaler.offset)
    # and the seed matters: another seed gives another model
    c = train(8, "c")
    assert c.training["loss_history"] != a.training["loss_history"]
    assert c.threshold.value != a.threshold.value


# --- bench skab --seeds ------------------------------------------------------------------------


@pytest.mark.timeout(600)  # three processes that import TensorFlow, on a shared 2-core machine
def test_bench_skab_over_seeds_reports_each_seed_and_the_spread(run: dict[str, Path]) -> None:
    skab = run["root"] / "skab"
    lines = (run["data"] / "labelled.csv").read_text().splitlines()
    # g2's first 400 rows are healthy (the simulator's first fault starts at row 600).
    for group, rows in (("g1", lines[:520]), ("g2", [lines[0], *lines[150:820]])):
        (skab / group).mkdir(parents=True, exist_ok=True)
        (skab / group / "1.csv").write_text("\n".join(rows) + "\n")
    out = run["root"] / "skab.json"
    proc = sensord("bench", "skab", "--data", str(skab), "--config", str(run["config"]), "--seeds", "2",
                   "--jobs", "2", "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [s["seed"] for s in report["seeds"]] == [42, 43]  # training.seed and the next one
    for s in report["seeds"]:
        assert [f["file"] for f in s["per_file"]] == ["g1/1.csv", "g2/1.csv"]
        pooled = s["pooled"]
        assert pooled["tp"] == sum(f["tp"] for f in s["per_file"])
        assert pooled["fp"] + pooled["tn"] == sum(f["fp"] + f["tn"] for f in s["per_file"])
    f1s = [s["pooled"]["f1"] for s in report["seeds"]]
    assert max(f1s) > 0  # the step fault in g2 is found: the figures are about something
    assert report["summary"]["f1"]["mean"] == pytest.approx(np.mean(f1s), abs=1e-4)
    assert report["summary"]["f1"]["min"] == min(f1s) and report["summary"]["f1"]["max"] == max(f1s)
    assert report["pooled"] == report["seeds"][0]["pooled"]
    assert "mean over seeds" in proc.stdout and "pooled, seed 43" in proc.stdout

    # A seed run alone, in one process, gives what it gave among others in worker processes.
    alone = sensord("bench", "skab", "--data", str(skab), "--config", str(run["config"]),
                    "--seeds", "43,",  # a list of one seed
                    "--jobs", "1", "--json", str(out), timeout=600)
    assert alone.returncode == 0, alone.stderr
    assert json.loads(out.read_text())["seeds"][0]["pooled"] == report["seeds"][1]["pooled"]


@pytest.mark.parametrize("bad", ["0", "x", "1,1"])
def test_bench_skab_rejects_bad_seeds(run: dict[str, Path], bad: str) -> None:
    proc = sensord("bench", "skab", "--data", str(run["root"]), "--seeds", bad)
    assert proc.returncode == 64
    assert "--seeds" in proc.stderr


def test_bench_skab_rejects_no_workers(run: dict[str, Path]) -> None:
    proc = sensord("bench", "skab", "--data", str(run["root"]), "--jobs", "0")
    assert proc.returncode == 64
    assert "--jobs: must be at least 1, got 0" in proc.stderr


def test_check_config_missing_tls_file_exits_78_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "tls.yaml"
    cfg.write_text(f"mqtt:\n  tls:\n    ca_file: {tmp_path / 'nope.pem'}\n")
    proc = sensord("check-config", "--config", str(cfg))
    assert proc.returncode == EX_CONFIG
    assert "mqtt.tls.ca_file: cannot read" in proc.stderr and str(tmp_path / "nope.pem") in proc.stderr


def test_check_config_refuses_a_model_that_does_not_reproduce_its_reference_windows(
        run: dict[str, Path], tmp_path: Path) -> None:
    from e2e_support import tamper_bundle
    tamper_bundle(run["model"], tmp_path / "tampered")
    proc = sensord("check-config", "--config", str(run["config"]), "--model", str(tmp_path / "tampered"))
    assert proc.returncode == EX_CONFIG
    assert "reference windows" in proc.stderr


# -- LiteRT's "Created TensorFlow Lite XNNPACK delegate for CPU." ------------------------------------------

BANNER = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


def test_litert_prints_its_banner_when_left_alone(run: dict[str, Path]) -> None:
    """The control: the interpreter, set up without sensord's filter, does print the line on stderr (so the next
    test, which finds it absent, would see it if the filter stopped working)."""
    code = ("import sys; from ai_edge_litert.interpreter import Interpreter; "
            "it = Interpreter(model_path=sys.argv[1]); it.allocate_tensors()")
    res = subprocess.run([sys.executable, "-c", code, str(run["model"] / "model.tflite")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert BANNER in res.stderr.splitlines()


def test_commands_that_load_a_model_do_not_print_the_litert_banner(run: dict[str, Path]) -> None:
    check = sensord("check-config", "--config", str(run["config"]), "--model", str(run["model"]))
    evaluate = sensord("evaluate", "--model", str(run["model"]), "--data", str(run["data"] / "labelled.csv"))
    for proc in (check, evaluate):
        assert proc.returncode == 0, proc.stderr
        assert "XNNPACK" not in proc.stderr, proc.stderr
    assert check.stderr == ""  # nothing at all on stderr for a good config and model


def test_a_model_that_fails_to_load_is_still_reported_on_stderr(run: dict[str, Path], tmp_path: Path) -> None:
    """The failure happens while stderr is filtered (setting up the first interpreter): its error still shows."""
    from sensord.bundle import BUNDLE_JSON, TFLITE_FILE, sha256_of
    broken = tmp_path / "broken"
    shutil.copytree(run["model"], broken)
    tfl = broken / TFLITE_FILE
    tfl.write_bytes(tfl.read_bytes()[:200])  # cut short, with a checksum to match: it gets to the interpreter
    meta = json.loads((broken / BUNDLE_JSON).read_text())
    meta["tflite_sha256"] = sha256_of(tfl)
    (broken / BUNDLE_JSON).write_text(json.dumps(meta))
    proc = sensord("check-config", "--config", str(run["config"]), "--model", str(broken))
    assert proc.returncode == EX_CONFIG
    assert proc.stderr.splitlines() == [
        f"sensord: model error: {tfl}: cannot load model: The model is not a valid Flatbuffer buffer"], proc.stderr


def test_check_config_reports_schema_file_and_model_problems_together(run: dict[str, Path], tmp_path: Path) -> None:
    """One pass: unknown and out-of-range keys, a missing file a valid section names, and a model that does not
    fit the (valid) window section, all at once; exit 78."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(TINY_YAML.replace("length: 10", "length: 12")
                   + "mqtt:\n  prot: 1883\ndaemon:\n  queue_size: -3\n"
                   + f"metrics:\n  web_config_file: {tmp_path / 'w.yml'}\n")
    proc = sensord("check-config", "--config", str(cfg), "--model", str(run["model"]))
    assert proc.returncode == EX_CONFIG
    assert proc.stderr.splitlines() == [
        f'sensord: config error: {cfg}: mqtt.prot: unknown key (did you mean "port"?)',
        f"sensord: config error: {cfg}: daemon.queue_size: must be an integer >= 1, got -3",
        f"sensord: config error: {cfg}: metrics.web_config_file {tmp_path / 'w.yml'}: file not found",
        f"sensord: model error: {run['model']}: model was trained for window length 10, but window.length in the "
        "config is 12"]
    assert proc.stdout == ""


def test_cross_fitted_bundle_trains_evaluates_and_passes_the_load_check(run: dict[str, Path]) -> None:
    """``training.cross_fit``: the same commands, one bundle; evaluate and check-config --model (which re-scores
    the reference windows, like the daemon at load) take it as they take any other."""
    cfg = run["root"] / "cf.yaml"
    cfg.write_text(TINY_YAML + "  cross_fit: 3\n")
    model = run["root"] / "CF"
    train = sensord("train", "--config", str(cfg), "--data", str(run["data"] / "healthy.csv"), "--out", str(model))
    assert train.returncode == 0, train.stderr
    assert f"rows {SECONDS} in 3 blocks" in train.stdout and "out-of-fold errors" in train.stdout
    check = sensord("check-config", "--config", str(cfg), "--model", str(model))
    assert check.returncode == 0, check.stderr
    proc = sensord("evaluate", "--model", str(model), "--data", str(run["data"] / "labelled.csv"))
    assert proc.returncode == 0, proc.stderr
    assert "F1 " in proc.stdout
