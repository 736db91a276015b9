"""The lab's mosquitto with the dynamic-security plugin (`Mosquitto(dynsec_admin=...)`), as the
controller's quarantine uses it (cloud/quarantine.py): the admin's commands are answered, a
password-file user is shut out by a dynamic-security client of its name and let back in when that
client is deleted, and everything the lab broker allowed without the plugin is still allowed.

What mosquitto 2.0.11 does here, and these tests pin down: `createClient` refuses the user's new
logins but leaves its connected session alone; `disableClient` (or `setClientPassword`,
`deleteClient`) is what disconnects it. The quarantine is persistent: the plugin saves it.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kgpu.lab import broker as lab_broker
from kgpu.lab.broker import Mosquitto, dynsec_config, dynsec_password, dynsec_plugin, mosquitto_binary
from kgpu.lab.processes import LabError, wait_for
from tests.helpers.dynsec import NOT_AUTHORISED, DynsecAdmin, Recorder, connack

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_binary() is None or shutil.which("mosquitto_passwd") is None,
                       reason="mosquitto not installed (scripts/test.sh installs it)"),
    pytest.mark.skipif(dynsec_plugin() is None, reason="mosquitto's dynamic-security plugin not installed "
                       "(Debian's mosquitto package has it)"),
]

ADMIN = ("kgpu-broker-admin", "admin-secret")
USERS = {"edge-a": "edge-a-secret", "kgpu-controller": "controller-secret"}
ACL = ("pattern write kgpu/v1/edge/%u/+\npattern read kgpu/v1/cloud/%u/+\n"
       "user kgpu-controller\ntopic read kgpu/v1/edge/#\ntopic readwrite kgpu/v1/cloud/#\n")


class Lab:
    """The brokers and clients of one test, all stopped at its end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.brokers: list[Mosquitto] = []
        self.clients: list[Recorder] = []

    def broker(self, name: str, **options: Any) -> Mosquitto:
        broker = Mosquitto(self.workdir / name, **options).start()
        self.brokers.append(broker)
        return broker

    def node(self, broker: Mosquitto, client_id: str, user: str | None = None) -> Recorder:
        client = Recorder(broker.port, client_id, user, USERS.get(user or "")).wait_connected()
        self.clients.append(client)
        return client

    def admin(self, broker: Mosquitto) -> DynsecAdmin:
        client = DynsecAdmin(broker.port, *ADMIN)
        self.clients.append(client)
        return client

    def roundtrip(self, broker: Mosquitto, user: str | None, topic: str) -> list[bytes]:
        """What `user` (None: anonymous) receives of its own QoS 1 publish to `topic`."""
        got: list[bytes] = []
        granted: list[int] = []
        client = self.node(broker, f"roundtrip-{user}", user)
        client.client.on_message = lambda _c, _u, message: got.append(message.payload)
        client.client.on_subscribe = lambda _c, _u, _mid, codes, _p: granted.extend(c.value for c in codes)
        client.client.subscribe(topic, qos=1)
        wait_for(lambda: granted, timeout=5, interval=0.02, what=f"a SUBACK for {user}")
        assert granted == [1], f"{user}'s SUBSCRIBE to {topic} was refused: {granted}"
        client.publish(topic, b"hello")
        wait_for(lambda: got, timeout=5, interval=0.02, what=f"{user}'s own message on {topic}")
        client.stop()
        return got

    def close(self) -> None:
        for client in self.clients:
            client.stop()
        for broker in self.brokers:
            broker.stop()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    yield lab
    lab.close()


# ---- the config file ---------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("mosquitto_ctrl") is None, reason="mosquitto_ctrl not installed")
def test_the_config_is_what_mosquitto_ctrl_dynsec_init_writes(tmp_path: Path) -> None:
    made = tmp_path / "ctrl.json"
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(made), "root-admin"], input="pw-1\npw-1\n",
                   text=True, capture_output=True, timeout=10, check=True)
    theirs = json.loads(made.read_text())
    ours = dynsec_config("root-admin", "pw-1")
    secret = ("password", "salt")
    assert {k: v for k, v in theirs["clients"][0].items() if k not in secret} == \
        {k: v for k, v in ours["clients"][0].items() if k not in secret}
    assert {k: v for k, v in theirs.items() if k != "clients"} == {k: v for k, v in ours.items() if k != "clients"}
    assert theirs["defaultACLAccess"] == {"publishClientSend": False, "publishClientReceive": True,
                                          "subscribe": False, "unsubscribe": True}
    # the same hash: PBKDF2-HMAC-SHA512, their salt (12 bytes) and iteration count
    client = theirs["clients"][0]
    salt = base64.b64decode(client["salt"])
    assert len(salt) == 12 and client["iterations"] == 101
    assert dynsec_password("pw-1", client["iterations"], salt)["password"] == client["password"]
    assert len(base64.b64decode(ours["clients"][0]["salt"])) == 12


def test_dynsec_without_the_plugin_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab_broker, "dynsec_plugin", lambda: None)
    with pytest.raises(LabError) as refused:
        Mosquitto(tmp_path / "b", dynsec_admin=ADMIN)
    assert "dynamic-security plugin" in str(refused.value) and "apt-get install mosquitto" in str(refused.value)
    assert not (tmp_path / "b" / "mosquitto.conf").exists()


# ---- the admin ----------------------------------------------------------------------------------

