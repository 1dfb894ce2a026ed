"""Secrets kept out of the configuration file: from a file (systemd's ``LoadCredential=``) or the environment.

Why: ``/etc/sensord/sensord.yaml`` must be readable by the service's dynamic user, is often kept in
version control and is shown in support threads; a broker password written in it leaks with it. systemd
hands a credential to the service as a file under ``$CREDENTIALS_DIRECTORY`` (only the service can read
it, it never reaches the process environment or ``systemctl show``), so ``password_file`` expands
``${VAR}`` in its path. An environment variable (``password_env``) suits containers.

A secret is read once at start-up; problems are reported with the key and the file, never the secret.

>>> import os, tempfile
>>> d = tempfile.mkdtemp()
>>> _ = open(os.path.join(d, "mqtt-password"), "w").write("s3cret\\n")
>>> read_secret("mqtt.password_file", file="${CREDS}/mqtt-password", environ={"CREDS": d})
('s3cret', [])
>>> read_secret("mqtt.password_env", env="MQTT_PASSWORD", environ={})[1]
['mqtt.password_env: the environment variable MQTT_PASSWORD is not set']
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

_VAR = re.compile(r"\$(\w+|\{[^}]*\})")
MAX_SECRET_BYTES = 4096  # a password, not a file someone pointed at by mistake


def expand_path(raw: str, environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``raw`` with ``$VAR`` / ``${VAR}`` replaced from ``environ``; (path, None) or (None, why not)."""
    missing: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group(1).strip("{}")
        if name not in environ:
            missing.append(name)
            return m.group(0)
        return environ[name]

    path = _VAR.sub(sub, raw)
    if missing:
        hint = (" (systemd sets it only for a unit with LoadCredential= or SetCredential=)"
                if "CREDENTIALS_DIRECTORY" in missing else "")
        return None, f"the environment variable {missing[0]} in {raw!r} is not set{hint}"
    return path, None


def read_secret(key: str, file: str | None = None, env: str | None = None,
                environ: Mapping[str, str] | None = None) -> tuple[str | None, list[str]]:
    """The secret named by ``file`` or ``env`` (at most one is given) and the problems, each naming ``key``.

    A file's single trailing newline is dropped (``echo secret > file`` writes one); an empty secret is
    a problem, not an empty password.
    """
    environ = os.environ if environ is None else environ
    if env is not None:
        if env not in environ:
            return None, [f"{key}: the environment variable {env} is not set"]
        value = environ[env]
        return (value, []) if value else (None, [f"{key}: the environment variable {env} is empty"])
    if file is None:
        return None, []
    path, why = expand_path(file, environ)
    if path is None:
        return None, [f"{key}: {why}"]
    p = Path(path)
    try:
        if p.is_dir():
            return None, [f"{key}: {path} is a directory, not a file"]
        with p.open("rb") as fh:
            data = fh.read(MAX_SECRET_BYTES + 1)
    except FileNotFoundError:
        return None, [f"{key}: file not found: {path}"]
    except OSError as exc:
        return None, [f"{key}: cannot read {path}: {exc.strerror or exc}"]
    if len(data) > MAX_SECRET_BYTES:
        return None, [f"{key}: {path} is larger than {MAX_SECRET_BYTES} bytes: not a password file"]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, [f"{key}: {path} is not UTF-8 text"]
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        return None, [f"{key}: {path} is empty"]
    if "\n" in text:
        return None, [f"{key}: {path} has more than one line; it must hold the password alone"]
    return text, []
