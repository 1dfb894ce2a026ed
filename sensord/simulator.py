"""Built-in simulators: a pump-like machine with 8 correlated 1 Hz sensor channels, and a compressor-like
one with 6 other channels (:class:`CompressorSimulator`), so one box can watch machines of two kinds.

Tests, the README example and the demo need realistic data without downloading
anything, so this module models a small centrifugal pump from a few latent drivers:

* ``load`` -- pump load/speed in [0, 1]: a mean-reverting random walk around a
  set-point that drifts with a 24 h sinusoid (period 86400 s);
* ``ambient`` -- room temperature, a daily sinusoid.

Every channel is a physical function of those drivers plus independent Gaussian
noise, so channels are correlated the way real ones are (current and flow follow
load, pressure follows flow, temperature lags load, vibration rises with load,
voltage is nearly constant).  An autoencoder trained on healthy windows learns
those relations; the injected faults (:data:`FAULT_KINDS`) break them.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from .errors import UsageError

logger = logging.getLogger(__name__)

CHANNELS: tuple[str, ...] = (
    "vibration_1", "vibration_2", "current", "pressure",
    "temperature", "thermocouple", "voltage", "flow",
)
FAULT_KINDS: tuple[str, ...] = ("step", "drift", "spikes", "stuck")

_IDX = {name: i for i, name in enumerate(CHANNELS)}
# Independent measurement noise per channel (std, physical units).
_NOISE = np.array([0.06, 0.06, 0.015, 0.008, 0.08, 0.12, 0.25, 0.35])
# Typical healthy std per channel (load variation + noise, measured over 1 h runs).
# Fault magnitudes are expressed in these units so that every fault is several
# healthy standard deviations away, not merely several noise standard deviations.
_SPREAD = np.array([0.22, 0.17, 0.10, 0.09, 1.0, 1.0, 0.27, 3.0])
# Knock-on effect of a step: (partner channel, signed fraction of the step), e.g. a
# jammed impeller raises current *and* vibration; a blockage raises pressure and
# lowers flow.
_KNOCK_ON = {
    "vibration_1": ("vibration_2", 0.5), "vibration_2": ("vibration_1", 0.5),
    "current": ("vibration_1", 0.5), "pressure": ("flow", -0.5),
    "temperature": ("thermocouple", 0.5), "thermocouple": ("temperature", 0.5),
    "voltage": ("current", -0.5), "flow": ("pressure", 0.5),
}
_DEFAULT_CHANNEL = {"step": "current", "drift": "temperature",
                    "spikes": "vibration_1", "stuck": "flow"}
_DAY = 86400.0
_LOAD_MEAN, _LOAD_REVERT, _LOAD_STEP = 0.7, 1.0 / 300.0, 0.0065
_TEMP_TAU, _TC_TAU = 600.0, 120.0
FAULT_SECONDS, GAP_SECONDS, LEAD_SECONDS = 120, 240, 600

# The compressor: other sensors, other names (a model for the pumps cannot read it).
COMPRESSOR_CHANNELS: tuple[str, ...] = (
    "suction_pressure", "discharge_pressure", "motor_current", "discharge_temperature", "oil_temperature",
    "vibration",
)
_C_IDX = {name: i for i, name in enumerate(COMPRESSOR_CHANNELS)}
_C_NOISE = np.array([0.01, 0.03, 0.15, 0.1, 0.08, 0.05])
_C_SPREAD = np.array([0.03, 0.35, 2.2, 1.5, 1.0, 0.2])
_C_KNOCK_ON = {
    "suction_pressure": ("discharge_pressure", 0.5), "discharge_pressure": ("motor_current", 0.5),
    "motor_current": ("vibration", 0.5), "discharge_temperature": ("oil_temperature", 0.5),
    "oil_temperature": ("discharge_temperature", 0.5), "vibration": ("motor_current", 0.5),
}
_C_LOAD_REVERT, _C_DT_TAU, _C_OIL_TAU = 1.0 / 60.0, 60.0, 90.0
_C_DEFAULT_CHANNEL = {"step": "motor_current", "drift": "discharge_temperature", "spikes": "vibration",
                      "stuck": "discharge_pressure"}


@dataclass(frozen=True)
class FaultSpec:
    """One injected fault; ``start``/``duration`` are seconds from the series start."""

    kind: str
    start: int
    duration: int
    channel: str

    def __post_init__(self) -> None:
        # Fail at construction time so a typo never silently yields a healthy run.
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; "
                             f"valid kinds: {', '.join(FAULT_KINDS)}")
        if self.channel not in _IDX and self.channel not in COMPRESSOR_CHANNELS:
            raise ValueError(f"unknown channel {self.channel!r}; valid channels: {', '.join(CHANNELS)} "
                             f"(pump), {', '.join(COMPRESSOR_CHANNELS)} (compressor)")
        if self.start < 0 or self.duration <= 0:
            raise ValueError(f"fault needs start >= 0 and duration > 0, "
                             f"got start={self.start}, duration={self.duration}")


@dataclass
class SimulatedSeries:
    """A generated run: ``values[i, j]`` is channel ``channels[j]`` at ``timestamps[i]``."""

    timestamps: np.ndarray  # float64 unix seconds (UTC)
    values: np.ndarray  # float64, shape (n, len(CHANNELS))
    labels: np.ndarray  # int8, 1 inside a fault segment
    channels: tuple[str, ...] = CHANNELS


def _start_time(start: datetime | None) -> float:
    """Unix seconds of ``start`` (default 2024-01-01 UTC); naive datetimes are UTC, never local time."""
    start = start or datetime(2024, 1, 1, tzinfo=UTC)
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    return float(start.timestamp())


def _check_run(seconds: int, faults: Sequence[FaultSpec], machine: str, channels: Sequence[str]) -> None:
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    for f in faults:
        if f.channel not in channels:
            raise ValueError(f"fault channel {f.channel!r} is not a {machine} channel: {', '.join(channels)}")
        if f.start + f.duration > seconds:
            raise ValueError(f"fault {f} ends after the series ({seconds} s)")


def _stuck_excursion(seconds: int, faults: Sequence[FaultSpec]) -> np.ndarray:
    """The load excursion under each ``stuck`` fault: the process keeps moving while the sensor is frozen,
    which is what makes a frozen reading contradict its correlated channels."""
    excursion = np.zeros(seconds)
    for f in faults:
        if f.kind == "stuck":
            frac = (np.arange(f.duration) + 0.5) / f.duration
            excursion[f.start:f.start + f.duration] += 0.2 * np.sin(np.pi * frac)
    return excursion


class PumpSimulator:
    """A stateful pump model: successive :meth:`generate` calls continue the same machine.

    Continuity matters because a model trained on one run (``healthy.csv``) must apply
    to a later run (``labelled.csv``): the load, thermal state and clock carry over.
    """

    def __init__(self, seed: int = 0, start: datetime | None = None) -> None:
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._t = _start_time(start)
        self._load = _LOAD_MEAN
        self._temp = self._temp_target(self._t, self._load)
        self._tc = self._temp - 3.0  # housing runs ~3 C cooler than the winding

    @staticmethod
    def _ambient(t: float | np.ndarray) -> float | np.ndarray:
        # Warmest mid-afternoon (15:00 UTC), 22 +- 4 C.
        return 22.0 + 4.0 * np.sin(2 * np.pi * (t - 9 * 3600.0) / _DAY)

    @classmethod
    def _temp_target(cls, t: float, load: float) -> float:
        return float(cls._ambient(t)) + 38.0 + 30.0 * load

    def generate(self, seconds: int, faults: Sequence[FaultSpec] = ()) -> SimulatedSeries:
        """Advance the machine by ``seconds`` samples (1 Hz) and inject ``faults``."""
        _check_run(seconds, faults, "pump", CHANNELS)
        ts = self._t + np.arange(seconds, dtype=np.float64)
        # Fault randomness uses its own stream so the healthy part is identical with
        # or without faults (lets tests compare a faulty run against a clean one).
        fault_rng = np.random.default_rng([self._seed, int(self._t)])
        setpoint = _LOAD_MEAN + 0.08 * np.sin(2 * np.pi * ts / _DAY)
        excursion = _stuck_excursion(seconds, faults)

        load, temp, tc = np.empty(seconds), np.empty(seconds), np.empty(seconds)
        steps = self._rng.standard_normal(seconds) * _LOAD_STEP
        for i in range(seconds):
            self._load += _LOAD_REVERT * (setpoint[i] - self._load) + steps[i]
            self._load = min(max(self._load, 0.3), 1.0)
            load[i] = self._load + excursion[i]
            self._temp += (self._temp_target(ts[i], load[i]) - self._temp) / _TEMP_TAU
            self._tc += (self._temp - 3.0 - self._tc) / _TC_TAU
            temp[i], tc[i] = self._temp, self._tc
        self._t += seconds

        flow = 40.0 * load
        clean = np.column_stack([
            0.6 + 2.8 * load,  # vibration_1, mm/s RMS (drive end)
            0.5 + 2.2 * load,  # vibration_2, mm/s RMS (non-drive end)
            0.45 + 1.35 * load,  # current, A
            0.05 + 0.9 * (flow / 40.0) ** 2,  # pressure, bar (pump curve ~ flow^2)
            temp,  # temperature, C (winding)
            tc,  # thermocouple, C (housing, lags the winding)
            230.0 + 0.6 * np.sin(2 * np.pi * ts / _DAY) - 1.5 * (load - _LOAD_MEAN),  # V
            flow,  # l/min
        ])
        values = clean + self._rng.standard_normal(clean.shape) * _NOISE
        labels = np.zeros(seconds, dtype=np.int8)
        for f in faults:
            _inject(values, f, fault_rng)
            labels[f.start:f.start + f.duration] = 1
        logger.debug("generated %d s with %d faults", seconds, len(faults))
        return SimulatedSeries(ts, values, labels, CHANNELS)


class CompressorSimulator:
    """A stateful compressor-like machine (1 Hz, :data:`COMPRESSOR_CHANNELS`), the pump's counterpart.

    One latent ``load`` (a mean-reverting walk, as the pump's) drives every channel: discharge pressure
    and motor current rise with it, suction pressure falls, the discharge temperature follows it with a
    lag and the oil temperature lags that; vibration follows the current. The same faults apply.
    """

    channels = COMPRESSOR_CHANNELS

    def __init__(self, seed: int = 0, start: datetime | None = None) -> None:
        self._seed = seed
        self._rng = np.random.default_rng([seed, 7])
        self._t = _start_time(start)
        self._load = 0.6
        self._dt = self._dt_target(self._t, self._load)
        self._oil = self._dt - 25.0

    @staticmethod
    def _dt_target(t: float, load: float) -> float:
        return float(PumpSimulator._ambient(t)) + 50.0 + 40.0 * load

    def generate(self, seconds: int, faults: Sequence[FaultSpec] = ()) -> SimulatedSeries:
        """Advance the machine by ``seconds`` samples (1 Hz) and inject ``faults``."""
        _check_run(seconds, faults, "compressor", COMPRESSOR_CHANNELS)
        ts = self._t + np.arange(seconds, dtype=np.float64)
        fault_rng = np.random.default_rng([self._seed, int(self._t), 7])
        setpoint = 0.6 + 0.1 * np.sin(2 * np.pi * ts / _DAY)
        excursion = _stuck_excursion(seconds, faults)
        load, dtemp, oil = np.empty(seconds), np.empty(seconds), np.empty(seconds)
        steps = self._rng.standard_normal(seconds) * _LOAD_STEP
        for i in range(seconds):  # a compressor holds its set-point more tightly than the pump
            self._load += _C_LOAD_REVERT * (setpoint[i] - self._load) + steps[i]
            self._load = min(max(self._load, 0.3), 1.0)
            load[i] = self._load + excursion[i]
            self._dt += (self._dt_target(ts[i], load[i]) - self._dt) / _C_DT_TAU
            self._oil += (self._dt - 25.0 - self._oil) / _C_OIL_TAU
            dtemp[i], oil[i] = self._dt, self._oil
        self._t += seconds
        clean = np.column_stack([
            2.0 - 0.3 * load,  # suction pressure, bar
            6.0 + 4.0 * load,  # discharge pressure, bar
            10.0 + 25.0 * load,  # motor current, A
            dtemp,  # discharge temperature, C
            oil,  # oil temperature, C (lags the discharge)
            1.0 + 2.0 * load,  # vibration, mm/s RMS
        ])
        values = clean + self._rng.standard_normal(clean.shape) * _C_NOISE
        labels = np.zeros(seconds, dtype=np.int8)
        for f in faults:
            _inject(values, f, fault_rng, _C_IDX, _C_SPREAD, _C_KNOCK_ON)
            labels[f.start:f.start + f.duration] = 1
        return SimulatedSeries(ts, values, labels, COMPRESSOR_CHANNELS)


def _inject(values: np.ndarray, f: FaultSpec, rng: np.random.Generator, index: dict[str, int] | None = None,
            spread: np.ndarray | None = None, knock_on: dict[str, tuple[str, float]] | None = None) -> None:
    """Apply one fault in place; magnitudes are in healthy-spread units (see ``_SPREAD``; the pump's
    unless the machine's ``index``, ``spread`` and ``knock_on`` are given)."""
    idx, spr, knock = index or _IDX, spread if spread is not None else _SPREAD, knock_on or _KNOCK_ON
    j, seg = idx[f.channel], slice(f.start, f.start + f.duration)
    if f.kind == "step":
        values[seg, j] += 5.0 * spr[j]
        partner, frac = knock[f.channel]
        values[seg, idx[partner]] += 5.0 * frac * spr[idx[partner]]
    elif f.kind == "drift":
        # sqrt growth: ~4.6 spreads after the first third, 8 by the end.
        ramp = (np.arange(f.duration) + 1.0) / f.duration
        values[seg, j] += 8.0 * spr[j] * np.sqrt(ramp)
    elif f.kind == "spikes":
        t = f.start + int(rng.integers(0, 3))
        while t < f.start + f.duration:
            values[t, j] += rng.uniform(6.0, 12.0) * spr[j]
            t += int(rng.integers(1, 4))  # every 1-3 s
    elif f.kind == "stuck":
        values[seg, j] = values[f.start - 1, j] if f.start > 0 else values[0, j]


def _schedule(kinds: Sequence[str], lead: int) -> list[FaultSpec]:
    """Faults of ``FAULT_SECONDS`` each, ``GAP_SECONDS`` apart, after a healthy lead."""
    return [FaultSpec(kind, lead + i * (FAULT_SECONDS + GAP_SECONDS), FAULT_SECONDS,
                      _DEFAULT_CHANNEL[kind]) for i, kind in enumerate(kinds)]


def default_faults(seconds_healthy_lead: int) -> list[FaultSpec]:
    """All four fault kinds, 120 s each, separated by 240 s healthy, after the lead."""
    return _schedule(FAULT_KINDS, seconds_healthy_lead)


def write_csv(path: Path, series: SimulatedSeries, include_labels: bool) -> None:
    """Write ``timestamp,<channels>[,anomaly]`` with UTC ISO-8601 timestamps."""
    header = ["timestamp", *series.channels] + (["anomaly"] if include_labels else [])
    with Path(path).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i, ts in enumerate(series.timestamps):
            row = [datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S")]
            row += [f"{v:.6g}" for v in series.values[i]]
            if include_labels:
                row.append(str(int(series.labels[i])))
            writer.writerow(row)


def simulate(out_dir: Path, seconds: int = 3600, faults: Sequence[str] = FAULT_KINDS,
             seed: int = 0) -> tuple[Path, Path]:
    """Write ``healthy.csv`` (``seconds`` long) and ``labelled.csv`` (faults) into ``out_dir``.

    Both come from one :class:`PumpSimulator`, so the labelled run is the same machine
    continuing after the healthy run and a model trained on the former applies.
    """
    unknown = [k for k in faults if k not in FAULT_KINDS]
    if unknown:
        raise UsageError(f"unknown fault kind(s) {', '.join(map(repr, unknown))}; "
                         f"valid kinds: {', '.join(FAULT_KINDS)}")
    if seconds < 60:
        raise UsageError(f"seconds must be >= 60, got {seconds}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sim = PumpSimulator(seed=seed)
    healthy_path, labelled_path = out / "healthy.csv", out / "labelled.csv"
    write_csv(healthy_path, sim.generate(seconds), include_labels=False)
    schedule = _schedule(faults, LEAD_SECONDS)
    total = LEAD_SECONDS + len(schedule) * (FAULT_SECONDS + GAP_SECONDS)
    write_csv(labelled_path, sim.generate(total, schedule), include_labels=True)
    logger.info("wrote %s (%d s) and %s (%d s, faults: %s)", healthy_path, seconds,
                labelled_path, total, ", ".join(faults) or "none")
    return healthy_path, labelled_path
