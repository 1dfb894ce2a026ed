"""Seed ensembles in one TFLite graph, the PCA baseline, and seeded reproducibility."""

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

W = 8


@pytest.fixture(scope="module")
def series() -> Series:
    sim = PumpSimulator(seed=11).generate(360)
    return Series(sim.timestamps, sim.values.astype(np.float32), CHANNELS, None, "sim")


def _cfg(**training: object) -> object:
    model = training.pop("model", {"kind": "dense", "encoder_units": [16], "latent_units": 4})
    return config_from_dict({"window": {"length": W}, "model": model,
                             "training": {"epochs": 4, "batch_size": 32, "patience": 4, **training}})


@pytest.fixture(scope="module")
def ensemble(series: Series, tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return train_bundle(series, _cfg(ensemble=3, seed=5), tmp_path_factory.mktemp("ens") / "m")


def test_ensemble_tflite_scores_are_the_mean_of_its_keras_members(series: Series, ensemble: ModelBundle) -> None:
    from sensord.tflib import import_tensorflow
    keras, _ = import_tensorflow()
    model = keras.models.load_model(ensemble.keras_path, compile=False)
    members = [layer for layer in model.layers if layer.name.startswith("member") and hasattr(layer, "layers")]
    assert len(members) == 3

    windows = split_windows(series, _cfg()).validation
    scaled = ensemble.scaler.transform(windows)
    per_member = []
    for m in members:
        rec = np.asarray(m(scaled, training=False), dtype=np.float64)
        per_member.append(((rec - scaled) ** 2).mean(axis=(1, 2)))
    expected = np.mean(per_member, axis=0)
    scorer = Scorer(ensemble)
    assert scorer.members == 3
    got = scorer.score(windows).errors
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    # The members really differ (else an "ensemble" would be one model three times).
    assert np.min(np.abs(per_member[0] - per_member[1])) > 0
    assert ensemble.training["members"] == 3


def test_ensemble_channel_shares_and_one_interpreter_call_per_batch(series: Series, ensemble: ModelBundle) -> None:
    scorer = Scorer(ensemble, max_batch=64)
    windows = split_windows(series, _cfg()).validation[:40]
    batch = scorer.score(windows)
    np.testing.assert_allclose(batch.channel_shares.sum(axis=1), 1.0, rtol=1e-6)
    assert scorer.reconstruct(ensemble.scaler.transform(windows)).shape == (40, 3, W, len(CHANNELS))
    assert set(scorer._interpreters) == {1, 64}  # the whole batch went through one padded call


def test_seeded_training_reproduces_and_the_seed_matters(series: Series, tmp_path: Path) -> None:
    a = train_bundle(series, _cfg(ensemble=2, seed=3), tmp_path / "a")
    b = train_bundle(series, _cfg(ensemble=2, seed=3), tmp_path / "b")
    c = train_bundle(series, _cfg(ensemble=2, seed=4), tmp_path / "c")
    assert a.threshold.value == b.threshold.value
    assert a.training["loss_history"] == b.training["loss_history"]
    val = split_windows(series, _cfg()).validation
    # The flatbuffer embeds names that differ per build; what it computes does not.
    np.testing.assert_array_equal(Scorer(a).score(val).errors, Scorer(b).score(val).errors)
    assert c.threshold.value != a.threshold.value


def test_pca_bundle_reconstructs_as_the_projection_onto_its_components(series: Series, tmp_path: Path) -> None:
    cfg = _cfg(model={"kind": "pca", "pca_variance": 0.9})
    bundle = train_bundle(series, cfg, tmp_path / "pca")
    split = split_windows(series, cfg, bundle.drift)
    flat = bundle.scaler.transform(split.train).reshape(len(split.train), -1).astype(np.float64)
    mean = flat.mean(axis=0)
    _, s, vt = np.linalg.svd(flat - mean, full_matrices=False)
    k = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), 0.9) + 1)
    val = bundle.scaler.transform(split.validation).reshape(len(split.validation), -1).astype(np.float64)
    proj = (val - mean) @ vt[:k].T @ vt[:k] + mean
    expected = ((proj - val) ** 2).mean(axis=1)
    np.testing.assert_allclose(Scorer(bundle).score(split.validation).errors, expected, rtol=1e-3, atol=1e-6)
    assert bundle.model["kind"] == "pca" and bundle.training["epochs_run"] == 1


def test_pca_keeps_more_components_for_more_variance(series: Series, tmp_path: Path) -> None:
    low = train_bundle(series, _cfg(model={"kind": "pca", "pca_variance": 0.5}), tmp_path / "lo")
    high = train_bundle(series, _cfg(model={"kind": "pca", "pca_variance": 0.99}), tmp_path / "hi")
    val = split_windows(series, _cfg()).validation
    # More components reconstruct healthy data better.
    assert Scorer(high).score(val).errors.mean() < Scorer(low).score(val).errors.mean()
