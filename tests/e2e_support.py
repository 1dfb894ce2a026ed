"""Helpers shared by the end-to-end tests that run ``sensord run`` as a real subprocess.

Imported as a top-level module (``from e2e_support import DaemonProcess``), like
``broker.py``: ``conftest.py`` puts ``tests/`` on ``sys.path``.

- :func:`train_tiny_bundle`: one small bundle trained on the built-in simulator
  (``conftest.tiny_bundle`` trains it once per session for every end-to-end module);
- :class:`DaemonProcess`: the daemon as a subprocess with its own config, log
  file and metrics port, its Prometheus metrics scraped over HTTP;
- :class:`QosPublisher`: a paho client publishing QoS 1, waiting for each PUBACK;
- :func:`daemon_config`: the config document a test daemon starts from;
- :class:`Prometheus`: a real Prometheus with the shipped config and rules, on a free port;
- small things: :func:`free_port`, :func:`wait_until`, :func:`merge`, :func:`write_yaml`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
import pytest
import yaml
from broker import MosquittoBroker
from prometheus_client.parser import text_string_to_metric_families

from sensord.config import config_from_dict
from sensord.dataio import Series, load_csv
from sensord.simulator import simulate

ROOT = Path(__file__).resolve().parent.parent

# Set by systemd; a daemon under test must not inherit them from a test run that itself runs under systemd.
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")


# -- small things -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_yaml(path: Path, doc: dict[str, Any]) -> None:
    """Atomic, so a SIGHUP never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)


# -- the tiny bundle ----------------------------------------------------------------------------

def write_series_csv(path: Path, series: Series) -> Path:
    """A wide CSV (timestamp, then the channels) that ``load_csv`` reads back as ``series``."""
    rows = [",".join(["timestamp", *series.channels])]
    rows += [",".join([f"{t:.3f}", *(repr(float(x)) for x in row)])
             for t, row in zip(series.timestamps, series.values, strict=True)]
    path.write_text("\n".join(rows) + "\n")
    return path


class TrainedBundle(NamedTuple):
    bundle: Path
    labelled_csv: Path
    labelled: Series  # 2040 rows at 1 Hz, four labelled faults after a 600 s healthy lead


TINY_WINDOW = 10
TINY_DETECTOR = {"raise_after": 2, "clear_after": 5}


def tiny_train_config(epochs: int, detector: dict[str, int] | None = None) -> dict[str, Any]:
    """The config of the tiny dense bundle the end-to-end tests serve (seconds to train)."""
    return {
        "window": {"length": TINY_WINDOW},
        "model": {"kind": "dense", "encoder_units": [16], "latent_units": 4},
        "training": {"epochs": epochs, "patience": 5, "min_relative_scale": 0.0},
        "threshold": {"method": "max_factor", "factor": 1.5},
        "detector": detector or TINY_DETECTOR,
    }


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit within ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def train_tiny_bundle(root: Path, train: dict[str, Any], model_dir: str = "model") -> TrainedBundle:
    """Simulate 1200 s of a pump under ``root/sim``, train a bundle on the healthy run into ``root/model_dir``
    with the config document ``train`` (a few seconds for a tiny model), and load the labelled run."""
    from sensord.training import train_bundle

    healthy_csv, labelled_csv = simulate(root / "sim", seconds=1200)
    cfg = config_from_dict(train)
    train_bundle(load_csv(healthy_csv, cfg.data), cfg, root / model_dir)
    labelled = load_csv(labelled_csv, cfg.data, require_labels=True)
    return TrainedBundle(root / model_dir, labelled_csv, labelled)


# -- the daemon -----------------------------------------------------------------------------------

def daemon_config(broker: MosquittoBroker, bundle: Path, *, window: int, detector: dict[str, int],
                  client_id: str, subscriptions: list[str], device_topic: str, topic_prefix: str,
                  **mqtt_extra: Any) -> dict[str, Any]:
    """A daemon config document: ``broker`` with a 5 s keepalive, ``bundle`` served, metrics on a free port."""
    return {
        "window": {"length": window},
        "detector": detector,
        "mqtt": {
            "host": broker.host, "port": broker.port,
            "client_id": client_id, "keepalive": 5,
            "subscriptions": subscriptions,
            "device_topic": device_topic,
            "topic_prefix": topic_prefix,
            **mqtt_extra,
        },
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "daemon": {"model": str(bundle)},
        "logging": {"level": "INFO"},
    }


