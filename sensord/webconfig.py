"""TLS and basic auth for ``/metrics``, configured in the Prometheus exporter-toolkit web-config format.

Why that format: whoever runs Prometheus already writes it for node_exporter and the other exporters
(``--web.config.file``), and the scrape side is Prometheus's own ``scheme: https`` / ``tls_config`` /
``basic_auth``; a sensord box is then protected the way every other target is.

Only the subset that matters for one scrape endpoint is implemented. Every other key of the format is
refused by name rather than ignored, because a user who writes ``client_allowed_sans`` expects it to be
enforced. Relative paths are resolved against the web-config file's directory, as exporter-toolkit does.
Unlike exporter-toolkit, the file is read once at start-up: a changed file or a renewed certificate
takes effect at the next restart (``metrics`` is restart-only as a whole).

Everything that can be checked up front is (files readable, certificate and key matching, CA usable,
hashes well-formed), so a mistake stops start-up with exit 78 and a message naming the key, never a
scrape failing hours later.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import hmac
import logging
import os
import re
import ssl
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import bcrypt
import yaml

from .config import ConfigError, MetricsConfig

log = logging.getLogger(__name__)

HASH_COMMAND = "htpasswd -nBC 10 \"\" | tr -d ':\\n'"

# client_auth_type -> what Python's ssl module does with a client certificate.
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Go's modes that take a client certificate without verifying it: Python's ssl module cannot do that, and
# exporter-toolkit's own docs call them insecure.
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
_TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}

_TOP_KEYS = ("tls_server_config", "basic_auth_users")
_TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version")
# Keys of the exporter-toolkit format that sensord knows but does not implement, with what to do instead.
_UNSUPPORTED = {
    "http_server_config": "sensord serves HTTP/1.1 without extra headers; remove it",
    "rate_limit": "metrics.max_connections bounds what a client can take; remove it",
    "tls_server_config.cert": "inline PEM is not read: put the certificate in a file and set cert_file",
    "tls_server_config.key": "inline PEM is not read: put the key in a file and set key_file",
    "tls_server_config.client_ca": "inline PEM is not read: put the CA in a file and set client_ca_file",
    "tls_server_config.client_allowed_sans": "any certificate signed by client_ca_file is accepted: "
                                             "give these clients a CA of their own",
    "tls_server_config.cipher_suites": "OpenSSL's defaults are used; remove it",
    "tls_server_config.curve_preferences": "OpenSSL's defaults are used; remove it",
    "tls_server_config.prefer_server_cipher_suites": "OpenSSL's defaults are used; remove it",
}
# $2a$/$2b$/$2y$, a two-digit cost, 22 characters of salt and 31 of hash (bcrypt's own base64 alphabet).
_BCRYPT = re.compile(r"^\$2[aby]\$(0[4-9]|[12]\d|3[01])\$[./A-Za-z0-9]{53}$")

AuthVerdict = Literal["ok", "no_credentials", "bad_credentials"]
AUTH_FAILURE_REASONS = ("no_credentials", "bad_credentials")


@dataclass(frozen=True)
class TlsServerConfig:
    """``tls_server_config`` with paths resolved; ``context`` is built (and so checked) at load."""

    cert_file: Path
    key_file: Path
    client_auth_type: str
    client_ca_file: Path | None
    min_version: str
    max_version: str
    context: ssl.SSLContext = field(compare=False, repr=False)


@dataclass(frozen=True)
class WebConfig:
    """A loaded web-config file: TLS (or none), and basic-auth users (none: no authentication)."""

    path: Path
    tls: TlsServerConfig | None
    users: Mapping[str, bytes]

    def describe(self) -> str:
        """For the start-up log line: what protects the endpoint."""
        parts = []
        if self.tls is not None:
            number = {"TLS12": "1.2", "TLS13": "1.3"}
            lo, hi = number[self.tls.min_version], number[self.tls.max_version]
            versions = lo if lo == hi else f"{lo}-{hi}"
            clients = {"NoClientCert": "", "VerifyClientCertIfGiven": ", client certificates verified if given",
                       "RequireAndVerifyClientCert": ", client certificate required"}[self.tls.client_auth_type]
            parts.append(f"TLS {versions}{clients}")
        if self.users:
            parts.append(f"basic auth ({len(self.users)} user{'s' if len(self.users) != 1 else ''})")
        return "; ".join(parts) or "no TLS, no authentication"


class _EncryptedKey(Exception):
    """Raised from the passphrase callback: OpenSSL would otherwise prompt on the terminal."""


def _ask_no_passphrase() -> bytes:
    raise _EncryptedKey


def _close_match(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _keys(doc: dict[Any, Any], where: str, known: tuple[str, ...], errors: list[str]) -> None:
    """Unknown and unsupported keys of one mapping, each named with its full path."""
    for key in doc:
        path = f"{where}.{key}" if where else str(key)
        if key in known:
            continue
        if path in _UNSUPPORTED:
            errors.append(f"{path}: not supported by sensord ({_UNSUPPORTED[path]})")
        else:
            errors.append(f"{path}: unknown key{_close_match(str(key), known)}")


def _file(doc: dict[str, Any], key: str, base: Path, errors: list[str], required: bool) -> Path | None:
    """A readable file named by ``doc[key]``, relative to ``base``; None (and an error) if it is not."""
    path = f"tls_server_config.{key}"
    raw = doc.get(key)
    if raw is None or raw == "":
        if required:
            errors.append(f"{path}: is required")
        return None
    if not isinstance(raw, str):
        errors.append(f"{path}: must be a file path, got {raw!r}")
        return None
    p = Path(raw) if os.path.isabs(raw) else base / raw
    try:
        with open(p, "rb"):
            pass
    except FileNotFoundError:
        errors.append(f"{path}: file not found: {p}")
        return None
    except OSError as exc:
        errors.append(f"{path}: cannot read {p}: {exc.strerror or exc}")
        return None
    return p


def _holds_certificate(p: Path) -> bool:
    """Whether a PEM file holds at least one certificate (OpenSSL skips other blocks, such as a key)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(p))
        return True
    except (ssl.SSLError, ValueError):
        return False


