"""Quarantine at the broker: a runaway node stopped where its flood waits, not after it.

The per-node budgets (cloud/budget.py) drop a flooding node's excess for a few µs a message, but
the controller still has to read every one of them, and the broker hands them over in order, one
queue per subscriber: behind a node publishing 100,000 messages a second every other node's events
wait seconds, and past the broker's queue limit they are dropped (their edges re-send them only
after the ack timeout). No reader keeps up with a raw flood; the broker must stop it.

mosquitto 2.0 has no per-client rate limit, but its dynamic-security plugin can be driven over
MQTT (`$CONTROL/dynamic-security/v1`) and coexists with the password file and ACL of the shipped
kit (deploy/mosquitto/). To quarantine node N the controller creates a dynamic-security client
named N with a random password and disables it: mosquitto disconnects N at once (creating alone
does not) and, from then on, checks N's logins against that client, so N's own password is
refused (CONNACK 5). The client's text name
carries the end of the quarantine (`QUARANTINE_MARK` + unix time), so a restarted controller, or
another replica, finds and ends it: the state lives in the broker, beside what it governs. To
release N the client is deleted and N's password-file login works again. A node that is a
dynamic-security client already (a broker that keeps its users there) is disabled and enabled
instead; that one is remembered in this process only (docs/broker.md).

The decisions are pure (`quarantine_seconds`, `due`, `parse_mark`); `BrokerQuarantine` is the I/O:
one MQTT connection of its own (`<client id>-broker-admin`, clean session) that sends the
commands and reads their responses. Without `broker_admin_username` a runaway is logged and
counted, nothing more: its excess is still dropped by the budgets.

The ACL binds a node's username to its topics (`pattern write kgpu/v1/edge/%u/+`): the node named
in the topic is the login to shut out. Without that ACL a client could flood under another node's
name and have it quarantined: enable this only with it (the shipped kit has it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import json
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cloud.config import CloudSettings
from shared.logs import get_logger
from shared.mqtt import BrokerAddress, MqttLink, Received, TlsOptions, parse_broker_url

log = get_logger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
QUARANTINE_MARK = "kgpu quarantine until "  # + unix time: the dynamic-security client's textname
ANSWER_TIMEOUT_S = 5.0  # a broker that has not answered a command by then has no plugin (or no right)
RELEASE_CHECK_S = 1.0  # how often due releases are looked for
RETRY_S = 10.0  # a failed quarantine (if its node still floods) or release is tried again this much later


# ---- decisions (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QuarantineRules:
    first_s: float = 300.0
    max_s: float = 3600.0


def quarantine_seconds(rules: QuarantineRules, earlier: int) -> float:
    """How long a node's quarantine lasts when it has had `earlier` ones since this process
    started: a repeat runaway's doubles each time, up to `max_s`."""
    return min(rules.max_s, rules.first_s * 2.0 ** min(earlier, 32))


def due(until: Mapping[str, float], now: float) -> list[str]:
    """The quarantined nodes whose time is up (`until`: node -> unix time), in order."""
    return sorted(node for node, end in until.items() if end <= now)


def parse_mark(textname: object) -> float | None:
    """The end of a quarantine from a dynamic-security client's textname, None when the client is
    not one of ours."""
    if not isinstance(textname, str) or not textname.startswith(QUARANTINE_MARK):
        return None
    try:
        return float(textname[len(QUARANTINE_MARK):])
    except ValueError:
        return None


@dataclass(frozen=True)
class Sent:
    """A quarantine's commands on their way: the end they carry and their correlation data."""

    end: float
    create: str
    disable: str


def _quarantine_commands(node: str, sent: Sent) -> list[dict[str, Any]]:
    """A dynamic-security client of the node's name, with a random password and the end in its
    text name, then disabled: creating alone does not disconnect the node, disabling does."""
    return [{"command": "createClient", "username": node, "password": secrets.token_urlsafe(24),
             "textname": f"{QUARANTINE_MARK}{sent.end:.0f}", "correlationData": sent.create},
            {"command": "disableClient", "username": node, "correlationData": sent.disable}]


def _commands(commands: list[dict[str, Any]]) -> bytes:
    return json.dumps({"commands": commands}).encode()


# ---- the broker's side --------------------------------------------------------------------------


class BrokerRefused(Exception):
    """The broker answered a dynamic-security command with an error (its text)."""


