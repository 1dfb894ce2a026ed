"""``sensord``'s exit statuses, in-process: the project's own errors map to sysexits, anything else is a bug (70)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from sensord import cli
from sensord.bundle import BundleError
from sensord.config import ConfigError
from sensord.errors import DataError, SensordError, UnavailableError, UsageError


@pytest.fixture(autouse=True)
def _root_logger() -> Iterator[None]:
    """``cli.main`` configures the root logger for a command-line process; give the test process its own back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _failing(exc: BaseException):  # type: ignore[no-untyped-def]
    def command(args: argparse.Namespace) -> int:
        raise exc
    return command


def test_version_has_one_source(capsys: pytest.CaptureFixture[str]) -> None:
    """``sensord --version`` prints the package's ``__version__``, which pyproject.toml also reads."""
    import tomllib

    import sensord

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"sensord {sensord.__version__}"
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sensord.__version__"}


def test_data_error_exits_65_with_its_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.csv"
    assert cli.main(["train", "--data", str(missing), "--out", str(tmp_path / "m")]) == 65
    err = capsys.readouterr().err
    assert f"sensord: data error: {missing}: file not found" in err
    assert "Traceback" not in err


def test_usage_error_exits_64(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["simulate", "--out", str(tmp_path), "--faults", "leak"]) == 64
    err = capsys.readouterr().err
    assert "sensord: usage error: unknown fault kind(s) 'leak'" in err and "Traceback" not in err


@pytest.mark.parametrize(("exc", "status", "line"), [
    (DataError("d.csv:3: column 'x': not a number"), 65, "sensord: data error: d.csv:3: column 'x': not a number"),
    (UsageError("--jobs: must be at least 1"), 64, "sensord: usage error: --jobs: must be at least 1"),
    (BundleError("m: checksum mismatch"), 78, "sensord: model error: m: checksum mismatch"),
    (ConfigError(["window.length: must be an integer"], "c.yaml"), 78,
     "sensord: config error: c.yaml: window.length: must be an integer"),
    (UnavailableError("metrics endpoint 127.0.0.1:9108: cannot listen"), 69,
     "sensord: unavailable: metrics endpoint 127.0.0.1:9108: cannot listen"),
])
def test_project_errors_map_to_their_exit_status(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                 exc: SensordError, status: int, line: str) -> None:
    monkeypatch.setattr(cli, "cmd_simulate", _failing(exc))
    assert cli.main(["simulate", "--out", "unused"]) == status
    err = capsys.readouterr().err
    assert err.splitlines() == [line]


@pytest.mark.parametrize("exc", [TypeError("unsupported operand"), ValueError("not bad input: a bug"),
                                 KeyError("channel")])
def test_programming_error_exits_70_with_its_traceback(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str],
                                                       exc: Exception) -> None:
    """A plain ValueError is no longer taken for bad data: only the project's own types are."""
    monkeypatch.setattr(cli, "cmd_simulate", _failing(exc))
    assert cli.main(["simulate", "--out", "unused"]) == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert f"{type(exc).__name__}: " in err and "in command" in err  # the frame that raised
    assert "data error" not in err
    assert err.rstrip().splitlines()[-1].startswith(f"sensord: internal error ({type(exc).__name__})")
