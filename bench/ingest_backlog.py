"""Draining a broker backlog of the fleet simulator's telemetry: the controller beside the wire.

A real mosquitto; N telemetry messages (the fleet simulator's exact payloads, `kgpu/lab/fleetsim/`:
8 GPUs each, every figure the edge reports, ~4.7 kB) wait at the broker for a subscriber that is
connected and stopped (SIGSTOP: the broker queues them for it, the controller's telemetry
connection being a clean session at QoS 0, as the edges publish it). Then it is resumed and timed
until it has them all:

(a) `mosquitto_sub` (a C client: the wire's floor), (b) a bare paho subscriber (paho's network
loop and a counter, nothing else), (c) `kgpu cloud run` on SQLite: until every message is counted
by its ingest and nothing waits to be written (`kgpu_ingest_messages_total{kind="telemetry"}` and
`kgpu_ingest_queue_depth`, polled in one request every 0.1 s, every 0.01 s once the controller holds
them all). CPU seconds of each process during the drain.

    python -m bench.ingest_backlog [--nodes 500] [--per-node 40] [--gpus 8]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    Row,
    cpu_seconds,
    machine,
    metric_sum,
    metric_sums,
    publish_all,
    tree_cpu_seconds,
    wait_connected,
)
from kgpu.lab.broker import Mosquitto
from kgpu.lab.fleetsim.node import SimNode, envelope_json, telemetry_body
from shared.mqtt import parse_broker_url
from shared.protocol import Kind
from tests.helpers.cloud_process import CloudProcess

TELEMETRY_FILTER = "kgpu/v1/edge/+/telemetry"


def payloads(nodes: int, per_node: int, gpus: int, prefix: str) -> list[tuple[str, bytes]]:
    """The fleet simulator's telemetry, node after node in turns (as a fleet sends it), 10 s apart."""
    rng = random.Random(17)
    fleet = [SimNode(i, f"{prefix}-{i:05d}", gpus, rng) for i in range(nodes)]
    start = time.time() - per_node * 10.0
    out = []
    for step in range(per_node):
        now = start + step * 10.0
        for node in fleet:
            body = telemetry_body(node, rng, now)
            out.append((node.topics["telemetry"], envelope_json(node.name, Kind.TELEMETRY, body, ts=now)))
    return out


@dataclass
class Drain:
    seconds: float
    cpu_s: float
    received: int

    @property
    def rate(self) -> float:
        return self.received / self.seconds

    @property
    def cpu_us_per_message(self) -> float:
        return self.cpu_s / self.received * 1e6


def _child_drain(args: list[str], url: str, messages: list[tuple[str, bytes]], settle_s: float = 0.0) -> Drain:
    """A subscriber process that prints `ready` once subscribed (or `settle_s` before) and exits
    after len(messages)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise SystemExit(f"{args[0]} did not subscribe")
        time.sleep(settle_s)
        proc.send_signal(signal.SIGSTOP)
        publish_all(url, messages, flush_s=300)
        time.sleep(1.0)  # the broker has routed every message into the subscriber's queue
        before = cpu_seconds(proc.pid)
        started = time.perf_counter()
        proc.send_signal(signal.SIGCONT)
        _pid, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - started
        if status != 0:
            raise SystemExit(f"{args[0]} exited with {status} (messages lost by the broker?)")
        return Drain(elapsed, usage.ru_utime + usage.ru_stime - before, len(messages))
    finally:
        if proc.returncode is None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


def mosquitto_sub_drain(url: str, messages: list[tuple[str, bytes]]) -> Drain:
    address = parse_broker_url(url)
    # `-F ''` prints an empty line per message: the C client's floor, without the payload's output
    args = ["sh", "-c", f"echo ready; exec mosquitto_sub -h {address.host} -p {address.port} -q 0 "
            f"-t '{TELEMETRY_FILTER}' -C {len(messages)} -F '' -i bench-c-sub > /dev/null"]
    return _child_drain(args, url, messages, settle_s=1.0)  # sh execs mosquitto_sub, which then subscribes


def bare_paho_drain(url: str, messages: list[tuple[str, bytes]]) -> Drain:
    address = parse_broker_url(url)
    args = [sys.executable, "-m", "bench.ingest_backlog", "--bare-subscriber", f"{address.host}:{address.port}",
            str(len(messages))]
    return _child_drain(args, url, messages)


def bare_subscriber(hostport: str, count: int) -> None:
    """The bare paho subscriber's process: subscribe, say `ready`, count `count` messages, exit."""
    import paho.mqtt.client as paho

    host, port = hostport.rsplit(":", 1)
    received = 0
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-paho-sub", clean_session=True)

    def on_subscribe(*_args: object) -> None:
        print("ready", flush=True)

    def on_message(_client: object, _userdata: object, _message: object) -> None:
        nonlocal received
        received += 1
        if received >= count:
            client.disconnect()

    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_connect = lambda c, *_a: c.subscribe(TELEMETRY_FILTER, 0)
    client.connect(host, int(port))
    client.loop_forever()
    sys.exit(0 if received >= count else 1)


