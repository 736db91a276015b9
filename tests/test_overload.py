"""A cloud that falls behind is not sent every event twice (issue 17, "no re-send storm").

A real `kgpu edge run` against a real mosquitto; this test plays the cloud with a bare MQTT link,
so that it decides when each ack goes out and what it says. The edge waits `resend_wait` (its
`ack_timeout`, plus twice how far behind its last ack showed the cloud to be: the ack's `behind_s`,
or how late the ack came) before it sends unacked events again; acks without `behind_s` (what an
older controller writes) still work. Speed lives in bench/overload.py; here only lower bounds on
when a re-send arrives are asserted, which a slow machine can only make longer.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.sync import ACK_LAG_HEADROOM, resend_wait
from kgpu.lab.broker import Mosquitto
from kgpu.lab.processes import wait_for
from shared.mqtt import MqttLink, Received, parse_broker_url
from shared.protocol import AckBody, Kind, make_envelope
from shared.topics import cloud_topic, edge_topic
from tests.helpers.edge_process import BUSY_POLICY, EdgeProcess, outbox_depth

NODE = "edge-slow"
ACK_TIMEOUT_S = 3.0
BEHIND_S = 5.0
LATE_S = 6.0


def test_resend_wait_grows_with_the_lag_and_is_capped() -> None:
    assert resend_wait(15.0, 0.0, 120.0) == 15.0
    assert resend_wait(15.0, 10.0, 120.0) == 15.0 + ACK_LAG_HEADROOM * 10.0
    assert resend_wait(15.0, 3600.0, 120.0) == 120.0
    assert resend_wait(15.0, 3600.0, 5.0) == 15.0  # a cap below ack_timeout never shortens it


def test_behind_s_is_written_only_when_set() -> None:
    """An edge older than the field refuses an ack that has it: it is left out unless above 0."""
    for behind in (None, 0.0):
        assert "behind_s" not in json.loads(AckBody(upto=3, epoch="e", behind_s=behind).model_dump_json())
    assert json.loads(AckBody(upto=3, epoch="e", behind_s=2.5).model_dump_json())["behind_s"] == 2.5


class SlowCloud:
    """The cloud's side of the ack protocol, by hand: every event arrival recorded (seq, when),
    and acks sent only when told (`auto` acks each contiguous arrival at once)."""

    def __init__(self, url: str) -> None:
        self.lock = threading.Lock()
        self.arrivals: list[tuple[int, float]] = []  # (seq, monotonic time of arrival)
        self.first_seen: dict[int, float] = {}
        self.epoch: str | None = None
        self.auto = True
        self.acks_sent: list[bytes] = []
        self.link = MqttLink(parse_broker_url(url), "slow-cloud", clean_session=True, on_message=self._on_message,
                             subscriptions=[(edge_topic(NODE, "events"), 1), (edge_topic(NODE, "status"), 1)])

    def _on_message(self, message: Received) -> None:
        envelope = json.loads(message.payload)
        if message.topic.endswith("/status"):
            self.epoch = envelope["body"].get("outbox_epoch") or self.epoch
            return
        seq, now = envelope["seq"], time.monotonic()
        with self.lock:  # held while acking too: no automatic ack can follow `hold`'s ack
            self.arrivals.append((seq, now))
            self.first_seen.setdefault(seq, now)
            if self.auto:
                self._ack(self._contiguous())

    def _contiguous(self) -> int:
        upto = 0
        while upto + 1 in self.first_seen:
            upto += 1
        return upto

    def contiguous(self) -> int:
        """The highest seq with every seq up to it received."""
        with self.lock:
            return self._contiguous()

    def _ack(self, upto: int, behind_s: float | None = None) -> None:
        payload = make_envelope(NODE, AckBody(upto=upto, epoch=self.epoch, behind_s=behind_s), Kind.ACK).to_json()
        self.acks_sent.append(payload)
        assert self.link.publish(cloud_topic(NODE, "ack"), payload, qos=1)

    def hold(self, behind_s: float) -> tuple[int, float]:
        """Ack what arrived, saying the cloud is `behind_s` behind, then ack nothing more; the
        seq acked and when (before the ack went out)."""
        with self.lock:
            self.auto = False
            upto, at = self._contiguous(), time.monotonic()
            self._ack(upto, behind_s)
            return upto, at

    def ack_late(self, seq: int) -> float:
        """Ack up to `seq` as an older controller writes it (no behind_s), `LATE_S` after it arrived;
        when the ack went out."""
        time.sleep(max(0.0, self.first_seen[seq] + LATE_S - time.monotonic()))  # the lateness itself
        with self.lock:
            at = time.monotonic()
            self._ack(seq)
            return at

    def release(self) -> None:
        """Ack everything that arrived, and every arrival from now on."""
        with self.lock:
            self.auto = True
            self._ack(self._contiguous())

    def resends_after(self, since: float, above: int) -> list[tuple[int, float]]:
        """Arrivals after `since` of a seq above `above` that had arrived before (the edge sent it
        again)."""
        with self.lock:
            return [(seq, at) for seq, at in self.arrivals if at > since and seq > above and self.first_seen[seq] < at]


@pytest.fixture
def slow_cloud(broker: Mosquitto) -> Iterator[SlowCloud]:
    cloud = SlowCloud(broker.url)
    cloud.link.start()
    assert cloud.link.connected.wait(20)
    yield cloud
    cloud.link.stop()


@pytest.fixture
def edge(tmp_path: Path, broker: Mosquitto) -> Iterator[EdgeProcess]:
    config = {**BUSY_POLICY, "ack_timeout": ACK_TIMEOUT_S, "ack_timeout_max": 60}
    process = EdgeProcess(tmp_path / "edge", node=NODE, mqtt=broker.url, config=config).start()
    yield process
    if process.proc is not None and process.proc.poll() is None:
        process.proc.kill()
        process.proc.wait()


class Churn:
    """Utilisation across the policy's threshold (at most twice a second): a decision, that is an
    event, nearly every cycle of the edge."""

    def __init__(self, edge: EdgeProcess) -> None:
        self.edge = edge
        self.utilization = 0
        self.last = 0.0

    def __call__(self) -> None:
        if time.monotonic() - self.last < 0.5:
            return
        self.last = time.monotonic()
        self.utilization = 100 - self.utilization
        for gpu in (0, 1):
            self.edge.inject(gpu, utilization=self.utilization)


@pytest.mark.slow
def test_edge_waits_longer_for_a_cloud_that_says_it_is_behind(edge: EdgeProcess, slow_cloud: SlowCloud) -> None:
    churn = Churn(edge)

    # 1. acks as an older controller writes them (no behind_s) are applied
    def acked_some() -> bool:
        churn()
        return slow_cloud.contiguous() >= 3 and edge.metric("kgpu_outbox_acked_seq") >= 3

    wait_for(acked_some, timeout=60, what="the edge to send events and apply the plain acks")
    assert all(b"behind_s" not in payload for payload in slow_cloud.acks_sent)

    # 2. the cloud falls behind: it acks what it has, says it is BEHIND_S behind, then acks nothing
    held, acked_at = slow_cloud.hold(BEHIND_S)

    # 3. an ack comes LATE_S late, without behind_s (an older controller): its lateness is the signal
    def next_arrived() -> bool:
        churn()
        return slow_cloud.contiguous() > held

    wait_for(next_arrived, timeout=60, what="an event after the held ack")
    late_acked_at = slow_cloud.ack_late(held + 1)

    def resent() -> bool:
        churn()  # events keep coming, so that some wait unacked
        return bool(slow_cloud.resends_after(acked_at, held))

    wait_for(resent, timeout=120, what="the edge to send unacked events again at last")
    first_seq, first_at = slow_cloud.resends_after(acked_at, held)[0]
    # Without either signal the edge sends again about ACK_TIMEOUT_S after the first unacked event
    # went out. With behind_s, not before resend_wait(.., BEHIND_S, ..) (13 s); after the late ack,
    # not before resend_wait(.., LATE_S, ..) (15 s). Less a second each: an event already on its
    # way when an ack went out started the edge's clock a moment before it.
    assert first_seq > held + 1, "what the cloud acked is not sent again"
    assert first_at - acked_at >= resend_wait(ACK_TIMEOUT_S, BEHIND_S, 60.0) - 1.0, (
        f"seq {first_seq} sent again {first_at - acked_at:.1f} s after an ack that said the cloud was "
        f"{BEHIND_S} s behind")
    assert first_at - late_acked_at >= resend_wait(ACK_TIMEOUT_S, LATE_S, 60.0) - 1.0, (
        f"seq {first_seq} sent again {first_at - late_acked_at:.1f} s after an ack that came {LATE_S} s late")

    # 4. the cloud catches up: everything is acked, nothing is left in the outbox
    slow_cloud.release()
    wait_for(lambda: slow_cloud.contiguous() > held and outbox_depth(edge) == 0, timeout=60,
             what="the edge's outbox to empty once the cloud acks again")
