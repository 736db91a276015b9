"""The device layer's wiring (issue 16): NVML as one backend among several, the backend chosen by
name, probed by `auto` or by the simulated model, and what the daemon does with a backend's
capabilities (no XID watcher, MIG or NVML checks where the backend has none; the reset step only
where the device has one). Real pynvml over the simulated libnvidia-ml; a real empty sysfs tree
for `auto` finding nothing; the real `python -m kgpu edge run` for the one-line start-up error."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge import sim
from edge.config import SIM_MODEL_BACKENDS, EdgeSettings
from edge.daemon import EdgeDaemon
from edge.devices.base import Capability, DeviceBackend
from edge.devices.select import BackendNotFound, detect, make_backend, resolve
from edge.driver.nvml import NvmlDriver
from edge.metrics import make_registry, render
from edge.remediation.catalogue import Remedy
from edge.remediation.ladder import Facts, Fault, LadderSettings, LadderState, StepKind, StepResult, plan, settle

REPO = Path(__file__).resolve().parents[1]


def test_nvml_is_a_device_backend_and_its_inventory_says_what_each_gpu_can_do() -> None:
    with sim.install(2, ["H100", "A10"]):
        driver = NvmlDriver()
        assert isinstance(driver, DeviceBackend)
        assert (driver.backend, driver.vendor, driver.resource_name) == ("nvml", "nvidia", "nvidia.com/gpu")
        driver.open()
        try:
            h100, a10 = driver.inventory()
            assert driver.capabilities(0) == frozenset(Capability(c) for c in h100.capabilities)
        finally:
            driver.close()
    for gpu in (h100, a10):
        assert (gpu.vendor, gpu.backend, gpu.resource_name) == ("nvidia", "nvml", "nvidia.com/gpu")
        assert {"power_limit", "clock_limit", "reset", "xid_events", "energy_counter", "ecc"} <= set(gpu.capabilities)
    assert "mig" in h100.capabilities and "mig" not in a10.capabilities  # the A10 has no MIG
    assert driver.capabilities(5) == frozenset()  # never inventoried: nothing claimed


def test_the_backend_follows_the_flag_and_the_simulated_model(tmp_path: Path) -> None:
    settings = EdgeSettings(node="n", db=tmp_path / "edge.db", backend="sim", sim_model="T4")
    assert resolve(settings) == "nvml" and isinstance(make_backend(settings), NvmlDriver)
    assert isinstance(make_backend(settings.model_copy(update={"backend": "nvml"})), NvmlDriver)
    expected = {"ORIN-NANO": "jetson", "ORIN-NX": "jetson", "AGX-ORIN": "jetson", "MI210": "amd", "MI300X": "amd",
                "FLEX170": "intel", "H100": "nvml", "A100": "nvml", "A100-40GB": "nvml", "A10": "nvml", "T4": "nvml"}
    assert SIM_MODEL_BACKENDS == expected
    for model, backend in expected.items():
        assert resolve(settings.model_copy(update={"sim_model": model})) == backend


def test_auto_finds_nothing_on_an_empty_node_and_says_what_each_probe_found(tmp_path: Path) -> None:
    """No libnvidia-ml on this machine (or no GPU behind it), and an empty sysfs tree: every probe is
    named in the one-line error."""
    with pytest.raises(BackendNotFound) as caught:
        detect(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path) in message
    for probe in ("jetson:", "NVML:", "amd:", "intel:"):
        assert probe in message, message
    assert "--backend nvml|jetson|amd|intel" in message and "--backend sim" in message


def test_auto_takes_nvml_where_libnvidia_ml_answers_with_gpus(tmp_path: Path) -> None:
    with sim.install(1, "T4"):
        backend, said = detect(tmp_path)
    assert backend == "nvml" and "NVML: 1 GPU(s)" in said


def test_auto_takes_a_jetson_module_first(tmp_path: Path) -> None:
    """A Jetson answers NVML too (JetPack 6), badly: the device tree's tegra comes first."""
    jetson = pytest.importorskip("edge.devices.jetson", reason="helper B's edge.devices.jetson is not in the tree yet")
    if not hasattr(jetson, "present"):
        pytest.skip("edge.devices.jetson has no present() yet (helper B)")
    base = tmp_path / "sys/firmware/devicetree/base"
    base.mkdir(parents=True)
    (base / "compatible").write_bytes(b"nvidia,p3768-0000+p3767-0000\0nvidia,p3767-0000\0nvidia,tegra234\0")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic\n")
    with sim.install(1, "T4"):
        backend, _ = detect(tmp_path)
    assert backend == "jetson"


def test_kgpu_edge_run_backend_auto_on_a_node_without_accelerators_exits_1_in_one_line(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "kgpu", "edge", "run", "--node", "bare", "--backend", "auto",
         "--db", str(tmp_path / "edge.db"), "--http", "127.0.0.1:0"],
        cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env={**os.environ, "KGPU_SYSFS_ROOT": str(tmp_path / "root"), "KGPU_LOG_JSON": "true"})
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("kgpu: --backend auto found no accelerator under ") and "NVML:" in last, run.stderr
    assert "Traceback" not in run.stderr


