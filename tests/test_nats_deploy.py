"""The shipped scale-out files (deploy/nats/, systemd/sensord@.service's configs) check clean with the tools
that will read them: nats-server's config test, promtool for the Prometheus config and the partition rules
(with their unit tests), and sensord's own check-config for every instance config."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml
from e2e_support import ROOT, binary
from nats_cluster import NATS_DEPLOY, nats_server


def test_nats_node_configs_are_valid_and_map_to_as_many_partitions_as_instances() -> None:
    for i in (1, 2, 3):
        res = subprocess.run([nats_server(), "-c", str(NATS_DEPLOY / f"node-{i}.conf"), "-t"], capture_output=True,
                             text=True, timeout=30, cwd=NATS_DEPLOY)
        assert res.returncode == 0 and "valid" in res.stdout + res.stderr, res.stdout + res.stderr
    (count,) = re.findall(r"partition\((\d+),1\)", (NATS_DEPLOY / "partitions.conf").read_text())
    configs = sorted(NATS_DEPLOY.glob("sensord-*.yaml"))
    assert len(configs) == int(count)
    owned = []
    for path in configs:
        doc = yaml.safe_load(path.read_text())
        (sub,) = doc["mqtt"]["subscriptions"]  # one partition each (nats-server 2.9, see partitions.conf)
        owned.append(int(re.fullmatch(r"part/(\d+)/sensors/\+/telemetry", sub["topic"]).group(1)))
        assert doc["mqtt"]["protocol"] == "3.1.1"
    assert sorted(owned) == list(range(int(count)))
    ids = [yaml.safe_load(p.read_text())["mqtt"]["client_id"] for p in configs]
    assert len(set(ids)) == len(ids)


def test_promtool_accepts_the_scale_out_config_and_its_rules_pass_their_tests() -> None:
    promtool = binary("promtool")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts.test.yml"]):
        res = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=NATS_DEPLOY)
        assert res.returncode == 0 and "SUCCESS" in res.stdout + res.stderr, res.stdout + res.stderr


def test_every_instance_config_passes_check_config(tmp_path: Path) -> None:
    for path in sorted(NATS_DEPLOY.glob("sensord-*.yaml")):
        res = subprocess.run([sys.executable, "-m", "sensord", "check-config", "--config", str(path)],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert res.returncode == 0, res.stdout + res.stderr
