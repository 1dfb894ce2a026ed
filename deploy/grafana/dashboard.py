"""The Grafana dashboard of sensord, as code: built with Grafana Labs' grafana-foundation-sdk builders (types
generated from Grafana's own schema, so a misspelt option is a Python error here, not a silently ignored key in
Grafana), written to ``sensord-dashboard.json`` beside this file.

    python deploy/grafana/dashboard.py            # rewrite sensord-dashboard.json
    python deploy/grafana/dashboard.py --check    # exit 1 if the committed JSON is not what this builds

``tests/test_deploy_files.py`` fails when the committed JSON differs from what this module builds, and
``tests/test_prometheus_e2e.py`` runs every query of it against a real Prometheus scraping a real sensord.
The SDK is a test dependency (``pip install 'sensord[test]'``); the daemon never imports this.

What the SDK does not model is added to the encoded JSON at the end (``_unmodelled``): ``__inputs`` and
``__requires`` for Grafana's import dialog, the built-in annotation's flag, the Prometheus annotation's
title/text fields, the variable's ``definition``, and a few bar-gauge and stat options newer than the SDK's
model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, prometheus, statetimeline, table, timeseries
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import stat as statb
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

OUT = Path(__file__).resolve().parent / "sensord-dashboard.json"
DS = dm.DataSourceRef(type_val="prometheus", uid="${DS_PROMETHEUS}")
DEVICE = 'device=~"$device"'


def _query(ref: str, expr: str, legend: str, instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().datasource(DS).ref_id(ref).expr(expr).legend_format(legend).editor_mode(
        pm.QueryEditorMode.CODE)
    return q.instant() if instant else q.range()


def _grid(x: int, y: int, w: int, h: int) -> dm.GridPos:
    return dm.GridPos(h=h, w=w, x=x, y=y)


def _steps(*steps: tuple[str, float | None]) -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(color=c, value=v) for c, v in steps])


def _value_text(mapping: dict[str, tuple[str, str]]) -> list[dm.ValueMapping]:
    """A value mapping: each value shown as its text in its colour."""
    return [dm.ValueMap(options={v: dm.ValueMappingResult(text=t, color=c, index=i)
                                 for i, (v, (t, c)) in enumerate(mapping.items())})]


def _timeseries(panel_id: int, title: str, description: str, grid: dm.GridPos,
                queries: list[prometheus.Dataquery], unit: str, *, stacked: bool = False, bars: bool = False,
                min_zero: bool = True, fill: int = 10, color: str = "green",
                legend: cm.LegendPlacement = cm.LegendPlacement.BOTTOM) -> timeseries.Panel:
    p = (timeseries.Panel().id(panel_id).title(title).description(description).datasource(DS).grid_pos(grid)
         .targets(list(queries)).unit(unit)
         .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.PALETTE_CLASSIC))
         .draw_style(cm.GraphDrawStyle.BARS if bars else cm.GraphDrawStyle.LINE).line_width(1)
         .fill_opacity(80 if bars else fill).show_points(cm.VisibilityMode.NEVER).span_nulls(False)
         .stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL if stacked else cm.StackingMode.NONE).group("A"))
         .thresholds_style(cb.GraphThresholdsStyleConfig().mode(cm.GraphTresholdsStyleMode.OFF))
         .thresholds(_steps((color, None)))
         .legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST).placement(legend).show_legend(True))
         .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)))
    return p.min(0) if min_zero else p


def _stat(panel_id: int, title: str, description: str, grid: dm.GridPos, query: prometheus.Dataquery,
          steps: db.ThresholdsConfig, *, background: bool = False,
          mappings: list[dm.ValueMapping] | None = None) -> statb.Panel:
    return (statb.Panel().id(panel_id).title(title).description(description).datasource(DS).grid_pos(grid)
            .with_target(query).unit("short").mappings(mappings or [])
            .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS)).thresholds(steps)
            .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
            .color_mode(cm.BigValueColorMode.BACKGROUND if background else cm.BigValueColorMode.VALUE)
            .graph_mode(cm.BigValueGraphMode.NONE).justify_mode(cm.BigValueJustifyMode.AUTO)
            .orientation(cm.VizOrientation.AUTO).text_mode(cm.BigValueTextMode.AUTO))


def _row(panel_id: int, title: str, y: int) -> db.Row:
    return db.Row(title).id(panel_id).collapsed(False).grid_pos(_grid(0, y, 24, 1))


def build() -> dict[str, Any]:
    """The dashboard as the JSON document Grafana reads (provisioning) or imports."""
    threshold_line = [
        dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
        dm.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
        dm.DynamicConfigValue(id_val="custom.lineWidth", value=2),
        dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
    ]
    d = (db.Dashboard("sensord").uid("sensord")
         .description("sensord: streaming sensor anomaly detection (autoencoder) on the edge box")
         .tags(["sensord", "mqtt", "anomaly-detection"]).editable().tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .time("now-1h", "now").timezone("").week_start("").refresh("10s").version(1)
         .fiscal_year_start_month(0).timepicker(db.TimePicker())
         .with_variable(db.DatasourceVariable("DS_PROMETHEUS").label("Data source").type("prometheus")
                        .multi(False).include_all(False).regex(""))
         .with_variable(db.QueryVariable("device").label("Device").datasource(DS)
                        .query({"qryType": 1, "query": "label_values(sensord_reconstruction_error, device)",
                                "refId": "PrometheusVariableQueryEditor-VariableQuery"})
                        .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"]))
                        .include_all(True).all_value(".*").multi(True).options([])
                        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).regex("").sort(dm.VariableSort.ALPHABETICAL_ASC))
         .annotation(db.AnnotationQuery().name("Annotations & Alerts")
                     .datasource(dm.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
                     .enable(True).hide(True).icon_color("rgba(0, 211, 255, 1)").type("dashboard"))
         .annotation(db.AnnotationQuery().name("Anomalies (raised to cleared)").datasource(DS).enable(True)
                     .hide(False).icon_color("red").expr(f"max by (device) (sensord_anomaly_state{{{DEVICE}}}) == 1"))

         .with_row(_row(1, "Detection", 0))
         .with_panel(_timeseries(2, "Reconstruction error per device",
                                 "Autoencoder reconstruction error of the latest scored window per device; the dashed "
                                 "red lines are the alert thresholds, one per model served "
                                 "(sensord_model_threshold).", _grid(0, 1, 16, 9),
                                 [_query("A", f"sensord_reconstruction_error{{{DEVICE}}}", "{{device}}"),
                                  _query("B", "max by (model_id) (sensord_model_threshold)", "threshold {{model_id}}")],
                                 "short", min_zero=False)
                     .override_by_query("B", threshold_line))
         .with_panel(_stat(3, "Anomalous devices", "Number of selected devices currently in the anomalous state.",
                           _grid(16, 1, 4, 4), _query("A", f"sum(sensord_anomaly_state{{{DEVICE}}}) or vector(0)",
                                                      "anomalous", instant=True),
                           _steps(("green", None), ("red", 1)), background=True))
         .with_panel(_stat(4, "Devices tracked", "Devices with an open window buffer (sensord_devices), summed over "
                           "every sensord instance.",
                           _grid(20, 1, 4, 4), _query("A", "sum(sensord_devices)", "devices", instant=True),
                           _steps(("green", None))))
         .with_panel(_stat(5, "Alerts raised (range)", "Alerts published over the dashboard time range.",
                           _grid(16, 5, 4, 5),
                           _query("A", f"sum(increase(sensord_alerts_raised_total{{{DEVICE}}}[$__range]))", "alerts",
                                  instant=True), _steps(("green", None), ("orange", 1))))
         .with_panel(_stat(6, "Devices rejected (range)", "New devices refused because the device limit was reached.",
                           _grid(20, 5, 4, 5),
                           _query("A", "sum(increase(sensord_devices_rejected_total[$__range]))", "rejected",
                                  instant=True), _steps(("green", None), ("orange", 1))))
         .with_panel(_timeseries(7, "Anomaly score", "Anomaly score of the latest scored window per device.",
                                 _grid(0, 10, 12, 8), [_query("A", f"sensord_anomaly_score{{{DEVICE}}}", "{{device}}")],
                                 "short", min_zero=False))
         .with_panel(statetimeline.Panel().id(8).title("Anomaly state")
                     .description("0 = normal, 1 = anomalous (alert raised, not yet cleared).").datasource(DS)
                     .grid_pos(_grid(12, 10, 12, 8))
                     .with_target(_query("A", f"sensord_anomaly_state{{{DEVICE}}}", "{{device}}"))
                     .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS)).fill_opacity(80).line_width(0)
                     .mappings(_value_text({"0": ("normal", "green"), "1": ("ANOMALY", "red")}))
                     .thresholds(_steps(("green", None), ("red", 1)))
                     .merge_values(True).show_value(cm.VisibilityMode.NEVER).align_value(cm.TimelineValueAlignment.LEFT)
                     .row_height(0.9)
                     .legend(cb.VizLegendOptions().show_legend(False).display_mode(cm.LegendDisplayMode.LIST)
                             .placement(cm.LegendPlacement.BOTTOM))
                     .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.SINGLE).sort(cm.SortOrder.NONE)))
         .with_panel(bargauge.Panel().id(23).title("Top sensors now")
                     .description("The three channels with the largest share of each device's last window error "
                                  "(sensord_channel_error_share): the sensors driving the score. A device's shares "
                                  "sum to 100 %; they matter when its score is high (on a healthy window they shift "
                                  "from one window to the next).").datasource(DS).grid_pos(_grid(0, 18, 10, 9))
                     .with_target(_query("A", f"topk by (device) (3, sensord_channel_error_share{{{DEVICE}}})",
                                         "{{device}} {{channel}}", instant=True))
                     .unit("percentunit").min(0).max(1).decimals(0)
                     .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
                     .thresholds(_steps(("green", None), ("orange", 0.5), ("red", 0.8)))
                     .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
                     .orientation(cm.VizOrientation.HORIZONTAL).display_mode(cm.BarGaugeDisplayMode.GRADIENT)
                     .show_unfilled(True).value_mode(cm.BarGaugeValueMode.COLOR).min_viz_height(16).min_viz_width(8))
         .with_panel(_timeseries(24, "Error share per sensor",
                                 "Each channel's share of the device's window error over time (stacked to 100 % per "
                                 "device): when an alert is raised, the band that grows is the sensor to look at "
                                 "first.", _grid(10, 18, 14, 9),
                                 [_query("A", f"sensord_channel_error_share{{{DEVICE}}}", "{{device}} {{channel}}")],
                                 "percentunit", stacked=True, fill=40, legend=cm.LegendPlacement.RIGHT))
         .with_panel(_timeseries(9, "Alerts raised", "Alerts published per device (increase per interval).",
                                 _grid(0, 27, 24, 6),
                                 [_query("A", "sum by (device) (increase(sensord_alerts_raised_total"
                                              f"{{{DEVICE}}}[$__rate_interval]))", "{{device}}")],
                                 "short", stacked=True, bars=True))

         .with_row(_row(10, "Throughput", 33))
         .with_panel(_timeseries(11, "Messages received / rejected",
                                 "MQTT messages received per second, and messages rejected by reason.",
                                 _grid(0, 34, 8, 8),
                                 [_query("A", "sum(rate(sensord_messages_received_total[$__rate_interval]))",
                                         "received"),
                                  _query("B", "sum by (reason) (rate(sensord_messages_rejected_total"
                                              "[$__rate_interval]))", "rejected: {{reason}}")], "reqps"))
         .with_panel(_timeseries(12, "Readings rejected by reason",
                                 "Individual readings rejected during validation, by reason (5 m rate).",
                                 _grid(8, 34, 8, 8),
                                 [_query("A", "sum by (reason) (rate(sensord_readings_rejected_total[5m]))",
                                         "{{reason}}")], "reqps"))
         .with_panel(_timeseries(13, "Windows scored", "Windows scored by the autoencoder per second, per device.",
                                 _grid(16, 34, 8, 8),
                                 [_query("A", "sum by (device) (rate(sensord_windows_scored_total"
                                              f"{{{DEVICE}}}[$__rate_interval]))", "{{device}}")],
                                 "ops", stacked=True))

         .with_row(_row(14, "Scoring performance", 42))
         .with_panel(_timeseries(15, "Scoring duration p50 / p95", "Wall time of one batched model invocation.",
                                 _grid(0, 43, 8, 8),
                                 [_query(ref, f"histogram_quantile({q}, sum by (le) (rate("
                                              "sensord_scoring_duration_seconds_bucket[$__rate_interval])))", name)
                                  for ref, q, name in (("A", "0.5", "p50"), ("B", "0.95", "p95"))], "s"))
         .with_panel(_timeseries(16, "Batch size", "Windows per model invocation.", _grid(8, 43, 8, 8),
                                 [_query("A", "sum(rate(sensord_scoring_batch_size_sum[$__rate_interval])) / "
                                              "sum(rate(sensord_scoring_batch_size_count[$__rate_interval]))", "mean"),
                                  _query("B", "histogram_quantile(0.95, sum by (le) "
                                              "(rate(sensord_scoring_batch_size_bucket[$__rate_interval])))", "p95")],
                                 "short"))
         .with_panel(_timeseries(17, "Queue depth", "Windows waiting to be scored, per sensord instance.",
                                 _grid(16, 43, 8, 8),
                                 [_query("A", "sum by (instance) (sensord_queue_depth)", "{{instance}}")], "short"))
         .with_panel(_timeseries(18, "Dropped windows",
                                 "Windows dropped because the scoring queue was full. Should be zero.",
                                 _grid(0, 51, 24, 6),
                                 [_query("A", "sum(rate(sensord_windows_dropped_total[$__rate_interval]))",
                                         "dropped/s")],
                                 "ops", bars=True, color="red"))

         .with_row(_row(19, "MQTT and model", 57))
         .with_panel(_stat(20, "MQTT connected", "1 when sensord is connected to the broker, one value per sensord "
                           "instance (several behind NATS: README, \"Scaling out\").", _grid(0, 58, 4, 6),
                           _query("A", "sensord_mqtt_connected", "{{instance}}", instant=True),
                           _steps(("red", None), ("green", 1)), background=True,
                           mappings=_value_text({"0": ("DISCONNECTED", "red"), "1": ("connected", "green")})))
         .with_panel(_stat(21, "MQTT reconnects (range)", "Broker reconnects over the dashboard time range.",
                           _grid(4, 58, 4, 6),
                           _query("A", "sum(increase(sensord_mqtt_reconnects_total[$__range]))", "reconnects",
                                  instant=True), _steps(("green", None), ("orange", 1))))
         .with_panel(_timeseries(25, "Instances up", "Per sensord instance: 1 while Prometheus scrapes it and it holds "
                                 "every topic subscription it asked for (sensord_mqtt_subscribed), else 0. Several "
                                 "instances share a plant's devices when scaled out (README, \"Scaling out\").",
                                 _grid(8, 58, 6, 6),
                                 [_query("A", "min by (instance) (sensord_mqtt_subscribed) or "
                                              "min by (instance) (up{job=\"sensord\"})", "{{instance}}")],
                                 "short", min_zero=True))
         .with_panel(table.Panel().id(22).title("Model info").description("Loaded model (sensord_model_info labels).")
                     .datasource(DS).grid_pos(_grid(14, 58, 10, 6))
                     .with_target(_query("A", "sensord_model_info", "__auto", instant=True)
                                  .format(pm.PromQueryFormat.TABLE))
                     .show_header(True).cell_height(cm.TableCellHeight.SM)
                     .footer(cb.TableFooterOptions().show(False).reducer(["sum"]).fields(""))
                     .with_transformation(dm.DataTransformerConfig(id_val="organize", options={
                         "excludeByName": {"Time": True, "Value": True, "__name__": True},
                         "indexByName": {"model_id": 0, "created": 1, "window": 2, "hop": 3, "channels": 4,
                                         "instance": 5, "job": 6},
                         "renameByName": {}})))
         ).build()
    d.schema_version = 39
    return _unmodelled(json.loads(json.dumps(d, cls=JSONEncoder)))


def _unmodelled(doc: dict[str, Any]) -> dict[str, Any]:
    """The keys Grafana reads that the SDK's model has no field for, added to the encoded dashboard."""
    builtin, anomalies = doc["annotations"]["list"]
    builtin["builtIn"] = 1
    anomalies.update({"step": "5s", "titleFormat": "Anomaly on {{device}}", "tagKeys": "device",
                      "textFormat": "sensord alert raised (start of the region) and cleared (its end)",
                      "useValueForTime": False})
    device = next(v for v in doc["templating"]["list"] if v["name"] == "device")
    device["definition"] = device["query"]["query"]
    for var in doc["templating"]["list"]:
        var.pop("id", None)  # the SDK's all-zero placeholder; Grafana names variables by "name"
    top = next(p for p in doc["panels"] if p["id"] == 23)
    top["options"].update({"namePlacement": "left", "sizing": "auto", "maxVizHeight": 300})
    for panel in doc["panels"]:
        if panel["type"] == "stat":
            panel["options"].update({"wideLayout": True, "showPercentChange": False})
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus",
                      "description": "The Prometheus that scrapes sensord", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "__requires": [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.4.0"},
                       {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"}],
        "id": None,
        **doc,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare with the committed JSON; exit 1 if it differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        same = OUT.read_text(encoding="utf-8") == text
        print(f"{OUT}: " + ("up to date" if same else "differs from what dashboard.py builds: run it"))
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