def test_the_ladder_without_a_reset_goes_to_the_reboot_step_and_says_why() -> None:
    rules = LadderSettings(reset_available=False, no_reset_reason="no GPU reset on this device (jetson backend)",
                           reboot="advise")
    fault = Fault("uncorrectable ECC", Remedy.RESET, "GPU 0 volatile double-bit ECC errors rose to 2")
    state, steps = plan(LadderState(), Facts(faults=(fault,), processes=0), rules, 100.0)
    for _ in range(3):  # fence, drained, then the diagnosis runs
        if any(s.kind is StepKind.DIAGNOSE and s.run for s in steps):
            break
        state, steps = plan(state, Facts(processes=0), rules, 101.0)
    assert any(s.kind is StepKind.DIAGNOSE and s.run for s in steps), steps
    state, steps = settle(state, StepResult(StepKind.DIAGNOSE, True, "sysfs: ok"), rules, 102.0)
    assert [s.kind for s in steps][-1] is StepKind.ADVISE_REBOOT
    assert "no GPU reset on this device (jetson backend)" in steps[-1].reason
    assert not any(s.kind is StepKind.RESET for s in steps)


def test_an_nvml_daemon_reports_its_backend_and_vendor_everywhere(tmp_path: Path) -> None:
    """The status's GpuSummary, /healthz's body and the kgpu_gpu_* families carry the backend and
    the vendor; DCGM's series stay as they were for NVIDIA."""

    async def scenario() -> tuple[list, str, dict]:
        settings = EdgeSettings(node="edge-v", db=tmp_path / "edge.db", backend="sim", sim_model="A100",
                                sim_gpus=1, remediation=False)
        simulated = sim.install(1, "A100")
        daemon = EdgeDaemon(settings, sim=simulated)
        try:
            await daemon.start()
            await daemon.cycle()
            status = daemon.status_body()
            text = render(make_registry(daemon)).decode()
            devices = {d.resource for d in daemon.partitions.devices()}
            return status.gpus, text, {"devices": devices, "resource": daemon.resource_name}
        finally:
            await daemon.stop()
            simulated.uninstall()

    gpus, text, more = asyncio.run(scenario())
    (gpu,) = gpus
    assert (gpu.vendor, gpu.backend, gpu.resource_name) == ("nvidia", "nvml", "nvidia.com/gpu")
    assert gpu.capabilities is not None and "mig" in gpu.capabilities and "reset" in gpu.capabilities
    assert more == {"devices": {"nvidia.com/gpu"}, "resource": "nvidia.com/gpu"}
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("kgpu_gpu_health", "kgpu_gpu_power_watts", "kgpu_gpu_temperature_celsius",
                 "kgpu_gpu_utilization_percent", "kgpu_gpu_energy_joules", "kgpu_gpu_thermal_steps"):
        assert families[name].samples, name
        assert all(s.labels["vendor"] == "nvidia" and s.labels["Hostname"] == "edge-v"
                   for s in families[name].samples), name
    assert families["DCGM_FI_DEV_GPU_TEMP"].samples
    assert "vendor" not in families["DCGM_FI_DEV_GPU_TEMP"].samples[0].labels


VENDOR_MODELS = {"ORIN-NX": ("jetson", "nvidia"), "MI210": ("amd", "amd"), "FLEX170": ("intel", "intel")}


