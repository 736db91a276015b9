"""What the benchmarks share: process CPU from /proc, Prometheus figures, and the row every
benchmark hands to `python -m bench` for its one table."""

from __future__ import annotations

import math
import os
import re
import time
import urllib.parse
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kgpu.lab.broker import Mosquitto
    from tests.helpers.cloud_process import CloudProcess
    from tests.helpers.postgres import PostgresServer

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Row:
    """One line of the summary table: a figure, its unit, how it compares, and how to get it again."""

    benchmark: str
    figure: str
    value: float
    unit: str
    compare: str  # a ratio, or the target and whether it was met
    command: str

    def value_text(self) -> str:
        if math.isnan(self.value):
            return "-"
        if abs(self.value) >= 100 or float(self.value).is_integer():
            return f"{self.value:,.0f}"
        return f"{self.value:.2f}"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (children not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its direct children (PostgreSQL: the postmaster and its backends; a
    controller: its sample writer process). Children that exited within the window are not counted."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children(pid))


def children(pid: int) -> list[int]:
    """The process's direct children now."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def rss_mib(pid: int) -> float:
    """The process's resident memory now (MiB)."""
    return _status_mib(pid, "VmRSS")


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM, MiB)."""
    return _status_mib(pid, "VmHWM")


def tree_peak_rss_mib(pid: int) -> float:
    """The peak resident memory of a process and of each of its direct children, added up (a
    controller and its sample writer process: what their container's memory limit weighs; an
    upper bound, as the two peaks need not have come together). The memory a child shares with
    its parent (the controller's payload ring, cloud/payload_area.py) counts once, in the parent's."""
    return peak_rss_mib(pid) + sum(peak_rss_mib(child) - _shared_mib(child) for child in children(pid))


def tree_rss_mib(pid: int) -> float:
    """The resident memory of a process and its direct children now (MiB); what a child shares
    with its parent counts once."""
    return rss_mib(pid) + sum(rss_mib(child) - _shared_mib(child) for child in children(pid))


def _shared_mib(pid: int) -> float:
    """The process's resident shared memory (RssShmem, MiB); 0 where the kernel does not say."""
    shared = _status_mib(pid, "RssShmem")
    return 0.0 if math.isnan(shared) else shared


def _status_mib(pid: int, field: str) -> float:
    match = re.search(rf"{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def metric_sum(base: str, name: str, **labels: str) -> float:
    """Sum of every sample of `name` (with these labels) on `base`/metrics; 0 when absent. Asks
    for that sample name alone (`?name[]=`), so that polling costs the controller little."""
    return metric_sums(base, [(name, labels)])[0]


def metric_sums(base: str, wanted: list[tuple[str, dict[str, str]]]) -> list[float]:
    """`metric_sum` of each (name, labels) of `wanted`, in ONE request (a poll that asks often)."""
    query = urllib.parse.urlencode([("name[]", name) for name in dict.fromkeys(n for n, _ in wanted)])
    text = urllib.request.urlopen(f"{base}/metrics?{query}", timeout=10).read().decode()
    totals = [0.0] * len(wanted)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"^(\w+)(?:\{([^}]*)\})? (\S+)$", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        for at, (name, labels) in enumerate(wanted):
            if match.group(1) == name and all(found.get(k) == v for k, v in labels.items()):
                totals[at] += float(match.group(3))
    return totals


def machine() -> str:
    """A short description of this machine for the report."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 1024**2  # type: ignore[union-attr]
    except (OSError, AttributeError):
        mem = float("nan")
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, load average {load:.2f} at start"


def publish_all(url: str, messages: list[tuple[str, bytes]], *, flush_s: float = 120.0) -> None:
    """Publish (topic, payload) pairs at QoS 1 and wait until the broker acknowledged every one (so
    that a bench knows the broker holds them all); SystemExit when it did not within `flush_s`."""
    from shared.mqtt import MqttLink, parse_broker_url  # late: the other benches need no broker

    link = MqttLink(parse_broker_url(url), f"bench-pub-{time.monotonic_ns()}", max_inflight=1000)
    link.start()
    link.connected.wait(10)
    for topic, payload in messages:
        while not link.publish(topic, payload, qos=1):
            time.sleep(0.01)
    if not link.flush(flush_s):
        raise SystemExit("the broker did not acknowledge every message")
    link.stop()


def broker_and_controller(stack: ExitStack, work: Path, *, broker_options: dict[str, Any] | None = None,
                          env: dict[str, str] | None = None) -> tuple[Mosquitto, CloudProcess]:
    """A real mosquitto and one `kgpu cloud run` on SQLite: `broker_and_controllers`."""
    broker, clouds = broker_and_controllers(stack, work, broker_options=broker_options, env=env)
    return broker, clouds[0]


def broker_and_controllers(stack: ExitStack, work: Path, *, broker_options: dict[str, Any] | None = None,
                           env: dict[str, str] | None = None, count: int = 1, db: str | None = None,
                           extra_args: list[str] | None = None) -> tuple[Mosquitto, list[CloudProcess]]:
    """A real mosquitto (`broker_options`: kgpu.lab.broker.Mosquitto's) and `count` `kgpu cloud run`s
    on it (on `db`, default SQLite in `work`; warnings only, `env` and `extra_args` added), all
    stopped when `stack` closes; returned once every controller's MQTT link is up."""
    from kgpu.lab.broker import Mosquitto
    from tests.helpers.cloud_process import CloudProcess

    broker = Mosquitto(work / "broker", **(broker_options or {})).start()
    stack.callback(broker.stop)
    clouds = [CloudProcess(work / ("cloud" if count == 1 else f"cloud{i}"), broker.url, db=db, extra_args=extra_args,
                           env={"KGPU_LOG_LEVEL": "warning", **(env or {})}) for i in range(count)]
    for cloud in clouds:
        cloud.start()
        stack.callback(cloud.stop)  # a no-op for a process that has ended already
    for cloud in clouds:
        wait_connected(cloud, timeout=30 if count == 1 else 60)
    return broker, clouds


def wait_connected(cloud: CloudProcess, timeout: float = 30.0) -> None:
    """Until the controller's MQTT link is up (`kgpu_mqtt_connected` 1)."""
    from kgpu.lab.processes import wait_for

    wait_for(lambda: metric_sum(cloud.base, "kgpu_mqtt_connected") == 1, timeout=timeout, interval=0.2,
             what="controller connected to the broker")


def start_postgres_server() -> PostgresServer:
    """A throwaway PostgreSQL server for a bench's `--db postgresql` (tests/helpers/postgres.py),
    or exit with one line when its binaries are not installed."""
    from tests.helpers.postgres import find_server_binaries, start_postgres

    binaries = find_server_binaries()
    if binaries is None:
        raise SystemExit("PostgreSQL server binaries not installed (initdb, postgres: apt-get install postgresql)")
    return start_postgres(*binaries)
