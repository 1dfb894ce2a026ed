"""Tests for sensord.plots: the three diagnostic PNGs of a tiny bundle, and window_counts."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sensord.evaluation import window_counts
from sensord.plots import HISTOGRAM_PNG, LATENT_PNG, RECONSTRUCTION_PNG, make_plots, pca_2d

pytestmark = pytest.mark.training  # trains a tiny TensorFlow model (make test-fast leaves it out)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(bundle dir, labelled CSV, tmp root): a tiny dense bundle with a 2-D latent."""
    from sensord.config import ModelConfig, SensordConfig, TrainingConfig, WindowConfig
    from sensord.dataio import load_csv
    from sensord.simulator import simulate
    from sensord.training import train_bundle

    root = tmp_path_factory.mktemp("plots")
    healthy, labelled = simulate(root / "sim", seconds=900)
    cfg = SensordConfig(window=WindowConfig(length=10),
                        model=ModelConfig(kind="dense", encoder_units=[16], latent_units=2),
                        training=TrainingConfig(epochs=5))
    train_bundle(load_csv(healthy), cfg, root / "model")
    return root / "model", labelled, root


@pytest.fixture(scope="module")
def written(trained: tuple[Path, Path, Path]) -> list[Path]:
    bundle, labelled, root = trained
    return make_plots(bundle, labelled, root / "plots")


def test_make_plots_writes_three_valid_pngs(written: list[Path], trained: tuple[Path, Path, Path]) -> None:
    import matplotlib.image as mpimg

    out = trained[2] / "plots"
    assert written == [out / RECONSTRUCTION_PNG, out / HISTOGRAM_PNG, out / LATENT_PNG]
    for path in written:
        assert path.is_file(), path
        with path.open("rb") as f:
            assert f.read(8) == PNG_SIGNATURE, path
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[2] in (3, 4), (path, img.shape)
        h, w = img.shape[:2]
        assert 300 <= h <= 4000 and 300 <= w <= 4000, (path, img.shape)
        assert float(img[..., :3].std()) > 0.01, f"{path} looks blank"
    # 8 channels stacked in two columns: the reconstruction figure is taller than wide.
    h, w = mpimg.imread(out / RECONSTRUCTION_PNG).shape[:2]
    assert h > w


def _relabelled(labelled: Path, out: Path, label: str, rows_kept: int) -> Path:
    """A copy of the labelled CSV with every row's label set to ``label``, cut to ``rows_kept`` rows."""
    with labelled.open(newline="") as f:
        rows = list(csv.reader(f))
    col = rows[0].index("anomaly")
    for r in rows[1:]:
        r[col] = label
    with out.open("w", newline="") as f:
        csv.writer(f).writerows(rows[:rows_kept])
    return out


def test_make_plots_requires_anomalies(trained: tuple[Path, Path, Path]) -> None:
    bundle, labelled, root = trained
    quiet = _relabelled(labelled, root / "no_anomalies.csv", "0", 400)
    with pytest.raises(ValueError, match="no anomalous windows") as exc:
        make_plots(bundle, quiet, root / "never")
    assert str(quiet) in str(exc.value)
    assert not (root / "never").exists()


def test_make_plots_requires_normal_windows(trained: tuple[Path, Path, Path]) -> None:
    bundle, labelled, root = trained
    loud = _relabelled(labelled, root / "all_anomalies.csv", "1", 100)
    with pytest.raises(ValueError, match="no normal windows") as exc:
        make_plots(bundle, loud, root / "never")
    assert str(loud) in str(exc.value)


def test_make_plots_requires_label_column(trained: tuple[Path, Path, Path]) -> None:
    bundle, _, root = trained
    healthy = root / "sim" / "healthy.csv"
    with pytest.raises(ValueError, match="label column") as exc:
        make_plots(bundle, healthy, root / "never")
    assert str(healthy) in str(exc.value)


def test_make_plots_windows_come_from_the_shared_factory(trained: tuple[Path, Path, Path]) -> None:
    """The config's window.length is checked against the bundle, and no window spans a gap the daemon
    would restart at (plots used to cut windows straight across gaps)."""
    from sensord.bundle import BundleError
    from sensord.config import SensordConfig, WindowConfig

    bundle, labelled, root = trained
    with pytest.raises(BundleError, match="window.length in the config is 12"):
        make_plots(bundle, labelled, root / "never", config=SensordConfig(window=WindowConfig(length=12)))
    with labelled.open(newline="") as f:
        rows = list(csv.reader(f))
    sparse = root / "sparse.csv"  # one row every 20 s: each is a gap longer than max_gap_seconds (10 s)
    with sparse.open("w", newline="") as f:
        csv.writer(f).writerows([rows[0], *rows[1::20]])
    with pytest.raises(ValueError, match=r"no complete window .*max_gap_seconds=10"):
        make_plots(bundle, sparse, root / "never")
    assert not (root / "never").exists()


def test_window_counts_known_numbers() -> None:
    errors = np.array([0.1, 0.2, 0.5, 0.9, 0.3, 0.05, 2.0, 0.3])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # threshold 0.3: over means error > 0.3, so 0.3 itself is under (the detector's rule)
    assert window_counts(errors, labels, 0.3) == {
        "normal_under": 2, "normal_over": 2, "anomalous_over": 1, "anomalous_under": 3,
    }
    assert window_counts(errors, labels.astype(bool), 10.0) == {
        "normal_under": 4, "normal_over": 0, "anomalous_over": 0, "anomalous_under": 4,
    }
    assert window_counts(np.zeros(0), np.zeros(0), 1.0) == {
        "normal_under": 0, "normal_over": 0, "anomalous_over": 0, "anomalous_under": 0,
    }
    counts = window_counts(np.random.default_rng(0).random(100), np.arange(100) % 3 == 0, 0.5)
    assert sum(counts.values()) == 100
    assert all(isinstance(v, int) for v in counts.values())
    with pytest.raises(ValueError, match="same length"):
        window_counts(np.zeros(3), np.zeros(2), 1.0)


def test_pca_2d() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(200, 2)) * [5.0, 1.0]
    x = np.column_stack([base, base[:, 0] + base[:, 1], np.zeros(200)])
    proj, frac = pca_2d(x)
    assert proj.shape == (200, 2)
    assert frac.sum() == pytest.approx(1.0)  # rank 2: two components explain everything
    assert frac[0] > frac[1]
    np.testing.assert_allclose(proj.mean(axis=0), 0.0, atol=1e-9)
    one, frac1 = pca_2d(rng.normal(size=(50, 1)))  # 1-D latent: second axis is zero
    assert one.shape == (50, 2) and np.all(one[:, 1] == 0) and frac1[0] == pytest.approx(1.0)


def test_import_is_cheap() -> None:
    code = ("import sys, sensord.plots; "
            "heavy = [m for m in ('matplotlib', 'keras', 'tensorflow') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
