"""Scaler: fitted on training rows only; the relative floor keeps barely-moving channels from dominating."""

from __future__ import annotations

import numpy as np
import pytest

from sensord.scaling import Scaler


def test_standard_and_minmax_fit_known_numbers() -> None:
    v = np.array([[0.0, 10.0], [2.0, 30.0]])
    std = Scaler.fit(v, "standard")
    assert std.offset.tolist() == [1.0, 20.0] and std.scale.tolist() == [1.0, 10.0]
    mm = Scaler.fit(v, "minmax")
    assert mm.transform(np.array([[2.0, 10.0]])).tolist() == [[1.0, 0.0]]


def test_constant_channel_gets_unit_scale() -> None:
    s = Scaler.fit(np.array([[5.0, 1.0], [5.0, 2.0]]), "standard")
    assert s.scale[0] == 1.0


def test_relative_floor_only_lifts_channels_whose_spread_is_below_it() -> None:
    rng = np.random.default_rng(0)
    slow = 80.0 + rng.normal(0, 0.01, 500)  # a temperature that barely moved: std 0.01 << 1 % of 80
    busy = 1.5 + rng.normal(0, 0.3, 500)  # a current whose spread is far above 1 % of its level
    v = np.stack([slow, busy], axis=1)
    plain = Scaler.fit(v, "standard")
    floored = Scaler.fit(v, "standard", min_relative_scale=0.01)
    assert floored.scale[0] == pytest.approx(0.01 * abs(slow.mean()), rel=1e-6)
    assert floored.scale[1] == plain.scale[1]
    # A 0.2-degree drift: dozens of "standard deviations" without the floor, a quarter of one with it.
    drifted = np.array([[slow.mean() + 0.2, busy.mean()]])
    assert plain.transform(drifted)[0, 0] > 10
    assert floored.transform(drifted)[0, 0] < 0.3


def test_negative_floor_rejected() -> None:
    with pytest.raises(ValueError, match="min_relative_scale"):
        Scaler.fit(np.ones((3, 1)), "standard", min_relative_scale=-0.1)


def test_round_trip_and_bad_dict() -> None:
    s = Scaler.fit(np.array([[0.0, 1.0], [1.0, 3.0]]), "minmax")
    again = Scaler.from_dict(s.to_dict(), 2)
    assert again.offset.tolist() == s.offset.tolist() and again.scale.tolist() == s.scale.tolist()
    with pytest.raises(ValueError, match="2 values"):
        Scaler.from_dict({"kind": "minmax", "offset": [0.0], "scale": [1.0]}, 2)
    with pytest.raises(ValueError, match="scale > 0"):
        Scaler.from_dict({"kind": "minmax", "offset": [0.0, 0.0], "scale": [1.0, 0.0]}, 2)
