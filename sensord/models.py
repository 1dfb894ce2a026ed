"""Several models in one daemon: which bundle scores which device (``daemon.model`` or ``daemon.models``).

A :class:`ModelSet` holds every bundle the configuration names, loaded once each (two entries naming
one directory share one :class:`~sensord.pipeline.ServingModel`, so their windows batch together), and
binds a device id to one of them: the first ``daemon.models`` entry whose ``match`` glob matches the
id and that has a bundle for it. A per-device entry (``path`` with ``{device}``) has one when the
directory named after the device was there at start-up or at the last SIGHUP, else its ``fallback``.

Every model of one daemon reads the same channels (one reading path, one set of parsers, built
for one channel list), and on the same assembly clock when channels arrive separately: a bundle
that differs is refused by name. Per-device models with the same sensors — other scalers,
thresholds, window lengths — are what this serves: with ``daemon.models`` each model cuts the
windows it was trained with (length, hop, gap recorded in its bundle), not the ``window`` section's.

A reload (:meth:`ModelSet.load` with ``previous``) loads every bundle again; one that cannot be
loaded is refused by name and its previous version keeps serving, the others switch.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import BundleError
from .config import ConfigError, ModelRouteConfig, SensordConfig
from .pipeline import ServingModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """One ``daemon.models`` entry with its bundles loaded."""

    match: str
    model: ServingModel | None  # a fixed path's bundle
    per_device: dict[str, ServingModel]  # {device} layouts: device id -> its own bundle
    fallback: ServingModel | None

    def bind(self, device: str) -> ServingModel | None:
        if not fnmatch.fnmatchcase(device, self.match):
            return None
        if self.model is not None:
            return self.model
        return self.per_device.get(device, self.fallback)


@dataclass(frozen=True)
class Refusal:
    """A bundle a reload could not take (its previous version, if any, keeps serving)."""

    path: str
    reason: str


def _key(path: str | Path) -> str:
    return str(Path(path).expanduser().absolute())


def per_device_dirs(template: str) -> dict[str, str]:
    """The directories a per-device ``path`` names now: device id -> directory (``{device}`` one component)."""
    before, after = template.split("{device}")
    found: dict[str, str] = {}
    pattern = re.compile(re.escape(before) + r"([^/]+)" + re.escape(after) + r"/?")
    for hit in glob.glob(glob.escape(before) + "*" + glob.escape(after)):
        m = pattern.fullmatch(hit)
        if m is not None and Path(hit).is_dir():
            found[m.group(1)] = hit
    return found


def mismatch(cfg: SensordConfig, model: ServingModel, reference: ServingModel) -> str | None:
    """Why ``model`` cannot share ``reference``'s reading path (channels, assembly clock), or None."""
    a, b = model.bundle, reference.bundle
    if a.channels != b.channels:
        return (f"its channels {list(a.channels)} differ from those of {b.path} {list(b.channels)}: every model "
                "of one daemon must read the same channels, in the same order")
    if cfg.assembly_needed() is not None and cfg.assembly.sample_period_seconds is None \
            and a.sample_period_seconds != b.sample_period_seconds:
        return (f"its sampling period {a.sample_period_seconds} s differs from that of {b.path} "
                f"({b.sample_period_seconds} s) and the channels are assembled on one clock: set "
                "assembly.sample_period_seconds")
    return None


