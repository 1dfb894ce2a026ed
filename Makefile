# Two entry points for a fresh machine (see README):
#   make demo  - install, train on simulated data, run the daemon against a private broker, show alerts
#   make test  - install everything the tests need (Python packages, apt packages), lint, type-check, run them
# While working: make lint, make typecheck, make test-fast (unit tests and doctests only, no broker or training).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: demo test test-fast lint typecheck install install-test demo-deps test-deps bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY) demo-deps
	$(PY) -m pip install --quiet -e '.[train]'

install-test: $(PY) test-deps
	$(PY) -m pip install --quiet -e '.[test]'

# The broker the demo (and the end-to-end tests) start privately; mosquitto_passwd comes with it.
demo-deps:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
	  { $(APT) update -qq && $(APT) install -y -qq mosquitto mosquitto-clients; }

# Also: systemd-analyze for the unit test, openssl for the TLS tests' throwaway certificates, and a
# real Prometheus (with promtool) that scrapes the daemon and checks the shipped scrape config and rules, and
# a real Alertmanager (with amtool) that turns a fault into a notification. The tests start their own on free
# loopback ports (clustering off), so a prometheus-alertmanager service the package starts holds nothing they need.
test-deps: demo-deps
	@command -v systemd-analyze >/dev/null 2>&1 || { $(APT) update -qq && $(APT) install -y -qq systemd; }
	@command -v openssl >/dev/null 2>&1 || { $(APT) update -qq && $(APT) install -y -qq openssl; }
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || \
	  { $(APT) update -qq && $(APT) install -y -qq prometheus; }
	@{ command -v prometheus-alertmanager || command -v alertmanager; } >/dev/null 2>&1 && command -v amtool >/dev/null 2>&1 || \
	  { $(APT) update -qq && $(APT) install -y -qq prometheus-alertmanager; }
# A three-node NATS cluster (JetStream + MQTT gateway) for the scale-out test (deploy/nats/), started by the test.
	@command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || \
	  { $(APT) update -qq && $(APT) install -y -qq nats-server; }

demo: install
	$(VENV)/bin/sensord demo

# Lint and types first: a style, import or type error fails CI in seconds, before the slow suite.
test: install-test lint typecheck
	$(PY) -m pytest -q

lint: install-test
	$(VENV)/bin/ruff check sensord tests bench deploy

# mypy's settings (and the paths it checks) are in pyproject.toml.
typecheck: install-test
	$(VENV)/bin/mypy

# Neither the end-to-end tests (a real broker) nor the ones that train a model; autoencoder.py has no
# doctests and importing it imports TensorFlow.
test-fast: install-test
	$(PY) -m pytest -q -m "not e2e and not training" --ignore=sensord/autoencoder.py

bench: install
	$(VENV)/bin/sensord bench skab --data ../shared/datasets/skab/data --json out/skab.json

clean:
	rm -rf $(VENV) build *.egg-info
