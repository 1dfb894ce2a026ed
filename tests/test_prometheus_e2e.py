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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import numpy as np
import pytest
import yaml
from broker import MosquittoBroker
from conftest import Pki
from e2e_support import (
    ROOT,
    TINY_WINDOW,
    DaemonProcess,
    Prometheus,
    QosPublisher,
    TrainedBundle,
    binary,
    daemon_config,
    wait_until,
)

from sensord.dataio import Series

pytestmark = pytest.mark.e2e

W = TINY_WINDOW
DETECTOR = {"raise_after": 2, "clear_after": 500}  # the alert stays raised while Prometheus looks
DEPLOY = ROOT / "deploy" / "prometheus"


def test_promtool_accepts_the_shipped_config_and_rules(tmp_path: Path) -> None:
    promtool = binary("promtool")
    # The https job as a user enables it: uncommented, in place of the plain one.
    doc = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    doc["rule_files"] = [str(DEPLOY / "alerts.yml")]
    doc["scrape_configs"] = [https_job()]
    (tmp_path / "https.yml").write_text(yaml.safe_dump(doc))
    for args in (["check", "config", str(DEPLOY / "prometheus.yml")], ["check", "rules", str(DEPLOY / "alerts.yml")],
                 ["check", "config", str(tmp_path / "https.yml")]):
        res = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "SUCCESS" in res.stdout + res.stderr


@pytest.fixture(scope="module")
def stream(tiny_bundle: TrainedBundle) -> tuple[Path, Series]:
    trained = tiny_bundle
    s = trained.labelled.slice(0, 200)
    v = s.values.copy()
    v[150:200, s.channels.index("current")] += 0.5  # a step fault on the last 50 readings
    v[150:200, s.channels.index("vibration_1")] += 0.55
    return trained.bundle, Series(s.timestamps, v, s.channels, None, "step")


def dashboard_queries() -> list[tuple[str, str]]:
    """The PromQL of deploy/grafana's dashboard as (where, query), with Grafana's variables put in as Grafana
    would; every panel that shows data (all but the row headers) has at least one query."""
    dash = json.loads((ROOT / "deploy" / "grafana" / "sensord-dashboard.json").read_text())
    queries = [(f"annotation {a['name']!r}", a["expr"]) for a in dash["annotations"]["list"] if a.get("expr")]
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        exprs = [t.get("expr") for t in panel.get("targets", [])]
        assert exprs and all(exprs), f"panel {panel['id']} {panel['title']!r} has no query"
        queries += [(f"panel {panel['id']} {panel['title']!r}", e) for e in exprs]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":  # label_values(metric, label) is Grafana's; the series query behind it
            queries.append((f"variable ${var['name']}",
                            var["definition"].removeprefix("label_values(").rsplit(",", 1)[0]))
    subst = {"$device": ".*", "$__rate_interval": "1m", "$__range": "5m", "$__interval": "5s"}
    out = []
    for where, e in queries:
        for k, v in subst.items():
            e = e.replace(k, v)
        assert "$" not in e, f"{where}: a variable this test does not put in: {e}"
        out.append((where, e))
    assert len(out) > 20
    return out


def https_job() -> dict[str, Any]:
    """The commented-out scrape job of the shipped prometheus.yml (TLS and basic auth), uncommented."""
    lines = (DEPLOY / "prometheus.yml").read_text().splitlines()
    start, end = lines.index("  # BEGIN sensord https job"), lines.index("  # END sensord https job")
    body = [ln.replace("  # ", "  ", 1) if ln.startswith("  # ") else ln.replace("  #", "", 1)
            for ln in lines[start + 1:end]]
    (job,) = yaml.safe_load("\n".join(body))
    return job


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
    # The standard process and Python metrics, for the usual process dashboards and alerts.
    assert prom.value('process_resident_memory_bytes{job="sensord"}')[()] > 10e6
    assert prom.value('process_open_fds{job="sensord"}')[()] > 0
    (py,) = prom.api("query", query='python_info{job="sensord"}')["result"]
    assert py["metric"]["implementation"] == "CPython"
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

    # Why: one share series per channel of the model, summing to 1; the channel shifted the most leads.
    shares = {dict(k)["channel"]: v for k, v in prom.value('sensord_channel_error_share{device="pump9"}').items()}
    assert set(shares) == set(info["metric"]["channels"].split(","))
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    top = prom.value('topk by (device) (1, sensord_channel_error_share{device="pump9"})')
    assert [dict(k)["channel"] for k in top] == ["current"], shares

    # Every query of the shipped dashboard (panels, annotations, the device variable) runs and has data.
    # (A rate or an increase has data once two scrapes of a series are stored: waited for, not assumed.)
    for where, expr in dashboard_queries():
        wait_until(lambda e=expr: prom.api("query", query=e)["result"], 10, f"data for the dashboard's {where}: {expr}")



