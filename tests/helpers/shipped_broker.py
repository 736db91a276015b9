"""The shipped broker kit (deploy/mosquitto/) run for real: the shipped conf with only paths and
ports rewritten, the shipped ACL, users and the dynamic-security seed from make-users.sh and
certificates from make-certs.sh; and `Client`, the kit tests' MqttLink with an inbox."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from kgpu.lab.broker import Mosquitto, dynsec_plugin
from kgpu.lab.processes import free_port, wait_for
from shared.mqtt import MqttLink, Received

ROOT = Path(__file__).resolve().parent.parent.parent
KIT = ROOT / "deploy" / "mosquitto"
SHIPPED_CONF = KIT / "mosquitto.conf"
SHIPPED_ACL = KIT / "acl"
MAKE_USERS = KIT / "make-users.sh"
MAKE_CERTS = KIT / "make-certs.sh"

# The only things the test changes in the shipped conf: these paths (to tmp dirs, and the plugin to
# where this machine has it) and the two ports.
SHIPPED_PLUGIN = "/usr/lib/mosquitto_dynamic_security.so"  # the eclipse-mosquitto:2 image's
SHIPPED_PATHS = {"/mosquitto/data/", "/mosquitto/secrets/passwd", "/mosquitto/config/acl", "/mosquitto/certs/",
                 SHIPPED_PLUGIN}
BROKER_ADMIN = "kgpu-broker-admin"  # the dynamic-security admin make-users.sh makes


# ---- the kit, run for real --------------------------------------------------------------------

def run_script(script: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"{script.name} {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def make_users(users_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_script(MAKE_USERS, "--dir", str(users_dir), *args, check=check)


def make_certs(certs_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_script(MAKE_CERTS, "--dir", str(certs_dir), *args)


def derive_conf(shipped: str, paths: dict[str, str], port: int, tls_port: int,
                uncomment: tuple[str, ...] = ()) -> str:
    """The shipped conf with paths and ports rewritten; every other line is kept as it is."""
    out: list[str] = []
    used: set[str] = set()
    for line in shipped.splitlines():
        directive = line.strip()
        if directive == "listener 1883":
            line = f"listener {port} 127.0.0.1"
        elif directive == "listener 8883":
            line = f"listener {tls_port} 127.0.0.1"
        elif directive.startswith("#"):
            if directive.lstrip("#") in uncomment:
                line = directive.lstrip("#")
        else:
            for old, new in paths.items():
                if old in line:
                    line = line.replace(old, new)
                    used.add(old)
        out.append(line)
    assert used == set(paths), f"shipped conf lacks {set(paths) - used}"
    text = "\n".join(out) + "\n"
    assert not re.search(r"^[^#]*/mosquitto/", text, re.MULTILINE), "a shipped path was left unrewritten"
    if os.geteuid() == 0:  # as root mosquitto would switch to its own user, who can't read tmp dirs
        text = "user root\n" + text
    return text


class ShippedBroker(Mosquitto):
    """mosquitto running the shipped conf and ACL with users and certs made by the kit's scripts."""

    def __init__(self, workdir: Path, *, nodes: tuple[str, ...] = ("edge-a", "edge-b"),
                 uncomment: tuple[str, ...] = ()) -> None:
        super().__init__(workdir)  # picks a free port; its own config is replaced below
        self.tls_port = free_port()
        self.users_dir = workdir / "users"
        self.certs_dir = workdir / "certs"
        make_users(self.users_dir, "--broker", f"mqtt://127.0.0.1:{self.port}", *nodes)
        make_certs(self.certs_dir, "--client", "edge-a", "localhost", "127.0.0.1")
        (workdir / "data").mkdir(exist_ok=True)
        # as deploy/broker/broker.yaml's init container: the seed goes to the data volume on the
        # first start only; from then on the plugin keeps its own copy there
        self.dynsec_path = workdir / "data" / "dynamic-security.json"
        if not self.dynsec_path.exists():
            shutil.copyfile(self.users_dir / "dynamic-security.json", self.dynsec_path)
            self.dynsec_path.chmod(0o600)
        plugin = dynsec_plugin()
        assert plugin is not None, "the shipped conf loads the dynamic-security plugin"
        acl = workdir / "acl"
        acl.write_bytes(SHIPPED_ACL.read_bytes())  # the shipped ACL, unchanged
        paths = {
            "/mosquitto/data/": f"{workdir}/data/",
            "/mosquitto/secrets/passwd": str(self.users_dir / "passwd"),
            "/mosquitto/config/acl": str(acl),
            "/mosquitto/certs/": f"{self.certs_dir}/",
            SHIPPED_PLUGIN: plugin,
        }
        assert set(paths) == SHIPPED_PATHS
        self.dynsec_admin = (BROKER_ADMIN, self.password_file(BROKER_ADMIN).read_text().strip())
        self.config.write_text(derive_conf(SHIPPED_CONF.read_text(), paths, self.port, self.tls_port, uncomment)
                               + f"log_dest file {self.log_path}\n")  # stdout goes nowhere in tests

    def url(self, user: str) -> str:  # type: ignore[override]
        """The credentials URL make-users.sh wrote for this user."""
        return (self.users_dir / "credentials" / f"{user}.url").read_text().strip()

    def password_file(self, user: str) -> Path:
        return self.users_dir / "credentials" / f"{user}.password"

    def hup(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)


# ---- the kit's clients ---------------------------------------------------------------------------

@dataclass
class Client:
    """An MqttLink with an inbox and a count of SUBACKs (so a test knows its subscriptions hold)."""

    link: MqttLink
    inbox: queue.Queue[Received] = field(default_factory=queue.Queue)
    subacks: list[list[int]] = field(default_factory=list)

    def wait_subscribed(self, timeout: float = 10.0) -> Client:
        wait_for(lambda: len(self.subacks) >= len(self.link.subscriptions), timeout=timeout,
                 interval=0.02, what=f"SUBACKs for {self.link.client_id}")
        return self

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish and, for QoS 1, wait for the broker's PUBACK: the broker has then routed it."""
        info = self.link._client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(timeout=5)
            assert info.is_published(), f"no PUBACK for {topic}"

    def receive(self, payload: bytes, timeout: float = 5.0) -> list[Received]:
        """Everything received up to and including `payload`."""
        seen: list[Received] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{self.link.client_id} did not receive {payload!r}; "
                                     f"got {[(m.topic, m.payload) for m in seen]}") from None
            seen.append(message)
            if message.payload == payload:
                return seen

    def drain(self) -> list[Received]:
        out = []
        while True:
            try:
                out.append(self.inbox.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        self.link.stop()


def leave(broker: Mosquitto, client: Client) -> None:
    """Disconnect `client` and wait until the broker has processed it (it logs each disconnect),
    so that what other clients publish next cannot still reach it live."""
    line = f"Client {client.link.client_id} disconnected"
    count = broker.log_path.read_text().count(line)
    client.stop()
    wait_for(lambda: broker.log_path.read_text().count(line) > count, timeout=5, interval=0.05,
             what=f"the broker to see {client.link.client_id} leave")


def payloads(messages: list[Received]) -> list[bytes]:
    return [m.payload for m in messages]


def unique(label: str) -> bytes:
    return f"{label}-{time.monotonic_ns()}".encode()
