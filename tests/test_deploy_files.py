"""Static checks for deploy/: Prometheus, alert rules, Grafana, Mosquitto.

Every ``sensord_*`` metric used by the dashboard and the alert rules must be
one sensord actually exports (list below; keep it in sync with
sensord's metrics module).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "sensord-dashboard.json"
GRAFANA_DS = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASH_PROV = DEPLOY / "grafana" / "provisioning" / "dashboards" / "sensord.yml"
MOSQUITTO = DEPLOY / "mosquitto" / "mosquitto.conf"

# The metrics sensord exports (names as exposed; counters include _total).
COUNTERS = {
    "sensord_messages_received_total",
    "sensord_messages_rejected_total",
    "sensord_readings_rejected_total",
    "sensord_windows_scored_total",
    "sensord_alerts_raised_total",
    "sensord_windows_dropped_total",
    "sensord_mqtt_reconnects_total",
    "sensord_devices_rejected_total",
    "sensord_window_errors_total",
    "sensord_state_save_failures_total",
    "sensord_outbox_dropped_total",
}
GAUGES = {
    "sensord_reconstruction_error",
    "sensord_anomaly_score",
    "sensord_threshold",
    "sensord_model_threshold",
    "sensord_anomaly_state",
    "sensord_queue_depth",
    "sensord_mqtt_connected",
    "sensord_mqtt_subscribed",
    "sensord_devices",
    "sensord_model_info",
    "sensord_outbox_depth",
    "sensord_channel_error_share",
    "sensord_last_reading_timestamp_seconds",
}
HISTOGRAMS = {
    "sensord_scoring_batch_size",
    "sensord_scoring_duration_seconds",
}
KNOWN_SERIES = (
    COUNTERS
    | GAUGES
    | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)

METRIC_RE = re.compile(r"\bsensord_[A-Za-z0-9_:]*")


def _metrics_in(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))


def _walk_exprs(node: Any) -> Iterator[str]:
    """All PromQL strings in a Grafana dashboard (targets and variable queries)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str):
                yield value
            else:
                yield from _walk_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_exprs(item)


def _load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    with DASHBOARD.open() as f:
        return json.load(f)


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    doc = _load_yaml(ALERTS)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _all_panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


# ------------------------------------------------------------------ prometheus


