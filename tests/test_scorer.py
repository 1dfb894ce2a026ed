"""Tests for sensord.scorer: TFLite scoring equals the Keras model, is batch-invariant, needs no TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sensord.bundle import ModelBundle
from sensord.config import config_from_dict
from sensord.dataio import Series
from sensord.scorer import Scorer, reconstruction_errors
from sensord.simulator import CHANNELS, PumpSimulator
from sensord.windows import WindowSpec, windowize

pytestmark = pytest.mark.training  # trains a tiny TensorFlow model (make test-fast leaves it out)

WINDOW = 10
C = len(CHANNELS)

TINY = {
    "window": {"length": WINDOW},
    "model": {"kind": "dense", "encoder_units": [16], "latent_units": 4},
    "training": {"epochs": 6, "batch_size": 64, "patience": 6},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A tiny bundle trained on a healthy run, and 300 windows from the same machine later on."""
    from sensord.training import train_bundle

    sim = PumpSimulator(seed=21)
    healthy = sim.generate(500)
    later = sim.generate(300 + WINDOW - 1)
    path = tmp_path_factory.mktemp("scorer") / "model"
    series = Series(healthy.timestamps, healthy.values.astype(np.float32), CHANNELS, None, "healthy")
    train_bundle(series, config_from_dict(TINY), path)
    windows = windowize(later.timestamps, later.values.astype(np.float32), WindowSpec(WINDOW)).values
    assert windows.shape == (300, WINDOW, C)
    return path, windows


@pytest.fixture(scope="module")
def scorer(setup: tuple[Path, np.ndarray]) -> Scorer:
    return Scorer(ModelBundle.load(setup[0]))


def test_reconstruction_errors_by_hand() -> None:
    scaled = np.zeros((2, 2, 2), dtype=np.float32)
    recon = np.array([[[1, 0], [1, 0]], [[2, 2], [0, 0]]], dtype=np.float32)
    err, shares = reconstruction_errors(scaled, recon, "mse")
    # window 0: cells 1,0,1,0 -> mean 0.5, all of it in channel 0
    # window 1: cells 4,4,0,0 -> mean 2.0, split evenly
    np.testing.assert_allclose(err, [0.5, 2.0])
    np.testing.assert_allclose(shares, [[1.0, 0.0], [0.5, 0.5]])
    err, shares = reconstruction_errors(scaled, recon, "mae")
    np.testing.assert_allclose(err, [0.5, 1.0])
    # a perfect reconstruction shares the (zero) error evenly
    err, shares = reconstruction_errors(scaled, scaled, "mse")
    np.testing.assert_allclose(err, [0.0, 0.0])
    np.testing.assert_allclose(shares, [[0.5, 0.5], [0.5, 0.5]])


def test_scorer_equals_keras_model(setup: tuple[Path, np.ndarray], scorer: Scorer) -> None:
    import keras

    path, windows = setup
    bundle = scorer.bundle
    model = keras.models.load_model(path / "model.keras")
    scaled = bundle.scaler.transform(windows)
    recon = model.predict(scaled, verbose=0, batch_size=64)
    expected, expected_shares = reconstruction_errors(scaled, recon, bundle.error_metric)
    got = scorer.score(windows)
    assert got.errors.shape == (300,)
    assert np.allclose(got.errors, expected, rtol=1e-4)
    assert np.allclose(got.channel_shares, expected_shares, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 5, 64, 300])
def test_batch_size_does_not_change_errors(setup: tuple[Path, np.ndarray], scorer: Scorer, batch: int) -> None:
    windows = setup[1][:batch]
    one_by_one = np.array([scorer.score(windows[i:i + 1]).errors[0] for i in range(batch)])
    together = scorer.score(windows)
    assert together.errors.shape == (batch,)
    np.testing.assert_allclose(together.errors, one_by_one, rtol=1e-5, atol=1e-9)


def test_small_max_batch_gives_same_errors(setup: tuple[Path, np.ndarray], scorer: Scorer) -> None:
    windows = setup[1]
    small = Scorer(scorer.bundle, max_batch=4)
    np.testing.assert_allclose(small.score(windows).errors, scorer.score(windows).errors, rtol=1e-5, atol=1e-9)


