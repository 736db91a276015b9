"""MQTT brokers for the lab: a real mosquitto on a free loopback port (its own config, persistence
and log; optional users, ACL, TLS and a dynamic-security admin), RabbitMQ with its MQTT plugin
(the tests' second broker: it differs from mosquitto where brokers differ most, docs/broker.md
section 8), the embedded Python broker amqtt where mosquitto is not installed, and `Uplinks`,
loopback relays that take one node off the network on demand.

Why here: the demo and the tests each started mosquitto their own way; one starter means one
config to get right (persistence for restart tests, `user root` when run as root, queue limits).
"""

from __future__ import annotations

import asyncio
import base64
import glob
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from kgpu.lab.processes import Child, LabError, free_port, wait_listening

MOSQUITTO_HINT = ("kgpu demo needs the mosquitto MQTT broker on PATH: "
                  "`sudo apt-get install mosquitto` (Debian/Ubuntu), `sudo dnf install mosquitto` (Fedora) "
                  "or `brew install mosquitto` (macOS)")
DYNSEC_HINT = ("mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so, mosquitto 2.0) was not "
               "found: `sudo apt-get install mosquitto` (Debian/Ubuntu put it in /usr/lib/<arch>/), or a "
               "mosquitto 2.0 built with its plugins (/usr/lib or /usr/local/lib)")
DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"
DYNSEC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/local/lib",
               "/opt/homebrew/lib", "/usr/lib/mosquitto", "/usr/local/lib/mosquitto")


def mosquitto_binary() -> str | None:
    """mosquitto on PATH, or where the distributions put it outside PATH (sbin)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.path.exists(candidate):
            return candidate
    return None


def dynsec_plugin() -> str | None:
    """mosquitto's dynamic-security plugin where the distributions put it (Debian: the multiarch
    directory; the eclipse-mosquitto image and source builds: /usr/lib or /usr/local/lib), or None."""
    candidates = [os.path.join(d, DYNSEC_PLUGIN) for d in DYNSEC_DIRS]
    candidates += sorted(glob.glob(f"/usr/lib/*/{DYNSEC_PLUGIN}"))
    candidates += sorted(glob.glob(f"/opt/homebrew/Cellar/mosquitto/*/lib/{DYNSEC_PLUGIN}"))
    return next((c for c in candidates if os.path.isfile(c)), None)


# What `mosquitto_ctrl dynsec init FILE USER` (mosquitto 2.0.11) writes, key for key
# (tests/test_lab_dynsec.py compares them): the admin role may send commands to and read
# $CONTROL/dynamic-security/#, and read $SYS/# and every other topic. "textName" is mosquitto_ctrl's
# spelling; the plugin reads "textname", so it ignores this one and drops it at its first save.
DYNSEC_ADMIN_ACLS = (
    ("publishClientSend", "$CONTROL/dynamic-security/#"),
    ("publishClientReceive", "$CONTROL/dynamic-security/#"),
    ("subscribePattern", "$CONTROL/dynamic-security/#"),
    ("publishClientReceive", "$SYS/#"),
    ("subscribePattern", "$SYS/#"),
    ("publishClientReceive", "#"),
    ("subscribePattern", "#"),
    ("unsubscribePattern", "#"),
)
# The fallback for clients the plugin knows (the admin) on topics their roles do not name. Clients
# it does not know (password-file users, anonymous ones) never reach it: the plugin defers them.
DYNSEC_DEFAULT_ACL_ACCESS = {"publishClientSend": False, "publishClientReceive": True, "subscribe": False,
                             "unsubscribe": True}
DYNSEC_ITERATIONS = 101  # mosquitto_ctrl's PBKDF2 iteration count for the init admin


def dynsec_password(password: str, iterations: int = DYNSEC_ITERATIONS, salt: bytes | None = None) -> dict[str, Any]:
    """The plugin's password fields: PBKDF2-HMAC-SHA512 over the password with a random 12-byte
    salt (or `salt`, to check a hash), both base64, as mosquitto_ctrl and the plugin write them."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return {"password": base64.b64encode(digest).decode(), "salt": base64.b64encode(salt).decode(),
            "iterations": iterations}


def dynsec_config(username: str, password: str) -> dict[str, Any]:
    """A dynamic-security config holding one admin client, as `mosquitto_ctrl dynsec init` makes it."""
    return {
        "clients": [{"username": username, "textName": "Dynsec admin user", **dynsec_password(password),
                     "roles": [{"rolename": "admin"}]}],
        "roles": [{"rolename": "admin",
                   "acls": [{"acltype": kind, "topic": topic, "allow": True} for kind, topic in DYNSEC_ADMIN_ACLS]}],
        "defaultACLAccess": dict(DYNSEC_DEFAULT_ACL_ACCESS),
    }