def test_prometheus_scrapes_sensord_on_localhost_9108() -> None:
    doc = _load_yaml(PROM)
    jobs = {job["job_name"]: job for job in doc["scrape_configs"]}
    assert "sensord" in jobs
    job = jobs["sensord"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["127.0.0.1:9108"]
    assert job["scrape_interval"] == "5s"
    # The rule file it loads is the one checked below.
    assert "alerts.yml" in doc["rule_files"]
    # And its alerts go to the Alertmanager of deploy/alertmanager/ on the same box.
    (am,) = doc["alerting"]["alertmanagers"]
    assert am["static_configs"][0]["targets"] == ["127.0.0.1:9093"]


def test_alert_rules(alert_rules: list[dict[str, Any]]) -> None:
    by_name = {rule["alert"]: rule for rule in alert_rules}
    assert set(by_name) >= {
        "SensordDown",
        "SensordAnomaly",
        "SensordMqttDisconnected",
        "SensordDroppingWindows",
        "SensordStateNotSaved",
        "SensordAlertsUndelivered",
        "SensordWindowErrors",
        "SensordNoReadings",
        "SensordDeviceSilent",
        "SensordReadingsRejected",
    }
    squash = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
    assert re.fullmatch(r'up(\{job="sensord"\})?==0', squash(by_name["SensordDown"]["expr"]))
    assert by_name["SensordDown"]["for"] == "1m"
    # The value is the score, for the notification; it fires exactly while the state is 1.
    assert squash(by_name["SensordAnomaly"]["expr"]) == \
        "sensord_anomaly_scoreandon(job,instance,device)sensord_anomaly_state==1"
    assert "sensord_messages_received_total" in by_name["SensordNoReadings"]["expr"]
    assert squash(by_name["SensordMqttDisconnected"]["expr"]) == "sensord_mqtt_connected==0"
    assert by_name["SensordMqttDisconnected"]["for"] == "1m"
    assert (
        squash(by_name["SensordDroppingWindows"]["expr"])
        == "rate(sensord_windows_dropped_total[5m])>0"
    )
    assert squash(by_name["SensordStateNotSaved"]["expr"]) == "increase(sensord_state_save_failures_total[15m])>0"
    assert squash(by_name["SensordAlertsUndelivered"]["expr"]) == "sensord_outbox_depth>0"
    assert squash(by_name["SensordDeviceSilent"]["expr"]) == "time()-sensord_last_reading_timestamp_seconds>300"
    rejected = squash(by_name["SensordReadingsRejected"]["expr"])
    assert rejected.endswith("/sumby(instance)(rate(sensord_messages_received_total[5m]))>0.5"), rejected
    assert by_name["SensordReadingsRejected"]["for"] == "5m"
    for rule in alert_rules:
        assert rule.get("labels", {}).get("severity"), f"{rule['alert']} has no severity"
        assert rule.get("annotations", {}).get("summary"), f"{rule['alert']} has no summary"
        assert rule["annotations"].get("runbook_url"), f"{rule['alert']} has no runbook_url"
        assert rule["annotations"].get("dashboard"), f"{rule['alert']} has no dashboard link"


def test_alert_rules_use_known_metrics(alert_rules: list[dict[str, Any]]) -> None:
    used = set().union(*(_metrics_in(rule["expr"]) for rule in alert_rules))
    assert used, "no sensord_* metric found in alert rules"
    assert used <= KNOWN_SERIES, f"unknown metrics in alerts.yml: {sorted(used - KNOWN_SERIES)}"


# --------------------------------------------------------------------- grafana


# Keys Grafana writes that the foundation SDK's typed schema leaves out: import metadata, the built-in
# annotation's flag, the Prometheus annotation query's own options, the variable's editor text, the
# database id (null in a file).
SCHEMA_UNMODELLED = {".__inputs", ".__requires", ".id", ".annotations.list[0].builtIn",
                     ".templating.list[1].definition"} | {
    f".annotations.list[1].{k}" for k in ("step", "titleFormat", "tagKeys", "textFormat", "useValueForTime")}


def test_dashboard_matches_grafanas_schema(dashboard: dict[str, Any]) -> None:
    """Parsed by Grafana Labs' foundation SDK (types generated from Grafana's dashboard schema) and written
    back: every panel survives whole, and nothing else is lost beyond the keys listed above, so a typo in
    a panel option or a field Grafana does not know fails here rather than silently in Grafana."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    back = json.loads(json.dumps(Dashboard.from_json(dashboard), cls=JSONEncoder))
    dropped: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k, v in a.items():
                if k not in b:
                    dropped.append(f"{path}.{k}")
                else:
                    walk(v, b[k], f"{path}.{k}")
        elif isinstance(a, list) and isinstance(b, list):
            assert len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{i}]")
    walk(dashboard, back, "")
    assert set(dropped) == SCHEMA_UNMODELLED, sorted(set(dropped) ^ SCHEMA_UNMODELLED)
    assert not [d for d in dropped if d.startswith(".panels")]
    assert len(back["panels"]) == len(dashboard["panels"]) and back["schemaVersion"] == dashboard["schemaVersion"]
    # Import ("Dashboards > Import") asks for each input and replaces ${NAME} with the chosen data source;
    # file provisioning ignores __inputs and the DS_PROMETHEUS variable resolves the same references.
    text = json.dumps(dashboard)
    for inp in dashboard["__inputs"]:
        assert inp["type"] == "datasource" and f"${{{inp['name']}}}" in text
    assert [v["name"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"] == ["DS_PROMETHEUS"]


def test_the_committed_dashboard_is_what_the_builder_module_builds() -> None:
    """deploy/grafana/dashboard.py builds the dashboard with grafana-foundation-sdk's builders; the committed
    JSON (what Grafana provisions or imports) must be exactly its output, so an edit by hand is caught and the
    code stays the source. Regenerate with: python deploy/grafana/dashboard.py"""
    import importlib.util
    spec = importlib.util.spec_from_file_location("sensord_dashboard", DASHBOARD.parent / "dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.render()
    assert json.loads(built) == json.loads(DASHBOARD.read_text()), "run: python deploy/grafana/dashboard.py"
    assert built == DASHBOARD.read_text()
    res = subprocess.run([sys.executable, str(DASHBOARD.parent / "dashboard.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("up to date"), res.stdout + res.stderr


def test_dashboard_uses_known_metrics(dashboard: dict[str, Any]) -> None:
    exprs = list(_walk_exprs(dashboard))
    used = set().union(*(_metrics_in(e) for e in exprs))
    assert used, "no sensord_* metric found in the dashboard"
    assert used <= KNOWN_SERIES, f"unknown metrics in dashboard: {sorted(used - KNOWN_SERIES)}"
    # And it shows what the brief asks for.
    expected = {
        "sensord_reconstruction_error",
        "sensord_model_threshold",
        "sensord_anomaly_score",
        "sensord_anomaly_state",
        "sensord_alerts_raised_total",
        "sensord_windows_scored_total",
        "sensord_messages_received_total",
        "sensord_readings_rejected_total",
        "sensord_scoring_duration_seconds_bucket",
        "sensord_scoring_batch_size_bucket",
        "sensord_queue_depth",
        "sensord_windows_dropped_total",
        "sensord_mqtt_connected",
        "sensord_mqtt_reconnects_total",
        "sensord_model_info",
        "sensord_channel_error_share",
    }
    assert expected <= used, f"dashboard lacks: {sorted(expected - used)}"


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}

    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"

    dev = variables["device"]
    assert dev["type"] == "query"
    query = dev["query"]["query"] if isinstance(dev["query"], dict) else dev["query"]
    assert query == "label_values(sensord_reconstruction_error, device)"
    assert dev["datasource"]["uid"] == "${DS_PROMETHEUS}"

    ids = []
    exprs = []
    for panel in _all_panels(dashboard):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel[
            "title"
        ]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            exprs.append(target["expr"])
        gp = panel["gridPos"]
        assert gp["x"] + gp["w"] <= 24, panel["title"]
    assert len(ids) == len(set(ids)), "duplicate panel ids"

    assert 'sensord_reconstruction_error{device=~"$device"}' in exprs
    assert "max by (model_id) (sensord_model_threshold)" in exprs
    assert any(
        "histogram_quantile(0.95" in e and "sensord_scoring_duration_seconds_bucket" in e
        for e in exprs
    )
    assert any(
        "histogram_quantile(0.5" in e and "sensord_scoring_duration_seconds_bucket" in e
        for e in exprs
    )
    assert any(re.search(r"by \(reason\).*sensord_readings_rejected_total\[5m\]", e) for e in exprs)
    assert any("increase(sensord_alerts_raised_total" in e for e in exprs)
    types = {p["title"]: p["type"] for p in _all_panels(dashboard)}
    assert types["Anomaly state"] == "state-timeline"
    assert types["Model info"] == "table"
    # Why a device is anomalous: its top sensors now, and each sensor's share over time.
    (top,) = [p for p in _all_panels(dashboard) if p["title"] == "Top sensors now"]
    assert top["type"] == "bargauge" and top["targets"][0]["instant"]
    assert re.fullmatch(r'topk by \(device\) \(3, sensord_channel_error_share\{device=~"\$device"\}\)',
                        top["targets"][0]["expr"])
    # Raise and clear as annotations, from the metrics (no annotation database).
    (anomalies,) = [a for a in dashboard["annotations"]["list"] if a.get("expr")]
    assert "sensord_anomaly_state" in anomalies["expr"] and anomalies["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert anomalies["enable"] and "{{device}}" in anomalies["titleFormat"]


def test_grafana_provisioning() -> None:
    ds = _load_yaml(GRAFANA_DS)
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"].startswith("http://")

    prov = _load_yaml(GRAFANA_DASH_PROV)
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]


# ------------------------------------------------------------------- mosquitto


def test_mosquitto_conf() -> None:
    directives = []
    commented = []
    for raw in MOSQUITTO.read_text().splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            commented.append(line.lstrip("#").strip())
        else:
            directives.append(line.split())
    active = {d[0]: d[1:] for d in directives}
    listeners = [d[1:] for d in directives if d[0] == "listener"]
    assert listeners == [["1883", "127.0.0.1"]], "only the loopback plain listener may be active"
    assert active["allow_anonymous"] == ["false"]
    assert active["password_file"]
    assert active["persistence"] == ["true"]
    # sensord's persistent session: bounded queues, and a size limit on what it receives.
    assert int(active["max_queued_messages"][0]) >= 10_000
    assert int(active["max_queued_bytes"][0]) >= 16 * 2**20
    assert 64 * 1024 < int(active["max_packet_size"][0]) <= 64 * 1024 + 4096  # mqtt.max_payload_bytes + topic
    assert active["persistent_client_expiration"]
    assert any(c.startswith("mosquitto_passwd") or "mosquitto_passwd -c" in c for c in commented)
    assert any(re.match(r"listener\s+8883\b", c) for c in commented), "no commented TLS example"
