"""The command line: exit statuses (in-process: the project's own errors map to sysexits, anything else is a
bug, 70), help on every option, ``python -m sensord``, and a serving-only install.

An edge box that only serves installs ``sensord`` without the ``train`` extra (no TensorFlow, no
matplotlib). There, ``train``, ``plot``, ``bench`` and ``demo`` must say what to install, with exit status
69, instead of a traceback. Those tests run the real command line in a fresh interpreter where those
packages cannot be imported (the import fails exactly as it does when they are absent).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import textwrap
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


ROOT = Path(__file__).resolve().parent.parent


# -- help, python -m sensord, the train extra ---------------------------------------------------------

def _parsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _parsers(sub)
    return out


def test_every_command_and_option_has_help() -> None:
    missing = []
    for prog, parser in _parsers(cli.build_parser()):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):  # each command's one-line help
                missing += [f"{prog} {c.dest}" for c in a._choices_actions if not (c.help or "").strip()]
            elif not isinstance(a, argparse._HelpAction) and not (a.help or "").strip():
                missing.append(f"{prog} {'/'.join(a.option_strings) or a.dest}")
    assert missing == []
    commands = {prog.split()[-1] for prog, _ in _parsers(cli.build_parser())}
    assert {"run", "check-config", "train", "evaluate", "plot", "simulate", "demo", "skab"} <= commands


def test_python_m_sensord_is_the_command_line() -> None:
    res = subprocess.run([sys.executable, "-m", "sensord", "--help"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "check-config" in res.stdout and "train" in res.stdout
    res = subprocess.run([sys.executable, "-m", "sensord", "train", "--help"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert res.returncode == 0 and "CSV of healthy readings" in res.stdout


TRAIN_EXTRA = ("tensorflow", "tf_keras", "keras", "matplotlib", "tensorboard")


@pytest.fixture(scope="module")
def serving_only_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site-packages like this environment's, without the train extra's packages: everything else linked
    in, TensorFlow, Keras and matplotlib (and their dist-info) simply absent, as on a serving-only box."""
    import sysconfig
    real = Path(sysconfig.get_paths()["purelib"])
    site = tmp_path_factory.mktemp("serving-only-site")
    for entry in real.iterdir():
        if not entry.name.lower().startswith(TRAIN_EXTRA):
            (site / entry.name).symlink_to(entry)
    return site


