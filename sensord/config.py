"""Configuration: one YAML file, loaded into typed dataclasses and validated up front.

Validation happens before anything else starts so that a typo in a key or an
out-of-range value stops start-up with a message that names the exact key path
(``window.length: must be an integer >= 2, got "abc"``) instead of surfacing
hours later as a strange runtime behaviour. The schema is expressed with
pydantic dataclasses (strict types, unknown keys forbidden); the error messages
are rewritten into short, operator-facing sentences.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import asdict, field, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import yaml
from pydantic import (
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs, ErrorDetails

from .errors import EX_CONFIG, SensordError
from .formats.base import filter_meets_template, topic_filter_problem

_STRICT = ConfigDict(extra="forbid")

PositiveInt = Annotated[StrictInt, Field(ge=1)]
PositiveFloat = Annotated[StrictFloat, Field(gt=0.0)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]


def unique_channels(v: list[str]) -> list[str]:
    """A channel list with no name twice (a repeated name would read one value into two columns)."""
    dupes = sorted({c for c in v if v.count(c) > 1})
    if dupes:
        raise ValueError(f"must not repeat a channel, got duplicates {dupes}")
    return v

class RestartOnly:
    """``Annotated`` metadata: a setting a reload (SIGHUP) cannot apply, because what it configures
    (the broker connection, the scoring thread, the state files) is built once at start-up.

    The reload compares exactly these (see :func:`restart_only_settings`), so a new setting
    declares here whether it needs a restart instead of in a list kept by hand elsewhere.
    """

    def __repr__(self) -> str:
        return "RESTART_ONLY"


RESTART_ONLY = RestartOnly()


class ConfigError(SensordError):
    """Raised when a configuration file cannot be used; carries every problem found."""

    exit_status = EX_CONFIG
    kind = "config error"

    def __init__(self, errors: list[str], source: str | None = None) -> None:
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(errors))


@dataclass(config=_STRICT)
class DataConfig:
    """How CSV files of readings are read (training, evaluation, benchmark)."""

    timestamp_column: StrictStr | None = None
    channels: list[StrictStr] = field(default_factory=list)
    label_column: StrictStr = "anomaly"
    ignore_columns: list[StrictStr] = field(default_factory=lambda: ["anomaly", "changepoint"])
    delimiter: StrictStr | None = None

    @field_validator("delimiter")
    @classmethod
    def _one_char(cls, v: str | None) -> str | None:
        if v is not None and len(v) != 1:
            raise ValueError(f"must be a single character, got {json.dumps(v)}")
        return v

    @field_validator("channels")
    @classmethod
    def _unique_channels(cls, v: list[StrictStr]) -> list[StrictStr]:
        return unique_channels(v)


@dataclass(config=_STRICT)
class WindowConfig:
    """Fixed-length windows per device; the model is trained for one length."""

    length: Annotated[StrictInt, Field(ge=2, le=10_000)] = 30
    hop: PositiveInt = 1
    max_gap_seconds: PositiveFloat = 10.0
    # Channels the model sees against their own slow baseline (sensord.drift), chosen at training by
    # name (regular expressions, case-insensitive search) and recorded in the bundle; [] = none.
    drift_channels: list[str] = field(default_factory=lambda: ["temp", "thermo"])
    drift_seconds: PositiveFloat = 60.0  # the baseline's time constant
    drift_keep: Annotated[StrictFloat, Field(ge=0.0, lt=1.0)] = 0.0  # share of the slow change kept

    @field_validator("drift_channels")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        for i, p in enumerate(v):
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"[{i}] {p!r} is not a regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _hop_fits(self) -> WindowConfig:
        if self.hop > self.length:
            raise ValueError(f"hop: must be <= window.length ({self.length}), got {self.hop}")
        return self


@dataclass(config=_STRICT)
class ModelConfig:
    """Autoencoder architecture: ``conv1d`` (default), ``dense`` bottleneck, ``lstm``, or ``pca``.

    ``pca`` is the linear autoencoder (SKAB's T²+Q line), fitted in closed form:
    the baseline every network has to beat, served by the same code.
    """

    kind: Literal["dense", "conv1d", "lstm", "pca"] = "conv1d"
    encoder_units: list[PositiveInt] = field(default_factory=lambda: [64, 32, 16])
    latent_units: PositiveInt = 8
    conv_filters: list[PositiveInt] = field(default_factory=lambda: [32, 16])
    kernel_size: PositiveInt = 5
    # conv1d: stride of each encoder layer (1 = no compression in time; 2 halves the length per layer).
    conv_stride: Annotated[StrictInt, Field(ge=1, le=4)] = 1
    lstm_units: list[PositiveInt] = field(default_factory=lambda: [32, 16])
    output_activation: Literal["auto", "sigmoid", "linear"] = "auto"
    dropout: Annotated[StrictFloat, Field(ge=0.0, lt=1.0)] = 0.0
    l2: Annotated[StrictFloat, Field(ge=0.0)] = 0.0
    # pca: keep the fewest components that explain this fraction of the training windows' variance.
    pca_variance: Annotated[StrictFloat, Field(gt=0.0, lt=1.0)] = 0.95


@dataclass(config=_STRICT)
class TrainingConfig:
    """Optimisation settings; a fixed seed makes a run reproducible."""

    scaler: Literal["standard", "minmax"] = "standard"
    # Floor on each channel's scale, as a fraction of the channel's mean level (0 = off).
    min_relative_scale: Annotated[StrictFloat, Field(ge=0.0, lt=1.0)] = 0.01
    validation_fraction: Annotated[StrictFloat, Field(gt=0.0, lt=0.9)] = 0.2
    epochs: PositiveInt = 100
    batch_size: PositiveInt = 32
    learning_rate: PositiveFloat = 1e-3
    loss: Literal["mse", "mae"] = "mse"
    patience: PositiveInt = 10
    # Halve the learning rate when the validation loss has not improved for this many epochs (0 = off).
    reduce_lr_patience: Annotated[StrictInt, Field(ge=0)] = 0
    # Members trained side by side from different initialisations; their errors are averaged.
    ensemble: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    # K >= 2: the healthy rows are cut into K contiguous blocks and member k is trained without block k, so
    # every healthy window gets an out-of-fold error and the threshold is fitted on all of them (instead of
    # on the last validation_fraction only, scored by a model early-stopped on exactly those windows). The
    # K members are served as one ensemble. 0 or 1: off.
    cross_fit: Annotated[StrictInt, Field(ge=0, le=16)] = 0
    # cross_fit: each member early-stops on the chronological tail (validation_fraction) of its own rows;
    # false: no tail, each member trains for `epochs` on all its rows.
    cross_fit_early_stop: StrictBool = True
    # cross_fit: what is served. "ensemble": the K members as one graph (their mean error). "refit": one more
    # network trained for `epochs` on every healthy window (no rows spent on early stopping), the members
    # kept only for the out-of-fold errors its threshold is fitted on (K + 1 trainings, one network served).
    cross_fit_serve: Literal["ensemble", "refit"] = "ensemble"
    seed: StrictInt = 42
    shuffle: StrictBool = True
    noise_std: Annotated[StrictFloat, Field(ge=0.0)] = 0.0

    @model_validator(mode="after")
    def _cross_fit_alone(self) -> TrainingConfig:
        if self.cross_fit >= 2 and self.ensemble > 1:
            raise ValueError(f"cross_fit: {self.cross_fit} already serves {self.cross_fit} members; it cannot be "
                             f"combined with ensemble {self.ensemble} (set one of them to 1)")
        return self


@dataclass(config=_STRICT)
class ThresholdConfig:
    """How the alert threshold is fitted on healthy validation errors."""

    method: Literal["quantile", "mean_std", "max_factor", "contamination", "pot"] = "max_factor"
    quantile: Annotated[StrictFloat, Field(gt=0.0, lt=1.0)] = 0.99
    k: Annotated[StrictFloat, Field(ge=0.0)] = 2.0
    factor: PositiveFloat = 3.0
    contamination: Annotated[StrictFloat, Field(gt=0.0, lt=0.5)] = 0.01
    # pot: extreme-value tail fitted above the pot_level quantile, extrapolated to `risk` per window,
    # times pot_factor.
    risk: Annotated[StrictFloat, Field(gt=0.0, lt=0.1)] = 1e-3
    pot_level: Annotated[StrictFloat, Field(ge=0.5, lt=1.0)] = 0.8
    pot_factor: PositiveFloat = 1.0


@dataclass(config=_STRICT)
class ScoringConfig:
    """Per-window error: mean squared or absolute error over the window, in scaled units."""

    error: Literal["mse", "mae"] = "mse"
    top_channels: Annotated[StrictInt, Field(ge=1, le=64)] = 3
    batch_max: Annotated[StrictInt, Field(ge=1, le=4096), RESTART_ONLY] = 64
    # Readings are clipped per channel to the healthy level +- this many healthy spreads (the bundle's scaler:
    # mean +- k std, or min +- k range); far enough out to be an obvious anomaly, never overflowing to NaN.
    clip_spreads: Annotated[StrictFloat, Field(gt=0.0, le=1e6)] = 1000.0


@dataclass(config=_STRICT)
class DetectorConfig:
    """Hysteresis: raise after N consecutive windows over, clear after M under."""

    raise_after: PositiveInt = 3
    clear_after: PositiveInt = 10


@dataclass(config=_STRICT)
class TlsConfig:
    ca_file: StrictStr | None = None
    cert_file: StrictStr | None = None
    key_file: StrictStr | None = None
    insecure: StrictBool = False

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self




@dataclass(config=_STRICT)
class SubscriptionConfig:
    """One topic filter and the wire format of what arrives on it (see README, "Input formats").

    Options left unset fall back to the ``mqtt`` section's (``device_topic``, ``device_field``, ...).
    """

    topic: StrictStr
    format: Literal["json", "topic_per_channel", "influx_line", "sparkplug_b"] = "json"
    # json: where the device id is (a topic template with {device}); topic_per_channel: the topic
    # template with {device} and {channel}, e.g. "plant/line1/{device}/{channel}".
    device_topic: StrictStr | None = None
    device_field: StrictStr | None = None  # json: dotted paths allowed, e.g. tags.host
    timestamp_field: StrictStr | None = None
    values_field: StrictStr | None = None
    # json, influx_line: a reading may carry only the channels that changed (report by exception); rows are
    # then built on the assembly clock.
    partial: StrictBool = False
    # influx_line: the tag that names the device, the timestamp unit, and (optional) the one measurement read.
    device_tag: StrictStr = "host"
    precision: Literal["ns", "us", "ms", "s"] = "ns"
    measurement: StrictStr | None = None
    # sparkplug_b: ask an edge node to publish its births again (NCMD Node Control/Rebirth) when its data
    # cannot be read (sensord started after its NBIRTH, or a sequence gap), at most this often per node;
    # null: never ask (the aliases are then learnt only from births the node sends of its own accord).
    rebirth_interval_seconds: PositiveFloat | None = 30.0

    @model_validator(mode="after")
    def _template(self) -> SubscriptionConfig:
        problem = topic_filter_problem(self.topic)
        if problem is not None:
            raise ValueError(f"topic: not a valid MQTT topic filter ({problem}): {json.dumps(self.topic)}")
        if self.format == "topic_per_channel":
            t = self.device_topic
            if t is None or t.count("{device}") != 1 or t.count("{channel}") != 1:
                raise ValueError("device_topic: format topic_per_channel needs a topic template with {device} and "
                                 f"{{channel}} once each, got {json.dumps(t)}")
        elif self.device_topic is not None and self.device_topic.count("{device}") != 1:
            raise ValueError(f"device_topic: must contain {{device}} exactly once, got {json.dumps(self.device_topic)}")
        return self

    @property
    def assembled(self) -> bool:
        """Whether its readings are single channels that the assembler turns into rows."""
        return self.format in ("topic_per_channel", "sparkplug_b") or self.partial


@dataclass(config=_STRICT)
class AssemblyConfig:
    """Rows on a fixed clock for channels that arrive separately (sensord/assembly.py has the policy)."""

    # The sampling period of the rows; null: the model's (recorded in its bundle at training). Needed when a
    # subscription is topic_per_channel, sparkplug_b or partial json and the bundle does not record it.
    sample_period_seconds: PositiveFloat | None = None
    # A channel's last value is held this long at most (null: three sampling periods).
    max_staleness_seconds: PositiveFloat | None = None
    # A value up to this much older than the device's newest is still folded into its row.
    late_tolerance_seconds: Annotated[StrictFloat, Field(ge=0.0, le=3600.0)] = 0.0

    def period(self, model_period: float | None) -> float | None:
        """The assembly clock: this section's period, else the model's (None when neither gives one)."""
        return self.sample_period_seconds if self.sample_period_seconds is not None else model_period

    def staleness(self, period: float | None = None) -> float:
        """How long a value is held: ``max_staleness_seconds``, else three sampling periods of ``period``."""
        if self.max_staleness_seconds is not None:
            return self.max_staleness_seconds
        return 3 * (period or self.sample_period_seconds or 1.0)


@dataclass(config=_STRICT)
class MqttConfig:
    """Broker connection, subscriptions and how a device id and a reading are found."""

    host: Annotated[StrictStr, RESTART_ONLY] = "127.0.0.1"
    port: Annotated[Port, RESTART_ONLY] = 1883
    # None: "sensord-<hostname>-<8 hex digits of the config file's path>", unique per host and instance and
    # stable across restarts (a persistent session needs the same id every time).
    client_id: Annotated[StrictStr | None, RESTART_ONLY] = None
    keepalive: Annotated[StrictInt, Field(ge=5, le=65535), RESTART_ONLY] = 30
    protocol: Annotated[Literal["5", "3.1.1"], RESTART_ONLY] = "5"
    username: Annotated[StrictStr | None, RESTART_ONLY] = None
    password: Annotated[StrictStr | None, RESTART_ONLY] = None
    # Or, to keep it out of this file: a file holding it (``${VAR}`` expanded, e.g.
    # ``${CREDENTIALS_DIRECTORY}/mqtt-password`` with systemd's LoadCredential=), or an environment variable.
    password_file: Annotated[StrictStr | None, RESTART_ONLY] = None
    password_env: Annotated[StrictStr | None, RESTART_ONLY] = None
    tls: Annotated[TlsConfig | None, RESTART_ONLY] = None
    # Topic filters: a plain string reads today's JSON; {topic: ..., format: ..., ...} picks a format.
    subscriptions: Annotated[list[StrictStr | SubscriptionConfig], RESTART_ONLY] = field(
        default_factory=lambda: ["sensors/+/telemetry"])
    qos: Annotated[StrictInt, Field(ge=0, le=2), RESTART_ONLY] = 1
    device_topic: StrictStr | None = "sensors/{device}/telemetry"
    device_field: StrictStr | None = None
    timestamp_field: StrictStr = "ts"
    values_field: StrictStr = "values"
    # Larger messages are rejected unparsed (too_large): one reading is ~200 bytes, a batch of 100 ~20 kB.
    # deploy/mosquitto/ sets the broker's max_packet_size to match.
    max_payload_bytes: Annotated[StrictInt, Field(ge=64, le=16 * 1024 * 1024)] = 65536
    topic_prefix: Annotated[StrictStr, RESTART_ONLY] = "sensord"
    # The retained online/offline topic (and last will); null: "{topic_prefix}/status". Several instances
    # sharing one prefix (see README, "Scaling out") each need their own, e.g. "sensord/status/sensord-0".
    status_topic: Annotated[StrictStr | None, RESTART_ONLY] = None
    publish_scores: StrictBool = False
    # Whole seconds: paho waits min, then doubles up to max between attempts, and counts in seconds.
    reconnect_min_seconds: Annotated[PositiveFloat, RESTART_ONLY] = 1.0
    reconnect_max_seconds: Annotated[PositiveFloat, RESTART_ONLY] = 30.0
    # Persistent session: the broker keeps the subscriptions and queues QoS 1 readings for this long
    # after the daemon goes away (MQTT 5 session expiry; on 3.1.1 any value > 0 means clean_session
    # false and the broker's persistent_client_expiration applies). 0 = clean session, nothing kept.
    session_expiry_seconds: Annotated[StrictInt, Field(ge=0, le=4_294_967_295), RESTART_ONLY] = 86_400

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_number(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, v: str | None) -> str | None:
        if v is not None and not 1 <= len(v.encode("utf-8")) <= 128:
            raise ValueError(f"must be 1 to 128 bytes (or null for the default), got {json.dumps(v)}")
        return v

    @field_validator("status_topic")
    @classmethod
    def _status_topic(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "+#\x00")):
            raise ValueError(f"must be a topic name without wildcards (+ #), got {json.dumps(v)}")
        return v

    @field_validator("reconnect_min_seconds", "reconnect_max_seconds")
    @classmethod
    def _whole_seconds(cls, v: float) -> float:
        if v != int(v):
            raise ValueError(f"must be a whole number of seconds (paho's reconnect delay), got {json.dumps(v)}")
        return v

    @field_validator("subscriptions")
    @classmethod
    def _non_empty(cls, v: list[StrictStr | SubscriptionConfig]) -> list[StrictStr | SubscriptionConfig]:
        if not v:
            raise ValueError("must list at least one topic filter")
        for i, sub in enumerate(v):
            problem = topic_filter_problem(sub) if isinstance(sub, str) else None
            if problem is not None:
                raise ValueError(f"{i}: not a valid MQTT topic filter ({problem}): {json.dumps(sub)}")
        return v

    def status(self) -> str:
        """The availability topic: ``status_topic``, else ``{topic_prefix}/status``."""
        return self.status_topic if self.status_topic is not None else f"{self.topic_prefix}/status"

    def topic_filters(self) -> list[str]:
        """The topic filters to subscribe to, in order."""
        return [s if isinstance(s, str) else s.topic for s in self.subscriptions]

    def subscription_list(self) -> list[SubscriptionConfig]:
        """Every subscription as a :class:`SubscriptionConfig` (a plain string is ``format: json``)."""
        return [SubscriptionConfig(topic=s) if isinstance(s, str) else s for s in self.subscriptions]

    @model_validator(mode="after")
    def _device_source(self) -> MqttConfig:
        if self.device_topic is None and self.device_field is None:
            raise ValueError("device_topic: one of device_topic or device_field must be set")
        if self.device_topic is not None and self.device_topic.count("{device}") != 1:
            raise ValueError(
                f"device_topic: must contain {{device}} exactly once, got {json.dumps(self.device_topic)}"
            )
        given = [k for k in ("password", "password_file", "password_env") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{given[1]}: give the password one way only, not both {given[0]} and {given[1]}")
        if given and self.username is None:
            raise ValueError(f"{given[0]}: a password needs mqtt.username")
        if self.reconnect_max_seconds < self.reconnect_min_seconds:
            raise ValueError("reconnect_max_seconds: must be >= reconnect_min_seconds")
        return self


@dataclass(config=_STRICT)
class MetricsConfig:
    enabled: StrictBool = True
    host: StrictStr = "127.0.0.1"
    port: Annotated[StrictInt, Field(ge=0, le=65535)] = 9108
    # Every read and write on a /metrics connection; an idle connection is closed after this.
    timeout_seconds: Annotated[StrictFloat, Field(gt=0.0, le=300.0)] = 10.0
    # Simultaneous connections; more are closed at once (sensord_metrics_connections_rejected_total).
    max_connections: Annotated[StrictInt, Field(ge=1, le=1000)] = 16
    # TLS and basic auth, in the Prometheus exporter-toolkit web-config format (sensord/webconfig.py);
    # null = plain HTTP, no authentication.
    web_config_file: StrictStr | None = None

    @field_validator("web_config_file")
    @classmethod
    def _web_config_not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a file path or null, got an empty string")
        return v


@dataclass(config=_STRICT)
class ModelRouteConfig:
    """One entry of ``daemon.models``: the bundle that scores the devices whose id matches ``match``.

    ``path`` with ``{device}`` is a per-device layout: the bundle in the directory named after the device (found
    at start-up and at each SIGHUP), else ``fallback``, else the next entry. The first matching entry wins.
    """

    path: StrictStr
    match: StrictStr = "*"  # an fnmatch glob on the device id (case-sensitive)
    fallback: StrictStr | None = None
    # The channels these devices send, in order (default: data.channels). Models of one daemon may read
    # different channels (a pump, a compressor); ``sensord record`` writes these before any bundle exists,
    # and a bundle found here with other channels is refused.
    channels: list[StrictStr] = field(default_factory=list)

    @field_validator("channels")
    @classmethod
    def _unique_channels(cls, v: list[StrictStr]) -> list[StrictStr]:
        return unique_channels(v)

    @model_validator(mode="after")
    def _layout(self) -> ModelRouteConfig:
        if not self.path.strip():
            raise ValueError("path: must be a bundle directory, got an empty string")
        if self.path.count("{device}") > 1:
            raise ValueError(f"path: may contain {{device}} once at most, got {json.dumps(self.path)}")
        if self.fallback is not None:
            if "{device}" not in self.path:
                raise ValueError("fallback: only a per-device path (with {device}) has a fallback, got path "
                                 f"{json.dumps(self.path)}")
            if "{device}" in self.fallback or not self.fallback.strip():
                raise ValueError(f"fallback: must be one bundle directory, got {json.dumps(self.fallback)}")
        return self

    @property
    def per_device(self) -> bool:
        return "{device}" in self.path


@dataclass(config=_STRICT)
class DaemonConfig:
    """The running service: which bundle(s), and the bounds that keep memory flat."""

    # One bundle for every device ...
    model: StrictStr = "/var/lib/sensord/model"
    # ... or several (then leave daemon.model out): [{match: "pump*", path: ...}, {match: "*", path:
    # ".../{device}", fallback: ...}]; each device is bound to the first entry that has a bundle for it.
    models: list[ModelRouteConfig] = field(default_factory=list)
    queue_size: Annotated[StrictInt, Field(ge=1, le=1_000_000), RESTART_ONLY] = 10_000
    max_devices: Annotated[StrictInt, Field(ge=1, le=100_000)] = 100
    # 0: adaptive batching (an idle scorer scores at once whatever has queued; under load batches fill while
    # the previous one is scored). > 0 also waits up to this long for a batch to fill: latency, rarely worth it.
    batch_wait_seconds: Annotated[StrictFloat, Field(ge=0.0, le=5.0), RESTART_ONLY] = 0.0
    # Readings stamped further ahead of this host's clock are rejected (future_timestamp).
    max_clock_skew_seconds: PositiveFloat = 300.0
    # This many consecutive out-of-order readings mean the device's clock jumped back: its window restarts.
    clock_resync_after: PositiveInt = 5
    shutdown_timeout_seconds: PositiveFloat = 4.0
    # Detector state (which alerts are raised) is saved here and restored at start-up; null = not kept.
    state_dir: Annotated[StrictStr | None, RESTART_ONLY] = "/var/lib/sensord"
    state_save_interval_seconds: Annotated[PositiveFloat, RESTART_ONLY] = 10.0
    # Alerts not yet acknowledged by the broker, kept in {state_dir}/outbox/ (in memory if state_dir is null).
    outbox_max_alerts: Annotated[StrictInt, Field(ge=1, le=100_000), RESTART_ONLY] = 1000

    # Device ids longer than this (UTF-8 bytes) are rejected (bad_device_id); 128 is also the hard ceiling.
    max_device_id_bytes: Annotated[StrictInt, Field(ge=1, le=128)] = 128
    # A device silent this long (by this host's clock) gets state "stale" on its retained state topic and
    # "offline" on its availability topic; its alert state is kept.
    device_timeout_seconds: PositiveFloat = 300.0
    # ... and after this long its window, detector and metric labels go, so max_devices counts live devices.
    device_forget_seconds: PositiveFloat = 86_400.0

    @model_validator(mode="before")
    @classmethod
    def _one_way_to_name_models(cls, v: Any) -> Any:
        given = v.kwargs if isinstance(v, ArgsKwargs) else v
        if isinstance(given, dict) and "model" in given and given.get("models"):
            raise ValueError("model: daemon.model and daemon.models are both set: give one bundle for every device "
                             "(daemon.model) or a list (daemon.models), not both")
        return v

    def reference_model(self) -> str:
        """The bundle that stands for the daemon's channels and clock where no model is loaded and no
        ``daemon.models`` entry names the device's (``record``, ``check-config``): ``model``, or the first
        fixed path or fallback of ``models``."""
        for entry in self.models:
            path = entry.fallback if entry.per_device else entry.path
            if path is not None:
                return path
        return self.model

    @model_validator(mode="after")
    def _forget_after_timeout(self) -> DaemonConfig:
        if self.device_forget_seconds < self.device_timeout_seconds:
            raise ValueError("device_forget_seconds: must be >= device_timeout_seconds "
                             f"({self.device_timeout_seconds:g}), got {self.device_forget_seconds:g}")
        return self

    @field_validator("state_dir")
    @classmethod
    def _state_dir_not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a directory path or null, got an empty string")
        return v


@dataclass(config=_STRICT)
class HomeAssistantConfig:
    """Home Assistant MQTT discovery (sensord/homeassistant.py): per device, an alert binary sensor and a
    score sensor appear in Home Assistant without any YAML there. Off by default."""

    enabled: StrictBool = False
    # Home Assistant's discovery prefix (its MQTT integration's setting; "homeassistant" unless changed).
    discovery_prefix: StrictStr = "homeassistant"
    # The node level of the discovery topics and unique ids; null: mqtt.topic_prefix, made topic-safe.
    # Two sensord instances on one broker need two (they have two topic prefixes already).
    node_id: StrictStr | None = None

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", v):
            raise ValueError(f"must be letters, digits, _ and - only (Home Assistant's rule), got {json.dumps(v)}")
        return v

    @field_validator("discovery_prefix")
    @classmethod
    def _discovery_prefix(cls, v: str) -> str:
        if not v or v.startswith("/") or v.endswith("/") or any(c in v for c in "#+"):
            raise ValueError(f"must be an MQTT topic without wildcards or a leading/trailing /, got {json.dumps(v)}")
        return v


@dataclass(config=_STRICT)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    rate_limit_seconds: Annotated[StrictFloat, Field(ge=0.0)] = 10.0


@dataclass(config=_STRICT)
class SensordConfig:
    data: DataConfig = field(default_factory=DataConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    assembly: AssemblyConfig = field(default_factory=AssemblyConfig)
    metrics: Annotated[MetricsConfig, RESTART_ONLY] = field(default_factory=MetricsConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    # Retained configs name topics and ids; changing them on a reload would leave the old ones behind.
    homeassistant: Annotated[HomeAssistantConfig, RESTART_ONLY] = field(default_factory=HomeAssistantConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _cross_fit_needs_a_network(self) -> SensordConfig:
        if self.training.cross_fit >= 2 and self.model.kind == "pca":
            raise ValueError("training.cross_fit: model.kind pca is fitted in closed form without a validation "
                             "part; cross_fit needs a trained network (dense, conv1d or lstm)")
        return self

    @model_validator(mode="after")
    def _subscriptions_find_devices(self) -> SensordConfig:
        """A subscription whose filter never meets its device template would reject every message (no_device)."""
        m = self.mqtt
        for i, sub in enumerate(m.subscription_list()):
            template = sub.device_topic if sub.device_topic is not None else m.device_topic
            if sub.format == "json" and (sub.device_field or m.device_field) is None and template is not None:
                if not filter_meets_template(sub.topic, template):
                    raise ValueError(f"mqtt.subscriptions.{i}: topic filter {json.dumps(sub.topic)} never matches the "
                                     f"device template {json.dumps(template)}: no message on it would have a device id")
            elif sub.format == "topic_per_channel" and sub.device_topic is not None:
                if not filter_meets_template(sub.topic, sub.device_topic):
                    raise ValueError(f"mqtt.subscriptions.{i}: topic filter {json.dumps(sub.topic)} never matches "
                                     f"device_topic {json.dumps(sub.device_topic)}")
            elif sub.format == "sparkplug_b" and not filter_meets_template(sub.topic, "spBv1.0/{g}/{t}/{e}/{d}") \
                    and not filter_meets_template(sub.topic, "spBv1.0/{g}/{t}/{e}"):
                raise ValueError(f"mqtt.subscriptions.{i}: topic filter {json.dumps(sub.topic)} never matches a "
                                 "Sparkplug B topic (spBv1.0/group/type/edge[/device])")
        return self

    def assembly_needed(self) -> int | None:
        """The index of the first subscription whose channels arrive separately (rows are then built on
        the assembly clock), or None."""
        return next((i for i, sub in enumerate(self.mqtt.subscription_list()) if sub.assembled), None)

    def assembly_period(self, model_period: float | None, model: str) -> float | None:
        """The assembly clock (``assembly.sample_period_seconds``, else ``model_period``, the bundle's).

        Raises :class:`ConfigError` naming the key when a subscription needs the clock and neither gives it
        (a bundle trained before sensord recorded its sampling period); ``model`` names it in the message.
        """
        period = self.assembly.period(model_period)
        needed = self.assembly_needed()
        if period is None and needed is not None:
            raise ConfigError([f"assembly.sample_period_seconds: is required: mqtt.subscriptions.{needed} sends "
                               f"channels separately and rows are built on that clock, and {model} does not "
                               "record its sampling period (trained by an older sensord): set it to the "
                               "period of the training data, or retrain"])
        return period


_MESSAGES = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "dataclass_type": "must be a mapping",
    "missing": "is required",
    "extra_forbidden": "unknown key",
    "unexpected_keyword_argument": "unknown key",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "literal_error": "must be one of {expected}",
}
_COMPOSABLE = {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}


def _known_keys(path: tuple[Any, ...]) -> list[StrictStr]:
    """The keys allowed at ``path`` (for "did you mean" hints on unknown keys)."""
    cls: Any = SensordConfig
    for part in path[:-1]:
        typ = get_type_hints(cls).get(str(part)) if is_dataclass(cls) else None  # Annotated[] stripped
        if typ is None:
            return []
        cls = next((a for a in getattr(typ, "__args__", (typ,)) if is_dataclass(a)), None)
        if cls is None:
            return []
    return [f.name for f in fields(cls)]


def _describe(err: ErrorDetails, raw: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (
        p.startswith("function-after") or p in ("str", "SubscriptionConfig"))))  # union branches
    path = ".".join(str(p) for p in loc)
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        m = re.match(r"^([\w.]+): (.*)$", msg)
        if m:  # cross-field validators name the key they complain about
            path = f"{path}.{m.group(1)}" if path else m.group(1)
            msg = m.group(2)
        return f"{path}: {msg}"
    else:
        msg = _MESSAGES.get(kind, err["msg"]).format(**ctx)
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc), n=1)
        what = "unknown section" if len(loc) == 1 else "unknown key"
        return f"{path}: {what}" + (f' (did you mean "{close[0]}"?)' if close else "")
    if kind == "missing":
        return f"{path}: {msg}"
    got = err.get("input")
    if kind in _COMPOSABLE and isinstance(got, (int, float)):
        # Bounds of float settings are written as floats, so the bound says which the setting is.
        bound = next(iter(ctx.values()), 0)
        base = "an integer" if isinstance(bound, int) else "a number"
        msg = f"must be {base} {msg.removeprefix('must be ')}"
    return f"{path}: {msg}, got {json.dumps(got, default=str)}"


def config_from_dict(raw: Any, source: StrictStr | None = None) -> SensordConfig:
    """Build a validated config from parsed YAML; every problem is collected, not just the first."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"top level: must be a mapping of sections, got {type(raw).__name__}"], source)
    try:
        return SensordConfig(**raw)
    except ValidationError as exc:
        # A subscription given as a mapping fails the plain-string branch too: only its mapping errors count.
        errors = [e for e in exc.errors() if not ("str" in e["loc"] and isinstance(e.get("input"), dict))]
        raise ConfigError([_describe(e, raw) for e in errors or exc.errors()], source) from None
    except TypeError as exc:  # unknown top-level section
        m = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        key = m.group(1) if m else "?"
        close = difflib.get_close_matches(key, [f.name for f in fields(SensordConfig)], n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise ConfigError([f"{key}: unknown section{hint}"], source) from None


def load_config(path: str | Path | None) -> SensordConfig:
    """Load and validate a YAML config file; ``None`` gives the built-in defaults."""
    if path is None:
        return SensordConfig()
    return config_from_dict(read_config_document(path), str(path))


def read_config_document(path: str | Path) -> Any:
    """The parsed YAML of a config file, not yet validated; ConfigError if it cannot be read or parsed."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"file not found: {p}"], str(p)) from None
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror}"], str(p)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 text (byte {exc.start}): save the file as UTF-8"], str(p)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"invalid YAML{where}: {problem}"], str(p)) from None
    return raw


def valid_sections(raw: Any) -> dict[str, Any]:
    """The sections of a config document that are valid on their own, by name (an absent one is its default).

    For ``sensord check-config`` on a document with errors: the checks that need one section only (the files
    ``mqtt`` and ``metrics`` name, the model against ``window`` and friends) still run, so one pass reports
    every problem. The whole document's cross-section rules are not applied here.
    """
    if not isinstance(raw, dict):
        return {}
    hints = get_type_hints(SensordConfig)  # Annotated[] stripped: the section classes
    out: dict[str, Any] = {}
    for f in fields(SensordConfig):
        section = raw.get(f.name, {})
        if not isinstance(section, dict):
            continue
        try:
            out[f.name] = hints[f.name](**section)
        except (ValidationError, TypeError):  # invalid, or an unknown key in it
            continue
    return out


def restart_only_settings() -> tuple[tuple[str, ...], ...]:
    """Paths of the settings marked RESTART_ONLY: ``("metrics",)`` for a whole section,
    ``("mqtt", "host")`` for one key.

    >>> ("mqtt", "reconnect_max_seconds") in restart_only_settings()
    True
    """
    def marked(hint: Any) -> bool:
        return any(m is RESTART_ONLY for m in getattr(hint, "__metadata__", ()))

    out: list[tuple[str, ...]] = []
    for section, hint in get_type_hints(SensordConfig, include_extras=True).items():
        if marked(hint):
            out.append((section,))
            continue
        section_type = next((t for t in (getattr(hint, "__origin__", None), hint) if is_dataclass(t)), None)
        if section_type is None:
            continue
        out.extend((section, key) for key, h in get_type_hints(section_type, include_extras=True).items()
                   if marked(h))
    return tuple(out)


def restart_changes(old: SensordConfig, new: SensordConfig) -> list[str]:
    """The restart-only settings that differ between two configurations, as dotted paths."""
    changed = []
    for path in restart_only_settings():
        a, b = old, new
        for part in path:
            a, b = getattr(a, part), getattr(b, part)
        if a != b:
            changed.append(".".join(path))
    return changed


def config_to_dict(cfg: SensordConfig) -> dict[str, Any]:
    """A plain document that :func:`config_from_dict` reads back as ``cfg`` (how ``train --per-device`` hands the
    config to its workers). ``daemon.model`` is left out when ``daemon.models`` names the bundles: both set is
    an error, and the default ``model`` is not the user's choice."""
    raw = asdict(cfg)
    if raw["daemon"]["models"]:
        del raw["daemon"]["model"]
    return raw