class BrokerQuarantine:
    """Runaway nodes quarantined through the broker's dynamic-security plugin (see the module).

    `runaway(node)` may be called from any thread (the ingest calls it from the MQTT network
    threads); the work happens in `run()`, on the loop. `admin` None: log and count only."""

    def __init__(self, rules: QuarantineRules, *, admin: BrokerAddress | None = None,
                 client_id: str = "kgpu-controller-broker-admin", tls: TlsOptions | None = None,
                 password_file: Path | None = None, flagged: Callable[[], Mapping[str, str]] = dict) -> None:
        self.rules = rules
        self.admin = admin
        # the nodes over their budget now (the ingest's flags): a failed quarantine is tried again
        # while its node is still flagged (a flood that goes on is one episode: no new runaway)
        self.flagged = flagged
        self._loop: asyncio.AbstractEventLoop | None = None  # run()'s
        self._runaways: asyncio.Queue[tuple[str, Sent | None]] = asyncio.Queue()
        self.until: dict[str, float] = {}  # node -> end of its quarantine (unix time)
        self._existed: set[str] = set()  # quarantined nodes that were dynamic-security clients before
        self._earlier: dict[str, int] = {}  # node -> quarantines since start (repeat runaways)
        self.runaways = 0  # reported by the ingest
        self.quarantines = 0  # started by this process
        self.failures = 0  # commands the broker refused or did not answer
        self.ready = False  # the admin connection is up and the broker has answered it
        self._answers: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._connected = asyncio.Event()
        self.link: MqttLink | None = None
        if admin is not None:
            self.link = MqttLink(
                admin, client_id, subscriptions=[(RESPONSE_TOPIC, 1)], clean_session=True, tls=tls,
                password_file=password_file, on_message=self._on_message,
                on_connected=lambda: self._from_thread(self._connected.set),
                on_disconnected=lambda _reason: self._from_thread(self._down),
            )

    @classmethod
    def for_settings(cls, settings: CloudSettings, flagged: Callable[[], Mapping[str, str]] = dict) -> BrokerQuarantine:
        """From the controller's settings: the admin logs in to the controller's broker."""
        rules = QuarantineRules(settings.node_quarantine, max(settings.node_quarantine, settings.node_quarantine_max))
        username = settings.broker_admin_username
        if not username:
            return cls(rules, flagged=flagged)
        address = parse_broker_url(settings.mqtt)
        admin = dataclasses.replace(address, username=username, password=None)
        tls = TlsOptions(settings.mqtt_ca_file, settings.mqtt_cert_file, settings.mqtt_key_file,
                         settings.mqtt_tls_insecure)
        return cls(rules, admin=admin, client_id=f"{settings.client_id}-broker-admin", tls=tls,
                   password_file=settings.broker_admin_password_file, flagged=flagged)

    def _from_thread(self, callback: Callable[[], object]) -> None:
        """Run `callback` on run()'s loop (from any thread); nothing before run() has started."""
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(callback)
            except RuntimeError:  # the loop is closed: the process is ending
                pass

    # ---- in -----------------------------------------------------------------------------------

    def runaway(self, node: str) -> None:
        """The ingest found `node` a runaway (cloud/budget.py). Thread-safe. With the admin
        connection up, the quarantine's commands leave at once, from the calling thread (the MQTT
        network thread that refused the flood): every moment the node floods on fills the broker's
        queue for the controller further, and the loop is busy with that flood. The loop only
        follows up their answers."""
        sent = None
        if self.link is not None and self.link.connected.is_set() and node not in self.until:
            end = time.time() + quarantine_seconds(self.rules, self._earlier.get(node, 0))
            sent = Sent(end, self._correlation(), self._correlation())
        # scheduled before the commands leave, so their answers find their futures on the loop
        self._from_thread(functools.partial(self._runaway, node, sent))
        if sent is not None and self.link is not None:
            self.link.publish(CONTROL_TOPIC, _commands(_quarantine_commands(node, sent)), qos=1)

    def _runaway(self, node: str, sent: Sent | None) -> None:
        self.runaways += 1
        if sent is not None:
            self._expect(sent.create, sent.disable)
        self._runaways.put_nowait((node, sent))

    def quarantined(self) -> dict[str, float]:
        """node -> the end of its quarantine (unix time), for /metrics and the API."""
        return dict(self.until)

    def collect(self) -> Iterator[Metric]:
        """Its figures for /metrics (a Prometheus collector)."""
        until = GaugeMetricFamily("kgpu_node_quarantined_until_timestamp_seconds", "While a runaway node is "
                                  "quarantined at the broker: when its quarantine ends (unix time).", labels=["node"])
        for node, end in sorted(self.until.items()):
            until.add_metric([node], end)
        yield until
        yield CounterMetricFamily("kgpu_ingest_runaways", "Nodes found flooding (node_runaway_drops_per_second "
                                  "refusals within a second), once per episode.", value=self.runaways)
        yield CounterMetricFamily("kgpu_broker_quarantines", "Runaway nodes quarantined at the broker.",
                                  value=self.quarantines)
        yield CounterMetricFamily("kgpu_broker_quarantine_failures", "Quarantine commands the broker refused "
                                  "or did not answer.", value=self.failures)
        if self.link is not None:
            yield GaugeMetricFamily("kgpu_broker_quarantine_ready", "1 while the broker answers the controller's "
                                    "dynamic-security commands (broker_admin_username is set).",
                                    value=1.0 if self.ready else 0.0)

    # ---- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: quarantine runaways, release them when due, re-read the broker's
        quarantines after every connect."""
        self._loop = asyncio.get_running_loop()
        if self.link is not None:
            self.link.start()
        try:
            while True:
                if self._connected.is_set() and self.link is not None:
                    self._connected.clear()
                    await self._restore()
                for node in due(self.until, time.time()):
                    await self._release(node)
                try:
                    node, sent = await asyncio.wait_for(self._runaways.get(), RELEASE_CHECK_S)
                except TimeoutError:
                    continue
                await self._quarantine(node, sent)
        finally:
            if self.link is not None:
                await asyncio.to_thread(self.link.stop)

    async def _quarantine(self, node: str, sent: Sent | None) -> None:
        try:
            await self._quarantine_answered(node, sent)
        finally:
            if sent is not None:
                for correlation in (sent.create, sent.disable):
                    self._answers.pop(correlation, None)

    async def _quarantine_answered(self, node: str, sent: Sent | None) -> None:
        if node in self.until:
            return  # the rest of its flood, still arriving from the broker's queue
        if self.link is None:
            log.warning("runaway node: its excess is dropped, but it still fills the broker's queue ahead of "
                        "every other node; set broker_admin_username to quarantine it at the broker "
                        "(docs/broker.md)", extra={"node": node})
            return
        try:
            if sent is None:  # the link was down when the runaway was found, or this is a retry
                self._check_link()
                end = time.time() + quarantine_seconds(self.rules, self._earlier.get(node, 0))
                sent = Sent(end, self._correlation(), self._correlation())
                self._expect(sent.create, sent.disable)
                self._publish(_quarantine_commands(node, sent))
            created, disabled = await self._answer(sent.create), await self._answer(sent.disable)
            end = sent.end
            if created.get("error"):
                end = await self._quarantine_existing(node, end, str(created["error"]))
            if disabled.get("error"):
                raise BrokerRefused(f"disableClient: {disabled['error']}")
        except (BrokerRefused, TimeoutError, ConnectionError) as exc:
            self._failed(f"cannot quarantine node {node} at the broker (tried again in {RETRY_S:.0f} s while it "
                         f"is over its budget): {exc}", node)
            asyncio.get_running_loop().call_later(RETRY_S, self._retry, node)
            return
        self.until[node] = end
        self._earlier[node] = self._earlier.get(node, 0) + 1
        self.quarantines += 1
        log.warning("runaway node quarantined at the broker: disconnected, and its logins refused until %s "
                    "(%.0f s); its events stay in its outbox and are sent when it is back",
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end)), end - time.time(),
                    extra={"node": node})

    def _retry(self, node: str) -> None:
        if node in self.flagged() and node not in self.until:
            self._runaways.put_nowait((node, None))

    async def _quarantine_existing(self, node: str, end: float, error: str) -> float:
        """createClient refused: the node is a dynamic-security client already (the disableClient
        sent with it has disabled that client). Ours (another replica's, or from before a restart):
        keep its end. The broker's own: enable it again at the end."""
        answer = await self._command({"command": "getClient", "username": node})
        if answer.get("error"):
            raise BrokerRefused(f"createClient: {error}; getClient: {answer['error']}")
        client = answer.get("data", {}).get("client", {})
        ours = parse_mark(client.get("textname"))
        if ours is not None:
            return ours
        self._existed.add(node)
        return end

    async def _release(self, node: str) -> None:
        existed = node in self._existed
        command = {"command": "enableClient" if existed else "deleteClient", "username": node}
        try:
            answer = await self._command(command)
        except (TimeoutError, ConnectionError) as exc:
            self._failed(f"cannot end node {node}'s quarantine yet: {exc}", node)
            self.until[node] = time.time() + RETRY_S  # try again shortly
            return
        if answer.get("error") and answer["error"] != "Client not found":  # not found: released already
            self._failed(f"cannot end node {node}'s quarantine: {command['command']}: {answer['error']}", node)
            self.until[node] = time.time() + RETRY_S
            return
        self.until.pop(node, None)
        self._existed.discard(node)
        log.warning("node's quarantine at the broker ended: it may log in again", extra={"node": node})

    async def _restore(self) -> None:
        """After a connect: the broker's quarantines (ours, from before a restart, or another
        replica's) become ours to end."""
        try:
            answer = await self._command({"command": "listClients", "verbose": True, "count": -1, "offset": 0})
        except (TimeoutError, ConnectionError) as exc:
            self._failed(f"the broker does not answer dynamic-security commands: {exc}", None)
            return
        if answer.get("error"):
            self._failed(f"listClients: {answer['error']}", None)
            return
        self.ready = True
        clients = answer.get("data", {}).get("clients", [])
        for client in clients if isinstance(clients, list) else []:
            end = parse_mark(client.get("textname")) if isinstance(client, dict) else None
            if end is not None and isinstance(client.get("username"), str):
                if client["username"] not in self.until:
                    log.info("found a quarantine at the broker, ending at its time", extra={"node": client["username"]})
                self.until[client["username"]] = end

    # ---- commands and answers -------------------------------------------------------------------

    async def _command(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send one dynamic-security command; its response (a dict, with "error" when refused)."""
        self._check_link()
        correlation = self._correlation()
        self._expect(correlation)
        self._publish([{**command, "correlationData": correlation}])
        return await self._answer(correlation)

    def _correlation(self) -> str:
        return f"kgpu-{next(self._ids)}"  # itertools.count: safe from any thread

    def _expect(self, *correlations: str) -> None:
        """On the loop, before the commands leave: where their answers will go."""
        loop = asyncio.get_running_loop()
        for correlation in correlations:
            self._answers[correlation] = loop.create_future()

    def _check_link(self) -> None:
        assert self.link is not None
        if not self.link.connected.is_set():
            raise ConnectionError(self.link.last_error or "the admin connection to the broker is down")

    def _publish(self, commands: list[dict[str, Any]]) -> None:
        assert self.link is not None
        if not self.link.publish(CONTROL_TOPIC, _commands(commands), qos=1):
            raise ConnectionError("the admin connection's outgoing queue is full")

    async def _answer(self, correlation: str) -> dict[str, Any]:
        """The response to the command sent with `correlation` (expected with `_expect`)."""
        try:
            return await asyncio.wait_for(self._answers[correlation], ANSWER_TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(f"no answer on {RESPONSE_TOPIC} within {ANSWER_TIMEOUT_S:.0f} s (is mosquitto's "
                               "dynamic-security plugin loaded, and the admin user given its admin role?)") from None
        finally:
            self._answers.pop(correlation, None)

    def _on_message(self, message: Received) -> None:
        """On the admin link's network thread: hand the responses to the loop."""
        try:
            responses = json.loads(message.payload).get("responses", [])
        except (ValueError, AttributeError):
            log.warning("unreadable dynamic-security response ignored", extra={"topic": message.topic})
            return
        for response in responses if isinstance(responses, list) else []:
            if isinstance(response, dict):
                self._from_thread(functools.partial(self._deliver, response))

    def _deliver(self, response: dict[str, Any]) -> None:
        answer = self._answers.get(str(response.get("correlationData")))
        if answer is not None and not answer.done():
            answer.set_result(response)

    def _down(self) -> None:
        self.ready = False

    def _failed(self, problem: str, node: str | None) -> None:
        self.failures += 1
        self.ready = self.ready and node is not None  # a failed restore: not ready
        log.error("%s", problem, extra={"node": node} if node else None)
