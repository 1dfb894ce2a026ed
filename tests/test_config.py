"""Tests for sensord.config: defaults, YAML loading and operator-facing error messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sensord.config import (
    ConfigError,
    SensordConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "sensord.yaml"


def _errors(raw: object) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        config_from_dict(raw)
    assert isinstance(ei.value.errors, list)
    return ei.value.errors


def _write(tmp_path: Path, text: str, name: str = "sensord.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# --- defaults ---------------------------------------------------------------------------


def test_defaults_load() -> None:
    cfg = load_config(None)
    assert cfg == SensordConfig()
    assert cfg.window.length == 30
    assert cfg.window.hop == 1
    assert cfg.window.max_gap_seconds == 10.0
    assert cfg.model.kind == "conv1d"
    assert cfg.model.encoder_units == [64, 32, 16]
    assert cfg.threshold.method == "max_factor" and cfg.threshold.factor == 3.0
    assert cfg.threshold.quantile == 0.99
    assert cfg.training.min_relative_scale == 0.01
    assert cfg.detector.raise_after == 3 and cfg.detector.clear_after == 10
    assert cfg.mqtt.port == 1883
    assert cfg.mqtt.device_topic == "sensors/{device}/telemetry"
    assert cfg.mqtt.tls is None
    assert cfg.metrics.port == 9108
    assert cfg.logging.level == "INFO"


def test_none_and_empty_mapping_are_defaults(tmp_path: Path) -> None:
    assert config_from_dict(None) == SensordConfig()
    assert config_from_dict({}) == SensordConfig()
    assert load_config(_write(tmp_path, "")) == SensordConfig()
    assert load_config(_write(tmp_path, "# only a comment\n", "c.yaml")) == SensordConfig()


def test_defaults_are_independent_instances() -> None:
    a, b = SensordConfig(), SensordConfig()
    a.model.encoder_units.append(4)
    assert b.model.encoder_units == [64, 32, 16]


def test_load_config_from_yaml(tmp_path: Path) -> None:
    p = _write(tmp_path, """
window:
  length: 12
  hop: 3
  max_gap_seconds: 2.5
model:
  kind: conv1d
  encoder_units: [16]
  latent_units: 4
threshold:
  method: mean_std
  k: 3.0
detector:
  raise_after: 2
  clear_after: 4
mqtt:
  host: broker.example
  port: 8883
  protocol: 5
  tls:
    ca_file: /etc/ssl/ca.pem
    cert_file: /etc/ssl/c.pem
    key_file: /etc/ssl/k.pem
metrics:
  enabled: false
data:
  channels: [a, b, c]
