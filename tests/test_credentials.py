"""The broker password from a file or the environment: reading, every problem named, never echoed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sensord.config import ConfigError, config_from_dict
from sensord.credentials import MAX_SECRET_BYTES, read_secret
from sensord.source import mqtt_password

KEY = "mqtt.password_file"


def test_a_file_with_a_trailing_newline_gives_the_line(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    assert read_secret(KEY, file=str(tmp_path / "pw")) == ("s3cret", [])
    (tmp_path / "crlf").write_bytes(b"s3cret\r\n")
    assert read_secret(KEY, file=str(tmp_path / "crlf")) == ("s3cret", [])
    (tmp_path / "bare").write_text("  spaces kept  ")
    assert read_secret(KEY, file=str(tmp_path / "bare")) == ("  spaces kept  ", [])


def test_variables_in_the_path_are_expanded(tmp_path: Path) -> None:
    (tmp_path / "mqtt-password").write_text("pw")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert read_secret(KEY, file="${CREDENTIALS_DIRECTORY}/mqtt-password", environ=env) == ("pw", [])
    assert read_secret(KEY, file="$CREDENTIALS_DIRECTORY/mqtt-password", environ=env) == ("pw", [])


def test_an_unset_credentials_directory_says_what_sets_it() -> None:
    value, problems = read_secret(KEY, file="${CREDENTIALS_DIRECTORY}/mqtt-password", environ={})
    assert value is None
    assert problems == ["mqtt.password_file: the environment variable CREDENTIALS_DIRECTORY in "
                        "'${CREDENTIALS_DIRECTORY}/mqtt-password' is not set (systemd sets it only for a "
                        "unit with LoadCredential= or SetCredential=)"]


@pytest.mark.parametrize(("content", "problem"), [
    (b"", "is empty"),
    (b"\n", "is empty"),
    (b"one\ntwo\n", "has more than one line"),
    (b"\xff\xfe", "is not UTF-8 text"),
    (b"x" * (MAX_SECRET_BYTES + 1), f"is larger than {MAX_SECRET_BYTES} bytes"),
])
def test_unusable_files_are_named_and_the_content_is_not_echoed(tmp_path: Path, content: bytes, problem: str) -> None:
    p = tmp_path / "pw"
    p.write_bytes(content)
    value, problems = read_secret(KEY, file=str(p))
    assert value is None
    assert problems == [f"{KEY}: {p} {problem}" + ("; it must hold the password alone" if "line" in problem
                                                     else ": not a password file" if "larger" in problem else "")]
    assert "two" not in problems[0]


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert read_secret(KEY, file=str(tmp_path / "nope")) == (None, [f"{KEY}: file not found: {tmp_path / 'nope'}"])
    assert read_secret(KEY, file=str(tmp_path)) == (None, [f"{KEY}: {tmp_path} is a directory, not a file"])


def test_environment_variable() -> None:
    assert read_secret("mqtt.password_env", env="PW", environ={"PW": "s3cret"}) == ("s3cret", [])
    assert read_secret("mqtt.password_env", env="PW", environ={"PW": ""}) == (
        None, ["mqtt.password_env: the environment variable PW is empty"])
    assert read_secret("mqtt.password_env", env="PW", environ={}) == (
        None, ["mqtt.password_env: the environment variable PW is not set"])


def test_config_takes_one_password_source_and_needs_a_user_name() -> None:
    with pytest.raises(ConfigError) as ei:
        config_from_dict({"mqtt": {"username": "u", "password": "p", "password_file": "/x"}})
    assert ei.value.errors == ["mqtt.password_file: give the password one way only, not both password and "
                               "password_file"]
    with pytest.raises(ConfigError) as ei:
        config_from_dict({"mqtt": {"password_env": "PW"}})
    assert ei.value.errors == ["mqtt.password_env: a password needs mqtt.username"]


def test_mqtt_password_picks_the_configured_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    monkeypatch.setenv("SENSORD_TEST_PW", "from-env")
    assert mqtt_password(config_from_dict({"mqtt": {"username": "u", "password": "inline"}}).mqtt) == ("inline", [])
    cfg = config_from_dict({"mqtt": {"username": "u", "password_file": str(tmp_path / "pw")}})
    assert mqtt_password(cfg.mqtt) == ("from-file", [])
    cfg = config_from_dict({"mqtt": {"username": "u", "password_env": "SENSORD_TEST_PW"}})
    assert mqtt_password(cfg.mqtt) == ("from-env", [])
    assert mqtt_password(config_from_dict({}).mqtt) == (None, [])


def test_check_config_stops_on_a_missing_password_file_naming_key_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / "sensord.yaml"
    cfg.write_text("mqtt: {username: sensord, password_file: '${CREDENTIALS_DIRECTORY}/mqtt-password'}\n")
    env = {"PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
    proc = subprocess.run([sys.executable, "-m", "sensord.cli", "check-config", "--config", str(cfg)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 78, proc.stderr
    assert f"mqtt.password_file: file not found: {tmp_path / 'creds' / 'mqtt-password'}" in proc.stderr
