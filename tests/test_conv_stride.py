"""A conv1d autoencoder that compresses time (``model.conv_stride``) is served like any other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sensord.bundle import ModelBundle
from sensord.config import config_from_dict
from sensord.dataio import Series
from sensord.scorer import Scorer
from sensord.simulator import CHANNELS, PumpSimulator
from sensord.training import split_windows, train_bundle

pytestmark = pytest.mark.training  # trains a tiny TensorFlow model (make test-fast leaves it out)

W = 10  # not a multiple of 4: two stride-2 layers give 3 steps, upsampled to 12 and cropped back to 10


def _cfg(stride: int) -> object:
    return config_from_dict({"window": {"length": W},
                             "model": {"kind": "conv1d", "conv_filters": [8, 4], "latent_units": 2,
                                       "kernel_size": 3, "conv_stride": stride},
                             "training": {"epochs": 3, "batch_size": 32, "patience": 3, "seed": 3}})


def test_strided_conv1d_compresses_time_and_its_tflite_scores_match_keras(tmp_path: Path) -> None:
    from sensord.tflib import import_tensorflow
    keras, _ = import_tensorflow()
    sim = PumpSimulator(seed=11).generate(300)
    series = Series(sim.timestamps, sim.values.astype(np.float32), CHANNELS, None, "sim")
    bundle = train_bundle(series, _cfg(2), tmp_path / "m")

    model = keras.models.load_model(bundle.keras_path, compile=False)
    assert model.get_layer("latent").output.shape[1] == 3  # 10 -> 5 -> 3: a bottleneck in time
    assert model.output_shape == (None, W, len(CHANNELS))

    windows = split_windows(series, _cfg(2)).validation
    scaled = bundle.scaler.transform(windows)
    rec = np.asarray(model(scaled, training=False), dtype=np.float64)
    expected = ((rec - scaled) ** 2).mean(axis=(1, 2))
    got = Scorer(bundle).score(windows).errors
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    # The bundle reloads: its reference windows are scored again and must agree.
    assert ModelBundle.load(tmp_path / "m").threshold.value == bundle.threshold.value


def test_stride_one_keeps_the_plain_graph() -> None:
    from sensord.autoencoder import build_autoencoder
    cfg = _cfg(1)
    model = build_autoencoder(cfg.model, W, len(CHANNELS), "standard")
    kinds = {type(layer).__name__ for layer in model.layers}
    assert "UpSampling1D" not in kinds and "Cropping1D" not in kinds
    assert model.get_layer("latent").output.shape[1] == W
