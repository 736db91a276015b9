"""`kgpu demo` as a person runs it: the whole fleet comes up on one machine (mosquitto, an emulated
Kubernetes API, the controller, simulated edges), the policy reaches the edges, and Ctrl-C stops
every process it started; `--scenario --fast` plays its story to the end, every step succeeding."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from typing import Any

import pytest

from kgpu.lab.broker import mosquitto_binary
from kgpu.lab.processes import free_port, wait_for

pytestmark = [pytest.mark.slow]
needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None,
                                     reason="mosquitto not installed (scripts/test.sh installs it)")


class DemoRun:
    """`python -m kgpu demo ...` with its stdout collected by a thread (bounded waits on it)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "kgpu", "demo", "--http", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"^\[kgpu-demo\] pid (\d+) ", self.output, re.MULTILINE)]

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=3) as resp:
            return json.load(resp)

    def wait_exit(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.kill_children()
                self.proc.wait(10)
        self._reader.join(5)
        return code

    def kill_children(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=3) as resp:
        return json.load(resp)


def metrics(edge_url: str) -> str:
    with urllib.request.urlopen(edge_url + "/metrics", timeout=3) as resp:
        return str(resp.read().decode())


def fresh_shell(command: str) -> subprocess.CompletedProcess[str]:
    """`command` in a shell with an empty environment: no venv on the PATH, as a new terminal."""
    return subprocess.run(["/usr/bin/env", "-i", "/bin/sh", "-c", command], capture_output=True, text=True,
                          timeout=60)


def the_printed_command_runs_in_a_fresh_shell(output: str) -> None:
    """The printed `kgpu watch` line's program is found and answers; the printed `kgpu get nodes`
    line, run as printed, lists the demo's nodes."""
    watch = re.search(r"live MQTT view +(.+) watch --mqtt", output)
    assert watch, output
    result = fresh_shell(f"{watch.group(1)} version")
    assert result.returncode == 0 and result.stdout.strip(), (watch.group(1), result)
    fleet = re.search(r"^  fleet +(.+ get nodes .*)$", output, re.MULTILINE)
    assert fleet, output
    result = fresh_shell(fleet.group(1))
    assert result.returncode == 0 and "edge-01" in result.stdout, (fleet.group(1), result)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie not yet reaped by init is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_nothing_left(demo: DemoRun) -> None:
    pids = demo.pids()
    assert len(pids) >= 6, demo.output  # broker, controller, 4 edges at least
    left = [p for p in pids if alive(p)]
    demo.kill_children()
    assert not left, f"still running after the demo exited: {left}\n{demo.output[-3000:]}"
    assert "nothing left running" in demo.output


@pytest.mark.parametrize("broker", [
    pytest.param("mosquitto", marks=needs_mosquitto),
    "amqtt",  # the embedded fallback where mosquitto is not installed
])
def test_demo_brings_up_the_fleet_and_ctrl_c_stops_every_process(broker: str) -> None:
    """With mosquitto, the demo as the README runs it (its default mixed fleet of seven: four NVIDIA
    nodes, a Jetson, an AMD and an Intel node); with the embedded broker, four nodes."""
    mixed = broker == "mosquitto"
    count = 7 if mixed else 4
    demo = DemoRun(*(() if mixed else ("--nodes", "4")), env={"KGPU_DEMO_BROKER": broker})
    try:
        def fleet() -> list[dict[str, Any]] | None:
            assert demo.proc.poll() is None, demo.output
            try:
                nodes = demo.get("/api/v1/nodes")["nodes"]
            except OSError:
                return None
            ready = [n for n in nodes if n["online"] and n["policy_name"] == "edge-fleet"]
            return nodes if len(ready) == count else None

        nodes = wait_for(fleet, timeout=90, interval=0.5, what=f"{count} nodes online with the demo's policy")
        assert sorted(n["name"] for n in nodes) == [f"edge-{i:02d}" for i in range(1, count + 1)]
        if mixed:  # every vendor's simulated node reports its GPUs, with their vendor and backend
            def vendors() -> set[tuple[str, str]] | None:
                found = {(g.get("vendor") or "nvidia", g.get("backend") or "nvml")
                         for n in nodes for g in demo.get(f"/api/v1/nodes/{n['name']}")["gpus"]}
                return found if len(found) == 4 else None

            assert wait_for(vendors, timeout=60, interval=1, what="the mixed fleet's GPUs in the cloud") == {
                ("nvidia", "nvml"), ("nvidia", "jetson"), ("amd", "amd"), ("intel", "intel")}
        wait_for(lambda: "Ctrl-C stops everything" in demo.output, timeout=10, what="the intro")
        # the edge's own view: the CRD's policy reached it through the controller and the broker
        edge_url = re.search(r"edge-01 .*edge API (http://\S+)", demo.output)
        assert edge_url, demo.output
        with urllib.request.urlopen(edge_url.group(1) + "/api/v1/policy", timeout=3) as resp:
            policy = json.load(resp)
        assert policy["source"] == "cloud" and policy["policy"]["name"] == "edge-fleet", policy
        assert policy["policy"]["thermalThrottling"]["maxTempC"] == 80
        assert f"http://127.0.0.1:{demo.port}/" in demo.output and "kgpu watch --mqtt" in demo.output
        assert len(demo.pids()) == count + 2  # the broker, the controller and the edges
        assert "health quiet period 90 s" in demo.output
        the_printed_command_runs_in_a_fresh_shell(demo.output)
        edges = dict(re.findall(r"^  (edge-\d+) .*edge API (http://\S+)", demo.output, re.MULTILINE))
        uuids = {node: {g["inventory"]["uuid"] for g in get(url + "/api/v1/gpus")["gpus"]}
                 for node, url in edges.items()}
        assert all(len(u) > 0 for u in uuids.values()) and len(set().union(*uuids.values())) == sum(
            len(u) for u in uuids.values()), f"simulated nodes share GPU UUIDs: {uuids}"
        # the seeded pods' processes run on their GPUs: energy and per-pod metrics name the pods
        wait_for(lambda: 'pod_name="llm-train-6d8f9c7b5-x2lqp"' in metrics(edges["edge-01"]), timeout=30,
                 what="energy attributed to the llm-train pod on edge-01")
        assert re.search(r'kgpu_pod_gpu_utilization_percent\{[^}]*pod="vision-infer"[^}]*\} 35', metrics(
            edges["edge-01"])), metrics(edges["edge-01"])
    finally:
        demo.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends (the demo leads its own session here)
        code = demo.wait_exit(40)
    assert code == 0, demo.output
    assert "Traceback" not in demo.output, demo.output
    assert_nothing_left(demo)


@needs_mosquitto
def test_the_demo_killed_outright_takes_its_children_with_it() -> None:
    """kill -9 leaves the demo no chance to stop anything: each child gets SIGTERM from the kernel
    (parent-death signal) and exits, so no broker or daemon is left holding ports."""
    demo = DemoRun("--nodes", "4", env={"KGPU_DEMO_BROKER": "mosquitto"})
    try:
        wait_for(lambda: len(demo.pids()) == 6 or demo.proc.poll() is not None, timeout=60, interval=0.5,
                 what="the broker, the controller and 4 edges started")
        assert demo.proc.poll() is None, demo.output
        pids = demo.pids()
        assert all(alive(p) for p in pids)
        demo.proc.kill()
        demo.proc.wait(10)
        wait_for(lambda: not any(alive(p) for p in pids), timeout=30, what=f"every child of the demo gone: {pids}")
    finally:
        demo.kill_children()


@needs_mosquitto
def test_scenario_plays_every_step_to_the_end() -> None:
    demo = DemoRun("--scenario", "--fast", "--nodes", "4")  # the story's four NVIDIA nodes
    code = demo.wait_exit(300)  # about 50 s on a quiet 2-core machine
    out = demo.output
    assert code == 0, out
    steps_ok = re.findall(r"^== step (\d) OK", out, re.MULTILINE)
    assert steps_ok == ["1", "2", "3", "4", "5", "6", "7"], out
    assert "FAILED" not in out and "== scenario complete: every step succeeded" in out
    assert "migration #1: complete completed" in out  # the XID 79's migration steps were narrated
    assert "kubelet stopped evicted pod default/llm-train" in out  # the demo played the cluster's part
    assert "ReplicaSet llm-train-6d8f9c7b5 recreated it" in out and "[cluster] error" not in out
    # the evicted pod's processes left edge-01's GPUs with it, as the kubelet stopping it would
    assert re.search(r"\[cluster\] default/llm-train-\S+ left edge-01: its process \d+ left GPU 0", out), out
    assert re.search(r"rollout #\d+ \w+: .*offline-deferred", out)  # the offline node did not block
    assert re.search(r"rollout #\d+ completed: \{'upgrade-done': 4\}", out)
    assert re.search(r"edge-04 \(A100 x4\): kubelet sees 28 nvidia.com/mig-1g.10gb devices", out), out
    assert re.search(r"labels: .*mig.strategy=mixed", out) and "gpu.replicas=4" in out
    assert "Traceback" not in out
    assert_nothing_left(demo)
