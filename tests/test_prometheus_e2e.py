"""A real Prometheus scrapes a running daemon, with the shipped scrape config and alert rules.

Dashboards and alerting rely on the names, labels and types of the metrics as Prometheus sees them, so
this checks them through Prometheus itself rather than by reading the exposition text: the deploy files
load (promtool), the daemon is scraped, a known stream gives the right counts in PromQL, and a fault makes
the shipped ``SensordAnomaly`` rule fire for that device.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from broker import MosquittoBroker
from e2e_support import (
    ROOT,
    TINY_WINDOW,
    DaemonProcess,
    QosPublisher,
    daemon_config,
    free_port,
    stop_process,
    tiny_train_config,
    train_tiny_bundle,
    wait_until,
)

from sensord.dataio import Series

pytestmark = pytest.mark.e2e

W = TINY_WINDOW
TRAIN = tiny_train_config(epochs=15)
DETECTOR = {"raise_after": 2, "clear_after": 500}  # the alert stays raised while Prometheus looks
DEPLOY = ROOT / "deploy" / "prometheus"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: `make test` installs it (apt-get install -y prometheus)")
    return path


def test_promtool_accepts_the_shipped_config_and_rules() -> None:
    promtool = _binary("promtool")
    for args in (["check", "config", str(DEPLOY / "prometheus.yml")], ["check", "rules", str(DEPLOY / "alerts.yml")]):
        res = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "SUCCESS" in res.stdout + res.stderr


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Series]:
    trained = train_tiny_bundle(tmp_path_factory.mktemp("prom-e2e"), TRAIN)
    s = trained.labelled.slice(0, 200)
    v = s.values.copy()
    v[150:200, s.channels.index("current")] += 0.5  # a step fault on the last 50 readings
    v[150:200, s.channels.index("vibration_1")] += 0.55
    return trained.bundle, Series(s.timestamps, v, s.channels, None, "step")


class Prometheus:
    """A real Prometheus on a free port: the shipped config, pointed at the daemon, scraping every second."""

    def __init__(self, tmp: Path, target_port: int) -> None:
        doc = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        doc["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
        doc["rule_files"] = [str(DEPLOY / "alerts.yml")]
        job = doc["scrape_configs"][0]
        job.update({"scrape_interval": "1s", "scrape_timeout": "1s"})
        job["static_configs"][0]["targets"] = [f"127.0.0.1:{target_port}"]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(doc))
        self.port = free_port()
        self.log_path = tmp / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [_binary("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
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


@pytest.fixture
def daemon_and_prometheus(broker: MosquittoBroker, topic_root: str, tmp_path: Path,
                          stream: tuple[Path, Series]) -> Iterator[tuple[DaemonProcess, Prometheus, QosPublisher]]:
    doc = daemon_config(broker, stream[0], window=W, detector=DETECTOR, client_id=f"sensord-{topic_root[-8:]}",
                        subscriptions=[f"{topic_root}/+/telemetry"], device_topic=f"{topic_root}/{{device}}/telemetry",
                        topic_prefix=f"{topic_root}/out")
    d = DaemonProcess(tmp_path, "sensord", doc)
    prom = pub = None
    try:
        d.wait_metrics_up()
        prom = Prometheus(tmp_path, d.metrics_port)
        pub = QosPublisher(broker)
        yield d, prom, pub
    finally:
        if pub is not None:
            pub.close()
        if prom is not None:
            prom.stop()
        d.stop()


def test_real_prometheus_scrapes_counts_and_fires_the_anomaly_rule(
        daemon_and_prometheus: tuple[DaemonProcess, Prometheus, QosPublisher], topic_root: str,
        stream: tuple[Path, Series]) -> None:
    d, prom, pub = daemon_and_prometheus
    series = stream[1]
    wait_until(lambda: prom.value('up{job="sensord"}') == {(): 1.0}, 20, "the sensord target up")
    for i in range(len(series)):
        body = {"ts": float(series.timestamps[i]),
                "values": dict(zip(series.channels, np.asarray(series.values[i], dtype=float).tolist(), strict=False))}
        pub.send_raw(f"{topic_root}/pump9/telemetry", json.dumps(body))
    pub.send_raw(f"{topic_root}/pump9/telemetry", b"{not json")
    expected_windows = len(series) - W + 1
    d.wait_metric("sensord_windows_scored_total", expected_windows, device="pump9")

    def scraped() -> bool:
        return prom.value("sensord_windows_scored_total") == {(("device", "pump9"),): float(expected_windows)}
    wait_until(scraped, 20, "Prometheus to scrape the final window count")
    assert prom.value("sensord_messages_received_total") == {(): float(len(series) + 1)}
    assert prom.value('sensord_messages_rejected_total{reason="malformed_json"}') == {
        (("reason", "malformed_json"),): 1.0}
    assert prom.value("sensord_anomaly_state") == {(("device", "pump9"),): 1.0}
    assert prom.value("sensord_alerts_raised_total") == {(("device", "pump9"),): 1.0}
    assert prom.value("sensord_mqtt_connected") == {(): 1.0}
    (info,) = prom.api("query", query="sensord_model_info")["result"]
    assert info["metric"]["window"] == str(W) and "current" in info["metric"]["channels"].split(",")
    count = prom.value("sensord_scoring_batch_size_count")[()]
    assert prom.value("sensord_scoring_batch_size_sum") == {(): float(expected_windows)} and count >= 1
    assert prom.value("histogram_quantile(0.5, sensord_scoring_duration_seconds_bucket)")[()] > 0

    def firing() -> list[dict[str, Any]]:
        return [a for a in prom.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "SensordAnomaly" and a["state"] == "firing"]
    alerts = wait_until(firing, 20, "the SensordAnomaly rule to fire")
    assert [a["labels"]["device"] for a in alerts] == ["pump9"]
    assert "pump9" in alerts[0]["annotations"]["summary"]
    assert not [a for a in prom.api("alerts")["alerts"] if a["labels"]["alertname"] != "SensordAnomaly"]

