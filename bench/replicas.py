"""Past one machine: N controller replicas on a `$share` subscription and PostgreSQL, one backlog.

The backlog of bench/ingest_backlog.py (the fleet simulator's exact telemetry, every figure of 8 GPUs
in each message) waits at a real mosquitto for controllers that are connected and stopped (SIGSTOP); then
they are resumed and timed until every message is counted by the replicas together
(`kgpu_ingest_messages_total{kind="telemetry"}` plus rejected and dropped) and no replica has
anything waiting to be written, queued or in the batch being filled or written
(`kgpu_ingest_queue_depth`). Steps, each against a fresh database:

- `kgpu cloud run` on SQLite, one process (the peer: bench/ingest_backlog.py's controller);
- 1, 2, ... replicas of `kgpu cloud run` on one real PostgreSQL, all in the `$share/kgpu` group
  (one replica too, so that only the count changes between steps).

Each replica is pinned to a core of its own (every thread, `sched_setaffinity`) when the machine
has a core to spare beyond the largest step; mosquitto, PostgreSQL and this script are left
unpinned. Measured per step: msg/s and GPU samples/s together, CPU µs per message of each
replica, the speed-up over one replica, and the CPU of mosquitto (receiving the backlog, then
delivering it) and of PostgreSQL's processes during the drain. Extrapolated from those: the rate
at which mosquitto (one thread) would fill a core, and how many messages a second one core of
PostgreSQL absorbs (its server here runs with fsync off: disk is not part of the figure).

    python -m bench.replicas [--nodes 500] [--per-node 40] [--replicas 1,2] [--no-sqlite] [--pin auto]
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import Row, cpu_seconds, machine, metric_sum, publish_all, tree_cpu_seconds, wait_connected
from bench.ingest_backlog import Drain, drain_counts, payloads
from kgpu.lab.broker import Mosquitto
from tests.helpers.cloud_process import CloudProcess

GROUP = "kgpu"
DRAIN_TIMEOUT_S = 900.0
POLL_S = 0.2  # a few small /metrics requests per replica: the drain is timed to this


@dataclass
class Step:
    db: str  # "sqlite" or "postgresql"
    replicas: int
    cores: list[int | None]  # the core each replica ran on (None: unpinned)
    drain: Drain  # all replicas together: every message, the sum of their CPU
    share: list[Drain]  # each replica: the messages it counted, its CPU, the common drain time
    broker_in_s: float  # mosquitto's CPU while the backlog was published to it (QoS 1 in, queued out)
    broker_out_s: float  # mosquitto's CPU during the drain (delivering the queue)
    db_cpu_s: float  # PostgreSQL's processes during the drain; nan on SQLite (it runs in the controller)
    lost: float  # rejected or dropped by the controllers
    batches: list[float] = field(default_factory=list)  # each replica's store batches (size: is it behind?)

    @property
    def label(self) -> str:
        return f"{self.replicas} replica{'s' if self.replicas > 1 else ''} on {'SQLite' if self.db == 'sqlite' else 'PostgreSQL'}"

    def broker_us_per_message(self) -> float:
        return (self.broker_in_s + self.broker_out_s) / self.drain.received * 1e6

    def db_us_per_message(self) -> float:
        return self.db_cpu_s / self.drain.received * 1e6


@dataclass
class ScaleOut:
    messages: int
    nodes: int
    gpus: int
    payload_bytes: float
    pinning: str  # what was pinned, or why nothing was
    steps: list[Step] = field(default_factory=list)
    machine: str = ""

    def postgres(self, replicas: int) -> Step | None:
        return next((s for s in self.steps if s.db == "postgresql" and s.replicas == replicas), None)


def pin_cores(largest: int, mode: str) -> tuple[list[int] | None, str]:
    """The cores replicas are pinned to (replica i on the i-th), or None and why not. `auto` pins
    when one core is left over for mosquitto, PostgreSQL and this script; `on` whenever each
    replica can have a core of its own; `off` never."""
    allowed = sorted(os.sched_getaffinity(0))
    if mode == "off":
        return None, "replicas unpinned (--pin off)"
    needed = largest + 1 if mode == "auto" else largest
    if len(allowed) < needed:
        return None, (f"replicas unpinned: {len(allowed)} cores here, pinning {largest} replica(s) needs {needed} "
                      "(one each, one for mosquitto, PostgreSQL and the bench)"
                      + ("; --pin on pins them anyway" if mode == "auto" and len(allowed) >= largest else ""))
    cores = list(reversed(allowed))[:largest]  # the last cores; the first stay free for the rest
    spare = sorted(set(allowed) - set(cores))
    return cores, (f"replicas pinned one per core ({', '.join(map(str, cores))}); mosquitto, PostgreSQL and the "
                   f"bench unpinned ({'core ' + ', '.join(map(str, spare)) + ' free for them' if spare else 'no core free for them'})")


def pin(pid: int, core: int) -> None:
    """Every thread of `pid` onto `core` (sched_setaffinity on a pid moves only that thread;
    threads started later inherit their creator's mask)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), {core})
        except (ProcessLookupError, FileNotFoundError):
            continue


def _all(procs: list[CloudProcess], sig: signal.Signals) -> None:
    for cloud in procs:
        assert cloud.proc is not None
        cloud.proc.send_signal(sig)


def drain_step(url: str, broker_pid: int, messages: list[tuple[str, bytes]], workdir: Path, *, db: str,
               db_url: str | None, replicas: int, cores: list[int] | None, db_pid: int | None = None) -> Step:
    """Start `replicas` controllers (a `$share` group on PostgreSQL), stop them, publish the
    backlog, resume them and time them until every message is counted and nothing is queued."""
    extra = ["--shared-subscription", GROUP] if db == "postgresql" else []
    clouds = [CloudProcess(workdir / f"cloud{i}", url, db=db_url, extra_args=extra,
                           env={"KGPU_LOG_LEVEL": "warning"}) for i in range(replicas)]
    placed: list[int | None] = [cores[i] if cores else None for i in range(replicas)]
    with ExitStack() as stack:
        for cloud, core in zip(clouds, placed, strict=True):
            cloud.start()
            stack.callback(_stop, cloud)
            if core is not None:
                assert cloud.proc is not None
                pin(cloud.proc.pid, core)
        for cloud in clouds:
            wait_connected(cloud, timeout=60)
        time.sleep(1.0)  # every connection subscribed
        pids = [c.proc.pid for c in clouds if c.proc is not None]
        for pid, core in zip(pids, placed, strict=True):
            if core is not None:
                pin(pid, core)  # threads started since
                if os.sched_getaffinity(pid) != {core}:
                    raise SystemExit(f"replica {pid} is not on core {core}")
        _all(clouds, signal.SIGSTOP)
        try:
            broker0 = cpu_seconds(broker_pid)
            publish_all(url, messages, flush_s=300)
            time.sleep(1.0)  # the broker has routed every message into the subscribers' queues
            broker_in = cpu_seconds(broker_pid) - broker0
        finally:
            cpu0 = [tree_cpu_seconds(pid) for pid in pids]  # each with its sample writer process
            broker0 = cpu_seconds(broker_pid)
            db0 = tree_cpu_seconds(db_pid) if db_pid else 0.0
            started = time.perf_counter()
            _all(clouds, signal.SIGCONT)
        elapsed = _wait_drained(clouds, len(messages), started)
        cpu = [tree_cpu_seconds(pid) - c0 for pid, c0 in zip(pids, cpu0, strict=True)]
        broker_out = cpu_seconds(broker_pid) - broker0
        db_cpu = tree_cpu_seconds(db_pid) - db0 if db_pid else float("nan")
        got = [int(metric_sum(c.base, "kgpu_ingest_messages_total", kind="telemetry")) for c in clouds]
        batches = [metric_sum(c.base, "kgpu_ingest_batches_total") for c in clouds]
        lost = sum(metric_sum(c.base, "kgpu_ingest_rejected_total") + metric_sum(c.base, "kgpu_ingest_dropped_total")
                   for c in clouds)
    return Step(db=db, replicas=replicas, cores=placed, drain=Drain(elapsed, sum(cpu), sum(got)),
                share=[Drain(elapsed, c, g) for c, g in zip(cpu, got, strict=True)],
                broker_in_s=broker_in, broker_out_s=broker_out, db_cpu_s=db_cpu, lost=lost, batches=batches)


def _wait_drained(clouds: list[CloudProcess], total: int, started: float) -> float:
    """Seconds from `started` until every message was counted and none is waiting to be written
    in any replica (`kgpu_ingest_queue_depth` counts the batch being filled or written too)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        now = time.perf_counter()
        counts = [drain_counts(c.base) for c in clouds]
        if sum(counted for counted, _ in counts) >= total and all(queued == 0 for _, queued in counts):
            return now - started
        time.sleep(POLL_S)
    raise SystemExit(f"{len(clouds)} replica(s) did not drain the backlog within {DRAIN_TIMEOUT_S:.0f} s")


def _stop(cloud: CloudProcess) -> None:
    if cloud.proc is not None and cloud.proc.poll() is None:
        cloud.proc.send_signal(signal.SIGCONT)  # a stopped process would not hear SIGTERM
        cloud.stop()


def measure(nodes: int = 500, per_node: int = 40, gpus: int = 8, counts: tuple[int, ...] = (1, 2),
            sqlite: bool = True, pin_mode: str = "auto", say: Callable[[str], None] | None = None) -> ScaleOut:
    from tests.helpers.postgres import create_database, find_server_binaries, start_postgres

    binaries = find_server_binaries()
    if binaries is None:
        raise SystemExit("PostgreSQL server binaries not installed (apt-get install postgresql)")
    cores, pinning = pin_cores(max(counts), pin_mode)
    result = ScaleOut(messages=0, nodes=nodes, gpus=gpus, payload_bytes=0.0, pinning=pinning, machine=machine())
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        broker = Mosquitto(work / "broker").start()
        stack.callback(broker.stop)
        server = start_postgres(*binaries)
        stack.callback(server.stop)
        plan: list[tuple[str, int]] = ([("sqlite", 1)] if sqlite else []) + [("postgresql", n) for n in counts]
        for index, (db, replicas) in enumerate(plan):
            messages = payloads(nodes, per_node, gpus, "node")  # fresh timestamps for each step
            result.messages = len(messages)
            result.payload_bytes = sum(len(p) for _t, p in messages) / len(messages)
            db_url = create_database(server.admin_url) if db == "postgresql" else None
            step = drain_step(broker.url, broker.pid, messages, work / f"step{index}", db=db, db_url=db_url,
                              replicas=replicas, cores=cores,
                              db_pid=server.process.pid if db == "postgresql" else None)
            result.steps.append(step)
            if say is not None:
                say(f"  {step.label}: {step.drain.rate:,.0f} msg/s in {step.drain.seconds:.1f} s")
    return result


def _ceiling(us: float) -> float:
    return 1e6 / us if us > 0 else float("inf")


def describe(r: ScaleOut) -> str:
    one = r.postgres(1)
    lines = [
        f"{r.messages} telemetry messages drained by N controller replicas",
        f"  machine        {r.machine}",
        f"  backlog        {r.messages} messages ({r.nodes} nodes x {r.messages // max(r.nodes, 1)}, {r.gpus} GPUs "
        f"each, {r.payload_bytes:,.0f} bytes average), QoS 0 to the subscribers",
        f"  pinning        {r.pinning}",
    ]
    for s in r.steps:
        speedup = f"  x{s.drain.rate / one.drain.rate:.2f} over 1 replica" if one and s.db == "postgresql" else ""
        lines.append(f"  {s.label:<26}{s.drain.rate:>8,.0f} msg/s  {s.drain.rate * r.gpus:>9,.0f} GPU samples/s  "
                     f"{s.drain.seconds:6.2f} s{speedup}  lost {s.lost:.0f}")
        for i, (d, core, batches) in enumerate(zip(s.share, s.cores, s.batches, strict=True)):
            lines.append(f"    replica {i} {'core ' + str(core) if core is not None else 'unpinned':<9}"
                         f"{d.received:>7} msgs  {d.cpu_s / d.seconds * 100:4.0f} % of a core  "
                         f"{d.cpu_us_per_message:7.1f} µs CPU/msg  {batches:.0f} batches "
                         f"(~{d.received / max(batches, 1):.0f} msgs each)")
        db = "" if math.isnan(s.db_cpu_s) else (
            f"; PostgreSQL {s.db_cpu_s / s.drain.seconds * 100:.0f} % of a core, {s.db_us_per_message():.1f} µs/msg")
        lines.append(f"    mosquitto {s.broker_in_s:.2f} s CPU receiving + {s.broker_out_s:.2f} s delivering "
                     f"({s.broker_us_per_message():.1f} µs/msg), {s.broker_out_s / s.drain.seconds * 100:.0f} % of a "
                     f"core during the drain{db}")
    last = max((s for s in r.steps if s.db == "postgresql"), key=lambda s: s.replicas, default=None)
    if one is not None and last is not None:
        cpu_bound = _ceiling(one.drain.cpu_us_per_message)  # the least contended figure
        each = min(cpu_bound, one.drain.rate)  # below cpu_bound: one replica waits on PostgreSQL
        broker = _ceiling(last.broker_us_per_message())
        database = _ceiling(last.db_us_per_message())
        lines += [
            "  extrapolated (CPU per message times rate; not measured at those rates):",
            f"    1 replica, CPU-bound on a core      {cpu_bound:>9,.0f} msg/s  ({cpu_bound * r.gpus:,.0f} GPU samples/s; "
            f"measured {one.drain.rate:,.0f} at {one.share[0].cpu_s / one.drain.seconds * 100:.0f} % of a core)",
            f"    N replicas, a core each             N x {each:,.0f} msg/s until the broker or the database fills",
            f"    mosquitto fills its one thread at   {broker:>9,.0f} msg/s  ({broker * r.gpus:,.0f} GPU samples/s, "
            f"~{broker / each:.0f} replicas; from {last.label}, one publisher connection)",
            f"    PostgreSQL, per core it is given    {database:>9,.0f} msg/s  ({database * r.gpus:,.0f} GPU samples/s, "
            f"~{database / each:.1f} replicas per core; from {last.label}, fsync off: disk not counted)",
        ]
    return "\n".join(lines)


def table_rows(r: ScaleOut, command: str) -> list[Row]:
    label = f"replicas on a backlog ({r.messages} telemetry msgs x {r.gpus} GPUs)"
    one = r.postgres(1)
    rows: list[Row] = []
    for s in r.steps:
        compare = ""
        if s.db == "postgresql" and one is not None and s is not one:
            compare = f"x{s.drain.rate / one.drain.rate:.2f} over 1 replica"
        elif s.db == "postgresql" and r.steps[0].db == "sqlite":
            compare = f"{s.drain.rate / r.steps[0].drain.rate:.2f} of SQLite"
        pinned = "pinned" if any(c is not None for c in s.cores) else "unpinned"
        rows.append(Row(label, f"{s.label} ({pinned}) draining it", s.drain.rate, "msg/s", compare, command))
        rows.append(Row(label, f"{s.label}: CPU per message per replica", s.drain.cpu_us_per_message, "µs", "",
                        command))
    last = max((s for s in r.steps if s.db == "postgresql"), key=lambda s: s.replicas, default=None)
    if last is not None:
        rows.append(Row(label, "mosquitto CPU per message (in + out)", last.broker_us_per_message(), "µs",
                        f"one core at {_ceiling(last.broker_us_per_message()):,.0f} msg/s", command))
        rows.append(Row(label, "PostgreSQL CPU per message", last.db_us_per_message(), "µs",
                        f"one core at {_ceiling(last.db_us_per_message()):,.0f} msg/s", command))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--per-node", type=int, default=40, help="telemetry messages per node in the backlog")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts on PostgreSQL")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the single controller on SQLite")
    parser.add_argument("--pin", choices=["auto", "on", "off"], default="auto",
                        help="auto: pin each replica to a core when one core is left over; on: whenever each "
                             "replica can have its own; off: never")
    args = parser.parse_args()
    counts = tuple(int(n) for n in args.replicas.split(","))
    if not counts or min(counts) < 1:
        parser.error("--replicas: counts of at least 1")
    result = measure(args.nodes, args.per_node, args.gpus, counts, not args.no_sqlite, args.pin,
                     say=lambda text: print(text, file=sys.stderr, flush=True))
    print(describe(result))


if __name__ == "__main__":
    os.environ.setdefault("KGPU_LOG_LEVEL", "warning")
    main()
