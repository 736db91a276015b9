"""dcgm-exporter's default counters: kept list (deploy/reference/dcgm-exporter), simulated per model
through the real pynvml, read by the driver, built by shared/dcgm.py and served on the edge's /metrics."""

from __future__ import annotations

import csv
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pynvml
import pytest

from edge.driver.nvml import NvmlDriver
from edge.sim import SimulatedNvml, install
from kgpu.lab.processes import wait_for
from shared.dcgm import FIELDS, DcgmGpu, PodOnGpu, dcgm_families, exposition
from shared.gpu import GpuInventory, GpuSample
from tests.helpers.clock import FakeClock
from tests.helpers.edge_process import EdgeProcess
from tests.test_metrics import DCGM_LABELS, INHERITED_FINDING

COUNTERS_CSV = Path(__file__).parent.parent / "deploy/reference/dcgm-exporter/default-counters.csv"
GPM_FIGURES = ["gr_engine_active", "tensor_active", "dram_active", "pcie_tx_bytes_per_s", "pcie_rx_bytes_per_s"]


def default_counters() -> list[tuple[str, str, str]]:
    """(field, Prometheus type, help) of every row of NVIDIA's list that is not commented out."""
    rows = []
    with COUNTERS_CSV.open() as f:
        for row in csv.reader(f):
            if not row or row[0].lstrip().startswith("#") or not row[0].strip():
                continue
            name, kind, *help_ = (cell.strip() for cell in row)
            rows.append((name, kind, ",".join(help_)))
    return rows


def parse_text(text: str) -> tuple[dict[str, str], dict[str, str], dict[str, list[tuple[dict[str, str], float]]]]:
    """The exposition as written (no client renaming): types, helps and samples by name."""
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if m := re.match(r"^# TYPE (\S+) (\S+)$", line):
            types[m[1]] = m[2]
        elif m := re.match(r"^# HELP (\S+) (.*)$", line):
            helps[m[1]] = m[2]
        elif line and not line.startswith("#"):
            m = re.match(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
            assert m, line
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or ""))
            samples.setdefault(m[1], []).append((labels, float(m[3])))
    return types, helps, samples


def test_the_kept_list_is_nvidias_26_default_counters() -> None:
    rows = default_counters()
    assert len(rows) == 26
    assert ("DCGM_FI_DRIVER_VERSION", "label", "Driver Version") in rows
    assert "Apache" in (COUNTERS_CSV.parent / "README.md").read_text()
    # the builder covers every exported (non-label) row, with NVIDIA's type and help text
    ours = {f.name: f for f in FIELDS}
    for name, kind, help_ in rows:
        if kind == "label":
            assert name in DCGM_LABELS
            continue
        assert ours[name].type == kind, name
        assert ours[name].help == help_, name


@pytest.mark.slow
def test_every_default_counter_on_a_simulated_h100(edge_factory: Callable[..., EdgeProcess]) -> None:
    edge = edge_factory(gpus=1, model="H100")
    edge.inject(0, utilization=70)
    text = wait_for(lambda: (m := edge.get("/metrics")) and "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{" in m and m,
                    what="GPM figures after two sampling cycles")
    types, helps, samples = parse_text(text)
    exported = []
    for name, kind, help_ in default_counters():
        if kind == "label":
            labels = [lab for series in samples.values() for lab, _ in series if "UUID" in lab]
            if labels and all(lab.get(name) == "550.54.15" for lab in labels):
                exported.append(name)
            continue
        if name not in samples:
            continue
        assert types[name] == kind, name  # counters keep their name: no _total
        assert helps[name] == help_, name
        for labels, _ in samples[name]:
            assert set(labels) == DCGM_LABELS, (name, labels)
            assert labels["Hostname"] == "edge-test" and labels["pci_bus_id"] == "00000000:18:00.0"
            assert labels["modelName"] == "NVIDIA H100 80GB HBM3" and labels["device"] == "nvidia0"
        exported.append(name)
    assert len(exported) >= 24, sorted({r[0] for r in default_counters()} - set(exported))
    assert len(exported) == 26  # all of them on an H100 (GPM, NVLink, HBM)
    value = {name: series[0][1] for name, series in samples.items()}
    assert 0.4 < value["DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"] < value["DCGM_FI_PROF_GR_ENGINE_ACTIVE"] <= 0.75
    assert value["DCGM_FI_PROF_PCIE_RX_BYTES"] > 1e9  # a busy Gen5 x16 slot
    assert value["DCGM_FI_DEV_FB_RESERVED"] == 530
    assert value["DCGM_FI_DEV_VGPU_LICENSE_STATUS"] == 0  # bare metal



