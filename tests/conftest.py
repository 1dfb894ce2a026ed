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

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from broker import MosquittoBroker  # noqa: E402


@pytest.fixture(scope="session")
def broker() -> Iterator[MosquittoBroker]:
    """A private mosquitto shared by the whole session (never 127.0.0.1:1883).

    State such as retained messages outlives a test: use distinct topics per
    test, e.g. via the ``topic_root`` fixture.
    """
    with MosquittoBroker() as b:
        yield b


@pytest.fixture
def fresh_broker() -> Iterator[MosquittoBroker]:
    """A private mosquitto for one test (clean state, may be stopped/restarted)."""
    with MosquittoBroker() as b:
        yield b


@pytest.fixture
def topic_root() -> str:
    """A unique topic prefix (no trailing slash) isolating a test on the shared broker."""
    return f"test/{uuid.uuid4().hex[:12]}"
