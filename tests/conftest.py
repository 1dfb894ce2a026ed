"""Shared pytest fixtures.

``tests/`` is deliberately not a package (no ``__init__.py``). Helper modules
in it, such as ``broker.py``, are made importable as top-level modules
(``from broker import MqttRecorder, publish``) by putting this directory on
``sys.path`` here: conftest.py is imported before any test module, and this
works under every ``--import-mode`` (pytest's default "prepend" mode would do
it implicitly, "importlib" mode would not).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from broker import MosquittoBroker  # noqa: E402
from e2e_support import TrainedBundle, tiny_train_config, train_tiny_bundle  # noqa: E402
from pki import make_ca, make_cert  # noqa: E402


@pytest.fixture(scope="session")
def broker() -> Iterator[MosquittoBroker]:
    """A private mosquitto shared by the whole session (never 127.0.0.1:1883).

    State such as retained messages outlives a test: use distinct topics per
    test, e.g. via the ``topic_root`` fixture.
    """
    with MosquittoBroker() as b:
        yield b


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> TrainedBundle:
    """The tiny dense bundle the end-to-end modules serve, trained once per session (seconds on two cores,
    once instead of once per module). Tests copy it before changing anything in it."""
    return train_tiny_bundle(tmp_path_factory.mktemp("tiny"), tiny_train_config(epochs=30), "model-a")


@pytest.fixture
def fresh_broker() -> Iterator[MosquittoBroker]:
    """A private mosquitto for one test (clean state, may be stopped/restarted)."""
    with MosquittoBroker() as b:
        yield b


@pytest.fixture
def topic_root() -> str:
    """A unique topic prefix (no trailing slash) isolating a test on the shared broker."""
    return f"test/{uuid.uuid4().hex[:12]}"


class Pki(NamedTuple):
    """Certificates for the TLS tests (all made by ``openssl``, see ``pki.py``)."""

    ca: Path  # signs the server's certificate and the good client's
    server_key: Path
    server_crt: Path  # for 127.0.0.1 and localhost
    client_key: Path
    client_crt: Path  # signed by ``ca``
    other_ca: Path  # signs only ``stranger_crt``
    stranger_key: Path
    stranger_crt: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = make_ca(d, "ca")
    other_key, other = make_ca(d, "other-ca")
    server_key, server_crt = make_cert(d, "server", ca_key, ca)
    client_key, client_crt = make_cert(d, "client", ca_key, ca, usage="clientAuth")
    stranger_key, stranger_crt = make_cert(d, "stranger", other_key, other, usage="clientAuth")
    return Pki(ca, server_key, server_crt, client_key, client_crt, other, stranger_key, stranger_crt)
