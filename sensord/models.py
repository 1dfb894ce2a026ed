"""Several models in one daemon: which bundle scores which device (``daemon.model`` or ``daemon.models``).

A :class:`ModelSet` holds every bundle the configuration names, loaded once each (two entries naming
one directory share one :class:`~sensord.pipeline.ServingModel`, so their windows batch together), and
binds a device id to one of them: the first ``daemon.models`` entry whose ``match`` glob matches the
id and that has a bundle for it. A per-device entry (``path`` with ``{device}``) has one when the
directory named after the device was there at start-up or at the last SIGHUP, else its ``fallback``.

Models of one daemon may read different channels (a pump and a compressor) on different sampling
periods: each device's readings are parsed, assembled and windowed with the channels, clip bounds and
clock of the model bound to it (:meth:`ModelSet.layout_for`, which the parsers ask per device), and
a device that no model serves is rejected as ``no_model`` before anything is assembled for it. An
entry's ``channels`` (else ``data.channels``), if given, is what its bundles must read. With
``daemon.models`` each model cuts the windows it was trained with (length, hop, gap recorded in its
bundle), not the ``window`` section's.

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

from .bundle import BundleError
from .config import ConfigError, ModelRouteConfig, SensordConfig
from .formats.base import Layout
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


def expected_channels(cfg: SensordConfig, entry: int) -> tuple[list[str], str]:
    """The channels a bundle of ``daemon.models[entry]`` must read (empty: any), and the key that says so:
    the entry's ``channels``, else ``data.channels`` (also for ``daemon.model``)."""
    if cfg.daemon.models and cfg.daemon.models[entry].channels:
        return list(cfg.daemon.models[entry].channels), f"daemon.models.{entry}.channels"
    return list(cfg.data.channels), "data.channels"


def check_bundles(cfg: SensordConfig) -> tuple[list[str], list[str]]:
    """Load and self-check every bundle ``daemon.models`` names now (``sensord check-config``), as ``run``
    would: each fixed path and fallback, and each per-device directory whose device the entry matches.

    Returns every problem found (naming the entry, ``daemon.models.<i>.path`` or ``.fallback``, the
    directory and what is wrong) and one line per bundle that passed.
    """
    problems: list[str] = []
    passed: list[str] = []
    loaded: dict[str, ServingModel | None] = {}
    found = False
    for i, entry in enumerate(cfg.daemon.models):
        todo: list[tuple[str, str]] = []
        if not entry.per_device:
            todo.append((f"daemon.models.{i}.path", entry.path))
        else:
            if entry.fallback is not None:
                todo.append((f"daemon.models.{i}.fallback", entry.fallback))
            todo += [(f"daemon.models.{i}.path ({device})", path)
                     for device, path in sorted(per_device_dirs(entry.path).items())
                     if fnmatch.fnmatchcase(device, entry.match)]
        for key, path in todo:
            found = True
            want, name = expected_channels(cfg, i)
            k = _key(path)
            if k not in loaded:
                try:
                    loaded[k] = ServingModel.load(cfg, path, own_window=True, channels=(want, name))
                except (BundleError, ConfigError) as exc:
                    loaded[k] = None
                    problems.append(f"{key}: {'; '.join(exc.errors) if isinstance(exc, ConfigError) else exc}")
                    continue
                model = loaded[k]
                assert model is not None
                checked = "self-check passed" if model.bundle.reference is not None else "no reference windows"
                passed.append(f"{key}: {model.bundle.path} model {model.bundle.model_id}, "
                              f"{len(model.bundle.channels)} channels, window {model.bundle.window_length}, "
                              f"{checked}")
                continue
            model = loaded[k]
            if model is not None and want and list(want) != list(model.bundle.channels):
                problems.append(f"{key}: {model.bundle.path}: channels {list(model.bundle.channels)} do not match "
                                f"the configured {name} {list(want)}")
    if cfg.daemon.models and not found:
        problems.append("daemon.models: no bundle found: no per-device directory exists yet and no entry names a "
                        "fixed path or a fallback")
    return problems, passed


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
        self._layouts: dict[int, Layout] = {}  # each model's channels, clip bounds and assembly clock
        self._device_layouts: dict[str, Layout | None] = {}  # the layout each device was given

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

    # -- what the reading path asks per device ------------------------------------------------------

    def layout_for(self, device: str) -> Layout | None:
        """The channels, clip bounds and assembly clock ``device``'s readings are taken with: those of the
        model bound to it (None: no model serves it). Remembered per device (bounded), as the parsers ask
        for every reading."""
        try:
            return self._device_layouts[device]
        except KeyError:
            pass
        model = self.bind(device)
        layout = None if model is None else self.layout(model)
        if len(self._device_layouts) >= 10 * self.cfg.daemon.max_devices:  # bounded: hostile ids
            self._device_layouts.clear()
        self._device_layouts[device] = layout
        return layout

    def layout(self, model: ServingModel) -> Layout:
        """``model``'s channels, clip bounds (``scoring.clip_spreads``) and assembly clock."""
        layout = self._layouts.get(id(model))
        if layout is None:
            period = self.cfg.assembly_period(model.bundle.sample_period_seconds, f"model {model.bundle.path}")
            layout = self._layouts[id(model)] = Layout.of(model.bundle.channels, (model.low, model.high), period)
        return layout

    @property
    def channels(self) -> tuple[str, ...]:
        """The first model's channels (what a single-model daemon reads for every device)."""
        primary = self.primary
        return () if primary is None else primary.bundle.channels

    def period(self) -> float | None:
        """The first model's assembly clock (see :meth:`layout_for` for each device's own)."""
        primary = self.primary
        return None if primary is None else self.layout(primary).period

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

        def get(path: str, entry: int) -> ServingModel | None:
            key = _key(path)
            if key in loaded:
                model = loaded[key]
                want, name = expected_channels(cfg, entry)
                if not want or list(want) == list(model.bundle.channels):
                    return model
                problem = f"channels {list(model.bundle.channels)} do not match the configured {name} {list(want)}"
                if previous is None:
                    raise BundleError(f"{model.bundle.path}: {problem}")
                refused.append(Refusal(path, f"{model.bundle.path}: {problem}"))
                return None
            try:
                model = ServingModel.load(cfg, path, own_window=bool(cfg.daemon.models),
                                          channels=expected_channels(cfg, entry))
            except (BundleError, ConfigError) as exc:
                if previous is None:
                    raise
                refused.append(Refusal(path, str(exc)))
                old = previous.by_path.get(key)
                if old is None:
                    return None
                model = old
            loaded[key] = model
            return model

        routes = []
        for i, entry in enumerate(entries):
            if not entry.per_device:
                routes.append(Route(entry.match, get(entry.path, i), {}, None))
                continue
            fallback = get(entry.fallback, i) if entry.fallback is not None else None
            own = {}
            for device, path in sorted(per_device_dirs(entry.path).items()):
                if fnmatch.fnmatchcase(device, entry.match):
                    model = get(path, i)
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
