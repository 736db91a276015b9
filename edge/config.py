"""The edge daemon's settings (flags > KGPU_* env > config file > defaults)."""

from __future__ import annotations

import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from shared.policy import PowerPolicy, Seconds
from shared.settings import HostPort, HttpHeaderTimeout, HttpRequestTimeout, KgpuSettings, MqttUrl, parse_host_port
from shared.topics import NODE_NAME_RE

# The simulated models and which simulation (and backend) each is: NVML's libnvidia-ml (edge/sim/),
# Jetson's sysfs tree (edge/sim/jetson/), AMD's libamd_smi (edge/sim/amd/), Intel's hwmon tree
# (edge/sim/intel/).
SIM_MODEL_BACKENDS: dict[str, Literal["nvml", "jetson", "amd", "intel"]] = {
    "H100": "nvml", "A100": "nvml", "A100-40GB": "nvml", "A10": "nvml", "T4": "nvml",
    "ORIN-NANO": "jetson", "ORIN-NX": "jetson", "AGX-ORIN": "jetson",
    "MI210": "amd", "MI300X": "amd",
    "FLEX170": "intel",
}
SIM_MODELS = tuple(SIM_MODEL_BACKENDS)
SimModel = Literal["H100", "A100", "A100-40GB", "A10", "T4", "ORIN-NANO", "ORIN-NX", "AGX-ORIN", "MI210", "MI300X",
                   "FLEX170"]


