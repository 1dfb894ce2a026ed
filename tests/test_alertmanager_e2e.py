"""From a fault on a device to a person: the shipped rules, a real Prometheus and a real Alertmanager.

The user story is "receiving alert messages" that say why. These tests run the pieces a user installs
(Debian's prometheus and prometheus-alertmanager, started here on free loopback ports) with copies of the
shipped files where only ports, receivers and the waiting times differ, and a local webhook receiver in
place of a phone: a fault on a simulated device must produce one firing notification naming the device,
its score and its top sensors, and one resolved notification once it clears. The commented receivers of
``deploy/alertmanager/alertmanager.yml`` are checked by ``amtool`` as a user would uncomment them, and the
inhibition (a silent broker or a dead sensord holds back that instance's anomalies) by a real Alertmanager.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from broker import MosquittoBroker
from e2e_support import (
    PROMETHEUS_DEPLOY,
    ROOT,
    TINY_WINDOW,
    DaemonProcess,
    Prometheus,
    QosPublisher,
    TrainedBundle,
    binary,
    daemon_config,
    free_port,
    stop_process,
    wait_until,
)

from sensord.dataio import Series

pytestmark = pytest.mark.e2e

AM_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
RECEIVER_BLOCKS = ("webhook", "email", "ntfy", "slack", "telegram")


def uncomment(text: str, *blocks: str) -> str:
    """``text`` with the lines between ``# BEGIN <block>`` and ``# END <block>`` uncommented, as a user would."""
    out, inside = [], False
    for line in text.splitlines():
        marker = re.match(r"\s*# (BEGIN|END) (.+)$", line)
        if marker and marker.group(2) in blocks:
            inside = marker.group(1) == "BEGIN"
            continue
        out.append(re.sub(r"^(\s*)# ?", r"\1", line, count=1) if inside else line)
    return "\n".join(out) + "\n"