@pytest.mark.slow
def test_series_per_pod_on_a_shared_gpu_pass_promtool(edge_factory: Callable[..., EdgeProcess], tmp_path: Path,
                                                      promtool: str) -> None:
    """dcgm-exporter's Kubernetes mapping: one series per (GPU, pod container) with pod/namespace/container."""
    proc = tmp_path / "proc"
    for pid, uid, cid in ((4242, "aaaaaaaa-1111-2222-3333-444444444444", "a" * 64),
                          (4343, "bbbbbbbb-1111-2222-3333-444444444444", "b" * 64)):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text(
            f"0::/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope\n")
    edge = edge_factory(gpus=2, config={"proc_root": str(proc)})  # no pod list: pods named by UID
    edge.inject(0, processes=[{"pid": 4242, "used_memory_mib": 1000, "sm_util": 60},
                              {"pid": 4343, "used_memory_mib": 1000, "sm_util": 20}])

    def util_series() -> list[dict[str, str]]:
        return [labels for labels, _ in parse_text(edge.get("/metrics"))[2].get("DCGM_FI_DEV_GPU_UTIL", [])]

    series = wait_for(lambda: (s := util_series()) and any("pod" in lab for lab in s) and s, what="pod labels")
    on_gpu0 = sorted((lab["namespace"], lab["pod"], lab["container"]) for lab in series if lab["gpu"] == "0")
    assert on_gpu0 == [("unknown", "aaaaaaaa-1111-2222-3333-444444444444", "a" * 12),
                       ("unknown", "bbbbbbbb-1111-2222-3333-444444444444", "b" * 12)]
    assert [set(lab) for lab in series if lab["gpu"] == "1"] == [DCGM_LABELS]  # no pod on GPU 1
    text = edge.get("/metrics")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    findings = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode in (0, 3), findings
    assert [f for f in findings if not INHERITED_FINDING.match(f)] == []


# ----- per model, through the real pynvml calls ----------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def node(clock: FakeClock) -> Iterator[Callable[..., tuple[SimulatedNvml, NvmlDriver]]]:
    made: list[tuple[SimulatedNvml, NvmlDriver]] = []

    def make(model: str) -> tuple[SimulatedNvml, NvmlDriver]:
        sim = install(1, model, clock=clock)
        driver = NvmlDriver(sysfs_root="/nonexistent-sysfs")
        driver.open()
        made.append((sim, driver))
        return sim, driver

    yield make
    for sim, driver in reversed(made):
        driver.close()
        sim.uninstall()


def two_samples(driver: NvmlDriver, clock: FakeClock, seconds: float = 5) -> GpuSample:
    driver.sample(0)
    clock.advance(seconds)
    return driver.sample(0)


@pytest.mark.parametrize(("model", "gpm", "nvlink", "hbm"), [
    ("H100", True, True, True),
    ("A100", False, True, True),
    ("A10", False, False, False),
    ("T4", False, False, False),
])
def test_what_each_model_supports(node, clock: FakeClock, model: str, gpm: bool, nvlink: bool, hbm: bool) -> None:
    sim, driver = node(model)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert bool(pynvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice) is gpm
    if not gpm:
        sample = pynvml.nvmlGpmSampleAlloc()
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlGpmSampleGet(handle, sample)
        pynvml.nvmlGpmSampleFree(sample)
    links = pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT])[0]
    assert links.value.uiVal == {"H100": 18, "A100": 12}.get(model, 0)
    memory_temp = pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_MEMORY_TEMP])[0]
    assert (memory_temp.nvmlReturn == pynvml.NVML_SUCCESS) is hbm
    sim.inject(0, {"utilization": 50, "decoder_utilization": 30})
    sample = two_samples(driver, clock)
    assert sample.decoder_util_pct == 30
    assert sample.encoder_util_pct == 0  # every board answers; A100 and H100 have no NVENC at all
    assert (sample.gr_engine_active is not None) is gpm
    assert all((figure in sample.missing) is not gpm for figure in GPM_FIGURES)
    assert (sample.nvlink_kib is not None and sample.nvlink_kib > 0) is nvlink
    assert (sample.memory_temperature_c is not None) is hbm
    assert sample.memory_reserved_bytes == sim.gpus[0].profile.memory_reserved_mib * 2**20
    assert sample.pcie_replays == 0 and sample.vgpu_license_status == 0