def test_the_admin_logs_in_and_its_commands_are_answered(lab: Lab) -> None:
    broker = lab.broker("b", users=USERS, acl=ACL, dynsec_admin=ADMIN)
    assert broker.dynsec_path is not None and oct(broker.dynsec_path.stat().st_mode & 0o777) == "0o600"
    conf = broker.config.read_text()
    assert f"plugin {dynsec_plugin()}\n" in conf and f"plugin_opt_config_file {broker.dynsec_path}\n" in conf
    # the hash we wrote holds: the right password logs in, another does not
    assert connack(broker.port, ADMIN[0], "not-the-password") == NOT_AUTHORISED
    responses = lab.admin(broker).ok({"command": "listClients"})
    assert responses[0]["data"]["clients"] == [ADMIN[0]]
    # the password file and the ACL still apply to their users alongside the plugin
    assert connack(broker.port, "edge-a", USERS["edge-a"]) == 0
    assert connack(broker.port, "edge-a", "wrong") == NOT_AUTHORISED
    assert connack(broker.port, ADMIN[0], USERS["edge-a"]) == NOT_AUTHORISED
    assert lab.roundtrip(broker, "kgpu-controller", "kgpu/v1/cloud/edge-a/commands") == [b"hello"]


def test_a_user_is_shut_out_by_a_dynsec_client_of_its_name_and_let_back_by_deleting_it(lab: Lab) -> None:
    broker = lab.broker("b", users=USERS, acl=ACL, dynsec_admin=ADMIN)
    ctl = lab.admin(broker)
    edge = lab.node(broker, "kgpu-edge-edge-a", "edge-a")
    assert edge.connacks == ["Success"]

    # createClient alone: new logins with the password-file password are refused at once...
    ctl.ok({"command": "createClient", "username": "edge-a", "password": "random-1"})
    assert connack(broker.port, "edge-a", USERS["edge-a"]) == NOT_AUTHORISED
    # ...but mosquitto 2.0.11 leaves the connected session alone: it still publishes
    edge.publish("kgpu/v1/edge/edge-a/events", b"still here")
    assert edge.connected() and edge.drops == 0, "createClient disconnected the user: this mosquitto kicks on " \
        "create (2.0.11 does not), so disableClient is no longer needed for the kick"

    # disableClient disconnects it; its own reconnects are refused (CONNACK 5)
    ctl.ok({"command": "disableClient", "username": "edge-a"})
    wait_for(lambda: edge.drops, timeout=5, interval=0.02, what="edge-a disconnected by disableClient")
    wait_for(lambda: "Not authorized" in edge.connacks, timeout=5, interval=0.02,
             what=f"edge-a's reconnect refused (CONNACKs: {edge.connacks})")
    assert not edge.connected()

    # the quarantine is saved: it survives a broker restart
    broker.restart()
    assert connack(broker.port, "edge-a", USERS["edge-a"]) == NOT_AUTHORISED
    assert "edge-a" in broker.dynsec_path.read_text()  # type: ignore[union-attr]

    # deleteClient: the password-file login works again, and edge-a reconnects by itself
    ctl.wait_ready()  # it reconnects after the restart
    ctl.ok({"command": "deleteClient", "username": "edge-a"})
    refused = edge.connacks.count("Not authorized")
    wait_for(edge.connected, timeout=5, interval=0.02, what=f"edge-a back (CONNACKs: {edge.connacks})")
    assert edge.connacks[-1] == "Success" and refused >= 1
    assert connack(broker.port, "edge-a", USERS["edge-a"]) == 0


def test_create_and_disable_in_one_message_kick_at_once(lab: Lab) -> None:
    """The controller's quarantine in one round trip: both commands, in order, in one message."""
    broker = lab.broker("b", users=USERS, acl=ACL, dynsec_admin=ADMIN)
    ctl = lab.admin(broker)
    edge = lab.node(broker, "kgpu-edge-edge-a", "edge-a")
    ctl.ok({"command": "createClient", "username": "edge-a", "password": "random-2", "textname": "quarantined"},
           {"command": "disableClient", "username": "edge-a"})
    wait_for(lambda: edge.drops, timeout=5, interval=0.02, what="edge-a disconnected")
    assert connack(broker.port, "edge-a", USERS["edge-a"]) == NOT_AUTHORISED
    got = ctl.ok({"command": "getClient", "username": "edge-a"})[0]["data"]["client"]
    assert got["textname"] == "quarantined" and got["disabled"] is True
    ctl.ok({"command": "deleteClient", "username": "edge-a"})
    assert connack(broker.port, "edge-a", USERS["edge-a"]) == 0


# ---- what the plugin must not take away -----------------------------------------------------------

def test_anonymous_clients_without_users_keep_full_access(lab: Lab) -> None:
    broker = lab.broker("b", dynsec_admin=ADMIN)
    assert lab.roundtrip(broker, None, "kgpu/v1/edge/anon/events") == [b"hello"]
    assert lab.admin(broker).ok({"command": "listClients"})[0]["data"]["clients"] == [ADMIN[0]]


def test_users_without_an_acl_keep_full_access_and_anonymous_ones_only_when_allowed(lab: Lab) -> None:
    closed = lab.broker("closed", users=USERS, dynsec_admin=ADMIN)
    assert lab.roundtrip(closed, "edge-a", "anything/at/all") == [b"hello"]
    assert connack(closed.port) == NOT_AUTHORISED  # allow_anonymous None with users: no anonymous clients
    open_ = lab.broker("open", users=USERS, dynsec_admin=ADMIN, allow_anonymous=True)
    assert lab.roundtrip(open_, None, "anything/at/all") == [b"hello"]
    assert lab.roundtrip(open_, "edge-a", "anything/else") == [b"hello"]
    assert connack(open_.port, "edge-a", "wrong") == NOT_AUTHORISED  # a wrong password is still refused
    # the same choices without the plugin
    plain = lab.broker("plain", users=USERS, allow_anonymous=True)
    assert connack(plain.port) == 0 and connack(plain.port, "edge-a", USERS["edge-a"]) == 0
    assert connack(lab.broker("shut", users=USERS, allow_anonymous=False).port) == NOT_AUTHORISED