class BrokerProcess:
    """A broker run as a `Child`, listening on 127.0.0.1:`port`."""

    port: int
    child: Child

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.child.proc

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def name(self) -> str:
        return self.child.name

    def alive(self) -> bool:
        return self.child.alive()

    def start(self, timeout: float = 15.0) -> Any:
        self.child.start()
        wait_listening(self.child, self.port, timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.child.stop(timeout)

    def kill(self) -> None:
        """kill -9: whatever the broker had not saved is gone."""
        self.child.kill()

    def restart(self) -> None:
        """SIGTERM (mosquitto saves its persistence), then start again on the same port."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """A partition: the broker stops answering but keeps its sockets open (SIGSTOP)."""
        self.child.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.child.signal(signal.SIGCONT)


class Mosquitto(BrokerProcess):
    """A real mosquitto: `workdir` holds its config, persistence (`mosquitto.db`) and log
    (`log_path`); its stdout and stderr go to `output` (default `workdir/mosquitto.out`).

    `users` (name -> password) turn anonymous access off unless `allow_anonymous` is True
    (None: anonymous clients only without users); `acl` is the text of an ACL file; `tls` adds a
    second listener (`tls_port`) with those certificates. `dynsec_admin` (username, password)
    loads the dynamic-security plugin with that admin, as the controller's quarantine uses it
    (docs/broker.md); its config, which the plugin rewrites at every change, is `dynsec_path`."""

    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None, acl: str | None = None,
                 tls: TlsFiles | None = None, message_size_limit: int | None = None,
                 output: Path | None = None, name: str = "mosquitto", allow_anonymous: bool | None = None,
                 dynsec_admin: tuple[str, str] | None = None) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise LabError(MOSQUITTO_HINT)
        plugin = dynsec_plugin() if dynsec_admin is not None else None
        if dynsec_admin is not None and plugin is None:
            raise LabError(DYNSEC_HINT)
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.log_path = workdir / "mosquitto.log"
        self.dynsec_path: Path | None = None
        self.dynsec_admin = dynsec_admin
        lines = [
            "per_listener_settings false",
            "persistence true",
            f"persistence_location {workdir}/",
            "autosave_interval 1",
            f"log_dest file {self.log_path}",
            "log_type error", "log_type warning", "log_type notice",
            "max_queued_messages 100000",
            *([f"message_size_limit {message_size_limit}"] if message_size_limit else []),
            f"listener {self.port} 127.0.0.1",
        ]
        if allow_anonymous is None:
            allow_anonymous = users is None
        lines.append(f"allow_anonymous {str(allow_anonymous).lower()}")
        if users is not None:
            passwd = workdir / "passwd"
            passwd.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True,
                               capture_output=True)
            lines.append(f"password_file {passwd}")
        if plugin is not None and dynsec_admin is not None:
            self.dynsec_path = workdir / "dynamic-security.json"
            self.dynsec_path.write_text(json.dumps(dynsec_config(*dynsec_admin), indent="\t") + "\n")
            self.dynsec_path.chmod(0o600)  # password hashes
            lines += [f"plugin {plugin}", f"plugin_opt_config_file {self.dynsec_path}"]
            if acl is None:
                # Without the plugin, no ACL means every client may do anything. With it, the plugin
                # defers on every client it does not know (password-file users; anonymous ones too,
                # as no anonymous group is set and defaultACLAccess denies publish and subscribe),
                # and mosquitto 2.0 denies what every check deferred: all their PUBLISHes and
                # SUBSCRIBEs. This ACL gives anonymous clients, then each user, everything back ("#"
                # matches no $-topic: $CONTROL stays the admin's). An ACL, not a dynsec setting:
                # defaultACLAccess and the anonymous group never reach password-file users. Per user
                # rather than `pattern readwrite #`, which mosquitto warns about at every load.
                everything = "topic readwrite #\ntopic read $SYS/#\n"
                acl = everything + "".join(f"user {user}\n{everything}" for user in users or {})
        if acl is not None:
            acl_file = workdir / "acl"
            acl_file.write_text(acl)
            lines.append(f"acl_file {acl_file}")
        if tls is not None:
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {tls.ca}", f"certfile {tls.server_cert}",
                      f"keyfile {tls.server_key}"]
        if os.geteuid() == 0:  # as root mosquitto would switch to its own user, who can't read tmp dirs
            lines.insert(0, "user root")
        self.config = workdir / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.child = Child(name, [binary, "-c", str(self.config)], output or workdir / "mosquitto.out")

    def start(self, timeout: float = 10.0) -> Mosquitto:
        try:
            super().start(timeout)
        except LabError as exc:
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise LabError(f"{exc} {log}") from None
        return self


RABBITMQ_HINT = ("RabbitMQ is not installed: `sudo apt-get install rabbitmq-server` (Debian/Ubuntu; "
                 "scripts/test.sh does it)")
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's; /usr/sbin's wrapper would su to rabbitmq


def rabbitmq_binary() -> str | None:
    """RabbitMQ's own start script (not Debian's wrapper, which switches to the rabbitmq user), or None."""
    if os.path.exists(RABBITMQ_SERVER) and shutil.which("epmd"):
        return RABBITMQ_SERVER
    return None


class RabbitMQ(BrokerProcess):
    """A real RabbitMQ (Debian's 3.10) with only its MQTT plugin, run as our own process: its
    own node name, ports (MQTT `port`, AMQP, Erlang distribution, and an epmd of its own),
    data, log, config and plugins file under `workdir`, so it never meets a system RabbitMQ.

    It takes seconds to start: start one per test session and give each test its own virtual
    host (`vhost`), whose retained messages, sessions and queues no other test sees. Anonymous
    clients land in the default vhost `/`."""

    def __init__(self, workdir: Path, *, output: Path | None = None, name: str = "rabbitmq") -> None:
        binary = rabbitmq_binary()
        if binary is None:
            raise LabError(RABBITMQ_HINT)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        amqp_port, dist_port, epmd_port = free_port(), free_port(), free_port()
        self.log_path = output or workdir / "rabbitmq.out"
        (workdir / "mnesia").mkdir(exist_ok=True)
        (workdir / "log").mkdir(exist_ok=True)
        config = workdir / "rabbitmq.conf"
        config.write_text("\n".join([
            f"listeners.tcp.default = 127.0.0.1:{amqp_port}",
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}",
            "mqtt.allow_anonymous = true",
            "loopback_users = none",
            "disk_free_limit.absolute = 10MB",
            "log.console = true", "log.console.level = warning", "log.file = false",
        ]) + "\n")
        plugins = workdir / "enabled_plugins"
        plugins.write_text("[rabbitmq_mqtt].\n")
        env_file = workdir / "rabbitmq-env.conf"
        env_file.write_text("")  # not the system's /etc/rabbitmq/rabbitmq-env.conf
        self.env = {
            "HOME": str(workdir),  # the Erlang cookie
            "RABBITMQ_NODENAME": f"kgpu-{self.port}@localhost", "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(amqp_port), "RABBITMQ_DIST_PORT": str(dist_port),
            "ERL_EPMD_PORT": str(epmd_port), "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"), "RABBITMQ_LOG_BASE": str(workdir / "log"),
            "RABBITMQ_CONFIG_FILE": str(config), "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_CONF_ENV_FILE": str(env_file),
        }
        self.epmd = Child(f"{name}-epmd", ["epmd", "-port", str(epmd_port), "-address", "127.0.0.1"],
                          workdir / "epmd.out", env={"ERL_EPMD_ADDRESS": "127.0.0.1"})
        self.epmd_port = epmd_port
        self.child = Child(name, [binary], self.log_path, env=self.env)
        self._vhosts = 0

    def start(self, timeout: float = 90.0) -> RabbitMQ:
        if not self.epmd.alive():
            self.epmd.start()
            wait_listening(self.epmd, self.epmd_port, 10)
        super().start(timeout)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        self.child.stop(timeout)  # the start script passes SIGTERM on to the Erlang VM and waits for it
        self._group_signal(signal.SIGKILL)  # whatever of the group outlived it (the VM, if the script was killed)
        self.epmd.stop()

    def kill(self) -> None:
        """kill -9 of the whole process group (the script and the Erlang VM)."""
        self._group_signal(signal.SIGKILL)
        self.child.kill()

    def pause(self) -> None:
        self._group_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._group_signal(signal.SIGCONT)

    def _group_signal(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)  # Child starts it in a process group of its own
        except ProcessLookupError:
            pass

    def eval(self, expression: str) -> str:
        """An Erlang expression evaluated in the broker (rabbitmqctl eval): for set-up only."""
        ctl = str(Path(RABBITMQ_SERVER).with_name("rabbitmqctl"))
        done = subprocess.run([ctl, "-q", "eval", expression], env={**os.environ, **self.env},
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise LabError(f"rabbitmqctl eval failed: {done.stdout}{done.stderr}")
        return done.stdout.strip()

    def vhost(self) -> RabbitVhost:
        """A new, empty virtual host for one test (`stop()`/`start()` it as if it were a broker)."""
        self._vhosts += 1
        return RabbitVhost(self, f"t{self._vhosts}").start()


class RabbitVhost:
    """One test's virtual host on a shared `RabbitMQ`, reached with MQTT username `<vhost>:guest`
    (`url`). `stop()` deletes it: the broker closes its clients' connections and refuses them
    until `start()` makes it again, empty (a broker that lost its data)."""

    def __init__(self, server: RabbitMQ, name: str) -> None:
        self.server = server
        self.name = name
        self.port = server.port
        self.workdir = server.workdir
        self.up = False

    @property
    def url(self) -> str:
        return f"mqtt://{self.name}%3Aguest:guest@127.0.0.1:{self.port}"

    def start(self) -> RabbitVhost:
        vhost = f'<<"{self.name}">>'
        self.server.eval(f'rabbit_vhost:add({vhost}, <<"kgpu">>), rabbit_auth_backend_internal:set_permissions('
                         f'<<"guest">>, {vhost}, <<".*">>, <<".*">>, <<".*">>, <<"kgpu">>).')
        self.up = True
        return self

    def stop(self) -> None:
        if self.up:
            self.server.eval(f'rabbit_vhost:delete(<<"{self.name}">>, <<"kgpu">>).')
            self.up = False

    def alive(self) -> bool:
        return self.up and self.server.alive()


class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, made with openssl."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca = workdir / "ca.crt"
        ca_key = workdir / "ca.key"
        self.server_cert = workdir / "server.crt"
        self.server_key = workdir / "server.key"
        csr = workdir / "server.csr"
        ext = workdir / "ext.cnf"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=kgpu-test-ca",
            "-keyout", str(ca_key), "-out", str(self.ca))
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(self.server_key),
            "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "2", "-extfile", str(ext), "-out", str(self.server_cert))


class Amqtt(BrokerProcess):
    """The embedded Python broker amqtt (the `lab` extra), anonymous, no persistence: the demo's
    fallback where mosquitto cannot be installed."""

    def __init__(self, workdir: Path, *, output: Path | None = None, name: str = "amqtt") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.config = workdir / "amqtt.yaml"
        self.config.write_text(
            f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
        )
        self.child = Child(name, [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(self.config)],
                           output or workdir / "amqtt.out")

    def start(self, timeout: float = 15.0) -> Amqtt:
        super().start(timeout)
        return self


def start_broker(workdir: Path, output: Path, choice: str | None = None) -> BrokerProcess:
    """mosquitto when it is installed, otherwise amqtt; `choice` (default: $KGPU_DEMO_BROKER)
    mosquitto or amqtt forces one. Started, listening, named "broker"."""
    choice = choice or os.environ.get("KGPU_DEMO_BROKER", "auto")
    if choice not in ("auto", "mosquitto", "amqtt"):
        raise LabError(f"KGPU_DEMO_BROKER must be auto, mosquitto or amqtt, not {choice!r}")
    if choice != "amqtt" and mosquitto_binary() is not None:
        return Mosquitto(workdir, output=output, name="broker").start(15)
    if choice != "mosquitto" and importlib.util.find_spec("amqtt") is not None:
        return Amqtt(workdir, output=output, name="broker").start()
    raise LabError(MOSQUITTO_HINT + ", or install the embedded broker: pip install 'kgpu[lab]'")


# ---- per-node uplinks: loopback TCP relays that can be cut ----------------------------------


class Uplinks:
    """One TCP relay per node between its edge and the broker. `cut(node)` aborts the node's
    connections (the broker sees the socket die and publishes the node's will: offline) and
    refuses new ones until `restore(node)`; the edge process itself keeps running."""

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="uplinks", daemon=True)
        self._thread.start()
        self.down: set[str] = set()
        self._conns: dict[str, set[asyncio.StreamWriter]] = {}
        self._servers: list[asyncio.base_events.Server] = []

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def add(self, node: str) -> int:
        """A relay for `node`; the port its edge connects to."""
        async def open_server() -> int:
            server = await asyncio.start_server(lambda r, w: self._relay(node, r, w), "127.0.0.1", free_port())
            self._servers.append(server)
            return int(server.sockets[0].getsockname()[1])

        self._conns[node] = set()
        return int(self._call(open_server()))

    async def _relay(self, node: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if node in self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
        except OSError:
            writer.transport.abort()
            return
        conns = self._conns[node]
        conns.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            conns.discard(writer)
            conns.discard(up_writer)

    def cut(self, node: str) -> None:
        async def abort() -> None:
            self.down.add(node)
            for w in list(self._conns[node]):
                w.transport.abort()

        self._call(abort())

    def restore(self, node: str) -> None:
        async def up() -> None:
            self.down.discard(node)

        self._call(up())

    def stop(self) -> None:
        async def close() -> None:
            for conns in self._conns.values():
                for w in list(conns):
                    w.transport.abort()
            for server in self._servers:
                server.close()

        try:
            self._call(close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