""")
    cfg = load_config(p)
    assert cfg.window.length == 12 and cfg.window.hop == 3 and cfg.window.max_gap_seconds == 2.5
    assert cfg.model.kind == "conv1d" and cfg.model.encoder_units == [16] and cfg.model.latent_units == 4
    assert cfg.threshold.method == "mean_std" and cfg.threshold.k == 3.0
    assert cfg.detector.raise_after == 2 and cfg.detector.clear_after == 4
    assert cfg.mqtt.host == "broker.example" and cfg.mqtt.port == 8883
    assert cfg.mqtt.protocol == "5"  # a YAML integer is accepted and normalised
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.key_file == "/etc/ssl/k.pem"
    assert cfg.metrics.enabled is False
    assert cfg.data.channels == ["a", "b", "c"]
    # untouched sections keep their defaults
    assert cfg.training == SensordConfig().training
    assert cfg.scoring == SensordConfig().scoring
    # round trip through a plain dict
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_round_trip_with_daemon_models() -> None:
    """``train --per-device`` hands its workers ``config_to_dict(cfg)``: with ``daemon.models`` the document
    must not also carry the default ``daemon.model`` (both set is a config error)."""
    cfg = config_from_dict({"daemon": {"models": [{"match": "pump*", "path": "/m/{device}", "fallback": "/m/pump"},
                                                  {"match": "*", "path": "/m/other"}]}})
    raw = config_to_dict(cfg)
    assert "model" not in raw["daemon"]
    assert config_from_dict(raw) == cfg
    assert config_to_dict(SensordConfig())["daemon"]["model"] == SensordConfig().daemon.model


# --- error messages ---------------------------------------------------------------------


def test_integer_expected() -> None:
    assert _errors({"window": {"length": "abc"}}) == ['window.length: must be an integer, got "abc"']


def test_integer_too_small() -> None:
    assert _errors({"window": {"length": 1}}) == ["window.length: must be an integer >= 2, got 1"]


def test_float_is_not_an_integer() -> None:
    assert _errors({"window": {"length": 2.5}}) == ["window.length: must be an integer, got 2.5"]


def test_bool_is_not_an_integer() -> None:
    assert _errors({"window": {"length": True}}) == ["window.length: must be an integer, got true"]


def test_number_field_bound_message_does_not_ask_for_an_integer() -> None:
    """threshold.quantile is a float field; an integer 1 is out of range, but the
    message must not say "must be an integer < 1.0" (no integer satisfies 0 < q < 1)."""
    errs = _errors({"threshold": {"quantile": 1}})
    assert len(errs) == 1
    msg = errs[0]
    assert msg.startswith("threshold.quantile: must be ")
    assert "< 1.0" in msg and msg.endswith("got 1")
    assert "integer" not in msg, msg


def test_number_field_bound_with_float() -> None:
    assert _errors({"threshold": {"quantile": 1.0}}) == ["threshold.quantile: must be a number < 1.0, got 1.0"]


def test_unknown_key_with_suggestion() -> None:
    assert _errors({"window": {"lenght": 10}}) == ['window.lenght: unknown key (did you mean "length"?)']


def test_unknown_nested_key_with_suggestion() -> None:
    errs = _errors({"mqtt": {"tls": {"certfile": "c.pem"}}})
    assert errs == ['mqtt.tls.certfile: unknown key (did you mean "cert_file"?)']


def test_unknown_key_without_close_match() -> None:
    assert _errors({"window": {"zzzzzz": 1}}) == ["window.zzzzzz: unknown key"]


def test_unknown_section_is_reported_with_suggestion() -> None:
    errs = _errors({"windw": {"length": 10}})
    assert len(errs) == 1
    assert errs[0].startswith("windw: ")
    assert 'did you mean "window"?' in errs[0]


def test_unknown_section_is_called_a_section() -> None:
    """config_from_dict has a dedicated branch producing '<key>: unknown section (did you mean ...)'
    for unknown top-level keys; the top-level key must be reported as a section."""
    assert _errors({"windw": {"length": 10}}) == ['windw: unknown section (did you mean "window"?)']


def test_wrong_type_for_bool() -> None:
    assert _errors({"metrics": {"enabled": "yes"}}) == ['metrics.enabled: must be true or false, got "yes"']
    assert _errors({"training": {"shuffle": 1}}) == ["training.shuffle: must be true or false, got 1"]


def test_yaml_yes_is_a_bool(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads an unquoted yes/no as a boolean: allowed for bool keys.
    cfg = load_config(_write(tmp_path, "metrics:\n  enabled: no\n"))
    assert cfg.metrics.enabled is False


def test_literal_choices() -> None:
    assert _errors({"model": {"kind": "gru"}}) == [
        "model.kind: must be one of 'dense', 'conv1d', 'lstm' or 'pca', got \"gru\""]
    errs = _errors({"threshold": {"method": "median"}})
    assert len(errs) == 1 and errs[0].startswith("threshold.method: must be one of ")
    for m in ("'quantile'", "'mean_std'", "'max_factor'", "'contamination'", "'pot'"):
        assert m in errs[0]
    assert errs[0].endswith('got "median"')


def test_hop_longer_than_window() -> None:
    assert _errors({"window": {"length": 5, "hop": 6}}) == ["window.hop: must be <= window.length (5), got 6"]


def test_hop_equal_to_window_is_fine() -> None:
    assert config_from_dict({"window": {"length": 5, "hop": 5}}).window.hop == 5


def test_device_topic_without_placeholder() -> None:
    assert _errors({"mqtt": {"device_topic": "sensors/telemetry"}}) == [
        'mqtt.device_topic: must contain {device} exactly once, got "sensors/telemetry"']


def test_device_topic_placeholder_twice() -> None:
    errs = _errors({"mqtt": {"device_topic": "a/{device}/{device}"}})
    assert errs == ['mqtt.device_topic: must contain {device} exactly once, got "a/{device}/{device}"']


def test_device_topic_or_field_required() -> None:
    assert _errors({"mqtt": {"device_topic": None}}) == [
        "mqtt.device_topic: one of device_topic or device_field must be set"]
    cfg = config_from_dict({"mqtt": {"device_topic": None, "device_field": "dev"}})
    assert cfg.mqtt.device_field == "dev"


def test_tls_cert_without_key() -> None:
    errs = _errors({"mqtt": {"tls": {"cert_file": "/etc/ssl/c.pem"}}})
    assert len(errs) == 1
    assert errs[0].startswith("mqtt.tls")
    assert "cert_file and key_file must be given together" in errs[0]
    errs = _errors({"mqtt": {"tls": {"key_file": "/etc/ssl/k.pem"}}})
    assert len(errs) == 1 and "cert_file and key_file must be given together" in errs[0]


def test_section_must_be_a_mapping() -> None:
    assert _errors({"window": 5}) == ["window: must be a mapping, got 5"]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(_write(tmp_path, "- a\n- b\n"))
    assert ei.value.errors == ["top level: must be a mapping of sections, got list"]


def test_duplicate_channels() -> None:
    assert _errors({"data": {"channels": ["a", "b", "a"]}}) == [
        "data.channels: must not repeat a channel, got duplicates ['a']"]


def test_several_errors_reported_at_once() -> None:
    errs = _errors({
        "window": {"length": "abc", "hop": 0},
        "training": {"epochs": 0, "shuffle": "no"},
        "model": {"kind": "x"},
        "mqtt": {"port": 70000},
    })
    assert sorted(errs) == sorted([
        'window.length: must be an integer, got "abc"',
        "window.hop: must be an integer >= 1, got 0",
        "model.kind: must be one of 'dense', 'conv1d', 'lstm' or 'pca', got \"x\"",
        "training.epochs: must be an integer >= 1, got 0",
        'training.shuffle: must be true or false, got "no"',
        "mqtt.port: must be an integer <= 65535, got 70000",
    ])


def test_cross_field_errors_in_two_sections_reported_together() -> None:
    errs = _errors({"window": {"length": 5, "hop": 6}, "mqtt": {"device_topic": "x"}})
    assert sorted(errs) == sorted([
        "window.hop: must be <= window.length (5), got 6",
        'mqtt.device_topic: must contain {device} exactly once, got "x"',
    ])


def test_error_carries_source_and_all_messages(tmp_path: Path) -> None:
    p = _write(tmp_path, "window:\n  length: abc\ndetector:\n  raise_after: 0\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    err = ei.value
    assert err.source == str(p)
    assert sorted(err.errors) == sorted([
        'window.length: must be an integer, got "abc"',
        "detector.raise_after: must be an integer >= 1, got 0",
    ])
    text = str(err)
    assert text.startswith(f"{p}: ")
    for e in err.errors:
        assert e in text


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "window:\n  length: 10\n  hop: [1\nmodel:\n  kind: dense\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert len(ei.value.errors) == 1
    msg = ei.value.errors[0]
    assert msg.startswith("invalid YAML at line 4, column ")
    assert ei.value.source == str(p)


def test_invalid_yaml_tab_indentation(tmp_path: Path) -> None:
    p = _write(tmp_path, "window:\n  length: 10\n\tbad: 1\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert ei.value.errors[0].startswith("invalid YAML at line 3, column 1")


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    """A Latin-1 config (e.g. a comment with a degree sign) must be reported as a ConfigError
    (so the CLI exits 78, EX_CONFIG), not escape as a UnicodeDecodeError."""
    p = tmp_path / "latin1.yaml"
    p.write_bytes("window:\n  length: 10  # 20 \u00b0C\n".encode("latin-1"))
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert ei.value.source == str(p)
    assert len(ei.value.errors) == 1


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert ei.value.errors == [f"file not found: {p}"]
    assert ei.value.source == str(p)


# --- the commented example shipped in config/ ---------------------------------------


def test_example_config_loads() -> None:
    assert EXAMPLE.is_file(), f"{EXAMPLE} is missing"
    cfg = load_config(EXAMPLE)
    assert isinstance(cfg, SensordConfig)


def test_example_config_documents_the_defaults() -> None:
    """The example says it lists every option with its default: it must equal the defaults."""
    assert EXAMPLE.is_file(), f"{EXAMPLE} is missing"
    assert load_config(EXAMPLE) == SensordConfig()
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    defaults = config_to_dict(SensordConfig())
    assert set(raw) == set(defaults)
    for section, keys in defaults.items():
        assert set(raw[section]) == set(keys), section


def test_example_config_passes_check_config() -> None:
    """Through ``python -m sensord``, the entry point for a venv whose bin/ is not on PATH."""
    assert EXAMPLE.is_file(), f"{EXAMPLE} is missing"
    proc = subprocess.run([sys.executable, "-m", "sensord", "check-config", "--config", str(EXAMPLE)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK ")


# --- persistent session and state -----------------------------------------------------------


def test_persistent_session_is_the_default() -> None:
    assert SensordConfig().mqtt.session_expiry_seconds > 0


def test_session_expiry_must_not_be_negative() -> None:
    assert _errors({"mqtt": {"session_expiry_seconds": -1}}) == [
        "mqtt.session_expiry_seconds: must be an integer >= 0, got -1"]


def test_reconnect_delays_are_whole_seconds() -> None:
    """paho's reconnect delay counts whole seconds: a fraction is refused, not passed on as a float."""
    cfg = config_from_dict({"mqtt": {"reconnect_min_seconds": 2, "reconnect_max_seconds": 60.0}})
    assert (cfg.mqtt.reconnect_min_seconds, cfg.mqtt.reconnect_max_seconds) == (2.0, 60.0)
    assert _errors({"mqtt": {"reconnect_min_seconds": 0.5}}) == [
        "mqtt.reconnect_min_seconds: must be a whole number of seconds (paho's reconnect delay), got 0.5"]