_DRAIN_METRICS = [("kgpu_ingest_messages_total", {"kind": "telemetry"}), ("kgpu_ingest_rejected_total", {}),
                  ("kgpu_ingest_dropped_total", {}), ("kgpu_ingest_queue_depth", {})]


# The drain's end is known to a poll's interval: 0.1 s while the controller reads the backlog (a
# request costs it some 0.6 ms of CPU), and 0.01 s once it holds all of it (counted, or waiting to
# be written: the sample writer process's last batches are being written and the controller's core
# is free): the bare paho subscriber's end is exact (its exit), and a 0.1 s poll added 0.05 s on
# average to a drain of 1.5-1.7 s.
POLL_S = 0.1
POLL_NEAR_END_S = 0.01


def drain_counts(base: str) -> tuple[float, float]:
    """(telemetry messages counted by the ingest: written, rejected or dropped; messages waiting to
    be written), in one request (polled every POLL_S, then POLL_NEAR_END_S)."""
    written, rejected, dropped, queued = metric_sums(base, _DRAIN_METRICS)
    return written + rejected + dropped, queued


def cloud_drain(url: str, messages: list[tuple[str, bytes]], workdir: Path,
                profile: Path | None = None) -> tuple[Drain, float, float, float]:
    """kgpu cloud run on SQLite; (drain with the CPU of the controller and its sample writer process,
    messages rejected or dropped, batches, the sample writer process's share of that CPU). `profile`: py-spy
    records the controller's threads during the drain into that file (flame graph input)."""
    cloud = CloudProcess(workdir / "cloud", url, env={"KGPU_LOG_LEVEL": "warning"}).start()
    try:
        wait_connected(cloud, timeout=30)
        time.sleep(1.0)  # both connections subscribed
        assert cloud.proc is not None
        pid = cloud.proc.pid
        cloud.proc.send_signal(signal.SIGSTOP)
        try:
            publish_all(url, messages, flush_s=300)
            time.sleep(1.0)
        finally:
            before, before_own = tree_cpu_seconds(pid), cpu_seconds(pid)  # with its sample writer process
            started = time.perf_counter()
            cloud.proc.send_signal(signal.SIGCONT)
        spy = _py_spy(pid, profile) if profile is not None else None
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            counted, queued = drain_counts(cloud.base)
            if counted >= len(messages) and queued == 0:
                break
            time.sleep(POLL_NEAR_END_S if counted + queued >= len(messages) else POLL_S)
        else:
            raise SystemExit("the controller did not drain the backlog within 900 s")
        elapsed = time.perf_counter() - started
        cpu = tree_cpu_seconds(pid) - before
        writer_cpu = cpu - (cpu_seconds(pid) - before_own)
        lost = metric_sum(cloud.base, "kgpu_ingest_rejected_total") + metric_sum(cloud.base, "kgpu_ingest_dropped_total")
        got = metric_sum(cloud.base, "kgpu_ingest_messages_total", kind="telemetry")
        batches = metric_sum(cloud.base, "kgpu_ingest_batches_total")
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
            spy.wait(timeout=60)
    finally:
        cloud.stop()
    return Drain(elapsed, cpu, int(got)), lost, batches, writer_cpu


