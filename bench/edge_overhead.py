"""Edge daemon overhead: CPU time per sampling cycle and RSS, 8 simulated GPUs at 1 s.

Starts `kgpu edge run --backend sim --sim-gpus 8 --interval 1` as a real process, lets it warm up,
then reads its CPU time (utime+stime from /proc/<pid>/stat) and its cycle counter from /metrics over
a measured window. Baseline: a bare `python3 -c 'sleep'` process (RSS) — the floor of any Python
daemon. The simulated driver runs inside the daemon, so its cost (which the real libnvidia-ml,
written in C, would replace) is included: the figures are an upper bound.

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
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def rss_mib(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def metric(base: str, name: str) -> float:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=10.0)
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "kgpu", "edge", "run", "--node", "bench", "--backend", "sim",
             "--sim-gpus", str(args.gpus), "--interval", "1", "--db", f"{tmp}/edge.db",
             "--http", f"127.0.0.1:{port}", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"{base}/healthz", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline or daemon.poll() is not None:
                        raise SystemExit("daemon did not start")
                    time.sleep(0.2)
            # load on every GPU so that every figure and the policy are exercised
            for index in range(args.gpus):
                req = urllib.request.Request(f"{base}/api/v1/sim/gpus/{index}", method="POST",
                                             data=b'{"processes": [{"pid": 1, "used_memory_mib": 512, "sm_util": 60}]}')
                urllib.request.urlopen(req, timeout=5)
            time.sleep(args.warmup)
            cpu0, cycles0, wall0 = cpu_seconds(daemon.pid), metric(base, "kgpu_sampling_cycles_total"), time.monotonic()
            time.sleep(args.seconds)
            cpu1, cycles1, wall1 = cpu_seconds(daemon.pid), metric(base, "kgpu_sampling_cycles_total"), time.monotonic()
            cycle_time = metric(base, "kgpu_sampling_cycle_seconds_total") / max(cycles1, 1)
            daemon_rss, bare_rss = rss_mib(daemon.pid), rss_mib(bare.pid)
        finally:
            daemon.terminate()
            bare.kill()
            daemon.wait(timeout=15)
            bare.wait()

    cycles = cycles1 - cycles0
    cpu = cpu1 - cpu0
    wall = wall1 - wall0
    rows = [
        ("GPUs (simulated) / interval", f"{args.gpus} / 1 s"),
        ("measured window", f"{wall:.0f} s, {cycles:.0f} cycles"),
        ("daemon CPU, share of one core", f"{100 * cpu / wall:.2f} %  (goal < 1 %)"),
        ("daemon CPU per cycle", f"{1000 * cpu / max(cycles, 1):.2f} ms"),
        ("in-loop time per cycle (wall)", f"{1000 * cycle_time:.2f} ms"),
        ("daemon RSS", f"{daemon_rss:.1f} MiB  (goal < 80 MiB)"),
        ("bare python RSS (baseline)", f"{bare_rss:.1f} MiB"),
        ("RSS ratio daemon / bare", f"{daemon_rss / bare_rss:.1f}x"),
    ]
    width = max(len(k) for k, _ in rows)
    print("edge overhead")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
