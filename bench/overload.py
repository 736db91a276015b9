"""An overload minute: the controller driven past what it can ingest for a minute, then back to a
load it can carry. It must come back without its memory growing and without the edges re-sending
their events on top of its backlog (issue 17's "overload handled on purpose").

A real mosquitto and a real `kgpu cloud run` (SQLite, the shipped defaults), and two loads:

- the fleet (the fleet simulator, kgpu/lab/fleetsim/, in this process): `nodes` x 8 GPUs with
  telemetry every `interval` and an event every `event_every` per node, from outboxes that re-send
  unacked events as the edge does (edge/sync.py `resend_wait`: `ack_timeout` plus twice how far
  behind the last ack showed the cloud to be; `--fixed-timeout` for the plain 15 s of before);
- the surge (a separate process writing raw MQTT 3.1.1 PUBLISH packets, QoS 0): telemetry of
  `surge_nodes` nodes at `surge_rate` messages a second in all, each node within its ingest
  budget, for `surge_seconds`.

Printed, sampled every 2 s: the controller's resident memory (start, peak, end; VmHWM too), its
backlog (age of the oldest queued message, ingest queue, MQTT receive queues), what it wrote per
second; then how long after the surge it took to recover (backlog under a second, queues empty)
and to ack every event made before the surge ended; and the fleet's re-sends against the events
it made, during the surge and recovery. Figures from a busy machine are indicative.

    python -m bench.overload                                    # ~2.5 minutes
    python -m bench.overload --surge-rate 12000 --surge-seconds 60
    python -m bench.overload --fixed-timeout                     # the edges' re-sends before issue 17
    python -m bench.overload --ack-timeout 5 [--fixed-timeout]   # re-sends at a smaller lag
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    Row,
    broker_and_controller,
    machine,
    metric_sum,
    peak_rss_mib,
    rss_mib,
    tree_cpu_seconds,
    tree_peak_rss_mib,
    tree_rss_mib,
)
from bench.flood import connect, send_paced, telemetry_payload
from kgpu.lab.fleetsim import FleetOptions, FleetSim, percentile, raise_fd_limit
from kgpu.lab.raw_mqtt import publish_packet

ACK_TIMEOUT_S = 15.0  # the edge's default
ACK_TIMEOUT_MAX_S = 120.0  # the edge's default cap
TS_MARK = 1111111111.125  # replaced by the send time in every surge message
SAMPLE_EVERY_S = 2.0
RECOVERED_AGE_S = 1.0  # backlog age under this, queues (almost) empty: recovered
LIMIT_MIB = 1024.0  # the controller's memory limit in deploy/cloud/deployment.yaml


# ---- the surge: raw QoS 0 telemetry from a child process -----------------------------------------


def surge_block(nodes: int) -> bytes:
    """One PUBLISH (QoS 0) of each surge node's telemetry, 8 GPUs each, back to back, with
    TS_MARK where its times go (the send time has the mark's width: the packets' lengths hold)."""
    names = [f"surge-{n:05d}" for n in range(nodes)]
    return b"".join(publish_packet(f"kgpu/v1/edge/{node}/telemetry",
                                   telemetry_payload(node, [f"GPU-{node}-{i}" for i in range(8)], TS_MARK))
                    for node in names)


def surge(mqtt: str, nodes: int, rate: float, seconds: float) -> int:
    """Publish the nodes' telemetry, a block of one message per node at a time, at `rate`
    messages a second for `seconds`; returns how many were sent (fewer than asked when the broker
    reads slower)."""
    sock = connect(mqtt, f"surge-{os.getpid()}")
    block = surge_block(nodes)
    mark = f"{TS_MARK:.3f}".encode()
    return send_paced(sock, lambda _sent: block.replace(mark, f"{time.time():.3f}".encode()), nodes, rate, seconds)


# ---- the measurement ------------------------------------------------------------------------------


@dataclass
class Sample:
    at: float  # seconds since the surge started (negative: before)
    rss_mib: float
    backlog_age_s: float
    queue_depth: float
    receive_depth: float  # both MQTT receive queues
    written: float  # kgpu_ingest_messages_total, all kinds (accepted: written once queued)
    lag_max_s: float
    scrape_ms: float  # how long the controller took to answer /metrics


@dataclass
class OverloadResult:
    fixed_timeout: bool
    ack_timeout_s: float
    nodes: int
    surge_rate_asked: float
    surge_sent: int
    surge_seconds: float
    samples: list[Sample]
    rss_start_mib: float
    rss_peak_mib: float  # VmHWM, the controller's and its sample writer process's added
    writer_rss_peak_mib: float  # of which the sample writer process's
    rss_end_mib: float
    broker_rss_peak_mib: float
    recovered_after_s: float  # from the surge's end: backlog under RECOVERED_AGE_S, queues empty (nan: never)
    events_acked_after_s: float  # from the surge's end: every event made before it acked (nan: never)
    controller_cpu: float  # share of a core during the surge
    events_made: int  # in the surge and recovery window
    events_resent: int
    resend_timeouts: int
    events_made_before: int  # in the same length of time before the surge (the baseline's re-sends)
    events_resent_before: int
    dropped: float  # kgpu_ingest_dropped_total, all budgets
    event_lag_p50_s: float  # the fleet's events, first publish -> ack, during surge and recovery
    event_lag_max_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def write_rate_during(self) -> float:
        during = [s for s in self.samples if 0 <= s.at <= self.surge_seconds]
        if len(during) < 2:
            return float("nan")
        return (during[-1].written - during[0].written) / max(during[-1].at - during[0].at, 1e-9)

    @property
    def rss_growth_second_half_mib(self) -> float:
        """Resident memory at the surge's end less at its middle: about 0 when memory is bounded
        (the queues fill in the first seconds), growing with the surge's length when it is not."""
        half = [s.rss_mib for s in self.samples if self.surge_seconds / 2 <= s.at <= self.surge_seconds]
        return half[-1] - half[0] if len(half) >= 2 else float("nan")

    @property
    def scrape_ms_max(self) -> float:
        return max((s.scrape_ms for s in self.samples), default=float("nan"))

    @property
    def backlog_age_max(self) -> float:
        return max((s.backlog_age_s for s in self.samples), default=float("nan"))

    @property
    def resent_share(self) -> float:
        return self.events_resent / self.events_made if self.events_made else float("nan")