def _py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy (a development tool, not a dependency) sampling `pid` until interrupted: only the
    thread holding the GIL (`--gil`), so that the stacks add up to the Python CPU time."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        raise SystemExit("--profile needs py-spy beside this Python (pip install py-spy)")
    return subprocess.Popen([str(spy), "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                             "--threads", "--gil", "--output", str(out)], stdout=subprocess.DEVNULL)


@dataclass
class Backlog:
    messages: int
    nodes: int
    gpus: int
    payload_bytes: float
    c_sub: Drain
    paho: Drain
    cloud: Drain
    cloud_lost: float
    cloud_batches: float
    cloud_writer_cpu_s: float  # of cloud.cpu_s: the sample writer process's
    machine: str


def measure(nodes: int = 500, per_node: int = 40, gpus: int = 8, profile: Path | None = None) -> Backlog:
    host = machine()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker").start()
        try:
            c_sub = mosquitto_sub_drain(broker.url, payloads(nodes, per_node, gpus, "c"))
            paho = bare_paho_drain(broker.url, payloads(nodes, per_node, gpus, "paho"))
            messages = payloads(nodes, per_node, gpus, "node")
            cloud, lost, batches, writer_cpu = cloud_drain(broker.url, messages, work, profile)
        finally:
            broker.stop()
    size = sum(len(p) for _t, p in messages) / len(messages)
    return Backlog(len(messages), nodes, gpus, size, c_sub, paho, cloud, lost, batches, writer_cpu, host)


def describe(r: Backlog) -> str:
    def line(name: str, d: Drain) -> str:
        return (f"  {name:<26}{d.rate:>9,.0f} msg/s  {d.seconds:6.2f} s  "
                f"{d.cpu_us_per_message:7.1f} µs CPU/msg  ({d.received} messages)")

    return "\n".join([
        "draining a broker backlog of the fleet simulator's telemetry",
        f"  machine                   {r.machine}",
        f"  backlog                   {r.messages} telemetry messages ({r.nodes} nodes x {r.messages // r.nodes}, "
        f"{r.gpus} GPUs each, {r.payload_bytes:,.0f} bytes average), QoS 0 to the subscriber",
        line("mosquitto_sub (C)", r.c_sub),
        line("bare paho subscriber", r.paho),
        line("kgpu cloud run (SQLite)", r.cloud),
        f"    of which the controller {(r.cloud.cpu_s - r.cloud_writer_cpu_s) / r.cloud.received * 1e6:.1f} µs/msg, "
        f"its sample writer process {r.cloud_writer_cpu_s / r.cloud.received * 1e6:.1f} µs/msg",
        f"  GPU samples/s (cloud)     {r.cloud.rate * r.gpus:,.0f}",
        f"  cloud / bare paho         {r.cloud.rate / r.paho.rate:.3f}",
        f"  cloud / mosquitto_sub     {r.cloud.rate / r.c_sub.rate:.3f}",
        f"  bare paho / mosquitto_sub {r.paho.rate / r.c_sub.rate:.3f}",
        f"  cloud rejected or dropped {r.cloud_lost:.0f}   batches {r.cloud_batches:.0f}",
    ])


def table_rows(r: Backlog, command: str) -> list[Row]:
    label = f"ingest backlog ({r.messages} telemetry msgs x {r.gpus} GPUs)"
    return [
        Row(label, "mosquitto_sub (C) draining it", r.c_sub.rate, "msg/s", "", command),
        Row(label, "bare paho subscriber draining it", r.paho.rate, "msg/s",
            f"{r.paho.rate / r.c_sub.rate:.2f} of mosquitto_sub", command),
        Row(label, "kgpu cloud run (SQLite) draining it", r.cloud.rate, "msg/s",
            f"{r.cloud.rate / r.paho.rate:.3f} of bare paho", command),
        Row(label, "kgpu cloud run CPU per message", r.cloud.cpu_us_per_message, "µs",
            f"bare paho {r.paho.cpu_us_per_message:.0f} µs", command),
    ]


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--bare-subscriber":
        bare_subscriber(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--per-node", type=int, default=40, help="telemetry messages per node in the backlog")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--profile", type=Path, help="py-spy the controller's drain into this file (raw "
                        "stacks: flamegraph.pl or speedscope read it)")
    args = parser.parse_args()
    print(describe(measure(args.nodes, args.per_node, args.gpus, args.profile)))


if __name__ == "__main__":
    main()
