"""`kgpu fleet-sim`: run a simulated fleet for a while, print a progress line now and then, and
return the figures (ingest lag percentiles, what was published, what was lost)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterable
from typing import Any

from kgpu.lab.fleetsim.fleet import FleetSim
from kgpu.lab.fleetsim.node import FleetOptions, percentile


def lag_summary(values: Iterable[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"count": float(len(ordered)), "p50": percentile(ordered, 50), "p95": percentile(ordered, 95),
            "p99": percentile(ordered, 99), "max": ordered[-1] if ordered else float("nan")}


def _fmt_lag(summary: dict[str, float]) -> str:
    if not summary["count"]:
        return "no samples"
    return (f"p50 {summary['p50']:.2f} s, p99 {summary['p99']:.2f} s, max {summary['max']:.2f} s "
            f"({summary['count']:.0f} samples)")


async def run_fleet(options: FleetOptions, duration_s: float, report_every_s: float = 10.0,
                    echo: Any = print) -> dict[str, Any]:
    """`kgpu fleet-sim`: run the fleet for `duration_s` (0: until cancelled), print progress lines,
    then stop cleanly and return the figures."""
    sim = FleetSim(options)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    if main is not None:
        loop.add_signal_handler(signal.SIGTERM, main.cancel)  # a supervisor's stop is as clean as Ctrl-C
    await sim.start()
    echo(f"fleet-sim: {options.nodes} nodes x {options.gpus} GPUs, telemetry every {options.interval_s:g} s, "
         f"an event per node every {options.event_every_s:g} s, {options.connections} MQTT connections "
         f"to {sim.address.display}")
    started = time.monotonic()
    last = started
    last_published = dict(sim.counters.published)
    try:
        while duration_s <= 0 or time.monotonic() - started < duration_s:
            await asyncio.sleep(min(report_every_s, max(0.1, duration_s - (time.monotonic() - started)))
                                if duration_s > 0 else report_every_s)
            now = time.monotonic()
            rates = {k: (v - last_published[k]) / max(now - last, 1e-9) for k, v in sim.counters.published.items()}
            last_published = dict(sim.counters.published)
            event_lag = lag_summary(sim.event_lag.window(last, now))
            probes = lag_summary(sim.telemetry_lag.window(last, now))
            echo(f"  t={now - started:5.0f}s up {sum(c.up for c in sim.connections)}/{len(sim.connections)} conns  "
                 f"telemetry {rates['telemetry']:.0f}/s  events {rates['events']:.0f}/s  "
                 f"outbox {sim.outbox_depth()}  event lag {_fmt_lag(event_lag)}"
                 + (f"  telemetry lag {_fmt_lag(probes)}" if options.cloud else ""))
            last = now
    except asyncio.CancelledError:
        pass
    finally:
        await sim.stop()
    c = sim.counters
    return {
        "nodes": options.nodes, "gpus": options.gpus, "connections": len(sim.connections),
        "published": dict(c.published), "events_created": c.events_created, "events_acked": c.events_acked,
        "event_lag": lag_summary(sim.event_lag.lag), "telemetry_lag": lag_summary(sim.telemetry_lag.lag),
        "outbox_depth": sim.outbox_depth(), "resend_timeouts": c.resend_timeouts, "rejected": dict(c.rejected),
        "disconnects": c.disconnects, "schedule_late_max_s": c.schedule_late_max_s,
    }
