"""Scale-out end to end (README, "Scaling out"): three sensord instances behind a three-node NATS cluster
built from the shipped ``deploy/nats/`` files, the shipped per-instance configs, 30 devices published to
different nodes.

Checked: every device is scored by exactly one instance, every window exactly once, and the alerts are
the ones ``sensord evaluate`` finds on each device's stream (a single daemon gives the same: see
test_daemon_e2e's parity test); one instance stopped while readings keep coming: the others never stop,
its partitions' readings wait in JetStream and are scored after its restart, nothing lost, nothing twice.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from broker import MqttRecorder
from e2e_support import (
    TINY_DETECTOR,
    TINY_WINDOW,
    DaemonProcess,
    QosPublisher,
    free_port,
    merge,
    stop_process,
    wait_until,
)
from nats_cluster import NATS_DEPLOY, Endpoint, NatsCluster, client, nats_server
from test_daemon_e2e import FAULT_START, FAULT_STOP, Models, with_step
from test_daemon_e2e import models as models

from sensord.dataio import Series

pytestmark = pytest.mark.e2e

INSTANCES = 3
DEVICES = [f"dev{i:02d}" for i in range(30)]
FAULTY = set(DEVICES[::5])  # six devices get a fault; their alerts must be the offline ones
ROWS = 300
SPLIT = FAULT_START  # rows [0, SPLIT) with every instance up; the rest while one is stopped
W = TINY_WINDOW


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path) as c:
        yield c


def instance_doc(k: int, cluster: NatsCluster, bundle: Path, tmp: Path) -> dict[str, Any]:
    """deploy/nats/sensord-k.yaml as shipped, with this test's ports, bundle and state directory."""
    doc = yaml.safe_load((NATS_DEPLOY / f"sensord-{k}.yaml").read_text())
    return merge(doc, {
        "window": {"length": W}, "detector": TINY_DETECTOR,
        "mqtt": {"port": cluster.mqtt[k].port, "keepalive": 5, "publish_scores": True},
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "daemon": {"model": str(bundle), "state_dir": str(tmp / f"state-{k}")},
        "logging": {"level": "INFO"},
    })