def _choice(doc: dict[str, Any], key: str, default: str, allowed: tuple[str, ...], errors: list[str]) -> str | None:
    value = doc.get(key, default)
    if value in allowed:
        return str(value)
    errors.append(f"tls_server_config.{key}: must be one of {', '.join(allowed)}, got {value!r}")
    return None


def _tls(doc: Any, base: Path, errors: list[str]) -> TlsServerConfig | None:
    if not isinstance(doc, dict):
        errors.append("tls_server_config: must be a mapping (cert_file, key_file, ...)")
        return None
    n = len(errors)
    _keys(doc, "tls_server_config", _TLS_KEYS, errors)
    cert = _file(doc, "cert_file", base, errors, required=True)
    key = _file(doc, "key_file", base, errors, required=True)
    auth = doc.get("client_auth_type", "NoClientCert")
    if auth in _UNVERIFIED_CLIENT_AUTH:
        errors.append(f"tls_server_config.client_auth_type: {auth} is not supported by sensord (it takes a client "
                      "certificate without verifying it): use RequireAndVerifyClientCert with client_ca_file")
        auth = None
    else:
        auth = _choice(doc, "client_auth_type", "NoClientCert", tuple(_CLIENT_AUTH), errors)
    ca = _file(doc, "client_ca_file", base, errors, required=False)
    if auth == "NoClientCert" and doc.get("client_ca_file"):
        errors.append("tls_server_config.client_ca_file: given, but client_auth_type is NoClientCert: "
                      "set client_auth_type: RequireAndVerifyClientCert (or remove client_ca_file)")
    elif auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert") and not doc.get("client_ca_file"):
        errors.append(f"tls_server_config.client_ca_file: is required with client_auth_type {auth} "
                      "(the CA that signs the clients' certificates)")
    versions = {}
    for k, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        value = doc.get(k, default)
        if value in ("TLS10", "TLS11"):
            errors.append(f"tls_server_config.{k}: {value} is not supported by sensord (obsolete): use TLS12 or TLS13")
        else:
            versions[k] = _choice(doc, k, default, tuple(_TLS_VERSIONS), errors)
    lo, hi = versions.get("min_version"), versions.get("max_version")
    if lo and hi and _TLS_VERSIONS[lo] > _TLS_VERSIONS[hi]:
        errors.append(f"tls_server_config.max_version: must not be below min_version ({lo}), got {hi}")
    if len(errors) > n or cert is None or key is None or auth is None or lo is None or hi is None:
        return None

    if not _holds_certificate(cert):
        errors.append(f"tls_server_config.cert_file: no PEM certificate in {cert}")
        return None
    if ca is not None and not _holds_certificate(ca):
        errors.append(f"tls_server_config.client_ca_file: no PEM certificate in {ca}")
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version, ctx.maximum_version = _TLS_VERSIONS[lo], _TLS_VERSIONS[hi]
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_ask_no_passphrase)
    except _EncryptedKey:
        errors.append(f"tls_server_config.key_file: {key} is encrypted with a passphrase: sensord needs the key "
                      "unencrypted (readable only by its own user)")
        return None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            errors.append(f"tls_server_config.key_file: {key} is not the key of the certificate in {cert}")
        else:
            log.debug("load_cert_chain(%s, %s): %s", cert, key, exc)  # OpenSSL's words: "PEM lib" and the like
            errors.append(f"tls_server_config.key_file: no PEM private key in {key} that OpenSSL can use")
        return None
    ctx.verify_mode = _CLIENT_AUTH[auth]
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
    ctx.set_alpn_protocols(["http/1.1"])  # what the server speaks; a client offering h2 falls back at once
    return TlsServerConfig(cert, key, auth, ca, lo, hi, ctx)


