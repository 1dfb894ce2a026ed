"""Checks for systemd/sensord.service.

Uses ``systemd-analyze`` (package ``systemd`` on Debian/Ubuntu).  It is a hard
requirement: when it is missing these tests FAIL instead of skipping, so a CI
image without it cannot silently pass.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "sensord.service"
REAL_EXEC = "/opt/sensord/venv/bin/sensord"
MAX_EXPOSURE = 2.0

_ENV = {
    **os.environ,
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_LOG_COLOR": "0",
    "LC_ALL": "C.UTF-8",
}


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail(
            "systemd-analyze not found on PATH; install it (Debian/Ubuntu: "
            "`apt-get install -y systemd`) to check systemd/sensord.service",
            pytrace=False,
        )
    return exe


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_systemd_analyze(), *args],
        capture_output=True,
        text=True,
        env=_ENV,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def _parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Minimal unit-file parser: {section: {key: [values in order]}}."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {raw!r}"
        assert "=" in line, f"not a directive: {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return _parse_unit(UNIT.read_text())


def test_security_exposure_at_most_2(tmp_path: Path) -> None:
    proc = _run("security", "--offline=yes", "--no-pager", str(UNIT))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"systemd-analyze security failed:\n{out}"
    m = re.search(r"Overall exposure level for \S+:\s*([0-9]+(?:\.[0-9]+)?)", out)
    assert m, f"no 'Overall exposure level' line in output:\n{out}"
    level = float(m.group(1))
    assert level <= MAX_EXPOSURE, f"exposure level {level} > {MAX_EXPOSURE}:\n{out}"


def test_verify_clean(tmp_path: Path) -> None:
    text = UNIT.read_text()
    # verify checks that ExecStart's binary exists; swap the production path
    # for an executable that exists here, keeping the arguments.
    stand_in = shutil.which("true") or "/bin/true"
    pattern = re.compile(r"^ExecStart=" + re.escape(REAL_EXEC) + r"(?=\s|$)", re.M)
    rewritten, n = pattern.subn("ExecStart=" + stand_in, text)
    assert n == 1, f"expected exactly one ExecStart={REAL_EXEC} line in {UNIT}"
    copy = tmp_path / UNIT.name
    copy.write_text(rewritten)

    proc = _run("verify", "--no-pager", str(copy))
    assert proc.returncode == 0, (
        f"systemd-analyze verify exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    )
    assert proc.stdout.strip() == "", f"verify printed to stdout:\n{proc.stdout}"
    assert proc.stderr.strip() == "", f"verify printed warnings:\n{proc.stderr}"


def test_required_directives(unit: dict[str, dict[str, list[str]]]) -> None:
    svc = unit["Service"]

    def one(key: str) -> str:
        assert key in svc, f"[Service] lacks {key}="
        return svc[key][-1]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("WatchdogSec") == "30"
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus").split() == ["78"]
    assert one("ExecStart").split()[0] == REAL_EXEC
    assert one("ExecStart").split()[1:] == ["run", "--config", "/etc/sensord/sensord.yaml"]
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("StateDirectory") == "sensord"
    assert one("ConfigurationDirectory") == "sensord"
    assert one("IPAddressDeny") == "any"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_file_descriptor_limit_is_explicit(unit: dict[str, dict[str, list[str]]]) -> None:
    """Issue 14: the bound on open files is set in the unit, with room above the daemon's own caps."""
    (limit,) = unit["Service"]["LimitNOFILE"]
    assert int(limit) >= 1024
