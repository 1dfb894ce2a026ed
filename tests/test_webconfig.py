"""The metrics web config (``metrics.web_config_file``): the exporter-toolkit format, parsed and checked up front.

Every mistake must stop start-up with a message naming the file and the key, so these tests assert the
exact messages; the basic-auth checker is tested on real bcrypt hashes.
"""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from conftest import Pki
from pki import openssl

from sensord.config import ConfigError, config_from_dict
from sensord.webconfig import BasicAuth, load_web_config, metrics_web_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "metrics-web.example.yml"


def hash_of(password: str, prefix: bytes = b"$2b$") -> str:
    """A real bcrypt hash at the lowest cost (fast tests); ``$2y$`` is what ``htpasswd -B`` writes."""
    h = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4))
    return (prefix + h[4:]).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def site(tmp_path: Path, pki: Pki) -> Path:
    """A directory like /etc/sensord: the server's certificate and key and the CA, beside the web config."""
    d = tmp_path / "etc"
    d.mkdir()
    for src, name in ((pki.server_crt, "metrics.crt"), (pki.server_key, "metrics.key"), (pki.ca, "clients-ca.crt"),
                      (pki.client_key, "client.key")):
        shutil.copy(src, d / name)
    return d


def write(d: Path, doc: Any, name: str = "web.yml") -> Path:
    p = d / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load_web_config(path)
    return ei.value.errors


TLS = {"cert_file": "metrics.crt", "key_file": "metrics.key"}


# -- good files -----------------------------------------------------------------------------------

