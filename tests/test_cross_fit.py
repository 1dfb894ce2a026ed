"""Cross-fitted healthy evidence (``training.cross_fit``): blocks, out-of-fold errors, the served ensemble."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sensord.bundle import ModelBundle
from sensord.config import ConfigError, config_from_dict
from sensord.dataio import Series
from sensord.scorer import Scorer
from sensord.simulator import CHANNELS, PumpSimulator
from sensord.training import TrainingError, cross_fit_folds, split_windows, train, train_bundle

W = 8
ROWS = 360


@pytest.fixture(scope="module")
def series() -> Series:
    sim = PumpSimulator(seed=11).generate(ROWS)
    return Series(sim.timestamps, sim.values.astype(np.float32), CHANNELS, None, "sim")


def _cfg(**training: object) -> object:
    return config_from_dict({"window": {"length": W},
                             "model": {"kind": "dense", "encoder_units": [16], "latent_units": 4},
                             "training": {"epochs": 4, "batch_size": 32, "patience": 4, **training}})


def _indexed(n: int, offset: float = 0.0) -> Series:
    """A series whose first channel is its row number (+ offset): a window says which rows it holds."""
    values = np.zeros((n, len(CHANNELS)), np.float32)
    values[:, 0] = np.arange(n) + offset
    return Series(np.arange(n, dtype=np.float64), values, CHANNELS, None, f"idx{offset:g}")


def _rows(windows: np.ndarray, offset: float = 0.0) -> list[set[int]]:
    return [{int(v - offset) for v in w[:, 0]} for w in windows]


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_blocks_partition_the_rows_and_no_member_sees_its_held_out_rows(k: int) -> None:
    n = 203  # not a multiple of k: the blocks differ by at most one row
    folds = cross_fit_folds(_indexed(n), _cfg(cross_fit=k))
    assert len(folds) == k
    blocks = [f.held_out_ranges[0] for f in folds]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))  # contiguous, in order
    assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1
    covered: set[int] = set()
    for fold, (a, b) in zip(folds, blocks, strict=True):
        block = set(range(a, b))
        held = _rows(fold.held_out)
        # Every window of the block (hop 1), each wholly inside it: none straddles a block boundary.
        assert len(held) == (b - a) - W + 1 and all(r <= block for r in held)
        for part in (fold.train, fold.stop):
            assert len(part) > 0
            for r in _rows(part):
                assert not r & block  # the member never trains or early-stops on a held-out row
                assert max(r) - min(r) == W - 1  # and no window jumps over the held-out block
        trained = set().union(*_rows(fold.train))
        stopped = set().union(*_rows(fold.stop))
        assert not trained & stopped
        # The early-stopping rows are the chronological tail of the member's own rows.
        assert min(stopped) > max(trained)
        covered |= block
    assert covered == set(range(n))


def test_without_early_stopping_a_member_trains_on_every_row_but_its_block() -> None:
    n = 200
    for m, fold in enumerate(cross_fit_folds(_indexed(n), _cfg(cross_fit=4, cross_fit_early_stop=False))):
        block = set(range(50 * m, 50 * (m + 1)))
        assert len(fold.stop) == 0
        trained = set().union(*_rows(fold.train))
        assert trained == set(range(n)) - block


def test_every_machine_of_a_group_is_cut_into_blocks_of_its_own() -> None:
    a, b = _indexed(120), _indexed(90, offset=10_000.0)
    folds = cross_fit_folds([a, b], _cfg(cross_fit=3))
    for m, fold in enumerate(folds):
        (a0, a1), (b0, b1) = fold.held_out_ranges
        assert (a0, a1) == (40 * m, 40 * (m + 1)) and (b0, b1) == (30 * m, 30 * (m + 1))
        for w in fold.held_out:
            rows = {int(v) for v in w[:, 0]}
            assert rows <= set(range(a0, a1)) or {r - 10_000 for r in rows} <= set(range(b0, b1))
        for w in np.concatenate([fold.train, fold.stop]):
            rows = {int(v) for v in w[:, 0]}
            assert not rows & set(range(a0, a1)) and not {r - 10_000 for r in rows} & set(range(b0, b1))
            assert max(rows) < 10_000 or min(rows) >= 10_000  # no window spans two machines


@pytest.mark.parametrize("value, message", [
    (-1, "training.cross_fit: must be an integer >= 0, got -1"),
    ("x", 'training.cross_fit: must be an integer, got "x"'),
    (17, "training.cross_fit: must be an integer <= 16, got 17"),
])
def test_bad_cross_fit_values_are_refused_with_the_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _cfg(cross_fit=value)
    assert message in str(exc.value)


def test_cross_fit_is_refused_with_an_ensemble_or_pca() -> None:
    with pytest.raises(ConfigError, match=r"training\.cross_fit: 3 already serves 3 members.*ensemble 2"):
        _cfg(cross_fit=3, ensemble=2)
    with pytest.raises(ConfigError, match=r"training\.cross_fit: model\.kind pca"):
        config_from_dict({"model": {"kind": "pca"}, "training": {"cross_fit": 2}})


def test_too_many_blocks_for_the_data_is_refused_naming_the_key(series: Series) -> None:
    with pytest.raises(TrainingError, match=r"sim: training\.cross_fit 16: 100 rows make blocks of 6 rows, "
                                            r"shorter than window\.length 8: use at most 12 blocks"):
        cross_fit_folds(series.slice(0, 100), _cfg(cross_fit=16))
    # Blocks long enough, but a member's early-stopping tail is shorter than a window.
    with pytest.raises(TrainingError, match=r"training\.cross_fit 4: member 0 has no complete window in its "
                                            r"early-stopping rows"):
        cross_fit_folds(series.slice(0, 40), _cfg(cross_fit=4, validation_fraction=0.1))


@pytest.fixture(scope="module")
def crossfit(series: Series, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelBundle, np.ndarray]:
    trained = train(series, _cfg(cross_fit=3, seed=5), tmp_path_factory.mktemp("cf") / "m")
    return trained.bundle, trained.threshold_errors


def _member_errors(bundle: ModelBundle, windows: np.ndarray) -> list[np.ndarray]:
    from sensord.tflib import import_tensorflow
    keras, _ = import_tensorflow()
    model = keras.models.load_model(bundle.keras_path, compile=False)
    scaled = bundle.scaler.transform(windows)
    out = []
    for k in range(bundle.training["members"]):
        rec = np.asarray(model.get_layer(f"member{k}")(scaled, training=False), dtype=np.float64)
        out.append(((rec - scaled) ** 2).mean(axis=(1, 2)))
    return out


@pytest.mark.training
def test_served_score_is_the_mean_of_the_members_and_the_threshold_rests_on_out_of_fold_errors(
        series: Series, crossfit: tuple[ModelBundle, np.ndarray]) -> None:
    bundle, evidence = crossfit
    folds = cross_fit_folds(series, _cfg(cross_fit=3), bundle.drift)
    windows = np.concatenate([f.held_out for f in folds])
    per_member = _member_errors(bundle, windows)
    scorer = Scorer(bundle)
    assert scorer.members == 3 and bundle.training["members"] == 3
    np.testing.assert_allclose(scorer.score(windows).errors, np.mean(per_member, axis=0), rtol=1e-4, atol=1e-7)

    # Out-of-fold: block k's windows scored by member k alone, for every healthy window.
    sizes = np.cumsum([0] + [len(f.held_out) for f in folds])
    expected = np.concatenate([per_member[k][sizes[k]:sizes[k + 1]] for k in range(3)])
    assert len(evidence) == len(windows) == bundle.training["validation_windows"]
    np.testing.assert_allclose(evidence, expected, rtol=1e-4, atol=1e-7)
    assert bundle.threshold.method == "max_factor"
    assert bundle.threshold.value == pytest.approx(3.0 * evidence.max())
    assert bundle.threshold.validation_stats["count"] == len(windows)
    # A member scores the windows it was trained on lower than the ones it never saw: the members differ.
    assert not np.allclose(per_member[0], per_member[1])
    assert bundle.training["threshold_evidence"] == "out_of_fold"
    assert [m["held_out_rows"] for m in bundle.training["cross_fit"]["members"]] == [[[0, 120]], [[120, 240]],
                                                                                   [[240, 360]]]


@pytest.mark.training
def test_reference_windows_hold_the_served_ensemble_errors(crossfit: tuple[ModelBundle, np.ndarray]) -> None:
    bundle, evidence = crossfit
    loaded = ModelBundle.load(bundle.path)
    scorer = Scorer(loaded)
    assert scorer.self_check() is True  # the daemon's 1e-4 check at load
    ref = loaded.reference
    assert ref is not None
    np.testing.assert_allclose(scorer.score(np.asarray(ref["windows"], np.float32)).errors, ref["errors"],
                               rtol=1e-6)
    # ... which are the mean over members, not the out-of-fold errors the threshold saw.
    assert not np.allclose(ref["errors"], evidence[np.linspace(0, len(evidence) - 1, 4).astype(int)])


@pytest.mark.training
def test_cross_fit_0_and_1_train_todays_bundle(series: Series, tmp_path: Path) -> None:
    bundles = [train_bundle(series, _cfg(seed=3, **extra), tmp_path / str(i))
               for i, extra in enumerate(({}, {"cross_fit": 0}, {"cross_fit": 1}))]
    split = split_windows(series, _cfg(), bundles[0].drift)
    for b in bundles:
        assert b.threshold == bundles[0].threshold
        assert b.training["loss_history"] == bundles[0].training["loss_history"]
        assert b.reference == bundles[0].reference
        assert b.training["members"] == 1 and "cross_fit" not in b.training
        assert b.training["validation_windows"] == len(split.validation)
        np.testing.assert_array_equal(Scorer(b).score(split.validation).errors,
                                      Scorer(bundles[0]).score(split.validation).errors)
    # Today's threshold: the served errors of the chronological validation part.
    val = Scorer(bundles[0]).score(split.validation).errors
    assert bundles[0].threshold.value == pytest.approx(3.0 * val.max())


@pytest.mark.training
def test_refit_serves_one_network_on_every_healthy_window_with_the_out_of_fold_threshold(
        series: Series, crossfit: tuple[ModelBundle, np.ndarray], tmp_path: Path) -> None:
    """``cross_fit_serve: refit``: the same members (same seed) give the same out-of-fold evidence, but what is
    served is one network trained on all the rows, and the threshold is fitted on the members' evidence."""
    ensemble_bundle, ensemble_evidence = crossfit
    trained = train(series, _cfg(cross_fit=3, seed=5, cross_fit_serve="refit"), tmp_path / "refit")
    bundle = trained.bundle
    scorer = Scorer(ModelBundle.load(bundle.path))
    assert scorer.members == 1 and bundle.training["members"] == 1
    assert bundle.training["cross_fit"]["served"] == "refit"
    np.testing.assert_allclose(trained.threshold_errors, ensemble_evidence, rtol=1e-4, atol=1e-7)
    assert bundle.threshold.value == pytest.approx(3.0 * trained.threshold_errors.max())
    assert scorer.self_check() is True
    # The served network is not the ensemble: it saw every window, so it scores them its own way.
    windows = np.concatenate([f.held_out for f in cross_fit_folds(series, _cfg(cross_fit=3))])
    assert not np.allclose(scorer.score(windows).errors, Scorer(ensemble_bundle).score(windows).errors, rtol=1e-2)


def test_cross_fit_serve_must_be_known() -> None:
    with pytest.raises(ConfigError, match=r"training\.cross_fit_serve"):
        _cfg(cross_fit=3, cross_fit_serve="both")