def _users(doc: Any, errors: list[str]) -> dict[str, bytes]:
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        errors.append("basic_auth_users: must be a mapping of user names to bcrypt hashes")
        return {}
    users = {}
    for name, hashed in doc.items():
        if not isinstance(name, str) or not name:
            errors.append(f"basic_auth_users: user name {name!r} must be a non-empty string (quote it in YAML)")
            continue
        if ":" in name:  # basic auth splits user and password at the first colon: this user could never log in
            errors.append(f"basic_auth_users.{name}: a user name must not contain ':'")
            continue
        # The value is not echoed: a mistake here is often a plain-text password.
        if not isinstance(hashed, str) or not _BCRYPT.match(hashed):
            errors.append(f"basic_auth_users.{name}: not a bcrypt hash (make one with: {HASH_COMMAND})")
            continue
        users[name] = hashed.encode("ascii")
    return users


def load_web_config(path: str | Path) -> WebConfig:
    """Read and check a web-config file; :class:`ConfigError` lists every problem (without a source)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(["file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 text (byte {exc.start})"]) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"invalid YAML{where}: {getattr(exc, 'problem', None) or exc}"]) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError([f"top level: must be a mapping, got {type(doc).__name__}"])
    errors: list[str] = []
    _keys(doc, "", _TOP_KEYS, errors)
    tls = None
    if doc.get("tls_server_config") is not None:
        tls = _tls(doc["tls_server_config"], p.absolute().parent, errors)
    users = _users(doc.get("basic_auth_users"), errors)
    if errors:
        raise ConfigError(errors)
    return WebConfig(p, tls, users)


def metrics_web_config(cfg: MetricsConfig) -> tuple[WebConfig | None, list[str]]:
    """The web config ``metrics.web_config_file`` names (None if unset), or the problems with it, each
    prefixed ``metrics.web_config_file <path>: `` for the config error line."""
    if cfg.web_config_file is None:
        return None, []
    try:
        return load_web_config(cfg.web_config_file), []
    except ConfigError as exc:
        return None, [f"metrics.web_config_file {cfg.web_config_file}: {e}" for e in exc.errors]


class BasicAuth:
    """Checks ``Authorization: Basic`` credentials against the configured bcrypt hashes.

    A bcrypt check costs tens of milliseconds of CPU by design, and Prometheus sends the same credentials at
    every scrape, so a successful (user, password) pair is remembered for later requests, as an HMAC under a
    per-process random key (never the password itself), in a small LRU. Failures are never remembered (a
    client cannot fill the cache with them) and bcrypt runs one at a time, so a flood of wrong passwords
    costs at most one core, and :class:`_BoundedServer`'s connection cap bounds the queue. An unknown user
    is checked against a dummy hash of the same cost, so the response time does not tell which users exist.
    """

    def __init__(self, users: Mapping[str, bytes], cache_size: int = 64) -> None:
        self._users = dict(users)
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()
        self._key = os.urandom(32)
        cost = max((int(h[4:6]) for h in self._users.values()), default=10)
        self._dummy = bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(cost))

    def _credentials(self, header: str | None) -> tuple[str, bytes] | None:
        if not header:
            return None
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            # WSGI hands headers over as latin-1 strings; the credentials themselves are base64 of UTF-8.
            raw = base64.b64decode(token.strip().encode("latin-1"), validate=True)
            user, sep, password = raw.partition(b":")
            return (user.decode("utf-8"), password) if sep else ("", b"")
        except (binascii.Error, UnicodeError):
            return ("", b"")

    def check(self, header: str | None) -> AuthVerdict:
        """``ok``, or why not: ``no_credentials`` (none sent) or ``bad_credentials`` (any wrong or malformed)."""
        creds = self._credentials(header)
        if creds is None:
            return "no_credentials"
        user, password = creds
        hashed = self._users.get(user)
        digest = hmac.new(self._key, user.encode("utf-8") + b"\0" + password + b"\0" + (hashed or b""),
                          hashlib.sha256).digest()
        if hashed is not None:
            with self._cache_lock:
                if digest in self._cache:
                    self._cache.move_to_end(digest)
                    return "ok"
        with self._bcrypt_lock:
            try:
                ok = bcrypt.checkpw(password, hashed or self._dummy) and hashed is not None
            except ValueError:  # a password over bcrypt's 72 bytes, or a hash bcrypt will not take
                ok = False
        if not ok:
            return "bad_credentials"
        with self._cache_lock:
            self._cache[digest] = None
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return "ok"
