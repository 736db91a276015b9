"""Quarantine at the broker (cloud/quarantine.py): a runaway node is shut out by mosquitto's
dynamic-security plugin, released when its time is up, also by a controller that restarted
meanwhile; honest nodes are never touched, and without an admin login a runaway is reported.

The broker is a real mosquitto with the shipped ACL and the dynamic-security plugin; the
controller a real `kgpu cloud run`; the flooder a paho client publishing valid telemetry as fast
as it can, as one node's stolen or runaway login would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud.budget import Budget, BudgetLimits, NodeBudgets
from cloud.quarantine import QUARANTINE_MARK, QuarantineRules, due, parse_mark, quarantine_seconds
from kgpu.lab.broker import Mosquitto, dynsec_plugin, mosquitto_binary
from kgpu.lab.processes import wait_for
from shared.gpu import GpuSample
from shared.protocol import Kind, TelemetryBody, make_envelope
from shared.topics import edge_topic
from tests.helpers.cli import run_kgpu
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.dynsec import NOT_AUTHORISED, connack
from tests.helpers.shipped_broker import SHIPPED_ACL

# ---- the decisions (pure) -----------------------------------------------------------------------


def test_a_node_refused_thousands_of_times_a_second_is_a_runaway_once_per_episode() -> None:
    budgets = NodeBudgets(BudgetLimits(messages_per_second=10, burst_s=1, runaway_drops_per_second=500))
    runaways = [i for i in range(3000) if budgets.admit("flood", 100, event=False, status=False,
                                                        now=100.0 + i / 3000).runaway]
    assert len(runaways) == 1  # reported once, not once per refusal
    assert 500 <= runaways[0] <= 520  # at the 500th refusal within the second (after the burst of 10)
    # the same node later in the same episode is not reported again, and is refused everything but
    # its status, even where its budgets have refilled
    later = [budgets.admit("flood", 100, event=event, status=False, now=101.5 + i) for i, event in
             enumerate((False, True) * 1000)]
    assert not any(v.runaway for v in later) and {v.refused for v in later} == {Budget.RUNAWAY}
    assert budgets.flags == {"flood": "runaway"}
    assert budgets.admit("flood", 100, event=False, status=True, now=2000.0).refused is None
    assert budgets.admit("honest", 100, event=True, status=False, now=2000.0).refused is None
    # once it has been back within budget (flag cleared), it is admitted again, and a new flood is
    # a new runaway
    assert budgets.sweep(3000.0) == ["flood"]
    assert budgets.admit("flood", 100, event=False, status=False, now=3000.0).refused is None
    assert any(budgets.admit("flood", 100, event=False, status=False, now=3000.0 + i / 5000).runaway
               for i in range(3000))


def test_an_edge_catching_up_a_long_outage_is_paced_never_a_runaway() -> None:
    """The default budget against an honest edge (edge/sync.py: a window of 1,000 unacked events,
    re-sent from the first unacked after the ack timeout) with a million events to deliver."""
    budgets = NodeBudgets(BudgetLimits())
    budgets.note_ack("edge", 0)
    now, acked, runaways, refusals, ahead = 0.0, 0, 0, 0, 0
    stored: set[int] = set()
    while acked < 1_000_000 and now < 3 * 3600:
        highest = min(1_000_000, acked + 1000)
        for seq in range(acked + 1, highest + 1):
            if seq in stored:
                continue
            at = now + (seq - acked) / 50_000
            verdict = budgets.admit("edge", 400, event=True, status=False, now=at)
            if verdict.refused is None:
                verdict = budgets.admit_seq("edge", seq, at)
                ahead += verdict.refused is Budget.AHEAD
            runaways += verdict.runaway
            budgets.release("edge")  # written, or refused after admission
            if verdict.refused is None:
                stored.add(seq)
            else:
                refusals += 1
        while acked + 1 in stored:
            acked += 1
        budgets.note_ack("edge", acked)  # published after the commit
        now += 0.05 if acked == highest else 5.0  # the re-send wait (ack_timeout) at its shortest
    assert acked == 1_000_000 and refusals > 0  # paced by the budget, delivered in full
    assert runaways == 0 and ahead == 0  # never further past its ack than its window


def test_events_far_past_the_last_ack_are_refused_and_a_flood_of_them_is_a_runaway_at_once() -> None:
    budgets = NodeBudgets(BudgetLimits(events_ahead=2000))
    assert budgets.admit_seq("n", 10**9, 0.0).refused is None  # no ack published yet: not judged
    budgets.note_ack("n", 100)
    assert budgets.admit_seq("n", 2100, 0.0).refused is None
    assert budgets.admit_seq("n", 2101, 0.0).refused is Budget.AHEAD
    # a flood read past its ack: refused from the 2,001st event on, a runaway 2,000 refusals later
    budgets.note_ack("flood", 0)
    verdicts = [budgets.admit_seq("flood", seq, 1.0 + seq / 10_000) for seq in range(1, 6001)]
    refused = [i for i, v in enumerate(verdicts) if v.refused is not None]
    assert refused[0] == 2000
    assert [i for i, v in enumerate(verdicts) if v.runaway] == [3999]
    # an honest edge ahead of this controller's acks (a fleet database restored behind it): its
    # window refused once per re-send, never a runaway
    budgets.note_ack("restored", 0)
    for attempt in range(20):
        at = 100.0 + attempt * 5.0
        assert not any(budgets.admit_seq("restored", seq, at + (seq - 50_000) / 10_000).runaway
                       for seq in range(50_001, 51_001))
    assert budgets.flags["restored"] == "events_ahead"


def test_a_repeat_runaway_is_shut_out_longer_each_time_up_to_the_maximum() -> None:
    rules = QuarantineRules(first_s=300.0, max_s=3600.0)
    assert [quarantine_seconds(rules, n) for n in range(6)] == [300.0, 600.0, 1200.0, 2400.0, 3600.0, 3600.0]
    assert quarantine_seconds(rules, 10_000) == 3600.0
    assert due({"a": 10.0, "b": 30.0, "c": 20.0}, 20.0) == ["a", "c"]
    assert parse_mark(f"{QUARANTINE_MARK}1700000000") == 1_700_000_000.0
    assert parse_mark("Dynsec admin user") is None and parse_mark(None) is None
    assert parse_mark(f"{QUARANTINE_MARK}soon") is None


# ---- against a real mosquitto and a real controller ---------------------------------------------

ADMIN = ("kgpu-broker-admin", "admin-secret")
ACCEPTED = 0  # CONNACK return codes
USERS = {"kgpu-controller": "controller-secret", "flood-1": "flood-secret", "honest-1": "honest-secret"}


def telemetry(node: str) -> bytes:
    samples = [GpuSample(index=i, uuid=f"GPU-{node}-{i}", ts=time.time(), temperature_c=60.0, power_w=250.0,
                         power_limit_w=700.0, utilization_pct=80.0, memory_used_bytes=1 << 30) for i in range(2)]
    return make_envelope(node, TelemetryBody(samples=samples), Kind.TELEMETRY).to_json()


class Flooder:
    """A node's login publishing its telemetry (QoS 0) as fast as paho takes it, from a thread;
    counts how its connection ended."""

    def __init__(self, broker: Mosquitto, node: str, password: str) -> None:
        self.node, self.password, self.port = node, password, broker.port
        self.sent = 0
        self.disconnected = threading.Event()
        self._stop = threading.Event()
        self.client = self._client()
        self.client.connect("127.0.0.1", broker.port)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _client(self) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{self.node}-flooder")
        client.username_pw_set(self.node, self.password)
        return client

    def start(self) -> Flooder:
        self._thread.start()
        return self

    def _run(self) -> None:
        payload, topic = telemetry(self.node), edge_topic(self.node, "telemetry")
        client = self.client
        while not self._stop.is_set():
            for _ in range(100):
                client.publish(topic, payload, qos=0)
            self.sent += 100
            if client.loop(timeout=0.0) != paho.MQTT_ERR_SUCCESS:
                self.disconnected.set()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.client.disconnect()

    def login(self) -> int:
        """A fresh CONNECT with the node's own password: the CONNACK's return code."""
        return connack(self.port, self.node, self.password, client_id=f"{self.node}-login")


def kgpu_cli(cloud: CloudProcess, *args: str) -> str:
    """`python -m kgpu ARGS` against the controller, as an operator would run it."""
    result = run_kgpu(*args, env={"KGPU_SERVER": cloud.base}, columns=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    if mosquitto_binary() is None or dynsec_plugin() is None:
        pytest.skip("mosquitto with its dynamic-security plugin not installed (Debian package mosquitto)")
    broker = Mosquitto(tmp_path / "broker", users=USERS, acl=SHIPPED_ACL.read_text(), dynsec_admin=ADMIN).start()
    yield broker
    broker.stop()


def controller(tmp_path: Path, broker: Mosquitto, name: str, *, admin: bool = True, quarantine_s: float = 6.0,
               db: str | None = None) -> CloudProcess:
    password_file = tmp_path / "admin-password"
    password_file.write_text(ADMIN[1] + "\n")
    env = {"KGPU_NODE_QUARANTINE": str(quarantine_s), "KGPU_NODE_RUNAWAY_DROPS_PER_SECOND": "300",
           "KGPU_NODE_MAX_MESSAGES_PER_SECOND": "20", "KGPU_NODE_BURST": "1"}
    if admin:
        env |= {"KGPU_BROKER_ADMIN_USERNAME": ADMIN[0], "KGPU_BROKER_ADMIN_PASSWORD_FILE": str(password_file)}
    cloud = CloudProcess(tmp_path / name, f"mqtt://kgpu-controller:{USERS['kgpu-controller']}@127.0.0.1:{broker.port}",
                         db=db, env=env)
    cloud.start()
    wait_for(lambda: cloud.metric("kgpu_mqtt_connected") == 1, timeout=30, what="controller connected")
    return cloud


def test_a_flooding_node_is_shut_out_at_the_broker_and_let_back_when_its_time_is_up(
        tmp_path: Path, broker: Mosquitto) -> None:
    cloud = controller(tmp_path, broker, "cloud-1", quarantine_s=6.0)
    flooder = Flooder(broker, "flood-1", USERS["flood-1"])
    try:
        wait_for(lambda: cloud.metric("kgpu_broker_quarantine_ready") == 1, timeout=30, what="admin link ready")
        flooder.start()
        # kicked by the broker (a connection that ended without our DISCONNECT) ...
        assert flooder.disconnected.wait(30), f"the flooder is still connected after {flooder.sent} messages"
        # (the broker kicks it before it answers the command: the controller counts on the answer)
        wait_for(lambda: cloud.metric("kgpu_broker_quarantines_total") == 1, timeout=10, what="quarantine counted")
        assert cloud.metric("kgpu_ingest_runaways_total") >= 1
        until = cloud.metric("kgpu_node_quarantined_until_timestamp_seconds", node="flood-1")
        assert time.time() < until <= time.time() + 6.5
        # ... its own password refused while quarantined (CONNACK 5, not authorised) ...
        assert flooder.login() == NOT_AUTHORISED
        # ... an honest node's login untouched ...
        honest = Flooder(broker, "honest-1", USERS["honest-1"])
        assert honest.login() == ACCEPTED
        # ... the API shows it ...
        state = wait_for(lambda: cloud.node_state("flood-1"), timeout=10, what="the flooder's admitted telemetry stored")
        assert state["quarantined_until"] == pytest.approx(until, abs=1.0)
        # ... and the dashboard, in place of the budget flag (which clears 10 s after the last refusal,
        # long before the quarantine ends)
        fleet = cloud.get("/api/v1/dashboard/fleet?limit=100")
        shown = {row["name"]: row["over_budget"] for row in fleet["nodes"]}
        assert shown["flood-1"] == time.strftime("quarantined until %H:%M:%SZ", time.gmtime(until))
        assert fleet["summary"]["over_budget"] >= 1
        # ... and the CLI
        listed = kgpu_cli(cloud, "get", "nodes")
        assert "Quarantined" in next(line for line in listed.splitlines() if line.startswith("flood-1")), listed
        described = kgpu_cli(cloud, "describe", "node", "flood-1")
        assert time.strftime("Quarantineduntil:%Y-%m-%dT%H:%M:%SZ", time.gmtime(until)) in described.replace(" ", "")
        # ... and it may log in again once its time is up.
        wait_for(lambda: flooder.login() == ACCEPTED, timeout=30, interval=0.5, what="the flooder let back in")
        assert time.time() >= until - 1.0
        wait_for(lambda: cloud.metric("kgpu_node_quarantined_until_timestamp_seconds", node="flood-1") == 0.0,
                 timeout=10, what="the quarantine gone from /metrics")  # metric(): 0.0 for a series not there
        assert cloud.metric("kgpu_broker_quarantine_failures_total") == 0
    finally:
        flooder.stop()
        cloud.stop()


def test_a_quarantine_outlives_the_controller_that_started_it_and_is_ended_by_the_next(
        tmp_path: Path, broker: Mosquitto) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    first = controller(tmp_path, broker, "cloud-1", quarantine_s=8.0, db=db)
    flooder = Flooder(broker, "flood-1", USERS["flood-1"])
    try:
        wait_for(lambda: first.metric("kgpu_broker_quarantine_ready") == 1, timeout=30, what="admin link ready")
        flooder.start()
        assert flooder.disconnected.wait(30)
        wait_for(lambda: first.metric("kgpu_broker_quarantines_total") == 1, timeout=10, what="quarantine counted")
        until = first.metric("kgpu_node_quarantined_until_timestamp_seconds", node="flood-1")
        assert until > time.time()
    finally:
        flooder.stop()
        first.stop()
    assert flooder.login() == NOT_AUTHORISED  # no controller running: the broker keeps the node out
    second = controller(tmp_path, broker, "cloud-2", db=db)
    try:
        wait_for(lambda: second.metric("kgpu_node_quarantined_until_timestamp_seconds", node="flood-1") > 0,
                 timeout=30, what="the new controller found the quarantine at the broker")
        # the broker keeps the end in whole seconds
        assert second.metric("kgpu_node_quarantined_until_timestamp_seconds", node="flood-1") == pytest.approx(
            until, abs=1.0)
        wait_for(lambda: flooder.login() == ACCEPTED, timeout=40, interval=0.5, what="the flooder let back in")
        assert time.time() >= until - 1.0
    finally:
        second.stop()


def test_without_an_admin_login_a_runaway_is_reported_and_left_connected(tmp_path: Path, broker: Mosquitto) -> None:
    cloud = controller(tmp_path, broker, "cloud-1", admin=False)
    flooder = Flooder(broker, "flood-1", USERS["flood-1"]).start()
    try:
        wait_for(lambda: cloud.metric("kgpu_ingest_runaways_total") >= 1, timeout=30, what="a runaway")
        assert cloud.metric("kgpu_broker_quarantines_total") == 0
        assert "kgpu_broker_quarantine_ready" not in cloud.get("/metrics")  # not configured: no such series
        assert not flooder.disconnected.is_set()
        assert flooder.login() == ACCEPTED
        wait_for(lambda: "set broker_admin_username to quarantine it" in cloud.log_path.read_text(), timeout=10,
                 what="the runaway's log line")
    finally:
        flooder.stop()
        cloud.stop()


def test_a_broker_that_does_not_answer_is_reported_and_the_quarantine_tried_again(tmp_path: Path) -> None:
    """The admin logs in, but the broker has no dynamic-security plugin: nothing answers."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed (scripts/test.sh installs it)")
    broker = Mosquitto(tmp_path / "broker", users={**USERS, ADMIN[0]: ADMIN[1]}, acl=SHIPPED_ACL.read_text()).start()
    cloud = controller(tmp_path, broker, "cloud-1")
    flooder = Flooder(broker, "flood-1", USERS["flood-1"])
    try:
        wait_for(lambda: cloud.metric("kgpu_broker_quarantine_failures_total") >= 1, timeout=30,
                 what="the unanswered listClients after the connect")
        assert cloud.metric("kgpu_broker_quarantine_ready") == 0
        flooder.start()
        wait_for(lambda: cloud.metric("kgpu_ingest_runaways_total") >= 1, timeout=30, what="a runaway")
        # one runaway, tried again while it floods: 5 s for each unanswered command, 10 s apart
        wait_for(lambda: cloud.metric("kgpu_broker_quarantine_failures_total") >= 3, timeout=60, interval=1.0,
                 what="the quarantine tried again")
        assert cloud.metric("kgpu_ingest_runaways_total") == 1
        assert cloud.metric("kgpu_broker_quarantines_total") == 0
        assert not flooder.disconnected.is_set()
        assert "no answer on $CONTROL/dynamic-security/v1/response" in cloud.log_path.read_text()
    finally:
        flooder.stop()
        cloud.stop()
        broker.stop()