def _serving_only(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m sensord ARGS`` with ``site`` as the only site-packages (-S: not the real one)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    return subprocess.run([sys.executable, "-S", "-m", "sensord", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)


def test_the_serving_only_site_lacks_the_train_extra(serving_only_site: Path) -> None:
    res = subprocess.run([sys.executable, "-S", "-c", "import numpy, paho, ai_edge_litert; import tensorflow"],
                         capture_output=True, text=True, env={"PYTHONPATH": str(serving_only_site)}, timeout=60)
    assert res.returncode == 1 and "No module named 'tensorflow'" in res.stderr, res.stderr


@pytest.mark.parametrize("command", ["train", "plot", "bench", "demo"])
def test_training_commands_without_the_train_extra_say_what_to_install(serving_only_site: Path, tmp_path: Path,
                                                                       command: str) -> None:
    """Said before any data is read: a large CSV is not loaded only to fail at the first TensorFlow import."""
    from sensord.simulator import simulate
    healthy, labelled = simulate(tmp_path / "sim", seconds=120)
    args = {"train": ["train", "--data", str(healthy), "--out", str(tmp_path / "model")],
            "plot": ["plot", "--model", str(tmp_path / "no-model-needed"), "--data", str(labelled), "--out",
                     str(tmp_path / "plots")],
            "bench": ["bench", "skab", "--data", str(tmp_path / "sim")],
            "demo": ["demo", "--workdir", str(tmp_path / "demo")]}[command]
    res = _serving_only(serving_only_site, *args)
    missing = "matplotlib" if command == "plot" else "tensorflow"  # the first one each command needs
    assert res.returncode == 69, res.stderr
    assert res.stderr.splitlines()[-1] == \
        f"sensord: unavailable: needs the train extra: pip install 'sensord[train]' ({missing} is not installed)"
    assert "Traceback" not in res.stderr


def test_serving_commands_work_without_the_train_extra(serving_only_site: Path) -> None:
    res = _serving_only(serving_only_site, "check-config", "--config", str(ROOT / "config" / "sensord.yaml"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("OK ")


def test_the_litert_banner_filter_keeps_everything_else_written_to_fd_2() -> None:
    """LiteRT writes its delegate banner with C++ straight to file descriptor 2, so the filter works on fd 2: in a
    fresh process, lines written there (as a C library writes them) and Python's own stderr during the block all
    come out, in order, except the banner line; afterwards fd 2 is the real stderr again."""
    code = textwrap.dedent("""
        import os, sys
        from sensord.scorer import LITERT_BANNER, stderr_without
        print("before", file=sys.stderr, flush=True)
        with stderr_without(LITERT_BANNER):
            os.write(2, b"ERROR: a real native error\\n" + LITERT_BANNER + b"\\n")
            print("a python line inside", file=sys.stderr)
            os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU. (not the exact line)\\n")
        os.write(2, b"after\\n")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == [
        "before", "ERROR: a real native error", "a python line inside",
        "INFO: Created TensorFlow Lite XNNPACK delegate for CPU. (not the exact line)", "after"]


def test_check_config_names_every_problem_in_one_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Several bad keys in several sections, and a file named by a section that is itself valid: all reported
    in one run (the file check does not wait for the rest of the document to be fixed), exit 78."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"window:\n  length: 1\nmqtt:\n  prot: 1883\n  qos: 7\ndaemon:\n  queue_size: -3\n"
                   f"detector:\n  raise_after: x\nmetrics:\n  web_config_file: {tmp_path / 'web.yml'}\n")
    assert cli.main(["check-config", "--config", str(cfg)]) == 78
    out = capsys.readouterr()
    assert out.out == ""
    assert sorted(out.err.splitlines()) == sorted(f"sensord: config error: {cfg}: {e}" for e in [
        "window.length: must be an integer >= 2, got 1",
        'mqtt.prot: unknown key (did you mean "port"?)',
        "mqtt.qos: must be an integer <= 2, got 7",
        "daemon.queue_size: must be an integer >= 1, got -3",
        'detector.raise_after: must be an integer, got "x"',
        f"metrics.web_config_file {tmp_path / 'web.yml'}: file not found"])


def test_check_config_says_when_the_model_cannot_be_checked_yet(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("window:\n  length: 1\n")
    assert cli.main(["check-config", "--config", str(cfg), "--model", str(tmp_path / "model")]) == 78
    assert capsys.readouterr().err.splitlines() == [
        f"sensord: config error: {cfg}: window.length: must be an integer >= 2, got 1",
        "sensord: model not checked: the config's data, window, scoring, detector sections must be valid first"]


# -- tests/mosquitto.py: the private broker of the tests and the demo, outside the installed package -------------

def test_the_private_broker_is_left_out_of_the_package_and_the_serving_import_path(tmp_path: Path) -> None:
    import tomllib

    import setuptools
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_packages(str(ROOT), include=find["include"])
    assert "sensord" in packages and "sensord.formats" in packages
    assert all(p == "sensord" or p.startswith("sensord.") for p in packages), packages
    assert not list((ROOT / "sensord").rglob("*broker*.py"))
    # What `sensord run` imports (the daemon, its pipeline and sinks), and a command run: no broker helper.
    code = textwrap.dedent(f"""
        import sys
        import sensord.cli, sensord.daemon, sensord.pipeline, sensord.homeassistant
        assert sensord.cli.main(["check-config", "--config", {str(ROOT / "config" / "sensord.yaml")!r}]) == 0
        print(sorted(m for m in sys.modules if "mosquitto" in m or "broker" in m))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "[]"


def test_the_demo_loads_the_private_broker_from_its_checkout_and_says_so_without_one(tmp_path: Path) -> None:
    """``make demo`` runs the console script, whose sys.path has neither the checkout nor tests/: the demo
    loads tests/mosquitto.py from the checkout beside the sensord it runs. A sensord installed without a
    checkout says why it cannot."""
    code = textwrap.dedent(f"""
        import sys
        sys.path[:] = [p for p in sys.path if p not in ("", {str(ROOT / "tests")!r})]
        import sensord.demo
        broker = sensord.demo._dev_broker()
        print(broker.__file__, broker.MosquittoBroker.__name__)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(ROOT / "tests" / "mosquitto.py"), "MosquittoBroker"]

    import shutil
    installed = tmp_path / "site"
    shutil.copytree(ROOT / "sensord", installed / "sensord")  # the package alone, as pip installs it
    code = "import sensord.demo; sensord.demo._dev_broker()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(installed)})
    assert res.returncode == 1
    assert "UnavailableError: the demo runs from a source checkout of sensord" in res.stderr, res.stderr
