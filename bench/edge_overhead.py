"""Edge daemon overhead: CPU time per sampling cycle and RSS, 8 simulated GPUs at 1 s.

Starts `kgpu edge run --backend sim --sim-gpus 8 --interval 1` as a real process, lets it warm up,
then reads its CPU time (utime+stime from /proc/<pid>/stat) and its cycle counter from /metrics over
a measured window. Baseline: a bare `python3 -c 'sleep'` process (RSS) — the floor of any Python
daemon. The simulated driver runs inside the daemon, so its cost (which the real libnvidia-ml,
written in C, would replace) is included: the figures are an upper bound.

Its peer, in the same window (issue 17): the NVML floor, a bare loop in its own process making the
same pynvml calls over the same simulated driver (`NvmlDriver.sample` of every GPU, once a second,
with the same load), and nothing else: no policy, health, store, metrics or HTTP. The ratio of the
two CPU times per cycle is what the daemon costs beyond reading the GPUs (goal: at most 2x).
The daemon's other NVML work is left out of the peer: its XID watcher's event wait (a blocked
call on a real driver; about nothing in the simulation's) and the MIG state read once per GPU.

    python -m bench.edge_overhead [--seconds 60] [--gpus 8]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

from bench.common import Row, cpu_seconds, rss_mib
from kgpu.lab.processes import LabError, free_port, wait_for


def metric(base: str, name: str) -> float:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


@dataclass
class Overhead:
    gpus: int
    window_s: float
    cycles: float
    cpu_share: float  # of one core
    cpu_per_cycle_ms: float
    loop_per_cycle_ms: float
    daemon_rss_mib: float
    bare_rss_mib: float
    floor_cpu_per_cycle_ms: float = float("nan")  # the bare NVML loop's, same window

    @property
    def floor_ratio(self) -> float:
        return self.cpu_per_cycle_ms / self.floor_cpu_per_cycle_ms


LOAD = b'{"processes": [{"pid": 1, "used_memory_mib": 512, "sm_util": 60}]}'


def nvml_floor_loop(gpus: int, counter: str) -> None:
    """The peer process: the simulated driver with the daemon's load, and every GPU sampled through
    `NvmlDriver` once a second; the cycle count written to `counter` after each cycle."""
    import json

    from edge.driver.nvml import NvmlDriver
    from edge.sim import install

    sim = install(gpus, "H100", seed="bench-floor")
    load = json.loads(LOAD)
    for index in range(gpus):
        sim.inject(index, load)
    driver = NvmlDriver()
    driver.open()
    # the count is written in place (it only grows), not by opening the file every cycle: the
    # measuring costs the peer as little as it can
    fd, cycles, next_at = os.open(counter, os.O_WRONLY | os.O_CREAT, 0o644), 0, time.monotonic()
    while True:
        for index in range(driver.device_count()):
            driver.sample(index)
        cycles += 1
        os.pwrite(fd, str(cycles).encode(), 0)
        next_at += 1.0
        time.sleep(max(0.0, next_at - time.monotonic()))


def measure(seconds: float = 60.0, gpus: int = 8, warmup: float = 10.0) -> Overhead:
    """One real edge daemon (sim backend, 1 s interval, load on every GPU) over `seconds`."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "kgpu", "edge", "run", "--node", "bench", "--backend", "sim",
             "--sim-gpus", str(gpus), "--interval", "1", "--db", f"{tmp}/edge.db",
             "--http", f"127.0.0.1:{port}", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        counter = f"{tmp}/floor-cycles"
        floor = subprocess.Popen([sys.executable, "-m", "bench.edge_overhead", "--nvml-floor-loop", counter,
                                  "--gpus", str(gpus)], stdout=subprocess.DEVNULL)

        def floor_cycles() -> float:
            try:
                return float(open(counter).read() or "nan")
            except (OSError, ValueError):
                return float("nan")
        try:
            def up() -> bool:
                if daemon.poll() is not None:
                    raise SystemExit("daemon did not start")
                urllib.request.urlopen(f"{base}/healthz", timeout=1)
                return True

            try:
                wait_for(up, 30, 0.2, "the daemon's /healthz", ignore=(OSError,))
            except LabError:
                raise SystemExit("daemon did not start") from None
            # load on every GPU so that every figure and the policy are exercised
            for index in range(gpus):
                req = urllib.request.Request(f"{base}/api/v1/sim/gpus/{index}", method="POST",
                                             headers={"Content-Type": "application/json"}, data=LOAD)
                urllib.request.urlopen(req, timeout=5)
            time.sleep(warmup)
            cpu0, cycles0, wall0 = cpu_seconds(daemon.pid), metric(base, "kgpu_sampling_cycles_total"), time.monotonic()
            fcpu0, fcycles0 = cpu_seconds(floor.pid), floor_cycles()
            time.sleep(seconds)
            cpu1, cycles1, wall1 = cpu_seconds(daemon.pid), metric(base, "kgpu_sampling_cycles_total"), time.monotonic()
            fcpu1, fcycles1 = cpu_seconds(floor.pid), floor_cycles()
            cycle_time = metric(base, "kgpu_sampling_cycle_seconds_total") / max(cycles1, 1)
            daemon_rss, bare_rss = rss_mib(daemon.pid), rss_mib(bare.pid)
        finally:
            daemon.terminate()
            bare.kill()
            floor.kill()
            daemon.wait(timeout=15)
            bare.wait()
            floor.wait()
    cycles, cpu, wall = cycles1 - cycles0, cpu1 - cpu0, wall1 - wall0
    return Overhead(gpus=gpus, window_s=wall, cycles=cycles, cpu_share=cpu / wall,
                    cpu_per_cycle_ms=1000 * cpu / max(cycles, 1), loop_per_cycle_ms=1000 * cycle_time,
                    daemon_rss_mib=daemon_rss, bare_rss_mib=bare_rss,
                    floor_cpu_per_cycle_ms=1000 * (fcpu1 - fcpu0) / max(fcycles1 - fcycles0, 1))


