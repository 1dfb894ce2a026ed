"""Tests for sensord.state: the detector state file (atomic save, restore, set aside, failures)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sensord.detector import AlertDetector
from sensord.state import STATE_FILE, StateStore


def _raised(device: str) -> AlertDetector:
    det = AlertDetector(device, 1.0, raise_after=1, clear_after=3)
    det.update(5.0, 0.0, 9.0)
    return det


def test_save_then_load_for_the_same_model(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")  # created on first save
    dets = {"p1": _raised("p1"), "p2": AlertDetector("p2", 1.0)}
    assert store.save("m1", dets)
    loaded = StateStore(tmp_path / "state").load("m1")
    assert loaded == {"p1": dets["p1"].export(), "p2": dets["p2"].export()}
    assert loaded["p1"]["active"] is True and loaded["p1"]["alert_id"] == dets["p1"].alert_id
    assert [p.name for p in (tmp_path / "state").iterdir()] == [STATE_FILE]  # no temporary file left


def test_no_file_is_a_fresh_start(tmp_path: Path) -> None:
    assert StateStore(tmp_path).load("m1") == {}


def test_state_of_another_model_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    StateStore(tmp_path).save("m1", {"p1": _raised("p1")})
    with caplog.at_level(logging.WARNING, logger="sensord.state"):
        assert StateStore(tmp_path).load("m2") == {}
    assert "saved for model 'm1', not 'm2'" in caplog.text
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(STATE_FILE + ".other-model-")]
    assert json.loads(aside.read_text())["model_id"] == "m1"
    assert not (tmp_path / STATE_FILE).exists()


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe", b"[]", b'{"format": "x"}', b"[" * 100_000,
                                     b'{"format": "sensord-detector-state", "version": 1, "model_id": "m1",'
                                     b' "devices": {"p1": 3}}'])
def test_corrupt_file_is_set_aside_not_raised(tmp_path: Path, content: bytes,
                                              caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / STATE_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="sensord.state"):
        assert StateStore(tmp_path).load("m1") == {}
    assert "cannot be used" in caplog.text
    assert [p for p in tmp_path.iterdir() if p.name.startswith(STATE_FILE + ".corrupt-")]
    assert StateStore(tmp_path).save("m1", {})  # and the directory is usable again


def test_failed_save_is_reported_once_and_recovers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    failures: list[OSError] = []
    store = StateStore(blocker / "state", failures.append)
    with caplog.at_level(logging.INFO, logger="sensord.state"):
        assert store.save("m1", {"p1": _raised("p1")}) is False
        assert store.save("m1", {"p1": _raised("p1")}) is False
        assert len(failures) == 2
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
        blocker.unlink()
        assert store.save("m1", {"p1": _raised("p1")}) is True
    assert "saved to" in caplog.records[-1].getMessage()
    assert StateStore(blocker / "state").load("m1")["p1"]["active"] is True


def test_a_crash_mid_write_leaves_the_old_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path)
    store.save("m1", {"p1": _raised("p1")})
    before = (tmp_path / STATE_FILE).read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("sensord.state.os.replace", crash)
    assert store.save("m1", {"p1": AlertDetector("p1", 1.0)}) is False
    assert (tmp_path / STATE_FILE).read_bytes() == before


def test_window_buffers_are_taken_once_and_only_for_their_model(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.save_windows("m1", {"p1": {"times": [1.0]}})
    assert StateStore(tmp_path).take_windows("m1") == {"p1": {"times": [1.0]}}
    assert StateStore(tmp_path).take_windows("m1") == {}  # removed: a later crash never continues from it
    store.save_windows("m1", {"p1": {"times": [1.0]}})
    assert StateStore(tmp_path).take_windows("m2") == {}
    assert not (tmp_path / "window-buffers.json").exists()
    (tmp_path / "window-buffers.json").write_bytes(b"\x00garbage")
    assert StateStore(tmp_path).take_windows("m1") == {}