class EdgeSettings(KgpuSettings):
    """Everything `kgpu edge run` can be told. Field `foo_bar` is flag `--foo-bar` and env
    `KGPU_FOO_BAR`; the config file uses the field names as keys."""

    node: str | None = Field(
        None, description="Node name; falls back to NODE_NAME (downward API), then the hostname"
    )
    mqtt: MqttUrl | None = Field(None, description="Broker URL mqtt://[user:pass@]host:port or mqtts://")
    mqtt_ca_file: Path | None = Field(None, description="CA bundle for mqtts:// (default: the system's)")
    mqtt_cert_file: Path | None = Field(None, description="Client certificate for mutual TLS")
    mqtt_key_file: Path | None = Field(None, description="Client key for mutual TLS")
    mqtt_tls_insecure: bool = Field(False, description="Skip the broker's hostname check (explicit opt-in only)")
    mqtt_password_file: Path | None = Field(
        None, description="File holding the MQTT password (e.g. a mounted Secret); overrides the URL's"
    )
    outbox_window: int = Field(1000, ge=1, le=10_000, description="Events published but not yet acked, at "
                               "most (raised: raise the controller's node_max_events_ahead to twice this)")
    ack_timeout: Seconds = Field(15.0, ge=1.0, description="Re-send unacked events after this long without an ack")
    ack_timeout_max: Seconds = Field(
        120.0, ge=1.0, description="While the cloud is behind, unacked events wait ack_timeout plus twice the lag "
        "its last ack showed before they are sent again; at most this long")
    status_interval: Seconds = Field(30.0, ge=1.0, description="Re-publish the retained status at least this often")
    db: Path = Field(Path("/var/lib/kgpu/edge.db"), description="SQLite file of the edge store")
    # -- the edge store's bounds, retention and shutdown (edge/store/, docs/operations.md) --
    outbox_max_bytes: int = Field(
        1024 * 1024 * 1024, ge=0,
        description="Bound on the size of the unacked events (0: none); past it the oldest offline summaries "
        "are shrunk, nothing is dropped",
    )
    outbox_max_events: int = Field(
        1_000_000, ge=0,
        description="Bound on the number of unacked events (0: none); past it events are still recorded, "
        "counted and reported as outbox_over_bound",
    )
    log_retention: Seconds = Field(
        7 * 24 * 3600.0, ge=3600.0,
        description="Decisions and local event copies older than this are pruned (once the cloud acked them)",
    )
    log_max_rows: int = Field(
        100_000, ge=100, description="At most this many decisions, and local event copies, kept once acked"
    )
    shutdown_timeout: Seconds = Field(
        10.0, ge=1.0, le=300.0,
        description="On SIGTERM, stop within this long; the outbox is on disk, events still held in memory are "
        "lost (and logged)",
    )
    http: HostPort = Field("0.0.0.0:9410", description="HOST:PORT (or PORT) of the HTTP API and /metrics")
    # -- HTTP limits (docs/api.md), as on the controller --
    http_header_timeout: HttpHeaderTimeout
    http_request_timeout: HttpRequestTimeout
    backend: Literal["nvml", "jetson", "amd", "intel", "auto", "sim"] = Field(
        "nvml", description="nvml: NVIDIA GPUs through libnvidia-ml; jetson: a Jetson module's sysfs (devfreq, "
        "thermal zones, power rails, nvpmodel); amd: AMD GPUs through amdsmi; intel: Intel GPUs through the "
        "xe/i915 hwmon and sysfs files; auto: the first of jetson, nvml, amd, intel the node has; sim: "
        "simulated GPUs (the backend of --sim-model's vendor, at its real interface). docs/devices.md")
    sim_gpus: int = Field(2, ge=1, le=64, description="Number of simulated GPUs (backend sim)")
    sim_model: SimModel = Field(
        "H100", description="Simulated GPU model: H100, A100, A100-40GB, A10, T4 (NVML); ORIN-NANO, ORIN-NX, "
        "AGX-ORIN (Jetson); MI210, MI300X (AMD); FLEX170 (Intel)")
    sysfs_root: Path = Field(
        Path("/"), description="Where the host's sys/, proc/ and etc/ are read (backends jetson and intel; "
        "in a container, the host's / mounted read-only, e.g. /host)")
    sim_permissions: Literal["root", "none"] = Field(
        "root", description="none: the simulated driver refuses setters, as in an unprivileged container"
    )
    sim_daemon_version: str | None = Field(
        None, description="backend sim only: the daemon version to report (demos and rollout tests)"
    )
    interval: Seconds = Field(5.0, ge=1.0, le=300.0, description="Sampling interval in seconds")
    telemetry_retention: Seconds = Field(24 * 3600.0, description="How long sample history is kept")
    health_quiet_period: Seconds = Field(
        300.0, description="A GPU recovers after this long with no fault and passing checks"
    )
    lost_probe_interval: Seconds = Field(30.0, description="How often a lost GPU is probed again")
    probe_command: str | None = Field(None, description="Optional application-level health probe (shell command)")
    probe_interval: Seconds = Field(60.0, description="How often the probe command runs")
    probe_timeout: Seconds = Field(10.0, description="The probe command fails after this long")
    nvml_timeout: Seconds = Field(5.0, ge=0.1, le=120.0, description="Upper bound on one NVML call")
    pod_list_url: str | None = Field(
        None, description="Pod list for pod names (edgecore MetaServer, e.g. http://127.0.0.1:10550/api/v1/pods)"
    )
    proc_root: Path = Field(Path("/proc"), description="Where to read /proc/<pid>/cgroup (hostPID)")
    # -- the kubelet device plugin (docs/device-plugin.md) --
    device_plugin: bool = Field(
        False, description="Also serve the kubelet device-plugin API v1beta1: the GPUs (their time-slicing "
        "replicas, their MIG devices) with health that recovers")
    kubelet_dir: Path = Field(
        Path("/var/lib/kubelet/device-plugins"),
        description="The kubelet's device-plugin directory: registers at DIR/kubelet.sock, serves a socket in it")
    resource_name: str | None = Field(
        None, pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$", max_length=253,
        description="The resource whole GPUs are advertised as (another name runs beside the vendor's plugin); "
        "default: the backend's: nvidia.com/gpu (NVML, Jetson), amd.com/gpu, gpu.intel.com/i915 or "
        "gpu.intel.com/xe")
    # -- which pod uses which GPU (edge/podresources/) --
    pod_resources_socket: Path | None = Field(
        Path("/var/lib/kubelet/pod-resources/kubelet.sock"),
        description="The kubelet's pod-resources API (unix socket); unset or absent: NVML's processes -> "
        "cgroup -> pod. KubeEdge's edged serves it only behind its feature gate")
    # -- the remediation ladder (edge/remediation/, docs/operations.md) --
    remediation: bool = Field(
        True, description="Bring faulty GPUs back: fence, drain, diagnose, reset, validate; reboot as the last step")
    remediation_drain_timeout: Seconds = Field(
        300.0, ge=1.0, description="How long a fenced GPU waits for its processes to leave before the ladder "
        "goes on without a reset (reported, the GPU stays fenced)")
    remediation_diag_timeout: Seconds = Field(
        120.0, ge=1.0, description="Upper bound on each diagnostic command (CUDA probe, dcgmi diag)")
    remediation_cuda_probe_command: str | None = Field(
        None, description="A command that opens a CUDA context on the GPU ({index}, {uuid}, {pci_bus_id} are "
        "filled in); exit 0 passes. Unset: not run")
    remediation_dcgm_command: str | None = Field(
        "dcgmi diag -r 1 -i {index}", description="DCGM's quick diagnostic; run only when its executable is on "
        "PATH. Unset: not run")
    remediation_reset_command: str | None = Field(
        "nvidia-smi --gpu-reset -i {index}", description="Resets one GPU once no process holds it; unset: no "
        "reset, a fault that needs one goes to the reboot step. Left at its default on --backend amd: "
        "amd-smi reset --gpureset -g {index}; jetson and intel have no GPU reset (docs/devices.md)")
    remediation_reset_timeout: Seconds = Field(120.0, ge=1.0, description="Upper bound on the reset command")
    remediation_max_resets: int = Field(
        2, ge=0, le=10, description="Resets tried for one fault before the ladder asks for a reboot")
    remediation_reboot: Literal["request", "advise", "off"] = Field(
        "request", description="request: ask the cloud, which grants under its circuit breaker; advise: only "
        "record that a reboot is needed; off: neither")
    remediation_reboot_settle: Seconds = Field(
        60.0, ge=1.0, description="A node still up this long after the reboot command is validated as it is "
        "(a reboot that did not happen; the simulator's, which keeps the daemon running)")
    remediation_reboot_command: str | None = Field(
        "systemctl reboot", description="Run when the cloud grants a reboot this node asked for")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool | None = Field(None, description="JSON log lines; default: when stderr is not a terminal")
    policy: PowerPolicy = Field(
        default_factory=PowerPolicy, description="The power policy used until the cloud sends one"
    )

    @model_validator(mode="after")
    def _node_name(self) -> EdgeSettings:
        name = self.node or os.environ.get("NODE_NAME") or socket.gethostname()
        name = name.strip().lower()
        if not NODE_NAME_RE.match(name):
            raise ValueError(f"node name {name!r} is not a valid Kubernetes node name")
        self.node = name
        return self

    @model_validator(mode="after")
    def _sim_only(self) -> EdgeSettings:
        if self.sim_daemon_version is not None and self.backend != "sim":
            raise ValueError("sim_daemon_version is only for --backend sim")
        return self

    @model_validator(mode="after")
    def _one_gpu_on_a_jetson(self) -> EdgeSettings:
        """A Jetson module has one integrated GPU: a simulated one defaults to it, and asking for
        more is a configuration error rather than a traceback at start-up."""
        if self.backend != "sim" or SIM_MODEL_BACKENDS[self.sim_model] != "jetson":
            return self
        if "sim_gpus" in self.model_fields_set and self.sim_gpus != 1:
            raise ValueError(f"a Jetson module ({self.sim_model}) has one GPU: --sim-gpus 1, not {self.sim_gpus}")
        self.sim_gpus = 1
        return self

    @model_validator(mode="after")
    def _sim_tools(self) -> EdgeSettings:
        """With the simulated driver, the ladder's commands default to the simulator's stand-ins
        (edge/sim/tools/), which act on the simulated GPUs through the daemon's sim API; a command
        set explicitly is kept."""
        if self.backend != "sim":
            return self
        python = shlex.quote(sys.executable)
        sim_defaults = {
            "remediation_reset_command": f"{python} -m edge.sim.tools.nvidia_smi --gpu-reset -i {{index}}",
            "remediation_dcgm_command": f"{python} -m edge.sim.tools.dcgmi diag -r 1 -i {{index}}",
            "remediation_cuda_probe_command": f"{python} -m edge.sim.tools.cuda_probe -i {{index}}",
            "remediation_reboot_command": f"{python} -m edge.sim.tools.reboot",
        }
        for name, command in sim_defaults.items():
            if name not in self.model_fields_set:
                setattr(self, name, command)
        return self

    @property
    def local_api_url(self) -> str:
        """This daemon's HTTP API as a command run on the node reaches it (the simulator's tools)."""
        host, port = self.http_address
        host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def http_address(self) -> tuple[str, int]:
        return parse_host_port(self.http)