def describe(o: Overhead) -> str:
    rows = [
        ("GPUs (simulated) / interval", f"{o.gpus} / 1 s"),
        ("measured window", f"{o.window_s:.0f} s, {o.cycles:.0f} cycles"),
        ("daemon CPU, share of one core", f"{100 * o.cpu_share:.2f} %  (goal < 1 %)"),
        ("daemon CPU per cycle", f"{o.cpu_per_cycle_ms:.2f} ms"),
        ("NVML floor: bare loop CPU per cycle", f"{o.floor_cpu_per_cycle_ms:.2f} ms (same calls, same window)"),
        ("daemon / floor", f"{o.floor_ratio:.1f}x  (goal <= 2x)"),
        ("in-loop time per cycle (wall)", f"{o.loop_per_cycle_ms:.2f} ms"),
        ("daemon RSS", f"{o.daemon_rss_mib:.1f} MiB  (goal < 80 MiB)"),
        ("bare python RSS (baseline)", f"{o.bare_rss_mib:.1f} MiB"),
        ("RSS ratio daemon / bare", f"{o.daemon_rss_mib / o.bare_rss_mib:.1f}x"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["edge overhead", *(f"  {key:<{width}}  {value}" for key, value in rows)])


def table_rows(o: Overhead, command: str) -> list[Row]:
    label = f"edge overhead ({o.gpus} GPUs @ 1 s)"
    return [
        Row(label, "daemon CPU, share of one core", 100 * o.cpu_share, "%",
            f"< 1 %: {'met' if o.cpu_share < 0.01 else 'MISSED'}", command),
        Row(label, "daemon CPU per sampling cycle", o.cpu_per_cycle_ms, "ms",
            f"{o.floor_ratio:.1f}x the bare NVML loop's {o.floor_cpu_per_cycle_ms:.2f} ms; <= 2x: "
            f"{'met' if o.floor_ratio <= 2 else 'MISSED'}", command),
        Row(label, "daemon RSS", o.daemon_rss_mib, "MiB",
            f"{o.daemon_rss_mib / o.bare_rss_mib:.1f}x bare python; < 80 MiB: "
            f"{'met' if o.daemon_rss_mib < 80 else 'MISSED'}", command),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--nvml-floor-loop", metavar="COUNTER_FILE", help=argparse.SUPPRESS)  # the peer process
    args = parser.parse_args()
    if args.nvml_floor_loop:
        nvml_floor_loop(args.gpus, args.nvml_floor_loop)
        return
    print(describe(measure(args.seconds, args.gpus, args.warmup)))


if __name__ == "__main__":
    main()
