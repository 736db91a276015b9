"""Issue 14 end to end, as bench/remediation.py runs it: real mosquitto, kmock with the real
kubernetes client, a real controller, two real simulated edges in one zone, the kubelet stand-in
(device plugin and pod-resources API) played with pods on GPUs 0-2 of a 4-GPU node.

- an XID 79 that a reset clears: only the failing GPU's pod moves, the GPU is fenced, drained,
  diagnosed, reset, validated and advertised healthy again, with nobody acting;
- an XID 79 that a reset does not clear: the resets fail validation, the node asks for a reboot,
  the controller's circuit breaker grants it (the only way a reboot happens: the edge refuses one
  it did not ask for, tests/test_remediation_edge.py), and the GPU comes back after it.
Times are measured by `python -m bench.remediation` (docs/benchmarks.md), not asserted here."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from bench.remediation import Outcome, run
from kgpu.lab.broker import mosquitto_binary

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed (scripts/install-deps)")]


def _run(fault: str) -> Outcome:
    work = Path(tempfile.mkdtemp(prefix="kgpu-rb-", dir="/tmp"))  # short: unix socket paths
    try:
        return run(fault, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_a_resettable_xid_moves_only_that_gpus_pod_and_the_gpu_comes_back_by_itself() -> None:
    o = _run("xid-reset")
    assert o.moved == ["w1"] and o.moved_from_healthy == 0, o
    assert o.back_s is not None and o.placed_s is not None, f"not back in service: {o}"
    steps = [s.split()[0] for s in o.ladder]
    assert steps[:2] == ["fence", "drain"] and "reset" in steps and steps[-2:] == ["validate", "restore"], o.ladder
    assert "reset applied" in o.ladder and not o.reboots  # no reboot asked for a fault a reset clears


def test_a_fault_a_reset_does_not_clear_reboots_only_through_the_breaker() -> None:
    o = _run("xid-reboot")
    assert o.moved == ["w1"] and o.moved_from_healthy == 0, o
    assert o.back_s is not None, f"not back in service: {o}"
    steps = [s.split()[0] for s in o.ladder]
    assert "validate failed" in o.ladder and steps.index("request_reboot") < steps.index("reboot"), o.ladder
    granted = [r for r in o.reboots if r.get("verdict") == "grant"]
    assert [r["node"] for r in granted] == ["edge-a"], o.reboots  # granted once, by the controller