def test_tls_and_users_with_paths_relative_to_the_file(site: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the file's directory: relative paths must not depend on it
    p = write(site, {"tls_server_config": {**TLS, "client_auth_type": "RequireAndVerifyClientCert",
                                           "client_ca_file": "clients-ca.crt", "min_version": "TLS13"},
                     "basic_auth_users": {"prometheus": hash_of("s3cret", b"$2y$"), "grafana": hash_of("x")}})
    web = load_web_config(p)
    assert web.tls is not None
    assert (web.tls.cert_file, web.tls.key_file, web.tls.client_ca_file) == (
        site / "metrics.crt", site / "metrics.key", site / "clients-ca.crt")
    assert (web.tls.client_auth_type, web.tls.min_version, web.tls.max_version) == (
        "RequireAndVerifyClientCert", "TLS13", "TLS13")
    ctx = web.tls.context
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert sorted(web.users) == ["grafana", "prometheus"]
    assert web.describe() == "TLS 1.3, client certificate required; basic auth (2 users)"


def test_defaults_no_client_cert_tls12(site: Path) -> None:
    web = load_web_config(write(site, {"tls_server_config": TLS}))
    assert web.tls is not None and web.users == {}
    assert (web.tls.client_auth_type, web.tls.min_version, web.tls.max_version) == ("NoClientCert", "TLS12", "TLS13")
    assert web.tls.context.verify_mode == ssl.CERT_NONE
    assert web.describe() == "TLS 1.2-1.3"


def test_absolute_paths_are_taken_as_they_are(site: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "conf"
    elsewhere.mkdir()
    p = write(elsewhere, {"tls_server_config": {"cert_file": str(site / "metrics.crt"),
                                                "key_file": str(site / "metrics.key")}})
    assert load_web_config(p).tls.cert_file == site / "metrics.crt"  # type: ignore[union-attr]


def test_users_only_and_empty_file(site: Path) -> None:
    web = load_web_config(write(site, {"basic_auth_users": {"prometheus": hash_of("pw")}}))
    assert web.tls is None and list(web.users) == ["prometheus"]
    empty = load_web_config(write(site, "", "empty.yml"))
    assert empty.tls is None and empty.users == {}  # as exporter-toolkit: nothing configured, nothing required


def test_the_shipped_example_needs_only_its_files_and_a_hash(site: Path) -> None:
    """config/metrics-web.example.yml, copied beside the certificates: refused only for its placeholder hash
    (so a copied example never starts with a password nobody chose), and loads once a hash is put in."""
    text = EXAMPLE.read_text()
    p = write(site, text, "metrics-web.yml")
    assert errors_of(p) == ["basic_auth_users.prometheus: not a bcrypt hash (make one with: "
                            "htpasswd -nBC 10 \"\" | tr -d ':\\n')"]
    doc = yaml.safe_load(text)
    doc["basic_auth_users"]["prometheus"] = hash_of("pw")
    web = load_web_config(write(site, doc, "metrics-web.yml"))
    assert web.tls is not None and web.tls.cert_file == site / "metrics.crt" and list(web.users) == ["prometheus"]


# -- every mistake, with the key that is wrong --------------------------------------------------------

@pytest.mark.parametrize(("doc", "expected"), [
    ({"basic_auth_user": {}}, ['basic_auth_user: unknown key (did you mean "basic_auth_users"?)']),
    ({"tls_server_config": {**TLS, "cert_fil": "x"}},
     ['tls_server_config.cert_fil: unknown key (did you mean "cert_file"?)']),
    ({"http_server_config": {"http2": True}},
     ["http_server_config: not supported by sensord (sensord serves HTTP/1.1 without extra headers; remove it)"]),
    ({"tls_server_config": {**TLS, "cipher_suites": ["TLS_AES_128_GCM_SHA256"]}},
     ["tls_server_config.cipher_suites: not supported by sensord (OpenSSL's defaults are used; remove it)"]),
    ({"tls_server_config": {**TLS, "client_allowed_sans": ["a"]}},
     ["tls_server_config.client_allowed_sans: not supported by sensord (any certificate signed by client_ca_file "
      "is accepted: give these clients a CA of their own)"]),
    ({"tls_server_config": {"key_file": "metrics.key"}}, ["tls_server_config.cert_file: is required"]),
    ({"tls_server_config": {"cert_file": "metrics.crt", "key_file": ""}}, ["tls_server_config.key_file: is required"]),
    ({"tls_server_config": {**TLS, "cert_file": "nope.crt"}},
     ["tls_server_config.cert_file: file not found: {site}/nope.crt"]),
    ({"tls_server_config": {**TLS, "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "ca.pem"}},
     ["tls_server_config.client_ca_file: file not found: {site}/ca.pem"]),
    ({"tls_server_config": {**TLS, "client_auth_type": "Required"}},
     ["tls_server_config.client_auth_type: must be one of NoClientCert, VerifyClientCertIfGiven, "
      "RequireAndVerifyClientCert, got 'Required'"]),
    ({"tls_server_config": {**TLS, "client_auth_type": "RequireAnyClientCert"}},
     ["tls_server_config.client_auth_type: RequireAnyClientCert is not supported by sensord (it takes a client "
      "certificate without verifying it): use RequireAndVerifyClientCert with client_ca_file"]),
    ({"tls_server_config": {**TLS, "client_auth_type": "RequireAndVerifyClientCert"}},
     ["tls_server_config.client_ca_file: is required with client_auth_type RequireAndVerifyClientCert "
      "(the CA that signs the clients' certificates)"]),
    ({"tls_server_config": {**TLS, "client_ca_file": "clients-ca.crt"}},
     ["tls_server_config.client_ca_file: given, but client_auth_type is NoClientCert: set client_auth_type: "
      "RequireAndVerifyClientCert (or remove client_ca_file)"]),
    ({"tls_server_config": {**TLS, "min_version": "TLS11"}},
     ["tls_server_config.min_version: TLS11 is not supported by sensord (obsolete): use TLS12 or TLS13"]),
    ({"tls_server_config": {**TLS, "min_version": 1.2}},
     ["tls_server_config.min_version: must be one of TLS12, TLS13, got 1.2"]),
    ({"tls_server_config": {**TLS, "min_version": "TLS13", "max_version": "TLS12"}},
     ["tls_server_config.max_version: must not be below min_version (TLS13), got TLS12"]),
    ({"tls_server_config": {**TLS, "cert_file": "metrics.key"}},
     ["tls_server_config.cert_file: no PEM certificate in {site}/metrics.key"]),
    ({"tls_server_config": {**TLS, "key_file": "metrics.crt"}},
     ["tls_server_config.key_file: no PEM private key in {site}/metrics.crt that OpenSSL can use"]),
    ({"tls_server_config": {**TLS, "key_file": "client.key"}},
     ["tls_server_config.key_file: {site}/client.key is not the key of the certificate in {site}/metrics.crt"]),
    ({"tls_server_config": {**TLS, "client_auth_type": "VerifyClientCertIfGiven", "client_ca_file": "metrics.key"}},
     ["tls_server_config.client_ca_file: no PEM certificate in {site}/metrics.key"]),
    ({"tls_server_config": "metrics.crt"}, ["tls_server_config: must be a mapping (cert_file, key_file, ...)"]),
    ({"basic_auth_users": ["prometheus"]}, ["basic_auth_users: must be a mapping of user names to bcrypt hashes"]),
    ({"basic_auth_users": {"prometheus": "hunter2"}},
     ["basic_auth_users.prometheus: not a bcrypt hash (make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n')"]),
    ({"basic_auth_users": {"a:b": "$2y$10$" + "a" * 53}}, ["basic_auth_users.a:b: a user name must not contain ':'"]),
    ({"basic_auth_users": {123: "$2y$10$" + "a" * 53}},
     ["basic_auth_users: user name 123 must be a non-empty string (quote it in YAML)"]),
    (["tls_server_config"], ["top level: must be a mapping, got list"]),
    ("tls_server_config: [\n", ["invalid YAML at line 2, column 1: *"]),
])
def test_each_mistake_is_named_with_its_key(site: Path, doc: Any, expected: list[str]) -> None:
    got = errors_of(write(site, doc))
    assert len(got) == len(expected), got
    for g, e in zip(got, [e.replace("{site}", str(site)) for e in expected], strict=True):
        if e.endswith("*"):  # the YAML parser's own wording follows
            assert g.startswith(e.removesuffix("*")), g
        else:
            assert g == e


def test_a_plaintext_password_in_place_of_a_hash_is_not_echoed(site: Path) -> None:
    (msg,) = errors_of(write(site, {"basic_auth_users": {"prometheus": "hunter2"}}))
    assert "hunter2" not in msg


def test_all_mistakes_are_reported_at_once(site: Path) -> None:
    got = errors_of(write(site, {"tls_server_config": {"cert_file": "a.crt", "key_file": "b.key",
                                                       "min_version": "TLS10"},
                                 "basic_auth_users": {"prometheus": "plain"}, "rate_limit": {"burst": 1}}))
    assert [e.split(":")[0] for e in got] == [
        "rate_limit", "tls_server_config.cert_file", "tls_server_config.key_file", "tls_server_config.min_version",
        "basic_auth_users.prometheus"]


def test_an_encrypted_key_is_refused_without_prompting(site: Path) -> None:
    openssl("pkey", "-in", "metrics.key", "-out", "encrypted.key", "-aes256", "-passout", "pass:secret", cwd=site)
    assert errors_of(write(site, {"tls_server_config": {**TLS, "key_file": "encrypted.key"}})) == [
        f"tls_server_config.key_file: {site}/encrypted.key is encrypted with a passphrase: sensord needs the key "
        "unencrypted (readable only by its own user)"]


def test_a_relative_web_config_path_resolves_its_files_from_where_it_is(site: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    write(site, {"tls_server_config": {**TLS, "key_file": "gone.key"}})
    monkeypatch.chdir(site.parent)
    assert errors_of(Path("etc/web.yml")) == [f"tls_server_config.key_file: file not found: {site}/gone.key"]


def test_unreadable_and_missing_web_config_file(tmp_path: Path) -> None:
    assert errors_of(tmp_path / "none.yml") == ["file not found"]
    (tmp_path / "dir.yml").mkdir()
    (msg,) = errors_of(tmp_path / "dir.yml")
    assert msg.startswith("cannot read: ")


# -- in the daemon's config ------------------------------------------------------------------------

def test_metrics_web_config_names_the_setting_and_the_file(site: Path) -> None:
    p = write(site, {"tls_server_config": {**TLS, "cert_file": "gone.crt"}})
    cfg = config_from_dict({"metrics": {"web_config_file": str(p)}})
    assert metrics_web_config(cfg.metrics) == (None, [
        f"metrics.web_config_file {p}: tls_server_config.cert_file: file not found: {site}/gone.crt"])
    assert metrics_web_config(config_from_dict({}).metrics) == (None, [])


def test_web_config_file_setting_is_a_path_or_null() -> None:
    assert config_from_dict({}).metrics.web_config_file is None
    with pytest.raises(ConfigError) as ei:
        config_from_dict({"metrics": {"web_config_file": " "}})
    assert ei.value.errors == ["metrics.web_config_file: must be a file path or null, got an empty string"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sensord.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_bad_web_config_exits_78_naming_file_and_key(site: Path, tmp_path: Path, command: str) -> None:
    """Checked before the model is loaded or anything listens: one line, exit 78 (systemd does not restart)."""
    web = write(site, {"tls_server_config": {**TLS, "cert_file": "missing.crt"}})
    cfg = tmp_path / "sensord.yaml"
    cfg.write_text(yaml.safe_dump({"metrics": {"web_config_file": str(web)},
                                   "daemon": {"model": str(tmp_path / "no-model"), "state_dir": None}}))
    res = cli(command, "--config", str(cfg))
    assert res.returncode == 78, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [f"sensord: config error: {cfg}: metrics.web_config_file {web}: "
                     f"tls_server_config.cert_file: file not found: {site}/missing.crt"], res.stderr


def test_check_config_accepts_a_good_web_config(site: Path, tmp_path: Path) -> None:
    web = write(site, {"tls_server_config": TLS, "basic_auth_users": {"prometheus": hash_of("pw")}})
    cfg = tmp_path / "sensord.yaml"
    cfg.write_text(yaml.safe_dump({"metrics": {"web_config_file": str(web)}}))
    res = cli("check-config", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("OK ")


# -- basic auth ------------------------------------------------------------------------------------

@pytest.fixture
def auth() -> BasicAuth:
    return BasicAuth({"prometheus": hash_of("s3cret", b"$2y$").encode(), "grafana": hash_of("other").encode()})


def test_basic_auth_verdicts(auth: BasicAuth) -> None:
    assert auth.check(basic("prometheus", "s3cret")) == "ok"
    assert auth.check(basic("grafana", "other")) == "ok"
    assert auth.check(basic("prometheus", "other")) == "bad_credentials"  # another user's password
    assert auth.check(basic("nobody", "s3cret")) == "bad_credentials"
    assert auth.check(basic("prometheus", "")) == "bad_credentials"
    assert auth.check(basic("prometheus", "x" * 100)) == "bad_credentials"  # beyond bcrypt's 72 bytes
    assert auth.check("Basic !!!notbase64") == "bad_credentials"
    assert auth.check("Basic " + base64.b64encode(b"no-colon").decode()) == "bad_credentials"
    assert auth.check("basic " + base64.b64encode(b"prometheus:s3cret").decode()) == "ok"  # scheme any case
    assert auth.check(None) == "no_credentials"
    assert auth.check("") == "no_credentials"
    assert auth.check("Bearer abc") == "no_credentials"


def test_a_successful_check_is_remembered_and_failures_are_not(auth: BasicAuth,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Prometheus sends the same credentials every 5 s: one bcrypt check, then the cache. A wrong password
    is checked every time (it must never be let in by a cached success)."""
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return real(password, hashed)
    monkeypatch.setattr(bcrypt, "checkpw", counting)
    for _ in range(5):
        assert auth.check(basic("prometheus", "s3cret")) == "ok"
    assert calls == [b"s3cret"]
    for _ in range(3):
        assert auth.check(basic("prometheus", "wrong")) == "bad_credentials"
    assert calls == [b"s3cret"] + [b"wrong"] * 3
    assert auth.check(basic("nobody", "x")) == "bad_credentials"  # an unknown user still costs a bcrypt check
    assert len(calls) == 5


def test_the_cache_is_bounded() -> None:
    users = {f"u{i}": hash_of(f"p{i}").encode() for i in range(5)}
    auth = BasicAuth(users, cache_size=2)
    for i in range(5):
        assert auth.check(basic(f"u{i}", f"p{i}")) == "ok"
    assert len(auth._cache) == 2
    assert auth.check(basic("u0", "p0")) == "ok"  # evicted, checked again
