"""One node flooding the controller at full speed while honest nodes go on: bounded memory, and
the honest nodes' events still acked within seconds (issue 12's done-when).

A real mosquitto and a real `kgpu cloud run` (SQLite, the shipped defaults). Honest nodes (the
fleet simulator, kgpu/lab/fleetsim/) send status, telemetry and an event a second each. One
flooder, a separate process writing raw MQTT 3.1.1 PUBLISH packets (QoS 0) to its own topic as
fast as its socket takes them, sends valid messages for `seconds`:

- `telemetry`: the same 8 GPUs in every sample (the messages and bytes budgets);
- `uuids`: a new GPU UUID in every sample (the GPUs budget);
- `events`: decisions with ever higher seqs (the events budget).

With `--quarantine` (the default) the broker loads mosquitto's dynamic-security plugin and the
controller gets its admin login (docs/broker.md): the flooder, which logs in as its node, is then
quarantined at the broker (cloud/quarantine.py) and keeps trying to log in again; printed too:
how soon it was disconnected and how many of its logins were refused. `--no-quarantine`: the
budgets alone, as on a broker without the plugin.

Printed: the controller's peak resident memory (VmHWM; and VmRSS sampled through the flood)
against the shipped 1 GiB limit, the honest nodes' event-to-ack lag (p50 / max) during the flood
against the 5 s target and against the same fleet without the flood, what the flooder sent, what
the controller dropped by budget, and the flag on the flooding node.

    python -m bench.flood --mode telemetry --seconds 30
    python -m bench.flood --mode all --seconds 30     # the three, one after the other
    python -m bench.flood --mode events --no-quarantine
    python -m bench.flood --mode events --replicas 2     # a $share group on PostgreSQL, as deployed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import Row, broker_and_controllers, metric_sum, start_postgres_server, tree_peak_rss_mib, tree_rss_mib
from cloud.ingest import DROP_REASONS
from kgpu.lab.fleetsim import FleetOptions, FleetSim
from kgpu.lab.fleetsim.node import percentile
from kgpu.lab.raw_mqtt import DISCONNECT, connect_packet, publish_packet, read_connack
from shared.gpu import GpuSample
from shared.mqtt import parse_broker_url
from shared.protocol import ActionOutcome, DecisionBody, Kind, TelemetryBody, make_envelope

if TYPE_CHECKING:
    from kgpu.lab.broker import Mosquitto
    from tests.helpers.cloud_process import CloudProcess

MODES = ("telemetry", "uuids", "events")
FLOODER = "flood-00000"
LIMIT_MIB = 1024.0  # the controller's memory limit in deploy/cloud/deployment.yaml
LAG_TARGET_S = 5.0
SEQ_MARK = 987_654_321  # replaced by each message's own seq
FLOODER_PASSWORD = "flooder-secret"  # the flooder logs in as its node, as a stolen or runaway login would
ADMIN = ("kgpu-broker-admin", "admin-secret")  # the dynamic-security admin the controller quarantines with


class LoginRefused(ConnectionError):
    """The broker answered CONNECT with a refusal (CONNACK code != 0)."""


# ---- the flooder: raw MQTT over a blocking socket (the fastest a client can publish) ------------


def connect(mqtt: str, client_id: str) -> socket.socket:
    """A connected MQTT 3.1.1 session (clean, keepalive 0: we never go quiet)."""
    address = parse_broker_url(mqtt)
    sock = socket.create_connection((address.host, address.port), timeout=10)
    username = address.username or None
    password = address.password if username and address.password else None
    sock.sendall(connect_packet(client_id, username, password))
    connack = read_connack(sock)
    if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
        sock.close()
        raise LoginRefused(f"broker refused the login: {connack!r}")
    return sock


def telemetry_payload(node: str, uuids: list[str], ts: float) -> bytes:
    """A telemetry envelope of `node` with one busy sample per GPU UUID, all at `ts`."""
    samples = [GpuSample(index=i, uuid=uuid, ts=ts, temperature_c=60.0, power_w=250.0, power_limit_w=700.0,
                         utilization_pct=80.0, memory_used_bytes=1 << 34) for i, uuid in enumerate(uuids)]
    envelope = make_envelope(node, TelemetryBody(samples=samples), Kind.TELEMETRY)
    envelope.ts = ts
    return envelope.to_json()


def payloads(node: str, mode: str) -> tuple[bytes, str, str]:
    """(a template payload, the placeholder to make unique per message, its topic)."""
    now = time.time()
    if mode == "telemetry":
        uuids = [f"GPU-{node}-{i}" for i in range(8)]
        return telemetry_payload(node, uuids, now), "", f"kgpu/v1/edge/{node}/telemetry"
    if mode == "uuids":
        return telemetry_payload(node, ["GPU-NEWUUIDMARK"], now), "NEWUUIDMARK", f"kgpu/v1/edge/{node}/telemetry"
    body = DecisionBody(gpu_index=0, gpu_uuid=f"GPU-{node}-0", rule="thermal_step_down", action="set_power_limit",
                        value=600.0, outcome=ActionOutcome.APPLIED, reason="flood", inputs={}, policy_version=1)
    envelope = make_envelope(node, body, Kind.DECISION, seq=SEQ_MARK)
    return envelope.to_json(), str(SEQ_MARK), f"kgpu/v1/edge/{node}/events"


def flood(mqtt: str, node: str, mode: str, seconds: float, rate: float = 0.0) -> dict[str, Any]:
    """Publish for `seconds` at `rate` messages a second (0: as fast as the socket takes them);
    disconnected, log in again (every 0.2 s while refused) until the time is up. Returns how many
    messages were sent, after how long the broker first disconnected it, and the logins refused."""
    template, marker, topic = payloads(node, mode)
    chunk = 100
    plain = publish_packet(topic, template)

    def packets(sent: int) -> bytes:
        if marker:  # the n-th message: seq n, or GPU UUID n (no leading zeros: a seq is a JSON number)
            return b"".join(publish_packet(topic, template.replace(marker.encode(), str(sent + i + 1).encode()))
                            for i in range(chunk))
        return plain * chunk

    started = time.monotonic()
    deadline = started + seconds
    sent, refused, kicked_after = 0, 0, None
    while (now := time.monotonic()) < deadline:
        try:
            sock = connect(mqtt, f"{node}-flooder")
        except LoginRefused:
            refused += 1
            time.sleep(min(0.2, max(0.0, deadline - now)))
            continue
        counted = [0]
        try:
            sent += send_paced(sock, packets, chunk, rate, deadline - now, counted)
        except OSError:  # the broker closed the connection
            sent += counted[0]
            sock.close()
            if kicked_after is None:
                kicked_after = time.monotonic() - started
    return {"sent": sent, "kicked_after_s": kicked_after, "refused_logins": refused}


def send_paced(sock: socket.socket, packets: Callable[[int], bytes], per_send: int, rate: float,
               seconds: float, counted: list[int] | None = None) -> int:
    """Send `packets(sent so far)` (`per_send` messages each time) for `seconds` at `rate`
    messages a second (0: as fast as the socket takes them), then DISCONNECT; returns how many
    were sent (fewer than asked when the broker reads slower). `counted[0]` follows the count, for
    a caller whose connection may be closed under it (OSError)."""
    sent = 0
    started = time.monotonic()
    deadline = started + seconds
    while (now := time.monotonic()) < deadline:
        if rate > 0 and sent > rate * (now - started):
            time.sleep(min(per_send / rate, deadline - now))
            continue
        sock.sendall(packets(sent))
        sent += per_send
        if counted is not None:
            counted[0] = sent
    sock.sendall(DISCONNECT)
    sock.close()
    return sent


# ---- the measurement ------------------------------------------------------------------------------


@dataclass
class FloodResult:
    mode: str
    seconds: float
    honest_nodes: int
    flood_sent: int
    rss_before_mib: float
    rss_peak_mib: float  # VmHWM: the peak resident set, its sample writer process's added
    rss_max_sampled_mib: float
    rss_after_mib: float
    dropped: dict[str, float]
    flagged: dict[str, str]  # node -> budget, as /metrics showed it during the flood
    baseline_lag_p50_s: float
    baseline_lag_max_s: float
    lag_p50_s: float
    lag_max_s: float
    honest_events: int  # acked during the flood
    honest_unacked_after: int
    gpu_rows_flooder: int
    flooder_events_stored: float  # all stored less the honest nodes' acked
    quarantine: bool  # the broker had the dynamic-security plugin and the controller its admin
    kicked_after_s: float | None  # when the broker first disconnected the flooder
    refused_logins: int  # the flooder's logins refused after that
    quarantines: float  # kgpu_broker_quarantines_total


def _flags(base: str) -> dict[str, str]:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    flags: dict[str, str] = {}
    for labels in re.findall(r"^kgpu_node_over_budget\{([^}]*)\} 1", text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        flags[found["node"]] = found["budget"]
    return flags


def start_replicas(stack: ExitStack, work: Path, broker_options: dict[str, Any], env: dict[str, str],
                   replicas: int) -> tuple[Mosquitto, list[CloudProcess]]:
    """A mosquitto and `replicas` controllers: one on SQLite, or a `$share` group on a throwaway
    PostgreSQL (as deploy/cloud/deployment.yaml runs them)."""
    if replicas == 1:
        return broker_and_controllers(stack, work, broker_options=broker_options, env=env)
    from tests.helpers.postgres import create_database

    server = start_postgres_server()
    stack.callback(server.stop)
    return broker_and_controllers(stack, work, broker_options=broker_options, env=env, count=replicas,
                                  db=create_database(server.admin_url), extra_args=["--shared-subscription", "kgpu"])


async def run(mode: str, seconds: float, honest: int = 5, warmup_s: float = 8.0, rate: float = 0.0,
              quarantine: bool = True, replicas: int = 1) -> FloodResult:
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        admin_password = tmp / "admin-password"
        admin_password.write_text(ADMIN[1] + "\n")
        broker_options: dict[str, Any] = {"users": {FLOODER: FLOODER_PASSWORD}, "allow_anonymous": True}
        env: dict[str, str] = {}
        if quarantine:
            broker_options["dynsec_admin"] = ADMIN
            env = {"KGPU_BROKER_ADMIN_USERNAME": ADMIN[0], "KGPU_BROKER_ADMIN_PASSWORD_FILE": str(admin_password)}
        broker, clouds = start_replicas(stack, tmp, broker_options, env, replicas)
        flooder_url = f"mqtt://{FLOODER}:{FLOODER_PASSWORD}@127.0.0.1:{broker.port}"
        pids = [cloud.proc.pid for cloud in clouds if cloud.proc is not None]

        def total(name: str, **labels: str) -> float:
            return sum(metric_sum(cloud.base, name, **labels) for cloud in clouds)

        sim = FleetSim(FleetOptions(mqtt=broker.url, nodes=honest, gpus=8, interval_s=2.0, event_every_s=1.0,
                                    status_interval_s=25.0, prefix="honest", ack_timeout_s=15.0))
        await sim.start()
        try:
            if not await sim.wait_connected(timeout_s=30):
                raise SystemExit("the honest nodes did not connect")
            await asyncio.sleep(warmup_s)
            baseline = sim.event_lag.window(since=time.monotonic() - warmup_s / 2)
            rss_before = max(tree_rss_mib(pid) for pid in pids)
            started = time.monotonic()
            flooder = subprocess.Popen(
                [sys.executable, "-m", "bench.flood", "--flooder", mode, "--mqtt", flooder_url, "--seconds", str(seconds),
                 "--rate", str(rate)], stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            rss_max, flagged = 0.0, {}
            while flooder.poll() is None:
                await asyncio.sleep(0.5)
                rss_max = max(rss_max, *(tree_rss_mib(pid) for pid in pids))
                for cloud in clouds:
                    try:
                        flagged.update(await asyncio.to_thread(_flags, cloud.base))
                    except OSError:
                        pass  # a scrape that timed out under the flood is a figure too: see the lag
            out, _ = flooder.communicate()
            ended = time.monotonic()
            report = json.loads(out.decode().strip().splitlines()[-1])
            sent = int(report["sent"])
            during = sim.event_lag.window(since=started, until=ended + 2.0)
            await asyncio.sleep(5.0)  # what the flood left queued is written; honest outboxes drain
            dropped = {reason: total("kgpu_ingest_dropped_total", reason=reason) for reason in DROP_REASONS}
            node = clouds[0].node_state(FLOODER) or {}
            gpu_rows = len(node.get("gpus") or [])
            result = FloodResult(
                mode=mode, seconds=ended - started, honest_nodes=honest, flood_sent=sent,
                rss_before_mib=rss_before, rss_peak_mib=max(tree_peak_rss_mib(pid) for pid in pids),
                rss_max_sampled_mib=rss_max, rss_after_mib=max(tree_rss_mib(pid) for pid in pids), dropped=dropped,
                flagged=flagged,
                baseline_lag_p50_s=percentile(baseline, 50), baseline_lag_max_s=baseline[-1] if baseline else float("nan"),
                lag_p50_s=percentile(during, 50), lag_max_s=during[-1] if during else float("nan"),
                honest_events=len(during), honest_unacked_after=sim.outbox_depth(), gpu_rows_flooder=gpu_rows,
                flooder_events_stored=total("kgpu_ingest_events_stored_total") - sim.counters.events_acked,
                quarantine=quarantine, kicked_after_s=report["kicked_after_s"],
                refused_logins=int(report["refused_logins"]), quarantines=total("kgpu_broker_quarantines_total"))
        finally:
            await sim.stop()
    return result


def describe(r: FloodResult) -> str:
    dropped = ", ".join(f"{k} {v:,.0f}" for k, v in r.dropped.items() if v) or "none"
    return (f"flood ({r.mode}): {r.flood_sent:,} messages in {r.seconds:.1f} s "
            f"({r.flood_sent / max(r.seconds, 1e-9):,.0f}/s) from {FLOODER}, {r.honest_nodes} honest nodes\n"
            f"  controller memory: {r.rss_before_mib:.0f} MiB before, peak {r.rss_peak_mib:.0f} MiB (VmHWM; "
            f"{r.rss_peak_mib / LIMIT_MIB:.0%} of the 1 GiB limit), {r.rss_after_mib:.0f} MiB after\n"
            f"  dropped by budget: {dropped}; flagged: {r.flagged or 'nothing'}\n"
            f"  honest event-to-ack lag: p50 {r.lag_p50_s:.2f} s, max {r.lag_max_s:.2f} s over {r.honest_events} "
            f"events (without the flood: p50 {r.baseline_lag_p50_s:.2f} s, max {r.baseline_lag_max_s:.2f} s); "
            f"{r.honest_unacked_after} unacked 5 s after\n"
            f"  flooder: {r.gpu_rows_flooder} GPU rows"
            + (f", {r.flooder_events_stored:,.0f} events stored" if r.mode == "events" else "")
            + (f"\n  quarantine at the broker: {r.quarantines:.0f} quarantine(s); the flooder disconnected after "
               + (f"{r.kicked_after_s:.2f} s" if r.kicked_after_s is not None else "never (it ran its whole time)")
               + f", {r.refused_logins} of its logins refused" if r.quarantine else
               "\n  quarantine at the broker: off (--no-quarantine)"))


def rows(r: FloodResult, command: str) -> list[Row]:
    name = f"flood ({r.mode})"
    within = "met" if r.rss_peak_mib < LIMIT_MIB / 2 else "NOT met"
    lag_ok = "met" if r.lag_max_s < LAG_TARGET_S else "NOT met"
    kicked = [Row(name, "flooder disconnected by the broker after", r.kicked_after_s, "s",
                  f"quarantined; {r.refused_logins} logins refused after", command)] if r.kicked_after_s is not None else []
    return [
        *kicked,
        Row(name, "flooder's messages per second", r.flood_sent / max(r.seconds, 1e-9), "msg/s",
            f"{sum(r.dropped.values()):,.0f} dropped by budget", command),
        Row(name, "controller peak memory (VmHWM)", r.rss_peak_mib, "MiB",
            f"{r.rss_peak_mib / LIMIT_MIB:.0%} of the 1 GiB limit; < 512 MiB {within}", command),
        Row(name, "honest nodes' event-to-ack lag, p50", r.lag_p50_s, "s",
            f"{r.lag_p50_s / r.baseline_lag_p50_s:.1f}x without the flood" if r.baseline_lag_p50_s > 0 else "", command),
        Row(name, "honest nodes' event-to-ack lag, max", r.lag_max_s, "s", f"< {LAG_TARGET_S:g} s {lag_ok}", command),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="telemetry", choices=(*MODES, "all"))
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--honest", type=int, default=5, help="honest nodes (an event a second each)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="the flooder's messages a second (default 0: as fast as it can)")
    parser.add_argument("--quarantine", action=argparse.BooleanOptionalAction, default=True,
                        help="the broker's dynamic-security plugin and the controller's admin login (default: on)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="controllers: 1 on SQLite, more as a $share group on a throwaway PostgreSQL")
    parser.add_argument("--flooder", choices=MODES, help=argparse.SUPPRESS)  # the flooding child process
    parser.add_argument("--mqtt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flooder:
        print(json.dumps(flood(args.mqtt, FLOODER, args.flooder, args.seconds, args.rate)))
        return 0
    os.environ.setdefault("KGPU_LOG_LEVEL", "warning")
    for mode in MODES if args.mode == "all" else (args.mode,):
        print(describe(asyncio.run(run(mode, args.seconds, args.honest, rate=args.rate, quarantine=args.quarantine,
                                          replicas=args.replicas))),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