# -- TLS and basic auth: the documented web config and scrape job, end to end -------------------------------

def test_real_prometheus_scrapes_over_tls_with_basic_auth_and_a_wrong_password_is_down(
        broker: MosquittoBroker, topic_root: str, tmp_path: Path, stream: tuple[Path, Series], pki: Pki) -> None:
    """sensord with config/metrics-web.example.yml (certificates beside it, a real hash put in), scraped by
    Prometheus with the commented https job of deploy/prometheus/prometheus.yml: twice, once with the right
    password (up 1, sensord's metrics stored) and once with a wrong one (up 0, the 401 counted and logged)."""
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(pki.server_crt, etc / "metrics.crt")
    shutil.copy(pki.server_key, etc / "metrics.key")
    web = yaml.safe_load((ROOT / "config" / "metrics-web.example.yml").read_text())
    web["basic_auth_users"]["prometheus"] = bcrypt.hashpw(b"scrape-me", bcrypt.gensalt(10)).decode()
    (etc / "metrics-web.yml").write_text(yaml.safe_dump(web))
    (tmp_path / "right-password").write_text("scrape-me\n")
    (tmp_path / "wrong-password").write_text("guess\n")

    doc = daemon_config(broker, stream[0], window=W, detector=DETECTOR, client_id=f"sensord-{topic_root[-8:]}",
                        subscriptions=[f"{topic_root}/+/telemetry"], device_topic=f"{topic_root}/{{device}}/telemetry",
                        topic_prefix=f"{topic_root}/out")
    doc["metrics"]["web_config_file"] = str(etc / "metrics-web.yml")
    d = DaemonProcess(tmp_path, "sensord", doc)
    prom = None
    try:
        line = d.wait_log("metrics on https://", timeout=30)
        assert "(TLS 1.2-1.3; basic auth (1 user))" in line
        jobs = []
        for name, password_file in (("sensord", "right-password"), ("sensord-wrong-password", "wrong-password")):
            job = https_job()
            job["job_name"] = name
            job["tls_config"].update({"ca_file": str(pki.ca), "server_name": "localhost"})
            job["basic_auth"]["password_file"] = str(tmp_path / password_file)
            jobs.append(job)
        prom = Prometheus(tmp_path, d.metrics_port, jobs)
        wait_until(lambda: prom.value('up{job="sensord"}') == {(): 1.0}, 30, "the sensord target up over TLS")
        wait_until(lambda: prom.value('up{job="sensord-wrong-password"}') == {(): 0.0}, 30, "the wrong-password target")
        assert prom.value('sensord_mqtt_connected{job="sensord"}') == {(): 1.0}
        assert prom.value('sensord_threshold{job="sensord-wrong-password"}') == {}  # nothing stored from a 401
        (wrong,) = [t for t in prom.api("targets")["activeTargets"]
                    if t["labels"]["job"] == "sensord-wrong-password"]
        assert "401" in wrong["lastError"], wrong
        refused = 'sensord_metrics_auth_failures_total{job="sensord", reason="bad_credentials"}'
        wait_until(lambda: prom.value(refused).get((("reason", "bad_credentials"),), 0) >= 1, 30,
                   "the refused scrapes counted")
        assert prom.value('sensord_metrics_auth_failures_total{job="sensord", reason="no_credentials"}') == {
            (("reason", "no_credentials"),): 0.0}  # Prometheus sends the credentials with the first request
        assert "metrics: refused a request from 127.0.0.1: wrong user name or password" in d.log()
        assert d.alive()
    finally:
        if prom is not None:
            prom.stop()
        d.stop()