SCRAPED = ("kgpu_ingest_backlog_age_seconds", "kgpu_ingest_queue_depth", "kgpu_mqtt_receive_queue_depth",
           "kgpu_ingest_messages_total", "kgpu_ingest_lag_max_seconds")


def _scrape(base: str) -> tuple[list[float], float]:
    """The SCRAPED figures (each summed over its series) from ONE scrape of /metrics, and how
    long the scrape took (ms): the bench's own probe must not add to the overload it measures."""
    started = time.perf_counter()
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    took_ms = 1000 * (time.perf_counter() - started)
    totals = dict.fromkeys(SCRAPED, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return [totals[name] for name in SCRAPED], took_ms


async def run(*, nodes: int = 1000, interval_s: float = 10.0, event_every_s: float = 10.0,
              surge_nodes: int = 200, surge_rate: float = 12000.0, surge_seconds: float = 60.0,
              warmup_s: float = 15.0, recover_limit_s: float = 90.0, fixed_timeout: bool = False,
              ack_timeout_s: float = ACK_TIMEOUT_S) -> OverloadResult:
    # the simulator's outboxes re-send as the edge does (edge/sync.py `resend_wait`); a cap equal to
    # the timeout is the fixed timeout of before
    options = FleetOptions(mqtt="mqtt://127.0.0.1:1", nodes=nodes, gpus=8, interval_s=interval_s,
                           event_every_s=event_every_s, ack_timeout_s=ack_timeout_s,
                           ack_timeout_max_s=ack_timeout_s if fixed_timeout else ACK_TIMEOUT_MAX_S,
                           prefix="fleet", nodes_per_connection=10)
    raise_fd_limit(options.connections + 512)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        broker, cloud = await asyncio.to_thread(broker_and_controller, stack, tmp)
        assert cloud.proc is not None and broker.proc is not None
        pid, broker_pid = cloud.proc.pid, broker.proc.pid
        options = FleetOptions(**{**options.__dict__, "mqtt": broker.url})
        sim = FleetSim(options)
        await sim.start()
        samples: list[Sample] = []
        broker_peak = 0.0
        try:
            if not await sim.wait_connected(timeout_s=60):
                raise SystemExit("the fleet did not connect")
            await asyncio.sleep(warmup_s / 2)
            before = (sim.counters.events_created, sim.counters.resent_events)
            await asyncio.sleep(warmup_s / 2)
            rss_start = tree_rss_mib(pid)
            made0, resent0, timeouts0 = (sim.counters.events_created, sim.counters.resent_events,
                                         sim.counters.resend_timeouts)
            made_before = made0 - before[0]
            resent_before = resent0 - before[1]
            started = time.monotonic()
            cpu0 = tree_cpu_seconds(pid)  # with its sample writer process
            child = subprocess.Popen(
                [sys.executable, "-m", "bench.overload", "--surge-child", "--mqtt", broker.url,
                 "--surge-nodes", str(surge_nodes), "--surge-rate", str(surge_rate),
                 "--surge-seconds", str(surge_seconds)],
                stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})

            async def sample() -> Sample:
                nonlocal broker_peak
                broker_peak = max(broker_peak, rss_mib(broker_pid))
                rss = tree_rss_mib(pid)
                try:
                    (age, depth, receive, written, lag), took_ms = await asyncio.to_thread(_scrape, cloud.base)
                except OSError:  # a scrape that timed out is a figure too: it shows as nan
                    age = depth = receive = written = lag = took_ms = float("nan")
                return Sample(time.monotonic() - started, rss, age, depth, receive, written, lag, took_ms)

            while child.poll() is None:
                samples.append(await sample())
                await asyncio.sleep(SAMPLE_EVERY_S)
            out, _ = child.communicate()
            ended = time.monotonic()
            cpu = (tree_cpu_seconds(pid) - cpu0) / (ended - started)
            sent = int(json.loads(out.decode().strip().splitlines()[-1])["sent"])
            marks = sim.seq_marks()
            recovered = acked = float("nan")
            while time.monotonic() - ended < recover_limit_s and (math.isnan(recovered) or math.isnan(acked)):
                last = await sample()
                samples.append(last)
                since = time.monotonic() - ended
                if math.isnan(recovered) and last.backlog_age_s < RECOVERED_AGE_S and last.queue_depth < 100 \
                        and last.receive_depth < 100:
                    recovered = since
                if math.isnan(acked) and sim.all_acked(marks):
                    acked = since
                await asyncio.sleep(SAMPLE_EVERY_S / 2)
            for _ in range(3):  # a little of the sustainable load after recovery: memory settles
                samples.append(await sample())
                await asyncio.sleep(SAMPLE_EVERY_S)
            lags = sim.event_lag.window(started, time.monotonic())
            made = sim.counters.events_created - made0
            resent = sim.counters.resent_events - resent0
            timeouts = sim.counters.resend_timeouts - timeouts0
            notes = []
            if sim.counters.schedule_late_max_s > 2.0:
                notes.append(f"the simulator fell {sim.counters.schedule_late_max_s:.1f} s behind its own schedule")
            if sent < 0.9 * surge_rate * surge_seconds:
                notes.append(f"the surge sent {sent / surge_seconds:.0f} msg/s, not {surge_rate:.0f}: the broker "
                             "read slower")
            dropped = metric_sum(cloud.base, "kgpu_ingest_dropped_total")
            if max((s.backlog_age_s for s in samples), default=0.0) < 2.0 and not recovered > 2.0:
                # the controller's own queues are bounded, so an overload's backlog waits in the
                # broker: it shows as the time to recover, not as the controller's backlog age
                notes.append("the backlog never passed 2 s and was gone within 2 s of the surge's end: "
                             "not overloaded, raise --surge-rate")
            peak = tree_peak_rss_mib(pid)  # with its sample writer process
            result = OverloadResult(
                fixed_timeout=fixed_timeout, ack_timeout_s=ack_timeout_s, nodes=nodes, surge_rate_asked=surge_rate, surge_sent=sent,
                surge_seconds=ended - started, samples=samples, rss_start_mib=rss_start,
                rss_peak_mib=peak, writer_rss_peak_mib=peak - peak_rss_mib(pid),
                rss_end_mib=tree_rss_mib(pid), broker_rss_peak_mib=broker_peak,
                recovered_after_s=recovered, events_acked_after_s=acked, controller_cpu=cpu,
                events_made=made, events_resent=resent, resend_timeouts=timeouts,
                events_made_before=made_before, events_resent_before=resent_before, dropped=dropped,
                event_lag_p50_s=percentile(lags, 50), event_lag_max_s=lags[-1] if lags else float("nan"), notes=notes)
        finally:
            await sim.stop()
    return result