def test_restart_only_settings_come_from_the_schema_and_reload_compares_them() -> None:
    from sensord.config import restart_changes, restart_only_settings
    paths = restart_only_settings()
    # Once missed by a hand-kept list: changed on SIGHUP, neither applied nor warned about.
    assert ("mqtt", "reconnect_min_seconds") in paths and ("mqtt", "reconnect_max_seconds") in paths
    assert ("metrics",) in paths and ("mqtt", "host") in paths
    assert ("detector", "raise_after") not in paths and ("mqtt", "publish_scores") not in paths
    old = config_from_dict({})
    new = config_from_dict({"mqtt": {"reconnect_max_seconds": 60.0, "publish_scores": True},
                            "metrics": {"port": 9200}, "detector": {"clear_after": 3}})
    assert restart_changes(old, new) == ["mqtt.reconnect_max_seconds", "metrics"]
    assert restart_changes(old, config_from_dict({})) == []


# Every restart-only setting, changed to another valid value (with what it needs to stay valid).
RESTART_ONLY_CHANGES: dict[tuple[str, ...], dict[str, Any]] = {
    ("scoring", "batch_max"): {"scoring": {"batch_max": 32}},
    ("mqtt", "host"): {"mqtt": {"host": "broker.local"}},
    ("mqtt", "port"): {"mqtt": {"port": 8883}},
    ("mqtt", "client_id"): {"mqtt": {"client_id": "box-7"}},
    ("mqtt", "keepalive"): {"mqtt": {"keepalive": 60}},
    ("mqtt", "protocol"): {"mqtt": {"protocol": "3.1.1"}},
    ("mqtt", "username"): {"mqtt": {"username": "sensord"}},
    ("mqtt", "password"): {"mqtt": {"username": "u", "password": "p"}},
    ("mqtt", "password_file"): {"mqtt": {"username": "u", "password_file": "/run/pw"}},
    ("mqtt", "password_env"): {"mqtt": {"username": "u", "password_env": "PW"}},
    ("mqtt", "tls"): {"mqtt": {"tls": {"ca_file": "/etc/ca.pem"}}},
    ("mqtt", "subscriptions"): {"mqtt": {"subscriptions": ["sensors/pump1/telemetry"]}},
    ("mqtt", "qos"): {"mqtt": {"qos": 0}},
    ("mqtt", "topic_prefix"): {"mqtt": {"topic_prefix": "box7"}},
    ("mqtt", "status_topic"): {"mqtt": {"status_topic": "box7/status/sensord-0"}},
    ("mqtt", "reconnect_min_seconds"): {"mqtt": {"reconnect_min_seconds": 2}},
    ("mqtt", "reconnect_max_seconds"): {"mqtt": {"reconnect_max_seconds": 60}},
    ("mqtt", "session_expiry_seconds"): {"mqtt": {"session_expiry_seconds": 0}},
    ("metrics",): {"metrics": {"port": 9200}},
    ("daemon", "queue_size"): {"daemon": {"queue_size": 500}},
    ("daemon", "batch_wait_seconds"): {"daemon": {"batch_wait_seconds": 0.1}},
    ("daemon", "state_dir"): {"daemon": {"state_dir": "/tmp/state"}},
    ("daemon", "state_save_interval_seconds"): {"daemon": {"state_save_interval_seconds": 30.0}},
    ("daemon", "outbox_max_alerts"): {"daemon": {"outbox_max_alerts": 50}},
    ("homeassistant",): {"homeassistant": {"enabled": True}},
}


