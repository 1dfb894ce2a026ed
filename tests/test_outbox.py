"""Tests for sensord.outbox: alerts on disk until acknowledged, replayed in order, bounded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sensord.metrics import DaemonMetrics
from sensord.outbox import Outbox


class Info:
    def __init__(self) -> None:
        self.acked = False

    def is_published(self) -> bool:
        return self.acked


class Client:
    """Records publishes; nothing is acknowledged until the test says so."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, int]] = []
        self.infos: list[Info] = []

    def publish(self, topic: str, payload: str, qos: int = 0, retain: bool = False) -> Any:
        self.sent.append((topic, payload, qos))
        self.infos.append(Info())
        return self.infos[-1]


def value(m: DaemonMetrics, name: str) -> float:
    v = m.registry.get_sample_value(name)
    assert v is not None
    return v


def test_alert_stays_on_disk_until_acknowledged(tmp_path: Path) -> None:
    m, c = DaemonMetrics(), Client()
    box = Outbox(c, tmp_path / "outbox", 10, m)
    box.send("a/alerts/p1", '{"n": 1}')
    box.send("a/alerts/p1", '{"n": 2}')
    assert c.sent == [("a/alerts/p1", '{"n": 1}', 1), ("a/alerts/p1", '{"n": 2}', 1)]
    assert len(list((tmp_path / "outbox").iterdir())) == 2 and value(m, "sensord_outbox_depth") == 2
    c.infos[0].acked = True
    assert box.sweep() == 1
    (left,) = (tmp_path / "outbox").iterdir()
    assert json.loads(left.read_text()) == {"topic": "a/alerts/p1", "payload": '{"n": 2}'}
    c.infos[1].acked = True
    assert box.sweep() == 0 and value(m, "sensord_outbox_depth") == 0
    assert list((tmp_path / "outbox").iterdir()) == []


def test_next_start_sends_what_is_left_first_and_in_order(tmp_path: Path) -> None:
    first = Outbox(Client(), tmp_path, 100, DaemonMetrics())
    for n in range(12):  # more than 9, so the order must not be by name length or text
        first.send("t", json.dumps({"n": n}))
    (tmp_path / "junk.txt").write_text("ignored")
    (tmp_path / "0000000000000099.json").write_text("{broken")
    c, m = Client(), DaemonMetrics()
    second = Outbox(c, tmp_path, 100, m)
    assert second.replay() == 12
    assert [json.loads(p)["n"] for _, p, _ in c.sent] == list(range(12))
    second.send("t", json.dumps({"n": "new"}))  # after the replayed ones, with a later sequence number
    assert json.loads(c.sent[-1][1]) == {"n": "new"}
    assert sorted(p.name for p in tmp_path.glob("*.json"))[-1] == "0000000000000100.json"  # 99 was broken
    for info in c.infos:
        info.acked = True
    assert second.sweep() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.txt"]


def test_full_outbox_gives_up_the_oldest_and_counts_it(tmp_path: Path) -> None:
    m, c = DaemonMetrics(), Client()
    box = Outbox(c, tmp_path, 3, m)
    for n in range(5):
        box.send("t", str(n))
    assert value(m, "sensord_outbox_dropped_total") == 2
    assert value(m, "sensord_outbox_depth") == 3
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == [
        json.dumps({"topic": "t", "payload": str(n)}) for n in (2, 3, 4)]


def test_unwritable_outbox_still_sends_and_counts(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    m, c = DaemonMetrics(), Client()
    box = Outbox(c, blocker / "outbox", 10, m)
    box.send("t", "1")
    assert c.sent == [("t", "1", 1)]
    assert value(m, "sensord_state_save_failures_total") == 1
    c.infos[0].acked = True
    assert box.sweep() == 0


def test_without_a_directory_it_only_tracks(tmp_path: Path) -> None:
    c = Client()
    box = Outbox(c, None, 10, DaemonMetrics())
    box.send("t", "1")
    assert box.depth == 1 and box.replay() == 0


def test_a_publish_queued_while_disconnected_counts_once_paho_has_it_acknowledged() -> None:
    import paho.mqtt.client as mqtt

    from sensord.outbox import acknowledged

    info = mqtt.MQTTMessageInfo(7)
    info.rc = mqtt.MQTT_ERR_NO_CONN  # what publish() returns while the broker is unreachable
    assert acknowledged(info) is False
    info._set_as_published()  # the PUBACK after the reconnect
    assert acknowledged(info) is True
    assert acknowledged(None) is True


def test_before_publish_runs_with_the_alert_on_disk_and_not_yet_sent(tmp_path: Path) -> None:
    c = Client()
    box = Outbox(c, tmp_path, 10, DaemonMetrics())
    seen: list[tuple[int, int]] = []
    box.send("t", "1", lambda: seen.append((len(list(tmp_path.iterdir())), len(c.sent))))
    assert seen == [(1, 0)] and len(c.sent) == 1