def describe(r: OverloadResult) -> str:
    rule = (f"a fixed {r.ack_timeout_s:g} s ack timeout (before issue 17)" if r.fixed_timeout
            else f"{r.ack_timeout_s:g} s + 2x the lag (resend_wait)")
    lines = [
        f"overload: fleet {r.nodes} nodes x 8 GPUs, edges re-send after {rule}; surge {r.surge_sent:,} telemetry "
        f"messages in {r.surge_seconds:.0f} s ({r.surge_sent / max(r.surge_seconds, 1e-9):,.0f}/s asked "
        f"{r.surge_rate_asked:,.0f}/s)",
        f"  controller wrote        {r.write_rate_during:,.0f} msg/s during the surge, at {100 * r.controller_cpu:.0f} % "
        f"of a core; dropped by budget {r.dropped:,.0f}",
        f"  controller memory       start {r.rss_start_mib:.0f} MiB, peak {r.rss_peak_mib:.0f} MiB (VmHWM, "
        f"{r.rss_peak_mib / LIMIT_MIB:.0%} of the 1 GiB limit; the sample writer process {r.writer_rss_peak_mib:.0f} "
        f"MiB of it), end {r.rss_end_mib:.0f} MiB; "
        f"{r.rss_growth_second_half_mib:+.0f} MiB over the surge's second half; mosquitto peak "
        f"{r.broker_rss_peak_mib:.0f} MiB",
        f"  backlog age max         {r.backlog_age_max:.1f} s; /metrics answered in {r.scrape_ms_max:.0f} ms at worst",
        f"  recovered               {_after(r.recovered_after_s)} after the surge (backlog < {RECOVERED_AGE_S:g} s, "
        f"queues empty); events made before its end all acked {_after(r.events_acked_after_s)} after",
        f"  fleet's event -> ack    p50 {r.event_lag_p50_s:.1f} s, max {r.event_lag_max_s:.1f} s during surge and "
        "recovery",
        f"  re-sends                {r.events_resent:,} of {r.events_made:,} events made during surge and recovery "
        f"({_pct(r.resent_share)}), {r.resend_timeouts} ack timeouts; before the surge "
        f"{r.events_resent_before} of {r.events_made_before}",
        "  over time (s: RSS MiB, backlog age s, ingest queue, MQTT receive queues, worst node lag s):",
    ]
    for s in r.samples[:: max(1, len(r.samples) // 30)]:
        lines.append(f"    {s.at:6.0f}: {s.rss_mib:6.0f} {s.backlog_age_s:7.1f} {s.queue_depth:7.0f} "
                     f"{s.receive_depth:7.0f} {s.lag_max_s:7.1f}")
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)


def _after(seconds: float) -> str:
    return "NOT within the limit" if math.isnan(seconds) else f"{seconds:.0f} s"


def _pct(share: float) -> str:
    return "-" if math.isnan(share) else f"{100 * share:.1f} %"


def rows(r: OverloadResult, command: str) -> list[Row]:
    name = "overload minute" + (f" (fixed {r.ack_timeout_s:g} s timeout)" if r.fixed_timeout else "")
    flat = r.rss_growth_second_half_mib < 0.1 * r.rss_peak_mib and r.rss_peak_mib < LIMIT_MIB / 2
    storm = r.resent_share < 0.05 if not math.isnan(r.resent_share) else False
    return [
        Row(name, "controller memory, peak (VmHWM)", r.rss_peak_mib, "MiB",
            f"start {r.rss_start_mib:.0f}, end {r.rss_end_mib:.0f}, {r.rss_growth_second_half_mib:+.0f} over the surge's "
            f"second half; flat (< 10 %) and < 512 MiB: "
            f"{'-' if math.isnan(r.rss_growth_second_half_mib) else 'met' if flat else 'NOT met'}", command),
        Row(name, "backlog age, worst", r.backlog_age_max, "s", "", command),
        Row(name, "recovery after the surge (backlog < 1 s)", r.recovered_after_s, "s", "", command),
        Row(name, "events re-sent / made (surge + recovery)", 100 * r.resent_share, "%",
            f"< 5 % {'met' if storm else 'NOT met'}", command),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000, help="the fleet's nodes (8 GPUs each)")
    parser.add_argument("--interval", type=float, default=10.0, help="the fleet's telemetry interval")
    parser.add_argument("--event-every", type=float, default=10.0, help="mean seconds between events of one node")
    parser.add_argument("--surge-nodes", type=int, default=200)
    parser.add_argument("--surge-rate", type=float, default=12000.0, help="surge telemetry messages per second")
    parser.add_argument("--surge-seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--fixed-timeout", action="store_true",
                        help="edges re-send after a fixed --ack-timeout, as before issue 17")
    parser.add_argument("--ack-timeout", type=float, default=ACK_TIMEOUT_S,
                        help="the fleet's ack timeout (the edge's default 15 s; shorter: re-sends at a smaller lag)")
    parser.add_argument("--surge-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mqtt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.surge_child:
        print(json.dumps({"sent": surge(args.mqtt, args.surge_nodes, args.surge_rate, args.surge_seconds)}))
        return 0
    os.environ.setdefault("KGPU_LOG_LEVEL", "warning")
    print(f"machine: {machine()}", flush=True)
    result = asyncio.run(run(nodes=args.nodes, interval_s=args.interval, event_every_s=args.event_every,
                             surge_nodes=args.surge_nodes, surge_rate=args.surge_rate,
                             surge_seconds=args.surge_seconds, warmup_s=args.warmup, fixed_timeout=args.fixed_timeout,
                             ack_timeout_s=args.ack_timeout))
    print(describe(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