def test_video_encoders_only_where_the_board_has_nvenc(node) -> None:
    sim, _ = node("A100")
    with pytest.raises(ValueError, match="no video encoder"):
        sim.inject(0, {"encoder_utilization": 10})
    t4, driver = node("T4")
    t4.inject(0, {"encoder_utilization": 40, "pcie_replays": 3})
    sample = driver.sample(0)
    assert (sample.encoder_util_pct, sample.pcie_replays) == (40, 3)


def test_gpm_figures_follow_the_load(node, clock: FakeClock) -> None:
    sim, driver = node("H100")
    first = driver.sample(0)
    assert first.tensor_active is None and "tensor_active" not in first.missing  # nothing to compare yet
    readings = []
    for load in (10, 50, 90):
        sim.inject(0, {"utilization": load})
        driver.sample(0)  # starts the interval at this load
        clock.advance(10)
        readings.append(driver.sample(0))
    tensor = [s.tensor_active for s in readings]
    assert tensor == sorted(tensor) and tensor[0] == pytest.approx(0.07, abs=0.01)
    assert [s.gr_engine_active for s in readings] == pytest.approx([0.1, 0.5, 0.9], abs=0.01)
    rx = [s.pcie_rx_bytes_per_s for s in readings]
    assert rx == sorted(rx) and rx[0] > 0
    assert all(s.dram_active is not None and 0 < s.dram_active < 1 for s in readings)


def test_gpm_survives_a_driver_reload(node, clock: FakeClock) -> None:
    sim, driver = node("H100")
    driver.sample(0)
    sim.inject(0, {"driver_unloaded": True})
    clock.advance(1)
    after = driver.sample(0)  # re-initialised: the kept sample is dropped, not compared
    assert after.tensor_active is None and not after.lost
    clock.advance(1)
    assert driver.sample(0).tensor_active is not None


# ----- the builder alone, as a cloud exporter would use it ---------------------------------------


def inventory(index: int = 0) -> GpuInventory:
    return GpuInventory(index=index, uuid=f"GPU-{index}", name="NVIDIA H100 80GB HBM3",
                        pci_bus_id="00000000:18:00.0", memory_total_bytes=80 * 2**30, driver_version="550.54.15")


def test_builder_without_a_daemon() -> None:
    sample = GpuSample(index=0, uuid="GPU-0", ts=1.0, energy_mj=1234, power_w=300.0)
    pods = (PodOnGpu("ml", "train-0", "worker"), PodOnGpu("ml", "infer-0", "server"))
    text = exposition(dcgm_families("node-a", [DcgmGpu(inventory(), sample, last_xid=79, pods=pods),
                                               DcgmGpu(inventory(1), None)])).decode()
    types, _, samples = parse_text(text)
    assert types["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] == "counter"
    assert "_total" not in text
    energy = samples["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"]
    assert sorted(lab["pod"] for lab, _ in energy) == ["infer-0", "train-0"]
    assert all(value == 1234 and lab["Hostname"] == "node-a" for lab, value in energy)
    assert "DCGM_FI_DEV_GPU_TEMP" not in samples  # not in the sample: left out, not 0
    xids = {lab["gpu"]: value for lab, value in samples["DCGM_FI_DEV_XID_ERRORS"]}
    assert xids == {"0": 79, "1": 0}  # a GPU with no sample still has its last XID
