"""One parser per subscription, from the config: the only place that knows every format's options."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..config import MqttConfig, SubscriptionConfig
from .base import LayoutFor, Parser
from .influx_line import InfluxLineParser
from .json import JsonParser
from .sparkplug_b import SparkplugParser
from .topic_per_channel import TopicPerChannelParser


def build_parser(sub: SubscriptionConfig, mqtt: MqttConfig, channels: Sequence[str],
                 max_clock_skew: float | None = None,
                 bounds: tuple[Iterable[float], Iterable[float]] | None = None,
                 layouts: LayoutFor | None = None) -> Parser:
    """The parser for ``sub``; its unset options fall back to the ``mqtt`` section's.

    ``layouts`` gives each device's channels (its model's); without it every device has ``channels``.
    """
    if sub.format == "topic_per_channel":
        assert sub.device_topic is not None  # (the config validates it)
        return TopicPerChannelParser(channels, sub.device_topic, max_clock_skew=max_clock_skew, bounds=bounds,
                                     timestamp_field=sub.timestamp_field or "ts",
                                     value_field=sub.values_field or "value", layouts=layouts)
    if sub.format == "sparkplug_b":
        return SparkplugParser(channels, max_clock_skew=max_clock_skew, bounds=bounds,
                               rebirth_interval=sub.rebirth_interval_seconds, layouts=layouts)
    if sub.format == "influx_line":
        return InfluxLineParser(channels, sub.device_tag, sub.device_topic, sub.precision,
                                max_clock_skew=max_clock_skew, bounds=bounds, measurement=sub.measurement,
                                partial=sub.partial, layouts=layouts)
    device_topic = sub.device_topic if sub.device_topic is not None else mqtt.device_topic
    return JsonParser(channels, device_topic, sub.device_field or mqtt.device_field,
                      sub.timestamp_field or mqtt.timestamp_field, sub.values_field or mqtt.values_field,
                      max_clock_skew=max_clock_skew, bounds=bounds, partial=sub.partial,
                      layouts=layouts)