def amtool_check(path: Path) -> str:
    res = subprocess.run([binary("amtool", "prometheus-alertmanager"), "check-config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout
    return res.stdout


def test_amtool_accepts_the_shipped_config_and_each_commented_receiver(tmp_path: Path) -> None:
    out = amtool_check(AM_CONFIG)
    assert "1 inhibit rules" in out
    text = AM_CONFIG.read_text()
    for block in RECEIVER_BLOCKS:
        assert f"# BEGIN {block}\n" in text, block
        copy = tmp_path / f"{block}.yml"
        copy.write_text(uncomment(text, block, "email global") if block == "email" else uncomment(text, block))
        doc = yaml.safe_load(copy.read_text())
        (receiver,) = doc["receivers"]
        assert any(k.endswith("_configs") for k in receiver), f"{block}: nothing uncommented"
        amtool_check(copy)


def shipped_links() -> dict[str, str]:
    """The external labels of the shipped prometheus.yml the rules build their links from."""
    labels = yaml.safe_load((PROMETHEUS_DEPLOY / "prometheus.yml").read_text())["global"]["external_labels"]
    return {k: labels[k] for k in ("sensord_grafana_url", "sensord_runbook_url")}


def test_the_anomaly_notification_text_names_the_device_score_and_top_sensors_in_order(tmp_path: Path) -> None:
    """promtool's rule unit test: the annotations the shipped SensordAnomaly rule sends, for known series (the
    shares given in no particular order; the text lists the largest first), and its links built from the
    external labels (set here as a user sets them in prometheus.yml), the device URL-encoded in the query."""
    labels = 'job="sensord",instance="box:9108",device="Pump 2.b"'
    shares = {"flow": 0.1, "current": 0.6, "alpha": 0.05, "vibration_1": 0.25}
    test = {
        "rule_files": [str(PROMETHEUS_DEPLOY / "alerts.yml")],
        "evaluation_interval": "1s",
        "tests": [{
            "interval": "1s",
            "external_labels": {"sensord_grafana_url": "https://grafana.plant.test",
                                "sensord_runbook_url": "https://wiki.plant.test/sensord/RUNBOOK.md"},
            "input_series": [
                {"series": f"sensord_anomaly_state{{{labels}}}", "values": "0 1x9"},
                {"series": f"sensord_anomaly_score{{{labels}}}", "values": "0.5 2.3456x9"},
                *({"series": f'sensord_channel_error_share{{{labels},channel="{ch}"}}', "values": f"{v}x10"}
                  for ch, v in shares.items()),
            ],
            "alert_rule_test": [
                {"eval_time": "0s", "alertname": "SensordAnomaly", "exp_alerts": []},
                {"eval_time": "5s", "alertname": "SensordAnomaly", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "job": "sensord", "instance": "box:9108",
                                   "device": "Pump 2.b"},
                    "exp_annotations": {
                        "summary": "Anomaly on Pump 2.b: score 2.35, top sensors current 60%, vibration_1 25%, "
                                   "flow 10%",
                        "top_sensors": "current 60%, vibration_1 25%, flow 10%",
                        "description": "sensord has raised an alert for device Pump 2.b on box:9108: the "
                                       "reconstruction error of its last window is 2.35 times the threshold (over "
                                       "1 is anomalous). The sensors with the largest share of that error: "
                                       "current 60%, vibration_1 25%, flow 10%.",
                        "runbook_url": "https://wiki.plant.test/sensord/RUNBOOK.md#sensordanomaly",
                        "dashboard": "https://grafana.plant.test/d/sensord/sensord?var-device=Pump+2.b&viewPanel=23",
                    }}]},
            ],
        }],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    res = subprocess.run([binary("promtool"), "test", "rules", str(tmp_path / "test.yml")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_rule_links_its_runbook_section_and_the_dashboard_from_the_external_labels() -> None:
    """No address is written in the rules: each link starts with the external label prometheus.yml sets (to
    an address, not a placeholder), the runbook anchor is a section of docs/RUNBOOK.md, the dashboard is the
    shipped one, and a panel named by viewPanel exists in it."""
    runbook = (ROOT / "docs" / "RUNBOOK.md").read_text()
    anchors = {re.sub(r"[^a-z0-9_-]", "", h.strip().lower().replace(" ", "-"))
               for h in re.findall(r"^#+ (.+)$", runbook, flags=re.M)}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "sensord-dashboard.json").read_text())
    panel_ids = {p["id"] for p in dashboard["panels"]}
    links = shipped_links()
    assert links["sensord_grafana_url"].startswith("http") and links["sensord_runbook_url"].endswith("RUNBOOK.md")
    for path in (PROMETHEUS_DEPLOY / "alerts.yml", PROMETHEUS_DEPLOY / "prometheus.yml"):
        assert "example.com" not in path.read_text(), path
    rules = [r for g in yaml.safe_load((PROMETHEUS_DEPLOY / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        ann = rule["annotations"]
        url, anchor = ann["runbook_url"].split("#")
        assert url == "{{ $externalLabels.sensord_runbook_url }}" and anchor == rule["alert"].lower()
        assert anchor in anchors, f"docs/RUNBOOK.md has no section {rule['alert']}"
        assert ann["dashboard"].startswith(f"{{{{ $externalLabels.sensord_grafana_url }}}}/d/{dashboard['uid']}/"), \
            rule["alert"]
        panel = re.search(r"viewPanel=(\d+)", ann["dashboard"])
        assert panel is None or int(panel.group(1)) in panel_ids, rule["alert"]
        if rule["alert"] in ("SensordAnomaly", "SensordDeviceSilent"):  # per device: the dashboard shows that one
            assert "var-device={{ $labels.device | urlquery }}" in ann["dashboard"], rule["alert"]


# -- the real thing ---------------------------------------------------------------------------------

class WebhookReceiver:
    """A local HTTP endpoint standing in for the phone: keeps every notification Alertmanager POSTs."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name for the POST handler
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with received._lock:
                    received.notifications.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/sensord"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def got(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.notifications)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Alertmanager:
    """Debian's Alertmanager on a free loopback port, clustering off, with a copy of the shipped config:
    its webhook receiver uncommented and pointed at ``webhook_url``, its waits shortened to a second."""

    def __init__(self, tmp: Path, webhook_url: str) -> None:
        doc = yaml.safe_load(uncomment(AM_CONFIG.read_text(), "webhook"))
        (hook,) = doc["receivers"][0]["webhook_configs"]
        hook["url"] = webhook_url
        doc["route"].update({"group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"})
        self.config = tmp / "alertmanager.yml"
        self.config.write_text(yaml.safe_dump(doc))
        amtool_check(self.config)
        exe = shutil.which("prometheus-alertmanager") or binary("alertmanager", "prometheus-alertmanager")
        self.port = free_port()
        self.log_path = tmp / "alertmanager.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={self.config}", f"--storage.path={tmp / 'am-data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address="],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(self._ready, 30, f"Alertmanager ready on {self.port}; log: {self.log_path}")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def alerts(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v2/alerts", timeout=5) as r:
            return json.loads(r.read())

    def post(self, alerts: list[dict[str, Any]]) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/v2/alerts", json.dumps(alerts).encode(),
                                     {"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self._log.close()


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver()
    yield hook
    hook.close()


@pytest.fixture
def alertmanager(tmp_path: Path, webhook: WebhookReceiver) -> Iterator[Alertmanager]:
    am = Alertmanager(tmp_path, webhook.url)
    yield am
    am.stop()


@pytest.fixture(scope="module")
def bundle_and_rows(tiny_bundle: TrainedBundle) -> tuple[Path, Series]:
    return tiny_bundle.bundle, tiny_bundle.labelled.slice(0, 300)  # healthy: the simulator's faults start later


def _send(pub: QosPublisher, topic: str, series: Series, values: np.ndarray, rows: range) -> None:
    for i in rows:
        body = {"ts": float(series.timestamps[i]),
                "values": dict(zip(series.channels, np.asarray(values[i], dtype=float).tolist(), strict=True))}
        pub.send_raw(topic, json.dumps(body))


def test_a_fault_reaches_the_receiver_once_with_device_score_and_top_sensors_and_resolves(
        broker: MosquittoBroker, topic_root: str, tmp_path: Path, bundle_and_rows: tuple[Path, Series],
        alertmanager: Alertmanager, webhook: WebhookReceiver) -> None:
    bundle, rows = bundle_and_rows
    doc = daemon_config(broker, bundle, window=TINY_WINDOW, detector={"raise_after": 2, "clear_after": 5},
                        client_id=f"sensord-{topic_root[-8:]}", subscriptions=[f"{topic_root}/+/telemetry"],
                        device_topic=f"{topic_root}/{{device}}/telemetry", topic_prefix=f"{topic_root}/out")
    d = DaemonProcess(tmp_path, "sensord", doc)
    prom = pub = None
    try:
        d.wait_metrics_up()
        prom = Prometheus(tmp_path, d.metrics_port, alertmanager_port=alertmanager.port)
        pub = QosPublisher(broker)
        wait_until(lambda: prom.value('up{job="sensord"}') == {(): 1.0}, 20, "the sensord target up")
        topic = f"{topic_root}/pump7/telemetry"
        faulty = rows.values.copy()
        faulty[150:200, rows.channels.index("current")] += 0.5  # a step fault on 50 readings
        faulty[150:200, rows.channels.index("vibration_1")] += 0.55
        _send(pub, topic, rows, faulty, range(0, 200))

        first = wait_until(webhook.got, 60, f"a notification; Alertmanager log: {alertmanager.log_path}")
        assert len(first) == 1, first
        (note,) = first
        assert note["status"] == "firing" and note["receiver"] == "operators"
        (alert,) = note["alerts"]
        assert alert["labels"]["alertname"] == "SensordAnomaly" and alert["labels"]["device"] == "pump7"
        assert note["groupLabels"] == {"alertname": "SensordAnomaly", "instance": alert["labels"]["instance"],
                                       "device": "pump7"}
        summary = alert["annotations"]["summary"]
        m = re.fullmatch(r"Anomaly on pump7: score (\d+\.\d\d), top sensors (\w+) [\d.]+%, (\w+) [\d.]+%, "
                         r"(\w+) [\d.]+%", summary)
        assert m is not None, summary
        assert float(m.group(1)) >= 1.0
        assert m.group(2) == "current" and set(m.groups()[1:]) <= set(rows.channels), summary
        assert alert["annotations"]["top_sensors"] in summary
        assert "pump7" in alert["annotations"]["description"] and m.group(1) in alert["annotations"]["description"]
        # The links, resolved from the shipped prometheus.yml's external labels, with the device filled in.
        links = shipped_links()
        assert alert["annotations"]["runbook_url"] == f"{links['sensord_runbook_url']}#sensordanomaly"
        assert alert["annotations"]["dashboard"] == \
            f"{links['sensord_grafana_url']}/d/sensord/sensord?var-device=pump7&viewPanel=23"
        assert {k: alert["labels"][k] for k in links} == links  # Prometheus adds its external labels to alerts

        _send(pub, topic, rows, rows.values, range(200, 240))  # healthy again: the detector clears
        d.wait_metric("sensord_anomaly_state", 0.0, device="pump7")
        both = wait_until(lambda: len(webhook.got()) >= 2 and webhook.got(), 60, "the resolved notification")
        assert [n["status"] for n in both] == ["firing", "resolved"], both
        (resolved,) = both[1]["alerts"]
        assert resolved["status"] == "resolved" and resolved["labels"] == alert["labels"]
        assert d.alive()
    finally:
        if pub is not None:
            pub.close()
        if prom is not None:
            prom.stop()
        d.stop()


def _alert(name: str, instance: str, device: str | None = None) -> dict[str, Any]:
    labels = {"alertname": name, "job": "sensord", "instance": instance, "severity": "warning"}
    if device is not None:
        labels["device"] = device
    return {"labels": labels, "annotations": {"summary": f"{name} {instance} {device}"}}


def test_a_dead_sensord_or_a_silent_broker_holds_back_that_instances_anomalies(
        alertmanager: Alertmanager, webhook: WebhookReceiver) -> None:
    """The shipped inhibition rule in a real Alertmanager: an anomaly on an instance whose sensord is down, is
    disconnected from its broker or receives nothing is suppressed; another instance's anomaly is sent."""
    causes = {"box1:9108": "SensordMqttDisconnected", "box2:9108": "SensordDown", "box3:9108": "SensordNoReadings"}
    alertmanager.post([_alert(cause, instance) for instance, cause in causes.items()]
                      + [_alert("SensordAnomaly", instance, f"pump-{instance[:4]}") for instance in causes]
                      + [_alert("SensordAnomaly", "box9:9108", "pump-box9")])

    def sent() -> set[tuple[str, str | None]] | None:
        got = {(a["labels"]["alertname"], a["labels"].get("device")) for n in webhook.got() for a in n["alerts"]}
        return got if len(got) >= 4 else None
    got = wait_until(sent, 30, "the notifications of the causes and of box9's anomaly")
    assert got == {(c, None) for c in causes.values()} | {("SensordAnomaly", "pump-box9")}
    state = {(a["labels"]["alertname"], a["labels"]["instance"]): a["status"] for a in alertmanager.alerts()}
    for instance in causes:
        assert state[("SensordAnomaly", instance)]["state"] == "suppressed", state
        assert state[("SensordAnomaly", instance)]["inhibitedBy"], state
    assert state[("SensordAnomaly", "box9:9108")]["state"] == "active"