@pytest.mark.parametrize("model", list(VENDOR_MODELS))
def test_a_vendor_backend_in_the_daemon_gets_only_what_it_can_do(model: str, tmp_path: Path) -> None:
    """The daemon on a vendor simulation (at its real interface): no XID watcher, MIG refused as not
    on this backend, time-slicing under the backend's resource, the reset step only with
    Capability.RESET, DCGM's series only for NVIDIA."""
    from edge.devices.select import install_sim
    from shared.partitioning import NodePartitioning

    backend_name, vendor = VENDOR_MODELS[model]
    for module in (f"edge.devices.{backend_name}", f"edge.sim.{backend_name}"):
        pytest.importorskip(module, reason=f"{module} (helper B/C/D) is not in the tree yet")

    async def scenario() -> dict:
        settings = EdgeSettings(node="edge-x", db=tmp_path / "edge.db", backend="sim", sim_model=model, sim_gpus=1)
        simulated = install_sim(settings)
        daemon = EdgeDaemon(settings, sim=simulated, backend=make_backend(settings, simulated))
        try:
            await daemon.start()
            await daemon.cycle()
            out: dict = {"watcher": daemon._xid_watcher, "resource": daemon.resource_name}
            view = daemon.gpus[0]
            out["rules"] = daemon.remediation.rules_for(view.inventory)
            out["capabilities"] = set(view.inventory.capabilities)
            await daemon.partitions.accept(NodePartitioning.model_validate(
                {"name": "split", "version": 1, "models": {"*": {"mig": "all-1g.10gb"}}}))
            await daemon.cycle()
            plan = daemon.partitions.gpus[0].plan
            out["mig"] = plan.reason if plan else None
            await daemon.partitions.accept(NodePartitioning.model_validate(
                {"name": "split", "version": 2, "models": {"*": {"timeSlicing": {"replicas": 2}}}}))
            await daemon.cycle()
            out["devices"] = [(d.id, d.resource) for d in daemon.partitions.devices()]
            out["summary"] = daemon.status_body().gpus[0]
            out["metrics"] = render(make_registry(daemon)).decode()
            out["healthy"] = daemon.health_report()[0]
            return out
        finally:
            await daemon.stop()
            simulated.uninstall()

    out = asyncio.run(scenario())
    assert out["healthy"]
    assert out["watcher"] is None  # no XIDs off NVML
    assert out["mig"] is not None and f"MIG is not on this backend ({backend_name})" in out["mig"], out["mig"]
    resource = out["resource"]
    assert resource == {"jetson": "nvidia.com/gpu", "amd": "amd.com/gpu"}.get(backend_name, resource)
    assert resource.startswith("gpu.intel.com/") or backend_name != "intel"
    assert [r for _, r in out["devices"]] == [resource, resource] and out["devices"][0][0].endswith("::0")
    summary = out["summary"]
    assert (summary.vendor, summary.backend, summary.resource_name) == (vendor, backend_name, resource)
    assert set(summary.capabilities or []) == out["capabilities"] and "mig" not in out["capabilities"]
    rules = out["rules"]
    if "reset" in out["capabilities"]:
        assert rules.reset_available  # the sim's reset tool (edge/sim/tools) stands in for amd-smi
    else:
        assert not rules.reset_available and f"({backend_name} backend)" in rules.no_reset_reason
    families = {f.name: f for f in text_string_to_metric_families(out["metrics"])}
    for name in ("kgpu_gpu_temperature_celsius", "kgpu_gpu_power_watts", "kgpu_gpu_health"):
        assert all(s.labels["vendor"] == vendor for s in families[name].samples), name
    assert families["kgpu_gpu_temperature_celsius"].samples  # (Intel's power is a rate: from its 2nd reading)
    dcgm = [name for name in families if name.startswith("DCGM_")]
    assert bool(dcgm) == (vendor == "nvidia"), dcgm


def test_the_device_plugin_gives_each_backend_what_its_runtime_needs(tmp_path: Path) -> None:
    """NVML: NVIDIA_VISIBLE_DEVICES and CDI by UUID (unchanged); Jetson: `all`; AMD and Intel: the
    GPU's DRM nodes found in sysfs (AMD with /dev/kfd), no NVIDIA variable."""
    from edge.deviceplugin.allocation import allocate
    from edge.deviceplugin.devices import PluginDevice, drm_nodes

    drm = tmp_path / "sys/bus/pci/devices/0000:05:00.0/drm"
    for name in ("card1", "renderD129", "controlD65"):
        (drm / name).mkdir(parents=True)
    assert drm_nodes(tmp_path, "0000:05:00.0") == ("/dev/dri/card1", "/dev/dri/renderD129")
    assert drm_nodes(tmp_path, "00000000:05:00.0") == ("/dev/dri/card1", "/dev/dri/renderD129")  # NVML's form
    assert drm_nodes(tmp_path, "0000:06:00.0") == () and drm_nodes(tmp_path, "") == ()

    def device(backend: str, uuid: str, nodes: tuple[str, ...] = ()) -> PluginDevice:
        return PluginDevice(id=uuid, gpu_uuid=uuid, visible_id=uuid, healthy=True, numa_node=None,
                            resource="r/x", backend=backend, device_nodes=nodes)

    nvml = allocate(["GPU-b", "GPU-a"], {"GPU-a": device("nvml", "GPU-a"), "GPU-b": device("nvml", "GPU-b")})
    assert nvml.envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b"} and nvml.device_nodes == []
    assert nvml.cdi_devices == ["nvidia.com/gpu=GPU-a", "nvidia.com/gpu=GPU-b"]
    jetson = allocate(["JETSON-1"], {"JETSON-1": device("jetson", "JETSON-1")})
    assert (jetson.envs, jetson.cdi_devices) == ({"NVIDIA_VISIBLE_DEVICES": "all"}, ["nvidia.com/gpu=all"])
    amd = allocate(["AMD-1"], {"AMD-1": device("amd", "AMD-1", ("/dev/dri/card1", "/dev/dri/renderD129"))})
    assert (amd.envs, amd.cdi_devices) == ({}, [])
    assert amd.device_nodes == ["/dev/dri/card1", "/dev/dri/renderD129", "/dev/kfd"]
    intel = allocate(["INTEL-1"], {"INTEL-1": device("intel", "INTEL-1", ("/dev/dri/card0", "/dev/dri/renderD128"))})
    assert intel.device_nodes == ["/dev/dri/card0", "/dev/dri/renderD128"] and intel.envs == {}
