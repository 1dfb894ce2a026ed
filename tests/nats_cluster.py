"""A private three-node NATS cluster (JetStream + MQTT gateway + the partition mapping) from the shipped
``deploy/nats/`` files, on free loopback ports, for the scale-out end-to-end test.

The shipped node configs are used as they are except for what must differ on a test machine: every
``127.0.0.1:<port>`` becomes a free port (consistently across the three files, so the routes still meet)
and the JetStream store goes to a temporary directory.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
import pytest
from e2e_support import ROOT, free_port, stop_process

NATS_DEPLOY = ROOT / "deploy" / "nats"
NODES = 3


def nats_server() -> str:
    path = shutil.which("nats-server") or next((p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server")
                                                 if Path(p).exists()), None)
    if path is None:
        pytest.fail("nats-server not found: install it (Debian: apt-get install -y nats-server; `make test` "
                    "does)", pytrace=False)
    return path


class Endpoint:
    """Host and port of one node's MQTT listener, shaped like a broker for the test helpers."""

    host = "127.0.0.1"

    def __init__(self, port: int) -> None:
        self.port = port


class NatsCluster:
    """``with NatsCluster(tmp) as c:`` starts the three nodes and returns once MQTT works across them."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "nats"
        self.dir.mkdir()
        shutil.copy(NATS_DEPLOY / "partitions.conf", self.dir / "partitions.conf")
        texts = [(NATS_DEPLOY / f"node-{i}.conf").read_text() for i in range(1, NODES + 1)]
        ports = sorted({int(p) for t in texts for p in re.findall(r"127\.0\.0\.1:(\d+)", t)})
        self.port_map = {p: free_port() for p in ports}
        self.mqtt: list[Endpoint] = []
        self.http: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.configs: list[Path] = []
        self._logs: list[IO[bytes]] = []
        for i, text in enumerate(texts, start=1):
            text = re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{self.port_map[int(m.group(1))]}", text)
            text, n = re.subn(r'store_dir: "[^"]*"', f'store_dir: "{self.dir / f"js-{i}"}"', text)
            assert n == 1, f"node-{i}.conf: no jetstream store_dir"
            self.mqtt.append(Endpoint(int(re.search(r"mqtt \{\s*listen: 127\.0\.0\.1:(\d+)", text).group(1))))
            self.http.append(int(re.search(r"^http: 127\.0\.0\.1:(\d+)", text, re.M).group(1)))
            path = self.dir / f"node-{i}.conf"
            path.write_text(text)
            self.configs.append(path)

    def __enter__(self) -> NatsCluster:
        binary = nats_server()
        for i, path in enumerate(self.configs, start=1):
            log = open(self.dir / f"node-{i}.log", "wb")
            self._logs.append(log)
            self.procs.append(subprocess.Popen([binary, "-c", str(path)], stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, cwd=self.dir))
        try:
            self._wait_ready(90.0)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)
        for log in self._logs:
            log.close()

    def logs(self) -> str:
        return "\n".join(f"--- node-{i}\n" + (self.dir / f"node-{i}.log").read_text(errors="replace")[-2000:]
                         for i in range(1, NODES + 1))

    def _healthy(self, i: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http[i]}/healthz", timeout=2) as resp:
                return bool(json.loads(resp.read()).get("status") == "ok")
        except (urllib.error.URLError, ConnectionError, ValueError):
            return False

    def _wait_ready(self, timeout: float) -> None:
        """Every node healthy (JetStream up), then one message through the mapping from node 1 to node 3."""
        deadline = time.monotonic() + timeout
        while not all(self._healthy(i) for i in range(NODES)):
            for i, proc in enumerate(self.procs, start=1):
                if proc.poll() is not None:
                    raise AssertionError(f"nats-server node-{i} exited {proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"NATS cluster not healthy within {timeout} s:\n{self.logs()}")
            time.sleep(0.2)
        while True:
            try:
                self._probe()
                return
            except AssertionError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"MQTT through the NATS cluster does not work: {exc}\n{self.logs()}") from None
                time.sleep(0.5)

    def _probe(self) -> None:
        got = threading.Event()
        subscribed = threading.Event()
        sub = client(self.mqtt[2])
        sub.on_message = lambda c, u, m: got.set()
        sub.on_subscribe = lambda c, u, mid, rcs, props: subscribed.set() if not rcs[0].is_failure else None
        pub = client(self.mqtt[0])
        try:
            sub.subscribe("part/+/sensors/+/telemetry", qos=1)
            assert subscribed.wait(5), "no SUBACK"
            device = f"probe-{uuid.uuid4().hex[:6]}"
            pub.publish(f"sensors/{device}/telemetry", b"{}", qos=1).wait_for_publish(5)
            assert got.wait(5), "a reading published on node 1 did not reach a partition subscriber on node 3"
        finally:
            for c in (sub, pub):
                c.disconnect()
                c.loop_stop()


def client(endpoint: Endpoint, **kwargs: Any) -> mqtt.Client:
    """A connected MQTT 3.1.1 client (NATS's gateway speaks 3.1.1) with its network thread running."""
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                    client_id=f"t-{uuid.uuid4().hex[:10]}", **kwargs)
    connected = threading.Event()
    c.on_connect = lambda cl, u, f, rc, p: connected.set() if not rc.is_failure else None
    try:
        c.connect(endpoint.host, endpoint.port, keepalive=30)
    except OSError as exc:
        raise AssertionError(f"cannot connect to {endpoint.port}: {exc}") from None
    c.loop_start()
    if not connected.wait(5):
        c.loop_stop()
        raise AssertionError(f"no CONNACK from {endpoint.port}")
    return c
