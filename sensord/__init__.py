"""sensord: a streaming sensor-monitoring daemon.

Data flow, one module per stage: ``payload`` (MQTT messages, received by
``source``) -> ``windows`` -> ``scorer`` -> ``detector`` -> ``sinks`` (MQTT
alerts, Prometheus). Training, evaluation and
benchmarks reuse the same ``windows``/``scorer``/``detector`` code offline.
"""

# The one place the version is written: pyproject.toml reads it from here (setuptools dynamic version).
__version__ = "0.1.0"