class DaemonProcess:
    """``python -m sensord run`` on ``doc``, written to ``{tmp}/{name}.yaml``; output in ``{tmp}/{name}.log``.

    Started at once; the systemd variables of the test's own environment are not passed on, ``extra_env`` is.
    """

    def __init__(self, tmp: Path, name: str, doc: dict[str, Any], extra_env: dict[str, str] | None = None) -> None:
        self.name = name
        self.doc = doc
        self.cfg_path = tmp / f"{name}.yaml"
        if "state_dir" not in doc.get("daemon", {}):  # never the real /var/lib/sensord; one per client id
            key = doc.get("mqtt", {}).get("client_id") or name  # (the default id follows the config file)
            doc = merge(doc, {"daemon": {"state_dir": str(tmp / f"state-{key}")}})
            self.doc = doc
        write_yaml(self.cfg_path, doc)
        self.log_path = tmp / f"{name}.log"
        self.metrics_port = int(doc["metrics"]["port"])
        env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
        env.update(extra_env or {})
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "sensord", "run", "--config", str(self.cfg_path)],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        return out

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics().get((name, tuple(sorted(labels.items()))))

    def model_info(self) -> dict[str, str]:
        (labels,) = [dict(lab) for (name, lab) in self.metrics() if name == "sensord_model_info"]
        return labels

    def wait_metrics_up(self, timeout: float = 20.0) -> None:
        def up() -> bool:
            assert self.alive(), f"{self.name} exited ({self.proc.returncode}); log:\n{self.log()}"
            try:
                self.metrics()
                return True
            except (urllib.error.URLError, ConnectionError):
                return False
        wait_until(up, timeout, f"{self.name}'s metrics endpoint")

    def wait_metric(self, name: str, value: float, timeout: float = 15.0, **labels: str) -> None:
        last: list[float | None] = [None]

        def check() -> bool:
            assert self.alive(), f"{self.name} exited ({self.proc.returncode}); log:\n{self.log()}"
            last[0] = self.metric(name, **labels)
            return last[0] == value
        try:
            wait_until(check, timeout, f"{name}{labels} == {value}")
        except AssertionError as exc:
            raise AssertionError(f"{exc} (last value {last[0]}); {self.name} log:\n{self.log()[-3000:]}") from None

    def wait_log(self, text: str, timeout: float = 15.0) -> str:
        """Wait until a log line contains ``text``; return that line."""
        def find() -> str | None:
            return next((ln for ln in self.log().splitlines() if text in ln), None)
        try:
            return wait_until(find, timeout, f"{text!r} in {self.name}'s log")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{self.log()[-3000:]}") from None

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


# -- Prometheus ------------------------------------------------------------------------------------

PROMETHEUS_DEPLOY = ROOT / "deploy" / "prometheus"


def binary(name: str, package: str = "prometheus") -> str:
    """The path of an apt-installed tool; the test fails (never skips) without it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: `make test` installs it (apt-get install -y {package})")
    return path


class Prometheus:
    """A real Prometheus on a free port: the shipped config, pointed at the daemon, scraping every second.

    ``jobs`` replace the shipped scrape jobs (their targets are set to the daemon's port). Alerts go to the
    Alertmanager on ``alertmanager_port``, or nowhere: never to whatever listens on the shipped 9093.
    """

    def __init__(self, tmp: Path, target_port: int, jobs: list[dict[str, Any]] | None = None,
                 alertmanager_port: int | None = None) -> None:
        doc = yaml.safe_load((PROMETHEUS_DEPLOY / "prometheus.yml").read_text())
        doc["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
        doc["rule_files"] = [str(PROMETHEUS_DEPLOY / "alerts.yml")]
        if alertmanager_port is None:
            del doc["alerting"]
        else:
            (am,) = doc["alerting"]["alertmanagers"]
            am["static_configs"][0]["targets"] = [f"127.0.0.1:{alertmanager_port}"]
        if jobs is not None:
            doc["scrape_configs"] = jobs
        for job in doc["scrape_configs"]:
            job.update({"scrape_interval": "1s", "scrape_timeout": "1s"})
            job["static_configs"][0]["targets"] = [f"127.0.0.1:{target_port}"]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(doc))
        self.port = free_port()
        self.log_path = tmp / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [binary("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(self._ready, 30, f"Prometheus ready on {self.port}; log:\n{self.log_path}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, query: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Instant query -> {label set without __name__/job/instance/service: value}."""
        drop = {"__name__", "job", "instance", "service"}
        return {tuple(sorted((k, v) for k, v in r["metric"].items() if k not in drop)): float(r["value"][1])
                for r in self.api("query", query=query)["result"]}

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self._log.close()


# -- publishing -----------------------------------------------------------------------------------

class QosPublisher:
    """One paho client publishing QoS 1 and waiting for each PUBACK (so the broker never drops).

    ``configure`` is applied to the client before it connects (credentials, TLS); the CONNACK's reason
    codes are kept in ``connect_rc``.
    """

    def __init__(self, broker: MosquittoBroker, configure: Callable[[mqtt.Client], None] | None = None) -> None:
        self.sent = 0
        self._connected = threading.Event()
        self.connect_rc: list[Any] = []
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"e2e-pub-{uuid.uuid4().hex[:10]}")
        if configure is not None:
            configure(self.client)

        def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            self.connect_rc.append(rc)
            self._connected.set()
        self.client.on_connect = on_connect
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(10), "publisher could not connect"

    def send_raw(self, topic: str, payload: bytes | str) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published(), f"publish to {topic} not acknowledged"
        self.sent += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- bundles that load but are wrong ------------------------------------------------------------------

def tamper_bundle(src: Path, dst: Path, factor: float = 1.3) -> Path:
    """A copy of bundle ``src`` whose first FULLY_CONNECTED weights are scaled by ``factor``, with the checksum in
    bundle.json recomputed: it loads and runs, but no longer computes what was trained. Needs TensorFlow."""
    import shutil

    import numpy as np
    from tensorflow.lite.tools import flatbuffer_utils

    from sensord.bundle import BUNDLE_JSON, TFLITE_FILE, sha256_of
    shutil.copytree(src, dst)
    tfl = dst / TFLITE_FILE
    model = flatbuffer_utils.read_model(str(tfl))
    graph = model.subgraphs[0]
    op = next(o for o in graph.operators if model.operatorCodes[o.opcodeIndex].builtinCode == 9)  # FULLY_CONNECTED
    buf = model.buffers[graph.tensors[op.inputs[1]].buffer]
    buf.data = (np.frombuffer(bytes(buf.data), dtype=np.float32) * factor).astype(np.float32).view(np.uint8)
    flatbuffer_utils.write_model(model, str(tfl))
    meta_path = dst / BUNDLE_JSON
    meta = json.loads(meta_path.read_text())
    meta["tflite_sha256"] = sha256_of(tfl)
    meta_path.write_text(json.dumps(meta, indent=2))
    return tfl
