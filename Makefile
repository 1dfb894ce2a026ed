# Two entry points for a fresh machine (see README):
#   make demo  - install, train on simulated data, run the daemon against a private broker, show alerts
#   make test  - install everything the tests need (Python packages, mosquitto, systemd-analyze) and run them
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install install-test system-deps bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY) system-deps
	$(PY) -m pip install --quiet -e '.[train]'

install-test: $(PY) system-deps
	$(PY) -m pip install --quiet -e '.[test]'

# The broker the demo and the end-to-end tests start privately (mosquitto_passwd comes with it),
# systemd-analyze for the unit test, openssl for the TLS test's throwaway certificates, and a real
# Prometheus (with promtool) that scrapes the daemon and checks the shipped scrape config and rules.
system-deps:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq mosquitto mosquitto-clients; }
	@command -v systemd-analyze >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq systemd; }
	@command -v openssl >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq openssl; }
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq prometheus; }

demo: install
	$(VENV)/bin/sensord demo

test: install-test
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/sensord bench skab --data ../shared/datasets/skab/data --json bench/skab-latest.json

clean:
	rm -rf $(VENV) build *.egg-info
