"""Per-channel input scaling, fitted on the training part only.

Kept in numpy (not inside the network) so the serving path needs no
TensorFlow and the parameters are plain numbers in ``bundle.json`` that an
operator can read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

ScalerKind = Literal["standard", "minmax"]
_EPS = 1e-8


@dataclass(frozen=True)
class Scaler:
    """``(x - offset) / scale`` per channel.

    >>> s = Scaler.fit(np.array([[0.0, 10.0], [2.0, 30.0]]), "minmax")
    >>> s.transform(np.array([[1.0, 20.0]])).tolist()
    [[0.5, 0.5]]
    """

    kind: ScalerKind
    offset: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray, kind: ScalerKind, min_relative_scale: float = 0.0) -> Scaler:
        """Fit on training rows; ``min_relative_scale`` r floors each channel's scale at r * |mean|.

        A short healthy period can leave a slow channel (a temperature creeping by a few
        hundredths of a degree) with a tiny spread; scaled by that spread, any later drift
        of it looks like many standard deviations and dominates the error. The floor says
        "changes smaller than r of the reading's own level are not meaningful"; channels
        whose spread is already larger than that are unchanged.
        """
        if min_relative_scale < 0:
            raise ValueError(f"min_relative_scale must be >= 0, got {min_relative_scale}")
        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 2 or len(v) == 0:
            raise ValueError(f"scaler needs a non-empty (rows, channels) array, got shape {v.shape}")
        if kind == "standard":
            offset, scale = v.mean(axis=0), v.std(axis=0)
        elif kind == "minmax":
            offset, scale = v.min(axis=0), v.max(axis=0) - v.min(axis=0)
        else:
            raise ValueError(f"unknown scaler kind {kind!r}")
        # A constant channel in the healthy period must not divide by zero; any
        # later movement of it then shows up as a (large) reconstruction error.
        scale = np.where(scale < _EPS, 1.0, scale)
        if min_relative_scale > 0:
            scale = np.maximum(scale, min_relative_scale * np.abs(v.mean(axis=0)))
        return cls(kind, offset.astype(np.float32), scale.astype(np.float32))

    def transform(self, values: np.ndarray) -> np.ndarray:
        return ((np.asarray(values, dtype=np.float32) - self.offset) / self.scale).astype(np.float32, copy=False)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "offset": self.offset.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], channels: int) -> Scaler:
        kind = d.get("kind")
        if kind not in ("standard", "minmax"):
            raise ValueError(f"scaler.kind must be 'standard' or 'minmax', got {kind!r}")
        offset = np.asarray(d.get("offset", []), dtype=np.float32)
        scale = np.asarray(d.get("scale", []), dtype=np.float32)
        if offset.shape != (channels,) or scale.shape != (channels,):
            raise ValueError(f"scaler offset/scale must have {channels} values (one per channel), "
                             f"got {offset.shape[0] if offset.ndim else 0} and {scale.shape[0] if scale.ndim else 0}")
        if not (np.all(np.isfinite(offset)) and np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise ValueError("scaler offset/scale must be finite and scale > 0")
        return cls(kind, offset, scale)