def publish(cluster: NatsCluster, streams: dict[str, Series], start: int, stop: int) -> None:
    """Rows [start, stop) of every device; device i through node i % 3, the three nodes in parallel."""
    def node(n: int) -> None:
        pub = QosPublisher(cluster.mqtt[n])  # type: ignore[arg-type]  # host/port is all it reads
        try:
            for i in range(start, stop):
                for device in DEVICES[n::INSTANCES]:
                    s = streams[device]
                    body = {"ts": float(s.timestamps[i]),
                            "values": {ch: float(s.values[i, j]) for j, ch in enumerate(s.channels)}}
                    pub.send_raw(f"sensors/{device}/telemetry", json.dumps(body))
        finally:
            pub.close()
    threads = [threading.Thread(target=node, args=(n,)) for n in range(INSTANCES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "publishing did not finish"


def scored(d: DaemonProcess) -> dict[str, float]:
    return {dict(labels)["device"]: v for (name, labels), v in d.metrics().items()
            if name == "sensord_windows_scored_total"}


def test_three_instances_split_the_devices_score_every_window_once_and_survive_a_restart(
        cluster: NatsCluster, models: Models, tmp_path: Path) -> None:
    healthy = models.labelled.slice(0, ROWS)
    streams = {d: with_step(healthy, FAULT_START, FAULT_STOP) if d in FAULTY else healthy for d in DEVICES}
    rec = MqttRecorder(cluster.mqtt[1].host, cluster.mqtt[1].port, "sensord/#").start()
    docs = [instance_doc(k, cluster, models.bundle, tmp_path) for k in range(INSTANCES)]
    daemons: list[DaemonProcess] = []
    try:
        for k, doc in enumerate(docs):
            daemons.append(DaemonProcess(tmp_path, f"sensord-{k}", doc))
        for k, d in enumerate(daemons):
            d.wait_metrics_up()
            status = f"sensord/status/sensord-{k}"
            rec.wait_for(lambda m, t=status: m.topic == t and m.payload == b"online", timeout=30)
            for sub in doc_filters(docs[k]):
                d.wait_metric("sensord_mqtt_subscribed", 1, filter=sub)

        # 1. Everyone up: each device lands on exactly one instance.
        publish(cluster, streams, 0, SPLIT)
        first = SPLIT - W + 1

        def owners() -> dict[str, list[int]]:
            out: dict[str, list[int]] = {dev: [] for dev in DEVICES}
            for k, d in enumerate(daemons):
                for dev, n in scored(d).items():
                    if n:
                        out[dev].append(k)
            return out
        wait_until(lambda: sum(sum(scored(d).values()) for d in daemons) == first * len(DEVICES), 60,
                   "every window of the first part")
        owner = owners()
        assert all(len(ks) == 1 for ks in owner.values()), owner
        by_instance = Counter(ks[0] for ks in owner.values())
        assert set(by_instance) == set(range(INSTANCES)), by_instance  # all three take part
        before = [scored(d) for d in daemons]

        # 2. Instance 1 stops (systemctl stop: SIGTERM, windows saved); readings keep coming for everyone.
        assert daemons[1].terminate() == 0, daemons[1].log()
        publish(cluster, streams, SPLIT, ROWS)
        total = ROWS - W + 1
        for k in (0, 2):  # the others never stop
            mine = [dev for dev, ks in owner.items() if ks == [k]]
            daemons[k].wait_metric("sensord_mqtt_connected", 1)
            wait_until(lambda k=k, mine=mine: all(scored(daemons[k]).get(dev) == total for dev in mine), 60,
                       f"instance {k}'s devices scored while instance 1 is down")

        # 3. Instance 1 back with the same config: its partitions' readings waited in JetStream.
        daemons[1] = DaemonProcess(tmp_path, "sensord-1-again", docs[1])
        daemons[1].wait_metrics_up()
        mine = [dev for dev, ks in owner.items() if ks == [1]]
        try:
            wait_until(lambda: all(before[1][dev] + scored(daemons[1]).get(dev, 0) == total for dev in mine), 60,
                       "instance 1's devices scored after its restart")
        except AssertionError:
            after = scored(daemons[1])
            raise AssertionError(f"windows per device, want {total}: "
                                 f"{ {dev: before[1][dev] + after.get(dev, 0) for dev in mine} }; rejected "
                                 f"{ {k: v for k, v in daemons[1].metrics().items() if 'rejected' in k[0] and v} }"
                                 ) from None

        # Every window exactly once: counters add up, and no window end was published twice.
        for dev in DEVICES:
            k = owner[dev][0]
            n = before[k][dev] + scored(daemons[k])[dev] if k == 1 else scored(daemons[k])[dev]
            assert n == total, (dev, k, n)
        for dev in DEVICES:
            ends = [json.loads(m.payload)["window_end"] for m in rec.messages(f"sensord/scores/{dev}")]
            assert len(ends) == len(set(ends)), f"{dev}: a window scored twice"

        # Alerts: exactly what `sensord evaluate` finds on each device's stream.
        for dev in DEVICES:
            want = models.offline_alerts(streams[dev], dev)
            if dev in FAULTY:
                assert want, f"{dev}: the injected fault raises no alert offline"
            n = len(want)
            wait_until(lambda dev=dev, n=n: len(rec.messages(f"sensord/alerts/{dev}")) >= n, 20, f"{dev}'s alerts")
            got = [(a["state"], a["window_end"])
                   for a in (json.loads(m.payload) for m in rec.messages(f"sensord/alerts/{dev}"))]
            assert got == want, (dev, owner[dev])
    finally:
        for d in daemons:
            d.stop()
        rec.stop()


def doc_filters(doc: dict[str, Any]) -> list[str]:
    return [s if isinstance(s, str) else s["topic"] for s in doc["mqtt"]["subscriptions"]]


def test_a_subscription_the_broker_refuses_is_logged_and_shows_in_the_metric(
        models: Models, tmp_path: Path) -> None:
    """A NATS account that may not read one of sensord's topic filters: the broker refuses that subscription
    (SUBACK failure). It must not look like a quiet plant: an ERROR naming the filter, and
    sensord_mqtt_subscribed 0 for it while the other filter is 1 and its devices are scored."""
    port, mqtt_port = free_port(), free_port()
    conf = tmp_path / "acl.conf"
    conf.write_text(f"""server_name: acl
listen: 127.0.0.1:{port}
jetstream {{ store_dir: "{tmp_path / 'js'}" }}
accounts {{ A: {{ jetstream: enabled, users: [
  {{user: sensord, password: pw, permissions: {{subscribe: {{deny: ["forbidden.>"]}}}}}}
] }} }}
no_auth_user: sensord
mqtt {{ listen: 127.0.0.1:{mqtt_port} }}
""")
    proc = subprocess.Popen([nats_server(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d: DaemonProcess | None = None
    try:
        node = Endpoint(mqtt_port)
        wait_until(lambda: can_connect(node), 30, "NATS's MQTT listener")
        forbidden = "forbidden/+/telemetry"
        doc = merge(instance_doc(0, cluster_like(node), models.bundle, tmp_path), {"mqtt": {"subscriptions": [
            {"topic": "sensors/+/telemetry", "device_topic": "sensors/{device}/telemetry"},
            {"topic": forbidden, "device_topic": "forbidden/{device}/telemetry"}]}})
        d = DaemonProcess(tmp_path, "sensord", doc)
        d.wait_metrics_up()
        d.wait_metric("sensord_mqtt_subscribed", 1, timeout=30, filter="sensors/+/telemetry")
        d.wait_metric("sensord_mqtt_subscribed", 0, filter=forbidden)
        line = d.wait_log("refused the subscription")
        assert "ERROR" in line and forbidden in line
        publish_rows(node, "pump9", models.labelled.slice(0, 20))
        d.wait_metric("sensord_windows_scored_total", 20 - W + 1, device="pump9")
    finally:
        if d is not None:
            d.stop()
        stop_process(proc)


def can_connect(node: Endpoint) -> bool:
    try:
        client(node).disconnect()
        return True
    except AssertionError:
        return False


def cluster_like(node: Endpoint) -> NatsCluster:
    """Something with the one ``mqtt`` list instance_doc reads, for a single node."""
    c = NatsCluster.__new__(NatsCluster)
    c.mqtt = [node]
    return c


def publish_rows(node: Endpoint, device: str, series: Series) -> None:
    pub = QosPublisher(node)  # type: ignore[arg-type]  # host/port is all it reads
    try:
        for i in range(len(series)):
            body = {"ts": float(series.timestamps[i]),
                    "values": {ch: float(series.values[i, j]) for j, ch in enumerate(series.channels)}}
            pub.send_raw(f"sensors/{device}/telemetry", json.dumps(body))
    finally:
        pub.close()