def test_changing_any_restart_only_setting_on_reload_logs_a_warning_naming_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """Every field the schema marks RESTART_ONLY (the table must list each, so a new one gets tested too)."""
    from sensord.config import restart_only_settings
    from sensord.daemon import warn_restart_only
    assert set(RESTART_ONLY_CHANGES) == set(restart_only_settings())
    old = config_from_dict({})
    for path, change in RESTART_ONLY_CHANGES.items():
        name = ".".join(path)
        caplog.clear()
        with caplog.at_level("WARNING", logger="sensord.daemon"):
            changed = warn_restart_only(old, config_from_dict(change))
        # (a password also sets mqtt.username: both are named)
        assert name in changed, (name, changed)
        assert f"reload: {name} needs a restart; it is not applied" in caplog.text
    assert warn_restart_only(old, config_from_dict({"detector": {"raise_after": 1}})) == []


@pytest.mark.parametrize("bad", ["", "sensord/+/status", "sensord/#", "a\x00b"])
def test_status_topic_must_be_a_topic_name(bad: str) -> None:
    with pytest.raises(ConfigError, match="mqtt.status_topic: .*without wildcards"):
        config_from_dict({"mqtt": {"status_topic": bad}})


def test_status_topic_defaults_to_the_prefix_and_can_be_set_per_instance() -> None:
    assert config_from_dict({"mqtt": {"topic_prefix": "box7"}}).mqtt.status() == "box7/status"
    assert config_from_dict({"mqtt": {"status_topic": "box7/status/i0"}}).mqtt.status() == "box7/status/i0"


def test_conv_stride_out_of_range_names_the_key() -> None:
    errs = _errors({"model": {"conv_stride": 0}})
    assert len(errs) == 1 and errs[0].startswith("model.conv_stride:")
    assert _errors({"model": {"conv_stride": 5}})[0].startswith("model.conv_stride:")


@pytest.mark.parametrize("bad", [0, -1, "soon"])
def test_sparkplug_rebirth_interval_must_be_positive_or_null(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.subscriptions\.0\.rebirth_interval_seconds"):
        config_from_dict({"mqtt": {"subscriptions": [{"topic": "spBv1.0/plant/#", "format": "sparkplug_b",
                                                      "rebirth_interval_seconds": bad}]}})
    cfg = config_from_dict({"mqtt": {"subscriptions": [{"topic": "spBv1.0/plant/#", "format": "sparkplug_b",
                                                        "rebirth_interval_seconds": None}]}})
    assert cfg.mqtt.subscription_list()[0].rebirth_interval_seconds is None