class ModelSet:
    """The loaded bundles and the rule that binds a device to one of them."""

    def __init__(self, routes: list[Route], cfg: SensordConfig,
                 by_path: dict[str, ServingModel] | None = None) -> None:
        self.routes = routes
        self.cfg = cfg
        seen: dict[int, ServingModel] = {}
        for r in routes:
            for m in (r.model, r.fallback, *r.per_device.values()):
                if m is not None:
                    seen.setdefault(id(m), m)
        self.models: list[ServingModel] = list(seen.values())  # each once, in configuration order
        self.by_path = by_path or {}  # the bundle loaded from each directory (a reload keeps a refused one's)

    @classmethod
    def single(cls, model: ServingModel, cfg: SensordConfig) -> ModelSet:
        """One model for every device (``daemon.model``, and what tests and benchmarks build)."""
        return cls([Route("*", model, {}, None)], cfg)

    @property
    def primary(self) -> ServingModel | None:
        """The first model loaded (what the single-model metrics and messages name)."""
        return self.models[0] if self.models else None

    def bind(self, device: str) -> ServingModel | None:
        """The model that scores ``device``: the first entry that matches it and has a bundle for it."""
        for route in self.routes:
            model = route.bind(device)
            if model is not None:
                return model
        return None

    # -- the reading path every model shares -------------------------------------------------------

    @property
    def channels(self) -> tuple[str, ...]:
        primary = self.primary
        return () if primary is None else primary.bundle.channels

    def period(self) -> float | None:
        """The assembly clock (the models agree on it when it is needed; see :func:`mismatch`)."""
        primary = self.primary
        return None if primary is None else self.cfg.assembly_period(primary.bundle.sample_period_seconds,
                                                                     f"model {primary.bundle.path}")

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Clip bounds wide enough for every model (an overflow guard; each model's scaler is its own)."""
        return (np.minimum.reduce([m.low for m in self.models]), np.maximum.reduce([m.high for m in self.models]))

    # -- loading -------------------------------------------------------------------------------------

    @classmethod
    def load(cls, cfg: SensordConfig, previous: ModelSet | None = None) -> tuple[ModelSet, list[Refusal]]:
        """Load every bundle the config names (``daemon.models``, else ``daemon.model``).

        Without ``previous`` (start-up) the first bundle that cannot be served raises (BundleError or
        ConfigError naming it): nothing starts on a half-loaded set. With ``previous`` (a reload) such a
        bundle is refused — listed in the returned refusals — and its previous version, if there was one at
        that path, stays; the others are the new versions.
        """
        entries = cfg.daemon.models or [ModelRouteConfig(path=cfg.daemon.model)]
        loaded: dict[str, ServingModel] = {}
        refused: list[Refusal] = []
        reference: list[ServingModel] = []  # the first model: the channels every other one must have

        def get(path: str) -> ServingModel | None:
            key = _key(path)
            if key in loaded:
                return loaded[key]
            try:
                model = ServingModel.load(cfg, path, own_window=bool(cfg.daemon.models))
                if reference:
                    problem = mismatch(cfg, model, reference[0])
                    if problem is not None:
                        raise BundleError(f"{model.bundle.path}: {problem}")
            except (BundleError, ConfigError) as exc:
                if previous is None:
                    raise
                refused.append(Refusal(path, str(exc)))
                old = previous.by_path.get(key)
                if old is None:
                    return None
                model = old
            loaded[key] = model
            if not reference:
                reference.append(model)
            return model

        routes = []
        for entry in entries:
            if not entry.per_device:
                routes.append(Route(entry.match, get(entry.path), {}, None))
                continue
            fallback = get(entry.fallback) if entry.fallback is not None else None
            own = {}
            for device, path in sorted(per_device_dirs(entry.path).items()):
                if fnmatch.fnmatchcase(device, entry.match):
                    model = get(path)
                    if model is not None:
                        own[device] = model
            routes.append(Route(entry.match, None, own, fallback))
        models = cls(routes, cfg, loaded)
        if previous is None and not models.models:
            raise ConfigError(["daemon.models: no bundle found: no per-device directory exists yet and no entry "
                               "names a fixed path or a fallback"])
        return models, refused

    def describe(self) -> str:
        """One line per route for the start-up log."""
        parts = []
        for r in self.routes:
            if r.model is not None:
                parts.append(f"{r.match} -> {r.model.bundle.model_id}")
            else:
                fb = r.fallback.bundle.model_id if r.fallback is not None else "none"
                parts.append(f"{r.match} -> own bundle ({len(r.per_device)} found), fallback {fb}")
        return "; ".join(parts)
