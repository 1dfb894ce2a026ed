"""Checks for systemd/sensord.service and its template twin systemd/sensord@.service (one instance per
partition set, README "Scaling out").

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
TEMPLATE = ROOT / "systemd" / "sensord@.service"
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


def _as_instance(path: Path, tmp_path: Path) -> Path:
    """The unit as systemd sees it: a template as its instance 0."""
    if "@" not in path.name:
        return path
    copy = tmp_path / path.name.replace("@.", "@0.")
    copy.write_text(path.read_text())
    return copy


@pytest.mark.parametrize("path", [UNIT, TEMPLATE], ids=lambda p: p.name)
def test_security_exposure_at_most_2(path: Path, tmp_path: Path) -> None:
    proc = _run("security", "--offline=yes", "--no-pager", str(_as_instance(path, tmp_path)))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"systemd-analyze security failed:\n{out}"
    m = re.search(r"Overall exposure level for \S+:\s*([0-9]+(?:\.[0-9]+)?)", out)
    assert m, f"no 'Overall exposure level' line in output:\n{out}"
    level = float(m.group(1))
    assert level <= MAX_EXPOSURE, f"exposure level {level} > {MAX_EXPOSURE}:\n{out}"


@pytest.mark.parametrize("path", [UNIT, TEMPLATE], ids=lambda p: p.name)
def test_verify_clean(path: Path, tmp_path: Path) -> None:
    text = path.read_text()
    # verify checks that ExecStart's binary exists; swap the production path
    # for an executable that exists here, keeping the arguments.
    stand_in = shutil.which("true") or "/bin/true"
    pattern = re.compile(r"^ExecStart=" + re.escape(REAL_EXEC) + r"(?=\s|$)", re.M)
    rewritten, n = pattern.subn("ExecStart=" + stand_in, text)
    assert n == 1, f"expected exactly one ExecStart={REAL_EXEC} line in {path}"
    copy = tmp_path / path.name.replace("@.", "@0.")
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


def test_the_template_differs_from_the_single_unit_only_where_an_instance_must(
        unit: dict[str, dict[str, list[str]]]) -> None:
    """Two copies of the hardening would drift: every directive but the per-instance ones is identical."""
    template = _parse_unit(TEMPLATE.read_text())
    per_instance = {("Unit", "Description"), ("Unit", "After"), ("Service", "ExecStart"),
                    ("Service", "StateDirectory"), ("Service", "WorkingDirectory"), ("Service", "ReadWritePaths")}
    assert template.keys() == unit.keys()
    for section, directives in unit.items():
        assert template[section].keys() == directives.keys(), section
        for key, values in directives.items():
            if (section, key) not in per_instance:
                assert template[section][key] == values, f"[{section}] {key}"
    svc = template["Service"]
    assert svc["ExecStart"] == [f"{REAL_EXEC} run --config /etc/sensord/sensord-%i.yaml"]
    assert svc["StateDirectory"] == ["sensord-%i"] and svc["ReadWritePaths"] == ["/var/lib/sensord-%i"]