def test_channel_shares_sum_to_one(setup: tuple[Path, np.ndarray], scorer: Scorer) -> None:
    shares = scorer.score(setup[1]).channel_shares
    assert shares.shape == (300, C)
    assert np.all(shares >= 0)
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, rtol=1e-9)


@pytest.mark.parametrize("j", range(C))
def test_perturbed_channel_is_top(setup: tuple[Path, np.ndarray], scorer: Scorer, j: int) -> None:
    base = setup[1][50].copy()
    bad = base.copy()
    bad[:, j] += 50.0 * scorer.bundle.scaler.scale[j]  # 50 healthy standard deviations
    scored = scorer.score(np.stack([base, bad]))
    assert scored.errors[1] > 10 * scored.errors[0]
    top = scorer.top_channels(scored.channel_shares[1], 3)
    assert len(top) == 3
    assert top[0][0] == CHANNELS[j]
    assert top[0][1] > 0.9
    assert top[0][1] >= top[1][1] >= top[2][1]


def test_threshold_and_channels_exposed(scorer: Scorer) -> None:
    assert scorer.threshold == scorer.bundle.threshold.value
    assert scorer.channels == CHANNELS


@pytest.mark.parametrize("shape", [(5, WINDOW + 1, C), (5, WINDOW, C - 1), (WINDOW, C), (5, WINDOW, C, 1)])
def test_wrong_window_shape_raises(scorer: Scorer, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="windows must have shape"):
        scorer.score(np.zeros(shape, dtype=np.float32))


def test_empty_batch(scorer: Scorer) -> None:
    res = scorer.score(np.zeros((0, WINDOW, C), dtype=np.float32))
    assert res.errors.shape == (0,) and res.channel_shares.shape == (0, C)


def test_scoring_runs_without_tensorflow(setup: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, windows = setup
    np.save(tmp_path / "w.npy", windows[:20])
    code = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import sensord.scorer, sensord.bundle
        b = sensord.bundle.ModelBundle.load({str(path)!r})
        s = sensord.scorer.Scorer(b)
        r = s.score(np.load({str(tmp_path / "w.npy")!r}))
        print(json.dumps({{"tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules,
                          "errors": r.errors.tolist()}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tensorflow"] is False
    assert out["keras"] is False
    assert len(out["errors"]) == 20 and all(np.isfinite(out["errors"]))


@pytest.mark.parametrize("kind", ["conv1d", "lstm"])
def test_every_model_kind_converts_and_scores_like_keras(setup: tuple[Path, np.ndarray], kind: str,
                                                         tmp_path: Path) -> None:
    """The sequence variants go through the same TFLite path (LSTM unrolled) and match Keras too."""
    import keras

    from sensord.training import train_bundle

    healthy = PumpSimulator(seed=5).generate(300)
    series = Series(healthy.timestamps, healthy.values.astype(np.float32), CHANNELS, None, "healthy")
    cfg = config_from_dict({**TINY, "model": {"kind": kind, "conv_filters": [8], "lstm_units": [8],
                                              "latent_units": 4, "kernel_size": 3},
                            "training": {"epochs": 2, "batch_size": 64}})
    bundle = train_bundle(series, cfg, tmp_path / kind)
    assert bundle.model["kind"] == kind
    windows = setup[1][:37]
    scaled = bundle.scaler.transform(windows)
    recon = keras.models.load_model(tmp_path / kind / "model.keras").predict(scaled, verbose=0)
    expected, _ = reconstruction_errors(scaled, recon, bundle.error_metric)
    got = Scorer(ModelBundle.load(tmp_path / kind)).score(windows)
    assert np.allclose(got.errors, expected, rtol=1e-4)


def test_non_finite_error_is_maximally_anomalous(setup: tuple[Path, np.ndarray], scorer: Scorer) -> None:
    from sensord.scorer import MAX_ERROR
    w = setup[1][:3].copy()
    w[1, 2, 0] = np.inf
    w[2, :, :] = np.finfo(np.float32).max  # overflows to inf in float32 scaling
    got = scorer.score(w)
    assert np.all(np.isfinite(got.errors)) and np.all(np.isfinite(got.channel_shares))
    assert got.errors[1] == got.errors[2] == MAX_ERROR
    assert got.errors[0] < scorer.threshold * 10
    np.testing.assert_allclose(got.channel_shares.sum(axis=1), 1.0)
