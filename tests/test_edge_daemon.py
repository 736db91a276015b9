"""End to end: a real `kgpu edge run --backend sim` process, driven and read over HTTP.

The daemon runs the real pynvml bindings over the simulated libnvidia-ml; faults go in through
`POST /api/v1/sim/gpus/{index}` exactly as an operator would send them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kgpu.lab.processes import wait_for
from tests.helpers.edge_process import EdgeProcess
from tests.helpers.faketime import faketime_library, offset_file_env
from tests.helpers.pod_list import PodListServer

pytestmark = pytest.mark.slow

FAST_THERMAL = {
    "policy": {
        "version": 1,
        "thermalThrottling": {"maxTempC": 80, "criticalTempC": 95, "coolDownPeriod": 3,
                              "hysteresisC": 5, "stepPercent": 10, "stepInterval": 1},
    },
}


def rules(edge: EdgeProcess, **query: Any) -> list[tuple[str, str, str]]:
    return [(d["rule"], d["action"], d["outcome"]) for d in edge.decisions(limit=500, **query)]


def test_inventory_and_every_sampled_figure(edge_factory: Callable[..., EdgeProcess]) -> None:
    edge = edge_factory(gpus=2, model="A100")
    edge.inject(0, processes=[{"pid": 101, "used_memory_mib": 2048, "sm_util": 60},
                              {"pid": 102, "used_memory_mib": 1024, "sm_util": 20}])
    gpu = wait_for(lambda: (g := edge.gpu(0))["sample"] and len(g["sample"]["processes"]) == 2 and g,
                   what="a sample with two processes")
    inv, sample = gpu["inventory"], gpu["sample"]
    assert inv["uuid"].startswith("GPU-") and "A100" in inv["name"]
    assert inv["pci_bus_id"] and inv["memory_total_bytes"] >= 40 * 2**30
    assert inv["driver_version"] and inv["cuda_version"]
    assert inv["power_limit_min_w"] < inv["power_limit_default_w"] <= inv["power_limit_max_w"]
    assert inv["supported_sm_clocks_mhz"] and inv["supported_memory_clocks_mhz"]
    assert inv["mig_mode"] is not None  # A100 supports MIG
    for figure in ("utilization_pct", "memory_used_bytes", "memory_free_bytes", "temperature_c", "power_w",
                   "power_limit_w", "sm_clock_mhz", "memory_clock_mhz", "throttle_reasons", "energy_mj",
                   "ecc_sbe_volatile", "ecc_dbe_volatile", "remapped_rows_correctable",
                   "remapped_rows_uncorrectable"):
        assert sample[figure] is not None, f"{figure} missing: {sample['missing']}"
    assert sample["memory_used_bytes"] >= 3 * 2**30
    by_pid = {p["pid"]: p for p in sample["processes"]}
    assert by_pid[101]["used_memory_bytes"] == 2048 * 2**20
    # per-process utilisation needs two samples to compute; wait for it
    wait_for(lambda: any(p["sm_util_pct"] for p in edge.gpu(0)["sample"]["processes"]),
             what="per-process utilisation")
    energy_before = sample["energy_mj"]
    wait_for(lambda: edge.gpu(0)["sample"]["energy_mj"] > energy_before, what="energy counter to grow")
    # the energy accountant's idle/active split rides on the sample (telemetry, for the fleet exporter)
    split = edge.gpu(0)["sample"]
    energy = edge.get("/api/v1/energy")  # read after: at least the sample's cycle
    assert split["idle_joules"] >= 0 and split["active_joules"] > 0 and split["idle_power_w"] is not None
    assert split["idle_joules"] + split["active_joules"] <= energy["gpu_joules"][inv["uuid"]] * (1 + 1e-9) + 1e-9


def test_xid_marks_unhealthy_requests_migration_then_recovers(edge_factory: Callable[..., EdgeProcess]) -> None:
    edge = edge_factory(config={"health_quiet_period": 3})
    edge.inject(1, xid=79)
    wait_for(lambda: edge.gpu(1)["health"]["state"] == "unhealthy", what="GPU 1 unhealthy")
    assert edge.gpu(0)["health"]["state"] == "healthy"
    # the state changes in memory as the cycle decides; its decisions are written at the cycle's end
    wanted = {("xid", "mark_unhealthy", "recorded"), ("xid", "request_migration", "recorded")}
    wait_for(lambda: wanted <= set(rules(edge)), what="the XID decisions written")
    kinds = [e["kind"] for e in edge.get("/api/v1/events?limit=100")["events"]]
    assert "xid" in kinds and "migration_request" in kinds and "health" in kinds
    metrics = {(s.name, s.labels.get("gpu"), s.labels.get("xid")): s.value
               for f in text_string_to_metric_families(edge.get("/metrics")) for s in f.samples}
    assert metrics[("DCGM_FI_DEV_XID_ERRORS", "1", None)] == 79
    assert metrics[("kgpu_xid_errors_total", "1", "79")] == 1
    wait_for(lambda: edge.gpu(1)["health"]["state"] == "healthy", timeout=15, what="GPU 1 recovered")
    wait_for(lambda: ("recovered", "mark_healthy", "recorded") in rules(edge), what="the recovery written")


def test_ignored_xid_is_logged_but_harmless(edge_factory: Callable[..., EdgeProcess]) -> None:
    edge = edge_factory(gpus=1)
    edge.inject(0, xid=13)
    wait_for(lambda: any(e["kind"] == "xid" for e in edge.get("/api/v1/events")["events"]), what="xid event")
    xid_event = next(e for e in edge.get("/api/v1/events")["events"] if e["kind"] == "xid")
    assert xid_event["body"]["action"] == "ignored"
    assert edge.gpu(0)["health"]["state"] == "healthy"


def test_lost_gpu_is_probed_again_and_comes_back(edge_factory: Callable[..., EdgeProcess]) -> None:
    edge = edge_factory(config={"health_quiet_period": 2, "lost_probe_interval": 1})
    edge.inject(0, lost=True)
    wait_for(lambda: edge.gpu(0)["health"]["state"] == "lost", what="GPU 0 lost")
    wait_for(lambda: any(d["action"] == "mark_lost" for d in edge.decisions()), what="the mark_lost decision written")
    status, health = edge.request("GET", "/healthz")
    assert status == 200 and any("gpu 0" in r for r in health["reasons"]), health  # the node still runs
    edge.inject(0, lost=False)
    wait_for(lambda: edge.gpu(0)["health"]["state"] == "unhealthy", what="GPU 0 back, in quiet period")
    wait_for(lambda: edge.gpu(0)["health"]["state"] == "healthy", timeout=15, what="GPU 0 healthy again")
    edge.inject(0, xid=48)  # the returned GPU is registered for XIDs again
    wait_for(lambda: edge.gpu(0)["health"]["state"] == "unhealthy", what="XID seen on the returned GPU")


def test_thermal_step_down_then_restore_after_cool_down(edge_factory: Callable[..., EdgeProcess]) -> None:
    edge = edge_factory(gpus=1, config=FAST_THERMAL)
    edge.inject(0, utilization=100, ambient_c=70, temperature_c=86)
    wait_for(lambda: (edge.gpu(0)["sample"]["power_limit_w"] or 999) <= 560, what="two thermal steps down")
    steps = [d for d in edge.decisions(rule="thermal_step_down")]
    assert steps and all(d["outcome"] == "applied" for d in steps)
    assert all(200 <= d["value"] <= 700 for d in steps)
    assert "80" in steps[0]["reason"]  # the reason names the threshold
    edge.inject(0, ambient_c=25, temperature_c=40, utilization=30)
    wait_for(lambda: edge.gpu(0)["sample"]["power_limit_w"] == 700, timeout=30, what="limit restored to 700 W")
    restores = edge.decisions(rule="thermal_restore")
    assert len(restores) >= 2, "restore goes step by step"
    first_restore = min(d["ts"] for d in restores)
    last_step = max(d["ts"] for d in steps)
    assert first_restore - last_step >= 3, "no restore inside the cool-down period"


def test_power_saving_lowers_and_restores_the_limit(edge_factory: Callable[..., EdgeProcess]) -> None:
    config = {"policy": {"version": 1, "powerSaving": {"enabled": True, "utilizationThreshold": 10,
                                                      "capPercent": 50, "sustainPeriod": 2}}}
    edge = edge_factory(gpus=1, config=config)
    edge.inject(0, utilization=0)
    wait_for(lambda: edge.gpu(0)["sample"]["power_limit_w"] == 350, what="power saving at 50% of 700 W")
    edge.inject(0, utilization=90)
    wait_for(lambda: edge.gpu(0)["sample"]["power_limit_w"] == 700, what="full limit when load returns")
    seen = {r for r, _, _ in rules(edge)}
    assert {"power_saving", "power_saving_exit"} <= seen


def test_refused_actions_are_recorded_as_advisory(edge_factory: Callable[..., EdgeProcess]) -> None:
    edge = edge_factory(gpus=1, config={"policy": {"version": 1, "powerCapWatts": 300}},
                        env={"KGPU_SIM_PERMISSIONS": "none"})
    decision = wait_for(lambda: edge.decisions(rule="power_cap"), what="a power_cap decision")[0]
    assert decision["outcome"] == "advisory"
    assert "permission" in decision["reason"].lower()
    assert edge.gpu(0)["sample"]["power_limit_w"] == 700  # the driver really did not change it
    # recorded once, not re-tried every cycle
    edge.get("/healthz")
    wait_for(lambda: edge.gpu(0)["sample"] and True, what="another cycle")
    assert len(edge.decisions(rule="power_cap")) == 1


def test_sim_endpoint_rejects_bad_input_and_keeps_running(edge_factory: Callable[..., EdgeProcess]) -> None:
    edge = edge_factory(gpus=1)
    status, body = edge.request("POST", "/api/v1/sim/gpus/0", raw=b"{not json")
    assert status == 400 and body["error"] == "body is not valid JSON"
    status, body = edge.request("POST", "/api/v1/sim/gpus/0", {"temperature_c": 900})
    assert status == 400 and body["detail"][0]["field"] == "temperature_c"
    status, body = edge.request("POST", "/api/v1/sim/gpus/0", {"warp_drive": True})
    assert status == 400 and "warp_drive" in json.dumps(body)
    status, body = edge.request("POST", "/api/v1/sim/gpus/7", {"xid": 79})
    assert status == 404 and body["error"] == "no such GPU"
    status, body = edge.request("GET", "/api/v1/nope")
    assert status == 404 and "error" in body
    status, body = edge.request("GET", "/api/v1/decisions?limit=abc")
    assert status == 400 and "limit" in body["error"]
    assert edge.request("GET", "/healthz")[0] == 200


def test_no_fault_endpoint_without_the_simulated_driver(tmp_path: Path) -> None:
    edge = EdgeProcess(tmp_path)
    edge.args[edge.args.index("sim")] = "nvml"  # this machine has no libnvidia-ml
    edge.start()
    try:
        status, body = edge.request("POST", "/api/v1/sim/gpus/0", {"xid": 79})
        assert status in (404, 405), body
        status, body = edge.request("GET", "/healthz")
        assert status == 503 and any("driver" in r for r in body["reasons"]), body
        assert "kgpu_driver_up 0.0" in edge.get("/metrics")
    finally:
        edge.stop()


def test_probe_command_failure_makes_the_node_unhealthy(edge_factory: Callable[..., EdgeProcess]) -> None:
    edge = edge_factory(gpus=1, config={"probe_command": "echo cuda context failed; exit 3", "probe_interval": 1})
    wait_for(lambda: edge.request("GET", "/healthz")[0] == 503, what="probe failure on /healthz")
    body = edge.request("GET", "/healthz")[1]
    assert any("exit status 3" in r for r in body["reasons"]), body


def test_energy_is_attributed_to_pods(edge_factory: Callable[..., EdgeProcess], tmp_path: Path,
                                      pod_list_server: PodListServer) -> None:
    proc = tmp_path / "proc"
    pods = {4242: ("infer", "aaaaaaaa-1111-2222-3333-444444444444", "a" * 64),
            4343: ("train", "bbbbbbbb-1111-2222-3333-444444444444", "b" * 64)}
    items = []
    for pid, (name, uid, cid) in pods.items():
        (proc / str(pid)).mkdir(parents=True)
        slice_uid = uid.replace("-", "_")
        (proc / str(pid) / "cgroup").write_text(
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{slice_uid}.slice/"
            f"cri-containerd-{cid}.scope\n")
        items.append({"metadata": {"name": name, "namespace": "vision", "uid": uid},
                      "status": {"containerStatuses": [{"name": "worker", "containerID": f"containerd://{cid}"}]}})
    pod_list_server.body = json.dumps({"items": items}).encode()
    edge = edge_factory(gpus=1, config={"proc_root": str(proc), "pod_list_url": pod_list_server.url})
    edge.inject(0, utilization=0)
    wait_for(lambda: edge.get("/api/v1/energy")["idle_power_w"], what="idle power learned")
    edge.inject(0, processes=[{"pid": 4242, "used_memory_mib": 1000, "sm_util": 75},
                              {"pid": 4343, "used_memory_mib": 1000, "sm_util": 25}])

    def joules() -> dict[str, float]:
        out = {}
        for line in edge.get("/metrics").splitlines():
            if line.startswith("kgpu_pod_gpu_joules_total{"):
                labels, value = line.rsplit(" ", 1)
                out[labels] = float(value)
        return out

    values = wait_for(lambda: (j := joules()) and len(j) == 2 and all(v > 0 for v in j.values()) and j,
                      what="energy for both pods")
    infer = next(v for k, v in values.items() if 'pod_name="infer"' in k)
    train = next(v for k, v in values.items() if 'pod_name="train"' in k)
    assert all('pod_namespace="vision"' in k and 'container_name="worker"' in k for k in values)
    assert infer > train, "75% of the SM time gets more energy than 25%"


def test_a_clock_stepped_back_mid_cool_down_does_not_stretch_it(edge_factory: Callable[..., EdgeProcess],
                                                                tmp_path: Path) -> None:
    """The rules measure durations on a clock that never jumps: with the wall clock stepped back
    3 h during the cool-down, the limit is still restored a cool-down period later, not in 3 h."""
    library = faketime_library()
    if library is None:
        pytest.skip("libfaketime not installed (Debian package faketime; scripts/test.sh installs it)")
    offset = tmp_path / "clock-offset"
    edge = edge_factory(gpus=1, config=FAST_THERMAL, env=offset_file_env(library, offset))
    edge.inject(0, utilization=100, ambient_c=70, temperature_c=86)
    wait_for(lambda: (edge.gpu(0)["sample"]["power_limit_w"] or 999) <= 630, what="a thermal step down")
    edge.inject(0, ambient_c=25, temperature_c=40, utilization=30)
    wait_for(lambda: edge.gpu(0)["sample"]["temperature_c"] < 75, what="cooling: the cool-down clock runs")
    offset.write_text("-3h\n")  # an NTP step back, 3 h, in the middle of the 3 s cool-down
    wait_for(lambda: edge.gpu(0)["sample"]["ts"] < __import__("time").time() - 3 * 3600 + 60,
             what="the daemon's clock stepped back")
    wait_for(lambda: edge.gpu(0)["sample"]["power_limit_w"] == 700, timeout=30,
             what="the limit restored a cool-down period later despite the clock step")
